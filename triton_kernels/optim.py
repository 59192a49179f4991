"""Fused multi-tensor optimizer steps (SGD, Adam/AdamW, Adagrad, RMSprop, Adadelta) in Triton.

Registers five ops with the schemas and update rules of the "fused optimizers" block of
``csrc/ops.cpp`` in the namespace ``pyfastdl_triton`` (same positional arguments as the C++ ops
``torch.ops.pyfastdl.<name>``)::

    sgd_step_(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
              maximize, first_step, grad_scale?, found_inf?)
    adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
               lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
               grad_scale?, found_inf?)
    adagrad_step_(params, grads, state_sums, state_steps, lr, lr_decay, weight_decay, eps,
                  maximize, grad_scale?, found_inf?)
    rmsprop_step_(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr, alpha,
                  eps, weight_decay, momentum, centered, maximize, grad_scale?, found_inf?)
    adadelta_step_(params, grads, square_avgs, acc_deltas, state_steps, lr, rho, eps,
                   weight_decay, maximize, grad_scale?, found_inf?)

The math is torch.optim.<X>(foreach=False)'s ``_single_tensor_<x>``, operation for operation
(torch's CPU order of evaluation: addcmul = self + value * t1 * t2, the scaled factor first and
the product fused with the addition, ``tl.fma(value * t1, t2, self)``; addcdiv = self + value * t1
/ t2; lerp's two branches), in ACC = float32 (float64 for float64 params). Scaling before squaring
matters: with g = 1e20 and 1 - beta2 = 1e-3, (1e-3 * g) * g = 1e37 while g * g overflows float32
and would leave exp_avg_sq inf for good (issue 9, defect 5). (The interpreter's tl.fma rounds the
product; compiled kernels fuse it, as ATen's vectorized CPU kernels do.) Per element, with
g = grad / grad_scale, negated when maximize::

    SGD       g += wd * p;  buf = first ? g : momentum * buf + (1 - dampening) * g
              g = nesterov ? g + momentum * buf : buf;  p -= lr * g
    Adam      AdamW: p *= 1 - lr * wd, else g += wd * p
              m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g;  vmax = max(vmax, v)
              p -= lr / (1 - beta1^t) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)
    Adagrad   g += wd * p;  sum += g * g;  p -= clr * g / (sqrt(sum) + eps),
              clr = lr / (1 + (t - 1) * lr_decay)
    RMSprop   g += wd * p;  sq = alpha * sq + (1 - alpha) * g * g
              centered: ga = lerp(ga, g, 1 - alpha), avg = sqrt(sq - ga * ga) + eps
              else avg = sqrt(sq) + eps
              momentum > 0: buf = momentum * buf + g / avg, p -= lr * buf;  else p -= lr * g / avg
    Adadelta  g += wd * p;  sq = rho * sq + (1 - rho) * g * g
              delta = sqrt(acc + eps) / sqrt(sq + eps) * g
              acc = rho * acc + (1 - rho) * delta * delta;  p -= lr * delta

Multi-tensor apply (NVIDIA apex's idea, with tables instead of kernel-argument structs): one
launch covers every tensor of the lists. The launcher builds, on the host,

    addrs   int64 (R, T)   data pointer of role r (params, grads, state...) of tensor i
    numels  int64 (T,)     elements of tensor i
    chunks  int64 (C, 2)   (tensor index i, chunk index j in tensor i) of each chunk: elements
                           [j * CHUNK, min((j + 1) * CHUNK, numel)), CHUNK = BLOCK * ITERS;
                           empty tensors have none

in one int64 buffer copied to the device (pinned, non-blocking; cached by addresses and sizes, so
a training loop whose tensors stay put copies it once). Program k handles chunk k: it loads its
tensor's pointers from the table, casts them with ``.to(tl.pointer_type(dtype))``, runs the full
tiles of BLOCK elements without a mask, then the tensor's partial last tile with one. When every
address is 16-byte aligned (the usual case) the pointers carry that hint and, the chunk starts
being multiples of CHUNK, full tiles compile to 16-byte vector accesses (checked in the PTX for
sm_90). The same code runs under the Triton interpreter (TRITON_INTERPRET=1), where a pointer is
a host address: there the tensors must be CPU tensors (the interpreter copies CUDA tensor
*arguments* to the host, but cannot follow addresses in a table).

Per-tensor constants that depend on the step (Adam's lr / (1 - beta1^t) and sqrt(1 - beta2^t),
Adagrad's clr) are computed by a few float64 torch ops on the (incremented) step tensors on the
params' device, coef (T, K) in ACC: no host synchronisation, except where steps live on the CPU
while params are on CUDA and found_inf is given (whether to advance a CPU step needs found_inf's
value on the host). found_inf != 0 empties every chunk in the kernel (nothing is loaded or
stored) and adds 0 to the steps.

Hyper-parameters reach the kernels as float32 scalar arguments; for float64 params each one is
passed as a pair (hi, lo) of float32 values that sum to it to ~2**-48 (Triton passes Python
floats as float32).

Tensors are flat arrays of numel elements when param i is non-overlapping and dense and every
other tensor of slot i has its strides (the common case: state made by zeros_like(param)); any
other tensor gets a dense working copy, written back after the kernel (csrc/common/optim.h does
the same for the C++ backends).
"""
from __future__ import annotations

