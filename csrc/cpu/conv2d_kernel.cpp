// conv2d CPU kernels (at::vec SIMD + ATen parallel_for), compiled once per capability: setup.py
// defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and the matching -m flags.
//
// Layout: NHWC (channels_last) activations; weights packed once per call into the layout the
// micro-kernel reads. No im2col, no BLAS, no call into torch's convolution.
//
// Forward and grad_input are one "gather GEMM": out[m][c] = sum_tap sum_k A(m, tap)[k] * B[tap][k][c]
// where A(m, tap) is a pointer to the K contiguous channels of the input pixel that tap `tap` of output
// pixel m reads (nullptr = padding: a zero row). The micro-kernel holds an MR x NB tile of the output
// in registers (MR = 6 pixels, NB = 2 vectors of output channels: 12 accumulators on AVX2) and loops
// over (tap, k): per step two vector loads of the packed weights and MR broadcasts. A forward with
// few output channels per group (one vector, or a one-vector tail: 8 or 24 on AVX2) uses a 12 x 1
// vector tile instead, so no lanes multiply zero weights.
//   forward:    m = (n, oh, ow), K = C_in / groups,  B[g][nb][kh, kw][ci][NB oc]
//   grad_input: m = (n, ih, iw), K = C_out / groups, B[g][nb][kh, kw][oc][NB ci]; A = the grad_out
//               pixel (oh, ow) with oh * sh = ih + pt - kh * dh (none when not divisible: stride).
//               Input pixels of a row are visited by residue class of iw mod sw, so the taps that hit
//               nothing for a whole tile are skipped (stride 2: 3/4 of them).
// Few channels (K < 16: LeNet's C_in = 1 and 6, the stem's 3): the forward reads each kernel row of a
// pixel in place, kW * K contiguous values (one group, dilation 1 along W), so the K loop runs over
// kW * K per row; only pixels whose rows cross the left or right padding are gathered into a small
// buffer first (grad_input: every pixel, a per-tile im2col of MR rows, kH * kW * K at once). A whole
// tile of whole channel vectors is stored from the registers, bias added, with no tile buffer.
// grad_weight: per task (group, oc block, kh) an accumulator tile in memory, MR input channels x NB
// output channels per micro-kernel call, summed over the valid ow of each (n, oh) row in order.
// Small weights (bwd_weight_small): per task of 512 pixels a partial [tap][ci][C_out]; a kernel row of a
// pixel inside the input along W is again read in place as kW * C_in rows of the partial.
// Every output element is computed by one task in a fixed order: results do not depend on the
// thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/conv2d_kernel.h"
#include "cpu/conv2d_simd.h"

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int kMR = 6;                     // output pixels per micro-kernel tile (two vectors of channels)
constexpr int MR = kMR;
constexpr int kMR1 = 12;                   // ... with one vector of output channels (few of them)
constexpr int64_t kGatherBelow = 16;       // K below this: gather the taps of a tile first
constexpr int64_t kWeightChunkBytes = 192 * 1024;  // packed weights one task sweeps (L2)
constexpr int64_t kTilesPerTask = 8;

template <typename T, int NV = 2>
constexpr int64_t nb_of() { return NV * Vectorized<T>::size(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// floor division for a possibly negative numerator, b > 0
inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// ---- the micro-kernel -------------------------------------------------------------------------
// out[i][0..NB) = sum_{t: on[t]} sum_k ap[t * R + i][k] * B[t][k][0..NB),  i < R; NB = NV vectors.
// orow given: orow[i][0..NB) = out[i] + bias[0..NB) instead, stored from the registers (whole vectors:
// the caller's rows hold NB channels); out is not written.
template <typename T, int R, int NV>
inline void ukernel(const T* const* ap, const unsigned char* on, int64_t ntaps, int64_t K, const T* B,
                    T* out /* R x NB */, T* const* orow = nullptr, const T* bias = nullptr) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size(), NB = NV * V;
  static_assert(NV >= 1 && NV <= 4, "one to four vectors of output channels");
  Vec c[NV][R];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i) c[v][i] = Vec(T(0));
  for (int64_t t = 0; t < ntaps; ++t) {
    if (!on[t]) continue;
    const T* a[R];
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) a[i] = ap[t * R + i];
    const T* b = B + t * K * NB;
    for (int64_t k = 0; k < K; ++k, b += NB) {
      Vec bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + v * V);
#pragma GCC unroll 14
      for (int i = 0; i < R; ++i) {
        const Vec av(a[i][k]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) c[v][i] = at::vec::fmadd(av, bv[v], c[v][i]);
      }
    }
  }
  if (orow) {
    Vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(bias + v * V);
#pragma GCC unroll 14
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) (c[v][i] + bv[v]).store(orow[i] + v * V);
    return;
  }
#pragma GCC unroll 14
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) c[v][i].store(out + i * NB + v * V);
}

// ---- the gather GEMM driver (forward and grad_input) ------------------------------------------
// M output pixels; G groups; per group K contraction channels (A's pixel holds G * K channels) and
// c_g output channels; B: [G][nblk][ntaps][K][NB] (zero past c_g); bias_pad: [G][nblk * NB].
// a_fill(m, dst): dst[t * MR] = the pixel base (channel 0) tap t of pixel m reads, or nullptr, for
// every tap (the pixel's coordinates are computed once, not per tap); o_ptr(m): the output pixel
// base (channel 0); ocs: the output's channel stride (1: NHWC; H * W: NCHW, written directly so that
// an NCHW output needs no reorder). run: taps t .. t + run - 1 (t a multiple of run) of a pixel read
// adjacent pixels when all are inside (the forward's kernel row with dw == 1 and one group: run = kW).
// row_fill(m0, n, dst, stride) (forward, run > 1): for pixels m0 + i, i < n: dst[kh * stride + i] = the
// input pixel where kernel row kh of the pixel starts, or nullptr (top/bottom padding); returns the
// mask of the pixels whose rows lie inside the input along W (the others' dst is not set).
// skip_absent: a tap that no pixel of the tile reads is skipped (grad_input: the grad_out pixels that
// do not exist, stride 2: 3/4 of the taps). The forward passes false: its absent taps are the zero
// padding, multiplied as zeros like the rest of the tile, so that a non-finite weight gives NaN there
// for every pixel alike (0 * inf), whatever tile the pixel falls in.
struct NoRowFill {
  template <typename P>
  unsigned operator()(int64_t, int, P, int64_t) const { return 0; }
};

