"""Batch normalization with an optional fused activation (ReLU or sigmoid), forward and backward, in Triton.

Registers two ops with the schemas of ``csrc/ops.cpp`` in the namespace ``pyfastdl_triton``::

    pyfastdl_triton::batch_norm_fwd(input, weight?, bias?, running_mean(a!)?, running_var(b!)?,
                                    training, momentum, eps, activation) -> (output, save_mean, save_invstd)
    pyfastdl_triton::batch_norm_bwd(grad_out, input, weight?, bias?, save_mean, save_invstd,
                                    training, activation) -> (grad_input, grad_weight, grad_bias)

The math (Ioffe & Szegedy 2015, "Batch Normalization"; PyTorch's conventions for the running
statistics), per channel c, over the n = numel / C elements of that channel::

    mean, var  = batch statistics (var biased)          training
               = running_mean, running_var              eval
    invstd     = 1 / sqrt(var + eps)
    scale      = weight * invstd                                    (weight = 1, bias = 0 if None)
    y          = act(((x - mean) - mean_lo) * scale + bias)   act: none, max(y, 0) or sigmoid
                 (mean + mean_lo: the batch mean to twice ACC's precision, see _affine)
    running_*  = (1 - momentum) * running_* + momentum * (mean, var * n / (n - 1))   (training)

    backward:  g' = g * act'(y) (y recomputed with the same formula): the ReLU mask, or s (1 - s)
               xhat = (x - mean) * invstd
               grad_bias = sum g',  grad_weight = sum g' * xhat
               grad_input = scale * (g' - grad_bias / n - xhat * grad_weight / n)   training
                          = scale * g'                                              eval

Everything is computed in the accumulation dtype ACC: float32, or float64 for float64 input.

Memory layouts (read without a copy; anything else is made contiguous first). Both are one
strided view, ``x[n, c, s] = ptr[n * stride_n + c * stride_c + s]``:

    "NCS"           (N, C, S) contiguous, S = prod(spatial):  stride_n = C * S, stride_c = S
    channels-last   (M, C), C innermost, M = N * S:           seen as N = M, S = 1, stride_c = 1
                    ((N, C) input, 4-D channels_last, 5-D channels_last_3d)

Every kernel works on 3-D tiles ``[BLOCK_N, BLOCK_C, BLOCK_S]`` of that view (see ``_tile_shape``):
long spatial rows give tiles along s (one channel, BLOCK_C = 1, a few rows when S is not a
multiple of a large power of two); channels-last gives tiles along c (BLOCK_S = 1); short spatial
rows (S = 7 * 7, say) a few channels of whole rows. The innermost
tile dimensions always run along contiguous memory, so loads coalesce in both layouts.

Kernels (launch order):

    forward, training   _batch_norm_stats_kernel     partial Welford statistics, (3, P, C)
                        _batch_norm_finalize_kernel  merge the P partials -> mean, invstd; update
                                                     the running statistics
                        _batch_norm_fwd_kernel       y = ((x - mean) - mean_lo) * scale + bias (+ ReLU)
    forward, eval       _batch_norm_finalize_kernel  (running stats -> mean, invstd)
                        _batch_norm_fwd_kernel
    backward            _batch_norm_bwd_reduce_kernel    partial sums of g' and g' * (x - mean)
                        _batch_norm_bwd_finalize_kernel  sum the partials -> grad_weight, grad_bias
                        _batch_norm_bwd_kernel           grad_input

Reductions are deterministic: no atomics; each program writes its own partial result and a second
small kernel combines the partials in a fixed order.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..autograd.batch_norm import batch_norm_bwd_shapes, batch_norm_fwd_shapes
from ._common import INTERPRETED as _INTERPRETED, device_guard as _device_guard, split_f32 as _split_f32

# ---------------------------------------------------------------------------------------------
# Tuning constants (elements per tile, programs per SM). Tests may shrink the tiles to exercise
# the loops and the multi-program reductions on small inputs under the interpreter.
# ---------------------------------------------------------------------------------------------
_REDUCE_TILE = 2048  # elements a statistics / gradient-reduction program loads per iteration
_APPLY_TILE = 1024  # elements an elementwise (y, grad_input) program handles
_MIN_RUN = 128  # contiguous elements wanted along the innermost tile dimensions (coalescing)
_MAX_BLOCK_C = 128  # channels per tile in channels-last
_FINALIZE_BLOCK_C = 64  # channels per finalize program
_FINALIZE_BLOCK_P = 32  # partials a finalize program combines per iteration
_PROGRAMS_PER_SM = 8  # reduction programs wanted per SM: enough bytes in flight to hide latency
_DEFAULT_SMS = 132  # used when the tensors are not on a GPU (interpreter): an H100's count
_MAX_LANE_ELEMS = 512  # elements one lane of a reduction program accumulates, at most
_REDUCE_WARPS = 8
_APPLY_WARPS = 4
_INT32_MAX = 2**31 - 1  # offsets beyond this are computed in int64 (tests may lower it)


# =============================================================================================
# Device helpers shared by the kernels
# =============================================================================================
@triton.jit
def _tile_offsets(rn, rc, rs, stride_n, stride_c, INDEX_64: tl.constexpr):
    """Offsets of the tile rows rn (n), channels rc, columns rs (s): a [len(rn), len(rc), len(rs)]
    block. INDEX_64 widens to int64 first, for inputs whose offsets pass int32 (see _index_64)."""
    if INDEX_64:
        rn = rn.to(tl.int64)
        rc = rc.to(tl.int64)
    return rn[:, None, None] * stride_n + rc[None, :, None] * stride_c + rs[None, None, :]


@triton.jit
def _inv_sqrt(v, IS_FP64: tl.constexpr):
    """1 / sqrt(v), correctly rounded in float32 (div_rn, sqrt_rn; float64 ops are IEEE anyway)."""
    if IS_FP64:
        return 1.0 / tl.sqrt(v)
    else:
        return tl.div_rn(tl.full(v.shape, 1.0, tl.float32), tl.sqrt_rn(v))


@triton.jit
def _scale_bias(invstd, w_ptr, b_ptr, rc, c_mask,
                HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Per-channel coefficients of y = ((x - mean) - mean_lo) * scale + bias, scale = weight *
    invstd. The forward and the backward (its ReLU mask) both compute y through this helper and
    `_affine`, so they agree (the backward has no mean_lo: 0)."""
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + rc, mask=c_mask, other=1.0).to(ACC) * invstd
    else:
        scale = invstd
    if HAS_BIAS:
        bias = tl.load(b_ptr + rc, mask=c_mask, other=0.0).to(ACC)
    else:
        bias = tl.zeros_like(invstd)
    return scale, bias


