"""conv2d: the ops' shape rules and fake (meta) implementations, shared by the C++ op
(``torch.ops.pyfastdl.conv2d_*``) and the Triton op (``torch.ops.pyfastdl_triton.conv2d_*``); the
autograd Function over them. Schemas and shapes: csrc/ops.cpp."""
import torch

__all__ = ["conv2d_out_size", "conv2d_fwd_shapes", "conv2d_bwd_shapes"]


def conv2d_out_size(H, W, kH, kW, stride, padding, dilation):
    """(H_out, W_out) for padding = (top, bottom, left, right)."""
    H_out = (H + padding[0] + padding[1] - dilation[0] * (kH - 1) - 1) // stride[0] + 1
    W_out = (W + padding[2] + padding[3] - dilation[1] * (kW - 1) - 1) // stride[1] + 1
    return H_out, W_out


def _memory_format(input):
    """channels_last when input is channels_last and not also contiguous (C == 1 or H == W == 1 are
    both: then contiguous)."""
    if input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def conv2d_fwd_shapes(input, weight, stride, padding, dilation):
    """The output conv2d_fwd allocates: (N, C_out, H_out, W_out) in input's memory format."""
    N, _, H, W = input.shape
    H_out, W_out = conv2d_out_size(H, W, weight.shape[2], weight.shape[3], stride, padding, dilation)
    return torch.empty((N, weight.shape[0], H_out, W_out), dtype=input.dtype, device=input.device,
                       memory_format=_memory_format(input))


def conv2d_bwd_shapes(input, weight, output_mask):
    """The outputs conv2d_bwd allocates: grad_input like input (its memory format), grad_weight like
    weight (contiguous), grad_bias (C_out,); None where output_mask is False."""
    return (torch.empty_like(input, memory_format=_memory_format(input)) if output_mask[0] else None,
            weight.new_empty(weight.shape) if output_mask[1] else None,
            weight.new_empty((weight.shape[0],)) if output_mask[2] else None)


@torch.library.register_fake("pyfastdl::conv2d_fwd")
def _conv2d_fwd_fake(input, weight, bias, stride, padding, dilation, groups):
    return conv2d_fwd_shapes(input, weight, stride, padding, dilation)


@torch.library.register_fake("pyfastdl::conv2d_bwd")
def _conv2d_bwd_fake(grad_out, input, weight, stride, padding, dilation, groups, output_mask):
    return conv2d_bwd_shapes(input, weight, output_mask)
