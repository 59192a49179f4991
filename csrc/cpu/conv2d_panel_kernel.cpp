// conv2d "im2col panel" kernels on NCHW (at::vec SIMD + ATen parallel_for), compiled once per
// capability: setup.py defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and the matching -m flags.
//
// For one-group convolutions with few input channels whose output rows are short (LeNet's second
// convolution: 10 x 10 output planes, K = C_in kH kW = 150). The direct NCHW kernel
// (conv2d_kernel.cpp) vectorizes along one output row, and a row of 10 fills 1.25 vectors; the NHWC
// gather GEMM fills its output-channel lanes, but gathers 24-byte pieces per tile. Here the pixels of
// a whole plane are flattened (q = oh W_out + ow), so that a vector holds pixels of consecutive rows:
//
//   forward:    per task (image, chunk of pixels) the panel P[k][q] = x[ci][oh sh - pt + kh dh]
//               [ow sw - pl + kw dw] (k = (ci, kh, kw); zero on the padding) is packed straight from
//               the NCHW planes (row segments: vector copies at stride 1), and y[co][q] = bias[co] +
//               sum_k W[co][k] P[k][q] runs as a GEMM on it, written into the NCHW output directly.
//   grad_input: per task (image, input channel ci) D[t][q] = sum_co W[co][ci][t] g[co][q] (t = (kh, kw);
//               the same GEMM, contraction over C_out), then col2im along the input rows: gi[ci][ih]
//               [iw..iw+V) = sum over (kh, kw) of a vector of D's row t at the output row oh that reads
//               ih, lanes whose output column does not exist selected away (a blend, not a multiply by
//               zero: only products of grad_out pixels that exist are added, as torch does -- an inf in
//               the weight gives inf at the border, not 0 * inf = NaN). Stride 1 along W.
//
// The micro-kernel (gemm_tile) holds OCR x NV accumulators (4 rows x 3 pixel vectors: 12 on AVX2, with
// 3 panel vectors and one broadcast the 16 registers) and per step loads NV vectors of the panel row
// and broadcasts OCR values of the packed weights. Every output element is computed by one task in a
// fixed order: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/conv2d_panel_kernel.h"

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int OCR = 4;                       // rows of the register tile (output channels / taps)
constexpr int NVMAX = 3;                     // pixel vectors of the register tile
constexpr int64_t kPanelElems = 24 * 1024;   // elements of a task's panel (96 KiB float32: L2)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// floor division for a possibly negative numerator, b > 0
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// dst[0..n) = src[0..n): whole vectors, the last one overlapping the one before when n is not a multiple.
template <typename T>
inline void copy_run(const T* src, T* dst, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  if (n >= V) {
    int64_t j = 0;
    for (; j + V <= n; j += V) Vec::loadu(src + j).store(dst + j);
    if (j < n) Vec::loadu(src + n - V).store(dst + n - V);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
  }
}

// The panel of output pixels [q0, q1) of one image: panel[k * ld + (q - q0)] = the input value tap k of
// pixel q reads, zero on the padding; columns [q1 - q0, ld) zero. xn: the image's C_in planes (H x W).
// Per tap, output row by output row: the columns [lo, hi) that read inside the input row are one copy
// (stride 1: whole vectors), the rest zeros; nothing divided per segment.
template <typename T>
inline void zero_run(T* d, int64_t n) {
  for (int64_t j = 0; j < n; ++j) d[j] = T(0);
}

