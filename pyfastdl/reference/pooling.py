"""2-D pooling: the notes' ``pool2d`` (section 7.5, "Pooling": one channel, no padding, stride 1) as
the notes wrote it, and torch-convention versions (padding, stride, dilation, ceil_mode,
count_include_pad, divisor_override, torch's max index and tie rules) written with whole-tensor
torch ops: the test oracle (run in float64) and the ``reference`` backend. Differentiable by autograd
(the max gradient flows to the element torch picks)."""
import torch
import torch.nn.functional as F

from .conv2d import pool2d  # the notes' own, kept in the section's module

__all__ = ["pool2d", "pool_out_size", "max_pool2d_like_torch", "avg_pool2d_like_torch"]


def pool_out_size(n, k, pad, stride, dilation, ceil_mode):
    """torch's pooling_output_shape (csrc/common/pool2d.h, pool::out_size)."""
    num = n + 2 * pad - dilation * (k - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = num // stride + 1
    if ceil_mode and (out - 1) * stride >= n + pad:
        out -= 1
    return out


def _windows(t, kernel_size, stride, padding, dilation, out_hw, value):
    """(N, C, Ho, Wo, kH * kW): the windows of t (N, C, H, W) padded with ``value`` (padding on both
    sides, and as much more on the bottom/right as the ceil_mode windows reach)."""
    (kH, kW), (sH, sW), (pH, pW), (dH, dW), (Ho, Wo) = kernel_size, stride, padding, dilation, out_hw
    H, W = t.shape[-2:]
    eh, ew = dH * (kH - 1) + 1, dW * (kW - 1) + 1
    xh = max(0, (Ho - 1) * sH + eh - (H + 2 * pH))
    xw = max(0, (Wo - 1) * sW + ew - (W + 2 * pW))
    tp = F.pad(t, (pW, pW + xw, pH, pH + xh), value=value)
    win = tp.unfold(2, eh, sH).unfold(3, ew, sW)[:, :, :Ho, :Wo, ::dH, ::dW]
    return win.reshape(*win.shape[:4], kH * kW)


def max_pool2d_like_torch(x, kernel_size, stride, padding, dilation, ceil_mode=False, return_indices=False):
    """torch.nn.functional.max_pool2d on (N, C, H, W) with 2-tuples: the first maximum in window order
    (kh outer, kw inner), a NaN wins (the last NaN of the window), index = ih * W + iw."""
    N, C, H, W = x.shape
    Ho = pool_out_size(H, kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode)
    Wo = pool_out_size(W, kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode)
    conf = (kernel_size, stride, padding, dilation, (Ho, Wo))
    win = _windows(x, *conf, value=float("-inf"))
    pos = torch.arange(H * W, dtype=torch.float64, device=x.device).view(1, 1, H, W)
    posw = _windows(pos, *conf, value=-1.0).expand(N, C, Ho, Wo, -1)
    K = win.shape[-1]
    w = win.detach()
    nan = torch.isnan(w)
    order = torch.arange(1, K + 1, device=x.device)
    last_nan = (nan * order).argmax(-1)
    valid = posw >= 0
    mx = torch.where(valid, w, torch.full_like(w, float("-inf"))).amax(-1, keepdim=True)
    first_max = ((w == mx) & valid).int().argmax(-1)
    k = torch.where(nan.any(-1), last_nan, first_max).unsqueeze(-1)
    out = win.gather(-1, k).squeeze(-1)
    if not return_indices:
        return out
    return out, posw.gather(-1, k).squeeze(-1).long()


def avg_pool2d_like_torch(x, kernel_size, stride, padding, ceil_mode=False, count_include_pad=True,
                          divisor_override=None):
    """torch.nn.functional.avg_pool2d on (N, C, H, W) with 2-tuples."""
    N, C, H, W = x.shape
    Ho = pool_out_size(H, kernel_size[0], padding[0], stride[0], 1, ceil_mode)
    Wo = pool_out_size(W, kernel_size[1], padding[1], stride[1], 1, ceil_mode)
    conf = (kernel_size, stride, padding, (1, 1), (Ho, Wo))
    s = _windows(x, *conf, value=0.0).sum(-1)
    ones = torch.ones(1, 1, H, W, dtype=x.dtype, device=x.device)
    inside = _windows(ones, *conf, value=0.0).sum(-1)
    if divisor_override:
        div = torch.full_like(inside, float(divisor_override))
    elif count_include_pad:  # the window clipped to the padded input
        padded = F.pad(ones, (padding[1],) * 2 + (padding[0],) * 2, value=1.0)
        div = _windows(padded, kernel_size, stride, (0, 0), (1, 1), (Ho, Wo), value=0.0).sum(-1)
    else:
        div = inside
    return torch.where(inside > 0, s / torch.where(div == 0, torch.ones_like(div), div), torch.zeros_like(s))
