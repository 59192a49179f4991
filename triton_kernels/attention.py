"""Scaled dot-product attention, forward and backward, in Triton (FlashAttention-2 tiling).

Registers two ops with the schemas of ``csrc/ops.cpp`` (contract: ``csrc/common/attention.h``) in
the namespace ``pyfastdl_triton``::

    pyfastdl_triton::attention_fwd(q, k, v, attn_mask?, valid_lens?, is_causal, scale, dropout_p,
                                   seed, offset) -> (out, lse)
    pyfastdl_triton::attention_bwd(grad_out, q, k, v, out, lse, attn_mask?, valid_lens?, is_causal,
                                   scale, dropout_p, seed, offset, output_mask=[T, T, T, F])
                                   -> (grad_q, grad_k, grad_v, grad_attn_mask)

Shapes: q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), Hq % Hk == 0 (query head h reads key /
value head h // (Hq // Hk)); out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L) float32. Any strides
(a last dimension that is not contiguous is copied). E, Ev <= 256 (padded to a power of two >= 16
inside the kernels). dtypes float16, bfloat16, float32; accumulation in float32, float32 dots in
IEEE precision (no tf32) so that the interpreter and the GPU agree.

The math (Dao 2023, "FlashAttention-2"), per query row i of head (b, h)::

    s_ij   = scale * q_i . k_j (+ attn_mask[b, h, i, j] if float), or -inf where a mask excludes j:
             bool attn_mask False; is_causal and j > i (top-left); valid_lens: j >= vl where vl =
             valid_lens[b] (or [b, i]) > 0 -- a row with vl <= 0 has its scores scale * q_i . k_j
             replaced by 0 (the notes' -1e6 fill: every key weighs the same)
    lse_i  = log sum_j exp(s_ij)                       (-inf for a row with no key left)
    p_ij   = exp(s_ij - lse_i)
    out_i  = sum_j p_ij z_ij / (1 - dropout_p) v_j     (0 for a row with no key left)
             z_ij = 1 if Philox-4x32-10 keeps (b, h, i, j), see _philox_keep, else 0

    NaN / Inf as torch's math SDPA: the masks *add* -inf (a NaN score stays NaN at a masked key),
    the row max propagates NaN (tl.max / tl.maximum drop it by default), and the causal skip is
    off for a head whose inputs hold a NaN or an Inf (_nonfinite_heads).

    backward (P recomputed from lse; D_i = sum_e dO_ie out_ie = sum_j p_ij dP_ij):
    dP_ij  = z_ij / (1 - dropout_p) * dO_i . v_j,    dS_ij = p_ij (dP_ij - D_i)
    dV_j   = sum_i p_ij z_ij / (1 - dropout_p) dO_i, dK_j = scale sum_i dS_ij q_i,
    dQ_i   = scale sum_j dS_ij k_j                     (dK, dV summed over a GQA group's heads)
    dmask_ij = dS_ij (before zeroing the rows valid_lens makes constant), the gradient of a float
             attn_mask, written by the dQ kernel; only the gradients in output_mask are computed

Kernels (launch order). Grids are 1-D: program id = block + n_blocks * head, consecutive programs
share a head, so its K / V (or Q / dO) tiles are reused from L2:

    forward    _attention_fwd_kernel       per (query block, b * Hq + h): loop over key blocks
                                           (only up to the diagonal when causal) with a running
                                           max and sum (online softmax); writes out and lse
    backward   _attention_bwd_delta_kernel D = rowsum(dO * out) per (query block, b * Hq + h)
               _attention_bwd_dkdv_kernel  per (key block, b * Hk + hk): dK, dV of its keys,
                                           looping over the group's query heads and over the query
                                           blocks (from the diagonal on when causal) -- GQA sums in
                                           registers, no partial buffers, no atomics
               _attention_bwd_dq_kernel    per (query block, b * Hq + h): dQ, looping over key
                                           blocks like the forward

dQ has its own kernel rather than atomic adds from the dK/dV kernel: the result is deterministic
(same bits every run), at the price of computing S, P and dP twice.

Dropout follows the header exactly: key = (seed mod 2^32, (seed >> 32) mod 2^32), counter =
(lo, hi, 0, 0) of the 64-bit offset + ((b * Hq + h) * L + i) * S + j, uniform = first output word
* 2^-32, kept when uniform >= dropout_p -- computed exactly, as the integer comparison word >=
ceil(dropout_p * 2^32). ``philox_keep_mask`` builds the same mask with torch integer ops (tests,
references).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..autograd.attention import attention_bwd_shapes, attention_fwd_shapes
from ._common import INTERPRETED as _INTERPRETED, device_guard as _device_guard

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_MIN_HEAD_PAD = 16  # tl.dot needs every dimension >= 16

# Mask kinds (constexpr)
_MASK_NONE, _MASK_BOOL, _MASK_FLOAT = 0, 1, 2


# =============================================================================================
# Philox-4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"; the
# Random123 round function and constants)
# =============================================================================================
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (Weyl sequence)


@triton.jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox-4x32 rounds on uint32 counter words (c0..c3) with key (k0, k1); all uint32."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _philox_keep(seed_lo, seed_hi, offset, bh, L, S, rows, cols, threshold):
    """Dropout keep decisions [len(rows), len(cols)] for head bh = b * Hq + h (int64): Philox
    with key (seed_lo, seed_hi) (int32 bit patterns) on the 64-bit counter offset + linear index
    ((bh * L + i) * S + j); kept when the first output word >= threshold (int64 in [0, 2^32])."""
    lin = (bh * L + rows.to(tl.int64)[:, None]) * S + cols.to(tl.int64)[None, :] + offset
    c0 = lin.to(tl.uint32)  # low word (truncation)
    c1 = (lin >> 32).to(tl.uint32)  # high word
    zero = tl.zeros_like(c0)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    r0, _, _, _ = _philox4x32_10(c0, c1, zero, zero, k0, k1)
    return r0.to(tl.int64) >= threshold


# =============================================================================================
# Device helpers shared by the kernels (the same scores in the forward and both backward kernels)
# =============================================================================================
@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """a @ b accumulated in float32. DOT_UPCAST (bfloat16 under the interpreter, whose bfloat16
    tl.dot returns garbage in Triton 3.8) multiplies the same bfloat16 values in float32 instead,
    which is what the tensor cores compute."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _masked_scores(q, k, scale, rows, cols, L, S, b, h,
                   mask_ptr, sm_b, sm_h, sm_l, sm_s, vl_ptr, svl_b, svl_l,
                   MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VL: tl.constexpr,
                   DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """s = scale * q @ k^T (+ float mask) for a [BM, E] query tile and a [BN, E] key tile. float32.
    As torch's math SDPA (csrc/common/attention.h): valid_lens *replaces* scores (0 for a row of
    length <= 0, -inf past the length), is_causal and a bool mask *add* -inf, a float mask is added
    -- so a NaN score, or a NaN in the mask, stays NaN at a masked key. -inf out of range."""
    s = _dot(q, tl.trans(k), DOT_PREC, DOT_UPCAST) * scale
    inb = (rows[:, None] < L) & (cols[None, :] < S)
    if HAS_VL:  # the notes' -1e6 fill: a row with vl <= 0 weighs every key equally (scores 0)
        vl = tl.load(vl_ptr + b * svl_b + rows.to(tl.int64) * svl_l, mask=rows < L, other=0)
        s = tl.where(vl[:, None] <= 0, 0.0, s)
        s = tl.where((cols.to(tl.int64)[None, :] < vl[:, None]) | (vl[:, None] <= 0), s,
                     float("-inf"))
    if IS_CAUSAL:
        s = s + tl.where(cols[None, :] <= rows[:, None], 0.0, float("-inf"))
    if MASK_KIND != 0:
        m_offs = (b * sm_b + h * sm_h + rows.to(tl.int64)[:, None] * sm_l
                  + cols.to(tl.int64)[None, :] * sm_s)
        if MASK_KIND == 1:
            keep = tl.load(mask_ptr + m_offs, mask=inb, other=0)
            s = s + tl.where(keep != 0, 0.0, float("-inf"))
        else:
            s = s + tl.load(mask_ptr + m_offs, mask=inb, other=0.0).to(tl.float32)
    return tl.where(inb, s, float("-inf"))


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN (tl.maximum's default, like fmaxf, drops it -- on the GPU and
    under the interpreter alike)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _any_nonfinite(x):
    """True when the tile holds a NaN or an Inf (x - x is 0 for finite x, NaN otherwise)."""
    xf = x.to(tl.float32)
    return tl.sum(tl.sum(xf - xf, 1), 0) != 0.0