template <typename T>
void pack_panel(const T* xn, const conv::Params& p, int64_t q0, int64_t q1, T* panel, int64_t ld) {
  const int64_t Wo = p.W_out, sw = p.sw, sh = p.sh;
  const int64_t oh_a = q0 / Wo, oh_b = (q1 - 1) / Wo;  // output rows the chunk touches
  for (int64_t ci = 0, k = 0; ci < p.C_in; ++ci)
    for (int64_t kh = 0; kh < p.kH; ++kh)
      for (int64_t kw = 0; kw < p.kW; ++kw, ++k) {
        T* row = panel + k * ld;
        const int64_t a = p.pl - kw * p.dw;  // input column of output column ow: ow sw - a
        const int64_t c = kh * p.dh - p.pt;  // input row of output row oh: oh sh + c
        const int64_t lo_ow = std::min(Wo, a <= 0 ? int64_t(0) : ceil_div(a, sw));
        const int64_t hi_ow = std::clamp<int64_t>(floor_div(p.W - 1 + a, sw) + 1, lo_ow, Wo);
        const T* xc = xn + ci * p.H * p.W;
        // columns [owa, owb) of output row oh
        auto seg = [&](int64_t oh, int64_t owa, int64_t owb) {
          T* d = row + (oh * Wo + owa - q0);  // d[ow - owa]
          const int64_t ih = oh * sh + c;
          if (ih < 0 || ih >= p.H) {
            zero_run(d, owb - owa);
            return;
          }
          const int64_t lo = std::clamp(lo_ow, owa, owb), hi = std::clamp(hi_ow, lo, owb);
          zero_run(d, lo - owa);
          const T* xr = xc + ih * p.W;
          if (sw == 1) {
            copy_run(xr + (lo - a), d + (lo - owa), hi - lo);
          } else {
            for (int64_t ow = lo; ow < hi; ++ow) d[ow - owa] = xr[ow * sw - a];
          }
          zero_run(d + (hi - owa), owb - hi);
        };
        int64_t f0 = oh_a, f1 = oh_b + 1;  // whole output rows [f0, f1)
        if (q0 % Wo) {
          seg(oh_a, q0 % Wo, oh_a == oh_b ? q1 - oh_a * Wo : Wo);
          ++f0;
        }
        if (q1 % Wo && oh_b >= f0) {
          seg(oh_b, 0, q1 - oh_b * Wo);
          f1 = oh_b;
        }
        if (sw == 1 && lo_ow == 0 && hi_ow == Wo) {  // no column padding: a copy per row, zero rows outside
          const int64_t v0 = std::clamp<int64_t>(-floor_div(c, sh), f0, f1);
          const int64_t v1 = std::clamp<int64_t>(floor_div(p.H - 1 - c, sh) + 1, v0, f1);
          zero_run(row + (f0 * Wo - q0), (v0 - f0) * Wo);
          zero_run(row + (v1 * Wo - q0), (f1 - v1) * Wo);
          const T* src = xc + (v0 * sh + c) * p.W - a;
          T* d = row + (v0 * Wo - q0);
          for (int64_t oh = v0; oh < v1; ++oh, src += sh * p.W, d += Wo) copy_run(src, d, Wo);
        } else {
          for (int64_t oh = f0; oh < f1; ++oh) seg(oh, 0, Wo);
        }
        zero_run(row + (q1 - q0), ld - (q1 - q0));
      }
}

// ---- the micro-kernel --------------------------------------------------------------------------
// out[o][v V + l] = init[o] + sum_k a[k * lda + o] * b[k * ldb + v V + l], stored for o < ocr and the
// first `count` pixels (a[.. + o] is read for every o < OCR: the caller pads it).
// (not inlined: its 16 registers are allocated on their own, none held by the caller across the loop)
template <typename T, int NV>
__attribute__((noinline)) void gemm_tile(const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K,
                                         const T* init, T* const* out, int ocr, int64_t count) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc[OCR][NV];
#pragma GCC unroll 4
  for (int o = 0; o < OCR; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[o][v] = Vec(init[o]);
  for (int64_t k = 0; k < K; ++k, a += lda, b += ldb) {
    Vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + v * V);
#pragma GCC unroll 4
    for (int o = 0; o < OCR; ++o) {
      const Vec av(a[o]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[o][v] = at::vec::fmadd(av, bv[v], acc[o][v]);
    }
  }
#pragma GCC unroll 4
  for (int o = 0; o < OCR; ++o) {
    if (o >= ocr) break;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t n = count - v * V;
      if (n >= V) acc[o][v].store(out[o] + v * V);
      else if (n > 0) acc[o][v].store(out[o] + v * V, static_cast<int>(n));
    }
  }
}

