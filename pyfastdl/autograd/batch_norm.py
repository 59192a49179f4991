"""BatchNormFunction: autograd over the registered ops ``batch_norm_fwd`` / ``batch_norm_bwd``
(``torch.ops.pyfastdl`` for the C++ and CUDA kernels, ``torch.ops.pyfastdl_triton`` for Triton), plus
the ops' fake (meta) implementations for ``opcheck`` and ``torch.compile``."""
import torch

from .. import backends
from ..reference.batch_norm import batch_norm_like_torch

__all__ = ["BatchNormFunction", "ACTIVATIONS"]

# The activations fused into the batch-norm kernels, by the code the ops take (the schemas' `int
# activation`, csrc/ops.cpp; csrc/common/batch_norm.h's Activation).
ACTIVATIONS = {None: 0, "relu": 1, "sigmoid": 2}
_ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}


def _check_activation(activation: int, op: str) -> None:
    """The fakes refuse what the kernels refuse (csrc/common/batch_norm.h, check_activation)."""
    if activation not in _ACTIVATION_NAMES:
        raise ValueError(f"{op}: expected activation 0 (none), 1 (relu) or 2 (sigmoid), got {activation}")


def _activate(y, activation: int):
    """y -> act(y) with torch's ops (activation: the op's code)."""
    if activation == 1:
        return torch.relu(y)
    if activation == 2:
        return torch.sigmoid(y)
    return y


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
def _batch_norm_fwd_fake(input, weight, bias, running_mean, running_var, training, momentum, eps, activation):
    _check_activation(activation, "batch_norm")
    return batch_norm_fwd_shapes(input)


def batch_norm_fwd_shapes(input):
    """The outputs batch_norm_fwd allocates (shared by the fake implementations of the C++ and the
    Triton op): the output in the kernels' layout, save_mean and save_invstd (C,) in the
    accumulation dtype."""
    C = input.shape[1]
    acc = _acc_dtype(input.dtype)
    return _like_kernel_layout(input), input.new_empty((C,), dtype=acc), input.new_empty((C,), dtype=acc)


@torch.library.register_fake("pyfastdl::batch_norm_bwd")
def _batch_norm_bwd_fake(grad_out, input, weight, bias, save_mean, save_invstd, training, activation, output_mask):
    _check_activation(activation, "batch_norm_bwd")
    return batch_norm_bwd_shapes(input, output_mask)


def batch_norm_bwd_shapes(input, output_mask):
    """The outputs batch_norm_bwd allocates (shared by the fake implementations of the C++ and the
    Triton op): grad_input like the kernels' layout, grad_weight and grad_bias (C,) in the
    accumulation dtype; an output whose output_mask entry is False is None (not computed)."""
    C = input.shape[1]
    acc = _acc_dtype(input.dtype)
    return (_like_kernel_layout(input) if output_mask[0] else None,
            input.new_empty((C,), dtype=acc) if output_mask[1] else None,
            input.new_empty((C,), dtype=acc) if output_mask[2] else None)


@torch.library.register_fake("pyfastdl::batch_norm")
def _batch_norm_fake(input, weight, bias, running_mean, running_var, training, momentum, eps, activation):
    _check_activation(activation, "batch_norm")
    return _like_kernel_layout(input)


class BatchNormFunction(torch.autograd.Function):
    """y = act((x - mean) * invstd * weight + bias), statistics per channel (dim 1).
    forward(input (N, C, *), weight (C,)|None, bias (C,)|None, running_mean (C,)|None,
            running_var (C,)|None, training, momentum, eps, activation (code: ACTIVATIONS), ops)
    -> output like input.
    ``ops`` is the op namespace of the backend (pyfastdl.backends.ops)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, activation, ops):
        out, save_mean, save_invstd = ops.batch_norm_fwd(
            input, weight, bias, running_mean, running_var, training, momentum, eps, activation)
        ctx.save_for_backward(input, weight, bias, save_mean, save_invstd)
        ctx.training, ctx.activation, ctx.ops, ctx.eps = training, activation, ops, eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, bias, save_mean, save_invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1] and weight is not None), bool(need[2] and bias is not None)]
        if torch.is_grad_enabled():  # create_graph=True: the gradients must carry their own graph
            return differentiable_grads(grad_out, input, weight, bias, save_mean, save_invstd, ctx.training,
                                        ctx.eps, ctx.activation, mask) + (None,) * 7
        grad_input, grad_weight, grad_bias = ctx.ops.batch_norm_bwd(
            grad_out, input, weight, bias, save_mean, save_invstd, ctx.training, ctx.activation, mask)
        grad_weight = grad_weight.to(weight.dtype) if mask[1] else None
        grad_bias = grad_bias.to(bias.dtype) if mask[2] else None
        return (grad_input if mask[0] else None, grad_weight, grad_bias) + (None,) * 7


def differentiable_grads(grad_out, input, weight, bias, save_mean, save_invstd, training, eps, activation, mask):
    """The first-order gradients as differentiable functions of (input, weight, bias, grad_out), for
    backward(create_graph=True) (a gradient penalty, gradgradcheck); None where mask is False. The
    kernels' backward is not itself differentiable, so the forward is recomputed with the reference
    math (pyfastdl.reference.batch_norm_like_torch; running statistics not updated again) and
    differentiated by autograd: torch's own ops run here, recorded as ``batch_norm_double_backward``
    -> ``reference`` in backends.last_dispatch(). In eval the saved (running) statistics are
    constants: mean = save_mean, var = 1 / save_invstd^2 - eps. Used by BatchNormFunction (Triton)
    and, through the op ``pyfastdl::batch_norm_bwd_graph``, by the C++ autograd node of
    ``pyfastdl::batch_norm`` (cpu, cuda)."""
    backends.record("batch_norm_double_backward", "reference")
    wanted = [t for t, m in zip((input, weight, bias), mask) if m]
    if not wanted:
        return (None, None, None)
    with torch.enable_grad():
        if training:
            y = batch_norm_like_torch(input, None, None, weight, bias, True, 0.0, eps, _ACTIVATION_NAMES[activation])
        else:
            shape = [1, input.shape[1]] + [1] * (input.dim() - 2)
            y = (input - save_mean.view(shape).to(input.dtype)) * save_invstd.view(shape).to(input.dtype)
            if weight is not None:
                y = y * weight.view(shape)
            if bias is not None:
                y = y + bias.view(shape)
            y = _activate(y, activation)
        grads = iter(torch.autograd.grad(y, wanted, grad_out, create_graph=True, allow_unused=True))
    out = [next(grads) if m else None for m in mask]
    return tuple(torch.zeros_like(t) if m and g is None else g for t, m, g in zip((input, weight, bias), mask, out))


@torch.library.impl("pyfastdl::batch_norm_bwd_graph", "CompositeImplicitAutograd")
def _batch_norm_bwd_graph(grad_out, input, weight, bias, save_mean, save_invstd, training, eps, activation,
                          output_mask):
    g = differentiable_grads(grad_out, input, weight, bias, save_mean, save_invstd, training, eps, activation,
                             [bool(m) for m in output_mask])
    return tuple(t if t is not None else input.new_empty((0,)) for t in g)
