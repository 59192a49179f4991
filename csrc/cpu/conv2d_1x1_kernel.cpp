// conv2d 1x1 on NCHW (at::vec SIMD + ATen parallel_for), compiled once per capability: setup.py
// defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and the matching -m flags.
//
// Forward and grad_input are a GEMM along the pixels of one image:
//   forward:    y_n (C_out x P) = W (C_out x C_in) x X_s (C_in x P), X_s the input pixel each output
//               pixel reads (ih = oh sh - pt, iw = ow sw - pl; outside: zeros).
//   grad_input: Z (C_in x P) = W^T (C_in x C_out) x g_n (C_out x P), z of output pixel (oh, ow) written
//               to input pixel (oh sh - pt, ow sw - pl) when inside; every other input pixel is zero.
// The micro-kernel holds an MR x NB tile in registers (MR = 6 rows of output channels, NB = 2 vectors of
// consecutive pixels: 12 accumulators on AVX2) and loops over k: per step two vector loads of the
// packed pixel panel and MR broadcasts of the packed weights (A: [row block][k][MR]). The pixel panel
// ([tile][k][NB]) is packed per chunk of tiles from the NCHW planes (a gather of every sh-th row and
// sw-th column: the stride is paid once per element here, not by a reorder of the whole tensor), and
// the output rows are stored to NCHW planes directly (vectors along the pixels).
// grad_weight: gw (C_out x C_in) = sum_n g_n X_s,n^T, vectorized along the pixels: a register tile of
// 3 output x 4 input channels of vectors, summed over the pixels of a task before one horizontal sum.
// Every output element is computed by one task in a fixed order, or (grad_weight, grad_bias) from
// per-task partials added in task order: results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/conv2d_1x1_kernel.h"
#include "cpu/conv2d_simd.h"

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int MR = 6;                        // rows (channels) of the register tile
constexpr int64_t kPanelBytes = 24 * 1024;   // pixel panel a chunk packs (L1)
constexpr int64_t kGiBandPixels = 256;       // grad_input: output pixels per task (a band of rows)
constexpr int64_t kGwBandPixels = 1024;      // grad_weight: output pixels per task

template <typename T>
constexpr int64_t nb_of() { return 2 * Vectorized<T>::size(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// grad_input's tasks: bands of rb output rows (about kGiBandPixels pixels) per image; band b owns the
// input rows [lo_row(b), lo_row(b + 1)): those from the first row its output rows read on (row
// oh sh - pt of output row oh), so every input row belongs to exactly one band.
struct GiBands {
  int64_t rb, n, H, sh, pt;
  explicit GiBands(const conv::Params& p)
      : rb(std::max<int64_t>(1, std::min<int64_t>(p.H_out, kGiBandPixels / std::max<int64_t>(1, p.W_out)))),
        n(ceil_div(p.H_out, rb)), H(p.H), sh(p.sh), pt(p.pt) {}
  int64_t lo_row(int64_t band) const {
    if (band == 0) return 0;
    if (band >= n) return H;
    return std::min<int64_t>(H, std::max<int64_t>(0, band * rb * sh - pt));
  }
};

// out[i * ldo + 0..count) = init[i] + sum_k A[k * MR + i] * Bp[k * NB + 0..count),  i < r.
template <typename T>
inline void ukernel(const T* A, const T* Bp, int64_t K, const T* init, T* out, int64_t ldo, int r, int64_t count) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size(), NB = 2 * V;
  Vec c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    c0[i] = Vec(init[i]);
    c1[i] = c0[i];
  }
  for (int64_t k = 0; k < K; ++k, A += MR, Bp += NB) {
    const Vec b0 = Vec::loadu(Bp), b1 = Vec::loadu(Bp + V);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Vec a(A[i]);
      c0[i] = at::vec::fmadd(a, b0, c0[i]);
      c1[i] = at::vec::fmadd(a, b1, c1[i]);
    }
  }
  if (count == NB) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
      if (i < r) {
        c0[i].store(out + i * ldo);
        c1[i].store(out + i * ldo + V);
      }
  } else {
    const int n0 = static_cast<int>(std::min<int64_t>(V, count)), n1 = static_cast<int>(count - n0);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
      if (i < r) {
        c0[i].store(out + i * ldo, n0);
        if (n1 > 0) c1[i].store(out + i * ldo + V, n1);
      }
  }
}