@triton.jit
def _affine(x, mean, mean_lo, scale, bias):
    """y = ((x - mean) - mean_lo) * scale + bias on a [BN, BC, BS] tile, per-channel (BC,) vectors.
    mean + mean_lo is the batch mean to twice the precision of ACC: x - mean is exact for x near the
    mean, so a channel with |mean| >> std keeps its precision (x * scale + shift would not: shift =
    bias - mean * scale is then large and rounded)."""
    xc = (x - mean[None, :, None]) - mean_lo[None, :, None]
    return xc * scale[None, :, None] + bias[None, :, None]


@triton.jit
def _activate(y, ACT: tl.constexpr):
    """act(y) (csrc/common/batch_norm.h's Activation): 0 none, 1 max(y, 0), 2 sigmoid. NaN stays NaN."""
    if ACT == 1:
        y = tl.where(y < 0.0, 0.0, y)
    elif ACT == 2:
        y = 1.0 / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _act_grad(g, y, ACT: tl.constexpr):
    """g * act'(y): g zeroed where y <= 0 (ReLU), or g * s (1 - s), s = sigmoid(y)."""
    if ACT == 1:
        g = tl.where(y <= 0.0, 0.0, g)
    elif ACT == 2:
        s = 1.0 / (1.0 + tl.exp(-y))
        g = g * (s - s * s)
    return g


@triton.jit
def _welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan et al.'s parallel merge of two (mean, sum of squared deviations, count) summaries."""
    n = n_a + n_b
    w_b = n_b / tl.where(n == 0, 1.0, n)
    delta = mean_b - mean_a
    # A non-finite mean_a (an inf in the data) stays what a sum would give: inf + finite = inf,
    # inf - inf = NaN (mean_a + delta * w_b would be inf - inf = NaN for any finite mean_b).
    mean = tl.where(mean_a - mean_a == 0.0, mean_a + delta * w_b, mean_a + mean_b)
    return mean, m2_a + m2_b + delta * delta * n_a * w_b, n


# =============================================================================================
# Forward, pass 1: per-program Welford statistics
# =============================================================================================
# The reduction for one channel runs over its N * S elements. To use the whole GPU even when C is
# small, the (n, s) plane of a channel block is cut into P = P_N * P_S rectangles: program
# (c_block, p) reduces rows [p_n * rows_per_prog, ...) x columns [p_s * cols_per_prog, ...) and
# writes (mean, M2, count) of its rectangle to a partial buffer part[3, P, C].
#
# Numerical stability, twice over:
#  * every element is first shifted by its channel's first element x[0, c, 0], so that the sums
#    carry numbers of the size of the spread, not of the mean (a channel with mean 1e4 and std
#    1e-2 keeps its digits in float32: x - shift is exact there, by Sterbenz's lemma);
#  * each lane of the tile keeps a running Welford (mean, M2) over the elements it sees, and the
#    lanes are merged with Chan's formula at the end: no E[x^2] - E[x]^2 cancellation, and no
#    cross-lane reduction (no shared-memory round trip) inside the loop.
@triton.jit
def _batch_norm_stats_kernel(
    x_ptr,  # input, strided view (N, C, S): x[n, c, s] = x_ptr[n * stride_n + c * stride_c + s]
    part_ptr,  # (3, P, C) float64, out: per-program mean of (x - shift), M2, count
    N, C, S, stride_n, stride_c,  # view sizes and strides (elements)
    rows_per_prog, cols_per_prog,  # rectangle of the (n, s) plane a program reduces
    num_c_blocks, num_p_s, P,  # programs: c-blocks x (P_N x P_S) rectangles
    ACC: tl.constexpr,  # tl.float32 or tl.float64
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    # Which channels and which rectangle of the (n, s) plane this program owns. Consecutive
    # program ids take consecutive channel blocks of one rectangle: neighbours in memory.
    pid = tl.program_id(0)
    pid_c = pid % num_c_blocks
    pid_p = pid // num_c_blocks
    pid_pn = pid_p // num_p_s
    pid_ps = pid_p % num_p_s
    if INDEX_64:
        pid_pn = pid_pn.to(tl.int64)
    n_begin = pid_pn * rows_per_prog
    n_end = tl.minimum(n_begin + rows_per_prog, N)
    s_begin = pid_ps * cols_per_prog
    s_end = tl.minimum(s_begin + cols_per_prog, S)

    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = rc < C
    # The shift: each channel's first element x[0, c, 0].
    shift = tl.load(x_ptr + _tile_offsets(tl.zeros([1], tl.int32), rc, tl.zeros([1], tl.int32),
                                          stride_n, stride_c, INDEX_64),
                    mask=c_mask[None, :, None], other=0.0).to(ACC)
    shift = tl.where(shift - shift == 0.0, shift, 0.0)  # 0 for a non-finite first element (see finalize)

    # One Welford summary (mean, M2) per lane of the tile. A lane's count is not carried: it is
    # known from the loop indices. Only the last row block (rows >= n_end) and the last column
    # block (columns >= s_end) of the rectangle have empty lanes, so when the lane at column
    # offset k holds an element in row iteration a, column iteration b, it is that lane's
    # (a * cols_k + b + 1)-th element, where cols_k, the number of column blocks reaching k, is
    # q + 1 for k < r and q otherwise (q, r = divmod(s_end - s_begin, BLOCK_S)). So each
    # iteration needs two scalar reciprocals, not a division per element. (A carried count
    # tensor would also cost a layout conversion through shared memory per iteration in the
    # compiled kernel, because it never meets the loaded data.)
    lane_n = tl.arange(0, BLOCK_N)
    lane_s = tl.arange(0, BLOCK_S)
    q = (s_end - s_begin) // BLOCK_S
    long_lane = lane_s < (s_end - s_begin) - q * BLOCK_S  # k < r: q + 1 column blocks
    mean = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC)
    m2 = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC)
    for n0 in range(n_begin, n_end, BLOCK_N):
        rn = n0 + lane_n
        a = (n0 - n_begin) // BLOCK_N
        for s0 in range(s_begin, s_end, BLOCK_S):
            rs = s0 + lane_s
            b = (s0 - s_begin) // BLOCK_S
            rcp_long = 1.0 / (a * (q + 1) + b + 1).to(ACC)
            rcp_short = 1.0 / (a * q + b + 1).to(ACC)
            rcp = tl.where(long_lane, rcp_long, rcp_short)[None, None, :]  # 1 / the lane's count

            mask = (rn < n_end)[:, None, None] & c_mask[None, :, None] & (rs < s_end)[None, None, :]
            offs = _tile_offsets(rn, rc, rs, stride_n, stride_c, INDEX_64)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            # Welford's update. An empty lane takes d = its own mean: delta = 0, nothing changes.
            d = tl.where(mask, x - shift, mean)
            delta = d - mean
            # As in _welford_combine: once the mean is inf it stays inf (or NaN for inf - inf), as
            # torch's sum-based mean; the plain update would give inf - inf = NaN.
            mean_new = tl.where(mean - mean == 0.0, mean + delta * rcp, mean + tl.where(mask, d, 0.0))
            m2 = m2 + delta * (d - mean_new)
            mean = mean_new

    # Each lane's count: the row blocks that reach its row offset times its column blocks.
    rows_i = (n_end - n_begin - lane_n + BLOCK_N - 1) // BLOCK_N  # (BLOCK_N,)
    cols_k = q + long_lane.to(tl.int32)  # (BLOCK_S,)
    count = (rows_i[:, None, None] * cols_k[None, None, :]).to(tl.float64) + tl.zeros_like(mean).to(tl.float64)
    # Merge the lanes (tree over s, then over n) in float64: one summary per channel, stored in
    # float64 (a float32 tree of 2048 lanes alone cost ~1.5e-7 of the std in the mean).
    mean, m2 = mean.to(tl.float64), m2.to(tl.float64)
    mean, m2, count = tl.reduce((mean, m2, count), 2, _welford_combine)
    mean, m2, count = tl.reduce((mean, m2, count), 0, _welford_combine)
    part = part_ptr + pid_p * C + rc
    tl.store(part, mean, mask=c_mask)
    tl.store(part + P * C, m2, mask=c_mask)
    tl.store(part + 2 * P * C, count, mask=c_mask)