template <typename T, int NV = 2, int MR = kMR, typename AFill, typename OPtr, typename RowFill = NoRowFill>
void gather_gemm(int64_t M, int64_t G, int64_t ntaps, int64_t K, int64_t c_g, const T* B, const T* bias_pad,
                 const AFill& a_fill, const OPtr& o_ptr, int64_t ocs = 1, int64_t run = 1, bool skip_absent = true,
                 const RowFill* row_fill = nullptr) {
  using Vec = Vectorized<T>;
  constexpr int64_t NB = nb_of<T, NV>();
  const int64_t nblk = ceil_div(c_g, NB);
  const int64_t blk_elems = ntaps * K * NB;
  const int64_t bpc = std::max<int64_t>(1, std::min<int64_t>(nblk, kWeightChunkBytes / (blk_elems * int64_t(sizeof(T)))));
  const int64_t cpg = ceil_div(nblk, bpc);
  const int64_t ntiles = ceil_div(M, MR);
  const int64_t npc = ceil_div(ntiles, kTilesPerTask);
  const bool gather = K < kGatherBelow;
  // (run > 1: a kernel row of run taps read as one tap of run * K channels, where it lies inside)
  const std::vector<T> zeros(std::max<int64_t>(K * run, 1), T(0));
  at::parallel_for(0, G * cpg * npc, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> base(ntaps * MR), ptrs(ntaps * MR);
    std::vector<unsigned char> on(ntaps);
    std::vector<T> buf(gather ? MR * ntaps * K : 0);
    alignas(64) T tile[MR * NB];
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t occ = idx / npc, pc = idx % npc;
      const int64_t g = occ / cpg, nb0 = (occ % cpg) * bpc, nb1 = std::min(nblk, nb0 + bpc);
      const int64_t t_end = std::min(ntiles, (pc + 1) * kTilesPerTask);
      for (int64_t tile_i = pc * kTilesPerTask; tile_i < t_end; ++tile_i) {
        const int64_t m0 = tile_i * MR;
        // Pixel i's taps gathered into its row of buf ([t][K]: kH kernel rows of run * K channels).
        auto gather_pixel = [&](int i) -> T* {
          T* row = buf.data() + i * ntaps * K;
          for (int64_t t = 0; t < ntaps; ++t) {
            const T* src = base[t * MR + i];
            // a whole kernel row in one copy when its pixels are adjacent (G == 1, dilation 1 along W)
            if (run > 1 && t % run == 0 && src && base[(t + run - 1) * MR + i]) {
              std::copy(src, src + run * K, row + t * K);
              t += run - 1;
              continue;
            }
            // (whole vectors where K allows: K = 8, DenseNet's grad_input, is one load and store)
            T* dst = row + t * K;
            int64_t k = 0;
            if (src) {
              src += g * K;
              for (; k + Vec::size() <= K; k += Vec::size()) Vec::loadu(src + k).store(dst + k);
              for (; k < K; ++k) dst[k] = src[k];
            } else {
              for (; k + Vec::size() <= K; k += Vec::size()) Vec(T(0)).store(dst + k);
              for (; k < K; ++k) dst[k] = T(0);
            }
          }
          return row;
        };
        auto fill_pixel = [&](int i) {
          const int64_t m = m0 + i;
          if (m < M) {
            a_fill(m, base.data() + i, MR);
          } else {
            for (int64_t t = 0; t < ntaps; ++t) base[t * MR + i] = nullptr;
          }
        };
        // Few channels, kernel rows of adjacent pixels (run > 1, row_fill given: the forward): the
        // micro-kernel reads each pixel's kernel rows in place, as kH taps of run * K contiguous
        // channels (the packed weights' [kh][kw][k] order is the same; a row in the top or bottom
        // padding reads zeros). Only a pixel whose rows cross the left or right padding is gathered,
        // into its own row of buf. The same products in the same order as a gathered tile, without
        // the per-tap pointers and most of the copies.
        const bool by_rows = gather && run > 1 && row_fill != nullptr;
        const int64_t nrows = ntaps / run;
        if (by_rows) {
          const unsigned inside = (*row_fill)(m0, static_cast<int>(std::min<int64_t>(MR, M - m0)), ptrs.data(), MR);
          for (int i = 0; i < MR; ++i) {
            if (inside >> i & 1u) {
              for (int64_t r = 0; r < nrows; ++r)
                if (!ptrs[r * MR + i]) ptrs[r * MR + i] = zeros.data();
            } else {
              fill_pixel(i);
              const T* row = gather_pixel(i);
              for (int64_t r = 0; r < nrows; ++r) ptrs[r * MR + i] = row + r * run * K;
            }
          }
          for (int64_t r = 0; r < nrows; ++r) on[r] = 1;
        } else if (gather) {
          for (int i = 0; i < MR; ++i) {
            fill_pixel(i);
            ptrs[i] = gather_pixel(i);
          }
          on[0] = 1;
        } else {
          for (int i = 0; i < MR; ++i) fill_pixel(i);
          for (int64_t t = 0; t < ntaps; ++t) {
            bool any = false;
            for (int i = 0; i < MR; ++i) {
              const T* src = base[t * MR + i];
              any = any || src;
              ptrs[t * MR + i] = src ? src + g * K : zeros.data();
            }
            on[t] = any || !skip_absent;
          }
        }
        const int64_t nt = by_rows ? nrows : gather ? 1 : ntaps;
        const int64_t kk = by_rows ? run * K : gather ? ntaps * K : K;
        for (int64_t nb = nb0; nb < nb1; ++nb) {
          const int64_t c0 = nb * NB, nv = std::min<int64_t>(NB, c_g - c0);
          const T* bp = bias_pad + g * nblk * NB + c0;
          if (ocs == 1 && nv == NB && m0 + MR <= M) {  // a whole tile of whole vectors: no tile buffer
            T* orow[MR];
            for (int i = 0; i < MR; ++i) orow[i] = o_ptr(m0 + i) + g * c_g + c0;
            ukernel<T, MR, NV>(ptrs.data(), on.data(), nt, kk, B + (g * nblk + nb) * blk_elems, tile, orow, bp);
            continue;
          }
          ukernel<T, MR, NV>(ptrs.data(), on.data(), nt, kk, B + (g * nblk + nb) * blk_elems, tile);
          for (int i = 0; i < MR && m0 + i < M; ++i) {
            T* o = o_ptr(m0 + i) + (g * c_g + c0) * ocs;
            const T* s = tile + i * NB;
            if (ocs != 1) {
              for (int64_t j = 0; j < nv; ++j) o[j * ocs] = s[j] + bp[j];
            } else if (nv == NB) {
              for (int v = 0; v < NV; ++v)
                (Vec::loadu(s + v * Vec::size()) + Vec::loadu(bp + v * Vec::size())).store(o + v * Vec::size());
            } else {
              for (int64_t j = 0; j < nv; ++j) o[j] = s[j] + bp[j];
            }
          }
        }
      }
    }
  });
}

// Forward taps of output pixel m: dst[t * stride] = the NHWC input pixel tap t reads, or nullptr.
template <typename T>
inline void fwd_fill(const T* xp, const conv::Params& p, int64_t m, const T** dst, int64_t stride) {
  const int64_t HWo = p.H_out * p.W_out;
  const int64_t n = m / HWo, r = m % HWo, oh = r / p.W_out, ow = r % p.W_out;
  const int64_t ih0 = oh * p.sh - p.pt, iw0 = ow * p.sw - p.pl;
  const T* xn = xp + n * p.H * p.W * p.C_in;
  for (int64_t kh = 0; kh < p.kH; ++kh) {
    const int64_t ih = ih0 + kh * p.dh;
    const bool hok = ih >= 0 && ih < p.H;
    for (int64_t kw = 0; kw < p.kW; ++kw) {
      const int64_t iw = iw0 + kw * p.dw;
      dst[(kh * p.kW + kw) * stride] = hok && iw >= 0 && iw < p.W ? xn + (ih * p.W + iw) * p.C_in : nullptr;
    }
  }
}

// Depthwise (one input and one output channel per group): vectorized over the C channels of an NHWC
// pixel. out[m][c] = bias[c] + sum_t src(m, t)[c] * w[c][t]; w: (C, 1, kH, kW) contiguous; bias_pad
// padded per channel block of NB (here: G = C groups of 1 channel, so bias_pad[c * NB]).
template <typename T, typename AFill, typename OPtr>
void depthwise(int64_t M, int64_t C, int64_t ntaps, const T* w, const T* bias_pad, const AFill& a_fill,
               const OPtr& o_ptr) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size(), NB = nb_of<T>();
  std::vector<T> wt(ntaps * C), bias(C);  // wt[t][c]
  for (int64_t c = 0; c < C; ++c) {
    bias[c] = bias_pad[c * NB];
    for (int64_t t = 0; t < ntaps; ++t) wt[t * C + c] = w[c * ntaps + t];
  }
  at::parallel_for(0, M, 64, [&](int64_t b, int64_t e) {
    std::vector<const T*> src(ntaps);
    for (int64_t m = b; m < e; ++m) {
      a_fill(m, src.data(), 1);
      T* o = o_ptr(m);
      int64_t c = 0;
      for (; c + 2 * V <= C; c += 2 * V) {
        Vec a0 = Vec::loadu(bias.data() + c), a1 = Vec::loadu(bias.data() + c + V);
        for (int64_t t = 0; t < ntaps; ++t) {
          if (!src[t]) continue;
          a0 = at::vec::fmadd(Vec::loadu(src[t] + c), Vec::loadu(wt.data() + t * C + c), a0);
          a1 = at::vec::fmadd(Vec::loadu(src[t] + c + V), Vec::loadu(wt.data() + t * C + c + V), a1);
        }
        a0.store(o + c);
        a1.store(o + c + V);
      }
      for (; c < C; c += V) {
        const int64_t nv = std::min<int64_t>(V, C - c);
        Vec a0 = Vec::loadu(bias.data() + c, nv);
        for (int64_t t = 0; t < ntaps; ++t) {
          if (!src[t]) continue;
          a0 = at::vec::fmadd(Vec::loadu(src[t] + c, nv), Vec::loadu(wt.data() + t * C + c, nv), a0);
        }
        a0.store(o + c, nv);
      }
    }
  });
}

// ---- direct NCHW forward for few input channels (LeNet's C_in = 1 and 6, the stem), 1x1 downsamples and depthwise --
// Vectorized along ow: an OCR x NV tile (OCR output channels x NV vectors of consecutive ow of one
// output row) in registers; per (ci, kh, kw) NV unaligned loads of a zero-padded input row and OCR
// weight broadcasts. Each task pads the input rows it reads (C_in x rows x Wp) once.
// (not inlined: its 16 registers are allocated on their own, none held by the caller across the loop)
template <typename T, int OCR, int NV>
__attribute__((noinline)) void nchw_tile(const T* const* rows /* [C_in * kH] padded rows, offset to ow0 */, int64_t cin, int64_t kH,
                      int64_t kW, const int64_t* koff /* [kW] offset of tap kw from the row */,
                      const T* w /* oc0's weights, (OCR, cin, kH, kW) */, const T* bias,
                      T* const* out /* OCR output rows, offset to ow0 */, int64_t count) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t ksz = cin * kH * kW;
  Vec acc[OCR][NV];
