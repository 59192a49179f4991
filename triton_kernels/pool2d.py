"""2-D pooling Triton kernels (max_pool2d, avg_pool2d; forward and backward), registered as
``torch.ops.pyfastdl_triton.*`` with the schemas of csrc/ops.cpp ("2-D pooling").

One program per block of outputs (forward) or of inputs (backward), NCHW-contiguous (the launchers
bring channels_last input into NCHW and return results in input's memory format, torch's rule).
Forward: each output walks its window in torch's order (kh outer, kw inner): the first maximum wins
ties, a NaN wins (the last NaN of the window), sums start at 0 and add in that order (float32 for
float16/bfloat16/float32, float64 for float64). Backward as a gather, no atomics (deterministic): each
input element visits the outputs whose windows hold it, in output order (oh, ow ascending: kh and kw
walked downwards), and adds grad_out (max: where the saved index is this element; avg:
grad_out / divisor, torch's grad_delta).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..autograd.pool2d import pool2d_out_shape
from ._common import device_guard as _device_guard

_BLOCK = 256
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@triton.jit
def _axis(o, s, pad, K: tl.constexpr, n):
    """torch's avg-pool window along one axis: [i0, i1) inside the input, and the count clipped to
    the padded input."""
    a = o * s - pad
    b = tl.minimum(a + K, n + pad)
    return tl.maximum(a, 0), tl.minimum(b, n), b - a


@triton.jit
def _max_pool2d_fwd_kernel(x_ptr, y_ptr, idx_ptr, total, H, W, Ho, Wo, sH, sW, pH, pW, dH, dW,
                           KH: tl.constexpr, KW: tl.constexpr, NEED_IDX: tl.constexpr, BLOCK: tl.constexpr):
    # x: (N*C, H, W) contiguous; y, idx: (N*C, Ho, Wo) contiguous
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    ow = offs % Wo
    oh = (offs // Wo) % Ho
    plane = offs // (Wo * Ho)
    base = plane * H * W
    m = tl.full((BLOCK,), float("-inf"), tl.float32).to(x_ptr.dtype.element_ty)
    mi = tl.full((BLOCK,), -1, tl.int64)
    for kh in tl.static_range(KH):
        ih = oh * sH - pH + kh * dH
        for kw in tl.static_range(KW):
            iw = ow * sW - pW + kw * dW
            ok = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            j = ih * W + iw
            v = tl.load(x_ptr + base + tl.where(ok, j, 0), mask=ok, other=float("-inf"))
            take = ok & ((mi < 0) | (v > m) | (v != v))
            m = tl.where(take, v, m)
            mi = tl.where(take, j, mi)
    tl.store(y_ptr + offs, m, mask=mask)
    if NEED_IDX:
        tl.store(idx_ptr + offs, tl.maximum(mi, 0), mask=mask)


@triton.jit
def _max_pool2d_bwd_kernel(g_ptr, idx_ptr, gi_ptr, total, H, W, Ho, Wo, sH, sW, pH, pW, dH, dW,
                           KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # g, idx: (N*C, Ho, Wo); gi: (N*C, H, W), all contiguous
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    iw = offs % W
    ih = (offs // W) % H
    plane = offs // (W * H)
    here = ih * W + iw
    acc = tl.zeros((BLOCK,), ACC)
    for r in tl.static_range(KH):
        kh = KH - 1 - r  # oh ascending
        nh = ih + pH - kh * dH
        oh = tl.where(nh >= 0, nh, 0) // sH
        okh = (nh >= 0) & (nh % sH == 0) & (oh < Ho)
        for c in tl.static_range(KW):
            kw = KW - 1 - c  # ow ascending
            nw = iw + pW - kw * dW
            ow = tl.where(nw >= 0, nw, 0) // sW
            ok = mask & okh & (nw >= 0) & (nw % sW == 0) & (ow < Wo)
            j = plane * Ho * Wo + tl.where(ok, oh * Wo + ow, 0)
            sel = ok & (tl.load(idx_ptr + j, mask=ok, other=-1) == here)
            acc += tl.where(sel, tl.load(g_ptr + j, mask=sel, other=0.0).to(ACC), 0.0)
    tl.store(gi_ptr + offs, acc, mask=mask)


@triton.jit
def _avg_pool2d_fwd_kernel(x_ptr, y_ptr, total, H, W, Ho, Wo, sH, sW, pH, pW, divisor_override,
                           KH: tl.constexpr, KW: tl.constexpr, COUNT_PAD: tl.constexpr, ACC: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    ow = offs % Wo
    oh = (offs // Wo) % Ho
    plane = offs // (Wo * Ho)
    base = plane * H * W
    acc = tl.zeros((BLOCK,), ACC)
    for kh in tl.static_range(KH):
        ih = oh * sH - pH + kh
        for kw in tl.static_range(KW):
            iw = ow * sW - pW + kw
            ok = mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            acc += tl.load(x_ptr + base + tl.where(ok, ih * W + iw, 0), mask=ok, other=0.0).to(ACC)
    h0, h1, hp = _axis(oh, sH, pH, KH, H)
    w0, w1, wp = _axis(ow, sW, pW, KW, W)
    inside = (h1 - h0) * (w1 - w0)
    div = tl.where(divisor_override != 0, divisor_override, hp * wp if COUNT_PAD else inside)
    out = tl.where((h1 > h0) & (w1 > w0), acc / tl.where(div == 0, 1, div).to(ACC), 0.0)
    tl.store(y_ptr + offs, out, mask=mask)


@triton.jit
def _avg_pool2d_bwd_kernel(g_ptr, gi_ptr, total, H, W, Ho, Wo, sH, sW, pH, pW, divisor_override,
                           KH: tl.constexpr, KW: tl.constexpr, COUNT_PAD: tl.constexpr, ACC: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    iw = offs % W
    ih = (offs // W) % H
    plane = offs // (W * H)
    acc = tl.zeros((BLOCK,), ACC)
    for r in tl.static_range(KH):
        kh = KH - 1 - r
        nh = ih + pH - kh
        oh = tl.where(nh >= 0, nh, 0) // sH
        okh = (nh >= 0) & (nh % sH == 0) & (oh < Ho)
        h0, h1, hp = _axis(oh, sH, pH, KH, H)
        for c in tl.static_range(KW):
            kw = KW - 1 - c
            nw = iw + pW - kw
            ow = tl.where(nw >= 0, nw, 0) // sW
            ok = mask & okh & (nw >= 0) & (nw % sW == 0) & (ow < Wo)
            w0, w1, wp = _axis(ow, sW, pW, KW, W)
            inside = (h1 - h0) * (w1 - w0)
            div = tl.where(divisor_override != 0, divisor_override, hp * wp if COUNT_PAD else inside)
            g = tl.load(g_ptr + plane * Ho * Wo + tl.where(ok, oh * Wo + ow, 0), mask=ok, other=0.0)
            acc += tl.where(ok, (g / tl.where(div == 0, 1, div).to(g.dtype)).to(ACC), 0.0)
    tl.store(gi_ptr + offs, acc, mask=mask)


# ---- launchers ------------------------------------------------------------------------------------------

def _out_size(n, k, pad, stride, dilation, ceil_mode):
    from ..reference.pooling import pool_out_size
    return pool_out_size(n, k, pad, stride, dilation, ceil_mode)


def _check(op: str, input: Tensor, kernel_size, stride, padding, dilation, ceil_mode) -> Tuple[int, int]:
    """csrc/common/pool2d.h's checks, with its messages."""
    if input.dim() != 4:
        raise RuntimeError(f"{op}: expected input of rank 4, (N, C, H, W), got input of shape {list(input.shape)}")
    if min(input.shape[1:]) <= 0:
        raise RuntimeError(f"{op}: expected input (N, C, H, W) with C, H, W > 0 (N may be 0), got input of shape "
                           f"{list(input.shape)}")
    for name, v in (("kernel_size", kernel_size), ("stride", stride), ("padding", padding), ("dilation", dilation)):
        if len(v) != 2:
            raise RuntimeError(f"{op}: expected {name} of 2 values, got {list(v)}")
    if min(kernel_size) < 1:
        raise RuntimeError(f"{op}: expected kernel_size >= 1, got kernel_size = {list(kernel_size)}")
    if min(stride) < 1:
        raise RuntimeError(f"{op}: expected stride >= 1, got stride = {list(stride)}")
    if min(dilation) < 1:
        raise RuntimeError(f"{op}: expected dilation >= 1, got dilation = {list(dilation)}")
    if min(padding) < 0:
        raise RuntimeError(f"{op}: expected padding >= 0, got padding = {list(padding)}")
    for k, p, d in zip(kernel_size, padding, dilation):
        if p > k // 2 or p > ((k - 1) * d + 1) // 2:
            raise RuntimeError(f"{op}: expected padding <= kernel_size / 2 (and <= half the dilated kernel), got "
                               f"padding = {list(padding)}, kernel_size = {list(kernel_size)}, dilation = {list(dilation)}")
    if input.dtype not in _DTYPES:
        raise RuntimeError(f"{op}: input dtype {input.dtype} is not supported by this kernel")
    if input.device.type == "cpu" and not _interpreting():
        raise RuntimeError(f"{op}: the Triton kernels run CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 "
                           f"(set before triton is first imported); got a tensor on {input.device}")
    _, _, H, W = input.shape
    Ho = _out_size(H, kernel_size[0], padding[0], stride[0], dilation[0], ceil_mode)
    Wo = _out_size(W, kernel_size[1], padding[1], stride[1], dilation[1], ceil_mode)
    if Ho < 1 or Wo < 1:
        raise RuntimeError(f"{op}: the output would be empty: input of shape {list(input.shape)} gives an output of "
                           f"{Ho} x {Wo} (output size is too small)")
    return Ho, Wo