import collections
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from pyfastdl.optim import _lists as _fakes
from pyfastdl.optim._lists import (_LOW, _Lists, _adadelta_lists, _adagrad_lists, _adam_lists,
                                   _rmsprop_lists, _sgd_lists)
from ._common import INTERPRETED as _INTERPRETED, device_guard as _device_guard, split_f32 as _split_f32

# ---------------------------------------------------------------------------------------------
# Tuning constants. Tests may shrink them to exercise several chunks, tiles and launches on small
# tensors under the interpreter.
# ---------------------------------------------------------------------------------------------
_BLOCK = 1024  # elements a program handles per iteration (one tile)
_ITERS = 4  # tiles per chunk: CHUNK = _BLOCK * _ITERS elements per program
_NUM_WARPS = 4
_MAX_PROGRAMS = 2**31 - 1  # programs per launch (grid axis 0); more chunks -> several launches
_TABLE_CACHE_SIZE = 8  # device tables kept (keyed by addresses and sizes)


# =============================================================================================
# Device helpers shared by the kernels
# =============================================================================================
@triton.jit
def _hp(hi, lo, IS_FP64: tl.constexpr):
    """A hyper-parameter from its float32 (hi, lo) pair: hi + lo in float64, hi in float32."""
    if IS_FP64:
        return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        return hi


@triton.jit
def _div(a, b, IS_FP64: tl.constexpr):
    """a / b correctly rounded (Triton's float32 `/` is approximate on GPUs; float64's is IEEE)."""
    if IS_FP64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a, IS_FP64: tl.constexpr):
    """sqrt(a) correctly rounded, as torch's."""
    if IS_FP64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _lerp(a, b, w, W_SMALL: tl.constexpr):
    """torch.lerp(a, b, w) for a scalar weight, with torch's two branches (|w| < 0.5 or not)."""
    if W_SMALL:
        return a + w * (b - a)
    else:
        return b - (b - a) * (1.0 - w)


