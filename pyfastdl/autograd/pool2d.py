"""pool2d (max_pool2d, avg_pool2d): the ops' shape rules and fake (meta) implementations, and the
autograd Functions over them. Schemas and shapes: csrc/ops.cpp ("2-D pooling")."""
import torch

from ..reference.pooling import pool_out_size

__all__ = ["pool2d_out_shape", "MaxPool2dFunction", "AvgPool2dFunction"]


def _memory_format(input):
    """torch's rule for CPU pooling: the output in input.suggest_memory_format()."""
    from torch._prims_common import suggest_memory_format
    return suggest_memory_format(input) if input.dim() == 4 else torch.contiguous_format


def pool2d_out_shape(input, kernel_size, stride, padding, dilation, ceil_mode):
    """(N, C, H_out, W_out) of a pooling of input (N, C, H, W)."""
    N, C, H, W = input.shape
    return (N, C, pool_out_size(H, kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode),
            pool_out_size(W, kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode))


def _empty(input, shape, dtype=None):
    return torch.empty(shape, dtype=dtype or input.dtype, device=input.device, memory_format=_memory_format(input))


@torch.library.register_fake("pyfastdl::max_pool2d_fwd")
def _max_pool2d_fwd_fake(input, kernel_size, stride, padding, dilation, ceil_mode, need_indices):
    shape = pool2d_out_shape(input, kernel_size, stride, padding, dilation, ceil_mode)
    return _empty(input, shape), (_empty(input, shape, torch.int64) if need_indices else None)


