"""conv2d: the ops' shape rules and fake (meta) implementations, shared by the C++ op
(``torch.ops.pyfastdl.conv2d_*``) and the Triton op (``torch.ops.pyfastdl_triton.conv2d_*``); the
autograd Function over them. Schemas and shapes: csrc/ops.cpp."""
import torch

__all__ = ["conv2d_out_size", "conv2d_fwd_shapes", "conv2d_bwd_shapes", "Conv2dFunction", "conv2d_reference"]


def conv2d_out_size(H, W, kH, kW, stride, padding, dilation):
    """(H_out, W_out) for padding = (top, bottom, left, right)."""
    H_out = (H + padding[0] + padding[1] - dilation[0] * (kH - 1) - 1) // stride[0] + 1
    W_out = (W + padding[2] + padding[3] - dilation[1] * (kW - 1) - 1) // stride[1] + 1
    return H_out, W_out


def _memory_format(input, weight):
    """The output's memory format, torch's rule for a CPU or cuDNN convolution: channels_last when
    the input's or the weight's strides suggest it (csrc/common/conv2d.h, is_channels_last)."""
    from torch._prims_common import suggest_memory_format
    if input.dim() == 4 and (suggest_memory_format(input) == torch.channels_last or
                             (weight.dim() == 4 and suggest_memory_format(weight) == torch.channels_last)):
        return torch.channels_last
    return torch.contiguous_format


def conv2d_fwd_shapes(input, weight, stride, padding, dilation):
    """The output conv2d_fwd allocates: (N, C_out, H_out, W_out) in _memory_format(input, weight)."""
    N, _, H, W = input.shape
    H_out, W_out = conv2d_out_size(H, W, weight.shape[2], weight.shape[3], stride, padding, dilation)
    return torch.empty((N, weight.shape[0], H_out, W_out), dtype=input.dtype, device=input.device,
                       memory_format=_memory_format(input, weight))


def conv2d_bwd_shapes(input, weight, output_mask):
    """The outputs conv2d_bwd allocates: grad_input like input (in _memory_format(input, weight)), grad_weight like
    weight (contiguous), grad_bias (C_out,); None where output_mask is False."""
    return (torch.empty_like(input, memory_format=_memory_format(input, weight)) if output_mask[0] else None,
            weight.new_empty(weight.shape) if output_mask[1] else None,
            weight.new_empty((weight.shape[0],)) if output_mask[2] else None)


@torch.library.register_fake("pyfastdl::conv2d_fwd")
def _conv2d_fwd_fake(input, weight, bias, stride, padding, dilation, groups):
    return conv2d_fwd_shapes(input, weight, stride, padding, dilation)


@torch.library.register_fake("pyfastdl::conv2d_bwd")
def _conv2d_bwd_fake(grad_out, input, weight, stride, padding, dilation, groups, output_mask):
    return conv2d_bwd_shapes(input, weight, output_mask)


# ---- the autograd Function ------------------------------------------------------------------------

def conv2d_reference(input, weight, bias, stride, padding, dilation, groups):
    """The convolution as differentiable torch math (zero padding (top, bottom, left, right) by
    F.pad, then torch's conv2d with no padding): used only for double backward."""
    import torch.nn.functional as F
    x = F.pad(input, (padding[2], padding[3], padding[0], padding[1])) if any(padding) else input
    return F.conv2d(x, weight, bias, tuple(stride), 0, tuple(dilation), groups)


class Conv2dFunction(torch.autograd.Function):
    """y = conv2d(input, weight, bias) (cross-correlation, torch's convention).
    forward(input (N, C_in, H, W), weight (C_out, C_in / groups, kH, kW), bias (C_out,)|None,
            stride [2], padding [4] = (top, bottom, left, right), dilation [2], groups, ops)
    -> (N, C_out, H_out, W_out) in input's memory format. ``ops`` is the backend's op namespace
    (pyfastdl.backends.ops). backward asks conv2d_bwd only for the gradients autograd needs
    (ctx.needs_input_grad -> output_mask). backward(create_graph=True) recomputes the forward with
    conv2d_reference and differentiates it (recorded as conv2d_double_backward -> reference)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, ops):
        out = ops.conv2d_fwd(input, weight, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(input, weight)
        ctx.has_bias = bias is not None
        ctx.conf = (stride, padding, dilation, groups)
        ctx.ops = ops
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need = ctx.needs_input_grad
        mask = [bool(need[0]), bool(need[1]), bool(need[2] and ctx.has_bias)]
        if not any(mask):
            return (None,) * 8
        if torch.is_grad_enabled():  # create_graph=True: gradients with a graph of their own
            from .. import backends
            backends.record("conv2d_double_backward", "reference")
            with torch.enable_grad():
                bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device,
                                   requires_grad=True) if mask[2] else None
                y = conv2d_reference(input, weight, bias, stride, padding, dilation, groups)
                targets = [t for t, m in zip((input, weight, bias), mask) if m]
                grads = iter(torch.autograd.grad(y, targets, grad_out, create_graph=True, allow_unused=True))
            out = [next(grads) if m else None for m in mask]
            return tuple(out) + (None,) * 5
        grad_input, grad_weight, grad_bias = ctx.ops.conv2d_bwd(
            grad_out, input, weight, stride, padding, dilation, groups, mask)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


# ---- pyfastdl::conv2d (the C++ autograd op of the cpu and cuda backends' per-call path) ----------

@torch.library.register_fake("pyfastdl::conv2d")
def _conv2d_fake(input, weight, bias, stride, padding, dilation, groups):
    return conv2d_fwd_shapes(input, weight, stride, padding, dilation)


@torch.library.impl("pyfastdl::conv2d_bwd_graph", "CompositeImplicitAutograd")
def _conv2d_bwd_graph(grad_out, input, weight, stride, padding, dilation, groups, output_mask):
    """The C++ node of ``pyfastdl::conv2d`` (csrc/cpu/conv2d_autograd.cpp) under
    backward(create_graph=True): the gradients asked for, with their graph (the forward recomputed
    with conv2d_reference and differentiated; recorded as conv2d_double_backward -> reference);
    empty (0,) for the rest."""
    from .. import backends
    backends.record("conv2d_double_backward", "reference")
    mask = [bool(m) for m in output_mask]
    with torch.enable_grad():
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device,
                           requires_grad=True) if mask[2] else None
        x = input if input.requires_grad or not mask[0] else input.detach().requires_grad_(True)
        w = weight if weight.requires_grad or not mask[1] else weight.detach().requires_grad_(True)
        y = conv2d_reference(x, w, bias, stride, padding, dilation, groups)
        targets = [t for t, m in zip((x, w, bias), mask) if m]
        grads = iter(torch.autograd.grad(y, targets, grad_out, create_graph=True, allow_unused=True))
    res = []
    for t, m in zip((input, weight, bias), mask):
        g = next(grads) if m else None
        res.append(g if g is not None else (torch.zeros_like(t) if m else input.new_empty((0,))))
    return tuple(res)
