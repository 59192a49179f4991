"""The two ops pyfastdl.nn.SyncBatchNorm adds to batch norm, in Triton (schemas of csrc/ops.cpp, in
the namespace ``pyfastdl_triton``)::

    pyfastdl_triton::sync_batch_norm_stats(input) -> (mean (C,), m2 (C,))        float64
    pyfastdl_triton::sync_batch_norm_bwd_elemt(grad_out, input, weight?, mean, invstd, sum_dy,
                                               sum_dy_xhat, count) -> grad_input

Per channel c over its n elements (statistics, two passes in float64: exact to float64 rounding)::

    mean = sum x / n,   m2 = sum (x - mean)^2
    grad_input = weight * invstd * (dy - sum_dy / count - (x - mean) * invstd * sum_dy_xhat / count)

Both layouts of batch norm (``triton_kernels/batch_norm.py``) are one strided view
``x[n, c, s] = ptr[n * stride_n + c * stride_c + s]``: (N, C, S) contiguous (stride_c = S) or
channels-last (M, C) (S = 1, stride_c = 1). The statistics run one program per channel over the
flattened (n, s) plane in tiles of BLOCK elements (simple; the normalization is batch norm's kernel);
the backward's elementwise pass one program per BLOCK elements of the flat tensor, channel
``(i // stride_c) % C``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..autograd.batch_norm import _like_kernel_layout
from ..autograd.sync_batch_norm import sync_batch_norm_stats_shapes
from ._common import INTERPRETED as _INTERPRETED, device_guard as _device_guard  # noqa: F401

_BLOCK = 1024  # elements per tile (tests may shrink it to exercise the loops under the interpreter)
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@triton.jit
def _sync_batch_norm_stats_kernel(
    x_ptr,  # (N, C, S) strided view, see the module docstring
    mean_ptr, m2_ptr,  # (C,) float64, out
    N, S, stride_n, stride_c,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    total = N * S
    acc = tl.zeros([BLOCK], tl.float64)
    for i0 in range(0, total, BLOCK):
        i = i0 + tl.arange(0, BLOCK).to(tl.int64)
        n, s = i // S, i % S
        acc += tl.load(x_ptr + n * stride_n + c * stride_c + s, mask=i < total, other=0.0).to(tl.float64)
    mean = tl.sum(acc, 0) / total
    acc = tl.zeros([BLOCK], tl.float64)
    for i0 in range(0, total, BLOCK):
        i = i0 + tl.arange(0, BLOCK).to(tl.int64)
        n, s = i // S, i % S
        m = i < total
        d = tl.load(x_ptr + n * stride_n + c * stride_c + s, mask=m, other=0.0).to(tl.float64) - mean
        acc += tl.where(m, d * d, 0.0)
    tl.store(mean_ptr + c, mean)
    tl.store(m2_ptr + c, tl.sum(acc, 0))


@triton.jit
def _sync_batch_norm_bwd_elemt_kernel(
    g_ptr, x_ptr,  # like the input view, flat
    w_ptr,  # (C,) or unused (HAS_WEIGHT false)
    mean_ptr, invstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr,  # (C,) ACC
    out_ptr,  # like x, flat
    numel, C, stride_c, count,  # count: int, elements per channel over the group
    HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < numel
    c = (i // stride_c) % C
    invstd = tl.load(invstd_ptr + c, mask=m, other=0.0).to(ACC)
    a = invstd
    if HAS_WEIGHT:
        a = tl.load(w_ptr + c, mask=m, other=0.0).to(ACC) * invstd
    x = tl.load(x_ptr + i, mask=m, other=0.0).to(ACC)
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(ACC)
    xhat = (x - tl.load(mean_ptr + c, mask=m, other=0.0).to(ACC)) * invstd
    sdy = tl.load(sum_dy_ptr + c, mask=m, other=0.0).to(ACC)
    sdx = tl.load(sum_dy_xhat_ptr + c, mask=m, other=0.0).to(ACC)
    cnt = count.to(ACC)
    gi = a * (g - sdy / cnt - xhat * sdx / cnt)
    tl.store(out_ptr + i, gi.to(out_ptr.dtype.element_ty), mask=m)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(input: Tensor):
    """(x in a kernel layout, N, S, stride_n, stride_c, the memory format for grad_out); mirrors
    bn::to_kernel_layout (csrc/common/batch_norm.h)."""
    N, C = input.shape[0], input.shape[1]
    S = 1
    for d in input.shape[2:]:
        S *= d
    if S == 1 and input.is_contiguous():
        return input, N, 1, C, 1, torch.contiguous_format
    if input.is_contiguous():
        return input, N, S, C * S, S, torch.contiguous_format
    for fmt, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if input.dim() == rank and input.is_contiguous(memory_format=fmt):
            return input, N * S, 1, C, 1, fmt
    x = input.contiguous()
    return x, N, S, C * S, S, torch.contiguous_format


def _check_input(op: str, input: Tensor):
    if input.dim() < 2:
        raise RuntimeError(f"{op}: expected input of rank >= 2, (N, C, *), got input of rank {input.dim()} and "
                           f"shape {list(input.shape)}")
    if input.dtype not in _DTYPES:
        raise RuntimeError(f"{op}: input dtype {input.dtype} is not supported by this kernel on {input.device.type}")


@torch.library.custom_op("pyfastdl_triton::sync_batch_norm_stats", mutates_args=())
def sync_batch_norm_stats(input: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, m2) per channel in float64; see the module docstring."""
    _check_input("sync_batch_norm_stats", input)
    with _device_guard(input):
        C = input.shape[1]
        mean = torch.zeros(C, dtype=torch.float64, device=input.device)
        m2 = torch.zeros(C, dtype=torch.float64, device=input.device)
        if input.numel() == 0:
            return mean, m2
        x, N, S, stride_n, stride_c, _ = _layout(input)
        _sync_batch_norm_stats_kernel[(C,)](x, mean, m2, N, S, stride_n, stride_c, BLOCK=_BLOCK)
        return mean, m2