#pragma GCC unroll 8
  for (int o = 0; o < OCR; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[o][v] = Vec(bias[o]);
  for (int64_t r = 0; r < cin * kH; ++r) {
    const T* row = rows[r];
    for (int64_t kw = 0; kw < kW; ++kw) {
      Vec xv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) xv[v] = Vec::loadu(row + koff[kw] + v * V);
      const int64_t wi = r * kW + kw;
#pragma GCC unroll 8
      for (int o = 0; o < OCR; ++o) {
        const Vec wv(w[o * ksz + wi]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[o][v] = at::vec::fmadd(xv[v], wv, acc[o][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int o = 0; o < OCR; ++o)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t n = std::min<int64_t>(V, count - v * V);
      if (n >= V) acc[o][v].store(out[o] + v * V);
      else if (n > 0) acc[o][v].store(out[o] + v * V, n);
    }
}

template <typename T, int OCR>
inline void nchw_tile_nv(int nv, const T* const* rows, int64_t cin, int64_t kH, int64_t kW, const int64_t* koff, const T* w,
                         const T* bias, T* const* out, int64_t count) {
  switch (nv) {
    case 4: if constexpr (Vectorized<T>::size() == 16) nchw_tile<T, OCR, 4>(rows, cin, kH, kW, koff, w, bias, out, count); break;
    case 3: nchw_tile<T, OCR, 3>(rows, cin, kH, kW, koff, w, bias, out, count); break;
    case 2: nchw_tile<T, OCR, 2>(rows, cin, kH, kW, koff, w, bias, out, count); break;
    default: nchw_tile<T, OCR, 1>(rows, cin, kH, kW, koff, w, bias, out, count); break;
  }
}

template <typename T>
void fwd_nchw_small(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p,
                    at::Tensor& y) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  // 4 output channels x 3 vectors: 12 accumulators, 3 input vectors and one broadcast weight, the 16
  // registers of AVX2. (3 x 4 needed 17: two accumulators lived on the stack, each step's FMA waiting on
  // the previous one's store: the stem's forward at 45% of peak, 2026-12-01.) AVX-512 (32 registers):
  // 8 x 3, 24 accumulators, half the input loads per FMA.
  constexpr int OCR = V == 16 ? 6 : 4, NVMAX = V == 16 ? 4 : 3;
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  std::vector<T> b(p.C_out + OCR, T(0));
  if (bias.defined())
    for (int64_t c = 0; c < p.C_out; ++c) b[c] = bias.const_data_ptr<T>()[c];
  const int64_t C = p.C_in, H = p.H, W = p.W, Ho = p.H_out, Wo = p.W_out;
  // Stride along W (the stem, 1x1 downsamples): the padded rows are split by column phase (column j of
  // phase ph holds padded column j sw + ph), so that tap kw of V consecutive outputs reads V adjacent
  // columns: phase (kw dw) % sw, column ow + (kw dw) / sw.
  const int64_t sw = p.sw;
  const int64_t Wp = ceil_div(Wo, NVMAX * V) * NVMAX * V + ((p.kW - 1) * p.dw) / sw;  // padded row width
  const bool depthwise = p.groups > 1;  // the launcher sends groups == 1, or depthwise (C_in == C_out == groups)
  // tasks: (n, block of output rows)
  const int64_t hb = std::max<int64_t>(1, std::min<int64_t>(Ho, 8));
  const int64_t nhb = ceil_div(Ho, hb);
  at::parallel_for(0, p.N * nhb, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> pad;
    std::vector<const T*> rows(C * p.kH);
    std::vector<int64_t> koff(p.kW);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nhb, oh0 = (task % nhb) * hb, oh1 = std::min(Ho, oh0 + hb);
      const int64_t r0 = oh0 * p.sh - p.pt, nr = ((oh1 - 1) * p.sh - p.pt + (p.kH - 1) * p.dh) - r0 + 1;  // rows r0..
      pad.assign(C * sw * nr * Wp, T(0));
      for (int64_t c = 0; c < C; ++c)
        for (int64_t ph = 0; ph < sw; ++ph)
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t ih = r0 + r;
            if (ih < 0 || ih >= H) continue;
            const T* src = xp + ((n * C + c) * H + ih) * W;
            T* dst = pad.data() + ((c * sw + ph) * nr + r) * Wp;
            const int64_t j0 = std::max<int64_t>(0, ceil_div(p.pl - ph, sw));
            const int64_t j1 = std::min<int64_t>(Wp, floor_div(W - 1 + p.pl - ph, sw) + 1);
            if (sw == 1) std::copy(src + j0 - p.pl, src + j1 - p.pl, dst + j0);
            else for (int64_t j = j0; j < j1; ++j) dst[j] = src[j * sw + ph - p.pl];
          }
      for (int64_t kw = 0; kw < p.kW; ++kw) koff[kw] = ((kw * p.dw) % sw) * nr * Wp + (kw * p.dw) / sw;
      if (depthwise) {  // output channel c reads input channel c only
        for (int64_t oh = oh0; oh < oh1; ++oh)
          for (int64_t c = 0; c < C; ++c)
            for (int64_t ow0 = 0; ow0 < Wo; ow0 += NVMAX * V) {
              const int64_t count = std::min<int64_t>(NVMAX * V, Wo - ow0);
              for (int64_t kh = 0; kh < p.kH; ++kh)
                rows[kh] = pad.data() + (c * sw * nr + (oh - oh0) * p.sh + kh * p.dh) * Wp + ow0;
              T* outs[1] = {yp + ((n * C + c) * Ho + oh) * Wo + ow0};
              nchw_tile_nv<T, 1>(static_cast<int>(ceil_div(count, V)), rows.data(), 1, p.kH, p.kW, koff.data(),
                                 wp + c * p.kH * p.kW, b.data() + c, outs, count);
            }
        continue;
      }
      for (int64_t oh = oh0; oh < oh1; ++oh)
        for (int64_t oc0 = 0; oc0 < p.C_out; oc0 += OCR) {
          const int ocr = static_cast<int>(std::min<int64_t>(OCR, p.C_out - oc0));
          for (int64_t ow0 = 0; ow0 < Wo; ow0 += NVMAX * V) {
            const int64_t count = std::min<int64_t>(NVMAX * V, Wo - ow0);
            const int nv = static_cast<int>(ceil_div(count, V));
            for (int64_t c = 0; c < C; ++c)
              for (int64_t kh = 0; kh < p.kH; ++kh)
                rows[c * p.kH + kh] = pad.data() + (c * sw * nr + (oh - oh0) * p.sh + kh * p.dh) * Wp + ow0;
            T* outs[OCR];
            for (int o = 0; o < OCR; ++o)
              outs[o] = yp + ((n * p.C_out + oc0 + std::min(o, ocr - 1)) * Ho + oh) * Wo + ow0;
            const T* wo = wp + oc0 * C * p.kH * p.kW;
            switch (ocr) {
#define PYFASTDL_NCHW_TILE(RR)                                                                                  \
  case RR:                                                                                                      \
    if constexpr (RR <= OCR)                                                                                    \
      nchw_tile_nv<T, RR>(nv, rows.data(), C, p.kH, p.kW, koff.data(), wo, b.data() + oc0, outs, count);       \
    break;
              PYFASTDL_NCHW_TILE(8) PYFASTDL_NCHW_TILE(7) PYFASTDL_NCHW_TILE(6) PYFASTDL_NCHW_TILE(5)
              PYFASTDL_NCHW_TILE(4) PYFASTDL_NCHW_TILE(3) PYFASTDL_NCHW_TILE(2)
#undef PYFASTDL_NCHW_TILE
              default: nchw_tile_nv<T, 1>(nv, rows.data(), C, p.kH, p.kW, koff.data(), wo, b.data() + oc0, outs, count);
            }
          }
        }
    }
  });
}

// ---- depthwise on NHWC, pixel-blocked ------------------------------------------------------------
// Forward: per output row, R consecutive output pixels x one vector of channels in registers; per tap
// one weight vector, shared by the R pixels. The pixels whose taps all lie inside the row (interior)
// run unchecked in blocks of 8 and 4; the border pixels one at a time, tap by tap checked. Rows of
// the kernel outside the input are skipped. Tasks: output rows.
template <typename T>
inline Vectorized<T> ld(const T* p, int64_t cnt) {
  return cnt == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, cnt);
}

template <typename T, int R>
inline void dw_fwd_block(const T* const* rows, const T* wt, const T* bias, int64_t C, int64_t kH, int64_t kW,
                         int64_t sw, int64_t dw, int64_t iw0, T* y /* pixel 0 of the block */) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  for (int64_t c = 0; c < C; c += V) {
    const int64_t cnt = std::min<int64_t>(V, C - c);
    Vec acc[R];
    const Vec b = ld(bias + c, cnt);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) acc[i] = b;
    for (int64_t kh = 0; kh < kH; ++kh) {
      if (!rows[kh]) continue;
      const T* xr = rows[kh] + iw0 * C + c;
      for (int64_t kw = 0; kw < kW; ++kw) {
        const Vec wv = ld(wt + (kh * kW + kw) * C + c, cnt);
        const T* xk = xr + kw * dw * C;
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) acc[i] = at::vec::fmadd(ld(xk + i * sw * C, cnt), wv, acc[i]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) acc[i].store(y + i * C + c, static_cast<int>(cnt));
  }
}

template <typename T>
void dw_fwd_nhwc(const T* xp, const T* w /* (C, 1, kH, kW) */, const T* bias_or_null, const conv::Params& p, T* yp) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t C = p.C_in, kH = p.kH, kW = p.kW, ntaps = kH * kW, Ho = p.H_out, Wo = p.W_out;
  std::vector<T> wt(ntaps * C), bias(C, T(0));  // wt[t][c]
  for (int64_t c = 0; c < C; ++c) {
    if (bias_or_null) bias[c] = bias_or_null[c];
    for (int64_t t = 0; t < ntaps; ++t) wt[t * C + c] = w[c * ntaps + t];
  }
  // interior output columns: 0 <= ow sw - pl and ow sw - pl + (kW - 1) dw <= W - 1
  const int64_t ow_lo = std::min<int64_t>(Wo, ceil_div(p.pl, p.sw));
  const int64_t ow_hi = std::max<int64_t>(ow_lo, std::min<int64_t>(Wo, floor_div(p.W - 1 + p.pl - (kW - 1) * p.dw, p.sw) + 1));
  at::parallel_for(0, p.N * Ho, 1, [&](int64_t b, int64_t e) {
    std::vector<const T*> rows(kH);
    for (int64_t row = b; row < e; ++row) {
      const int64_t n = row / Ho, oh = row % Ho;
      for (int64_t kh = 0; kh < kH; ++kh) {
        const int64_t ih = oh * p.sh - p.pt + kh * p.dh;
        rows[kh] = ih >= 0 && ih < p.H ? xp + (n * p.H + ih) * p.W * C : nullptr;
      }
      T* yr = yp + row * Wo * C;
      auto one = [&](int64_t ow) {
        const int64_t iw0 = ow * p.sw - p.pl;
        for (int64_t c = 0; c < C; c += V) {
          const int64_t cnt = std::min<int64_t>(V, C - c);
          Vec acc = ld(bias.data() + c, cnt);
          for (int64_t kh = 0; kh < kH; ++kh) {
            if (!rows[kh]) continue;
            for (int64_t kw = 0; kw < kW; ++kw) {
              const int64_t iw = iw0 + kw * p.dw;
              if (iw < 0 || iw >= p.W) continue;
              acc = at::vec::fmadd(ld(rows[kh] + iw * C + c, cnt), ld(wt.data() + (kh * kW + kw) * C + c, cnt), acc);
            }
          }
          acc.store(yr + ow * C + c, static_cast<int>(cnt));
        }
      };
      int64_t ow = 0;
      for (; ow < ow_lo; ++ow) one(ow);
      for (; ow + 8 <= ow_hi; ow += 8)
        dw_fwd_block<T, 8>(rows.data(), wt.data(), bias.data(), C, kH, kW, p.sw, p.dw, ow * p.sw - p.pl, yr + ow * C);
      for (; ow + 4 <= ow_hi; ow += 4)
        dw_fwd_block<T, 4>(rows.data(), wt.data(), bias.data(), C, kH, kW, p.sw, p.dw, ow * p.sw - p.pl, yr + ow * C);
      for (; ow < Wo; ++ow) one(ow);
    }
  });
}