@triton.jit
def _round(x, P_DT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x (ACC) rounded to the param dtype, to nearest even. EMULATE_BF16 (bfloat16 params under
    the interpreter, whose float32 -> bfloat16 cast truncates) rounds with integer ops, as
    c10::BFloat16 does; compiled kernels use the hardware conversion (round to nearest even)."""
    if EMULATE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = tl.where(x != x, 0x7FC00000, bits)  # NaN stays a (quiet) NaN
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(P_DT)


@triton.jit
def _chunk(chunk_ptr, numel_ptr, fi_ptr, HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr):
    """This program's chunk: (tensor index, first element, elements in the chunk). The first
    element is a multiple of CHUNK, which the compiler sees (aligned, vectorized tiles). With
    found_inf != 0 the chunk reads as empty: no load, no store."""
    pid = tl.program_id(0).to(tl.int64)
    ti = tl.load(chunk_ptr + 2 * pid)
    start = tl.load(chunk_ptr + 2 * pid + 1) * CHUNK
    rem = tl.minimum(tl.load(numel_ptr + ti) - start, CHUNK)
    if HAS_FOUND_INF:
        rem = tl.where(tl.load(fi_ptr) == 0.0, rem, 0)
    return ti, start, rem


@triton.jit
def _ptr(addr_ptr, role, T, ti, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """The data pointer of role `role` (row of the address table) of tensor ti, typed DT.
    ALIGNED: the host checked that every address is a multiple of 16 bytes; the hint lets the
    compiler use 16-byte accesses (on the pointer: a hint on the integer does not carry through
    the int-to-pointer cast)."""
    p = tl.load(addr_ptr + role * T + ti).to(tl.pointer_type(DT))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _grad(g_ptr, offs, mask, other, scale, ACC: tl.constexpr, IS_FP64: tl.constexpr,
          HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    """The gradient as the update uses it: grad / grad_scale, negated when maximizing."""
    g = tl.load(g_ptr + offs, mask=mask, other=other).to(ACC)
    if HAS_GRAD_SCALE:
        g = _div(g, scale, IS_FP64)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _grad_scale(gs_ptr, ACC: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    if HAS_GRAD_SCALE:
        return tl.load(gs_ptr).to(ACC)
    else:
        return tl.full((), 1.0, ACC)


# =============================================================================================
# Kernels. Program k handles chunk k (CHUNK = BLOCK * ITERS elements of one tensor): its full
# tiles of BLOCK elements without a mask, then the tensor's partial last tile, if any, with one.
# Each family's `_<x>_tile` is the update of one tile (mask, other: None, None for a full tile).
# =============================================================================================
@triton.jit
def _sgd_tile(p_ptr, g_ptr, b_ptr, offs, mask, other, lr, mom, damp1, wd, scale,
              P_DT: tl.constexpr, S_DT: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr,
              HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
              FIRST_STEP: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
              EMULATE_BF16: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(ACC)
    g = _grad(g_ptr, offs, mask, other, scale, ACC, IS_FP64, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WD:
        g = g + wd * p
    if HAS_MOMENTUM:
        if FIRST_STEP:  # torch: buf = clone(g)
            buf = g
        else:
            buf = tl.load(b_ptr + offs, mask=mask, other=other) * mom + damp1 * g
        tl.store(b_ptr + offs, buf.to(S_DT), mask=mask)
        if NESTEROV:
            g = g + mom * buf
        else:
            g = buf
    p = p + (-lr) * g
    tl.store(p_ptr + offs, _round(p, P_DT, EMULATE_BF16), mask=mask)


@triton.jit
def _sgd_kernel(
    addr_ptr,  # int64 (3, T): params, grads, momentum_buffers (row 2 unused without momentum)
    numel_ptr,  # int64 (T,)
    chunk_ptr,  # int64 (C, 2): (tensor index, chunk index within the tensor)
    gs_ptr,  # float32 (1,): grad_scale (unused unless HAS_GRAD_SCALE)
    fi_ptr,  # float32 (1,): found_inf (unused unless HAS_FOUND_INF)
    T,  # tensors in the lists
    lr_hi, lr_lo, mom_hi, mom_lo, damp1_hi, damp1_lo, wd_hi, wd_lo,  # damp1 = 1 - dampening
    P_DT: tl.constexpr, S_DT: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr,
    HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    FIRST_STEP: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    ti, start, rem = _chunk(chunk_ptr, numel_ptr, fi_ptr, HAS_FOUND_INF, BLOCK * ITERS)
    p_ptr = _ptr(addr_ptr, 0, T, ti, P_DT, ALIGNED)
    g_ptr = _ptr(addr_ptr, 1, T, ti, P_DT, ALIGNED)
    b_ptr = _ptr(addr_ptr, 2, T, ti, S_DT, ALIGNED)
    lr, mom = _hp(lr_hi, lr_lo, IS_FP64), _hp(mom_hi, mom_lo, IS_FP64)
    damp1, wd = _hp(damp1_hi, damp1_lo, IS_FP64), _hp(wd_hi, wd_lo, IS_FP64)
    scale = _grad_scale(gs_ptr, ACC, HAS_GRAD_SCALE)
    for it in range(rem // BLOCK):
        _sgd_tile(p_ptr, g_ptr, b_ptr, start + it * BLOCK + tl.arange(0, BLOCK), None, None,
                  lr, mom, damp1, wd, scale, P_DT, S_DT, ACC, IS_FP64, HAS_WD, HAS_MOMENTUM,
                  NESTEROV, FIRST_STEP, MAXIMIZE, HAS_GRAD_SCALE, EMULATE_BF16)
    if rem % BLOCK != 0:
        offs = start + (rem // BLOCK) * BLOCK + tl.arange(0, BLOCK)
        _sgd_tile(p_ptr, g_ptr, b_ptr, offs, offs < start + rem, 0.0,
                  lr, mom, damp1, wd, scale, P_DT, S_DT, ACC, IS_FP64, HAS_WD, HAS_MOMENTUM,
                  NESTEROV, FIRST_STEP, MAXIMIZE, HAS_GRAD_SCALE, EMULATE_BF16)


@triton.jit
def _adam_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, offs, mask, other,
               step_size, bc2_sqrt, b1w, b2, b2w, wd, decay, eps, scale,
               P_DT: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr,
               HAS_WD: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
               HAS_MASTER: tl.constexpr, W_SMALL: tl.constexpr, MAXIMIZE: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    if HAS_MASTER:  # the param's own (rounded) value is not read
        p = tl.load(master_ptr + offs, mask=mask, other=other)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=other).to(ACC)
    g = _grad(g_ptr, offs, mask, other, scale, ACC, IS_FP64, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WD:
        if DECOUPLED:
            p = p * decay
        else:
            g = g + wd * p
    m = _lerp(tl.load(m_ptr + offs, mask=mask, other=other), g, b1w, W_SMALL)
    v = tl.fma(b2w * g, g, tl.load(v_ptr + offs, mask=mask, other=other) * b2)  # exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=other), v,
                       propagate_nan=tl.PropagateNan.ALL)
        tl.store(vmax_ptr + offs, v, mask=mask)
    denom = _div(_sqrt(v, IS_FP64), bc2_sqrt, IS_FP64) + eps
    p = p + _div((-step_size) * m, denom, IS_FP64)
    if HAS_MASTER:
        tl.store(master_ptr + offs, p, mask=mask)
    tl.store(p_ptr + offs, _round(p, P_DT, EMULATE_BF16), mask=mask)


@triton.jit
def _adam_kernel(
    addr_ptr,  # int64 (6, T): params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params
    numel_ptr,  # int64 (T,)
    chunk_ptr,  # int64 (C, 2)
    coef_ptr,  # ACC (T, 2): lr / (1 - beta1^t), sqrt(1 - beta2^t)
    gs_ptr, fi_ptr,  # float32 (1,) each
    T,
    b1w_hi, b1w_lo, b2_hi, b2_lo, b2w_hi, b2w_lo, wd_hi, wd_lo, decay_hi, decay_lo,
    eps_hi, eps_lo,  # b1w = 1 - beta1, b2w = 1 - beta2, decay = 1 - lr * weight_decay
    P_DT: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr, HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, HAS_MASTER: tl.constexpr, W_SMALL: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    ti, start, rem = _chunk(chunk_ptr, numel_ptr, fi_ptr, HAS_FOUND_INF, BLOCK * ITERS)
    p_ptr = _ptr(addr_ptr, 0, T, ti, P_DT, ALIGNED)
    g_ptr = _ptr(addr_ptr, 1, T, ti, P_DT, ALIGNED)
    m_ptr = _ptr(addr_ptr, 2, T, ti, ACC, ALIGNED)
    v_ptr = _ptr(addr_ptr, 3, T, ti, ACC, ALIGNED)
    vmax_ptr = _ptr(addr_ptr, 4, T, ti, ACC, ALIGNED)
    master_ptr = _ptr(addr_ptr, 5, T, ti, tl.float32, ALIGNED)
    b1w, b2 = _hp(b1w_hi, b1w_lo, IS_FP64), _hp(b2_hi, b2_lo, IS_FP64)
    b2w, wd = _hp(b2w_hi, b2w_lo, IS_FP64), _hp(wd_hi, wd_lo, IS_FP64)
    decay, eps = _hp(decay_hi, decay_lo, IS_FP64), _hp(eps_hi, eps_lo, IS_FP64)
    step_size = tl.load(coef_ptr + 2 * ti)
    bc2_sqrt = tl.load(coef_ptr + 2 * ti + 1)
    scale = _grad_scale(gs_ptr, ACC, HAS_GRAD_SCALE)
    for it in range(rem // BLOCK):
        _adam_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr,
                   start + it * BLOCK + tl.arange(0, BLOCK), None, None,
                   step_size, bc2_sqrt, b1w, b2, b2w, wd, decay, eps, scale, P_DT, ACC, IS_FP64,
                   HAS_WD, DECOUPLED, AMSGRAD, HAS_MASTER, W_SMALL, MAXIMIZE, HAS_GRAD_SCALE,
                   EMULATE_BF16)
    if rem % BLOCK != 0:
        offs = start + (rem // BLOCK) * BLOCK + tl.arange(0, BLOCK)
        _adam_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, offs, offs < start + rem, 0.0,
                   step_size, bc2_sqrt, b1w, b2, b2w, wd, decay, eps, scale, P_DT, ACC, IS_FP64,
                   HAS_WD, DECOUPLED, AMSGRAD, HAS_MASTER, W_SMALL, MAXIMIZE, HAS_GRAD_SCALE,
                   EMULATE_BF16)


@triton.jit
def _adagrad_tile(p_ptr, g_ptr, s_ptr, offs, mask, other, clr, wd, eps, scale,
                  P_DT: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr,
                  HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  EMULATE_BF16: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(ACC)
    g = _grad(g_ptr, offs, mask, other, scale, ACC, IS_FP64, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WD:
        g = g + wd * p
    s = tl.fma(g, g, tl.load(s_ptr + offs, mask=mask, other=other))
    tl.store(s_ptr + offs, s, mask=mask)
    p = p + _div((-clr) * g, _sqrt(s, IS_FP64) + eps, IS_FP64)
    tl.store(p_ptr + offs, _round(p, P_DT, EMULATE_BF16), mask=mask)


@triton.jit
def _adagrad_kernel(
    addr_ptr,  # int64 (3, T): params, grads, state_sums
    numel_ptr, chunk_ptr,  # int64 (T,), (C, 2)
    coef_ptr,  # ACC (T,): clr = lr / (1 + (t - 1) * lr_decay)
    gs_ptr, fi_ptr,  # float32 (1,) each
    T,
    wd_hi, wd_lo, eps_hi, eps_lo,
    P_DT: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr, HAS_WD: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    ti, start, rem = _chunk(chunk_ptr, numel_ptr, fi_ptr, HAS_FOUND_INF, BLOCK * ITERS)
    p_ptr = _ptr(addr_ptr, 0, T, ti, P_DT, ALIGNED)
    g_ptr = _ptr(addr_ptr, 1, T, ti, P_DT, ALIGNED)
    s_ptr = _ptr(addr_ptr, 2, T, ti, ACC, ALIGNED)
    wd, eps = _hp(wd_hi, wd_lo, IS_FP64), _hp(eps_hi, eps_lo, IS_FP64)
    clr = tl.load(coef_ptr + ti)
    scale = _grad_scale(gs_ptr, ACC, HAS_GRAD_SCALE)
    for it in range(rem // BLOCK):
        _adagrad_tile(p_ptr, g_ptr, s_ptr, start + it * BLOCK + tl.arange(0, BLOCK), None, None,
                      clr, wd, eps, scale, P_DT, ACC, IS_FP64, HAS_WD, MAXIMIZE, HAS_GRAD_SCALE,
                      EMULATE_BF16)
    if rem % BLOCK != 0:
        offs = start + (rem // BLOCK) * BLOCK + tl.arange(0, BLOCK)
        _adagrad_tile(p_ptr, g_ptr, s_ptr, offs, offs < start + rem, 0.0,
                      clr, wd, eps, scale, P_DT, ACC, IS_FP64, HAS_WD, MAXIMIZE, HAS_GRAD_SCALE,
                      EMULATE_BF16)


@triton.jit
def _rmsprop_tile(p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr, offs, mask, other,
                  lr, alpha, aw, eps, wd, mom, scale,
                  P_DT: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr,
                  HAS_WD: tl.constexpr, CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                  W_SMALL: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                  EMULATE_BF16: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(ACC)
    g = _grad(g_ptr, offs, mask, other, scale, ACC, IS_FP64, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WD:
        g = g + wd * p
    sq = tl.fma(aw * g, g, tl.load(sq_ptr + offs, mask=mask, other=other) * alpha)
    tl.store(sq_ptr + offs, sq, mask=mask)
    if CENTERED:
        ga = _lerp(tl.load(ga_ptr + offs, mask=mask, other=other), g, aw, W_SMALL)
        tl.store(ga_ptr + offs, ga, mask=mask)
        avg = _sqrt(tl.fma(-ga, ga, sq), IS_FP64) + eps
    else:
        avg = _sqrt(sq, IS_FP64) + eps
    if HAS_MOMENTUM:
        buf = tl.load(buf_ptr + offs, mask=mask, other=other) * mom + _div(g, avg, IS_FP64)
        tl.store(buf_ptr + offs, buf, mask=mask)
        p = p + (-lr) * buf
    else:
        p = p + _div((-lr) * g, avg, IS_FP64)
    tl.store(p_ptr + offs, _round(p, P_DT, EMULATE_BF16), mask=mask)


@triton.jit
def _rmsprop_kernel(
    addr_ptr,  # int64 (5, T): params, grads, square_avgs, grad_avgs, momentum_buffers
    numel_ptr, chunk_ptr,  # int64 (T,), (C, 2)
    gs_ptr, fi_ptr,  # float32 (1,) each
    T,
    lr_hi, lr_lo, alpha_hi, alpha_lo, aw_hi, aw_lo, eps_hi, eps_lo, wd_hi, wd_lo, mom_hi, mom_lo,
    # aw = 1 - alpha
    P_DT: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr, HAS_WD: tl.constexpr,
    CENTERED: tl.constexpr, HAS_MOMENTUM: tl.constexpr, W_SMALL: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    ti, start, rem = _chunk(chunk_ptr, numel_ptr, fi_ptr, HAS_FOUND_INF, BLOCK * ITERS)
    p_ptr = _ptr(addr_ptr, 0, T, ti, P_DT, ALIGNED)
    g_ptr = _ptr(addr_ptr, 1, T, ti, P_DT, ALIGNED)
    sq_ptr = _ptr(addr_ptr, 2, T, ti, ACC, ALIGNED)
    ga_ptr = _ptr(addr_ptr, 3, T, ti, ACC, ALIGNED)
    buf_ptr = _ptr(addr_ptr, 4, T, ti, ACC, ALIGNED)
    lr, alpha = _hp(lr_hi, lr_lo, IS_FP64), _hp(alpha_hi, alpha_lo, IS_FP64)
    aw, eps = _hp(aw_hi, aw_lo, IS_FP64), _hp(eps_hi, eps_lo, IS_FP64)
    wd, mom = _hp(wd_hi, wd_lo, IS_FP64), _hp(mom_hi, mom_lo, IS_FP64)
    scale = _grad_scale(gs_ptr, ACC, HAS_GRAD_SCALE)
    for it in range(rem // BLOCK):
        _rmsprop_tile(p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr,
                      start + it * BLOCK + tl.arange(0, BLOCK), None, None,
                      lr, alpha, aw, eps, wd, mom, scale, P_DT, ACC, IS_FP64, HAS_WD, CENTERED,
                      HAS_MOMENTUM, W_SMALL, MAXIMIZE, HAS_GRAD_SCALE, EMULATE_BF16)
    if rem % BLOCK != 0:
        offs = start + (rem // BLOCK) * BLOCK + tl.arange(0, BLOCK)
        _rmsprop_tile(p_ptr, g_ptr, sq_ptr, ga_ptr, buf_ptr, offs, offs < start + rem, 0.0,
                      lr, alpha, aw, eps, wd, mom, scale, P_DT, ACC, IS_FP64, HAS_WD, CENTERED,
                      HAS_MOMENTUM, W_SMALL, MAXIMIZE, HAS_GRAD_SCALE, EMULATE_BF16)


@triton.jit
def _adadelta_tile(p_ptr, g_ptr, sq_ptr, acc_ptr, offs, mask, other, lr, rho, rw, eps, wd, scale,
                   P_DT: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr,
                   HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                   EMULATE_BF16: tl.constexpr):
    p = tl.load(p_ptr + offs, mask=mask, other=other).to(ACC)
    g = _grad(g_ptr, offs, mask, other, scale, ACC, IS_FP64, HAS_GRAD_SCALE, MAXIMIZE)
    if HAS_WD:
        g = g + wd * p
    sq = tl.fma(rw * g, g, tl.load(sq_ptr + offs, mask=mask, other=other) * rho)
    acc = tl.load(acc_ptr + offs, mask=mask, other=other)
    delta = _div(_sqrt(acc + eps, IS_FP64), _sqrt(sq + eps, IS_FP64), IS_FP64) * g
    acc = tl.fma(rw * delta, delta, acc * rho)
    tl.store(sq_ptr + offs, sq, mask=mask)
    tl.store(acc_ptr + offs, acc, mask=mask)
    p = p + (-lr) * delta
    tl.store(p_ptr + offs, _round(p, P_DT, EMULATE_BF16), mask=mask)


@triton.jit
def _adadelta_kernel(
    addr_ptr,  # int64 (4, T): params, grads, square_avgs, acc_deltas
    numel_ptr, chunk_ptr,  # int64 (T,), (C, 2)
    gs_ptr, fi_ptr,  # float32 (1,) each
    T,
    lr_hi, lr_lo, rho_hi, rho_lo, rw_hi, rw_lo, eps_hi, eps_lo, wd_hi, wd_lo,  # rw = 1 - rho
    P_DT: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr, HAS_WD: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    ti, start, rem = _chunk(chunk_ptr, numel_ptr, fi_ptr, HAS_FOUND_INF, BLOCK * ITERS)
    p_ptr = _ptr(addr_ptr, 0, T, ti, P_DT, ALIGNED)
    g_ptr = _ptr(addr_ptr, 1, T, ti, P_DT, ALIGNED)
    sq_ptr = _ptr(addr_ptr, 2, T, ti, ACC, ALIGNED)
    acc_ptr = _ptr(addr_ptr, 3, T, ti, ACC, ALIGNED)
    lr, rho = _hp(lr_hi, lr_lo, IS_FP64), _hp(rho_hi, rho_lo, IS_FP64)
    rw, eps = _hp(rw_hi, rw_lo, IS_FP64), _hp(eps_hi, eps_lo, IS_FP64)
    wd = _hp(wd_hi, wd_lo, IS_FP64)
    scale = _grad_scale(gs_ptr, ACC, HAS_GRAD_SCALE)
    for it in range(rem // BLOCK):
        _adadelta_tile(p_ptr, g_ptr, sq_ptr, acc_ptr, start + it * BLOCK + tl.arange(0, BLOCK),
                       None, None, lr, rho, rw, eps, wd, scale, P_DT, ACC, IS_FP64, HAS_WD,
                       MAXIMIZE, HAS_GRAD_SCALE, EMULATE_BF16)
    if rem % BLOCK != 0:
        offs = start + (rem // BLOCK) * BLOCK + tl.arange(0, BLOCK)
        _adadelta_tile(p_ptr, g_ptr, sq_ptr, acc_ptr, offs, offs < start + rem, 0.0,
                       lr, rho, rw, eps, wd, scale, P_DT, ACC, IS_FP64, HAS_WD,
                       MAXIMIZE, HAS_GRAD_SCALE, EMULATE_BF16)


# =============================================================================================
# Launcher helpers: tables, steps (the lists and their checks: pyfastdl/optim/_lists.py)
# =============================================================================================
_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
       torch.bfloat16: tl.bfloat16}


def _check_launchable(L: _Lists) -> None:
    """Triton runs on CUDA tensors; CPU tensors only under the interpreter. (Under the
    interpreter CUDA tensors cannot work: the kernels follow the addresses of a table, and the
    interpreter only moves tensors passed as arguments to the host.)"""
    if L.n == 0:
        return
    dev = L.roles[0][1][0].device
    if (dev.type == "cuda" and not _INTERPRETED) or (dev.type == "cpu" and _INTERPRETED):
        return
    raise RuntimeError(
        f"{L.op} (triton): params on {dev} cannot be run by the Triton kernels: they need "
        f"CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported"
        + (" (under the interpreter, CPU tensors only)" if dev.type == "cuda" else ""))


def _hyper(*values: float) -> list:
    """Kernel arguments (hi, lo, hi, lo, ...) for the hyper-parameters (see _hp)."""
    out = []
    for v in values:
        out.extend(_split_f32(float(v)))
    return out


_table_cache: "collections.OrderedDict[tuple, Tensor]" = collections.OrderedDict()


def _tables(L: _Lists, n_roles: int):
    """(addrs (R, T), numels (T,), chunks (C, 2), aligned) on the params' device, int64; see the
    module docstring. Roles without tensors get address 0 (their kernels never load them)."""
    T = L.n
    dev = L.roles[0][1][0].device
    chunk = _BLOCK * _ITERS
    addrs = []
    for r in range(n_roles):
        ts = L.roles[r][1] if r < len(L.roles) else []
        addrs.extend([t.data_ptr() for t in ts] if ts else [0] * T)
    numels = [t.numel() for t in L.roles[0][1]]
    aligned = all(a % 16 == 0 for a in addrs)
    stream = torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0
    key = (dev, stream, chunk, tuple(addrs), tuple(numels))
    buf = _table_cache.get(key)
    if buf is None:
        counts = torch.tensor([triton.cdiv(k, chunk) for k in numels], dtype=torch.int64)
        ti = torch.repeat_interleave(torch.arange(T, dtype=torch.int64), counts)
        first = torch.cumsum(counts, 0) - counts
        local = torch.arange(ti.numel(), dtype=torch.int64) - first[ti]  # chunk index in tensor
        host = torch.cat([torch.tensor(addrs + numels, dtype=torch.int64),
                          torch.stack([ti, local], 1).reshape(-1)])
        if dev.type == "cuda":
            buf = host.pin_memory().to(dev, non_blocking=True)
        else:
            buf = host
        _table_cache[key] = buf
        while len(_table_cache) > _TABLE_CACHE_SIZE:
            _table_cache.popitem(last=False)
    else:
        _table_cache.move_to_end(key)
    R = n_roles
    return buf[:R * T], buf[R * T:R * T + T], buf[R * T + T:].view(-1, 2), aligned


class _Steps:
    """The state_steps of one call. `t`: their values after this call's increment, float64 (T,)
    on the params' device, computed as torch does (``step_t += 1`` in the step's dtype), without
    writing them; `commit()` then writes them (after the kernel's launch). found_inf != 0 makes
    the increment 0. No host synchronisation, except for CPU steps of CUDA params with found_inf
    given: whether to advance a CPU tensor needs found_inf's value on the host (one .item())."""

    def __init__(self, L: _Lists, found_inf: Optional[Tensor]):
        dev = L.roles[0][1][0].device
        self.on_dev = [s for s in L.steps if s.device == dev]
        self.on_host = [s for s in L.steps if s.device != dev]  # CPU steps of CUDA params
        self.inc = 1.0 if found_inf is None else (found_inf.reshape(()) == 0).to(torch.float32)
        self.host_inc = 1.0
        if self.on_host and found_inf is not None:
            self.host_inc = 1.0 if found_inf.item() == 0 else 0.0  # CUDA -> host: a sync
        self.steps, self.dev = L.steps, dev

    @property
    def t(self) -> Tensor:
        steps, dev = self.steps, self.dev
        if not self.on_host:
            return (torch.stack([s.reshape(()) for s in steps]) + self.inc).to(torch.float64)
        if not self.on_dev:
            t = (torch.stack([s.reshape(()) for s in steps]) + self.host_inc).to(torch.float64)
            return t.pin_memory().to(dev, non_blocking=True)
        return torch.stack([
            (s.reshape(()) + self.inc).to(torch.float64) if s.device == dev
            else (s.reshape(()) + self.host_inc).to(dev, torch.float64, non_blocking=True)
            for s in steps])

    def commit(self) -> None:
        if self.on_dev:
            torch._foreach_add_(self.on_dev, self.inc)
        if self.on_host and self.host_inc:
            torch._foreach_add_(self.on_host, 1.0)


def _launch(kernel, L: _Lists, n_roles: int, args: list, grad_scale: Optional[Tensor],
            found_inf: Optional[Tensor], **meta) -> None:
    """Runs `kernel` over all chunks: kernel(addrs, numels, chunks, *args[0], gs, fi, T, *args[1])
    in as few launches as the grid limit allows. args = (tensor args after the tables, scalar
    args after T)."""
    addrs, numels, chunks, aligned = _tables(L, n_roles)
    tensor_args, scalar_args = args
    dummy = numels  # stands for an absent grad_scale / found_inf; never read
    gs = grad_scale if grad_scale is not None else dummy
    fi = found_inf if found_inf is not None else dummy
    p_dt = L.roles[0][1][0].dtype
    acc = torch.float64 if p_dt == torch.float64 else torch.float32
    for c0 in range(0, chunks.shape[0], _MAX_PROGRAMS):
        part = chunks[c0:c0 + _MAX_PROGRAMS]
        kernel[(part.shape[0],)](
            addrs, numels, part, *tensor_args, gs, fi, L.n, *scalar_args,
            P_DT=_TL[p_dt], ACC=_TL[acc], IS_FP64=acc == torch.float64,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            ALIGNED=aligned, EMULATE_BF16=_INTERPRETED and p_dt == torch.bfloat16,
            BLOCK=_BLOCK, ITERS=_ITERS, num_warps=_NUM_WARPS, **meta)


def _acc(L: _Lists) -> torch.dtype:
    return torch.float64 if L.roles[0][1][0].dtype == torch.float64 else torch.float32


# =============================================================================================
# The ops
# =============================================================================================
@torch.library.custom_op("pyfastdl_triton::sgd_step_", mutates_args=("params", "momentum_buffers"))
def sgd_step_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor],
              lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
              maximize: bool, first_step: bool, grad_scale: Optional[Tensor],
              found_inf: Optional[Tensor]) -> None:
    """One SGD step (torch.optim.SGD(foreach=False)) on every param, in place. params, grads:
    same shapes; momentum_buffers: empty when momentum == 0, else the params' shapes (float32
    for float16/bfloat16 params), content ignored when first_step. grad_scale, found_inf:
    1-element float32 or None."""
    L = _sgd_lists(params, grads, momentum_buffers, momentum, grad_scale, found_inf)
    _check_launchable(L)
    if L.n == 0:
        return
    if momentum == 0:
        L.clear("momentum_buffers")
    with _device_guard(params[0]):
        L.dense()
        s_dt = torch.float32 if L.roles[0][1][0].dtype in _LOW else L.roles[0][1][0].dtype
        _launch(_sgd_kernel, L, 3,
                ([], _hyper(lr, momentum, 1 - dampening, weight_decay)), grad_scale, found_inf,
                S_DT=_TL[s_dt], HAS_WD=weight_decay != 0, HAS_MOMENTUM=momentum != 0,
                NESTEROV=nesterov, FIRST_STEP=first_step, MAXIMIZE=maximize)
        L.finish()