// A[(blk * K + k) * MR + i] = src(blk * MR + i, k), zero past `rows`.
template <typename T, typename Src>
std::vector<T> pack_rows(int64_t rows, int64_t K, const Src& src) {
  const int64_t nblk = ceil_div(rows, MR);
  std::vector<T> A(nblk * K * MR, T(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) A[((r / MR) * K + k) * MR + r % MR] = src(r, k);
  return A;
}

// Input offset (ih * W + iw) in the plane that output pixel q = oh * W_out + ow reads, or -1 (padding).
inline int64_t src_offset(const conv::Params& p, int64_t q) {
  const int64_t oh = q / p.W_out, ow = q % p.W_out;
  const int64_t ih = oh * p.sh - p.pt, iw = ow * p.sw - p.pl;
  return ih >= 0 && ih < p.H && iw >= 0 && iw < p.W ? ih * p.W + iw : -1;
}

// Tiles (of NB pixels) per chunk: the chunk's panel of K rows fits kPanelBytes.
template <typename T>
int64_t tiles_per_chunk(int64_t K) {
  return std::max<int64_t>(1, std::min<int64_t>(16, kPanelBytes / (K * nb_of<T>() * int64_t(sizeof(T)))));
}

template <typename T>
void fwd_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p, at::Tensor& y) {
  constexpr int64_t NB = nb_of<T>();
  const int64_t Cin = p.C_in, Cout = p.C_out, HW = p.H * p.W, P = p.H_out * p.W_out;
  const T* xp = x.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const std::vector<T> A = pack_rows<T>(Cout, Cin, [&](int64_t oc, int64_t ci) { return wp[oc * Cin + ci]; });
  const int64_t nob = ceil_div(Cout, MR);
  std::vector<T> bz(nob * MR, T(0));
  if (bias.defined())
    for (int64_t c = 0; c < Cout; ++c) bz[c] = bias.const_data_ptr<T>()[c];
  const int64_t tpc = tiles_per_chunk<T>(Cin), PT = tpc * NB, nch = ceil_div(P, PT);
  const bool plain = p.sh == 1 && p.sw == 1 && p.pt == 0 && p.pl == 0 && p.H_out == p.H && p.W_out == p.W;
  at::parallel_for(0, p.N * nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> panel(tpc * Cin * NB);
    std::vector<int64_t> off(PT);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nch, p0 = (task % nch) * PT, pc = std::min(PT, P - p0), nt = ceil_div(pc, NB);
      const T* xn = xp + n * Cin * HW;
      for (int64_t j = 0; j < nt * NB; ++j) off[j] = j < pc ? (plain ? p0 + j : src_offset(p, p0 + j)) : -1;
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t* o = off.data() + t * NB;
        T* pan = panel.data() + t * Cin * NB;
        if (plain && (t + 1) * NB <= pc) {
          for (int64_t ci = 0; ci < Cin; ++ci) std::memcpy(pan + ci * NB, xn + ci * HW + o[0], NB * sizeof(T));
        } else {
          for (int64_t ci = 0; ci < Cin; ++ci) {
            const T* xc = xn + ci * HW;
            T* d = pan + ci * NB;
            for (int64_t j = 0; j < NB; ++j) d[j] = o[j] >= 0 ? xc[o[j]] : T(0);
          }
        }
      }
      for (int64_t ob = 0; ob < nob; ++ob) {
        const int r = static_cast<int>(std::min<int64_t>(MR, Cout - ob * MR));
        T* yo = yp + (n * Cout + ob * MR) * P + p0;
        for (int64_t t = 0; t < nt; ++t)
          ukernel<T>(A.data() + ob * Cin * MR, panel.data() + t * Cin * NB, Cin, bz.data() + ob * MR, yo + t * NB, P,
                     r, std::min<int64_t>(NB, pc - t * NB));
      }
    }
  });
}