# =============================================================================================
# Forward, pass 2: merge the partials, update the running statistics
# =============================================================================================
# One program per block of channels loops over the P partials in a fixed order (deterministic).
# The merge is the exact two-pass form over the partials, n = N * S = sum of the counts:
#     mean_d = sum_p count_p * mean_p / n,   M2 = sum_p (M2_p + count_p * (mean_p - mean_d)^2)
# then mean = shift + mean_d, var = M2 / n (biased, normalizes), M2 / (n - 1) (unbiased, running).
# In eval the same kernel turns the running statistics into (mean, invstd).
# eps and momentum arrive as float32 pairs (hi, lo) with hi + lo = the Python float (to ~1e-15), so
# that float64 inputs get float64 constants (Triton passes Python floats as float32).
@triton.jit
def _batch_norm_finalize_kernel(
    x_ptr,  # input view (N, C, S), as in the stats kernel: only x[0, c, 0] (the shift) is read
    part_ptr,  # (3, P, C) float64: from _batch_norm_stats_kernel (unused in eval)
    mean_ptr, invstd_ptr,  # (C,) ACC, out: save_mean, save_invstd
    mean_lo_ptr,  # (C,) ACC, out: the rounding error of save_mean (0 in eval), see _affine
    running_mean_ptr, running_var_ptr,  # (C,) input dtype or ACC, in/out (training) or in (eval)
    C, stride_c, P,
    n_total,  # elements per channel, N * S
    eps_hi, eps_lo, momentum_hi, momentum_lo,  # float32 pairs, see above
    TRAINING: tl.constexpr, HAS_RUNNING: tl.constexpr,
    ACC: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = rc < C
    eps = tl.zeros([BLOCK_C], ACC) + eps_hi + eps_lo  # widened to ACC first, then summed
    if TRAINING:
        # The merge runs in float64 whatever ACC is: the partials are many (planes of 2^24 and more
        # elements) and their float32 sums would lose what the per-lane Welford kept.
        F64 = tl.float64
        n = tl.zeros([BLOCK_C], F64) + n_total  # (an int argument equal to 1 is a constexpr)
        # Pass over the partials 1: the mean of the shifted values.
        acc = tl.zeros([BLOCK_P, BLOCK_C], F64)
        for p0 in range(0, P, BLOCK_P):
            rp = p0 + tl.arange(0, BLOCK_P)
            mask = (rp < P)[:, None] & c_mask[None, :]
            offs = rp[:, None] * C + rc[None, :]
            mean_p = tl.load(part_ptr + offs, mask=mask, other=0.0).to(F64)
            count_p = tl.load(part_ptr + 2 * P * C + offs, mask=mask, other=0.0).to(F64)
            acc += count_p * mean_p
        mean_d = tl.sum(acc, 0) / n
        # Pass 2: the sum of squared deviations from that mean.
        acc = tl.zeros([BLOCK_P, BLOCK_C], F64)
        for p0 in range(0, P, BLOCK_P):
            rp = p0 + tl.arange(0, BLOCK_P)
            mask = (rp < P)[:, None] & c_mask[None, :]
            offs = rp[:, None] * C + rc[None, :]
            mean_p = tl.load(part_ptr + offs, mask=mask, other=0.0).to(F64)
            m2_p = tl.load(part_ptr + P * C + offs, mask=mask, other=0.0).to(F64)
            count_p = tl.load(part_ptr + 2 * P * C + offs, mask=mask, other=0.0).to(F64)
            dev = mean_p - mean_d[None, :]
            acc += m2_p + count_p * dev * dev
        m2 = tl.sum(acc, 0)

        # The shift of the stats kernel: the first element, 0 where that is not finite (an inf
        # shift would make the mean inf - inf = NaN; torch gives inf for a channel holding +inf).
        shift = tl.load(x_ptr + rc.to(tl.int64) * stride_c, mask=c_mask, other=0.0).to(F64)
        shift = tl.where(shift - shift == 0.0, shift, 0.0)
        mean64 = shift + mean_d
        mean = mean64.to(ACC)
        mean_lo = (mean64 - mean.to(F64)).to(ACC)  # mean + mean_lo = the float64 mean
        var = m2 / n
        invstd = (1.0 / tl.sqrt(var + (tl.zeros([BLOCK_C], F64) + eps_hi + eps_lo))).to(ACC)
        if HAS_RUNNING:
            momentum = tl.zeros([BLOCK_C], F64) + momentum_hi + momentum_lo
            rm = tl.load(running_mean_ptr + rc, mask=c_mask, other=0.0).to(F64)
            rv = tl.load(running_var_ptr + rc, mask=c_mask, other=0.0).to(F64)
            rm = (1.0 - momentum) * rm + momentum * mean64
            rv = (1.0 - momentum) * rv + momentum * (m2 / (n - 1.0))  # unbiased variance
            tl.store(running_mean_ptr + rc, rm, mask=c_mask)  # stored in the buffers' dtype
            tl.store(running_var_ptr + rc, rv, mask=c_mask)
    else:
        mean = tl.load(running_mean_ptr + rc, mask=c_mask, other=0.0).to(ACC)
        rv = tl.load(running_var_ptr + rc, mask=c_mask, other=1.0).to(ACC)
        invstd = _inv_sqrt(rv + eps, IS_FP64)
        mean_lo = tl.zeros_like(mean)
    tl.store(mean_ptr + rc, mean, mask=c_mask)
    tl.store(mean_lo_ptr + rc, mean_lo, mask=c_mask)
    tl.store(invstd_ptr + rc, invstd, mask=c_mask)


# =============================================================================================
# Forward, pass 3: y = ((x - mean) - mean_lo) * scale + bias (+ ReLU)
# =============================================================================================
# A 1-D grid of tiles, s-blocks fastest, then c-blocks, then n-blocks: consecutive programs write
# consecutive memory. A 1-D grid has no 65535 limit on any of the three counts.
@triton.jit
def _batch_norm_fwd_kernel(
    x_ptr,  # input view (N, C, S)
    y_ptr,  # output, same view and dtype
    mean_ptr, invstd_ptr, mean_lo_ptr,  # (C,) ACC
    w_ptr, b_ptr,  # (C,) or dummies (HAS_WEIGHT / HAS_BIAS false)
    N, C, S, stride_n, stride_c,
    num_c_blocks, num_s_blocks,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = pid % num_s_blocks
    pid_c = (pid // num_s_blocks) % num_c_blocks
    pid_n = pid // (num_s_blocks * num_c_blocks)
    if INDEX_64:
        pid_n = pid_n.to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c_mask = rc < C

    mean = tl.load(mean_ptr + rc, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + rc, mask=c_mask, other=0.0)
    mean_lo = tl.load(mean_lo_ptr + rc, mask=c_mask, other=0.0)
    scale, bias = _scale_bias(invstd, w_ptr, b_ptr, rc, c_mask, HAS_WEIGHT, HAS_BIAS, ACC)

    mask = (rn < N)[:, None, None] & c_mask[None, :, None] & (rs < S)[None, None, :]
    offs = _tile_offsets(rn, rc, rs, stride_n, stride_c, INDEX_64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    y = _activate(_affine(x, mean, mean_lo, scale, bias), ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# =============================================================================================
# Backward, pass 1: per-program sums of g' and g' * (x - mean)
# =============================================================================================
# Same grid and rectangles as the statistics kernel. Each lane accumulates its own sums (the
# values are centred by the saved mean, so plain sums are accurate); the lanes are summed once at
# the end and each program writes part[2, P, C].
@triton.jit
def _batch_norm_bwd_reduce_kernel(
    g_ptr,  # grad_out, same view as the input
    x_ptr,  # input view (N, C, S)
    mean_ptr, invstd_ptr,  # (C,) ACC: save_mean, save_invstd
    w_ptr, b_ptr,  # (C,) or dummies; only read for the activation's derivative
    part_ptr,  # (2, P, C) float64, out: sum g', sum g' * (x - mean)
    N, C, S, stride_n, stride_c,
    rows_per_prog, cols_per_prog,
    num_c_blocks, num_p_s, P,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_c = pid % num_c_blocks
    pid_p = pid // num_c_blocks
    pid_pn = pid_p // num_p_s
    pid_ps = pid_p % num_p_s
    if INDEX_64:
        pid_pn = pid_pn.to(tl.int64)
    n_begin = pid_pn * rows_per_prog
    n_end = tl.minimum(n_begin + rows_per_prog, N)
    s_begin = pid_ps * cols_per_prog
    s_end = tl.minimum(s_begin + cols_per_prog, S)

    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = rc < C
    mean = tl.load(mean_ptr + rc, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + rc, mask=c_mask, other=0.0)
    if ACT != 0:
        scale, bias = _scale_bias(invstd, w_ptr, b_ptr, rc, c_mask, HAS_WEIGHT, HAS_BIAS, ACC)
        mean_lo = tl.zeros_like(mean)

    sum_g = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC)
    sum_gx = tl.zeros([BLOCK_N, BLOCK_C, BLOCK_S], ACC)
    for n0 in range(n_begin, n_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        for s0 in range(s_begin, s_end, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            mask = (rn < n_end)[:, None, None] & c_mask[None, :, None] & (rs < s_end)[None, None, :]
            offs = _tile_offsets(rn, rc, rs, stride_n, stride_c, INDEX_64)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
            if ACT != 0:
                g = _act_grad(g, _affine(x, mean, mean_lo, scale, bias), ACT)
            sum_g += g
            sum_gx += g * (x - mean[None, :, None])

    part = part_ptr + pid_p * C + rc  # the lanes summed in float64, stored in float64
    tl.store(part, tl.sum(tl.sum(sum_g.to(tl.float64), 2), 0), mask=c_mask)
    tl.store(part + P * C, tl.sum(tl.sum(sum_gx.to(tl.float64), 2), 0), mask=c_mask)


# =============================================================================================
# Backward, pass 2: sum the partials -> grad_bias, grad_weight
# =============================================================================================
@triton.jit
def _batch_norm_bwd_finalize_kernel(
    part_ptr,  # (2, P, C) float64: from _batch_norm_bwd_reduce_kernel
    invstd_ptr,  # (C,) ACC
    grad_weight_ptr, grad_bias_ptr,  # (C,) ACC, out
    C, P,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = rc < C
    # Summed in float64 whatever ACC is (many partials on long planes).
    acc_g = tl.zeros([BLOCK_P, BLOCK_C], tl.float64)
    acc_gx = tl.zeros([BLOCK_P, BLOCK_C], tl.float64)
    for p0 in range(0, P, BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)
        mask = (rp < P)[:, None] & c_mask[None, :]
        offs = rp[:, None] * C + rc[None, :]
        acc_g += tl.load(part_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        acc_gx += tl.load(part_ptr + P * C + offs, mask=mask, other=0.0).to(tl.float64)
    invstd = tl.load(invstd_ptr + rc, mask=c_mask, other=0.0).to(tl.float64)
    tl.store(grad_bias_ptr + rc, tl.sum(acc_g, 0).to(ACC), mask=c_mask)
    tl.store(grad_weight_ptr + rc, (tl.sum(acc_gx, 0) * invstd).to(ACC), mask=c_mask)  # sum g' * xhat


# =============================================================================================
# Backward, pass 3: grad_input
# =============================================================================================
# training: dx = scale * (g' - grad_bias / n - xhat * grad_weight / n),  xhat = (x - mean) * invstd
# eval:     dx = scale * g'    (x is read only for the activation's derivative)
@triton.jit
def _batch_norm_bwd_kernel(
    g_ptr,  # grad_out, same view as the input
    x_ptr,  # input view (N, C, S)
    dx_ptr,  # grad_input, out: same view, input dtype
    mean_ptr, invstd_ptr,  # (C,) ACC
    w_ptr, b_ptr,  # (C,) or dummies
    grad_weight_ptr, grad_bias_ptr,  # (C,) ACC (training only)
    N, C, S, stride_n, stride_c,
    n_total,  # N * S of the original input: elements per channel
    num_c_blocks, num_s_blocks,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    TRAINING: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = pid % num_s_blocks
    pid_c = (pid // num_s_blocks) % num_c_blocks
    pid_n = pid // (num_s_blocks * num_c_blocks)
    if INDEX_64:
        pid_n = pid_n.to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    c_mask = rc < C

    mean = tl.load(mean_ptr + rc, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + rc, mask=c_mask, other=0.0)
    scale, bias = _scale_bias(invstd, w_ptr, b_ptr, rc, c_mask, HAS_WEIGHT, HAS_BIAS, ACC)

    mask = (rn < N)[:, None, None] & c_mask[None, :, None] & (rs < S)[None, None, :]
    offs = _tile_offsets(rn, rc, rs, stride_n, stride_c, INDEX_64)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    if ACT != 0 or TRAINING:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    if ACT != 0:
        g = _act_grad(g, _affine(x, mean, tl.zeros_like(mean), scale, bias), ACT)
    if TRAINING:
        n = tl.zeros([BLOCK_C], ACC) + n_total
        mean_g = tl.load(grad_bias_ptr + rc, mask=c_mask, other=0.0) / n
        mean_gxhat = tl.load(grad_weight_ptr + rc, mask=c_mask, other=0.0) / n
        xhat = (x - mean[None, :, None]) * invstd[None, :, None]
        dx = scale[None, :, None] * (g - mean_g[None, :, None] - xhat * mean_gxhat[None, :, None])
    else:
        dx = scale[None, :, None] * g
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# =============================================================================================
# Host side: checks, layout, launch geometry
# =============================================================================================
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation ("opmath") dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_param(t: Optional[Tensor], name: str, input: Tensor, C: int, op: str = "batch_norm"):
    """weight / bias / running_mean / running_var: None, or (C,) on input's device, of input's
    dtype or the accumulation dtype (mirrors check_param in csrc/common/batch_norm.h)."""
    if t is None:
        return
    if t.dim() != 1 or t.numel() != C:
        raise RuntimeError(
            f"{op}: expected {name} of shape ({C},) to match input channels (input.size(1)), "
            f"got {name} of shape {list(t.shape)}")
    if t.device != input.device:
        raise RuntimeError(
            f"{op}: expected {name} on {input.device} like input, got {name} on {t.device}")
    acc = _acc_dtype(input.dtype)
    if t.dtype not in (input.dtype, acc):
        raise RuntimeError(
            f"{op}: expected {name} of dtype {input.dtype} (or {acc}), got {t.dtype}")


def _check_input(input: Tensor, op: str = "batch_norm"):
    if input.dim() < 2:
        raise RuntimeError(
            f"{op}: expected input of rank >= 2, (N, C, *), got input of rank {input.dim()} "
            f"and shape {list(input.shape)}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise RuntimeError(
            f"{op}: input dtype {input.dtype} is not supported by this kernel on "
            f"{input.device.type} (supported: float32, float64, float16, bfloat16)")


def _check_fwd(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
               momentum: float, eps: float) -> None:
    """Every user-facing check of batch_norm_fwd, before anything is written (mirrors check_fwd
    in csrc/common/batch_norm.h). ValueError for a training batch with one value per channel
    (as torch), RuntimeError otherwise; each message names the argument."""
    _check_input(input)
    C = input.size(1)
    _check_param(weight, "weight", input, C)
    _check_param(bias, "bias", input, C)
    _check_param(running_mean, "running_mean", input, C)
    _check_param(running_var, "running_var", input, C)
    if (running_mean is None) != (running_var is None):
        raise RuntimeError(
            "batch_norm: running_mean and running_var must be given together or both be None")
    if not training and running_mean is None:
        raise RuntimeError(
            "batch_norm: running_mean and running_var are required when training=False")
    if not (math.isfinite(eps) and (eps > 0 if training else eps >= 0)):  # as torch (ValueError)
        raise ValueError(f"batch_norm: expected eps {'> 0 when training' if training else '>= 0'}, "
                         f"got eps = {eps}")
    if not math.isfinite(momentum):
        raise ValueError(f"batch_norm: expected a finite momentum, got momentum = {momentum}")
    if training and math.prod(input.shape[:1] + input.shape[2:]) == 1:  # torch's rule (C = 0 included)
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{list(input.shape)}")


def _check_activation(activation: int, op: str) -> None:
    """The fused activation: 0 none, 1 ReLU, 2 sigmoid (mirrors check_activation in
    csrc/common/batch_norm.h)."""
    if activation not in (0, 1, 2):
        raise ValueError(f"{op}: expected activation 0 (none), 1 (relu) or 2 (sigmoid), got {activation}")


def _check_bwd(grad_out: Tensor, input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
               save_mean: Tensor, save_invstd: Tensor) -> None:
    """Checks of batch_norm_bwd (mirrors check_bwd in csrc/common/batch_norm.h)."""
    op = "batch_norm_bwd"
    _check_input(input, op)
    C = input.size(1)
    _check_param(weight, "weight", input, C, op)
    _check_param(bias, "bias", input, C, op)
    if grad_out.shape != input.shape:
        raise RuntimeError(
            f"{op}: expected grad_out of shape {list(input.shape)}, got {list(grad_out.shape)}")
    if grad_out.dtype != input.dtype:
        raise RuntimeError(f"{op}: expected grad_out of dtype {input.dtype}, got {grad_out.dtype}")
    if grad_out.device != input.device:
        raise RuntimeError(f"{op}: expected grad_out on {input.device}, got {grad_out.device}")
    acc = _acc_dtype(input.dtype)
    for name, t in (("save_mean", save_mean), ("save_invstd", save_invstd)):
        if t.numel() != C:
            raise RuntimeError(f"{op}: expected save_mean and save_invstd of shape ({C},), got "
                               f"{name} of shape {list(t.shape)}")
        if t.dtype != acc:
            raise RuntimeError(f"{op}: expected save_mean and save_invstd of dtype {acc}, got "
                               f"{name} of dtype {t.dtype}")
        if t.device != input.device:
            raise RuntimeError(f"{op}: expected {name} on {input.device}, got {t.device}")


def _check_launchable(input: Tensor) -> None:
    """Triton runs on CUDA tensors; CPU tensors only under the interpreter."""
    if input.device.type == "cuda":
        return
    if input.device.type == "cpu" and _INTERPRETED:
        return
    raise RuntimeError(
        f"batch_norm (triton): input on {input.device} cannot be run by the Triton kernels: they "
        f"need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported")


class _View:
    """The strided (N, C, S) view the kernels read (see the module docstring)."""

    def __init__(self, x: Tensor, channels_last: bool):
        self.C = x.size(1)
        spatial = math.prod(x.shape[2:])
        if channels_last:  # (M, C), C innermost
            self.N, self.S = x.size(0) * spatial, 1
            self.stride_n, self.stride_c = self.C, 1
        else:  # (N, C, S) contiguous
            self.N, self.S = x.size(0), spatial
            self.stride_n, self.stride_c = self.C * spatial, spatial
        self.n_total = x.size(0) * spatial  # elements per channel
        self.index_64 = _index_64(self)


def _to_kernel_layout(x: Tensor) -> Tuple[Tensor, Optional[torch.memory_format], bool]:
    """`x` itself when it is (N, C, S)-contiguous or channels-last (C innermost), else a contiguous
    copy. Returns (tensor, the memory format to bring companions (grad_out) to, channels_last);
    mirrors to_kernel_layout in csrc/common/batch_norm.h."""
    if x.dim() == 2 and x.is_contiguous():
        return x, torch.contiguous_format, True  # (N, C) rows: channels-last with S = 1
    if x.is_contiguous():
        return x, torch.contiguous_format, False
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x, torch.channels_last, True
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x, torch.channels_last_3d, True
    return x.contiguous(), torch.contiguous_format, False


def _index_64(v: _View) -> bool:
    """Whether a tile offset can pass int32, masked lanes included: a tile overhangs each of
    n, c, s by less than its block size."""
    top = 0
    for tile in (_REDUCE_TILE, _APPLY_TILE):
        bn, bc, bs = _tile_shape(v, tile)
        top = max(top, (v.N + bn - 1) * v.stride_n + (v.C + bc - 1) * v.stride_c + v.S + bs - 1)
    return top > _INT32_MAX


def _tile_shape(v: _View, tile: int) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, BLOCK_S), powers of two, about `tile` elements.

    BLOCK_S runs along the spatial row: the largest power of two between _MIN_RUN and the tile
    whose blocks pad the row by at most 1/8 (S = 56 * 56 = 3136: 256, 13 blocks, not 2048 with
    a second block 53 % empty), else the one that pads least. BLOCK_C adds channels until the
    inner (c, s) block spans about _MIN_RUN elements (1 channel for long rows, up to _MAX_BLOCK_C
    in channels-last where S = 1). BLOCK_N fills the rest of the tile with rows."""
    p2 = triton.next_power_of_2(v.S)
    hi, lo = min(p2, tile), min(p2, _MIN_RUN, tile)
    padded = lambda bs: triton.cdiv(v.S, bs) * bs
    sizes = [1 << k for k in range(lo.bit_length() - 1, hi.bit_length())]  # lo .. hi
    fits = [bs for bs in sizes if 8 * padded(bs) <= 9 * v.S]
    block_s = max(fits) if fits else min(sizes, key=lambda bs: (padded(bs), -bs))
    block_c = min(triton.next_power_of_2(v.C), max(1, _MIN_RUN // block_s), _MAX_BLOCK_C)
    block_n = max(1, min(triton.next_power_of_2(v.N), tile // (block_s * block_c)))
    return block_n, block_c, block_s


@functools.lru_cache(maxsize=None)
def _num_sms(index: Optional[int]) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _reduce_grid(v: _View, device: torch.device):
    """Cut the (n, s) plane of each channel block into P = P_N * P_S rectangles so that the
    reduction launches about _PROGRAMS_PER_SM programs per SM: rows first (whole rows are
    contiguous), then columns when N alone is too short (e.g. batch 1 of a large image)."""
    block_n, block_c, block_s = _tile_shape(v, _REDUCE_TILE)
    num_c_blocks = triton.cdiv(v.C, block_c)
    sms = _num_sms(device.index) if device.type == "cuda" else _DEFAULT_SMS
    want = max(1, triton.cdiv(_PROGRAMS_PER_SM * sms, num_c_blocks))
    # Precision on long planes: at most _MAX_LANE_ELEMS elements per lane of a program (each lane
    # accumulates in ACC; the partials are merged in float64).
    want = max(want, triton.cdiv(v.N * v.S, block_n * block_s * _MAX_LANE_ELEMS))
    n_blocks, s_blocks = triton.cdiv(v.N, block_n), triton.cdiv(v.S, block_s)
    p_n = min(n_blocks, want)
    p_s = min(s_blocks, max(1, want // p_n))
    rows_per_prog = triton.cdiv(n_blocks, p_n) * block_n
    cols_per_prog = triton.cdiv(s_blocks, p_s) * block_s
    p_n, p_s = triton.cdiv(v.N, rows_per_prog), triton.cdiv(v.S, cols_per_prog)  # none empty
    return dict(block_n=block_n, block_c=block_c, block_s=block_s, num_c_blocks=num_c_blocks,
                rows_per_prog=rows_per_prog, cols_per_prog=cols_per_prog, p_s=p_s, P=p_n * p_s)


def _apply_grid(v: _View):
    block_n, block_c, block_s = _tile_shape(v, _APPLY_TILE)
    num_c_blocks, num_s_blocks = triton.cdiv(v.C, block_c), triton.cdiv(v.S, block_s)
    grid = (triton.cdiv(v.N, block_n) * num_c_blocks * num_s_blocks,)
    return grid, dict(num_c_blocks=num_c_blocks, num_s_blocks=num_s_blocks,
                      BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_S=block_s)


# =============================================================================================
# The ops
# =============================================================================================
def _on_device_of(index: int, name: str):
    """Runs a launcher under the device guard of its argument ``index`` / ``name`` (the input), so a
    tensor on cuda:1 launches on cuda:1 whatever the current device."""
    def wrap(launcher):
        @functools.wraps(launcher)
        def guarded(*args, **kwargs):
            with _device_guard(args[index] if len(args) > index else kwargs[name]):
                return launcher(*args, **kwargs)
        return guarded
    return wrap


@torch.library.custom_op("pyfastdl_triton::batch_norm_fwd",
                         mutates_args=("running_mean", "running_var"))
@_on_device_of(0, "input")
def batch_norm_fwd(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
                   momentum: float, eps: float, activation: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch-norm forward (+ activation: 0 none, 1 ReLU, 2 sigmoid). input (N, C, *) of rank >= 2, float32/64, float16, bfloat16,
    contiguous or channels-last; weight, bias, running_mean, running_var (C,) or None.
    Returns (output: input's shape, dtype and memory format; save_mean, save_invstd: (C,) in the
    accumulation dtype). Updates running_mean / running_var in place when training."""
    _check_fwd(input, weight, bias, running_mean, running_var, training, momentum, eps)
    _check_activation(activation, "batch_norm")
    _check_launchable(input)
    x, _, channels_last = _to_kernel_layout(input)
    C = x.size(1)
    acc = _acc_dtype(x.dtype)
    out = torch.empty_like(x)
    save_mean = torch.zeros(C, dtype=acc, device=x.device)
    save_invstd = torch.zeros(C, dtype=acc, device=x.device)
    if x.numel() == 0:
        return out, save_mean, save_invstd
    mean_lo = torch.empty(C, dtype=acc, device=x.device)

    v = _View(x, channels_last)
    ACC, IS_FP64 = _tl_acc(x.dtype), acc == torch.float64
    has_running = running_mean is not None
    dummy = save_mean  # stands for an absent tensor argument; never read
    eps_hi, eps_lo = _split_f32(float(eps))
    mom_hi, mom_lo = _split_f32(float(momentum))

    if training:
        r = _reduce_grid(v, x.device)
        part = torch.empty((3, r["P"], C), dtype=torch.float64, device=x.device)
        _batch_norm_stats_kernel[(r["num_c_blocks"] * r["P"],)](
            x, part, v.N, C, v.S, v.stride_n, v.stride_c,
            r["rows_per_prog"], r["cols_per_prog"], r["num_c_blocks"], r["p_s"], r["P"],
            ACC=ACC, BLOCK_N=r["block_n"], BLOCK_C=r["block_c"], BLOCK_S=r["block_s"],
            INDEX_64=v.index_64, num_warps=_REDUCE_WARPS)
        P = r["P"]
    else:
        part, P = dummy, 1
    _batch_norm_finalize_kernel[(triton.cdiv(C, _FINALIZE_BLOCK_C),)](
        x, part, save_mean, save_invstd, mean_lo,
        running_mean if has_running else dummy, running_var if has_running else dummy,
        C, v.stride_c, P, v.n_total, eps_hi, eps_lo, mom_hi, mom_lo,
        TRAINING=training, HAS_RUNNING=has_running, ACC=ACC, IS_FP64=IS_FP64,
        BLOCK_P=_FINALIZE_BLOCK_P, BLOCK_C=_FINALIZE_BLOCK_C, num_warps=4)

    grid, blocks = _apply_grid(v)
    _batch_norm_fwd_kernel[grid](
        x, out, save_mean, save_invstd, mean_lo,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        v.N, C, v.S, v.stride_n, v.stride_c,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=activation, ACC=ACC,
        INDEX_64=v.index_64, num_warps=_APPLY_WARPS, **blocks)
    return out, save_mean, save_invstd


@batch_norm_fwd.register_fake
def _batch_norm_fwd_fake(input, weight, bias, running_mean, running_var, training, momentum, eps,
                         activation):
    _check_fwd(input, weight, bias, running_mean, running_var, training, momentum, eps)
    _check_activation(activation, "batch_norm")
    return batch_norm_fwd_shapes(input)  # one shape rule for the C++ and the Triton op


@torch.library.custom_op(
    "pyfastdl_triton::batch_norm_bwd", mutates_args=(),
    schema="(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor save_mean, "
           "Tensor save_invstd, bool training, int activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")
@_on_device_of(1, "input")
def batch_norm_bwd(grad_out: Tensor, input: Tensor, weight: Optional[Tensor],
                   bias: Optional[Tensor], save_mean: Tensor, save_invstd: Tensor, training: bool,
                   activation: int, output_mask: List[bool]):
    """Backward of batch_norm_fwd. grad_out: input's shape and dtype; save_mean, save_invstd: the
    forward's (C,) outputs; output_mask: which of the three gradients to compute (the others are
    None and cost nothing). Returns (grad_input: input's shape, dtype and memory format;
    grad_weight, grad_bias: (C,) in the accumulation dtype)."""
    _check_bwd(grad_out, input, weight, bias, save_mean, save_invstd)
    _check_activation(activation, "batch_norm_bwd")
    _check_launchable(input)
    x, fmt, channels_last = _to_kernel_layout(input)
    g = grad_out.contiguous(memory_format=fmt)
    C = x.size(1)
    acc = _acc_dtype(x.dtype)
    need_gi, need_sums = bool(output_mask[0]), bool(output_mask[1] or output_mask[2])
    grad_input = torch.empty_like(x) if need_gi else None
    grad_weight = torch.zeros(C, dtype=acc, device=x.device)
    grad_bias = torch.zeros(C, dtype=acc, device=x.device)
    masked = lambda: (grad_input, grad_weight if output_mask[1] else None,  # noqa: E731
                      grad_bias if output_mask[2] else None)
    if x.numel() == 0 or not (need_gi or need_sums):
        return masked()

    v = _View(x, channels_last)
    ACC = _tl_acc(x.dtype)
    dummy = save_mean  # stands for an absent weight / bias; never read
    mean, invstd = save_mean.contiguous(), save_invstd.contiguous()
    w = weight if weight is not None else dummy
    b = bias if bias is not None else dummy
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=activation, ACC=ACC)

    if need_sums or training:  # grad_weight / grad_bias, which training's grad_input also needs
        r = _reduce_grid(v, x.device)
        part = torch.empty((2, r["P"], C), dtype=torch.float64, device=x.device)
        _batch_norm_bwd_reduce_kernel[(r["num_c_blocks"] * r["P"],)](
            g, x, mean, invstd, w, b, part, v.N, C, v.S, v.stride_n, v.stride_c,
            r["rows_per_prog"], r["cols_per_prog"], r["num_c_blocks"], r["p_s"], r["P"],
            BLOCK_N=r["block_n"], BLOCK_C=r["block_c"], BLOCK_S=r["block_s"],
            INDEX_64=v.index_64, num_warps=_REDUCE_WARPS, **flags)
        _batch_norm_bwd_finalize_kernel[(triton.cdiv(C, _FINALIZE_BLOCK_C),)](
            part, invstd, grad_weight, grad_bias, C, r["P"],
            ACC=ACC, BLOCK_P=_FINALIZE_BLOCK_P, BLOCK_C=_FINALIZE_BLOCK_C, num_warps=4)
    if not need_gi:
        return masked()

    grid, blocks = _apply_grid(v)
    _batch_norm_bwd_kernel[grid](
        g, x, grad_input, mean, invstd, w, b, grad_weight, grad_bias,
        v.N, C, v.S, v.stride_n, v.stride_c, v.n_total,
        TRAINING=training, INDEX_64=v.index_64, num_warps=_APPLY_WARPS, **blocks, **flags)
    return masked()


@batch_norm_bwd.register_fake
def _batch_norm_bwd_fake(grad_out, input, weight, bias, save_mean, save_invstd, training, activation,
                         output_mask):
    _check_bwd(grad_out, input, weight, bias, save_mean, save_invstd)
    _check_activation(activation, "batch_norm_bwd")
    return batch_norm_bwd_shapes(input, output_mask)  # one shape rule for the C++ and the Triton op


__all__ = ["batch_norm_fwd", "batch_norm_bwd"]
