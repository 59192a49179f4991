"""BatchNormFunction: autograd over the registered ops ``batch_norm_fwd`` / ``batch_norm_bwd``
(``torch.ops.pyfastdl`` for the C++ and CUDA kernels, ``torch.ops.pyfastdl_triton`` for Triton), plus
the ops' fake (meta) implementations for ``opcheck`` and ``torch.compile``."""
import torch
from torch.autograd.function import once_differentiable

__all__ = ["BatchNormFunction"]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _like_kernel_layout(input):
    """The output/grad_input the kernels allocate: input's strides when input is contiguous or
    channels_last, contiguous otherwise (csrc/common/batch_norm.h, to_kernel_layout)."""
    if input.is_contiguous():
        return torch.empty_like(input, memory_format=torch.contiguous_format)
    for fmt, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if input.dim() == rank and input.is_contiguous(memory_format=fmt):
            return torch.empty_like(input, memory_format=fmt)
    return torch.empty(input.shape, dtype=input.dtype, device=input.device)


@torch.library.register_fake("pyfastdl::batch_norm_fwd")
def _batch_norm_fwd_fake(input, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    C = input.shape[1]
    acc = _acc_dtype(input.dtype)
    return _like_kernel_layout(input), input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc)


@torch.library.register_fake("pyfastdl::batch_norm_bwd")
def _batch_norm_bwd_fake(grad_out, input, weight, bias, save_mean, save_invstd, training, relu):
    C = input.shape[1]
    acc = _acc_dtype(input.dtype)
    return _like_kernel_layout(input), input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc)


@torch.library.register_fake("pyfastdl::batch_norm")
def _batch_norm_fake(input, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    return _like_kernel_layout(input)


class BatchNormFunction(torch.autograd.Function):
    """y = relu?((x - mean) * invstd * weight + bias), statistics per channel (dim 1).
    forward(input (N, C, *), weight (C,)|None, bias (C,)|None, running_mean (C,)|None,
            running_var (C,)|None, training, momentum, eps, relu, ops) -> output like input.
    ``ops`` is the op namespace of the backend (pyfastdl.backends.ops)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, relu, ops):
        out, save_mean, save_invstd = ops.batch_norm_fwd(
            input, weight, bias, running_mean, running_var, training, momentum, eps, relu)
        ctx.save_for_backward(input, weight, bias, save_mean, save_invstd)
        ctx.training, ctx.relu, ctx.ops = training, relu, ops
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        input, weight, bias, save_mean, save_invstd = ctx.saved_tensors
        grad_input, grad_weight, grad_bias = ctx.ops.batch_norm_bwd(
            grad_out, input, weight, bias, save_mean, save_invstd, ctx.training, ctx.relu)
        need = ctx.needs_input_grad
        grad_weight = grad_weight.to(weight.dtype) if weight is not None and need[1] else None
        grad_bias = grad_bias.to(bias.dtype) if bias is not None and need[2] else None
        return (grad_input if need[0] else None, grad_weight, grad_bias) + (None,) * 7