sgd_step_.register_fake(_fakes.sgd_step_fake)


@torch.library.custom_op(
    "pyfastdl_triton::adam_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps",
                  "master_params"))
def adam_step_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
               exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor],
               state_steps: List[Tensor], master_params: List[Tensor], lr: float, beta1: float,
               beta2: float, weight_decay: float, eps: float, amsgrad: bool, maximize: bool,
               decoupled_weight_decay: bool, grad_scale: Optional[Tensor],
               found_inf: Optional[Tensor]) -> None:
    """One Adam / AdamW step (torch.optim.Adam/AdamW(foreach=False); Kingma & Ba 2015,
    Loshchilov & Hutter 2019) on every param, in place. exp_avgs, exp_avg_sqs (and
    max_exp_avg_sqs with amsgrad, else empty): the params' shapes, float32 for float16/bfloat16
    params. state_steps: 0-dim float32/float64, incremented. master_params: empty, or float32
    copies of float16/bfloat16 params, updated and rounded into params."""
    L = _adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                    master_params, amsgrad, grad_scale, found_inf)
    _check_launchable(L)
    if L.n == 0:
        return
    if not amsgrad:
        L.clear("max_exp_avg_sqs")
    with _device_guard(params[0]):
        L.dense()
        steps = _Steps(L, found_inf)
        t = steps.t
        coef = torch.stack([lr / (1 - torch.pow(beta1, t)), torch.sqrt(1 - torch.pow(beta2, t))],
                           1).to(_acc(L)).contiguous()
        _launch(_adam_kernel, L, 6,
                ([coef], _hyper(1 - beta1, beta2, 1 - beta2, weight_decay, 1 - lr * weight_decay,
                                eps)),
                grad_scale, found_inf,
                HAS_WD=weight_decay != 0, DECOUPLED=decoupled_weight_decay, AMSGRAD=amsgrad,
                HAS_MASTER=len(master_params) > 0, W_SMALL=abs(1 - beta1) < 0.5,
                MAXIMIZE=maximize)
        steps.commit()
        L.finish()