// grad_weight of a 3x3 depthwise convolution on NHWC: per task (image, band of output rows) and per
// vector of channels the 9 tap sums in registers over every pixel of the band (one grad_out load per
// pixel, shared by the 9 taps); per-task partials summed in task order (float64) at the end.
template <typename T>
void dw_gw3x3_nhwc(const T* gp, const T* xp, const conv::Params& p, T* gwp) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t C = p.C_in, Ho = p.H_out, Wo = p.W_out;
  const int64_t rb = std::max<int64_t>(1, 512 / Wo), nbands = ceil_div(Ho, rb), ntask = p.N * nbands;
  const int64_t ncb = ceil_div(C, V);
  const int64_t ow_lo = std::min<int64_t>(Wo, ceil_div(p.pl, p.sw));
  const int64_t ow_hi = std::max<int64_t>(ow_lo, std::min<int64_t>(Wo, floor_div(p.W - 1 + p.pl - 2 * p.dw, p.sw) + 1));
  std::vector<T> partial(ntask * ncb * 9 * V);
  at::parallel_for(0, ntask, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / nbands, oh0 = (task % nbands) * rb, oh1 = std::min(Ho, oh0 + rb);
      for (int64_t cb = 0; cb < ncb; ++cb) {
        const int64_t c = cb * V, cnt = std::min<int64_t>(V, C - c);
        Vec acc[9];
#pragma GCC unroll 9
        for (int t = 0; t < 9; ++t) acc[t] = Vec(T(0));
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          const T* rows[3];
          for (int kh = 0; kh < 3; ++kh) {
            const int64_t ih = oh * p.sh - p.pt + kh * p.dh;
            rows[kh] = ih >= 0 && ih < p.H ? xp + (n * p.H + ih) * p.W * C + c : nullptr;
          }
          const T* gr = gp + ((n * Ho + oh) * Wo) * C + c;
          for (int64_t ow = 0; ow < Wo; ++ow) {
            const Vec gv = ld(gr + ow * C, cnt);
            const int64_t iw0 = ow * p.sw - p.pl;
            const bool inner = ow >= ow_lo && ow < ow_hi;
#pragma GCC unroll 3
            for (int kh = 0; kh < 3; ++kh) {
              if (!rows[kh]) continue;
#pragma GCC unroll 3
              for (int kw = 0; kw < 3; ++kw) {
                const int64_t iw = iw0 + kw * p.dw;
                if (!inner && (iw < 0 || iw >= p.W)) continue;
                acc[kh * 3 + kw] = at::vec::fmadd(ld(rows[kh] + iw * C, cnt), gv, acc[kh * 3 + kw]);
              }
            }
          }
        }
        T* part = partial.data() + ((task * ncb + cb) * 9) * V;
#pragma GCC unroll 9
        for (int t = 0; t < 9; ++t) acc[t].store(part + t * V);
      }
    }
  });
  at::parallel_for(0, C, 16, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      const int64_t cb = ch / V, j = ch % V;
      for (int64_t t = 0; t < 9; ++t) {
        double s = 0;
        for (int64_t task = 0; task < ntask; ++task) s += static_cast<double>(partial[((task * ncb + cb) * 9 + t) * V + j]);
        gwp[ch * 9 + t] = static_cast<T>(s);
      }
    }
  });
}

// Packs w (C_out, cin_g, kH, kW) for the gather GEMM: transpose = false (forward):
// B[g][nb][t][ci][j] = w[g*cout_g + nb*NB + j][ci][t]; transpose = true (grad_input):
// B[g][nb][t][oc][j] = w[g*cout_g + oc][nb*NB + j][t]. Zero past the last channel.
template <typename T, int NV = 2>
std::vector<T> pack_weight(const T* w, const conv::Params& p, bool transpose) {
  constexpr int64_t NB = nb_of<T, NV>();
  const int64_t G = p.groups, cin_g = p.cin_g(), cout_g = p.cout_g(), ntaps = p.kH * p.kW;
  const int64_t K = transpose ? cout_g : cin_g, c_g = transpose ? cin_g : cout_g;
  const int64_t nblk = ceil_div(c_g, NB);
  std::vector<T> B(G * nblk * ntaps * K * NB);
  at::parallel_for(0, G * nblk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t gb = b0; gb < b1; ++gb) {
      const int64_t g = gb / nblk, nb = gb % nblk;
      T* dst = B.data() + gb * ntaps * K * NB;
      for (int64_t t = 0; t < ntaps; ++t)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < NB; ++j) {
            const int64_t c = nb * NB + j;
            T v = T(0);
            if (c < c_g) {
              const int64_t oc = g * cout_g + (transpose ? k : c), ci = transpose ? c : k;
              v = w[(oc * cin_g + ci) * ntaps + t];
            }
            dst[(t * K + k) * NB + j] = v;
          }
    }
  });
  return B;
}

template <typename T, int NV = 2>
std::vector<T> pad_bias(const T* bias, int64_t G, int64_t c_g) {
  constexpr int64_t NB = nb_of<T, NV>();
  const int64_t nblk = ceil_div(c_g, NB);
  std::vector<T> out(G * nblk * NB, T(0));
  if (bias)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < c_g; ++c) out[g * nblk * NB + c] = bias[g * c_g + c];
  return out;
}

template <typename T, int NV, int MRT>
void fwd_impl_nv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p,
                 at::Tensor& y) {
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const std::vector<T> B = pack_weight<T, NV>(w.const_data_ptr<T>(), p, false);
  const std::vector<T> bp = pad_bias<T, NV>(bias.defined() ? bias.const_data_ptr<T>() : nullptr, p.groups, p.cout_g());
  const int64_t HWo = p.H_out * p.W_out;
  auto a_fill = [&](int64_t m, const T** dst, int64_t stride) { fwd_fill(xp, p, m, dst, stride); };
  // y: NHWC, or NCHW (the launcher's choice; the two are the same memory when C == 1 or H W == 1)
  const bool nchw = !y.is_contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t run = p.groups == 1 && p.dw == 1 ? p.kW : 1;
  auto o_ptr = [&](int64_t m) -> T* { return yp + m * p.C_out; };
  auto o_nchw = [&](int64_t m) -> T* { return yp + (m / HWo) * p.C_out * HWo + m % HWo; };
  auto row_fill = [&](int64_t m0, int cnt, const T** dst, int64_t stride) -> unsigned {
    int64_t n = m0 / HWo, oh = m0 % HWo / p.W_out, ow = m0 % p.W_out;  // then stepped: no division per pixel
    unsigned inside = 0;
    for (int i = 0; i < cnt; ++i) {
      const int64_t ih0 = oh * p.sh - p.pt, iw0 = ow * p.sw - p.pl;
      if (iw0 >= 0 && iw0 + p.kW <= p.W) {
        inside |= 1u << i;
        const T* xn = xp + (n * p.H * p.W + iw0) * p.C_in;
        for (int64_t kh = 0; kh < p.kH; ++kh) {
          const int64_t ih = ih0 + kh * p.dh;
          dst[kh * stride + i] = ih >= 0 && ih < p.H ? xn + ih * p.W * p.C_in : nullptr;
        }
      }
      if (++ow == p.W_out) {
        ow = 0;
        if (++oh == p.H_out) oh = 0, ++n;
      }
    }
    return inside;
  };
  if (nchw) {
    gather_gemm<T, NV, MRT>(p.N * HWo, p.groups, p.kH * p.kW, p.cin_g(), p.cout_g(), B.data(), bp.data(), a_fill,
                            o_nchw, HWo, run, false, &row_fill);
    return;
  }
  if (p.cin_g() == 1 && p.cout_g() == 1) {
    dw_fwd_nhwc<T>(xp, w.const_data_ptr<T>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr, p, yp);
    return;
  }
  gather_gemm<T, NV, MRT>(p.N * HWo, p.groups, p.kH * p.kW, p.cin_g(), p.cout_g(), B.data(), bp.data(), a_fill,
                          o_ptr, 1, run, false, &row_fill);
}

// A group's output channels in one vector, or a tail of at most one vector past whole pairs (8 or 24
// on AVX2 float: DenseNet's growth rate 8): a 12-pixel tile of one vector (no lanes of zero weights,
// 12 accumulators); otherwise the 6-pixel tile of two vectors.
// c_g: the channels per group of the GEMM's output (the forward's C_out / groups, grad_input's
// C_in / groups); not for depthwise (its own kernels).
template <typename T>
bool one_vector_tile(const conv::Params& p, int64_t c_g) {
  constexpr int64_t V = Vectorized<T>::size();
  const int64_t rem = c_g % (2 * V);
  return c_g <= 3 * V && rem != 0 && rem <= V && !(p.cin_g() == 1 && p.cout_g() == 1);
}

