"""2-D convolution (cross-correlation, torch's conv2d), forward and backward, in Triton.

Registers two ops with the schemas of ``csrc/ops.cpp`` in the namespace ``pyfastdl_triton``::

    pyfastdl_triton::conv2d_fwd(input, weight, bias?, stride[2], padding[4], dilation[2], groups)
        -> output
    pyfastdl_triton::conv2d_bwd(grad_out, input, weight, stride[2], padding[4], dilation[2], groups,
                                output_mask[3]) -> (grad_input, grad_weight, grad_bias)

padding = (top, bottom, left, right) of zeros. Shapes (pyfastdl/autograd/conv2d.py, the one shape
rule): input (N, C_in, H, W), weight (C_out, Cg, kH, kW) with Cg = C_in / groups, Cog = C_out /
groups, output (N, C_out, H_out, W_out) in input's memory format.

All three passes are implicit GEMMs over one group g (the third grid axis), NHWC internally (the
launchers make input and grad_out channels_last, so the gathered rows run along contiguous
channels); the kernels address every tensor through its four strides, so the outputs are written
straight into the memory format the schema asks for::

    forward  out[m, co]  = sum_k  x[m, k] w[k, co]      M = N H_out W_out, K = kH kW Cg (kh, kw, ci)
             x[m, (kh, kw, ci)] = input[n, g Cg + ci, ho sh - top + kh dh, wo sw - left + kw dw],
             zero outside the input (masked loads: no padded copy)
    dgrad    gin[m, ci]  = sum_k  go[m, k] w[k, ci]     M = N H W, K = kH kW Cog (kh, kw, co)
             go[(n, h, w), (kh, kw, co)] = grad_out[n, g Cog + co, ho, wo] where
             h + top - kh dh = ho sh (divisible, 0 <= ho < H_out; likewise w), else zero: any stride
    wgrad    gw[co, k]   = sum_m  go[m, co] x[m, k]     a reduction over M = N H_out W_out, split in
             P chunks: each program writes its partial GEMM tile to a (P, C_out, K) buffer and a
             second kernel sums the P partials in a fixed order (deterministic, no atomics).
    gbias    gb[co]      = sum_m  go[m, co]             the same partial buffers (second kernel too).

Cg = 1 (depthwise, or a single input channel as in LeNet's first layer) has its own kernels
(``_conv2d_dw_*``): K = kH kW per channel is too short for a GEMM tile, so they accumulate
elementwise products over [positions, channels] tiles (channels contiguous in NHWC); their wgrad
uses the same split partial buffers and second sum.

Accumulation in float32 (float64 for float64). tl.dot: float16 / bfloat16 on the tensor cores;
float32 with TF32 tensor cores only when ``torch.backends.cudnn.allow_tf32`` says so (torch's rule
for convolutions), IEEE float32 otherwise (and always on CPU tensors under the interpreter).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import triton
import triton.language as tl

from ..autograd.conv2d import conv2d_bwd_shapes, conv2d_fwd_shapes, conv2d_out_size
from ._common import INTERPRETED as _INTERPRETED, device_guard as _device_guard

# ---------------------------------------------------------------------------------------------
# Tuning constants. Tests may shrink them to exercise the channel loops and the split reduction
# on tiny inputs under the interpreter.
# ---------------------------------------------------------------------------------------------
_MAX_BLOCK_M = 128  # GEMM rows (output / input positions) per program
_MAX_BLOCK_N = 128  # GEMM columns (channels) per program
_MAX_BLOCK_K = 64  # channels per tl.dot step
_MIN_BLOCK = 16  # tl.dot's smallest dimension
_WGRAD_BLOCK_R = 64  # positions per wgrad reduction step
_WGRAD_TARGET_PROGRAMS = 1024  # wgrad programs wanted (tiles x splits): fills an H100 several times
_MAX_SPLITS = 256  # partial buffers of the wgrad reduction, at most
_MAX_PARTIAL_ELEMS = 1 << 26  # elements of all partial buffers together, at most (256 MiB in float32)
_USE_DEPTHWISE = True  # Cg = 1 (depthwise, one input channel): the elementwise kernels, not the GEMM
_DW_BLOCK_M = 32  # positions per depthwise program
_DW_BLOCK_C = 64  # channels per depthwise program (contiguous in NHWC)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# =============================================================================================
# Kernels
# =============================================================================================
@triton.jit
def _dot(a, b, acc, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + a @ b. DOT_UPCAST (bfloat16 under the interpreter, whose bfloat16 tl.dot is wrong in
    Triton 3.8) multiplies the same bfloat16 values in float32, which is what the tensor cores do."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def _conv2d_fwd_kernel(
    x_ptr,  # input (N, C_in, H, W), strides (sxn, sxc, sxh, sxw): NHWC from the launcher
    w_ptr,  # weight (C_out, Cg, kH, kW), strides (swo, swi, swh, sww)
    b_ptr,  # bias (C_out,) (read if HAS_BIAS)
    y_ptr,  # output (N, C_out, H_out, W_out), strides (syn, syc, syh, syw): input's format
    M, H, W, H_out, W_out, Cg, Cog,  # M = N H_out W_out; Cg, Cog channels per group
    sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw,
    str_h, str_w, pad_t, pad_l, dil_h, dil_w,
    KH, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    wo = rm % W_out
    t = rm // W_out
    ho = t % H_out
    n = (t // H_out).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output channel within the group
    n_ok = rn < Cog
    co = g * Cog + rn
    rk = tl.arange(0, BLOCK_K)
    x_base = n * sxn + (g * Cg) * sxc
    w_base = co * swo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # One flat loop over the K tiles (kh, kw, channel block), so the compiler pipelines it whole.
    n_cb = tl.cdiv(Cg, BLOCK_K)
    for kt in range(0, KH * KW * n_cb):
        khw = kt // n_cb
        c0 = (kt - khw * n_cb) * BLOCK_K
        kh = khw // KW
        kw = khw - kh * KW
        ih = ho * str_h - pad_t + kh * dil_h
        iw = wo * str_w - pad_l + kw * dil_w
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_row = x_base + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        b_col = w_base + kh * swh + kw * sww
        ci = c0 + rk
        c_ok = ci < Cg
        a = tl.load(x_ptr + a_row[:, None] + ci[None, :] * sxc,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_ptr + b_col[None, :] + ci[:, None] * swi,
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_PREC, DOT_UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=n_ok, other=0.0).to(ACC)[None, :]
    y_row = n * syn + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw
    tl.store(y_ptr + y_row[:, None] + co[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv2d_dgrad_kernel(
    go_ptr,  # grad_out (N, C_out, H_out, W_out), strides (sgn, sgc, sgh, sgw): NHWC
    w_ptr,  # weight (C_out, Cg, kH, kW), strides (swo, swi, swh, sww)
    gi_ptr,  # grad_input (N, C_in, H, W), strides (sin, sic, sih, siw): input's format
    M, H, W, H_out, W_out, Cg, Cog,  # M = N H W
    sgn, sgc, sgh, sgw, swo, swi, swh, sww, sin, sic, sih, siw,
    str_h, str_w, pad_t, pad_l, dil_h, dil_w,
    KH, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # input positions (n, h, w)
    m_ok = rm < M
    w_ = rm % W
    t = rm // W
    h_ = t % H
    n = (t // H).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
    n_ok = rn < Cg
    ci = g * Cg + rn
    rk = tl.arange(0, BLOCK_K)
    go_base = n * sgn + (g * Cog) * sgc
    w_base = (g * Cog) * swo + rn * swi
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    n_cb = tl.cdiv(Cog, BLOCK_K)
    for kt in range(0, KH * KW * n_cb):  # one flat loop over (kh, kw, channel block)
        khw = kt // n_cb
        c0 = (kt - khw * n_cb) * BLOCK_K
        kh = khw // KW
        kw = khw - kh * KW
        hn = h_ + pad_t - kh * dil_h  # = ho * str_h for the output row ho that reads h at kh
        hc = tl.where(hn >= 0, hn, 0)
        ho = hc // str_h
        wn = w_ + pad_l - kw * dil_w
        wc = tl.where(wn >= 0, wn, 0)
        wo = wc // str_w
        row_ok = (m_ok & (hn >= 0) & (hc - ho * str_h == 0) & (ho < H_out)
                  & (wn >= 0) & (wc - wo * str_w == 0) & (wo < W_out))
        a_row = go_base + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
        b_col = w_base + kh * swh + kw * sww
        co = c0 + rk
        c_ok = co < Cog
        a = tl.load(go_ptr + a_row[:, None] + co[None, :] * sgc,
                    mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_ptr + b_col[None, :] + co[:, None] * swo,
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, DOT_PREC, DOT_UPCAST)
    gi_row = n * sin + h_.to(tl.int64) * sih + w_.to(tl.int64) * siw
    tl.store(gi_ptr + gi_row[:, None] + ci[None, :] * sic, acc.to(gi_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _conv2d_wgrad_kernel(
    go_ptr,  # grad_out (N, C_out, H_out, W_out), strides (sgn, sgc, sgh, sgw): NHWC
    x_ptr,  # input (N, C_in, H, W), strides (sxn, sxc, sxh, sxw): NHWC
    pw_ptr,  # weight partials (n_splits, C_out, KT) float32 / float64, k = (kh, kw, ci) (if DO_W)
    pb_ptr,  # bias partials (n_splits, C_out) (if DO_B)
    M, H, W, H_out, W_out, Cg, Cog, C_out, KT, CHUNK, n_splits,  # M = N H_out W_out, KT = kH kW Cg
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    str_h, str_w, pad_t, pad_l, dil_h, dil_w,
    KW: tl.constexpr, DO_W: tl.constexpr, DO_B: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    ACC: tl.constexpr, DOT_PREC: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """Partial sums over positions [split * CHUNK, (split + 1) * CHUNK) of gw[co, k] (k = (kh, kw,
    ci), ci fastest) into pw[split, g Cog + co, k], and of gb[co] into pb[split, g Cog + co] (by the
    programs of the first k block)."""
    pid_co = tl.program_id(0)
    pid_k = tl.program_id(1)
    gs = tl.program_id(2)
    g = (gs // n_splits).to(tl.int64)
    split = gs % n_splits
    rco = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = rco < Cog
    co = g * Cog + rco
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = rk < KT
    ci = rk % Cg
    khw = rk // Cg
    kh = khw // KW
    kw = khw % KW
    go_col = (g * Cog + rco) * sgc
    x_col = (g * Cg + ci) * sxc
    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=ACC)
    bacc = tl.zeros((BLOCK_CO,), dtype=ACC)
    r0 = split * CHUNK
    for r in range(r0, tl.minimum(r0 + CHUNK, M), BLOCK_R):
        rm = r + tl.arange(0, BLOCK_R)
        m_ok = rm < M
        wo = rm % W_out
        t = rm // W_out
        ho = t % H_out
        n = (t // H_out).to(tl.int64)
        go_row = n * sgn + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
        a = tl.load(go_ptr + go_col[:, None] + go_row[None, :],
                    mask=co_ok[:, None] & m_ok[None, :], other=0.0)  # [BLOCK_CO, BLOCK_R]
        if DO_B:
            bacc += tl.sum(a.to(ACC), 1)
        if DO_W:
            ih = ho[:, None] * str_h - pad_t + kh[None, :] * dil_h
            iw = wo[:, None] * str_w - pad_l + kw[None, :] * dil_w
            ok = (m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            b = tl.load(x_ptr + (n * sxn)[:, None] + x_col[None, :] + ih.to(tl.int64) * sxh
                        + iw.to(tl.int64) * sxw, mask=ok, other=0.0)  # [BLOCK_R, BLOCK_K]
            acc = _dot(a, b, acc, DOT_PREC, DOT_UPCAST)
    if DO_W:
        p_row = (split * C_out + co).to(tl.int64) * KT
        tl.store(pw_ptr + p_row[:, None] + rk[None, :], acc, mask=co_ok[:, None] & k_ok[None, :])
    if DO_B:
        tl.store(pb_ptr + split * C_out + co, bacc, mask=co_ok & (pid_k == 0))


@triton.jit
def _conv2d_sum_partials_kernel(
    p_ptr,  # partials (n_splits, L), contiguous
    out_ptr,  # grad_weight (C_out, Cg, kH, kW) contiguous (WEIGHT_LAYOUT), or grad_bias (L,)
    L, n_splits, Cg, KHW,
    WEIGHT_LAYOUT: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[i] = sum over the splits of p[split, i], in split order. WEIGHT_LAYOUT: i = co * KT + k
    with k = (kh, kw, ci) is stored at grad_weight[co, ci, kh, kw] (contiguous)."""
    ri = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = ri < L
    s = tl.load(p_ptr + ri, mask=ok, other=0.0)
    for sp in range(1, n_splits):
        s += tl.load(p_ptr + sp * L + ri, mask=ok, other=0.0)
    if WEIGHT_LAYOUT:
        KT = Cg * KHW
        co = ri // KT
        k = ri % KT
        dst = co * KT + (k % Cg) * KHW + k // Cg
    else:
        dst = ri
    tl.store(out_ptr + dst, s.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _conv2d_dw_fwd_kernel(
    x_ptr,  # input (N, C_in, H, W), strides (sxn, sxc, sxh, sxw): NHWC
    w_ptr,  # weight (C_out, 1, kH, kW), strides (swo, -, swh, sww)
    b_ptr,  # bias (C_out,) (if HAS_BIAS)
    y_ptr,  # output (N, C_out, H_out, W_out), strides (syn, syc, syh, syw)
    M, H, W, H_out, W_out, C_out, Cog,  # M = N H_out W_out, Cog = C_out / C_in
    sxn, sxc, sxh, sxw, swo, swh, sww, syn, syc, syh, syw,
    str_h, str_w, pad_t, pad_l, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Cg = 1 (depthwise, or one input channel): out[m, co] = sum_(kh, kw) x[m @ (kh, kw), co // Cog]
    w[co, kh, kw], elementwise products in ACC (no GEMM: K = kH kW per channel)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    wo = rm % W_out
    t = rm // W_out
    ho = t % H_out
    n = (t // H_out).to(tl.int64)
    co = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = co < C_out
    x_col = (co // Cog) * sxc
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for kh in range(KH):
        ih = ho * str_h - pad_t + kh * dil_h
        h_ok = m_ok & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = wo * str_w - pad_l + kw * dil_w
            row_ok = h_ok & (iw >= 0) & (iw < W)
            x_row = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            xv = tl.load(x_ptr + x_row[:, None] + x_col[None, :], mask=row_ok[:, None] & c_ok[None, :],
                         other=0.0)
            wv = tl.load(w_ptr + co * swo + kh * swh + kw * sww, mask=c_ok, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=c_ok, other=0.0).to(ACC)[None, :]
    y_row = n * syn + ho.to(tl.int64) * syh + wo.to(tl.int64) * syw
    tl.store(y_ptr + y_row[:, None] + co[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv2d_dw_dgrad_kernel(
    go_ptr,  # grad_out (N, C_out, H_out, W_out), strides (sgn, sgc, sgh, sgw): NHWC
    w_ptr,  # weight (C_out, 1, kH, kW), strides (swo, -, swh, sww)
    gi_ptr,  # grad_input (N, C_in, H, W), strides (sin, sic, sih, siw)
    M, H, W, H_out, W_out, C_in, Cog,  # M = N H W
    sgn, sgc, sgh, sgw, swo, swh, sww, sin, sic, sih, siw,
    str_h, str_w, pad_t, pad_l, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Cg = 1: gin[(n, h, w), ci] = sum over co = ci Cog + j and (kh, kw) of grad_out[(n, ho, wo), co]
    w[co, kh, kw] where h + pt - kh dh = ho sh (as _conv2d_dgrad_kernel)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = rm < M
    w_ = rm % W
    t = rm // W
    h_ = t % H
    n = (t // H).to(tl.int64)
    ci = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = ci < C_in
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=ACC)
    for kh in range(KH):
        hn = h_ + pad_t - kh * dil_h
        hc = tl.where(hn >= 0, hn, 0)
        ho = hc // str_h
        h_ok = m_ok & (hn >= 0) & (hc - ho * str_h == 0) & (ho < H_out)
        for kw in range(KW):
            wn = w_ + pad_l - kw * dil_w
            wc = tl.where(wn >= 0, wn, 0)
            wo = wc // str_w
            row_ok = h_ok & (wn >= 0) & (wc - wo * str_w == 0) & (wo < W_out)
            go_row = n * sgn + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
            for j in range(Cog):
                co = ci * Cog + j
                gv = tl.load(go_ptr + go_row[:, None] + (co * sgc)[None, :],
                             mask=row_ok[:, None] & c_ok[None, :], other=0.0)
                wv = tl.load(w_ptr + co * swo + kh * swh + kw * sww, mask=c_ok, other=0.0)
                acc += gv.to(ACC) * wv.to(ACC)[None, :]
    gi_row = n * sin + h_.to(tl.int64) * sih + w_.to(tl.int64) * siw
    tl.store(gi_ptr + gi_row[:, None] + ci[None, :] * sic, acc.to(gi_ptr.dtype.element_ty),
             mask=m_ok[:, None] & c_ok[None, :])


@triton.jit
def _conv2d_dw_wgrad_kernel(
    go_ptr,  # grad_out (N, C_out, H_out, W_out), strides (sgn, sgc, sgh, sgw): NHWC
    x_ptr,  # input (N, C_in, H, W), strides (sxn, sxc, sxh, sxw): NHWC
    pw_ptr,  # weight partials (splits, C_out, kH kW) (if DO_W)
    pb_ptr,  # bias partials (splits, C_out) (if DO_B)
    M, H, W, H_out, W_out, C_out, Cog, CHUNK,  # M = N H_out W_out
    sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
    str_h, str_w, pad_t, pad_l, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, DO_W: tl.constexpr, DO_B: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    """Cg = 1: partial sums over positions [split CHUNK, (split + 1) CHUNK) of gw[co, (kh, kw)] into
    pw[split, co, kh KW + kw] and of gb[co] into pb[split, co]: [BLOCK_R, BLOCK_C] elementwise
    accumulators, summed over the rows at the end."""
    co = (tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = co < C_out
    split = tl.program_id(1)
    r0 = split * CHUNK
    r1 = tl.minimum(r0 + CHUNK, M)
    x_col = (co // Cog) * sxc
    if DO_B:
        bacc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        for r in range(r0, r1, BLOCK_R):
            rm = r + tl.arange(0, BLOCK_R)
            m_ok = rm < r1
            wo = rm % W_out
            t = rm // W_out
            ho = t % H_out
            n = (t // H_out).to(tl.int64)
            go_row = n * sgn + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
            gv = tl.load(go_ptr + go_row[:, None] + (co * sgc)[None, :],
                         mask=m_ok[:, None] & c_ok[None, :], other=0.0)
            bacc += gv.to(ACC)
        tl.store(pb_ptr + split * C_out + co, tl.sum(bacc, 0), mask=c_ok)
    if DO_W:
        for kh in range(KH):
            for kw in range(KW):
                acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
                for r in range(r0, r1, BLOCK_R):
                    rm = r + tl.arange(0, BLOCK_R)
                    m_ok = rm < r1
                    wo = rm % W_out
                    t = rm // W_out
                    ho = t % H_out
                    n = (t // H_out).to(tl.int64)
                    go_row = n * sgn + ho.to(tl.int64) * sgh + wo.to(tl.int64) * sgw
                    gv = tl.load(go_ptr + go_row[:, None] + (co * sgc)[None, :],
                                 mask=m_ok[:, None] & c_ok[None, :], other=0.0)
                    ih = ho * str_h - pad_t + kh * dil_h
                    iw = wo * str_w - pad_l + kw * dil_w
                    ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    x_row = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
                    xv = tl.load(x_ptr + x_row[:, None] + x_col[None, :],
                                 mask=ok[:, None] & c_ok[None, :], other=0.0)
                    acc += gv.to(ACC) * xv.to(ACC)
                tl.store(pw_ptr + (split * C_out + co) * (KH * KW) + kh * KW + kw, tl.sum(acc, 0),
                         mask=c_ok)


# =============================================================================================
# Host side: checks, block sizes
# =============================================================================================
def _pow2_block(n: int, cap: int) -> int:
    return max(_MIN_BLOCK, min(cap, triton.next_power_of_2(max(n, 1))))


def _warps(bm: int, bn: int) -> int:
    """8 warps for the 128 x 128 tiles (128 float32 accumulators a thread), 4 below."""
    return 8 if bm * bn >= 128 * 128 else 4


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tf32_allowed() -> bool:
    """torch's rule for float32 convolutions (what at::globalContext().allowTF32CuDNN(CONV) reads):
    torch.backends.cudnn.conv.fp32_precision, "none" inheriting from cudnn's, then the global one;
    the legacy torch.backends.cudnn.allow_tf32 where the new API is missing."""
    try:
        prec = torch.backends.cudnn.conv.fp32_precision
        if prec == "none":
            prec = torch.backends.cudnn.fp32_precision
        if prec == "none":
            prec = torch.backends.fp32_precision
        return prec == "tf32"
    except AttributeError:  # pragma: no cover (older torch)
        return bool(torch.backends.cudnn.allow_tf32)


def _dot_meta(t: Tensor) -> dict:
    if t.dtype == torch.float32 and t.is_cuda and _tf32_allowed():
        prec = "tf32"
    else:
        prec = "ieee"
    return dict(ACC=_acc(t.dtype), DOT_PREC=prec,
                DOT_UPCAST=_INTERPRETED and t.dtype == torch.bfloat16)


def _ints(op: str, name: str, v: Sequence[int], n: int, what: str) -> List[int]:
    v = [int(x) for x in v]
    if len(v) != n:
        raise RuntimeError(f"{op}: expected {name} of {n} values {what}, got {len(v)}")
    return v


def _check_tensor(op: str, t: Tensor, name: str, input: Tensor) -> None:
    if t.dtype != input.dtype:
        raise RuntimeError(f"{op}: expected {name} of dtype {input.dtype} like input, got {name} of "
                           f"dtype {t.dtype}")
    if t.device != input.device:
        raise RuntimeError(f"{op}: expected {name} on {input.device} like input, got {name} on {t.device}")


def _check_common(op: str, input: Tensor, weight: Tensor, stride, padding, dilation,
                  groups: int) -> Tuple[int, int]:
    """The checks of csrc/common/conv2d.h (same order, same messages); returns (H_out, W_out)."""
    if input.dim() != 4:
        raise RuntimeError(f"{op}: expected input of rank 4, (N, C_in, H, W), got input of rank "
                           f"{input.dim()} and shape {list(input.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"{op}: expected weight of rank 4, (C_out, C_in / groups, kH, kW), got "
                           f"weight of rank {weight.dim()} and shape {list(weight.shape)}")
    stride = _ints(op, "stride", stride, 2, "(sh, sw)")
    padding = _ints(op, "padding", padding, 4, "(top, bottom, left, right)")
    dilation = _ints(op, "dilation", dilation, 2, "(dh, dw)")
    if min(stride) < 1:
        raise RuntimeError(f"{op}: expected stride >= 1, got stride = {stride}")
    if min(dilation) < 1:
        raise RuntimeError(f"{op}: expected dilation >= 1, got dilation = {dilation}")
    if min(padding) < 0:
        raise RuntimeError(f"{op}: expected padding >= 0, got padding = {padding}")
    if groups < 1:
        raise RuntimeError(f"{op}: expected groups >= 1, got groups = {groups}")
    _check_tensor(op, weight, "weight", input)
    if input.dtype not in _DTYPES:
        raise RuntimeError(f"{op}: input dtype {input.dtype} is not supported by this kernel on "
                           f"{input.device.type}")
    N, C_in, H, W = input.shape
    C_out, Cg, kH, kW = weight.shape
    if C_in % groups != 0:
        raise RuntimeError(f"{op}: expected input channels (input.size(1) = {C_in}) divisible by "
                           f"groups = {groups}")
    if C_out % groups != 0:
        raise RuntimeError(f"{op}: expected output channels (weight.size(0) = {C_out}) divisible by "
                           f"groups = {groups}")
    if Cg != C_in // groups:
        raise RuntimeError(f"{op}: expected weight.size(1) = input channels / groups = {C_in} / "
                           f"{groups} = {C_in // groups}, got weight of shape {list(weight.shape)}")
    if kH < 1 or kW < 1:
        raise RuntimeError(f"{op}: expected a kernel of size >= 1, got weight of shape {list(weight.shape)}")
    eff_h, eff_w = dilation[0] * (kH - 1) + 1, dilation[1] * (kW - 1) + 1
    ph, pw = H + padding[0] + padding[1], W + padding[2] + padding[3]
    if eff_h > ph or eff_w > pw:
        raise RuntimeError(f"{op}: the kernel ({eff_h} x {eff_w} with dilation; weight of shape "
                           f"{list(weight.shape)}) is larger than the padded input ({ph} x {pw}; input "
                           f"of shape {list(input.shape)}, padding {padding})")
    return conv2d_out_size(H, W, kH, kW, stride, padding, dilation)


def _check_bias(op: str, bias: Optional[Tensor], weight: Tensor, input: Tensor) -> None:
    if bias is None:
        return
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise RuntimeError(f"{op}: expected bias of shape ({weight.shape[0]},) to match output "
                           f"channels (weight.size(0)), got bias of shape {list(bias.shape)}")
    _check_tensor(op, bias, "bias", input)


def _check_grad_out(op: str, grad_out: Tensor, input: Tensor, weight: Tensor, H_out: int,
                    W_out: int) -> None:
    want = [input.shape[0], weight.shape[0], H_out, W_out]
    if list(grad_out.shape) != want:
        raise RuntimeError(f"{op}: expected grad_out of shape {tuple(want)} (the forward output's), "
                           f"got grad_out of shape {list(grad_out.shape)}")
    _check_tensor(op, grad_out, "grad_out", input)


def _check_launchable(op: str, t: Tensor) -> None:
    if t.device.type == "cuda" or (t.device.type == "cpu" and _INTERPRETED):
        return
    raise RuntimeError(f"{op}: the Triton kernels run on CUDA tensors, or on CPU tensors under "
                       f"TRITON_INTERPRET=1 (set before triton is first imported); got a tensor on "
                       f"{t.device}")


def _nhwc(t: Tensor) -> Tensor:
    """The kernels' layout: channels innermost (a copy only when t is not channels_last already)."""
    return t.contiguous(memory_format=torch.channels_last)


def _strides(t: Tensor) -> List[int]:
    return list(t.stride())


def _dw_blocks(M: int, C: int) -> Tuple[int, int]:
    """(positions, channels) per depthwise program."""
    return (min(_DW_BLOCK_M, triton.next_power_of_2(max(M, 1))),
            min(_DW_BLOCK_C, triton.next_power_of_2(max(C, 1))))


def _wgrad_splits(M: int, tiles: int, elems: int = 0) -> Tuple[int, int]:
    """(splits, chunk) of the wgrad reduction over M positions: enough programs with `tiles` output
    tiles, chunks a multiple of _WGRAD_BLOCK_R, and at most _MAX_PARTIAL_ELEMS partial sums of
    `elems` each. A function of the shape only: deterministic."""
    steps = triton.cdiv(M, _WGRAD_BLOCK_R)
    splits = max(1, min(steps, _MAX_SPLITS, triton.cdiv(_WGRAD_TARGET_PROGRAMS, max(tiles, 1)),
                        _MAX_PARTIAL_ELEMS // max(elems, 1)))
    chunk = triton.cdiv(steps, splits) * _WGRAD_BLOCK_R
    return triton.cdiv(M, chunk), chunk


# =============================================================================================
# The ops
# =============================================================================================
_FWD_SCHEMA = ("(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
               "int[2] dilation, int groups) -> Tensor")
_BWD_SCHEMA = ("(Tensor grad_out, Tensor input, Tensor weight, int[2] stride, int[4] padding, "
               "int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)")


@torch.library.custom_op("pyfastdl_triton::conv2d_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def conv2d_fwd(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
               padding: List[int], dilation: List[int], groups: int) -> Tensor:
    """conv2d forward (csrc/ops.cpp): output (N, C_out, H_out, W_out) in input's memory format."""
    op = "conv2d"  # the C++ launchers' name (csrc/common/conv2d.h)
    H_out, W_out = _check_common(op, input, weight, stride, padding, dilation, groups)
    _check_bias(op, bias, weight, input)
    _check_launchable(op, input)
    out = conv2d_fwd_shapes(input, weight, stride, padding, dilation)
    N, C_in, H, W = input.shape
    C_out, Cg, kH, kW = weight.shape
    Cog = C_out // groups
    if out.numel() == 0:
        return out
    x = _nhwc(input)
    M = N * H_out * W_out
    if Cg == 1 and _USE_DEPTHWISE:
        BM, BC = _dw_blocks(M, C_out)
        with _device_guard(input):
            _conv2d_dw_fwd_kernel[(triton.cdiv(M, BM), triton.cdiv(C_out, BC))](
                x, weight, bias if bias is not None else weight, out,
                M, H, W, H_out, W_out, C_out, Cog, *_strides(x),
                weight.stride(0), weight.stride(2), weight.stride(3), *_strides(out),
                stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
                KH=kH, KW=kW, HAS_BIAS=bias is not None, BLOCK_M=BM, BLOCK_C=BC,
                ACC=_acc(input.dtype), num_warps=4)
        return out
    BM = _pow2_block(M, _MAX_BLOCK_M)
    BN = _pow2_block(Cog, _MAX_BLOCK_N)
    BK = _pow2_block(Cg, _MAX_BLOCK_K)
    grid = (triton.cdiv(M, BM), triton.cdiv(Cog, BN), groups)
    with _device_guard(input):
        _conv2d_fwd_kernel[grid](
            x, weight, bias if bias is not None else weight, out,
            M, H, W, H_out, W_out, Cg, Cog,
            *_strides(x), *_strides(weight), *_strides(out),
            stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
            KH=kH, KW=kW, HAS_BIAS=bias is not None, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
            num_warps=_warps(BM, BN), **_dot_meta(input))
    return out


@conv2d_fwd.register_fake
def _conv2d_fwd_fake(input, weight, bias, stride, padding, dilation, groups):
    return conv2d_fwd_shapes(input, weight, stride, padding, dilation)


@torch.library.custom_op("pyfastdl_triton::conv2d_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def conv2d_bwd(grad_out: Tensor, input: Tensor, weight: Tensor, stride: List[int],
               padding: List[int], dilation: List[int], groups: int,
               output_mask: List[bool]) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """conv2d backward (csrc/ops.cpp): (grad_input in input's memory format, grad_weight
    contiguous, grad_bias (C_out,)); None where output_mask is False."""
    op = "conv2d_bwd"
    H_out, W_out = _check_common(op, input, weight, stride, padding, dilation, groups)
    _check_grad_out(op, grad_out, input, weight, H_out, W_out)
    if len(output_mask) != 3:
        raise RuntimeError(f"{op}: expected output_mask of 3 bools, got {list(output_mask)}")
    _check_launchable(op, input)
    need_gi, need_gw, need_gb = (bool(v) for v in output_mask)
    gi, gw, gb = conv2d_bwd_shapes(input, weight, (need_gi, need_gw, need_gb))
    N, C_in, H, W = input.shape
    C_out, Cg, kH, kW = weight.shape
    Cog = C_out // groups
    M_out = N * H_out * W_out
    if M_out == 0 or Cog == 0:  # nothing flows back: every gradient is zero
        return tuple(t.zero_() if t is not None else None for t in (gi, gw, gb))
    go = _nhwc(grad_out)
    meta = _dot_meta(input)
    acc_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    with _device_guard(input):
        if need_gi and gi.numel() > 0 and Cg == 1 and _USE_DEPTHWISE:
            M = N * H * W
            BM, BC = _dw_blocks(M, C_in)
            _conv2d_dw_dgrad_kernel[(triton.cdiv(M, BM), triton.cdiv(C_in, BC))](
                go, weight, gi, M, H, W, H_out, W_out, C_in, Cog,
                *_strides(go), weight.stride(0), weight.stride(2), weight.stride(3), *_strides(gi),
                stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
                KH=kH, KW=kW, BLOCK_M=BM, BLOCK_C=BC, ACC=meta["ACC"], num_warps=4)
        elif need_gi and gi.numel() > 0:
            M = N * H * W
            BM = _pow2_block(M, _MAX_BLOCK_M)
            BN = _pow2_block(Cg, _MAX_BLOCK_N)
            BK = _pow2_block(Cog, _MAX_BLOCK_K)
            grid = (triton.cdiv(M, BM), triton.cdiv(Cg, BN), groups)
            _conv2d_dgrad_kernel[grid](
                go, weight, gi, M, H, W, H_out, W_out, Cg, Cog,
                *_strides(go), *_strides(weight), *_strides(gi),
                stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
                KH=kH, KW=kW, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=_warps(BM, BN), **meta)
        do_w = need_gw and gw.numel() > 0
        if do_w or need_gb:
            x = _nhwc(input)
            KT = Cg * kH * kW
        if (do_w or need_gb) and Cg == 1 and _USE_DEPTHWISE:
            _, BC = _dw_blocks(M_out, C_out)
            splits, chunk = _wgrad_splits(M_out, triton.cdiv(C_out, BC), C_out * (KT + 1))
            pw = torch.empty((splits, C_out, KT) if do_w else (1,), dtype=acc_dtype,
                             device=input.device)
            pb = torch.empty((splits, C_out) if need_gb else (1,), dtype=acc_dtype,
                             device=input.device)
            _conv2d_dw_wgrad_kernel[(triton.cdiv(C_out, BC), splits)](
                go, x, pw, pb, M_out, H, W, H_out, W_out, C_out, Cog, chunk,
                *_strides(go), *_strides(x),
                stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
                KH=kH, KW=kW, DO_W=do_w, DO_B=need_gb, BLOCK_R=_WGRAD_BLOCK_R, BLOCK_C=BC,
                ACC=meta["ACC"], num_warps=4)
        elif do_w or need_gb:
            BCO = _pow2_block(Cog, _MAX_BLOCK_M)
            BK = _pow2_block(KT, _MAX_BLOCK_N) if do_w else _MIN_BLOCK
            n_k = triton.cdiv(KT, BK) if do_w else 1
            tiles = triton.cdiv(Cog, BCO) * n_k * groups
            splits, chunk = _wgrad_splits(M_out, tiles, C_out * (KT + 1))
            pw = torch.empty((splits, C_out, KT) if do_w else (1,), dtype=acc_dtype,
                             device=input.device)
            pb = torch.empty((splits, C_out) if need_gb else (1,), dtype=acc_dtype,
                             device=input.device)
            grid = (triton.cdiv(Cog, BCO), n_k, groups * splits)
            _conv2d_wgrad_kernel[grid](
                go, x, pw, pb, M_out, H, W, H_out, W_out, Cg, Cog, C_out, KT, chunk, splits,
                *_strides(go), *_strides(x),
                stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1],
                KW=kW, DO_W=do_w, DO_B=need_gb, BLOCK_CO=BCO, BLOCK_K=BK,
                BLOCK_R=_WGRAD_BLOCK_R, num_warps=_warps(BCO, BK), **meta)
        if do_w or need_gb:
            BLOCK = 1024
            if do_w:
                L = C_out * KT
                _conv2d_sum_partials_kernel[(triton.cdiv(L, BLOCK),)](
                    pw, gw, L, splits, Cg, kH * kW, WEIGHT_LAYOUT=True, BLOCK=BLOCK)
            if need_gb:
                _conv2d_sum_partials_kernel[(triton.cdiv(C_out, BLOCK),)](
                    pb, gb, C_out, splits, Cg, kH * kW, WEIGHT_LAYOUT=False, BLOCK=BLOCK)
    return gi, gw, gb


@conv2d_bwd.register_fake
def _conv2d_bwd_fake(grad_out, input, weight, stride, padding, dilation, groups, output_mask):
    return conv2d_bwd_shapes(input, weight, output_mask)


__all__ = ["conv2d_fwd", "conv2d_bwd"]