# =============================================================================================
# Forward
# =============================================================================================
@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset", "drop_threshold"])
def _attention_fwd_kernel(
    q_ptr,  # (B, Hq, L, E), last dim contiguous
    k_ptr,  # (B, Hk, S, E), last dim contiguous
    v_ptr,  # (B, Hk, S, Ev), last dim contiguous
    o_ptr,  # (B, Hq, L, Ev) contiguous, out
    lse_ptr,  # (B, Hq, L) float32 contiguous, out
    mask_ptr,  # (B, Hq, L, S) any strides, uint8 (bool) or float; unused when MASK_KIND == 0
    vl_ptr,  # (B,) or (B, L) int64; unused when not HAS_VL
    bad_ptr,  # (B, Hk) int8: K or V of the head holds a NaN / Inf (read when IS_CAUSAL)
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,  # strides (elements)
    sm_b, sm_h, sm_l, sm_s, svl_b, svl_l,  # mask and valid_lens strides (svl_l = 0 for (B,))
    Hq, L, S, E, Ev, G,  # sizes; G = Hq // Hk
    n_m_blocks,  # cdiv(L, BLOCK_M)
    scale,  # float32
    seed_lo, seed_hi, offset, drop_threshold, drop_scale,  # dropout (see _philox_keep)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    mb = pid % n_m_blocks
    bh = (pid // n_m_blocks).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // G

    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    re = tl.arange(0, E_PAD)
    rv = tl.arange(0, EV_PAD)
    row_ok = rows < L
    rows64 = rows.to(tl.int64)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows64[:, None] * sq_l + re[None, :],
                mask=row_ok[:, None] & (re[None, :] < E), other=0.0)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(s - m_i), before dropout
    acc = tl.zeros([BLOCK_M, EV_PAD], tl.float32)
    n_end = S
    if IS_CAUSAL:  # keys j <= i only: no key block starts past this block's last row -- unless a
        # NaN / Inf in K, V or this Q tile reaches the masked keys (torch: NaN + -inf, 0 * inf)
        bad = (tl.load(bad_ptr + b * (Hq // G) + hk) != 0) | _any_nonfinite(q)
        n_end = tl.where(bad, S, tl.minimum(S, (mb + 1) * BLOCK_M))
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        cols64 = cols.to(tl.int64)
        col_ok = cols < S
        k = tl.load(k_base + cols64[:, None] * sk_s + re[None, :],
                    mask=col_ok[:, None] & (re[None, :] < E), other=0.0)
        s = _masked_scores(q, k, scale, rows, cols, L, S, b, h,
                           mask_ptr, sm_b, sm_h, sm_l, sm_s, vl_ptr, svl_b, svl_l,
                           MASK_KIND, IS_CAUSAL, HAS_VL, DOT_PREC, DOT_UPCAST)
        m_new = _max_nan(m_i, tl.reduce(s, 1, _max_nan))  # NaN once a score of the row is NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _philox_keep(seed_lo, seed_hi, offset, bh, L, S, rows, cols, drop_threshold)
            p = tl.where(keep, p * drop_scale, 0.0)
        v = tl.load(v_base + cols64[:, None] * sv_s + rv[None, :],
                    mask=col_ok[:, None] & (rv[None, :] < Ev), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PREC, DOT_UPCAST)
        m_i = m_new

    empty = l_i == 0.0  # no key left: P = 0, out = 0 v (0, or NaN where v is not finite), lse = -inf
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(o_ptr + (bh * L + rows64)[:, None] * Ev + rv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (rv[None, :] < Ev))
    tl.store(lse_ptr + bh * L + rows64, lse, mask=row_ok)


# =============================================================================================
# Backward
# =============================================================================================
@triton.jit
def _attention_bwd_delta_kernel(
    do_ptr,  # (B, Hq, L, Ev), last dim contiguous
    o_ptr,  # (B, Hq, L, Ev), last dim contiguous
    delta_ptr,  # (B, Hq, L) float32 contiguous, out: rowsum(dO * out)
    sdo_b, sdo_h, sdo_l, so_b, so_h, so_l,  # strides (elements)
    Hq, L, Ev, n_m_blocks,
    BLOCK_M: tl.constexpr, EV_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    mb = pid % n_m_blocks
    bh = (pid // n_m_blocks).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    rows = (mb * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rv = tl.arange(0, EV_PAD)
    m = (rows[:, None] < L) & (rv[None, :] < Ev)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + rows[:, None] * sdo_l + rv[None, :], mask=m,
                 other=0.0).to(tl.float32)
    o = tl.load(o_ptr + b * so_b + h * so_h + rows[:, None] * so_l + rv[None, :], mask=m,
                other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh * L + rows, tl.sum(do * o, 1), mask=rows < L)


@triton.jit
def _recompute_p(q, k, do, v, lse, delta, scale, rows, cols, L, S, b, h, bh,
                 mask_ptr, sm_b, sm_h, sm_l, sm_s, vl_ptr, svl_b, svl_l,
                 seed_lo, seed_hi, offset, drop_threshold, drop_scale,
                 MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VL: tl.constexpr,
                 HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """For a [BM] x [BN] tile: (P after dropout, dS = P * (dP - D)), both float32 [BM, BN]. dS is
    the gradient of the scores (and of a float attn_mask); _no_constant_rows zeroes the rows whose
    scores valid_lens made constant before dS goes to q and k."""
    s = _masked_scores(q, k, scale, rows, cols, L, S, b, h,
                       mask_ptr, sm_b, sm_h, sm_l, sm_s, vl_ptr, svl_b, svl_l,
                       MASK_KIND, IS_CAUSAL, HAS_VL, DOT_PREC, DOT_UPCAST)
    # A row with no key has lse = -inf and s = -inf everywhere: +inf gives p = 0, not NaN.
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    p = tl.exp(s - lse[:, None])
    dp = _dot(do, tl.trans(v), DOT_PREC, DOT_UPCAST)
    if HAS_DROPOUT:
        keep = _philox_keep(seed_lo, seed_hi, offset, bh, L, S, rows, cols, drop_threshold)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        pd = p
    ds = p * (dp - delta[:, None])
    return pd, ds


@triton.jit
def _no_constant_rows(ds, rows, L, b, vl_ptr, svl_b, svl_l, HAS_VL: tl.constexpr):
    """dS with the rows of valid length <= 0 zeroed: their scores are constant, no gradient to q,
    k."""
    if HAS_VL:
        vl = tl.load(vl_ptr + b * svl_b + rows.to(tl.int64) * svl_l, mask=rows < L, other=1)
        ds = tl.where(vl[:, None] <= 0, 0.0, ds)
    return ds


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset", "drop_threshold"])
def _attention_bwd_dkdv_kernel(
    q_ptr,  # (B, Hq, L, E), last dim contiguous
    k_ptr,  # (B, Hk, S, E), last dim contiguous
    v_ptr,  # (B, Hk, S, Ev), last dim contiguous
    do_ptr,  # (B, Hq, L, Ev), last dim contiguous
    lse_ptr,  # (B, Hq, L) float32 contiguous
    delta_ptr,  # (B, Hq, L) float32 contiguous
    dk_ptr,  # (B, Hk, S, E) contiguous, out (written when NEED_DK)
    dv_ptr,  # (B, Hk, S, Ev) contiguous, out (written when NEED_DV)
    mask_ptr, vl_ptr,  # as in the forward
    bad_ptr,  # (B, Hk) int8: a NaN / Inf in the head's K, V, Q, delta or lse (read when IS_CAUSAL)
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_l,
    sm_b, sm_h, sm_l, sm_s, svl_b, svl_l,
    Hq, Hk, L, S, E, Ev, G,
    n_n_blocks,  # cdiv(S, BLOCK_N)
    scale,
    seed_lo, seed_hi, offset, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
    NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
):
    pid = tl.program_id(0)
    nb = pid % n_n_blocks
    bhk = (pid // n_n_blocks).to(tl.int64)
    b = bhk // Hk
    hk = bhk % Hk

    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)
    col_ok = cols < S
    re = tl.arange(0, E_PAD)
    rv = tl.arange(0, EV_PAD)
    k = tl.load(k_ptr + b * sk_b + hk * sk_h + cols64[:, None] * sk_s + re[None, :],
                mask=col_ok[:, None] & (re[None, :] < E), other=0.0)
    v = tl.load(v_ptr + b * sv_b + hk * sv_h + cols64[:, None] * sv_s + rv[None, :],
                mask=col_ok[:, None] & (rv[None, :] < Ev), other=0.0)
    dk = tl.zeros([BLOCK_N, E_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, EV_PAD], tl.float32)
    m_begin = 0
    if IS_CAUSAL:  # only queries i >= j see key j: start at the block holding row nb * BLOCK_N,
        # unless a NaN / Inf of the head reaches the masked pairs (torch: 0 * inf, NaN + -inf)
        bad = tl.load(bad_ptr + bhk) != 0
        m_begin = tl.where(bad, 0, (nb * BLOCK_N // BLOCK_M) * BLOCK_M)
    for g in range(0, G):  # the query heads of this key/value head (GQA), summed here
        h = hk * G + g
        bh = b * Hq + h
        q_base = q_ptr + b * sq_b + h * sq_h
        do_base = do_ptr + b * sdo_b + h * sdo_h
        for start_m in range(m_begin, L, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            rows64 = rows.to(tl.int64)
            row_ok = rows < L
            q = tl.load(q_base + rows64[:, None] * sq_l + re[None, :],
                        mask=row_ok[:, None] & (re[None, :] < E), other=0.0)
            do = tl.load(do_base + rows64[:, None] * sdo_l + rv[None, :],
                         mask=row_ok[:, None] & (rv[None, :] < Ev), other=0.0)
            lse = tl.load(lse_ptr + bh * L + rows64, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + bh * L + rows64, mask=row_ok, other=0.0)
            pd, ds = _recompute_p(q, k, do, v, lse, delta, scale, rows, cols, L, S, b, h, bh,
                                  mask_ptr, sm_b, sm_h, sm_l, sm_s, vl_ptr, svl_b, svl_l,
                                  seed_lo, seed_hi, offset, drop_threshold, drop_scale,
                                  MASK_KIND, IS_CAUSAL, HAS_VL, HAS_DROPOUT, DOT_PREC,
                             DOT_UPCAST)
            if NEED_DV:
                dv += _dot(tl.trans(pd.to(do.dtype)), do, DOT_PREC, DOT_UPCAST)
            if NEED_DK:
                ds = _no_constant_rows(ds, rows, L, b, vl_ptr, svl_b, svl_l, HAS_VL)
                dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PREC, DOT_UPCAST)
    out_m = col_ok[:, None]
    if NEED_DK:
        dk = dk * scale
        tl.store(dk_ptr + (bhk * S + cols64)[:, None] * E + re[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=out_m & (re[None, :] < E))
    if NEED_DV:
        tl.store(dv_ptr + (bhk * S + cols64)[:, None] * Ev + rv[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=out_m & (rv[None, :] < Ev))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "offset", "drop_threshold"])
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,  # as in _attention_bwd_dkdv_kernel
    dq_ptr,  # (B, Hq, L, E) contiguous, out (written when NEED_DQ)
    dmask_ptr,  # (B, Hq, L, S) contiguous, zeroed, out: dS, the float attn_mask's gradient (NEED_DMASK)
    mask_ptr, vl_ptr, bad_ptr,  # as in _attention_bwd_dkdv_kernel
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_l,
    sm_b, sm_h, sm_l, sm_s, svl_b, svl_l,
    Hq, L, S, E, Ev, G,
    n_m_blocks,  # cdiv(L, BLOCK_M)
    scale,
    seed_lo, seed_hi, offset, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr, EV_PAD: tl.constexpr,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_VL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DMASK: tl.constexpr,
):
    pid = tl.program_id(0)
    mb = pid % n_m_blocks
    bh = (pid // n_m_blocks).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    hk = h // G

    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    row_ok = rows < L
    re = tl.arange(0, E_PAD)
    rv = tl.arange(0, EV_PAD)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rows64[:, None] * sq_l + re[None, :],
                mask=row_ok[:, None] & (re[None, :] < E), other=0.0)
    do = tl.load(do_ptr + b * sdo_b + h * sdo_h + rows64[:, None] * sdo_l + rv[None, :],
                 mask=row_ok[:, None] & (rv[None, :] < Ev), other=0.0)
    lse = tl.load(lse_ptr + bh * L + rows64, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + bh * L + rows64, mask=row_ok, other=0.0)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, E_PAD], tl.float32)
    n_end = S
    if IS_CAUSAL:  # as in the forward: every key block when the head holds a NaN / Inf
        bad = tl.load(bad_ptr + b * (Hq // G) + hk) != 0
        n_end = tl.where(bad, S, tl.minimum(S, (mb + 1) * BLOCK_M))
    for start_n in range(0, n_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        cols64 = cols.to(tl.int64)
        col_ok = cols < S
        k = tl.load(k_base + cols64[:, None] * sk_s + re[None, :],
                    mask=col_ok[:, None] & (re[None, :] < E), other=0.0)
        v = tl.load(v_base + cols64[:, None] * sv_s + rv[None, :],
                    mask=col_ok[:, None] & (rv[None, :] < Ev), other=0.0)
        _, ds = _recompute_p(q, k, do, v, lse, delta, scale, rows, cols, L, S, b, h, bh,
                             mask_ptr, sm_b, sm_h, sm_l, sm_s, vl_ptr, svl_b, svl_l,
                             seed_lo, seed_hi, offset, drop_threshold, drop_scale,
                             MASK_KIND, IS_CAUSAL, HAS_VL, HAS_DROPOUT, DOT_PREC,
                             DOT_UPCAST)
        if NEED_DMASK:
            tl.store(dmask_ptr + (bh * L + rows64)[:, None] * S + cols64[None, :],
                     ds.to(dmask_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        if NEED_DQ:
            ds = _no_constant_rows(ds, rows, L, b, vl_ptr, svl_b, svl_l, HAS_VL)
            dq += _dot(ds.to(k.dtype), k, DOT_PREC, DOT_UPCAST)
    if NEED_DQ:
        dq = dq * scale
        tl.store(dq_ptr + (bh * L + rows64)[:, None] * E + re[None, :],
                 dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (re[None, :] < E))


# =============================================================================================
# Host side: checks, tile sizes, launchers
# =============================================================================================
def _pad(d: int) -> int:
    return max(_MIN_HEAD_PAD, triton.next_power_of_2(d))


# (BLOCK_M, BLOCK_N, num_warps) per kernel, by the larger padded head dim and the element size.
# The GPU values are conservative first choices (not tuned). Under the interpreter the blocks
# are small and unequal, so the tests' L, S = 129 span several blocks with ragged edges and the
# causal start of the dK/dV loop (BLOCK_N != BLOCK_M) is exercised.
def _fwd_blocks(d_pad: int, elt: int) -> Tuple[int, int, int]:
    if _INTERPRETED:
        return 32, 64, 4
    if d_pad <= 64:
        return 64, 64, 4
    if d_pad <= 128:
        return (64, 64, 4) if elt == 2 else (64, 32, 4)
    return (64, 32, 8) if elt == 2 else (32, 32, 8)


def _bwd_blocks(d_pad: int, elt: int) -> Tuple[int, int, int]:
    if _INTERPRETED:
        return 32, 64, 4
    if d_pad <= 64:
        return 32, 64, 4
    if d_pad <= 128:
        return (32, 64, 8) if elt == 2 else (32, 32, 8)
    return (16, 32, 8) if elt == 2 else (16, 32, 8)


def _check_launchable(q: Tensor, op: str) -> None:
    """Triton runs on CUDA tensors; CPU tensors only under the interpreter."""
    if q.device.type == "cuda" or (q.device.type == "cpu" and _INTERPRETED):
        return
    raise RuntimeError(
        f"{op} (triton): q on {q.device} cannot be run by the Triton kernels: they need CUDA "
        f"tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported")


def _check_common(op: str, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                  valid_lens: Optional[Tensor], dropout_p: float) -> Tuple[int, ...]:
    """Checks shared by the forward and the backward; returns (B, Hq, Hk, L, S, E, Ev)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise RuntimeError(f"{op}: expected {name} to be 4-D (B, H, L or S, E), got shape "
                               f"{list(t.shape)}")
        if t.dtype not in _DTYPES:
            raise RuntimeError(f"{op}: expected {name} of dtype float16, bfloat16 or float32 "
                               f"(Triton kernels), got {t.dtype}")
        if t.device != q.device:
            raise RuntimeError(f"{op}: expected {name} on {q.device} (q's device), got "
                               f"{t.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise RuntimeError(f"{op}: expected q, k, v of one dtype, got {q.dtype}, {k.dtype}, "
                           f"{v.dtype}")
    B, Hq, L, E = q.shape
    _, Hk, S, Ek = k.shape
    Ev = v.size(3)
    if k.size(0) != B or v.size(0) != B:
        raise RuntimeError(f"{op}: batch sizes differ: q {list(q.shape)}, k {list(k.shape)}, "
                           f"v {list(v.shape)}")
    if Ek != E:
        raise RuntimeError(f"{op}: head dims differ: q has E = {E} (shape {list(q.shape)}) but k "
                           f"has E = {Ek} (shape {list(k.shape)})")
    if v.size(1) != Hk or v.size(2) != S:
        raise RuntimeError(f"{op}: expected v of shape (B, Hk, S, Ev) = ({B}, {Hk}, {S}, Ev) like "
                           f"k, got {list(v.shape)}")
    if (Hq % Hk != 0) if Hk > 0 else Hq != 0:
        raise RuntimeError(f"{op}: the number of query heads Hq = {Hq} must be a multiple of the "
                           f"number of key/value heads Hk = {Hk}")
    if E > _MAX_HEAD_DIM or Ev > _MAX_HEAD_DIM:
        raise RuntimeError(f"{op}: head dims up to {_MAX_HEAD_DIM} are supported by the Triton "
                           f"kernels, got E = {E}, Ev = {Ev}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype not in (q.dtype, torch.float32):
            raise RuntimeError(f"{op}: expected attn_mask of dtype bool, {q.dtype} or float32, "
                               f"got {attn_mask.dtype}")
        if tuple(attn_mask.shape) != (B, Hq, L, S):
            raise RuntimeError(f"{op}: expected attn_mask of shape (B, Hq, L, S) = "
                               f"{[B, Hq, L, S]} (expand a broadcastable mask first), got "
                               f"{list(attn_mask.shape)}")
        if attn_mask.device != q.device:
            raise RuntimeError(f"{op}: expected attn_mask on {q.device}, got {attn_mask.device}")
    if valid_lens is not None:
        if valid_lens.dtype != torch.int64:
            raise RuntimeError(f"{op}: expected valid_lens of dtype int64, got {valid_lens.dtype}")
        if tuple(valid_lens.shape) not in ((B,), (B, L)):
            raise RuntimeError(f"{op}: expected valid_lens of shape (B,) = {[B]} or (B, L) = "
                               f"{[B, L]}, got {list(valid_lens.shape)}")
        if valid_lens.device != q.device:
            raise RuntimeError(f"{op}: expected valid_lens on {q.device}, got "
                               f"{valid_lens.device}")
    if not (0.0 <= dropout_p < 1.0):
        raise RuntimeError(f"{op}: expected dropout_p in [0, 1), got {dropout_p}")
    return B, Hq, Hk, L, S, E, Ev


def _check_bwd(grad_out: Tensor, q: Tensor, out: Tensor, lse: Tensor, dims) -> None:
    op = "attention_bwd"
    B, Hq, Hk, L, S, E, Ev = dims
    for name, t in (("grad_out", grad_out), ("out", out)):
        if tuple(t.shape) != (B, Hq, L, Ev):
            raise RuntimeError(f"{op}: expected {name} of shape (B, Hq, L, Ev) = "
                               f"{[B, Hq, L, Ev]}, got {list(t.shape)}")
        if t.dtype != q.dtype:
            raise RuntimeError(f"{op}: expected {name} of dtype {q.dtype} (q's), got {t.dtype}")
        if t.device != q.device:
            raise RuntimeError(f"{op}: expected {name} on {q.device}, got {t.device}")
    if tuple(lse.shape) != (B, Hq, L) or lse.dtype != torch.float32:
        raise RuntimeError(f"{op}: expected lse of shape (B, Hq, L) = {[B, Hq, L]} and dtype "
                           f"float32, got {list(lse.shape)} {lse.dtype}")
    if lse.device != q.device:
        raise RuntimeError(f"{op}: expected lse on {q.device}, got {lse.device}")


def _last_contiguous(t: Tensor) -> Tensor:
    """The kernels read any strides except along the last dimension, which must be 1."""
    return t if t.stride(-1) == 1 or t.size(-1) == 1 else t.contiguous()


def _dropout_args(dropout_p: float, seed: int, offset: int) -> list:
    """seed_lo, seed_hi (int32 bit patterns of the 64-bit seed's words), offset (int64),
    threshold = ceil(dropout_p * 2^32) (exact: the header's uniform >= dropout_p), 1 / (1 - p)."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    as_i32 = lambda w: w - (1 << 32) if w >= (1 << 31) else w  # noqa: E731
    off = offset & 0xFFFFFFFFFFFFFFFF
    off = off - (1 << 64) if off >= (1 << 63) else off
    return [as_i32(s & 0xFFFFFFFF), as_i32(s >> 32), off, math.ceil(dropout_p * 2.0**32),
            1.0 / (1.0 - dropout_p)]


def _mask_args(attn_mask: Optional[Tensor], valid_lens: Optional[Tensor], q: Tensor):
    """(mask tensor, 4 strides, kind), (valid_lens tensor, 2 strides, has)."""
    if attn_mask is None:
        mask, ms, kind = q, [0, 0, 0, 0], _MASK_NONE
    elif attn_mask.dtype == torch.bool:
        mask, ms, kind = attn_mask.view(torch.uint8), list(attn_mask.stride()), _MASK_BOOL
    else:
        mask, ms, kind = attn_mask, list(attn_mask.stride()), _MASK_FLOAT
    if valid_lens is None:
        vl, vs = q, [0, 0]
    else:
        vl = valid_lens
        vs = [valid_lens.stride(0), valid_lens.stride(1) if valid_lens.dim() == 2 else 0]
    return mask, ms, kind, vl, vs


# =============================================================================================
# The ops
# =============================================================================================
# Schemas spelled out (as in csrc/ops.cpp): inferred ones would make seed and offset SymInt.
_FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? valid_lens, "
               "bool is_causal, float scale, float dropout_p, int seed, int offset) "
               "-> (Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
               "Tensor? attn_mask, Tensor? valid_lens, bool is_causal, float scale, "
               "float dropout_p, int seed, int offset, "
               "bool[4] output_mask=[True, True, True, False]) -> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("pyfastdl_triton::attention_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
                  valid_lens: Optional[Tensor], is_causal: bool, scale: float, dropout_p: float,
                  seed: int, offset: int) -> Tuple[Tensor, Tensor]:
    """Scaled dot-product attention forward (csrc/common/attention.h). q (B, Hq, L, E), k (B, Hk,
    S, E), v (B, Hk, S, Ev); attn_mask None / bool / float (B, Hq, L, S) any strides; valid_lens
    None / int64 (B,) or (B, L). Returns out (B, Hq, L, Ev) in q's dtype and lse (B, Hq, L)
    float32 (before dropout; -inf for a row with no key)."""
    dims = _check_common("attention_fwd", q, k, v, attn_mask, valid_lens, dropout_p)
    _check_launchable(q, "attention_fwd")
    B, Hq, Hk, L, S, E, Ev = dims
    out = q.new_empty((B, Hq, L, Ev))
    lse = q.new_empty((B, Hq, L), dtype=torch.float32)
    if out.numel() == 0 or S == 0:  # no key at all: every row is fully masked
        return out.zero_(), lse.fill_(float("-inf"))
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    mask, ms, kind, vl, vs = _mask_args(attn_mask, valid_lens, q)
    E_PAD, EV_PAD = _pad(E), _pad(Ev)
    BM, BN, warps = _fwd_blocks(max(E_PAD, EV_PAD), q.element_size())
    n_m = triton.cdiv(L, BM)
    if E == 0:  # scores are 0 (an empty dot), whatever the scale (torch's 1 / sqrt(0) is inf)
        scale = 0.0
    with _device_guard(q):
        bad = _nonfinite_heads(is_causal, k, v)
        _attention_fwd_kernel[(n_m * B * Hq,)](
            q, k, v, out, lse, mask, vl, bad,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *ms, *vs,
            Hq, L, S, E, Ev, Hq // Hk, n_m, scale, *_dropout_args(dropout_p, seed, offset),
            BLOCK_M=BM, BLOCK_N=BN, E_PAD=E_PAD, EV_PAD=EV_PAD, MASK_KIND=kind,
            IS_CAUSAL=bool(is_causal), HAS_VL=valid_lens is not None, HAS_DROPOUT=dropout_p > 0,
            DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
            DOT_UPCAST=_INTERPRETED and q.dtype == torch.bfloat16, num_warps=warps, num_stages=2)
    return out, lse


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed,
                        offset):
    _check_common("attention_fwd", q, k, v, attn_mask, valid_lens, dropout_p)
    return attention_fwd_shapes(q, v)  # one shape rule for the C++ and the Triton op


@torch.library.custom_op("pyfastdl_triton::attention_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  attn_mask: Optional[Tensor], valid_lens: Optional[Tensor], is_causal: bool,
                  scale: float, dropout_p: float, seed: int, offset: int,
                  output_mask: Sequence[bool] = (True, True, True, False)
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scaled dot-product attention backward (csrc/common/attention.h): P recomputed from lse,
    the dropout mask regenerated from (seed, offset). grad_out, out (B, Hq, L, Ev) in q's dtype,
    lse (B, Hq, L) float32. output_mask: which of grad_q, grad_k, grad_v, grad_attn_mask to
    compute (the others come back as empty (0,) tensors). Returns grad_q, grad_k, grad_v
    (contiguous, the shapes and dtype of q, k, v; grad_k, grad_v summed over each GQA group) and
    grad_attn_mask (B, Hq, L, S) in attn_mask's dtype: dS, the gradient of a float mask."""
    dims = _check_common("attention_bwd", q, k, v, attn_mask, valid_lens, dropout_p)
    _check_bwd(grad_out, q, out, lse, dims)
    _check_output_mask(attn_mask, output_mask)
    _check_launchable(q, "attention_bwd")
    B, Hq, Hk, L, S, E, Ev = dims
    need_dq, need_dk, need_dv, need_dm = (bool(x) for x in output_mask)
    dq = q.new_zeros((B, Hq, L, E)) if need_dq else q.new_empty((0,))
    dk = k.new_zeros((B, Hk, S, E)) if need_dk else q.new_empty((0,))
    dv = v.new_zeros((B, Hk, S, Ev)) if need_dv else q.new_empty((0,))
    dm = q.new_zeros((B, Hq, L, S), dtype=attn_mask.dtype) if need_dm else q.new_empty((0,))
    if L == 0 or S == 0 or B * Hq == 0 or Ev == 0 or not any(output_mask):
        return dq, dk, dv, dm
    q, k, v = _last_contiguous(q), _last_contiguous(k), _last_contiguous(v)
    do, out = _last_contiguous(grad_out), _last_contiguous(out)
    lse = lse.contiguous()
    mask, ms, kind, vl, vs = _mask_args(attn_mask, valid_lens, q)
    E_PAD, EV_PAD = _pad(E), _pad(Ev)
    BM, BN, warps = _bwd_blocks(max(E_PAD, EV_PAD), q.element_size())
    drop = _dropout_args(dropout_p, seed, offset)
    if E == 0:  # scores are 0 whatever the scale (see attention_fwd)
        scale = 0.0
    meta = dict(BLOCK_M=BM, BLOCK_N=BN, E_PAD=E_PAD, EV_PAD=EV_PAD, MASK_KIND=kind,
                IS_CAUSAL=bool(is_causal), HAS_VL=valid_lens is not None,
                HAS_DROPOUT=dropout_p > 0,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
                DOT_UPCAST=_INTERPRETED and q.dtype == torch.bfloat16, num_warps=warps,
                num_stages=1)
    strides = [q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
               *ms, *vs]
    n_m, n_n = triton.cdiv(L, BM), triton.cdiv(S, BN)
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=q.device)
    with _device_guard(q):
        _attention_bwd_delta_kernel[(n_m * B * Hq,)](
            do, out, delta, do.stride(0), do.stride(1), do.stride(2),
            out.stride(0), out.stride(1), out.stride(2), Hq, L, Ev, n_m,
            BLOCK_M=BM, EV_PAD=EV_PAD, num_warps=4)
        bad = _nonfinite_heads(is_causal, k, v, q, delta, lse)
        if need_dk or need_dv:
            _attention_bwd_dkdv_kernel[(n_n * B * Hk,)](
                q, k, v, do, lse, delta, dk, dv, mask, vl, bad, *strides,
                Hq, Hk, L, S, E, Ev, Hq // Hk, n_n, scale, *drop, NEED_DK=need_dk,
                NEED_DV=need_dv, **meta)
        if need_dq or need_dm:
            _attention_bwd_dq_kernel[(n_m * B * Hq,)](
                q, k, v, do, lse, delta, dq, dm, mask, vl, bad, *strides,
                Hq, L, S, E, Ev, Hq // Hk, n_m, scale, *drop, NEED_DQ=need_dq,
                NEED_DMASK=need_dm, **meta)
    return dq, dk, dv, dm


@attention_bwd.register_fake
def _attention_bwd_fake(grad_out, q, k, v, out, lse, attn_mask, valid_lens, is_causal, scale,
                        dropout_p, seed, offset, output_mask=(True, True, True, False)):
    dims = _check_common("attention_bwd", q, k, v, attn_mask, valid_lens, dropout_p)
    _check_bwd(grad_out, q, out, lse, dims)
    _check_output_mask(attn_mask, output_mask)
    return attention_bwd_shapes(q, k, v, attn_mask, output_mask)  # one shape rule for both ops


def _check_output_mask(attn_mask: Optional[Tensor], output_mask: Sequence[bool]) -> None:
    if len(output_mask) != 4:
        raise RuntimeError(f"attention_bwd: expected output_mask of 4 bools, got {list(output_mask)}")
    if output_mask[3] and (attn_mask is None or not attn_mask.is_floating_point()):
        raise RuntimeError("attention_bwd: output_mask[3] asks for the gradient of attn_mask, which "
                           "needs a floating-point attn_mask, got "
                           f"{None if attn_mask is None else attn_mask.dtype}")


def _nonfinite_heads(is_causal: bool, k: Tensor, v: Tensor, q: Optional[Tensor] = None,
                     delta: Optional[Tensor] = None, lse: Optional[Tensor] = None) -> Tensor:
    """(B, Hk) int8 flags, read by the kernels only when is_causal: 1 where the key/value head's
    K or V -- and, for the backward, the Q, delta (not finite when dO or out is not) or lse (NaN
    or +inf) of its query heads -- holds a non-finite value. There the causal skip is off, so the
    NaN and Inf reach every row as in torch. Device-side torch ops, no host sync."""
    B, Hk = k.shape[0], k.shape[1]
    if not is_causal:
        return torch.zeros((1,), dtype=torch.int8, device=k.device)
    bad = ~(torch.isfinite(k).flatten(2).all(-1) & torch.isfinite(v).flatten(2).all(-1))
    if q is not None:
        G = q.shape[1] // Hk
        qb = ~torch.isfinite(q).flatten(2).all(-1)
        qb = qb | ~torch.isfinite(delta).all(-1) | (torch.isnan(lse) | torch.isposinf(lse)).any(-1)
        bad = bad | qb.reshape(B, Hk, G).any(-1)
    return bad.to(torch.int8).contiguous()


# =============================================================================================
# The dropout mask with torch integer ops (tests, references): the kernels' Philox, on the host
# =============================================================================================
def _mulhilo32(a: Tensor, m: int) -> Tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of a * m for int64 tensors a in [0, 2^32), m < 2^32, without
    overflowing int64 (16-bit halves of a)."""
    p0 = (a & 0xFFFF) * m  # < 2^48
    p1 = (a >> 16) * m  # < 2^48
    t = (p0 >> 16) + p1  # a * m = t * 2^16 + (p0 & 0xFFFF)
    lo = ((t & 0xFFFF) << 16) | (p0 & 0xFFFF)
    return t >> 16, lo


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int,
                  k1: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 (Random123) on int64 tensors holding uint32 counter words and a key
    (k0, k1) of two uint32 words; returns the four output words as int64 tensors."""
    M = 0xFFFFFFFF
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_W0) & M, (k1 + _PHILOX_W1) & M
    return c0, c1, c2, c3


def philox_keep_mask(seed: int, offset: int, B: int, H: int, L: int, S: int, p: float,
                     device=None) -> Tensor:
    """The dropout keep mask (B, H, L, S) bool of the attention ops (csrc/common/attention.h):
    keep (b, h, i, j) when the first Philox-4x32-10 word of key = seed, counter = (lo, hi, 0, 0)
    of offset + ((b * H + h) * L + i) * S + j, times 2^-32, is >= p. H is the number of query
    heads."""
    n = B * H * L * S
    lin = torch.arange(n, dtype=torch.int64, device=device)
    off = offset & 0xFFFFFFFFFFFFFFFF
    # (offset + lin) mod 2^64 as two 32-bit words, without int64 overflow
    lo = (lin & 0xFFFFFFFF) + (off & 0xFFFFFFFF)
    hi = ((lin >> 32) + (off >> 32) + (lo >> 32)) & 0xFFFFFFFF
    lo = lo & 0xFFFFFFFF
    zero = torch.zeros_like(lo)
    s = seed & 0xFFFFFFFFFFFFFFFF
    r0, _, _, _ = philox4x32_10(lo, hi, zero, zero.clone(), s & 0xFFFFFFFF, s >> 32)
    return (r0 >= math.ceil(p * 2.0**32)).reshape(B, H, L, S)


__all__ = ["attention_fwd", "attention_bwd", "philox_keep_mask", "philox4x32_10"]