template <typename T>
void fwd_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p,
              at::Tensor& y) {
  if (one_vector_tile<T>(p, p.cout_g())) return fwd_impl_nv<T, 1, kMR1>(x, w, bias, p, y);
  fwd_impl_nv<T, 2, kMR>(x, w, bias, p, y);
}

template <typename T, int NV, int MRT>
void bwd_input_impl_nv(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi) {
  const T* gp = g.const_data_ptr<T>();
  T* op = gi.mutable_data_ptr<T>();
  const std::vector<T> B = pack_weight<T, NV>(w.const_data_ptr<T>(), p, true);
  const std::vector<T> bp = pad_bias<T, NV>(nullptr, p.groups, p.cin_g());
  // the input pixels of a row in residue classes of iw mod sw
  std::vector<int64_t> perm;
  perm.reserve(p.W);
  for (int64_t r = 0; r < p.sw; ++r)
    for (int64_t iw = r; iw < p.W; iw += p.sw) perm.push_back(iw);
  const int64_t HW = p.H * p.W;
  auto a_fill = [&](int64_t m, const T** dst, int64_t stride) {
    const int64_t n = m / HW, r = m % HW, ih = r / p.W, iw = perm[r % p.W];
    const T* gn = gp + n * p.H_out * p.W_out * p.C_out;
    // (no division where the stride is 1: a 64-bit idiv per tap was a quarter of DenseNet's 8x8
    // grad_input, 2026-12-02)
    for (int64_t kh = 0; kh < p.kH; ++kh) {
      const int64_t hn = ih + p.pt - kh * p.dh;
      const int64_t oh = p.sh == 1 ? hn : hn / p.sh;
      const bool hok = hn >= 0 && (p.sh == 1 || hn % p.sh == 0) && oh < p.H_out;
      const int64_t hoff = oh * p.W_out;
      for (int64_t kw = 0; kw < p.kW; ++kw) {
        const int64_t wn = iw + p.pl - kw * p.dw;
        const int64_t ow = p.sw == 1 ? wn : wn / p.sw;
        const bool ok = hok && wn >= 0 && (p.sw == 1 || wn % p.sw == 0) && ow < p.W_out;
        dst[(kh * p.kW + kw) * stride] = ok ? gn + (hoff + ow) * p.C_out : nullptr;
      }
    }
  };
  auto o_ptr = [&](int64_t m) -> T* {
    const int64_t n = m / HW, r = m % HW, ih = r / p.W, iw = perm[r % p.W];
    return op + ((n * p.H + ih) * p.W + iw) * p.C_in;
  };
  if (!gi.is_contiguous(at::MemoryFormat::ChannelsLast)) {  // NCHW grad_input, written directly
    auto o_nchw = [&](int64_t m) -> T* {
      const int64_t n = m / HW, r = m % HW, ih = r / p.W, iw = perm[r % p.W];
      return op + n * p.C_in * HW + ih * p.W + iw;
    };
    gather_gemm<T, NV, MRT>(p.N * HW, p.groups, p.kH * p.kW, p.cout_g(), p.cin_g(), B.data(), bp.data(), a_fill, o_nchw, HW);
    return;
  }
  if (NV == 2 && p.cin_g() == 1 && p.cout_g() == 1) {  // depthwise: the taps in reverse, per channel
    depthwise<T>(p.N * HW, p.C_in, p.kH * p.kW, w.const_data_ptr<T>(), bp.data(), a_fill, o_ptr);
    return;
  }
  gather_gemm<T, NV, MRT>(p.N * HW, p.groups, p.kH * p.kW, p.cout_g(), p.cin_g(), B.data(), bp.data(), a_fill, o_ptr);
}

// grad_input's output channels are the input channels: few of them per group (one vector, or a
// one-vector tail: ResNet-18 / 8's 8 -> 8 layers, DenseNet's 24) take the 12 x 1 vector tile, as the
// forward does with few output channels; otherwise the 6 x 2 vector tile.
template <typename T>
void bwd_input_impl(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi) {
  if (one_vector_tile<T>(p, p.cin_g())) return bwd_input_impl_nv<T, 1, kMR1>(g, w, p, gi);
  bwd_input_impl_nv<T, 2, kMR>(g, w, p, gi);
}

// ---- grad_weight on NHWC for small weights (DenseNet's 3x3 growth layers, its 1x1 transitions) --
// gw[oc][ci][t] = sum_m g[m][oc] * x(m, t)[ci], t = (kh, kw), x(m, t) the input pixel tap t of output
// pixel m reads. The reduction runs over all N H_out W_out pixels while the result is small, so the
// register tile stays on one (tap, ci block, oc block) for a whole block of pixels: R input channels
// x NV vectors of output channels (12 accumulators), per pixel NV loads of grad_out, R broadcasts of
// the input pixel's channels (one pointer: constant offsets) and R NV FMAs; the tile is loaded and
// stored once per sub-block of kGwSubPixels pixels (whose input rows stay in L1 across the sweeps).
// The per-(kh) task tile of bwd_weight_impl reloaded and stored its accumulators every W_out pixels
// (8 on DenseNet's 8x8 layers) and ran 3 tasks on 2 threads: 0.28x-0.44x of torch there.
// Tasks: fixed blocks of kGwSmallPixels pixels (independent of the thread count), each writing its own
// partial gradient; the partials are summed over the tasks in order, in float64.
constexpr int64_t kGwSmallPixels = 512;
constexpr int64_t kGwSubPixels = 64;
constexpr int64_t kGwSmallMaxWeight = 16384;  // C_out K elements: a task's partial stays in L1/L2

// Small weights, one group, any stride, padding and dilation (not depthwise: its own kernels).
inline bool use_gw_small(const conv::Params& p) {
  return p.groups == 1 && p.C_out * p.C_in * p.kH * p.kW <= kGwSmallMaxWeight;
}

// out[r][v] += x[i][r] * g[i][v] over the n pixels i; xs[i] + xo: the input pixel's channel ci0,
// gs[i] + go: the pixel's grad_out at the oc block's first channel; out rows of stride out_r.
template <typename T, int R, int NV>
inline void gw_small_tile(const T* const* xs, int64_t xo, const T* const* gs, int64_t go, int64_t n, T* out,
                          int64_t out_r) {
  // (accumulators as c[NV][R], fully unrolled: with one array per vector (c0[R], c1[..], c2[..]) GCC 12
  // kept the AVX-512 6 x 2 tile on the stack, stored every iteration)
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec c[NV][R];
#pragma GCC unroll 3
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) c[v][r] = Vec::loadu(out + r * out_r + v * V);
  for (int64_t i = 0; i < n; ++i) {
    const T* xr = xs[i] + xo;
    const T* gr = gs[i] + go;
    Vec gv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) gv[v] = Vec::loadu(gr + v * V);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const Vec xv(xr[r]);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) c[v][r] = at::vec::fmadd(xv, gv[v], c[v][r]);
    }
  }
#pragma GCC unroll 3
  for (int v = 0; v < NV; ++v)
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) c[v][r].store(out + r * out_r + v * V);
}

// Input-channel rows per gw_small_tile call: 12 accumulators (AVX2: 16 registers), 24 on AVX-512 for
// two vectors of output channels.
template <typename T, int NV>
constexpr int gw_rows() {
  return NV == 1 ? 12 : NV == 2 ? (Vectorized<T>::size() == 16 ? 12 : 6) : 4;
}

template <typename T, int NV>
void gw_small_tile_r(int r, const T* const* xs, int64_t xo, const T* const* gs, int64_t go, int64_t n, T* out,
                     int64_t out_r) {
  constexpr int RM = gw_rows<T, NV>();
  switch (r >= RM ? RM : r) {
#define PYFASTDL_GW_SMALL(RR) \
  case RR: if constexpr (RR <= RM) gw_small_tile<T, RR, NV>(xs, xo, gs, go, n, out, out_r); break;
    PYFASTDL_GW_SMALL(12) PYFASTDL_GW_SMALL(11) PYFASTDL_GW_SMALL(10) PYFASTDL_GW_SMALL(9)
    PYFASTDL_GW_SMALL(8) PYFASTDL_GW_SMALL(7) PYFASTDL_GW_SMALL(6) PYFASTDL_GW_SMALL(5)
    PYFASTDL_GW_SMALL(4) PYFASTDL_GW_SMALL(3) PYFASTDL_GW_SMALL(2)
#undef PYFASTDL_GW_SMALL
    default: gw_small_tile<T, 1, NV>(xs, xo, gs, go, n, out, out_r); break;
  }
}