template <typename T>
inline void gemm_tile_nv(int nv, const T* a, int64_t lda, const T* b, int64_t ldb, int64_t K, const T* init,
                         T* const* out, int ocr, int64_t count) {
  switch (nv) {
    case 3: gemm_tile<T, 3>(a, lda, b, ldb, K, init, out, ocr, count); break;
    case 2: gemm_tile<T, 2>(a, lda, b, ldb, K, init, out, ocr, count); break;
    default: gemm_tile<T, 1>(a, lda, b, ldb, K, init, out, ocr, count); break;
  }
}

// ---- forward -------------------------------------------------------------------------------------
// Tasks: (image, chunk of Q output pixels), Q a multiple of the tile (kPanelElems / K of them, or the
// whole plane). Per tile of NVMAX vectors of pixels, every block of OCR output channels in turn (the
// panel's K x tile slice stays in L1 across them).
template <typename T>
void fwd_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p,
              at::Tensor& y) {
  constexpr int64_t V = Vectorized<T>::size(), TILE = NVMAX * V;
  const int64_t K = p.C_in * p.kH * p.kW, P = p.H_out * p.W_out, Co = p.C_out;
  const int64_t ncb = ceil_div(Co, OCR);
  const T* wp = w.const_data_ptr<T>();
  std::vector<T> wpk(ncb * K * OCR, T(0)), bpad(ncb * OCR, T(0));  // wpk[cb][k][OCR]; zero past C_out
  for (int64_t co = 0; co < Co; ++co) {
    for (int64_t k = 0; k < K; ++k) wpk[((co / OCR) * K + k) * OCR + co % OCR] = wp[co * K + k];
    if (bias.defined()) bpad[co] = bias.const_data_ptr<T>()[co];
  }
  const int64_t Q = std::min(std::max<int64_t>(TILE, kPanelElems / K / TILE * TILE), ceil_div(P, V) * V);
  const int64_t nq = ceil_div(P, Q);
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  at::parallel_for(0, p.N * nq, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> panel(K * Q);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nq, q0 = (task % nq) * Q, q1 = std::min(P, q0 + Q), cnt = q1 - q0;
      pack_panel(xp + n * p.C_in * p.H * p.W, p, q0, q1, panel.data(), Q);
      for (int64_t j = 0; j < cnt; j += TILE) {
        const int64_t count = std::min(TILE, cnt - j);
        const int nv = static_cast<int>(ceil_div(count, V));
        for (int64_t cb = 0; cb < ncb; ++cb) {
          const int ocr = static_cast<int>(std::min<int64_t>(OCR, Co - cb * OCR));
          T* outs[OCR];
          for (int o = 0; o < OCR; ++o) outs[o] = yp + (n * Co + cb * OCR + std::min(o, ocr - 1)) * P + q0 + j;
          gemm_tile_nv<T>(nv, wpk.data() + cb * K * OCR, OCR, panel.data() + j, Q, K, bpad.data() + cb * OCR, outs,
                          ocr, count);
        }
      }
    }
  });
}

