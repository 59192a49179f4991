"""LSTM and GRU cells and whole single-layer sequences, forward and backward, in Triton.

Registers eight ops with the schemas of ``csrc/ops.cpp`` (section "LSTM and GRU") in the namespace
``pyfastdl_triton``: ``lstm_cell_fwd/bwd``, ``gru_cell_fwd/bwd``, ``lstm_seq_fwd/bwd``,
``gru_seq_fwd/bwd``. Shape rules: ``pyfastdl/autograd/rnn.py`` (one rule per op, shared with the
C++ ops).

The math (torch's gate order and formulas), for one step with previous state (h, c)::

    LSTM  (i, f, g, o) = (sig, sig, tanh, sig)(x W_ih^T + b_ih + h W_hh^T + b_hh)
          c' = f * c + i * g,  h' = o * tanh(c')
    GRU   r, z = sig(x W_i{r,z}^T + b_i{r,z} + h W_h{r,z}^T + b_h{r,z})
          hn = h W_hn^T + b_hn,  n = tanh(x W_in^T + b_in + r * hn),  h' = n + z * (h - n)

Packed layout (PackedSequence's): step t is the batch_sizes[t] rows starting at sum(batch_sizes[:t])
of input / output; batch_sizes is a non-increasing CPU int64 tensor. The steps run in processing
order s_0, s_1, ... (s_k = k, or T - 1 - k when reverse). Row b of step s_k continues from step
s_{k-1} when b < n_a(k) = min(bs[s_k], bs[s_{k-1}]) (n_a(0) = 0), else it starts from h0[b] (c0[b]);
its state after step s_k is final (hy, cy) when b >= n_a(k + 1). The cells are the same machinery
with one step of batch_sizes [B].

Kernels (per step, launch order):

    forward   x W_ih^T for all steps: one torch.mm before the loop (the input dtype; cuBLAS / BLAS)
              _lstm_fwd_step_kernel / _gru_fwd_step_kernel, grid (row blocks, hidden blocks): the
              recurrent product h_prev @ W_hh^T of a [BLOCK_M rows, BLOCK_H units] tile for all 4
              (3) gates of those units with tl.dot, then the biases, the gate math, c' and h', in
              the same program; writes output, hy (cy) of finishing rows, the saved gates and cs
              (LSTM) or ws = (r, z, n, hn) (GRU). The LSTM's c is carried from step to step in a
              float32 buffer (B, H) (cs is only the saved, rounded copy).
    backward  _lstm_bwd_step_kernel / _gru_bwd_step_kernel, processing order reversed: the
              recurrent gradient of the step processed after (dgates_next @ W_hh, tl.dot over 4H
              (3H)), plus grad_output, grad_hy (grad_cy) of finishing rows, then the pointwise
              backward -> dgates of this step (LSTM (N, 4H); GRU: d(x W_ih^T) and d(h W_hh^T),
              both (N, 3H)); the cell gradient (LSTM) and the direct h gradient z * dh (GRU) are
              carried in a float32 buffer (B, H)
              after the loop, as single GEMMs over all steps (torch.mm): grad_input = dG_x W_ih,
              grad_w_ih = dG_x^T x, grad_w_hh = dG_h^T h_prev (h_prev gathered once),
              grad_h0 = (dG_h of each row's first step) W_hh (+ the carried part), biases = sums.

Numerics: tile products and the gate math in float32 (float64 for float64 input); x W_ih^T, the
saved tensors, output and the GEMM operands (dgates) in the input dtype, as cuDNN does; the dots run
in IEEE float32 for float32 (no tf32), so the interpreter and the GPU agree. NaN propagates (sigmoid
and tanh of NaN are NaN). dtypes: float32, float16, bfloat16 (and float64: the interpreter runs it,
for gradcheck). Offsets are int32: N * 4H, B * H < 2**31 (checked).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..autograd.rnn import (gru_cell_bwd_shapes, gru_cell_fwd_shapes, gru_seq_bwd_shapes, gru_seq_fwd_shapes,
                            lstm_cell_bwd_shapes, lstm_cell_fwd_shapes, lstm_seq_bwd_shapes, lstm_seq_fwd_shapes)
from ._common import INTERPRETED as _INTERPRETED, device_guard as _device_guard

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INT32_MAX = 2**31 - 1
_MIN_DOT = 16  # tl.dot needs every tile dimension >= 16


# =============================================================================================
# Device helpers
# =============================================================================================
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x, SMALL: tl.constexpr):
    """tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|), and its odd Taylor series below |x| <
    SMALL, where 1 - e cancels (SMALL = 0.25 in float32: series error 9e-9; 0.02 in float64: 1e-19).
    NaN gives NaN, +-inf gives +-1."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -t, t)
    xs = tl.where(a < SMALL, x, 0.0)  # the series only where it is used (no overflow warnings)
    x2 = xs * xs
    p = xs * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    return tl.where(a < SMALL, p, big)