template <typename T>
void bwd_weight_small(const T* gsrc, const T* xp, const conv::Params& p, T* gwp) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t Cin = p.C_in, Cout = p.C_out, ntaps = p.kH * p.kW, K = ntaps * Cin;
  const int64_t HWo = p.H_out * p.W_out, M = p.N * HWo;
  // output channels in blocks of NV vectors: one block of 1-3 vectors when C_out fits, else 2-vector blocks
  const int64_t nvec = ceil_div(Cout, V);
  const int NV = nvec <= 3 ? static_cast<int>(nvec) : 2;
  const int64_t NB = NV * V, nblk = ceil_div(Cout, NB), cpad = nblk * NB;
  const int RM = NV == 1 ? gw_rows<T, 1>() : NV == 2 ? gw_rows<T, 2>() : gw_rows<T, 3>();
  const int64_t ntask = ceil_div(M, kGwSmallPixels);
  const int64_t psize = K * cpad;  // a task's partial: [t][ci][cpad]
  const bool by_rows = p.dw == 1 && p.kW > 1;
  std::vector<T> partial(ntask * psize);
  at::parallel_for(0, ntask, 1, [&](int64_t b, int64_t e) {
    std::vector<T> gbuf(kGwSmallPixels * cpad);
    std::vector<const T*> xs(kGwSmallPixels), gs(kGwSmallPixels);
    std::vector<int64_t> ih0(kGwSmallPixels), iw0(kGwSmallPixels), nb(kGwSmallPixels), edge(kGwSubPixels);
    for (int64_t task = b; task < e; ++task) {
      const int64_t m0 = task * kGwSmallPixels, np = std::min(kGwSmallPixels, M - m0);
      // grad_out rows of the task, zero-padded to whole blocks (the lanes past C_out are discarded)
      int64_t n = m0 / HWo, r = m0 % HWo, oh = r / p.W_out, ow = r % p.W_out;
      for (int64_t i = 0; i < np; ++i) {
        const T* src = gsrc + (m0 + i) * Cout;
        T* dst = gbuf.data() + i * cpad;
        std::copy(src, src + Cout, dst);
        std::fill(dst + Cout, dst + cpad, T(0));
        nb[i] = n * p.H * p.W * Cin;
        ih0[i] = oh * p.sh - p.pt;
        iw0[i] = ow * p.sw - p.pl;
        if (++ow == p.W_out) {
          ow = 0;
          if (++oh == p.H_out) oh = 0, ++n;
        }
      }
      T* part = partial.data() + task * psize;
      std::fill(part, part + psize, T(0));
      // sub-blocks of kGwSubPixels pixels: the input pixels their taps read stay in L1 across the
      // (tap, channel block) sweeps (sweeps over all 512 pixels missed L1; with the sub-blocks DenseNet's
      // 40 -> 8 layer went from 36 to 44 GFLOP/s on one thread, 2026-12-02)
      auto tiles = [&](int64_t cnt, int64_t nrow, T* pt) {  // pt[j][cpad] += sum_i xs[i][j] gs[i], j < nrow
        for (int64_t ci0 = 0; ci0 < nrow; ci0 += RM) {
          const int rr = static_cast<int>(std::min<int64_t>(RM, nrow - ci0));
          for (int64_t blk = 0; blk < nblk; ++blk) {
            T* o = pt + ci0 * cpad + blk * NB;
            const int64_t go = blk * NB;
            if (NV == 1) gw_small_tile_r<T, 1>(rr, xs.data(), ci0, gs.data(), go, cnt, o, cpad);
            else if (NV == 2) gw_small_tile_r<T, 2>(rr, xs.data(), ci0, gs.data(), go, cnt, o, cpad);
            else gw_small_tile_r<T, 3>(rr, xs.data(), ci0, gs.data(), go, cnt, o, cpad);
          }
        }
      };
      for (int64_t s0 = 0; s0 < np; s0 += kGwSubPixels) {
        const int64_t s1 = std::min(np, s0 + kGwSubPixels);
        for (int64_t kh = 0; kh < p.kH; ++kh) {
          // Kernel rows of adjacent pixels (dilation 1 along W): a pixel whose row kh lies inside the
          // input along W reads kW * C_in contiguous values, the rows of the partial for taps
          // (kh, 0..kW) in their [kw][ci] order: one sweep of kW C_in rows (tiles of RM rows) instead
          // of kW sweeps of C_in (the stem: 21 rows in tiles of 6, not 3 rows per tap). The pixels
          // that cross the left or right padding are summed per tap below.
          int64_t nedge = 0;
          if (by_rows) {
            int64_t cnt = 0;
            for (int64_t i = s0; i < s1; ++i) {
              const int64_t ih = ih0[i] + kh * p.dh;
              if (ih < 0 || ih >= p.H) continue;
              if (iw0[i] >= 0 && iw0[i] + p.kW <= p.W) {
                xs[cnt] = xp + nb[i] + (ih * p.W + iw0[i]) * Cin;
                gs[cnt] = gbuf.data() + i * cpad;
                ++cnt;
              } else {
                edge[nedge++] = i;
              }
            }
            if (cnt > 0) tiles(cnt, p.kW * Cin, part + kh * p.kW * Cin * cpad);
            if (nedge == 0) continue;
          }
          for (int64_t kw = 0; kw < p.kW; ++kw) {
            const int64_t t = kh * p.kW + kw;
            // the pixels whose tap t lies inside the input, in order
            int64_t cnt = 0;
            for (int64_t e = 0; e < (by_rows ? nedge : s1 - s0); ++e) {
              const int64_t i = by_rows ? edge[e] : s0 + e;
              const int64_t ih = ih0[i] + kh * p.dh, iw = iw0[i] + kw * p.dw;
              if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) continue;
              xs[cnt] = xp + nb[i] + (ih * p.W + iw) * Cin;
              gs[cnt] = gbuf.data() + i * cpad;
              ++cnt;
            }
            if (cnt > 0) tiles(cnt, Cin, part + t * Cin * cpad);
          }
        }
      }
    }
  });
  // gw (C_out, C_in, kH, kW): the sum over the tasks in order, in float64, a partial row (t, ci) of
  // cpad channels at a time (contiguous in every task's partial)
  at::parallel_for(0, K, 8, [&](int64_t b, int64_t e) {
    std::vector<double> acc(cpad);
    for (int64_t row = b; row < e; ++row) {
      const int64_t t = row / Cin, ci = row % Cin;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t task = 0; task < ntask; ++task) {
        const T* src = partial.data() + task * psize + row * cpad;
        for (int64_t c = 0; c < cpad; ++c) acc[c] += static_cast<double>(src[c]);
      }
      for (int64_t oc = 0; oc < Cout; ++oc) gwp[(oc * Cin + ci) * ntaps + t] = static_cast<T>(acc[oc]);
    }
  });
}

