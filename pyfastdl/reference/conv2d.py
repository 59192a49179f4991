"""2-D convolution from scratch, as the notes build it (d2l style, sections 19-22 of the notes:
"卷积层", "填充和步幅", "多个输入和输出通道", "池化层"), runnable without the d2l package.

Two kinds of code live here:

* The notes' code as the notes wrote it: ``corr2d`` (section 19), the notes' ``Conv2D`` layer
  (section 19; the notes' text has typos, ``_init_`` and ``kerner_size``, fixed here),
  ``comp_conv2d`` (section 20), ``corr2d_multi_in``, ``corr2d_multi_in_out``,
  ``corr2d_multi_in_out_1x1`` (section 21) and ``pool2d`` (section 22). As in the notes, these work
  on one image: X (H, W) or (C, H, W), no batch, no padding, stride 1, and ``corr2d`` and ``pool2d``
  allocate their output with ``torch.zeros`` (the default dtype), exactly as written.
* ``conv2d_like_torch``: the same cross-correlation with ``torch.nn.functional.conv2d``'s arguments
  and conventions (batch, groups, stride, padding as an int, a pair, a 4-tuple or ``'same'`` /
  ``'valid'``, dilation, unbatched (C, H, W) input), computed in the input's dtype as a sum over the
  kernel taps of strided slices of the zero-padded input: slow, plain, and the oracle that the
  pyfastdl conv2d kernels are tested against in float64. ``conv2d_padding`` resolves torch's padding
  argument into the (top, bottom, left, right) of the ``conv2d_fwd`` op's schema.

Note (the notes' Q&A of section 21): a convolution "layer" in deep learning computes a
*cross-correlation*: the kernel is not flipped.
"""
import torch
from torch import nn

__all__ = ["corr2d", "Conv2D", "comp_conv2d", "corr2d_multi_in", "corr2d_multi_in_out",
           "corr2d_multi_in_out_1x1", "pool2d", "conv2d_padding", "conv2d_out_size",
           "conv2d_like_torch"]


# ---- the notes' code ---------------------------------------------------------------------------------

def corr2d(X, K):
    """2-D cross-correlation (section 19). X: (n_h, n_w), K: (k_h, k_w) -> Y: (n_h - k_h + 1,
    n_w - k_w + 1), in the default dtype (the notes allocate Y with ``torch.zeros``)."""
    h, w = K.shape
    Y = torch.zeros((X.shape[0] - h + 1, X.shape[1] - w + 1))
    for i in range(Y.shape[0]):
        for j in range(Y.shape[1]):
            Y[i, j] = (X[i:i + h, j:j + w] * K).sum()
    return Y


class Conv2D(nn.Module):
    """The notes' 2-D convolution layer (section 19): one channel, a learnable kernel and a scalar
    bias. forward: X (n_h, n_w) -> corr2d(X, weight) + bias."""

    def __init__(self, kernel_size):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(kernel_size))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return corr2d(x, self.weight) + self.bias


def comp_conv2d(conv2d, X):
    """Section 20: run a (1 -> 1 channel) conv layer on a 2-D X (H, W) and return the 2-D output:
    adds the batch and channel axes, then drops them."""
    X = X.reshape((1, 1) + X.shape)
    Y = conv2d(X)
    return Y.reshape(Y.shape[2:])


def corr2d_multi_in(X, K):
    """Several input channels (section 21): X (c_i, n_h, n_w), K (c_i, k_h, k_w) -> (m_h, m_w), the
    sum over channels of each channel's cross-correlation."""
    return sum(corr2d(x, k) for x, k in zip(X, K))


def corr2d_multi_in_out(X, K):
    """Several input and output channels (section 21): X (c_i, n_h, n_w), K (c_o, c_i, k_h, k_w) ->
    (c_o, m_h, m_w), one corr2d_multi_in per output channel, stacked."""
    return torch.stack([corr2d_multi_in(X, k) for k in K], 0)


def corr2d_multi_in_out_1x1(X, K):
    """A 1x1 convolution as a matrix product (section 21): X (c_i, h, w), K (c_o, c_i, 1, 1) ->
    (c_o, h, w) = K (c_o, c_i) @ X (c_i, h * w)."""
    c_i, h, w = X.shape
    c_o = K.shape[0]
    X = X.reshape((c_i, h * w))
    K = K.reshape((c_o, c_i))
    Y = torch.matmul(K, X)
    return Y.reshape((c_o, h, w))


def pool2d(X, pool_size, mode='max'):
    """Max or average pooling (section 22), stride 1, no padding: X (n_h, n_w), pool_size (p_h, p_w)
    -> (n_h - p_h + 1, n_w - p_w + 1); mode 'max' or 'avg'."""
    p_h, p_w = pool_size
    Y = torch.zeros((X.shape[0] - p_h + 1, X.shape[1] - p_w + 1), dtype=X.dtype)  # (X's dtype: float64 tests)
    for i in range(Y.shape[0]):
        for j in range(Y.shape[1]):
            if mode == 'max':
                Y[i, j] = X[i: i + p_h, j: j + p_w].max()
            elif mode == 'avg':
                Y[i, j] = X[i: i + p_h, j: j + p_w].mean()
    return Y


# ---- like torch --------------------------------------------------------------------------------------

def _pair(v, name):
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2 or not all(isinstance(x, int) for x in v):
        raise ValueError(f"conv2d: {name} must be an int or a pair of ints, got {v!r}")
    return v