template <typename T>
void bwd_input_impl(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size(), NB = nb_of<T>();
  const int64_t Cin = p.C_in, Cout = p.C_out, H = p.H, W = p.W, HW = H * W, Ho = p.H_out, Wo = p.W_out, P = Ho * Wo;
  const T* gp = g.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* op = gi.mutable_data_ptr<T>();
  const std::vector<T> A = pack_rows<T>(Cin, Cout, [&](int64_t ci, int64_t oc) { return wp[oc * Cin + ci]; });
  const int64_t ncb = ceil_div(Cin, MR);
  const std::vector<T> zero(MR, T(0));
  const bool plain = p.sh == 1 && p.sw == 1 && p.pt == 0 && p.pl == 0 && Ho == H && Wo == W;
  // stride 2 along W, no left padding (the downsamples): per output row, tiles along the row, each
  // written to input row oh sh - pt interleaved with zeros (columns 2 ow and 2 ow + 1): whole vectors,
  // no scatter; the input rows no output row hits are zeroed
  const bool s2 = p.sw == 2 && p.pl == 0 && 2 * Wo >= W;
  // tasks: (image, band of rb output rows); the task writes the input rows [lo(band), lo(band + 1)):
  // zeros, then the pixels its output rows hit (input row oh sh - pt of output row oh)
  const GiBands bands(p);
  const int64_t nband = bands.n, rb = bands.rb;
  auto lo_row = [&](int64_t band) { return bands.lo_row(band); };
  const int64_t tpc = tiles_per_chunk<T>(Cout), PT = tpc * NB;
  at::parallel_for(0, p.N * nband, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> panel(std::max(tpc, s2 ? ceil_div(Wo, NB) : 0) * Cout * NB);
    std::vector<int64_t> dst(PT);
    alignas(64) T tile[MR * NB];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nband, band = task % nband;
      const int64_t oh0 = band * rb, oh1 = std::min(Ho, oh0 + rb);
      T* on = op + n * Cin * HW;
      const T* gn = gp + n * Cout * P;
      if (s2) {
        // rows of the band no output row hits: zeros; the others written whole below
        for (int64_t ih = lo_row(band); ih < lo_row(band + 1); ++ih) {
          const int64_t q = ih + p.pt;
          if (q % p.sh == 0 && q / p.sh >= oh0 && q / p.sh < oh1) continue;
          for (int64_t ci = 0; ci < Cin; ++ci) std::memset(on + ci * HW + ih * W, 0, W * sizeof(T));
        }
        for (int64_t oh = oh0; oh < oh1; ++oh) {
          const int64_t ih = oh * p.sh - p.pt;
          if (ih < 0 || ih >= H) continue;
          const int64_t nt = ceil_div(Wo, NB);
          for (int64_t t = 0; t < nt; ++t) {
            const int64_t cnt = std::min<int64_t>(NB, Wo - t * NB);
            T* pan = panel.data() + t * Cout * NB;
            for (int64_t oc = 0; oc < Cout; ++oc) {
              std::memcpy(pan + oc * NB, gn + oc * P + oh * Wo + t * NB, cnt * sizeof(T));
              if (cnt < NB) std::fill(pan + oc * NB + cnt, pan + (oc + 1) * NB, T(0));
            }
          }
          for (int64_t cb = 0; cb < ncb; ++cb) {
            const int r = static_cast<int>(std::min<int64_t>(MR, Cin - cb * MR));
            T* row0 = on + cb * MR * HW + ih * W;
            for (int64_t t = 0; t < nt; ++t) {
              ukernel<T>(A.data() + cb * Cout * MR, panel.data() + t * Cout * NB, Cout, zero.data(), tile, NB, r, NB);
              // input columns 2 ow: the tile's pixels interleaved with zeros (the odd columns)
              const int64_t c0 = 2 * t * NB, n2 = std::min<int64_t>(2 * NB, W - c0);
              for (int i = 0; i < r; ++i)
                for (int64_t v = 0; v < 2; ++v) {
                  const auto lh = at::vec::interleave2<T>(Vec::loadu(tile + i * NB + v * V), Vec(T(0)));
                  T* d = row0 + i * HW + c0 + 2 * v * V;
                  const int64_t m = n2 - 2 * v * V;
                  if (m >= 2 * V) {
                    lh.first.store(d);
                    lh.second.store(d + V);
                  } else if (m > 0) {
                    lh.first.store(d, static_cast<int>(std::min<int64_t>(V, m)));
                    if (m > V) lh.second.store(d + V, static_cast<int>(m - V));
                  }
                }
            }
          }
        }
        continue;
      }
      if (!plain) {
        const int64_t lo = lo_row(band), hi = lo_row(band + 1);
        if (hi > lo)
          for (int64_t ci = 0; ci < Cin; ++ci) std::memset(on + ci * HW + lo * W, 0, (hi - lo) * W * sizeof(T));
      }
      for (int64_t c0 = oh0 * Wo; c0 < oh1 * Wo; c0 += PT) {
        const int64_t pc = std::min(PT, oh1 * Wo - c0), nt = ceil_div(pc, NB);
        for (int64_t t = 0; t < nt; ++t) {
          const int64_t q0 = c0 + t * NB, cnt = std::min<int64_t>(NB, pc - t * NB);
          T* pan = panel.data() + t * Cout * NB;
          if (cnt == NB) {
            for (int64_t oc = 0; oc < Cout; ++oc) std::memcpy(pan + oc * NB, gn + oc * P + q0, NB * sizeof(T));
          } else {
            for (int64_t oc = 0; oc < Cout; ++oc) {
              std::memcpy(pan + oc * NB, gn + oc * P + q0, cnt * sizeof(T));
              std::fill(pan + oc * NB + cnt, pan + (oc + 1) * NB, T(0));
            }
          }
        }
        if (!plain)
          for (int64_t j = 0; j < pc; ++j) dst[j] = src_offset(p, c0 + j);
        for (int64_t cb = 0; cb < ncb; ++cb) {
          const int r = static_cast<int>(std::min<int64_t>(MR, Cin - cb * MR));
          T* oc0 = on + cb * MR * HW;
          for (int64_t t = 0; t < nt; ++t) {
            const int64_t cnt = std::min<int64_t>(NB, pc - t * NB);
            if (plain) {
              ukernel<T>(A.data() + cb * Cout * MR, panel.data() + t * Cout * NB, Cout, zero.data(), oc0 + c0 + t * NB,
                         HW, r, cnt);
              continue;
            }
            ukernel<T>(A.data() + cb * Cout * MR, panel.data() + t * Cout * NB, Cout, zero.data(), tile, NB, r, NB);
            const int64_t* d = dst.data() + t * NB;
            for (int i = 0; i < r; ++i)
              for (int64_t j = 0; j < cnt; ++j)
                if (d[j] >= 0) oc0[i * HW + d[j]] = tile[i * NB + j];
          }
        }
      }
    }
  });
}