def _interpreting() -> bool:
    from ._common import INTERPRETED
    return INTERPRETED


def _check_grad(op: str, grad_out: Tensor, input: Tensor, Ho: int, Wo: int, indices: Optional[Tensor] = None):
    want = (input.shape[0], input.shape[1], Ho, Wo)
    if tuple(grad_out.shape) != want:
        raise RuntimeError(f"{op}: expected grad_out of shape {want} (the forward output's), got grad_out of shape "
                           f"{tuple(grad_out.shape)}")
    if grad_out.dtype != input.dtype:
        raise RuntimeError(f"{op}: expected grad_out of dtype {input.dtype} like input, got {grad_out.dtype}")
    if indices is not None and (tuple(indices.shape) != want or indices.dtype != torch.int64):
        raise RuntimeError(f"{op}: expected indices of shape {want} and dtype int64, got {tuple(indices.shape)} "
                           f"{indices.dtype}")


def _fmt(input: Tensor):
    from ..autograd.pool2d import _memory_format
    return _memory_format(input)


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _grid(n):
    return (triton.cdiv(n, _BLOCK),)


@torch.library.custom_op("pyfastdl_triton::max_pool2d_fwd", mutates_args=(), schema=(
    "(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode, "
    "bool need_indices) -> (Tensor, Tensor)"))