template <typename T>
void bwd_weight_impl(const at::Tensor& g, const at::Tensor& x, const conv::Params& p, at::Tensor& gw,
                     at::Tensor& gb) {
  using Vec = Vectorized<T>;
  constexpr int64_t NB = nb_of<T>();
  const int64_t G = p.groups, cin_g = p.cin_g(), cout_g = p.cout_g();
  const int64_t nblk = ceil_div(cout_g, NB), cpad = nblk * NB, Gc = G * cpad;
  const int64_t M = p.N * p.H_out * p.W_out;
  const T* gsrc = g.const_data_ptr<T>();
  if (gb.defined()) {  // grad_bias: per block of NB channels, a fixed-order sum over the pixels
    T* gbp = gb.mutable_data_ptr<T>();
    const int64_t C = p.C_out, V = Vec::size();
    at::parallel_for(0, ceil_div(C, NB), 1, [&](int64_t b, int64_t e) {
      for (int64_t cb = b; cb < e; ++cb) {
        const int64_t c0 = cb * NB, nv = std::min<int64_t>(NB, C - c0);
        const int64_t n0 = std::min<int64_t>(V, nv), n1 = nv - n0;
        double tot[NB] = {};
        for (int64_t m0 = 0; m0 < M; m0 += 256) {  // chunks summed in T, chunk sums in float64
          Vec s0(T(0)), s1(T(0));
          for (int64_t m = m0; m < std::min<int64_t>(M, m0 + 256); ++m) {
            s0 = s0 + Vec::loadu(gsrc + m * C + c0, n0);
            if (n1 > 0) s1 = s1 + Vec::loadu(gsrc + m * C + c0 + V, n1);
          }
          alignas(64) T buf[NB];
          s0.store(buf);
          s1.store(buf + V);
          for (int64_t j = 0; j < NB; ++j) tot[j] += static_cast<double>(buf[j]);
        }
        for (int64_t j = 0; j < nv; ++j) gbp[c0 + j] = static_cast<T>(tot[j]);
      }
    });
  }
  if (!gw.defined()) return;
  const T* xp = x.const_data_ptr<T>();
  if (use_gw_small(p)) {
    bwd_weight_small<T>(gsrc, xp, p, gw.mutable_data_ptr<T>());
    return;
  }
  if (cin_g == 1 && cout_g == 1 && p.kH == 3 && p.kW == 3) {  // depthwise 3x3: the 9 taps in registers
    dw_gw3x3_nhwc<T>(gsrc, xp, p, gw.mutable_data_ptr<T>());
    return;
  }
  if (cin_g == 1 && cout_g == 1) {  // depthwise: per block of 2 vectors of channels, all taps at once
    const int64_t C = p.C_in, ntaps = p.kH * p.kW, V = Vec::size();
    const T* g0 = g.const_data_ptr<T>();
    T* gwp = gw.mutable_data_ptr<T>();
    at::parallel_for(0, ceil_div(C, NB), 1, [&](int64_t b, int64_t e) {
      std::vector<T> acc(ntaps * NB);
      std::vector<const T*> src(ntaps);
      for (int64_t cb = b; cb < e; ++cb) {
        const int64_t c0 = cb * NB, nv = std::min<int64_t>(NB, C - c0);
        const int64_t n0 = std::min<int64_t>(V, nv), n1 = nv - n0;
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t m = 0; m < M; ++m) {
          fwd_fill(xp, p, m, src.data(), 1);
          const T* gm = g0 + m * C + c0;
          const Vec ga = Vec::loadu(gm, n0), gb2 = n1 > 0 ? Vec::loadu(gm + V, n1) : Vec(T(0));
          for (int64_t t = 0; t < ntaps; ++t) {
            if (!src[t]) continue;
            T* a = acc.data() + t * NB;
            at::vec::fmadd(Vec::loadu(src[t] + c0, n0), ga, Vec::loadu(a)).store(a);
            if (n1 > 0) at::vec::fmadd(Vec::loadu(src[t] + c0 + V, n1), gb2, Vec::loadu(a + V)).store(a + V);
          }
        }
        for (int64_t j = 0; j < nv; ++j)
          for (int64_t t = 0; t < ntaps; ++t) gwp[(c0 + j) * ntaps + t] = acc[t * NB + j];
      }
    });
    return;
  }
  // grad_out with each group's channels padded to whole blocks (the micro-kernel loads NB at once)
  std::vector<T> gpad_buf;
  const T* gp = gsrc;
  if (cpad != cout_g) {
    gpad_buf.assign(M * Gc, T(0));
    at::parallel_for(0, M, 1024, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m)
        for (int64_t gg = 0; gg < G; ++gg)
          std::copy(gsrc + m * p.C_out + gg * cout_g, gsrc + m * p.C_out + (gg + 1) * cout_g,
                    gpad_buf.data() + m * Gc + gg * cpad);
    });
    gp = gpad_buf.data();
  }
  T* gwp = gw.mutable_data_ptr<T>();
  const int64_t ntaps = p.kH * p.kW;
  // Per task (group, oc block, kh): the (n, oh) rows in order, a chunk of about kGwChunkPixels pixels
  // at a time; per kw, the chunk's pixel pairs (input pixel, grad_out pixel) listed once, then each
  // block of MR input channels summed over all of them with the tile in registers (gw_small_tile). A
  // call per output row reloaded and stored the tile every W_out pixels: 7 at ResNet-18's 7 x 7
  // layers, 57% of the FMA peak there (2026-12-02, Zen 5). Each sum still runs over (n, oh, ow) in order.
  constexpr int64_t kGwChunkPixels = 256;
  const int64_t rows_per_chunk = std::max<int64_t>(1, kGwChunkPixels / std::max<int64_t>(1, p.W_out));
  const int64_t nrows = p.N * p.H_out;
  at::parallel_for(0, G * nblk * p.kH, 1, [&](int64_t b, int64_t e) {
    std::vector<T> acc(p.kW * cin_g * NB);
    std::vector<const T*> xl(rows_per_chunk * p.W_out), gl(rows_per_chunk * p.W_out);
    for (int64_t task = b; task < e; ++task) {
      const int64_t gg = task / (nblk * p.kH), nb = (task / p.kH) % nblk, kh = task % p.kH;
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t r0 = 0; r0 < nrows; r0 += rows_per_chunk) {
        const int64_t r1 = std::min(nrows, r0 + rows_per_chunk);
        for (int64_t kw = 0; kw < p.kW; ++kw) {
          // ow with 0 <= ow * sw - pl + kw * dw < W
          const int64_t off = kw * p.dw - p.pl;
          const int64_t lo = std::max<int64_t>(0, ceil_div(std::max<int64_t>(0, -off), p.sw));
          const int64_t hi = std::min<int64_t>(p.W_out, floor_div(p.W - 1 - off, p.sw) + 1);
          if (lo >= hi) continue;
          int64_t cnt = 0;
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t n = r / p.H_out, oh = r % p.H_out;
            const int64_t ih = oh * p.sh - p.pt + kh * p.dh;
            if (ih < 0 || ih >= p.H) continue;
            const T* grow = gp + r * p.W_out * Gc + gg * cpad + nb * NB;
            const T* xrow = xp + ((n * p.H + ih) * p.W) * p.C_in + gg * cin_g;
            for (int64_t ow = lo; ow < hi; ++ow, ++cnt) {
              xl[cnt] = xrow + (ow * p.sw + off) * p.C_in;
              gl[cnt] = grow + ow * Gc;
            }
          }
          if (cnt == 0) continue;
          T* a = acc.data() + kw * cin_g * NB;
          constexpr int64_t RM = gw_rows<T, 2>();
          for (int64_t ci0 = 0; ci0 < cin_g; ci0 += RM)
            gw_small_tile_r<T, 2>(static_cast<int>(std::min<int64_t>(RM, cin_g - ci0)), xl.data(), ci0, gl.data(), 0,
                                  cnt, a + ci0 * NB, NB);
        }
      }
      // (along each output channel's row of gw, kw fastest: a walk down the row, not a store every
      // cin_g kH kW floats)
      for (int64_t j = 0; j < NB && nb * NB + j < cout_g; ++j) {
        T* row = gwp + (gg * cout_g + nb * NB + j) * cin_g * ntaps + kh * p.kW;
        for (int64_t ci = 0; ci < cin_g; ++ci)
          for (int64_t kw = 0; kw < p.kW; ++kw) row[ci * ntaps + kw] = acc[(kw * cin_g + ci) * NB + j];
      }
    }
  });
}

// ---- grad_weight and grad_bias on NCHW directly, for few input channels (LeNet, the stem) ----------
// gw[oc][ci][kh][kw] = sum_{n, oh, ow} g[n][oc][oh][ow] * x[n][ci][oh sh - pt + kh dh][ow sw - pl + kw dw].
// Vectorized along ow (V consecutive output pixels of a row): per step OCB grad_out vectors and, per
// tap, one vector of the input row, OCB x KB accumulators in registers (KB taps of OCB output channels,
// 12 on AVX2), summed over every output pixel of a task before one horizontal sum. The input rows a
// task reads are copied once into a zero-padded buffer split by column phase (column j of phase ph
// holds input column j sw + ph - pl), so that the V lanes of any tap are contiguous, whatever the
// stride: tap (ci, kh, kw) of output row r reads phase (kw dw) % sw at row r sh + kh dh, column
// ow + (kw dw) / sw. Rows of grad_out whose width is not a multiple of V are copied zero-padded; the
// input lanes past the row's end are blended to zero (not multiplied by a zero: 0 * inf is NaN).
// Tasks: fixed blocks of (image, output rows) of ~kGwPixels pixels, independent of the thread count;
// each writes its own partial gradient, summed over the tasks in order (in float64) at the end.
constexpr int64_t kGwPixels = 2048;

template <typename T, int OCB, int KB>
void gw_nchw_pass(int64_t nimg, int64_t rows, int64_t nfull, bool tail, const T* g0, int64_t g_img, int64_t g_ch,
                  int64_t g_row, const T* x0, int64_t x_img, int64_t x_row, const int64_t* off,
                  const Vectorized<T>& tmask, T* out, int64_t out_oc) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc[OCB][KB];
#pragma GCC unroll 4
  for (int o = 0; o < OCB; ++o)
#pragma GCC unroll 8
    for (int k = 0; k < KB; ++k) acc[o][k] = Vec(T(0));
  const Vec zero(T(0));
  for (int64_t i = 0; i < nimg; ++i)
    for (int64_t r = 0; r < rows; ++r) {
      const T* gr = g0 + i * g_img + r * g_row;
      const T* xr = x0 + i * x_img + r * x_row;
      const T* xp[KB];
#pragma GCC unroll 8
      for (int k = 0; k < KB; ++k) xp[k] = xr + off[k];
      int64_t ow = 0;
      for (int64_t c = 0; c < nfull; ++c, ow += V) {
        Vec gv[OCB];
#pragma GCC unroll 4
        for (int o = 0; o < OCB; ++o) gv[o] = Vec::loadu(gr + o * g_ch + ow);
#pragma GCC unroll 8
        for (int k = 0; k < KB; ++k) {
          const Vec xv = Vec::loadu(xp[k] + ow);
#pragma GCC unroll 4
          for (int o = 0; o < OCB; ++o) acc[o][k] = at::vec::fmadd(gv[o], xv, acc[o][k]);
        }
      }
      if (tail) {
        Vec gv[OCB];
#pragma GCC unroll 4
        for (int o = 0; o < OCB; ++o) gv[o] = Vec::loadu(gr + o * g_ch + ow);
#pragma GCC unroll 8
        for (int k = 0; k < KB; ++k) {
          const Vec xv = Vec::blendv(zero, Vec::loadu(xp[k] + ow), tmask);
#pragma GCC unroll 4
          for (int o = 0; o < OCB; ++o) acc[o][k] = at::vec::fmadd(gv[o], xv, acc[o][k]);
        }
      }
    }
  alignas(64) T buf[V];
#pragma GCC unroll 4
  for (int o = 0; o < OCB; ++o)
#pragma GCC unroll 8
    for (int k = 0; k < KB; ++k) {
      acc[o][k].store(buf);
      T s = T(0);
      for (int64_t j = 0; j < V; ++j) s += buf[j];
      out[o * out_oc + k] = s;
    }
}

template <typename T, int OCB>
void gw_nchw_pass_kb(int kb, int64_t nimg, int64_t rows, int64_t nfull, bool tail, const T* g0, int64_t g_img,
                     int64_t g_ch, int64_t g_row, const T* x0, int64_t x_img, int64_t x_row, const int64_t* off,
                     const Vectorized<T>& tmask, T* out, int64_t out_oc) {
#define PYFASTDL_GW_PASS(KB) \
  gw_nchw_pass<T, OCB, KB>(nimg, rows, nfull, tail, g0, g_img, g_ch, g_row, x0, x_img, x_row, off, tmask, out, out_oc)
  switch (kb) {
    case 6: if constexpr (Vectorized<T>::size() == 16) PYFASTDL_GW_PASS(6); break;
    case 5: if constexpr (Vectorized<T>::size() == 16) PYFASTDL_GW_PASS(5); break;
    case 4: PYFASTDL_GW_PASS(4); break;
    case 3: PYFASTDL_GW_PASS(3); break;
    case 2: PYFASTDL_GW_PASS(2); break;
    default: PYFASTDL_GW_PASS(1); break;
  }
#undef PYFASTDL_GW_PASS
}