def conv2d_padding(padding, kernel_size, dilation=1, stride=1):
    """torch's padding argument -> (top, bottom, left, right), the conv2d_fwd op's convention.

    padding: int, (ph, pw), (top, bottom, left, right), 'valid' (0) or 'same' (stride 1 only; total
    padding dilation * (k - 1) per axis, the odd one extra at the bottom/right, as torch pads).
    kernel_size: (kH, kW)."""
    kH, kW = kernel_size
    dh, dw = _pair(dilation, "dilation")
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if _pair(stride, "stride") != (1, 1):
                raise ValueError("conv2d: padding='same' is not supported for strided convolutions "
                                 f"(stride={stride!r})")
            th, tw = dh * (kH - 1), dw * (kW - 1)
            return (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        raise ValueError(f"conv2d: padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    if not isinstance(padding, int) and len(tuple(padding)) == 4:
        pad = tuple(padding)
    else:
        ph, pw = _pair(padding, "padding")
        pad = (ph, ph, pw, pw)
    if any(p < 0 for p in pad):
        raise ValueError(f"conv2d: padding must be >= 0, got {padding!r}")
    return pad


def conv2d_out_size(size, kernel_size, stride=1, padding=(0, 0, 0, 0), dilation=1):
    """(H_out, W_out) of a convolution: H_out = (H + top + bottom - dh * (kH - 1) - 1) // sh + 1.
    size (H, W), kernel_size (kH, kW), padding (top, bottom, left, right)."""
    (H, W), (kH, kW) = size, kernel_size
    (sh, sw), (dh, dw) = _pair(stride, "stride"), _pair(dilation, "dilation")
    t, b, l, r = padding
    return ((H + t + b - dh * (kH - 1) - 1) // sh + 1, (W + l + r - dw * (kW - 1) - 1) // sw + 1)


def conv2d_like_torch(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``torch.nn.functional.conv2d`` written out: cross-correlation over the kernel taps.

    input: (N, C_in, H, W) or unbatched (C_in, H, W); weight: (C_out, C_in / groups, kH, kW);
    bias: (C_out,) or None; stride, dilation: int or pair; padding: int, pair, (top, bottom, left,
    right), 'same' or 'valid' (zeros). Returns (N, C_out, H_out, W_out) (or (C_out, H_out, W_out))
    in input's dtype, accumulated in input's dtype (use float64 for an oracle).

    For each tap (i, j) of the kernel, the input pixels it meets are a strided slice of the padded
    input, X_pad[:, :, i*dh : i*dh + sh*(H_out-1) + 1 : sh, j*dw : ... : sw]; the output is the sum
    over taps of that slice contracted with weight[:, :, i, j] within each group."""
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    if input.dim() != 4:
        raise ValueError(f"conv2d: input must be 3-D (C, H, W) or 4-D (N, C, H, W), got {input.dim()}-D")
    if weight.dim() != 4:
        raise ValueError(f"conv2d: weight must be 4-D (C_out, C_in / groups, kH, kW), got {weight.dim()}-D")
    N, C, H, W = input.shape
    O, Cg, kH, kW = weight.shape
    if groups < 1 or C % groups or O % groups:
        raise ValueError(f"conv2d: groups={groups} must divide input channels ({C}) and output "
                         f"channels ({O})")
    if Cg * groups != C:
        raise ValueError(f"conv2d: weight expects {Cg * groups} input channels (C_in / groups = {Cg}, "
                         f"groups = {groups}), input has {C}")
    if bias is not None and tuple(bias.shape) != (O,):
        raise ValueError(f"conv2d: bias must have shape ({O},), got {tuple(bias.shape)}")
    (sh, sw), (dh, dw) = _pair(stride, "stride"), _pair(dilation, "dilation")
    if min(sh, sw, dh, dw) < 1:
        raise ValueError(f"conv2d: stride and dilation must be >= 1, got stride={stride!r}, "
                         f"dilation={dilation!r}")
    t, b, l, r = conv2d_padding(padding, (kH, kW), (dh, dw), (sh, sw))
    Ho, Wo = conv2d_out_size((H, W), (kH, kW), (sh, sw), (t, b, l, r), (dh, dw))
    if Ho < 1 or Wo < 1:
        raise ValueError(f"conv2d: the kernel ({kH}x{kW}, dilation {dh}x{dw}) is larger than the padded "
                         f"input ({H + t + b}x{W + l + r})")
    # The zero-padded input.
    X = input.new_zeros((N, C, H + t + b, W + l + r))
    X[:, :, t:t + H, l:l + W] = input
    X = X.reshape(N, groups, Cg, H + t + b, W + l + r)
    Wt = weight.reshape(groups, O // groups, Cg, kH, kW)
    Y = input.new_zeros((N, groups, O // groups, Ho, Wo))
    for i in range(kH):
        for j in range(kW):
            patch = X[:, :, :, i * dh: i * dh + sh * (Ho - 1) + 1: sh,
                      j * dw: j * dw + sw * (Wo - 1) + 1: sw]          # (N, g, Cg, Ho, Wo)
            Y = Y + torch.einsum("ngchw,goc->ngohw", patch, Wt[:, :, :, i, j])
    Y = Y.reshape(N, O, Ho, Wo)
    if bias is not None:
        Y = Y + bias.reshape(1, O, 1, 1)
    return Y[0] if unbatched else Y