def max_pool2d_fwd(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                   dilation: List[int], ceil_mode: bool, need_indices: bool) -> Tuple[Tensor, Optional[Tensor]]:
    Ho, Wo = _check("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode)
    N, C, H, W = input.shape
    x = input.contiguous()
    y = torch.empty((N, C, Ho, Wo), dtype=input.dtype, device=input.device)
    idx = torch.empty((N, C, Ho, Wo), dtype=torch.int64, device=input.device) if need_indices else None
    if y.numel() > 0:
        with _device_guard(input):
            _max_pool2d_fwd_kernel[_grid(y.numel())](
                x, y, idx if idx is not None else y, y.numel(), H, W, Ho, Wo, stride[0], stride[1],
                padding[0], padding[1], dilation[0], dilation[1], KH=kernel_size[0], KW=kernel_size[1],
                NEED_IDX=need_indices, BLOCK=_BLOCK)
    fmt = _fmt(input)
    return y.contiguous(memory_format=fmt), (idx.contiguous(memory_format=fmt) if idx is not None else None)


@max_pool2d_fwd.register_fake
def _max_pool2d_fwd_fake(input, kernel_size, stride, padding, dilation, ceil_mode, need_indices):
    from ..autograd.pool2d import _max_pool2d_fwd_fake as fake
    return fake(input, kernel_size, stride, padding, dilation, ceil_mode, need_indices)


@torch.library.custom_op("pyfastdl_triton::max_pool2d_bwd", mutates_args=(), schema=(
    "(Tensor grad_out, Tensor input, Tensor indices, int[2] kernel_size, int[2] stride, int[2] padding, "
    "int[2] dilation, bool ceil_mode) -> Tensor"))
def max_pool2d_bwd(grad_out: Tensor, input: Tensor, indices: Tensor, kernel_size: List[int], stride: List[int],
                   padding: List[int], dilation: List[int], ceil_mode: bool) -> Tensor:
    op = "max_pool2d_bwd"
    Ho, Wo = _check(op, input, kernel_size, stride, padding, dilation, ceil_mode)
    _check_grad(op, grad_out, input, Ho, Wo, indices)
    N, C, H, W = input.shape
    gi = torch.empty((N, C, H, W), dtype=input.dtype, device=input.device)
    if gi.numel() > 0:
        with _device_guard(input):
            _max_pool2d_bwd_kernel[_grid(gi.numel())](
                grad_out.contiguous(), indices.contiguous(), gi, gi.numel(), H, W, Ho, Wo, stride[0], stride[1],
                padding[0], padding[1], dilation[0], dilation[1], KH=kernel_size[0], KW=kernel_size[1],
                ACC=_acc(input.dtype), BLOCK=_BLOCK)
    return gi.contiguous(memory_format=_fmt(input))


@max_pool2d_bwd.register_fake
def _max_pool2d_bwd_fake(grad_out, input, indices, kernel_size, stride, padding, dilation, ceil_mode):
    return torch.empty_like(input, memory_format=_fmt(input))


@torch.library.custom_op("pyfastdl_triton::avg_pool2d_fwd", mutates_args=(), schema=(
    "(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, bool count_include_pad, "
    "int? divisor_override) -> Tensor"))
def avg_pool2d_fwd(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], ceil_mode: bool,
                   count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    Ho, Wo = _check("avg_pool2d", input, kernel_size, stride, padding, [1, 1], ceil_mode)
    if divisor_override == 0:
        raise RuntimeError("avg_pool2d: expected divisor_override != 0 (or None), got 0")
    N, C, H, W = input.shape
    y = torch.empty((N, C, Ho, Wo), dtype=input.dtype, device=input.device)
    if y.numel() > 0:
        with _device_guard(input):
            _avg_pool2d_fwd_kernel[_grid(y.numel())](
                input.contiguous(), y, y.numel(), H, W, Ho, Wo, stride[0], stride[1], padding[0], padding[1],
                int(divisor_override or 0), KH=kernel_size[0], KW=kernel_size[1], COUNT_PAD=bool(count_include_pad),
                ACC=_acc(input.dtype), BLOCK=_BLOCK)
    return y.contiguous(memory_format=_fmt(input))


@avg_pool2d_fwd.register_fake
def _avg_pool2d_fwd_fake(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    from ..autograd.pool2d import _avg_pool2d_fwd_fake as fake
    return fake(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@torch.library.custom_op("pyfastdl_triton::avg_pool2d_bwd", mutates_args=(), schema=(
    "(Tensor grad_out, Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
    "bool count_include_pad, int? divisor_override) -> Tensor"))
def avg_pool2d_bwd(grad_out: Tensor, input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                   ceil_mode: bool, count_include_pad: bool, divisor_override: Optional[int]) -> Tensor:
    op = "avg_pool2d_bwd"
    Ho, Wo = _check(op, input, kernel_size, stride, padding, [1, 1], ceil_mode)
    _check_grad(op, grad_out, input, Ho, Wo)
    if divisor_override == 0:
        raise RuntimeError(f"{op}: expected divisor_override != 0 (or None), got 0")
    N, C, H, W = input.shape
    gi = torch.empty((N, C, H, W), dtype=input.dtype, device=input.device)
    if gi.numel() > 0:
        with _device_guard(input):
            _avg_pool2d_bwd_kernel[_grid(gi.numel())](
                grad_out.contiguous(), gi, gi.numel(), H, W, Ho, Wo, stride[0], stride[1], padding[0], padding[1],
                int(divisor_override or 0), KH=kernel_size[0], KW=kernel_size[1], COUNT_PAD=bool(count_include_pad),
                ACC=_acc(input.dtype), BLOCK=_BLOCK)
    return gi.contiguous(memory_format=_fmt(input))


@avg_pool2d_bwd.register_fake
def _avg_pool2d_bwd_fake(grad_out, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override):
    return torch.empty_like(input, memory_format=_fmt(input))


__all__ = ["max_pool2d_fwd", "max_pool2d_bwd", "avg_pool2d_fwd", "avg_pool2d_bwd"]