adam_step_.register_fake(_fakes.adam_step_fake)


@torch.library.custom_op("pyfastdl_triton::adagrad_step_",
                         mutates_args=("params", "state_sums", "state_steps"))
def adagrad_step_(params: List[Tensor], grads: List[Tensor], state_sums: List[Tensor],
                  state_steps: List[Tensor], lr: float, lr_decay: float, weight_decay: float,
                  eps: float, maximize: bool, grad_scale: Optional[Tensor],
                  found_inf: Optional[Tensor]) -> None:
    """One Adagrad step (torch.optim.Adagrad(foreach=False); Duchi et al. 2011) on every param,
    in place. state_sums: the params' shapes (float32 for float16/bfloat16 params);
    state_steps: 0-dim float32/float64, incremented."""
    L = _adagrad_lists(params, grads, state_sums, state_steps, grad_scale, found_inf)
    _check_launchable(L)
    if L.n == 0:
        return
    with _device_guard(params[0]):
        L.dense()
        steps = _Steps(L, found_inf)
        coef = (lr / (1 + (steps.t - 1) * lr_decay)).to(_acc(L)).contiguous()
        _launch(_adagrad_kernel, L, 3, ([coef], _hyper(weight_decay, eps)), grad_scale,
                found_inf, HAS_WD=weight_decay != 0, MAXIMIZE=maximize)
        steps.commit()
        L.finish()