@sync_batch_norm_stats.register_fake
def _(input):
    return sync_batch_norm_stats_shapes(input)


@torch.library.custom_op("pyfastdl_triton::sync_batch_norm_bwd_elemt", mutates_args=())
def sync_batch_norm_bwd_elemt(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor,
                              invstd: Tensor, sum_dy: Tensor, sum_dy_xhat: Tensor, count: int) -> Tensor:
    """grad_input from the group's sums; see the module docstring and csrc/ops.cpp."""
    op = "sync_batch_norm_bwd_elemt"
    _check_input(op, input)
    if grad_out.shape != input.shape:
        raise RuntimeError(f"{op}: expected grad_out of shape {list(input.shape)}, got {list(grad_out.shape)}")
    if grad_out.dtype != input.dtype:
        raise RuntimeError(f"{op}: expected grad_out of dtype {input.dtype}, got {grad_out.dtype}")
    C = input.shape[1]
    acc = _acc(input.dtype)
    if weight is not None and (weight.shape != (C,) or weight.dtype not in (input.dtype, acc)):
        raise RuntimeError(f"{op}: expected weight of shape ({C},) to match input channels, of dtype "
                           f"{input.dtype} (or {acc}), got {list(weight.shape)} {weight.dtype}")
    for name, t in (("mean", mean), ("invstd", invstd), ("sum_dy", sum_dy), ("sum_dy_xhat", sum_dy_xhat)):
        if t.shape != (C,):
            raise RuntimeError(f"{op}: expected {name} of shape ({C},), got {list(t.shape)}")
        if t.dtype != acc:
            raise RuntimeError(f"{op}: expected {name} of dtype {acc}, got {t.dtype}")
    for name, t in (("grad_out", grad_out), ("weight", weight), ("mean", mean), ("invstd", invstd),
                    ("sum_dy", sum_dy), ("sum_dy_xhat", sum_dy_xhat)):
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{op}: expected {name} on {input.device}, got {t.device}")
    n_local = input.numel() // C if C else 0
    if count < max(1, n_local):
        raise ValueError(f"{op}: expected count (elements per channel over all ranks) >= {max(1, n_local)} (this "
                         f"rank's), got {count}")
    with _device_guard(input):
        x, N, S, stride_n, stride_c, fmt = _layout(input)
        g = grad_out.contiguous(memory_format=fmt)
        out = torch.empty_like(x)
        if x.numel() == 0:
            return out
        w = weight.contiguous() if weight is not None else mean
        _sync_batch_norm_bwd_elemt_kernel[(triton.cdiv(x.numel(), _BLOCK),)](
            g, x, w, mean.contiguous(), invstd.contiguous(), sum_dy.contiguous(), sum_dy_xhat.contiguous(), out,
            x.numel(), C, stride_c, count, HAS_WEIGHT=weight is not None,
            ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=_BLOCK)
        return out


@sync_batch_norm_bwd_elemt.register_fake
def _(grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xhat, count):
    return _like_kernel_layout(input)