// NHWC: out[i][0..nv) = sum_k a[i][k] * B[k * NB + 0..nv),  i < r (a[i] for i >= r: any valid row).
template <typename T>
inline void ukernel_rows(const T* const* a, int r, const T* B, int64_t K, T* const* out, int64_t nv) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size(), NB = 2 * V;
  Vec c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    c0[i] = Vec(T(0));
    c1[i] = c0[i];
  }
  for (int64_t k = 0; k < K; ++k, B += NB) {
    const Vec b0 = Vec::loadu(B), b1 = Vec::loadu(B + V);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Vec av(a[i][k]);
      c0[i] = at::vec::fmadd(av, b0, c0[i]);
      c1[i] = at::vec::fmadd(av, b1, c1[i]);
    }
  }
  const int n0 = static_cast<int>(std::min<int64_t>(V, nv)), n1 = static_cast<int>(nv - n0);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    if (i < r) {
      if (nv == NB) {
        c0[i].store(out[i]);
        c1[i].store(out[i] + V);
      } else {
        c0[i].store(out[i], n0);
        if (n1 > 0) c1[i].store(out[i] + V, n1);
      }
    }
}

// grad_input on channels_last: tasks (image, band of output rows) as on NCHW; the band's input rows
// zeroed where no output pixel lands, then per tile of MR output pixels (one output row) the C_in
// channels of each in blocks of NB, K = C_out contiguous in the grad_out pixel.
template <typename T>
void bwd_input_nhwc_impl(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi) {
  constexpr int64_t NB = nb_of<T>();
  const int64_t Cin = p.C_in, Cout = p.C_out, H = p.H, W = p.W, Ho = p.H_out, Wo = p.W_out;
  const T* gp = g.const_data_ptr<T>();
  const T* wp = w.const_data_ptr<T>();
  T* op = gi.mutable_data_ptr<T>();
  const int64_t nblk = ceil_div(Cin, NB);
  std::vector<T> B(nblk * Cout * NB, T(0));  // B[nb][oc][j] = w[oc][nb NB + j]
  for (int64_t oc = 0; oc < Cout; ++oc)
    for (int64_t ci = 0; ci < Cin; ++ci) B[((ci / NB) * Cout + oc) * NB + ci % NB] = wp[oc * Cin + ci];
  const GiBands bands(p);
  const int64_t nband = bands.n, rb = bands.rb;
  auto lo_row = [&](int64_t band) { return bands.lo_row(band); };
  // input columns an output pixel lands on
  std::vector<unsigned char> col_hit(W, 0);
  for (int64_t ow = 0; ow < Wo; ++ow) {
    const int64_t iw = ow * p.sw - p.pl;
    if (iw >= 0 && iw < W) col_hit[iw] = 1;
  }
  at::parallel_for(0, p.N * nband, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> ows;
    ows.reserve(Wo);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nband, band = task % nband;
      const int64_t oh0 = band * rb, oh1 = std::min(Ho, oh0 + rb);
      for (int64_t ih = lo_row(band); ih < lo_row(band + 1); ++ih) {
        const int64_t q = ih + p.pt;
        T* row = op + (n * H + ih) * W * Cin;
        if (!(q % p.sh == 0 && q / p.sh >= oh0 && q / p.sh < oh1)) {
          std::memset(row, 0, W * Cin * sizeof(T));
          continue;
        }
        for (int64_t iw = 0; iw < W; ++iw)
          if (!col_hit[iw]) std::memset(row + iw * Cin, 0, Cin * sizeof(T));
      }
      for (int64_t oh = oh0; oh < oh1; ++oh) {
        const int64_t ih = oh * p.sh - p.pt;
        if (ih < 0 || ih >= H) continue;
        ows.clear();
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const int64_t iw = ow * p.sw - p.pl;
          if (iw >= 0 && iw < W) ows.push_back(ow);
        }
        for (size_t t0 = 0; t0 < ows.size(); t0 += MR) {
          const int r = static_cast<int>(std::min<size_t>(MR, ows.size() - t0));
          const T* a[MR];
          T* o[MR];
          for (int i = 0; i < MR; ++i) {
            const int64_t ow = ows[t0 + std::min(i, r - 1)];
            a[i] = gp + ((n * Ho + oh) * Wo + ow) * Cout;
            o[i] = op + ((n * H + ih) * W + ow * p.sw - p.pl) * Cin;
          }
          for (int64_t nb = 0; nb < nblk; ++nb) {
            T* oo[MR];
            for (int i = 0; i < MR; ++i) oo[i] = o[i] + nb * NB;
            ukernel_rows<T>(a, r, B.data() + nb * Cout * NB, Cout, oo, std::min<int64_t>(NB, Cin - nb * NB));
          }
        }
      }
    }
  });
}