adagrad_step_.register_fake(_fakes.adagrad_step_fake)


@torch.library.custom_op(
    "pyfastdl_triton::rmsprop_step_",
    mutates_args=("params", "square_avgs", "grad_avgs", "momentum_buffers", "state_steps"))
def rmsprop_step_(params: List[Tensor], grads: List[Tensor], square_avgs: List[Tensor],
                  grad_avgs: List[Tensor], momentum_buffers: List[Tensor],
                  state_steps: List[Tensor], lr: float, alpha: float, eps: float,
                  weight_decay: float, momentum: float, centered: bool, maximize: bool,
                  grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """One RMSprop step (torch.optim.RMSprop(foreach=False); Hinton's lecture 6e, centered
    variant of Graves 2013) on every param, in place. square_avgs; grad_avgs (centered, else
    empty); momentum_buffers (momentum > 0, else empty): the params' shapes, float32 for
    float16/bfloat16 params. state_steps: 0-dim float32/float64, incremented."""
    L = _rmsprop_lists(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps,
                       momentum, centered, grad_scale, found_inf)
    _check_launchable(L)
    if L.n == 0:
        return
    if not centered:
        L.clear("grad_avgs")
    if not momentum > 0:
        L.clear("momentum_buffers")
    with _device_guard(params[0]):
        L.dense()
        steps = _Steps(L, found_inf)
        _launch(_rmsprop_kernel, L, 5,
                ([], _hyper(lr, alpha, 1 - alpha, eps, weight_decay, momentum)),
                grad_scale, found_inf, HAS_WD=weight_decay != 0, CENTERED=centered,
                HAS_MOMENTUM=momentum > 0, W_SMALL=abs(1 - alpha) < 0.5, MAXIMIZE=maximize)
        steps.commit()
        L.finish()


rmsprop_step_.register_fake(_fakes.rmsprop_step_fake)


@torch.library.custom_op("pyfastdl_triton::adadelta_step_",
                         mutates_args=("params", "square_avgs", "acc_deltas", "state_steps"))
def adadelta_step_(params: List[Tensor], grads: List[Tensor], square_avgs: List[Tensor],
                   acc_deltas: List[Tensor], state_steps: List[Tensor], lr: float, rho: float,
                   eps: float, weight_decay: float, maximize: bool, grad_scale: Optional[Tensor],
                   found_inf: Optional[Tensor]) -> None:
    """One Adadelta step (torch.optim.Adadelta(foreach=False); Zeiler 2012) on every param, in
    place. square_avgs, acc_deltas: the params' shapes, float32 for float16/bfloat16 params.
    state_steps: 0-dim float32/float64, incremented."""
    L = _adadelta_lists(params, grads, square_avgs, acc_deltas, state_steps, grad_scale,
                        found_inf)
    _check_launchable(L)
    if L.n == 0:
        return
    with _device_guard(params[0]):
        L.dense()
        steps = _Steps(L, found_inf)
        _launch(_adadelta_kernel, L, 4,
                ([], _hyper(lr, rho, 1 - rho, eps, weight_decay)), grad_scale, found_inf,
                HAS_WD=weight_decay != 0, MAXIMIZE=maximize)
        steps.commit()
        L.finish()


adadelta_step_.register_fake(_fakes.adadelta_step_fake)


__all__ = ["sgd_step_", "adam_step_", "adagrad_step_", "rmsprop_step_", "adadelta_step_"]