@torch.library.register_fake("pyfastdl::max_pool2d_bwd")
def _max_pool2d_bwd_fake(grad_out, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    return _empty(input, input.shape)


@torch.library.register_fake("pyfastdl::avg_pool2d_fwd")
def _avg_pool2d_fwd_fake(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return _empty(input, pool2d_out_shape(input, kernel_size, stride, padding, (1, 1), ceil_mode))


@torch.library.register_fake("pyfastdl::avg_pool2d_bwd")
def _avg_pool2d_bwd_fake(grad_out, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override):
    return _empty(input, input.shape)


# ---- autograd -----------------------------------------------------------------------------------------
# Both backwards are linear in grad_out, so double backward (create_graph=True) differentiates them
# exactly: max_pool2d_bwd scatters grad_out to the saved indices, its adjoint gathers at them (torch's
# gather); avg_pool2d_bwd's adjoint is avg_pool2d_fwd itself (pyfastdl's kernel).

class MaxPool2dFunction(torch.autograd.Function):
    """(out, indices) = max_pool2d(input) on (N, C, H, W); indices int64, not differentiable.
    forward(input, kernel_size [2], stride [2], padding [2], dilation [2], ceil_mode, ops); ``ops`` is
    the backend's op namespace (pyfastdl.backends.ops)."""

    @staticmethod
    def forward(ctx, input, kernel_size, stride, padding, dilation, ceil_mode, ops):
        out, idx = ops.max_pool2d_fwd(input, kernel_size, stride, padding, dilation, ceil_mode, True)
        ctx.save_for_backward(input, idx)
        ctx.mark_non_differentiable(idx)
        ctx.conf = (kernel_size, stride, padding, dilation, ceil_mode)
        ctx.ops = ops
        return out, idx

    @staticmethod
    def backward(ctx, grad_out, _grad_idx):
        input, idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        if torch.is_grad_enabled():  # create_graph=True: a grad_input with a graph of its own
            gi = MaxPool2dBackward.apply(grad_out, input, idx, ctx.conf, ctx.ops)
        else:
            gi = ctx.ops.max_pool2d_bwd(grad_out, input, idx, *ctx.conf)
        return gi, None, None, None, None, None, None


class MaxPool2dBackward(torch.autograd.Function):
    """grad_input = max_pool2d_bwd(grad_out, ...) as a differentiable function of grad_out (its
    adjoint: gather at the indices)."""

    @staticmethod
    def forward(ctx, grad_out, input, idx, conf, ops):
        ctx.save_for_backward(idx)
        return ops.max_pool2d_bwd(grad_out, input, idx, *conf)

    @staticmethod
    def backward(ctx, ggi):
        (idx,) = ctx.saved_tensors
        N, C = idx.shape[:2]
        gg = ggi.reshape(N, C, -1).gather(2, idx.reshape(N, C, -1)).view(idx.shape)
        return gg, None, None, None, None


class AvgPool2dFunction(torch.autograd.Function):
    """out = avg_pool2d(input) on (N, C, H, W).
    forward(input, kernel_size [2], stride [2], padding [2], ceil_mode, count_include_pad,
    divisor_override, ops)."""

    @staticmethod
    def forward(ctx, input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, ops):
        ctx.conf = (kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        ctx.ops = ops
        ctx.save_for_backward(input)
        return ops.avg_pool2d_fwd(input, *ctx.conf)

    @staticmethod
    def backward(ctx, grad_out):
        (input,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 8
        if torch.is_grad_enabled():
            gi = AvgPool2dBackward.apply(grad_out, input, ctx.conf, ctx.ops)
        else:
            gi = ctx.ops.avg_pool2d_bwd(grad_out, input, *ctx.conf)
        return gi, None, None, None, None, None, None, None


class AvgPool2dBackward(torch.autograd.Function):
    """grad_input = avg_pool2d_bwd(grad_out, ...) as a differentiable function of grad_out (its
    adjoint is avg_pool2d_fwd, through AvgPool2dFunction: differentiable again)."""

    @staticmethod
    def forward(ctx, grad_out, input, conf, ops):
        ctx.conf, ctx.ops = conf, ops
        ctx.save_for_backward(input)
        return ops.avg_pool2d_bwd(grad_out, input, *conf)

    @staticmethod
    def backward(ctx, ggi):
        (input,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            gg = AvgPool2dFunction.apply(ggi, *ctx.conf, ctx.ops)
        else:
            gg = ctx.ops.avg_pool2d_fwd(ggi, *ctx.conf)
        return gg, None, None, None


# ---- pyfastdl::max_pool2d / avg_pool2d (the C++ autograd ops of the cpu and cuda backends' per-call
# path, csrc/cpu/pool2d_autograd.cpp) --------------------------------------------------------------------

@torch.library.register_fake("pyfastdl::max_pool2d")
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    return _empty(input, pool2d_out_shape(input, kernel_size, stride, padding, dilation, ceil_mode))


@torch.library.register_fake("pyfastdl::avg_pool2d")
def _avg_pool2d_fake(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return _empty(input, pool2d_out_shape(input, kernel_size, stride, padding, (1, 1), ceil_mode))


@torch.library.impl("pyfastdl::max_pool2d_bwd_graph", "CompositeImplicitAutograd")
def _max_pool2d_bwd_graph(grad_out, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    """The C++ node of ``pyfastdl::max_pool2d`` under backward(create_graph=True): grad_input as a
    differentiable function of grad_out (MaxPool2dBackward: the same op, its adjoint a gather)."""
    conf = (list(kernel_size), list(stride), list(padding), list(dilation), bool(ceil_mode))
    return MaxPool2dBackward.apply(grad_out, input, indices, conf, torch.ops.pyfastdl)


@torch.library.impl("pyfastdl::avg_pool2d_bwd_graph", "CompositeImplicitAutograd")
def _avg_pool2d_bwd_graph(grad_out, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                          divisor_override):
    """The C++ node of ``pyfastdl::avg_pool2d`` under backward(create_graph=True) (AvgPool2dBackward:
    its adjoint is avg_pool2d_fwd)."""
    conf = (list(kernel_size), list(stride), list(padding), bool(ceil_mode), bool(count_include_pad),
            divisor_override)
    return AvgPool2dBackward.apply(grad_out, input, conf, torch.ops.pyfastdl)