// acc[o][k] += g[o][0..n) * x[k][0..n) over the pixels of a task, OCB x KB vectors; out[o * ldo + k] =
// the horizontal sums. g rows: g[o * gs + j]; x rows: x[k * xs + j], zero-padded to whole vectors.
template <typename T, int OCB, int KB>
inline void gw_block(const T* g, int64_t gs, const T* x, int64_t xs, int64_t n, T* out, int64_t ldo, int ocr,
                     int kbr) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  Vec acc[OCB][KB];
#pragma GCC unroll 4
  for (int o = 0; o < OCB; ++o)
#pragma GCC unroll 4
    for (int k = 0; k < KB; ++k) acc[o][k] = Vec(T(0));
  const int64_t nfull = n / V;
  for (int64_t v = 0; v < nfull; ++v) {
    Vec gv[OCB];
#pragma GCC unroll 4
    for (int o = 0; o < OCB; ++o) gv[o] = Vec::loadu(g + o * gs + v * V);
#pragma GCC unroll 4
    for (int k = 0; k < KB; ++k) {
      const Vec xv = Vec::loadu(x + k * xs + v * V);
#pragma GCC unroll 4
      for (int o = 0; o < OCB; ++o) acc[o][k] = at::vec::fmadd(gv[o], xv, acc[o][k]);
    }
  }
  if (nfull * V < n) {  // the tail: grad_out lanes past n loaded as zeros, x's buffer is zero there
    const int rem = static_cast<int>(n - nfull * V);
    Vec gv[OCB];
#pragma GCC unroll 4
    for (int o = 0; o < OCB; ++o) gv[o] = Vec::loadu(g + o * gs + nfull * V, rem);
#pragma GCC unroll 4
    for (int k = 0; k < KB; ++k) {
      const Vec xv = Vec::loadu(x + k * xs + nfull * V);
#pragma GCC unroll 4
      for (int o = 0; o < OCB; ++o) acc[o][k] = at::vec::fmadd(gv[o], xv, acc[o][k]);
    }
  }
  alignas(64) T buf[V];
  for (int o = 0; o < ocr; ++o)
    for (int k = 0; k < kbr; ++k) {
      acc[o][k].store(buf);
      T s = T(0);
      for (int64_t j = 0; j < V; ++j) s += buf[j];
      out[o * ldo + k] = s;
    }
}