template <typename T>
void bwd_weight_nchw_impl(const at::Tensor& g, const at::Tensor& x, const conv::Params& p, at::Tensor& gw,
                          at::Tensor& gb) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  // 3 output channels x 4 taps: 12 accumulators (AVX2's 16 registers); AVX-512: 4 x 6, 24 of its 32
  constexpr int OCB = V == 16 ? 4 : 3, KB = V == 16 ? 6 : 4;
  const int64_t Ho = p.H_out, Wo = p.W_out, HWo = Ho * Wo, Cout = p.C_out, Cin = p.C_in;
  const T* gp = g.const_data_ptr<T>();
  if (gb.defined()) conv_simd::grad_bias_nchw<T>(gp, p.N, Cout, HWo, gb.mutable_data_ptr<T>());
  if (!gw.defined()) return;
  const T* xp = x.const_data_ptr<T>();
  const int64_t cin_g = p.cin_g(), cout_g = p.cout_g();
  const int64_t ntaps = cin_g * p.kH * p.kW, sw = p.sw;
  const int64_t nv = ceil_div(Wo, V), nfull = Wo / V;
  const bool tail = nv != nfull;
  const int64_t shift = ((p.kW - 1) * p.dw) / sw;
  const int64_t Wq = nv * V + shift;  // buffer row width
  // tasks: images per task (small images) or output rows per task (large ones)
  int64_t nimg = 1, rb = Ho;
  if (HWo >= kGwPixels) rb = std::max<int64_t>(1, kGwPixels / Wo);
  else nimg = std::max<int64_t>(1, std::min<int64_t>(p.N, kGwPixels / HWo));
  const int64_t nib = ceil_div(p.N, nimg), nrb = ceil_div(Ho, rb), ntask = nib * nrb;
  const int64_t wsize = cout_g * ntaps;
  std::vector<T> partial(ntask * wsize);
  std::vector<T> mbits(V);
  {
    using I = std::conditional_t<sizeof(T) == 8, int64_t, int32_t>;
    for (int64_t j = 0; j < V; ++j) {
      const I bits = j < Wo - nfull * V ? I(-1) : I(0);
      std::memcpy(&mbits[j], &bits, sizeof(T));
    }
  }
  const Vec tmask = Vec::loadu(mbits.data());
  T* gwp = gw.mutable_data_ptr<T>();  // (C_out, cin_g, kH, kW) contiguous: group gg's element oc * ntaps + t
  for (int64_t gg = 0; gg < p.groups; ++gg) {  // groups one after the other (depthwise: every channel)
  at::parallel_for(0, ntask, 1, [&](int64_t b, int64_t e) {
    std::vector<T> xbuf, gbuf;
    std::vector<int64_t> off(ntaps);
    for (int64_t task = b; task < e; ++task) {
      const int64_t n0 = (task / nrb) * nimg, ni = std::min(nimg, p.N - n0);
      const int64_t oh0 = (task % nrb) * rb, rows = std::min(rb, Ho - oh0);
      const int64_t r0 = oh0 * p.sh - p.pt, nr = (rows - 1) * p.sh + (p.kH - 1) * p.dh + 1;
      const int64_t x_img = cin_g * sw * nr * Wq;
      xbuf.assign(ni * x_img, T(0));
      for (int64_t i = 0; i < ni; ++i)
        for (int64_t ci = 0; ci < cin_g; ++ci)
          for (int64_t ph = 0; ph < sw; ++ph)
            for (int64_t r = 0; r < nr; ++r) {
              const int64_t ih = r0 + r;
              if (ih < 0 || ih >= p.H) continue;
              const T* src = xp + (((n0 + i) * Cin + gg * cin_g + ci) * p.H + ih) * p.W;
              T* dst = xbuf.data() + i * x_img + ((ci * sw + ph) * nr + r) * Wq;
              // column j holds input column j sw + ph - pl
              const int64_t j0 = std::max<int64_t>(0, ceil_div(p.pl - ph, sw));
              const int64_t j1 = std::min<int64_t>(Wq, floor_div(p.W - 1 + p.pl - ph, sw) + 1);
              for (int64_t j = j0; j < j1; ++j) dst[j] = src[j * sw + ph - p.pl];
            }
      for (int64_t ci = 0, t = 0; ci < cin_g; ++ci)
        for (int64_t kh = 0; kh < p.kH; ++kh)
          for (int64_t kw = 0; kw < p.kW; ++kw, ++t)
            off[t] = ((ci * sw + (kw * p.dw) % sw) * nr + kh * p.dh) * Wq + (kw * p.dw) / sw;
      // grad_out rows of this task: in place when whole vectors, else zero-padded to nv V
      const T* g0;
      int64_t g_img, g_ch, g_row;
      if (!tail) {
        g0 = gp + (n0 * Cout + gg * cout_g) * HWo + oh0 * Wo;
        g_img = Cout * HWo, g_ch = HWo, g_row = Wo;
      } else {
        g_row = nv * V, g_ch = rows * g_row, g_img = cout_g * g_ch;
        gbuf.assign(ni * g_img, T(0));
        for (int64_t i = 0; i < ni; ++i)
          for (int64_t oc = 0; oc < cout_g; ++oc)
            for (int64_t r = 0; r < rows; ++r) {
              const T* src = gp + (((n0 + i) * Cout + gg * cout_g + oc) * Ho + oh0 + r) * Wo;
              std::copy(src, src + Wo, gbuf.data() + i * g_img + oc * g_ch + r * g_row);
            }
        g0 = gbuf.data();
      }
      T* part = partial.data() + task * wsize;
      for (int64_t oc0 = 0; oc0 < cout_g; oc0 += OCB) {
        const int ocb = static_cast<int>(std::min<int64_t>(OCB, cout_g - oc0));
        for (int64_t t0 = 0; t0 < ntaps; t0 += KB) {
          const int kb = static_cast<int>(std::min<int64_t>(KB, ntaps - t0));
          const T* gq = g0 + oc0 * g_ch;
          T* o = part + oc0 * ntaps + t0;
          const int64_t x_row = p.sh * Wq;
          if (ocb == 4) {
            if constexpr (OCB >= 4)
              gw_nchw_pass_kb<T, 4>(kb, ni, rows, nfull, tail, gq, g_img, g_ch, g_row, xbuf.data(), x_img, x_row,
                                    off.data() + t0, tmask, o, ntaps);
          } else if (ocb == 3)
            gw_nchw_pass_kb<T, 3>(kb, ni, rows, nfull, tail, gq, g_img, g_ch, g_row, xbuf.data(), x_img, x_row,
                                  off.data() + t0, tmask, o, ntaps);
          else if (ocb == 2)
            gw_nchw_pass_kb<T, 2>(kb, ni, rows, nfull, tail, gq, g_img, g_ch, g_row, xbuf.data(), x_img, x_row,
                                  off.data() + t0, tmask, o, ntaps);
          else
            gw_nchw_pass_kb<T, 1>(kb, ni, rows, nfull, tail, gq, g_img, g_ch, g_row, xbuf.data(), x_img, x_row,
                                  off.data() + t0, tmask, o, ntaps);
        }
      }
    }
  });
  at::parallel_for(0, wsize, 256, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      double s = 0;
      for (int64_t task = 0; task < ntask; ++task) s += static_cast<double>(partial[task * wsize + j]);
      gwp[gg * wsize + j] = static_cast<T>(s);
    }
  });
  }
}

void fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p, at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_fwd_cpu", [&] { fwd_impl<scalar_t>(x, w, bias, p, y); });
}
void fwd_nchw(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p, at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_fwd_nchw_cpu", [&] { fwd_nchw_small<scalar_t>(x, w, bias, p, y); });
}
void bwd_input(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_bwd_input_cpu", [&] { bwd_input_impl<scalar_t>(g, w, p, gi); });
}
void bwd_weight(const at::Tensor& g, const at::Tensor& x, const conv::Params& p, at::Tensor& gw, at::Tensor& gb) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_bwd_weight_cpu",
                             [&] { bwd_weight_impl<scalar_t>(g, x, p, gw, gb); });
}

void bwd_weight_nchw(const at::Tensor& g, const at::Tensor& x, const conv::Params& p, at::Tensor& gw, at::Tensor& gb) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_bwd_weight_nchw_cpu",
                             [&] { bwd_weight_nchw_impl<scalar_t>(g, x, p, gw, gb); });
}

template <typename T>
void reorder_impl(const at::Tensor& src, at::Tensor& dst, bool to_nhwc) {
  const int64_t N = src.size(0), C = src.size(1), HW = src.size(2) * src.size(3);
  constexpr int64_t PB = 64;  // pixels per task: C x 64 values moved
  const int64_t npb = ceil_div(HW, PB);
  const T* s = src.const_data_ptr<T>();
  T* d = dst.mutable_data_ptr<T>();
  at::parallel_for(0, N * npb, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, C * PB)), [&](int64_t b, int64_t e) {
    for (int64_t idx = b; idx < e; ++idx) {
      const int64_t n = idx / npb, p0 = (idx % npb) * PB;
      const int np = static_cast<int>(std::min(PB, HW - p0));
      const T* sn = s + n * C * HW;
      T* dn = d + n * C * HW;
      if (to_nhwc)  // [C][HW] -> [HW][C]
        at::vec::transpose_mxn<T>(sn + p0, HW, dn + p0 * C, C, static_cast<int>(C), np);
      else
        at::vec::transpose_mxn<T>(sn + p0 * C, C, dn + p0, HW, np, static_cast<int>(C));
    }
  });
}

void reorder(const at::Tensor& src, at::Tensor& dst, bool to_nhwc) {
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "conv2d_reorder_cpu", [&] { reorder_impl<scalar_t>(src, dst, to_nhwc); });
}

const Conv2dKernels kTable{&fwd, &bwd_input, &bwd_weight, &fwd_nchw, &bwd_weight_nchw, &reorder};

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(Conv2dKernels, conv2d_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