@triton.jit
def _dot(a, b, ACC: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """a @ b accumulated in ACC. DOT_UPCAST (bfloat16 under the interpreter, whose bfloat16 tl.dot
    is wrong in Triton 3.8) multiplies the same bfloat16 values in float32 instead; float64 runs in
    float64."""
    if DOT_UPCAST:
        return tl.dot(a.to(ACC), b.to(ACC), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC, out_dtype=ACC)


@triton.jit
def _load_prev_tile(src_ptr, prev_off, h0_ptr, rm, kk, bt, n_a, H):
    """[BM, BK] tile of the previous hidden state, columns kk: rows < n_a from the previous step's
    output (rows prev_off + b of src), the others from h0 (row b)."""
    from_prev = rm < n_a
    k_mask = kk < H
    a = tl.load(src_ptr + (prev_off + rm)[:, None] * H + kk[None, :],
                mask=from_prev[:, None] & k_mask[None, :], other=0.0)
    b = tl.load(h0_ptr + rm[:, None] * H + kk[None, :],
                mask=((~from_prev) & (rm < bt))[:, None] & k_mask[None, :], other=0.0)
    return tl.where(from_prev[:, None], a, b)


@triton.jit
def _load_prev(src_ptr, prev_off, h0_ptr, rm, rh, bt, n_a, H, ACC: tl.constexpr):
    """[BM, BH] tile (ACC) of a previous state (h or c), as _load_prev_tile."""
    return _load_prev_tile(src_ptr, prev_off, h0_ptr, rm, rh, bt, n_a, H).to(ACC)


@triton.jit
def _bias(b_ptr, idx, mask, HAS: tl.constexpr, ACC: tl.constexpr):
    if HAS:
        return tl.load(b_ptr + idx, mask=mask, other=0.0).to(ACC)[None, :]
    else:
        return 0.0


@triton.jit
def _dh_from_next(dgn_ptr, whh_ptr, next_off, rm, rh, has_next, h_mask, G: tl.constexpr, H, K_NEXT,
                  ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """[BM, BH] tile of dgates_next @ W_hh[:, rh]: the recurrent gradient that flows into this step's
    h from the step processed after it (rows < n_next; K_NEXT = G * H, or 0 without such a step)."""
    rk = tl.arange(0, BLOCK_K)
    dh = tl.zeros([BLOCK_M, BLOCK_H], ACC)
    for k0 in range(0, K_NEXT, BLOCK_K):
        kk = k0 + rk
        k_mask = kk < K_NEXT
        a = tl.load(dgn_ptr + (next_off + rm)[:, None] * (G * H) + kk[None, :],
                    mask=has_next[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(whh_ptr + kk[:, None] * H + rh[None, :], mask=k_mask[:, None] & h_mask[None, :], other=0.0)
        dh += _dot(a, w, ACC, DOT_PREC, DOT_UPCAST)
    return dh


# =============================================================================================
# LSTM
# =============================================================================================
@triton.jit
def _lstm_fwd_step_kernel(
    xw_ptr,  # (N, 4H) input dtype: x W_ih^T of every step (no bias)
    b_ih_ptr, b_hh_ptr,  # (4H,) or dummies (HAS_BIAS_*)
    hsrc_ptr,  # (N, H): output so far; the previous step's rows start at prev_off
    h0_ptr, c0_ptr,  # (B, H)
    ccarry_ptr,  # (B, H) ACC: each row's c after its previous step; overwritten with this step's
    whh_ptr,  # (4H, H)
    out_ptr, cs_ptr, gates_ptr,  # (N, H), (N, H), (N, 4H): this step's rows start at row_off
    hy_ptr, cy_ptr,  # (B, H): rows >= fin_lo are final after this step
    row_off, prev_off, bt, n_a, fin_lo, H,
    ACC: tl.constexpr, HAS_BIAS_IH: tl.constexpr, HAS_BIAS_HH: tl.constexpr, SMALL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < bt
    h_mask = rh < H
    # Recurrent product h_prev @ W_hh^T for the 4 gates of units rh (rows g * H + rh of W_hh).
    acc_i = tl.zeros([BLOCK_M, BLOCK_H], ACC)
    acc_f = tl.zeros([BLOCK_M, BLOCK_H], ACC)
    acc_g = tl.zeros([BLOCK_M, BLOCK_H], ACC)
    acc_o = tl.zeros([BLOCK_M, BLOCK_H], ACC)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + rk
        hp = _load_prev_tile(hsrc_ptr, prev_off, h0_ptr, rm, kk, bt, n_a, H)  # [BM, BK]
        w_off = rh[None, :] * H + kk[:, None]  # [BK, BH]: W_hh[g * H + rh, kk]^T
        w_mask = h_mask[None, :] & (kk < H)[:, None]
        acc_i += _dot(hp, tl.load(whh_ptr + w_off, mask=w_mask, other=0.0), ACC, DOT_PREC, DOT_UPCAST)
        acc_f += _dot(hp, tl.load(whh_ptr + H * H + w_off, mask=w_mask, other=0.0), ACC, DOT_PREC, DOT_UPCAST)
        acc_g += _dot(hp, tl.load(whh_ptr + 2 * H * H + w_off, mask=w_mask, other=0.0), ACC, DOT_PREC,
                      DOT_UPCAST)
        acc_o += _dot(hp, tl.load(whh_ptr + 3 * H * H + w_off, mask=w_mask, other=0.0), ACC, DOT_PREC,
                      DOT_UPCAST)
    # Pointwise: biases, gates, c', h'.
    mask = m_mask[:, None] & h_mask[None, :]
    H4 = 4 * H
    xrow = (row_off + rm)[:, None] * H4 + rh[None, :]
    pre_i = acc_i + tl.load(xw_ptr + xrow, mask=mask, other=0.0).to(ACC)
    pre_f = acc_f + tl.load(xw_ptr + xrow + H, mask=mask, other=0.0).to(ACC)
    pre_g = acc_g + tl.load(xw_ptr + xrow + 2 * H, mask=mask, other=0.0).to(ACC)
    pre_o = acc_o + tl.load(xw_ptr + xrow + 3 * H, mask=mask, other=0.0).to(ACC)
    pre_i += _bias(b_ih_ptr, rh, h_mask, HAS_BIAS_IH, ACC) + _bias(b_hh_ptr, rh, h_mask, HAS_BIAS_HH, ACC)
    pre_f += _bias(b_ih_ptr, H + rh, h_mask, HAS_BIAS_IH, ACC) + _bias(b_hh_ptr, H + rh, h_mask, HAS_BIAS_HH, ACC)
    pre_g += (_bias(b_ih_ptr, 2 * H + rh, h_mask, HAS_BIAS_IH, ACC)
              + _bias(b_hh_ptr, 2 * H + rh, h_mask, HAS_BIAS_HH, ACC))
    pre_o += (_bias(b_ih_ptr, 3 * H + rh, h_mask, HAS_BIAS_IH, ACC)
              + _bias(b_hh_ptr, 3 * H + rh, h_mask, HAS_BIAS_HH, ACC))
    i = _sigmoid(pre_i)
    f = _sigmoid(pre_f)
    g = _tanh(pre_g, SMALL)
    o = _sigmoid(pre_o)
    bh = rm[:, None] * H + rh[None, :]
    from_prev = (rm < n_a)[:, None]
    c_prev = tl.where(from_prev, tl.load(ccarry_ptr + bh, mask=mask & from_prev, other=0.0),
                      tl.load(c0_ptr + bh, mask=mask & ~from_prev, other=0.0).to(ACC))
    c = f * c_prev + i * g
    h = o * _tanh(c, SMALL)
    tl.store(ccarry_ptr + bh, c, mask=mask)
    orow = (row_off + rm)[:, None] * H + rh[None, :]
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + orow, h.to(ty), mask=mask)
    tl.store(cs_ptr + orow, c.to(ty), mask=mask)
    tl.store(gates_ptr + xrow, i.to(ty), mask=mask)
    tl.store(gates_ptr + xrow + H, f.to(ty), mask=mask)
    tl.store(gates_ptr + xrow + 2 * H, g.to(ty), mask=mask)
    tl.store(gates_ptr + xrow + 3 * H, o.to(ty), mask=mask)
    fin = mask & (rm >= fin_lo)[:, None]
    tl.store(hy_ptr + bh, h.to(ty), mask=fin)
    tl.store(cy_ptr + bh, c.to(ty), mask=fin)


@triton.jit
def _lstm_bwd_step_kernel(
    dgn_ptr,  # (N, 4H) input dtype: dgates; the next-processed step's rows start at next_off
    whh_ptr,  # (4H, H)
    gout_ptr,  # (N, H) grad_output or dummy (HAS_GOUT)
    ghy_ptr, gcy_ptr,  # (B, H) or dummies (HAS_GHY, HAS_GCY)
    dccarry_ptr,  # (B, H) ACC: dL/dc of each row's state after this step (rows < n_next); overwritten
    gates_ptr, cs_ptr, c0_ptr,  # (N, 4H), (N, H), (B, H)
    dg_ptr,  # (N, 4H) out: dgates of this step (pre-activation gradients)
    gc0_ptr,  # (B, H) ACC out: grad_c0 of rows >= n_a
    row_off, next_off, prev_off, bt, n_next, n_a, H, K_NEXT,  # K_NEXT = 4H, or 0 without a next step
    ACC: tl.constexpr, HAS_GOUT: tl.constexpr, HAS_GHY: tl.constexpr, HAS_GCY: tl.constexpr,
    SMALL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_mask = rm < bt
    h_mask = rh < H
    mask = m_mask[:, None] & h_mask[None, :]
    has_next = rm < n_next
    dh = _dh_from_next(dgn_ptr, whh_ptr, next_off, rm, rh, has_next, h_mask, 4, H, K_NEXT, ACC, BLOCK_M, BLOCK_H,
                       BLOCK_K, DOT_PREC, DOT_UPCAST)
    bh = rm[:, None] * H + rh[None, :]
    orow = (row_off + rm)[:, None] * H + rh[None, :]
    nxt = has_next[:, None]
    if HAS_GOUT:
        dh += tl.load(gout_ptr + orow, mask=mask, other=0.0).to(ACC)
    if HAS_GHY:
        dh += tl.load(ghy_ptr + bh, mask=mask & ~nxt, other=0.0).to(ACC)
    dc = tl.load(dccarry_ptr + bh, mask=mask & nxt, other=0.0)
    if HAS_GCY:
        dc += tl.load(gcy_ptr + bh, mask=mask & ~nxt, other=0.0).to(ACC)
    grow = (row_off + rm)[:, None] * (4 * H) + rh[None, :]
    i = tl.load(gates_ptr + grow, mask=mask, other=0.0).to(ACC)
    f = tl.load(gates_ptr + grow + H, mask=mask, other=0.0).to(ACC)
    g = tl.load(gates_ptr + grow + 2 * H, mask=mask, other=0.0).to(ACC)
    o = tl.load(gates_ptr + grow + 3 * H, mask=mask, other=0.0).to(ACC)
    tc = _tanh(tl.load(cs_ptr + orow, mask=mask, other=0.0).to(ACC), SMALL)
    c_prev = _load_prev(cs_ptr, prev_off, c0_ptr, rm, rh, bt, n_a, H, ACC)
    dc = dc + dh * o * (1.0 - tc * tc)
    ty = dg_ptr.dtype.element_ty
    tl.store(dg_ptr + grow, (dc * g * i * (1.0 - i)).to(ty), mask=mask)
    tl.store(dg_ptr + grow + H, (dc * c_prev * f * (1.0 - f)).to(ty), mask=mask)
    tl.store(dg_ptr + grow + 2 * H, (dc * i * (1.0 - g * g)).to(ty), mask=mask)
    tl.store(dg_ptr + grow + 3 * H, (dh * tc * o * (1.0 - o)).to(ty), mask=mask)
    dc_prev = dc * f
    prev = (rm < n_a)[:, None]
    tl.store(dccarry_ptr + bh, dc_prev, mask=mask & prev)
    tl.store(gc0_ptr + bh, dc_prev, mask=mask & ~prev)


# =============================================================================================
# GRU
# =============================================================================================
@triton.jit
def _gru_fwd_step_kernel(
    xw_ptr,  # (N, 3H) input dtype: x W_ih^T (no bias)
    b_ih_ptr, b_hh_ptr,  # (3H,) or dummies
    hsrc_ptr, h0_ptr,  # (N, H) output so far (previous step at prev_off), (B, H)
    whh_ptr,  # (3H, H)
    out_ptr, ws_ptr,  # (N, H), (N, 4H) = (r, z, n, hn)
    hy_ptr,  # (B, H): rows >= fin_lo
    row_off, prev_off, bt, n_a, fin_lo, H,
    ACC: tl.constexpr, HAS_BIAS_IH: tl.constexpr, HAS_BIAS_HH: tl.constexpr, SMALL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < bt
    h_mask = rh < H
    acc_r = tl.zeros([BLOCK_M, BLOCK_H], ACC)
    acc_z = tl.zeros([BLOCK_M, BLOCK_H], ACC)
    acc_n = tl.zeros([BLOCK_M, BLOCK_H], ACC)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + rk
        hp = _load_prev_tile(hsrc_ptr, prev_off, h0_ptr, rm, kk, bt, n_a, H)
        w_off = rh[None, :] * H + kk[:, None]
        w_mask = h_mask[None, :] & (kk < H)[:, None]
        acc_r += _dot(hp, tl.load(whh_ptr + w_off, mask=w_mask, other=0.0), ACC, DOT_PREC, DOT_UPCAST)
        acc_z += _dot(hp, tl.load(whh_ptr + H * H + w_off, mask=w_mask, other=0.0), ACC, DOT_PREC, DOT_UPCAST)
        acc_n += _dot(hp, tl.load(whh_ptr + 2 * H * H + w_off, mask=w_mask, other=0.0), ACC, DOT_PREC,
                      DOT_UPCAST)
    mask = m_mask[:, None] & h_mask[None, :]
    H3 = 3 * H
    xrow = (row_off + rm)[:, None] * H3 + rh[None, :]
    pre_r = acc_r + tl.load(xw_ptr + xrow, mask=mask, other=0.0).to(ACC)
    pre_z = acc_z + tl.load(xw_ptr + xrow + H, mask=mask, other=0.0).to(ACC)
    xn = tl.load(xw_ptr + xrow + 2 * H, mask=mask, other=0.0).to(ACC)
    pre_r += _bias(b_ih_ptr, rh, h_mask, HAS_BIAS_IH, ACC) + _bias(b_hh_ptr, rh, h_mask, HAS_BIAS_HH, ACC)
    pre_z += _bias(b_ih_ptr, H + rh, h_mask, HAS_BIAS_IH, ACC) + _bias(b_hh_ptr, H + rh, h_mask, HAS_BIAS_HH, ACC)
    xn += _bias(b_ih_ptr, 2 * H + rh, h_mask, HAS_BIAS_IH, ACC)
    hn = acc_n + _bias(b_hh_ptr, 2 * H + rh, h_mask, HAS_BIAS_HH, ACC)
    r = _sigmoid(pre_r)
    z = _sigmoid(pre_z)
    n = _tanh(xn + r * hn, SMALL)
    h_prev = _load_prev(hsrc_ptr, prev_off, h0_ptr, rm, rh, bt, n_a, H, ACC)
    h = n + z * (h_prev - n)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + (row_off + rm)[:, None] * H + rh[None, :], h.to(ty), mask=mask)
    wrow = (row_off + rm)[:, None] * (4 * H) + rh[None, :]
    tl.store(ws_ptr + wrow, r.to(ty), mask=mask)
    tl.store(ws_ptr + wrow + H, z.to(ty), mask=mask)
    tl.store(ws_ptr + wrow + 2 * H, n.to(ty), mask=mask)
    tl.store(ws_ptr + wrow + 3 * H, hn.to(ty), mask=mask)
    tl.store(hy_ptr + rm[:, None] * H + rh[None, :], h.to(ty), mask=mask & (rm >= fin_lo)[:, None])


@triton.jit
def _gru_bwd_step_kernel(
    dgn_ptr,  # (N, 3H) input dtype: d(h W_hh^T + b_hh) per step; the next-processed step at next_off
    whh_ptr,  # (3H, H)
    gout_ptr, ghy_ptr,  # (N, H), (B, H) or dummies
    dhcarry_ptr,  # (B, H) ACC: the direct part z * dh' of each row's next-processed step; overwritten
    ws_ptr, hsrc_ptr, h0_ptr,  # (N, 4H), (N, H) output, (B, H)
    dgh_ptr, dgx_ptr,  # (N, 3H) out: d(h W_hh^T + b_hh), d(x W_ih^T + b_ih) of this step
    gh0_ptr,  # (B, H) ACC out: the direct part of grad_h0 for rows >= n_a
    row_off, next_off, prev_off, bt, n_next, n_a, H, K_NEXT,  # K_NEXT = 3H, or 0 without a next step
    ACC: tl.constexpr, HAS_GOUT: tl.constexpr, HAS_GHY: tl.constexpr, SMALL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    m_mask = rm < bt
    h_mask = rh < H
    mask = m_mask[:, None] & h_mask[None, :]
    has_next = rm < n_next
    dh = _dh_from_next(dgn_ptr, whh_ptr, next_off, rm, rh, has_next, h_mask, 3, H, K_NEXT, ACC, BLOCK_M, BLOCK_H,
                       BLOCK_K, DOT_PREC, DOT_UPCAST)
    bh = rm[:, None] * H + rh[None, :]
    orow = (row_off + rm)[:, None] * H + rh[None, :]
    nxt = has_next[:, None]
    dh += tl.load(dhcarry_ptr + bh, mask=mask & nxt, other=0.0)
    if HAS_GOUT:
        dh += tl.load(gout_ptr + orow, mask=mask, other=0.0).to(ACC)
    if HAS_GHY:
        dh += tl.load(ghy_ptr + bh, mask=mask & ~nxt, other=0.0).to(ACC)
    wrow = (row_off + rm)[:, None] * (4 * H) + rh[None, :]
    r = tl.load(ws_ptr + wrow, mask=mask, other=0.0).to(ACC)
    z = tl.load(ws_ptr + wrow + H, mask=mask, other=0.0).to(ACC)
    n = tl.load(ws_ptr + wrow + 2 * H, mask=mask, other=0.0).to(ACC)
    hn = tl.load(ws_ptr + wrow + 3 * H, mask=mask, other=0.0).to(ACC)
    h_prev = _load_prev(hsrc_ptr, prev_off, h0_ptr, rm, rh, bt, n_a, H, ACC)
    da_n = dh * (1.0 - z) * (1.0 - n * n)
    da_r = da_n * hn * r * (1.0 - r)
    da_z = dh * (h_prev - n) * z * (1.0 - z)
    ty = dgh_ptr.dtype.element_ty
    grow = (row_off + rm)[:, None] * (3 * H) + rh[None, :]
    tl.store(dgh_ptr + grow, da_r.to(ty), mask=mask)
    tl.store(dgh_ptr + grow + H, da_z.to(ty), mask=mask)
    tl.store(dgh_ptr + grow + 2 * H, (da_n * r).to(ty), mask=mask)
    tl.store(dgx_ptr + grow, da_r.to(ty), mask=mask)
    tl.store(dgx_ptr + grow + H, da_z.to(ty), mask=mask)
    tl.store(dgx_ptr + grow + 2 * H, da_n.to(ty), mask=mask)
    direct = dh * z
    prev = (rm < n_a)[:, None]
    tl.store(dhcarry_ptr + bh, direct, mask=mask & prev)
    tl.store(gh0_ptr + bh, direct, mask=mask & ~prev)


# =============================================================================================
# Host side: checks, the step schedule, the loops
# =============================================================================================
def _check_launchable(t: Tensor, op: str) -> None:
    """Triton runs on CUDA tensors; CPU tensors only under the interpreter."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and _INTERPRETED):
        return
    raise RuntimeError(
        f"{op} (triton): input on {t.device} cannot be run by the Triton kernels: they need CUDA "
        f"tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported")


def _check_tensor(op: str, name: str, t: Optional[Tensor], ref: Tensor, shape: Optional[Sequence[int]],
                  what: str = "") -> None:
    if t is None:
        return
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"{op}: expected {name} of shape {what}{list(shape)}, got {list(t.shape)}")
    if t.dtype != ref.dtype:
        raise RuntimeError(f"{op}: expected {name} of dtype {ref.dtype} (input's), got {t.dtype}")
    if t.device != ref.device:
        raise RuntimeError(f"{op}: expected {name} on {ref.device} (input's device), got {t.device}")


def _check_weights(op: str, input: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                   b_hh: Optional[Tensor], G: int) -> Tuple[int, int]:
    """input (rows, I), w_ih (G*H, I), w_hh (G*H, H), biases (G*H,); returns (I, H)."""
    if input.dim() != 2:
        raise RuntimeError(f"{op}: expected input of 2 dimensions (rows, input_size), got shape {list(input.shape)}")
    if input.dtype not in _DTYPES:
        raise RuntimeError(f"{op}: expected input of dtype float32, float16 or bfloat16 (Triton kernels; float64 "
                           f"under the interpreter), got {input.dtype}")
    if w_hh.dim() != 2 or w_hh.size(0) % G != 0 or w_hh.size(0) != G * w_hh.size(1):
        raise RuntimeError(f"{op}: expected w_hh of shape ({G} * hidden_size, hidden_size), got {list(w_hh.shape)}")
    H = w_hh.size(1)
    I = input.size(1)
    _check_tensor(op, "w_ih", w_ih, input, (G * H, I), f"({G} * hidden_size, input_size) = ")
    _check_tensor(op, "w_hh", w_hh, input, None)
    _check_tensor(op, "b_ih", b_ih, input, (G * H,), f"({G} * hidden_size,) = ")
    _check_tensor(op, "b_hh", b_hh, input, (G * H,), f"({G} * hidden_size,) = ")
    return I, H


def _check_batch_sizes(op: str, batch_sizes: Tensor, N: int) -> List[int]:
    if batch_sizes.device.type != "cpu" or batch_sizes.dtype != torch.int64 or batch_sizes.dim() != 1:
        raise RuntimeError(f"{op}: expected batch_sizes to be a 1-D int64 CPU tensor, got "
                           f"{batch_sizes.dtype} of shape {list(batch_sizes.shape)} on {batch_sizes.device}")
    sizes = batch_sizes.tolist()
    if any(b < 0 for b in sizes) or any(a < b for a, b in zip(sizes, sizes[1:])):
        raise RuntimeError(f"{op}: expected batch_sizes non-negative and non-increasing, got {sizes}")
    if sum(sizes) != N:
        raise RuntimeError(f"{op}: expected input of sum(batch_sizes) = {sum(sizes)} rows, got {N}")
    return sizes


def _check_seq(op: str, input: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Optional[Tensor], w_ih: Tensor,
               w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor], G: int,
               need_sizes: bool = True) -> Tuple[List[int], int, int]:
    """Checks of the sequence ops; returns (batch sizes, B, H)."""
    I, H = _check_weights(op, input, w_ih, w_hh, b_ih, b_hh, G)
    sizes = _check_batch_sizes(op, batch_sizes, input.size(0)) if need_sizes else []
    if h0.dim() != 2:
        raise RuntimeError(f"{op}: expected h0 of shape (batch, hidden_size), got {list(h0.shape)}")
    B = sizes[0] if sizes else h0.size(0)
    _check_tensor(op, "h0", h0, input, (B, H), "(batch_sizes[0], hidden_size) = ")
    _check_tensor(op, "c0", c0, input, (B, H), "(batch_sizes[0], hidden_size) = ")
    _check_limits(op, input.size(0), B, H, G)
    return sizes, B, H


def _check_limits(op: str, N: int, B: int, H: int, G: int) -> None:
    if max(N, B) * max(4, G) * max(H, 1) > _INT32_MAX:
        raise RuntimeError(f"{op}: the Triton kernels index with int32: rows * 4 * hidden_size must stay below 2**31, "
                           f"got {max(N, B)} rows and hidden_size {H}")


def _check_output_mask(op: str, output_mask: Sequence[bool]) -> List[bool]:
    if len(output_mask) != 6:
        raise RuntimeError(f"{op}: expected output_mask of 6 bools, got {list(output_mask)}")
    return [bool(m) for m in output_mask]


class _Schedule:
    """The steps in processing order: for step k, its row offset, size, the previous-processed
    step's offset and the rows continuing from it (n_a), and the rows final after it (>= fin)."""

    def __init__(self, sizes: List[int], reverse: bool):
        T = len(sizes)
        offs = [0] * T
        for t in range(1, T):
            offs[t] = offs[t - 1] + sizes[t - 1]
        order = list(range(T - 1, -1, -1)) if reverse else list(range(T))
        self.steps = []
        for k, t in enumerate(order):
            p = order[k - 1] if k > 0 else None
            q = order[k + 1] if k + 1 < T else None
            n_a = min(sizes[t], sizes[p]) if p is not None else 0
            n_next = min(sizes[t], sizes[q]) if q is not None else 0
            self.steps.append(dict(t=t, off=offs[t], bt=sizes[t], prev_off=offs[p] if p is not None else 0, n_a=n_a,
                                   next_off=offs[q] if q is not None else 0, n_next=n_next))
        self.T, self.offs = T, offs

    def first_rows(self, B: int) -> List[int]:
        """For each row b < B, the index in the packed layout of its first processed step."""
        idx = [0] * B
        for s in self.steps:
            for b in range(s["n_a"], s["bt"]):
                idx[b] = s["off"] + b
        return idx

    def prev_rows(self, N: int) -> List[int]:
        """For each packed row, where its previous hidden state lives in cat([output, h0]): the
        previous-processed step's row, or N + b for h0[b]."""
        idx = [0] * N
        for s in self.steps:
            for b in range(s["bt"]):
                idx[s["off"] + b] = s["prev_off"] + b if b < s["n_a"] else N + b
        return idx


def _meta(x: Tensor, H: int, K: int) -> dict:
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    return dict(ACC=acc, SMALL=0.02 if x.dtype == torch.float64 else 0.25,
                DOT_PREC="ieee" if x.dtype in (torch.float32, torch.float64) else "tf32",
                DOT_UPCAST=_INTERPRETED and x.dtype == torch.bfloat16)


def _blocks(bt: int, H: int, K: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_H, BLOCK_K, num_warps): tiles of >= 16 (tl.dot); small row and unit blocks
    so that a step launches many programs (the step is latency-bound on a GPU)."""
    bm = 16 if bt <= 16 else 32
    bh = 16 if H <= 256 else 32
    bk = max(_MIN_DOT, min(64, triton.next_power_of_2(max(K, 1))))
    return bm, bh, bk, 4


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in the input dtype (cuBLAS / BLAS accumulate in float32 inside)."""
    return torch.mm(a, b)


def _run_steps(kernel, x: Tensor, sched: "_Schedule", H: int, K: int, backward: bool, args: tuple, step_args,
               **consts) -> None:
    """Launches kernel once per non-empty step, in processing order (reversed for the backward):
    kernel[grid](*args, *step_args(step), BLOCK_*, num_warps, **consts), on x's device."""
    with _device_guard(x):
        for s in (reversed(sched.steps) if backward else sched.steps):
            if s["bt"] == 0:
                continue
            bm, bh, bk, warps = _blocks(s["bt"], H, K)
            grid = (triton.cdiv(s["bt"], bm), triton.cdiv(H, bh))
            kernel[grid](*args, *step_args(s), BLOCK_M=bm, BLOCK_H=bh, BLOCK_K=bk, num_warps=warps, **consts)


def _gemm_grads(dgx: Tensor, dgh: Tensor, x: Tensor, output: Optional[Tensor], h0: Tensor, w_ih: Tensor,
                w_hh: Tensor, sched: "_Schedule", want_input: bool, want_w_ih: bool,
                want_w_hh: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The gradients that are single GEMMs over all steps, after the loop: grad_input = dG_x W_ih,
    grad_w_ih = dG_x^T x, grad_w_hh = dG_h^T h_prev (h_prev gathered once from cat([output, h0]))."""
    N = x.size(0)
    gi = gw_ih = gw_hh = None
    if want_input:
        gi = _mm(dgx, w_ih.contiguous()) if N > 0 else torch.zeros_like(x)
    if want_w_ih:
        gw_ih = _mm(dgx.t(), x)
    if want_w_hh:
        if N > 0:
            hprev = torch.cat([output.contiguous(), h0], 0).index_select(
                0, torch.tensor(sched.prev_rows(N), dtype=torch.long, device=x.device))
            gw_hh = _mm(dgh.t(), hprev)
        else:
            gw_hh = w_hh.new_zeros(w_hh.shape)
    return gi, gw_ih, gw_hh


def _first_step_rows(sched: "_Schedule", B: int, x: Tensor) -> Tensor:
    """For each batch row, its row in the packed layout at its first processed step (for grad_h0)."""
    return torch.tensor(sched.first_rows(B), dtype=torch.long, device=x.device)


def _lstm_forward(input: Tensor, sizes: List[int], h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor], b_hh: Optional[Tensor], reverse: bool, final: bool):
    """Returns (output, hy, cy, gates, cs); hy, cy are None unless final."""
    N, B, H = input.size(0), h0.size(0), w_hh.size(1)
    x = input.contiguous()
    h0, c0, w_hh = h0.contiguous(), c0.contiguous(), w_hh.contiguous()
    out = x.new_empty((N, H))
    cs = x.new_empty((N, H))
    gates = x.new_empty((N, 4 * H))
    hy = h0.clone() if final else None  # rows with no step keep h0
    cy = c0.clone() if final else None
    if N == 0 or H == 0:
        return out, hy, cy, gates, cs
    xw = _mm(x, w_ih.t())  # (N, 4H)
    carry = torch.empty((B, H), dtype=_acc_dtype(x), device=x.device)
    sched = _Schedule(sizes, reverse)
    meta = _meta(x, H, H)
    dummy = xw
    bih = b_ih.contiguous() if b_ih is not None else dummy
    bhh = b_hh.contiguous() if b_hh is not None else dummy
    hyp, cyp = (hy, cy) if final else (out, cs)  # not written when not final (fin_lo = B)
    _run_steps(_lstm_fwd_step_kernel, x, sched, H, H, False,
               (xw, bih, bhh, out, h0, c0, carry, w_hh, out, cs, gates, hyp, cyp),
               lambda s: (s["off"], s["prev_off"], s["bt"], s["n_a"], s["n_next"] if final else B, H),
               HAS_BIAS_IH=b_ih is not None, HAS_BIAS_HH=b_hh is not None, **meta)
    return out, hy, cy, gates, cs


def _lstm_backward(grad_output: Optional[Tensor], grad_hy: Optional[Tensor], grad_cy: Optional[Tensor],
                   input: Tensor, sizes: List[int], h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                   output: Optional[Tensor], gates: Tensor, cs: Tensor, reverse: bool, mask: List[bool]):
    N, B, H = input.size(0), h0.size(0), w_hh.size(1)
    x = input.contiguous()
    h0c, c0c, w_hh = h0.contiguous(), c0.contiguous(), w_hh.contiguous()
    acc = _acc_dtype(x)
    outs = [None] * 6
    if not any(mask):
        return tuple(outs)
    dg = x.new_empty((N, 4 * H))
    gc0 = torch.zeros((B, H), dtype=acc, device=x.device)  # rows with no step: grad_cy passes through
    if grad_cy is not None:
        gc0.copy_(grad_cy)
    if N > 0 and H > 0:
        carry = torch.empty((B, H), dtype=acc, device=x.device)
        sched = _Schedule(sizes, reverse)
        meta = _meta(x, H, 4 * H)
        dummy = dg
        gates, cs = gates.contiguous(), cs.contiguous()
        gout = grad_output.contiguous() if grad_output is not None else dummy
        ghy = grad_hy.contiguous() if grad_hy is not None else dummy
        gcy = grad_cy.contiguous() if grad_cy is not None else dummy
        _run_steps(_lstm_bwd_step_kernel, x, sched, H, 4 * H, True,
                   (dg, w_hh, gout, ghy, gcy, carry, gates, cs, c0c, dg, gc0),
                   lambda s: (s["off"], s["next_off"], s["prev_off"], s["bt"], s["n_next"], s["n_a"], H,
                              4 * H if s["n_next"] > 0 else 0),
                   HAS_GOUT=grad_output is not None, HAS_GHY=grad_hy is not None, HAS_GCY=grad_cy is not None,
                   **meta)
    else:
        dg.zero_()
        sched = _Schedule(sizes, reverse)
    outs[0], outs[3], outs[4] = _gemm_grads(dg, dg, x, output, h0c, w_ih, w_hh, sched, mask[0], mask[3], mask[4])
    if mask[1]:
        if N > 0:  # every row has a first step: grad_h0 = its dgates @ W_hh
            outs[1] = _mm(dg.index_select(0, _first_step_rows(sched, B, x)), w_hh)
        else:  # no step: hy = h0
            outs[1] = grad_hy.clone() if grad_hy is not None else x.new_zeros((B, H))
    if mask[2]:
        outs[2] = gc0.to(x.dtype)
    if mask[5]:
        outs[5] = dg.sum(0, dtype=acc).to(x.dtype)
    return tuple(outs)


def _gru_forward(input: Tensor, sizes: List[int], h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                 b_ih: Optional[Tensor], b_hh: Optional[Tensor], reverse: bool, final: bool):
    """Returns (output, hy, ws); hy is None unless final."""
    N, B, H = input.size(0), h0.size(0), w_hh.size(1)
    x = input.contiguous()
    h0, w_hh = h0.contiguous(), w_hh.contiguous()
    out = x.new_empty((N, H))
    ws = x.new_empty((N, 4 * H))
    hy = h0.clone() if final else None
    if N == 0 or H == 0:
        return out, hy, ws
    xw = _mm(x, w_ih.t())  # (N, 3H)
    sched = _Schedule(sizes, reverse)
    meta = _meta(x, H, H)
    dummy = xw
    bih = b_ih.contiguous() if b_ih is not None else dummy
    bhh = b_hh.contiguous() if b_hh is not None else dummy
    _run_steps(_gru_fwd_step_kernel, x, sched, H, H, False, (xw, bih, bhh, out, h0, w_hh, out, ws, hy if final else out),
               lambda s: (s["off"], s["prev_off"], s["bt"], s["n_a"], s["n_next"] if final else B, H),
               HAS_BIAS_IH=b_ih is not None, HAS_BIAS_HH=b_hh is not None, **meta)
    return out, hy, ws


def _gru_backward(grad_output: Optional[Tensor], grad_hy: Optional[Tensor], input: Tensor, sizes: List[int],
                  h0: Tensor, w_ih: Tensor, w_hh: Tensor, output: Tensor, ws: Tensor, reverse: bool,
                  mask: List[bool]):
    N, B, H = input.size(0), h0.size(0), w_hh.size(1)
    x = input.contiguous()
    h0c, w_hh = h0.contiguous(), w_hh.contiguous()
    acc = _acc_dtype(x)
    outs = [None] * 6
    if not any(mask):
        return tuple(outs)
    dgh = x.new_empty((N, 3 * H))
    dgx = x.new_empty((N, 3 * H))
    gh0 = torch.zeros((B, H), dtype=acc, device=x.device)
    if grad_hy is not None:  # rows with no step: grad_hy passes through (others overwritten)
        gh0.copy_(grad_hy)
    sched = _Schedule(sizes, reverse)
    if N > 0 and H > 0:
        carry = torch.empty((B, H), dtype=acc, device=x.device)
        meta = _meta(x, H, 3 * H)
        dummy = dgh
        ws = ws.contiguous()
        out_c = output.contiguous()
        gout = grad_output.contiguous() if grad_output is not None else dummy
        ghy = grad_hy.contiguous() if grad_hy is not None else dummy
        _run_steps(_gru_bwd_step_kernel, x, sched, H, 3 * H, True,
                   (dgh, w_hh, gout, ghy, carry, ws, out_c, h0c, dgh, dgx, gh0),
                   lambda s: (s["off"], s["next_off"], s["prev_off"], s["bt"], s["n_next"], s["n_a"], H,
                              3 * H if s["n_next"] > 0 else 0),
                   HAS_GOUT=grad_output is not None, HAS_GHY=grad_hy is not None, **meta)
    else:
        dgh.zero_()
        dgx.zero_()
    outs[0], outs[2], outs[3] = _gemm_grads(dgx, dgh, x, output, h0c, w_ih, w_hh, sched, mask[0], mask[2], mask[3])
    if mask[1]:
        if N > 0 and H > 0:  # every row has a first step: its dgh @ W_hh plus the direct part
            gh0 += _mm(dgh.index_select(0, _first_step_rows(sched, B, x)), w_hh).to(acc)
        outs[1] = gh0.to(x.dtype)
    if mask[4]:
        outs[4] = dgx.sum(0, dtype=acc).to(x.dtype)
    if mask[5]:
        outs[5] = dgh.sum(0, dtype=acc).to(x.dtype)
    return tuple(outs)


# =============================================================================================
# The ops (schemas spelled out exactly as in csrc/ops.cpp)
# =============================================================================================
_LSTM_CELL_FWD = ("(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
                  "-> (Tensor, Tensor, Tensor)")
_LSTM_CELL_BWD = ("(Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor hx, Tensor cx, Tensor w_ih, "
                  "Tensor w_hh, Tensor cy, Tensor gates, bool[6] output_mask) "
                  "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_GRU_CELL_FWD = ("(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
                 "-> (Tensor, Tensor)")
_GRU_CELL_BWD = ("(Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor ws, "
                 "bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_LSTM_SEQ_FWD = ("(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
                 "Tensor? b_ih, Tensor? b_hh, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_LSTM_SEQ_BWD = ("(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor batch_sizes, "
                 "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor output, Tensor gates, Tensor cs, "
                 "bool reverse, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_GRU_SEQ_FWD = ("(Tensor input, Tensor batch_sizes, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
                "Tensor? b_hh, bool reverse) -> (Tensor, Tensor, Tensor)")
_GRU_SEQ_BWD = ("(Tensor? grad_output, Tensor? grad_hy, Tensor input, Tensor batch_sizes, Tensor h0, "
                "Tensor w_ih, Tensor w_hh, Tensor output, Tensor ws, bool reverse, bool[6] output_mask) "
                "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


def _check_cell(op: str, input: Tensor, hx: Tensor, cx: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                b_ih: Optional[Tensor], b_hh: Optional[Tensor], G: int) -> Tuple[int, int]:
    I, H = _check_weights(op, input, w_ih, w_hh, b_ih, b_hh, G)
    B = input.size(0)
    _check_tensor(op, "hx", hx, input, (B, H), "(batch, hidden_size) = ")
    _check_tensor(op, "cx", cx, input, (B, H), "(batch, hidden_size) = ")
    _check_limits(op, B, B, H, G)
    return B, H


def _check_saved(op: str, name: str, t: Optional[Tensor], ref: Tensor, shape) -> None:
    if t is None:
        return
    _check_tensor(op, name, t, ref, shape)


@torch.library.custom_op("pyfastdl_triton::lstm_cell_fwd", mutates_args=(), schema=_LSTM_CELL_FWD)
def lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step. input (B, I), hx, cx (B, H), w_ih (4H, I), w_hh (4H, H), biases (4H,) or None.
    Returns (hy, cy, gates (B, 4H) = activated (i, f, g, o))."""
    op = "lstm_cell_fwd"
    B, H = _check_cell(op, input, hx, cx, w_ih, w_hh, b_ih, b_hh, 4)
    _check_launchable(input, op)
    out, _, _, gates, cs = _lstm_forward(input, [B] if B > 0 else [], hx, cx, w_ih, w_hh, b_ih, b_hh, False, False)
    return out, cs, gates


@lstm_cell_fwd.register_fake
def _lstm_cell_fwd_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    _check_cell("lstm_cell_fwd", input, hx, cx, w_ih, w_hh, b_ih, b_hh, 4)
    return lstm_cell_fwd_shapes(input, hx, w_ih)


def _check_lstm_cell_bwd(op, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates, output_mask):
    B, H = _check_cell(op, input, hx, cx, w_ih, w_hh, None, None, 4)
    _check_tensor(op, "grad_hy", grad_hy, input, (B, H))
    _check_tensor(op, "grad_cy", grad_cy, input, (B, H))
    _check_tensor(op, "cy", cy, input, (B, H))
    _check_tensor(op, "gates", gates, input, (B, 4 * H))
    return B, H, _check_output_mask(op, output_mask)


@torch.library.custom_op("pyfastdl_triton::lstm_cell_bwd", mutates_args=(), schema=_LSTM_CELL_BWD)
def lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates, output_mask):
    """Backward of lstm_cell_fwd: (grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias),
    None where output_mask is False."""
    op = "lstm_cell_bwd"
    B, H, mask = _check_lstm_cell_bwd(op, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates, output_mask)
    _check_launchable(input, op)
    return _lstm_backward(None, grad_hy, grad_cy, input, [B] if B > 0 else [], hx, cx, w_ih, w_hh, hx, gates,
                          cy, False, mask)


@lstm_cell_bwd.register_fake
def _lstm_cell_bwd_fake(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates, output_mask):
    _check_lstm_cell_bwd("lstm_cell_bwd", grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates, output_mask)
    return lstm_cell_bwd_shapes(input, hx, cx, w_ih, w_hh, output_mask)


@torch.library.custom_op("pyfastdl_triton::gru_cell_fwd", mutates_args=(), schema=_GRU_CELL_FWD)
def gru_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh):
    """One GRU step. input (B, I), hx (B, H), w_ih (3H, I), w_hh (3H, H), biases (3H,) or None.
    Returns (hy, ws (B, 4H) = (r, z, n, hn))."""
    op = "gru_cell_fwd"
    B, H = _check_cell(op, input, hx, None, w_ih, w_hh, b_ih, b_hh, 3)
    _check_launchable(input, op)
    out, _, ws = _gru_forward(input, [B] if B > 0 else [], hx, w_ih, w_hh, b_ih, b_hh, False, False)
    return out, ws


@gru_cell_fwd.register_fake
def _gru_cell_fwd_fake(input, hx, w_ih, w_hh, b_ih, b_hh):
    _check_cell("gru_cell_fwd", input, hx, None, w_ih, w_hh, b_ih, b_hh, 3)
    return gru_cell_fwd_shapes(input, hx, w_ih)


def _check_gru_cell_bwd(op, grad_hy, input, hx, w_ih, w_hh, ws, output_mask):
    B, H = _check_cell(op, input, hx, None, w_ih, w_hh, None, None, 3)
    _check_tensor(op, "grad_hy", grad_hy, input, (B, H))
    _check_tensor(op, "ws", ws, input, (B, 4 * H))
    return B, H, _check_output_mask(op, output_mask)


@torch.library.custom_op("pyfastdl_triton::gru_cell_bwd", mutates_args=(), schema=_GRU_CELL_BWD)
def gru_cell_bwd(grad_hy, input, hx, w_ih, w_hh, ws, output_mask):
    """Backward of gru_cell_fwd: (grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh),
    None where output_mask is False."""
    op = "gru_cell_bwd"
    B, H, mask = _check_gru_cell_bwd(op, grad_hy, input, hx, w_ih, w_hh, ws, output_mask)
    _check_launchable(input, op)
    return _gru_backward(None, grad_hy, input, [B] if B > 0 else [], hx, w_ih, w_hh, hx, ws, False, mask)


@gru_cell_bwd.register_fake
def _gru_cell_bwd_fake(grad_hy, input, hx, w_ih, w_hh, ws, output_mask):
    _check_gru_cell_bwd("gru_cell_bwd", grad_hy, input, hx, w_ih, w_hh, ws, output_mask)
    return gru_cell_bwd_shapes(input, hx, w_ih, w_hh, output_mask)


@torch.library.custom_op("pyfastdl_triton::lstm_seq_fwd", mutates_args=(), schema=_LSTM_SEQ_FWD)
def lstm_seq_fwd(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    """One LSTM layer and direction over a packed sequence (see the module docstring). input (N, I),
    batch_sizes (T,) CPU int64, h0, c0 (B, H). Returns (output (N, H), hy, cy (B, H), gates (N, 4H),
    cs (N, H))."""
    op = "lstm_seq_fwd"
    sizes, B, H = _check_seq(op, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, 4)
    _check_launchable(input, op)
    return _lstm_forward(input, sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, bool(reverse), True)


@lstm_seq_fwd.register_fake
def _lstm_seq_fwd_fake(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    _check_seq("lstm_seq_fwd", input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, 4, need_sizes=False)
    return lstm_seq_fwd_shapes(input, h0)


def _check_lstm_seq_bwd(op, grad_output, grad_hy, grad_cy, input, batch_sizes, h0, c0, w_ih, w_hh, output, gates,
                        cs, output_mask, need_sizes=True):
    sizes, B, H = _check_seq(op, input, batch_sizes, h0, c0, w_ih, w_hh, None, None, 4, need_sizes)
    N = input.size(0)
    _check_tensor(op, "grad_output", grad_output, input, (N, H))
    _check_tensor(op, "grad_hy", grad_hy, input, (B, H))
    _check_tensor(op, "grad_cy", grad_cy, input, (B, H))
    _check_tensor(op, "output", output, input, (N, H))
    _check_tensor(op, "gates", gates, input, (N, 4 * H))
    _check_tensor(op, "cs", cs, input, (N, H))
    return sizes, _check_output_mask(op, output_mask)


@torch.library.custom_op("pyfastdl_triton::lstm_seq_bwd", mutates_args=(), schema=_LSTM_SEQ_BWD)
def lstm_seq_bwd(grad_output, grad_hy, grad_cy, input, batch_sizes, h0, c0, w_ih, w_hh, output, gates, cs, reverse,
                 output_mask):
    """Backward of lstm_seq_fwd: (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias),
    None where output_mask is False; the weight gradients as GEMMs over all steps."""
    op = "lstm_seq_bwd"
    sizes, mask = _check_lstm_seq_bwd(op, grad_output, grad_hy, grad_cy, input, batch_sizes, h0, c0, w_ih, w_hh,
                                      output, gates, cs, output_mask)
    _check_launchable(input, op)
    return _lstm_backward(grad_output, grad_hy, grad_cy, input, sizes, h0, c0, w_ih, w_hh, output, gates, cs,
                          bool(reverse), mask)


@lstm_seq_bwd.register_fake
def _lstm_seq_bwd_fake(grad_output, grad_hy, grad_cy, input, batch_sizes, h0, c0, w_ih, w_hh, output, gates, cs,
                       reverse, output_mask):
    _check_lstm_seq_bwd("lstm_seq_bwd", grad_output, grad_hy, grad_cy, input, batch_sizes, h0, c0, w_ih, w_hh,
                        output, gates, cs, output_mask, need_sizes=False)
    return lstm_seq_bwd_shapes(input, h0, c0, w_ih, w_hh, output_mask)


@torch.library.custom_op("pyfastdl_triton::gru_seq_fwd", mutates_args=(), schema=_GRU_SEQ_FWD)
def gru_seq_fwd(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    """One GRU layer and direction over a packed sequence. Returns (output (N, H), hy (B, H),
    ws (N, 4H) = (r, z, n, hn))."""
    op = "gru_seq_fwd"
    sizes, B, H = _check_seq(op, input, batch_sizes, h0, None, w_ih, w_hh, b_ih, b_hh, 3)
    _check_launchable(input, op)
    return _gru_forward(input, sizes, h0, w_ih, w_hh, b_ih, b_hh, bool(reverse), True)


@gru_seq_fwd.register_fake
def _gru_seq_fwd_fake(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    _check_seq("gru_seq_fwd", input, batch_sizes, h0, None, w_ih, w_hh, b_ih, b_hh, 3, need_sizes=False)
    return gru_seq_fwd_shapes(input, h0)


def _check_gru_seq_bwd(op, grad_output, grad_hy, input, batch_sizes, h0, w_ih, w_hh, output, ws, output_mask,
                       need_sizes=True):
    sizes, B, H = _check_seq(op, input, batch_sizes, h0, None, w_ih, w_hh, None, None, 3, need_sizes)
    N = input.size(0)
    _check_tensor(op, "grad_output", grad_output, input, (N, H))
    _check_tensor(op, "grad_hy", grad_hy, input, (B, H))
    _check_tensor(op, "output", output, input, (N, H))
    _check_tensor(op, "ws", ws, input, (N, 4 * H))
    return sizes, _check_output_mask(op, output_mask)


@torch.library.custom_op("pyfastdl_triton::gru_seq_bwd", mutates_args=(), schema=_GRU_SEQ_BWD)
def gru_seq_bwd(grad_output, grad_hy, input, batch_sizes, h0, w_ih, w_hh, output, ws, reverse, output_mask):
    """Backward of gru_seq_fwd: (grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh),
    None where output_mask is False."""
    op = "gru_seq_bwd"
    sizes, mask = _check_gru_seq_bwd(op, grad_output, grad_hy, input, batch_sizes, h0, w_ih, w_hh, output, ws,
                                     output_mask)
    _check_launchable(input, op)
    return _gru_backward(grad_output, grad_hy, input, sizes, h0, w_ih, w_hh, output, ws, bool(reverse), mask)


@gru_seq_bwd.register_fake
def _gru_seq_bwd_fake(grad_output, grad_hy, input, batch_sizes, h0, w_ih, w_hh, output, ws, reverse, output_mask):
    _check_gru_seq_bwd("gru_seq_bwd", grad_output, grad_hy, input, batch_sizes, h0, w_ih, w_hh, output, ws,
                       output_mask, need_sizes=False)
    return gru_seq_bwd_shapes(input, h0, w_ih, w_hh, output_mask)


__all__ = ["lstm_cell_fwd", "lstm_cell_bwd", "gru_cell_fwd", "gru_cell_bwd", "lstm_seq_fwd", "lstm_seq_bwd",
           "gru_seq_fwd", "gru_seq_bwd"]