template <typename T>
void bwd_weight_impl(const at::Tensor& g, const at::Tensor& x, const conv::Params& p, at::Tensor& gw, at::Tensor& gb) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  constexpr int OCB = 3, KB = 4;  // 12 accumulators, 3 grad_out vectors, 1 input vector: 16 registers
  const int64_t Cin = p.C_in, Cout = p.C_out, HW = p.H * p.W, Ho = p.H_out, Wo = p.W_out, P = Ho * Wo;
  const T* gp = g.const_data_ptr<T>();
  if (gb.defined()) conv_simd::grad_bias_nchw<T>(gp, p.N, Cout, P, gb.mutable_data_ptr<T>());
  if (!gw.defined()) return;
  const T* xp = x.const_data_ptr<T>();
  const int64_t rb = std::max<int64_t>(1, std::min<int64_t>(Ho, kGwBandPixels / std::max<int64_t>(1, Wo)));
  const int64_t nband = ceil_div(Ho, rb), ntask = p.N * nband, wsize = Cout * Cin;
  const bool plain = p.sh == 1 && p.sw == 1 && p.pt == 0 && p.pl == 0 && Ho == p.H && Wo == p.W;
  std::vector<T> partial(ntask * wsize);
  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xbuf;
    std::vector<int64_t> off;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nband, q0 = (task % nband) * rb * Wo, pc = std::min<int64_t>(rb * Wo, P - q0);
      const int64_t xs = ceil_div(pc, V) * V;
      // the input pixels of the task's output pixels, per channel a row of xs (zero past pc and at padding)
      xbuf.assign(Cin * xs, T(0));
      off.resize(pc);
      for (int64_t j = 0; j < pc; ++j) off[j] = plain ? q0 + j : src_offset(p, q0 + j);
      const T* xn = xp + n * Cin * HW;
      for (int64_t ci = 0; ci < Cin; ++ci) {
        const T* xc = xn + ci * HW;
        T* d = xbuf.data() + ci * xs;
        if (plain) std::memcpy(d, xc + q0, pc * sizeof(T));
        else
          for (int64_t j = 0; j < pc; ++j)
            if (off[j] >= 0) d[j] = xc[off[j]];
      }
      const T* gn = gp + n * Cout * P + q0;
      T* part = partial.data() + task * wsize;
      for (int64_t oc0 = 0; oc0 < Cout; oc0 += OCB) {
        const int ocr = static_cast<int>(std::min<int64_t>(OCB, Cout - oc0));
        const T* go = gn + oc0 * P;
        for (int64_t ci0 = 0; ci0 < Cin; ci0 += KB) {
          const int kbr = static_cast<int>(std::min<int64_t>(KB, Cin - ci0));
          T* o = part + oc0 * Cin + ci0;
          const T* xq = xbuf.data() + ci0 * xs;
          if (ocr == OCB && kbr == KB) {
            gw_block<T, OCB, KB>(go, P, xq, xs, pc, o, Cin, OCB, KB);
          } else if (ocr == OCB) {  // the last channels of the input: one at a time
            for (int k2 = 0; k2 < kbr; ++k2) gw_block<T, OCB, 1>(go, P, xq + k2 * xs, xs, pc, o + k2, Cin, OCB, 1);
          } else {  // the last output channels: one at a time
            for (int o2 = 0; o2 < ocr; ++o2) {
              if (kbr == KB) gw_block<T, 1, KB>(go + o2 * P, P, xq, xs, pc, o + o2 * Cin, Cin, 1, KB);
              else
                for (int k2 = 0; k2 < kbr; ++k2)
                  gw_block<T, 1, 1>(go + o2 * P, P, xq + k2 * xs, xs, pc, o + o2 * Cin + k2, Cin, 1, 1);
            }
          }
        }
      }
    }
  });
  T* gwp = gw.mutable_data_ptr<T>();
  at::parallel_for(0, wsize, 256, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      double s = 0;
      for (int64_t task = 0; task < ntask; ++task) s += static_cast<double>(partial[task * wsize + j]);
      gwp[j] = static_cast<T>(s);
    }
  });
}

void fwd_nchw(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p, at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_1x1_fwd_nchw_cpu", [&] { fwd_impl<scalar_t>(x, w, bias, p, y); });
}
void bwd_input_nchw(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_1x1_bwd_input_nchw_cpu",
                             [&] { bwd_input_impl<scalar_t>(g, w, p, gi); });
}
void bwd_input_nhwc(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_1x1_bwd_input_nhwc_cpu",
                             [&] { bwd_input_nhwc_impl<scalar_t>(g, w, p, gi); });
}
void bwd_weight_nchw(const at::Tensor& g, const at::Tensor& x, const conv::Params& p, at::Tensor& gw, at::Tensor& gb) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "conv2d_1x1_bwd_weight_nchw_cpu",
                             [&] { bwd_weight_impl<scalar_t>(g, x, p, gw, gb); });
}

const Conv2d1x1Kernels kTable{&fwd_nchw, &bwd_input_nchw, &bwd_input_nhwc, &bwd_weight_nchw};

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(Conv2d1x1Kernels, conv2d_1x1_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