// ---- grad_input ----------------------------------------------------------------------------------
template <typename T>
void bwd_input_impl(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi) {
  using Vec = Vectorized<T>;
  using I = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
  constexpr int64_t V = Vec::size(), TILE = NVMAX * V;
  const int64_t Ci = p.C_in, Co = p.C_out, H = p.H, W = p.W, Ho = p.H_out, Wo = p.W_out;
  const int64_t nt = p.kH * p.kW, tp = ceil_div(nt, OCR) * OCR;  // taps, padded to the tile
  const int64_t P = Ho * Wo, Pv = ceil_div(P, V) * V;
  const T* wp = w.const_data_ptr<T>();
  std::vector<T> wg(Ci * Co * tp, T(0));  // wg[ci][co][t], zero past nt
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t ci = 0; ci < Ci; ++ci)
      for (int64_t t = 0; t < nt; ++t) wg[(ci * Co + co) * tp + t] = wp[(co * Ci + ci) * nt + t];
  const T zeros[OCR] = {};
  // col2im: vector blocks of an input row start at 0, V, 2V, ... and, for a tail, at W - V (recomputing
  // a few lanes of the block before); a row narrower than V is one block stored partially.
  std::vector<int64_t> blocks;
  for (int64_t b = 0; b + V <= W; b += V) blocks.push_back(b);
  if (W < V) blocks.push_back(0);
  else if (W % V) blocks.push_back(W - V);
  const int64_t nbk = static_cast<int64_t>(blocks.size());
  // mask[blk][kw]: lane l takes D[t][oh Wo + ow] with ow = iw0 + l + pl - kw dw when 0 <= ow < Wo
  std::vector<T> mbits(nbk * p.kW * V);
  for (int64_t bi = 0; bi < nbk; ++bi)
    for (int64_t kw = 0; kw < p.kW; ++kw)
      for (int64_t l = 0; l < V; ++l) {
        const int64_t ow = blocks[bi] + l + p.pl - kw * p.dw;
        const I bits = ow >= 0 && ow < Wo ? I(-1) : I(0);
        std::memcpy(&mbits[(bi * p.kW + kw) * V + l], &bits, sizeof(T));
      }
  // D's rows (stride Pv) with guards: lanes selected away may read up to (kW - 1) dw before row 0 and
  // W + pl + V past the last row
  const int64_t front = (p.kW - 1) * p.dw + V, back = W + p.pl + V;
  const T* gp = g.const_data_ptr<T>();
  T* gip = gi.mutable_data_ptr<T>();
  at::parallel_for(0, p.N * Ci, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> dbuf(front + tp * Pv + back, T(0));
    std::vector<T> gbuf(P % V ? Co * Pv : 0, T(0));  // grad_out planes padded to Pv (zeros past P)
    int64_t gbuf_n = -1;
    const Vec zero(T(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / Ci, ci = task % Ci;
      const T* gn = gp + n * Co * P;
      int64_t ldg = P;
      if (P % V) {
        if (gbuf_n != n) {
          for (int64_t co = 0; co < Co; ++co) std::copy(gn + co * P, gn + (co + 1) * P, gbuf.data() + co * Pv);
          gbuf_n = n;
        }
        gn = gbuf.data();
        ldg = Pv;
      }
      T* D = dbuf.data() + front;
      const T* wc = wg.data() + ci * Co * tp;
      for (int64_t j = 0; j < Pv; j += TILE) {
        const int64_t count = std::min(TILE, Pv - j);
        const int nv = static_cast<int>(ceil_div(count, V));
        for (int64_t t0 = 0; t0 < tp; t0 += OCR) {
          T* outs[OCR];
          for (int o = 0; o < OCR; ++o) outs[o] = D + (t0 + o) * Pv + j;
          gemm_tile_nv<T>(nv, wc + t0, tp, gn + j, ldg, Co, zeros, outs, OCR, count);
        }
      }
      T* gplane = gip + (n * Ci + ci) * H * W;
      for (int64_t ih = 0; ih < H; ++ih) {
        T* grow = gplane + ih * W;
        for (int64_t bi = 0; bi < nbk; ++bi) {
          const int64_t iw0 = blocks[bi];
          const T* mk = mbits.data() + bi * p.kW * V;
          Vec acc(T(0));
          for (int64_t kh = 0; kh < p.kH; ++kh) {
            const int64_t num = ih + p.pt - kh * p.dh;
            if (num < 0 || num % p.sh) continue;
            const int64_t oh = num / p.sh;
            if (oh >= Ho) continue;
            const T* src = D + kh * p.kW * Pv + oh * Wo + iw0 + p.pl;
            for (int64_t kw = 0; kw < p.kW; ++kw)
              acc = acc + Vec::blendv(zero, Vec::loadu(src + kw * (Pv - p.dw)), Vec::loadu(mk + kw * V));
          }
          if (W >= V) acc.store(grow + iw0);
          else acc.store(grow, static_cast<int>(W));
        }
      }
    }
  });
}

void fwd_nchw(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p, at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_panel_fwd_cpu", [&] { fwd_impl<scalar_t>(x, w, bias, p, y); });
}
void bwd_input_nchw(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_panel_bwd_input_cpu",
                             [&] { bwd_input_impl<scalar_t>(g, w, p, gi); });
}

const Conv2dPanelKernels kTable{&fwd_nchw, &bwd_input_nchw};

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(Conv2dPanelKernels, conv2d_panel_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
