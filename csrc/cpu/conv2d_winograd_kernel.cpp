// conv2d by Winograd F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
// 2016), at::vec SIMD + ATen parallel_for, compiled once per capability (setup.py defines
// CPU_CAPABILITY). Layout: NHWC activations, vectorized over channels.
//
// Each 4x4 output tile reads a 6x6 input tile d; with the points 0, +-1, +-2, inf:
//   Y = A^T [ sum_ci (G g G^T) (.) (B^T d B) ] A        (.) elementwise over the 36 transform points
//   B^T = [4  0 -5  0 1 0;  0 -4 -4  1 1 0;  0 4 -4 -1 1 0;  0 -2 -1 2 1 0;  0 2 -1 -2 1 0;  0 4 0 -5 0 1]
//   G   = [1/4 0 0;  -1/6 -1/6 -1/6;  -1/6 1/6 -1/6;  1/24 1/12 1/6;  1/24 -1/12 1/6;  0 0 1]
//   A^T = [1 1 1 1 1 0;  0 1 -1 2 -2 0;  0 1 1 4 4 0;  0 1 -1 8 -8 1]
// so the 9 multiply-adds per output and input channel of the direct convolution become 36 / 16 =
// 2.25: per transform point xi one GEMM  M[xi] (tiles x C_out) = V[xi] (tiles x C_in) U[xi] (C_in x C_out).
//
// Steps of one call:
//   1. the weights, transformed once: U[xi][nb][ci][NB] (NB = 2 vectors of output channels, zero past
//      C_out), the layout the micro-kernel reads;
//   2. per block of Tb tiles: the input transform V[xi][tile][ci] (padding and the edges: zeros read
//      outside the input), 36 GEMMs on the register-blocked micro-kernel (MR = 6 tiles x NB output
//      channels in 12 accumulators, as conv2d_kernel.cpp's), the output transform (+ bias) written to
//      NHWC or NCHW (output pixels past H_out / W_out dropped).
// Two schedules, each one parallel region (no barrier inside; on a shared machine every extra region
// cost a scheduler wake-up: 7x7 px, 512 channels went from 84 to 51 ms with one region instead of two):
//   tile mode (U <= 4 MB: few channels, many tiles): each thread transforms U for itself, then runs
//     blocks of tiles sized so that V and M of a block stay in L2, one block per task;
//   channel mode (many channels, small images: U would not fit in L2 anyway, 38 MB at 512 channels):
//     each thread transforms V of all tiles for itself, then one task per NB output channels
//     transforms its slice of U into its buffer (U is never stored whole), runs the 36 GEMMs and the
//     output transform of those channels.
//
// Numerics: float32 accumulates in float32 like the direct kernel; the transforms add rounding
// (B^T d B grows the data up to ~100x before the GEMM, the fractions of G are inexact): the error
// against float64 is measured in tests/test_conv2d_winograd.py and the benchmark, not assumed.
// NaN / inf in the input reach every output of the tiles that read them (Winograd mixes a tile's
// 36 inputs), a superset of the outputs torch makes NaN; a NaN still propagates.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/conv2d_winograd_kernel.h"

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int MR = 6;       // tiles per micro-kernel call
constexpr int NP = 36;      // transform points (6 x 6)
constexpr int64_t kL2BlockBytes = 512 * 1024;        // V + M of a block run as one task (L2)
constexpr int64_t kBigBlockBytes = 12 * 1024 * 1024;  // V of a block in channel mode (L3)

template <typename T>
constexpr int64_t nb_of() { return 2 * Vectorized<T>::size(); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- the 1-D transforms, on vectors (one lane per channel) ------------------------------------
// r = B^T d (6 -> 6)
template <typename Vec>
inline void bt6(const Vec& d0, const Vec& d1, const Vec& d2, const Vec& d3, const Vec& d4, const Vec& d5, Vec* r,
                int64_t rs) {
  using T = typename Vec::value_type;
  const Vec c4(T(4)), cm4(T(-4)), cm5(T(-5)), c2(T(2)), cm2(T(-2));
  const Vec t0 = at::vec::fmadd(cm4, d2, d4);  // d4 - 4 d2
  const Vec t1 = at::vec::fmadd(cm4, d1, d3);  // d3 - 4 d1
  const Vec t2 = d4 - d2, t3 = d3 - d1;
  r[0] = at::vec::fmadd(c4, d0, at::vec::fmadd(cm5, d2, d4));
  r[rs] = t0 + t1;
  r[2 * rs] = t0 - t1;
  r[3 * rs] = at::vec::fmadd(c2, t3, t2);
  r[4 * rs] = at::vec::fmadd(cm2, t3, t2);
  r[5 * rs] = at::vec::fmadd(c4, d1, at::vec::fmadd(cm5, d3, d5));
}

// y = A^T m (6 -> 4)
template <typename Vec>
inline void at6(const Vec& m0, const Vec& m1, const Vec& m2, const Vec& m3, const Vec& m4, const Vec& m5, Vec* y,
                int64_t ys) {
  using T = typename Vec::value_type;
  const Vec c2(T(2)), c4(T(4)), c8(T(8));
  const Vec s1 = m1 + m2, d1 = m1 - m2, s2 = m3 + m4, d2 = m3 - m4;
  y[0] = m0 + s1 + s2;
  y[ys] = at::vec::fmadd(c2, d2, d1);
  y[2 * ys] = at::vec::fmadd(c4, s2, s1);
  y[3 * ys] = at::vec::fmadd(c8, d2, d1) + m5;
}

// u = G g (3 -> 6)
template <typename Vec>
inline void g3(const Vec& g0, const Vec& g1, const Vec& g2, Vec* u, int64_t us) {
  using T = typename Vec::value_type;
  const Vec q(T(1) / T(4)), ms(T(-1) / T(6)), s(T(1) / T(6)), tw(T(1) / T(12)), tf(T(1) / T(24));
  const Vec e = g0 + g2;
  const Vec a = at::vec::fmadd(tf, g0, s * g2), b = tw * g1;
  u[0] = q * g0;
  u[us] = (e + g1) * ms;
  u[2 * us] = (e - g1) * ms;
  u[3 * us] = a + b;
  u[4 * us] = a - b;
  u[5 * us] = g2;
}

// ---- the micro-kernel ---------------------------------------------------------------------------
// c[i][0..NB) = sum_k a[i * lda + k] * b[k][0..NB),  i < MR.
template <typename T>
inline void ukernel(const T* a, int64_t lda, int64_t K, const T* b, T* c, int64_t ldc) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size(), NB = 2 * V;
  Vec c0[MR], c1[MR];
  const T* ar[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    c0[i] = Vec(T(0));
    c1[i] = Vec(T(0));
    ar[i] = a + i * lda;
  }
  for (int64_t k = 0; k < K; ++k, b += NB) {
    const Vec b0 = Vec::loadu(b), b1 = Vec::loadu(b + V);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Vec av(ar[i][k]);
      c0[i] = at::vec::fmadd(av, b0, c0[i]);
      c1[i] = at::vec::fmadd(av, b1, c1[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    c0[i].store(c + i * ldc);
    c1[i].store(c + i * ldc + V);
  }
}

// ---- one call -------------------------------------------------------------------------------------
template <typename T>
struct Wino {
  using Vec = Vectorized<T>;
  static constexpr int64_t V = Vec::size(), NB = nb_of<T>();

  const conv::Params& p;
  const T* x;      // (N, H, W, K) NHWC
  T* y;            // NHWC or NCHW
  bool nchw;
  int64_t K, Kp, Co, nblk, Cop;  // C_in (Kp: whole vectors), C_out (Cop: whole NB blocks)
  int64_t tw, tpi, tiles;        // tiles along W, per image, in all
  const T* w;                    // (C_out, C_in, 3, 3), or (C_in, C_out, 3, 3) flipped (ft)
  bool ft;
  std::vector<T> bias;           // [Cop]

  Wino(const at::Tensor& xt, const at::Tensor& w_, const at::Tensor& b, const conv::Params& p_, bool ft_, at::Tensor& yt)
      : p(p_), x(xt.const_data_ptr<T>()), y(yt.mutable_data_ptr<T>()),
        nchw(!yt.is_contiguous(at::MemoryFormat::ChannelsLast)), w(w_.const_data_ptr<T>()), ft(ft_) {
    K = p.C_in;
    Kp = ceil_div(K, V) * V;
    Co = p.C_out;
    nblk = ceil_div(Co, NB);
    Cop = nblk * NB;
    tw = ceil_div(p.W_out, 4);
    tpi = ceil_div(p.H_out, 4) * tw;
    tiles = p.N * tpi;
    bias.assign(Cop, T(0));
    if (b.defined())
      for (int64_t c = 0; c < Co; ++c) bias[c] = b.const_data_ptr<T>()[c];
  }

  // dst[xi * xs + k * NB + j] = (G g G^T)[xi] of g = w'[nb * NB + j][k] (zero past C_out), k in [k0, k1).
  // The 3x3 filters of 16 k and NB output channels are first transposed into gk[k][tap][j] (the
  // AVX-512 table: in-register 16 x 16 transposes, at::vec::transpose_mxn): the filters of one k lie
  // K * 9 floats apart along the output channels, and gathering them one float at a time was half of
  // ResNet-18's 3x3 512-channel forward at 7 x 7 (2026-12-02, Zen 5).
  // Only the transform rows i in [i0, i1) (points xi = 6 i + jj), at dst + (xi - 6 i0) * xs.
  void transform_weight_block(int64_t nb, int64_t k0, int64_t k1, T* dst, int64_t xs, int i0 = 0, int i1 = 6) const {
    constexpr int64_t KC = 16;
    alignas(64) T gk[KC * 9 * NB];
    Vec t[6][3], r[6];
    const int64_t co0 = nb * NB, rows = std::max<int64_t>(0, std::min<int64_t>(NB, Co - co0));
    for (int64_t kc0 = k0; kc0 < k1; kc0 += KC) {
      const int64_t kc = std::min<int64_t>(KC, k1 - kc0);
      if (rows < NB) std::fill(gk, gk + kc * 9 * NB, T(0));
      if (rows > 0) {
        if (!ft) {  // w (Co, K, 3, 3): per output channel, the 9 kc values of k in [kc0, kc0 + kc) in a row
          at::vec::transpose_mxn<T>(w + (co0 * K + kc0) * 9, K * 9, gk, NB, static_cast<int>(rows),
                                    static_cast<int>(kc * 9));
        } else {  // w (K, Co, 3, 3) read flipped: per k, the output channels' 9 taps in a row
          for (int64_t kl = 0; kl < kc; ++kl)
            at::vec::transpose_mxn<T>(w + ((kc0 + kl) * Co + co0) * 9, 9, gk + kl * 9 * NB, NB,
                                      static_cast<int>(rows), 9);
        }
      }
      for (int64_t kl = 0; kl < kc; ++kl) {
        const T* g = gk + kl * 9 * NB;
        auto tap = [&](int i, int64_t h) { return Vec::loadu(g + (ft ? 8 - i : i) * NB + h); };
        T* d = dst + (kc0 + kl) * NB;
        for (int64_t h = 0; h < NB; h += V) {
          for (int c = 0; c < 3; ++c)  // along kh, per column kw
            g3(tap(c, h), tap(3 + c, h), tap(6 + c, h), &t[0][c], 3);
          for (int i = i0; i < i1; ++i) {  // along kw, per row
            g3(t[i][0], t[i][1], t[i][2], r, 1);
            for (int jj = 0; jj < 6; ++jj) r[jj].store(d + ((i - i0) * 6 + jj) * xs + h);
          }
        }
      }
    }
  }

  // V[xi][tl][0..Kp) for tile `tile` (block row tl).
  void input_tile(int64_t tile, T* Vb, int64_t Tb, int64_t tl) const {
    const int64_t n = tile / tpi, r = tile % tpi;
    const int64_t ih0 = (r / tw) * 4 - p.pt, iw0 = (r % tw) * 4 - p.pl;
    const T* xn = x + n * p.H * p.W * K;
    const T* src[6][6];  // pixel base or nullptr (padding)
    bool inside = true;
    for (int i = 0; i < 6; ++i) {
      const int64_t ih = ih0 + i;
      for (int j = 0; j < 6; ++j) {
        const int64_t iw = iw0 + j;
        const bool ok = ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
        inside = inside && ok;
        src[i][j] = ok ? xn + (ih * p.W + iw) * K : nullptr;
      }
    }
    const int64_t xs = Tb * Kp;  // V's stride between transform points
    T* out = Vb + tl * Kp;
    Vec d[6][6], t[6][6], v[6];
    for (int64_t c = 0; c < K; c += V) {
      const int64_t nc = std::min<int64_t>(V, K - c);
      if (inside && nc == V) {
        for (int i = 0; i < 6; ++i)
          for (int j = 0; j < 6; ++j) d[i][j] = Vec::loadu(src[i][j] + c);
      } else {
        for (int i = 0; i < 6; ++i)
          for (int j = 0; j < 6; ++j) d[i][j] = src[i][j] ? Vec::loadu(src[i][j] + c, nc) : Vec(T(0));
      }
      for (int j = 0; j < 6; ++j) bt6(d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j], &t[0][j], 6);
      for (int i = 0; i < 6; ++i) {
        bt6(t[i][0], t[i][1], t[i][2], t[i][3], t[i][4], t[i][5], v, 1);
        for (int j = 0; j < 6; ++j) v[j].store(out + (i * 6 + j) * xs + c);
      }
    }
  }

  // The 4x4 outputs of tile `tile`, channels [c0, c1), plus bias: m[xi * ms + c - c0] = M[xi][tile][c].
  void output_tile(int64_t tile, const T* m0, int64_t ms, int64_t c0, int64_t c1) const {
    const int64_t n = tile / tpi, r = tile % tpi;
    const int64_t oh0 = (r / tw) * 4, ow0 = (r % tw) * 4;
    const int64_t nh = std::min<int64_t>(4, p.H_out - oh0), nw = std::min<int64_t>(4, p.W_out - ow0);
    Vec s[4][6], o[4][4];
    const int64_t HWo = p.H_out * p.W_out;
    for (int64_t c = c0; c < c1; c += V) {
      const int64_t nc = std::min<int64_t>(V, c1 - c);
      for (int j = 0; j < 6; ++j) {
        const T* m = m0 + j * ms + c - c0;
        at6(Vec::loadu(m), Vec::loadu(m + 6 * ms), Vec::loadu(m + 12 * ms), Vec::loadu(m + 18 * ms),
            Vec::loadu(m + 24 * ms), Vec::loadu(m + 30 * ms), &s[0][j], 6);
      }
      const Vec bv = Vec::loadu(bias.data() + c);
      for (int i = 0; i < 4; ++i) {
        at6(s[i][0], s[i][1], s[i][2], s[i][3], s[i][4], s[i][5], o[i], 1);
        for (int j = 0; j < 4; ++j) o[i][j] = o[i][j] + bv;
      }
      if (!nchw) {
        for (int64_t i = 0; i < nh; ++i) {
          T* row = y + ((n * p.H_out + oh0 + i) * p.W_out + ow0) * Co + c;
          for (int64_t j = 0; j < nw; ++j) {
            if (nc == V) o[i][j].store(row + j * Co);
            else o[i][j].store(row + j * Co, nc);
          }
        }
      } else {
        alignas(64) T buf[4][4][V];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) o[i][j].store(buf[i][j]);
        for (int64_t l = 0; l < nc; ++l) {
          T* plane = y + (n * Co + c + l) * HWo + oh0 * p.W_out + ow0;
          for (int64_t i = 0; i < nh; ++i)
            for (int64_t j = 0; j < nw; ++j) plane[i * p.W_out + j] = buf[i][j][l];
        }
      }
    }
  }

  // C[xi][t][0..NB) = V[xi][t][0..K) B[xi][0..K)[0..NB) for the nt tiles of a block, xi in [x0, x1):
  // A = V (xi stride as, row stride Kp), B (point x0 first, xi stride bs), C (xi stride cs, row stride ldc).
  void gemm(const T* A, int64_t as, const T* B, int64_t bs, T* C, int64_t cs, int64_t ldc, int64_t nt, int64_t x0,
            int64_t x1) const {
    const int64_t nmt = ceil_div(nt, MR);
    for (int64_t xi = x0; xi < x1; ++xi)
      for (int64_t mt = 0; mt < nmt; ++mt)
        ukernel<T>(A + xi * as + mt * MR * Kp, Kp, K, B + (xi - x0) * bs, C + xi * cs + mt * MR * ldc, ldc);
  }

  void run() {
    const int64_t threads = at::get_num_threads();
    const int64_t sz = int64_t(sizeof(T));
    const int64_t Tb_small = std::max<int64_t>(MR, kL2BlockBytes / (NP * (Kp + Cop) * sz) / MR * MR);
    const int64_t nblocks_small = ceil_div(tiles, Tb_small);
    const int64_t u_bytes = NP * nblk * K * NB * sz;
    // One parallel region per call (a second one costs a wake-up of the other thread each time, which
    // on a shared machine can take a scheduler time slice): what every task needs (U in tile mode, V
    // in channel mode) is computed by each thread for itself -- small next to the GEMMs there.
    if (nblocks_small >= 4 * threads && u_bytes <= 4 * 1024 * 1024) {
      // Tile mode: U per thread; then one block of tiles per task, V and M of the block in L2.
      const int64_t Tb = Tb_small;
      at::parallel_for(0, nblocks_small, 1, [&](int64_t b, int64_t e) {
        std::vector<T> U(NP * nblk * K * NB), Vb(NP * Tb * Kp, T(0)), Mb(NP * Tb * Cop);
        for (int64_t nb = 0; nb < nblk; ++nb) transform_weight_block(nb, 0, K, U.data() + nb * K * NB, nblk * K * NB);
        for (int64_t blk = b; blk < e; ++blk) {
          const int64_t t0 = blk * Tb, nt = std::min(Tb, tiles - t0);
          for (int64_t tl = 0; tl < nt; ++tl) input_tile(t0 + tl, Vb.data(), Tb, tl);
          for (int64_t nb = 0; nb < nblk; ++nb)
            gemm(Vb.data(), Tb * Kp, U.data() + nb * K * NB, nblk * K * NB, Mb.data() + nb * NB, Tb * Cop, Cop, nt,
                 0, NP);
          for (int64_t tl = 0; tl < nt; ++tl) output_tile(t0 + tl, Mb.data() + tl * Cop, Tb * Cop, 0, Co);
        }
      });
      return;
    }
    // Channel mode (many channels, few tiles): per block of tiles (all of them, unless V would outgrow
    // the L3), one task per NB output channels: their U (transformed into the task's buffer, never
    // stored whole), the 36 GEMMs, the output transform; V of the block computed by each thread.
    const int64_t Tb = std::min(ceil_div(tiles, MR) * MR, std::max<int64_t>(MR, kBigBlockBytes / (NP * Kp * sz) / MR * MR));
    for (int64_t t0 = 0; t0 < tiles; t0 += Tb) {
      const int64_t nt = std::min(Tb, tiles - t0);
      at::parallel_for(0, nblk, 1, [&](int64_t b, int64_t e) {
        // U of the task's channels one transform row (6 points) at a time: 6 K NB floats, written and
        // read back in L2 (all 36 points of 512 channels, 2.4 MB, went out to L3 and back)
        std::vector<T> Vb(NP * Tb * Kp, T(0)), Ub(6 * K * NB), Mb(NP * Tb * NB);
        for (int64_t tl = 0; tl < nt; ++tl) input_tile(t0 + tl, Vb.data(), Tb, tl);
        for (int64_t nb = b; nb < e; ++nb) {
          for (int i = 0; i < 6; ++i) {
            transform_weight_block(nb, 0, K, Ub.data(), K * NB, i, i + 1);
            gemm(Vb.data(), Tb * Kp, Ub.data(), K * NB, Mb.data(), Tb * NB, NB, nt, 6 * i, 6 * i + 6);
          }
          for (int64_t tl = 0; tl < nt; ++tl)
            output_tile(t0 + tl, Mb.data() + tl * NB, Tb * NB, nb * NB, std::min(Co, (nb + 1) * NB));
        }
      });
    }
  }
};

void fwd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p, bool flip_transpose,
         at::Tensor& y) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_winograd_fwd_cpu", [&] {
    Wino<scalar_t> wino(x, w, bias, p, flip_transpose, y);
    wino.run();
  });
}

const Conv2dWinogradKernels kTable{&fwd};

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(Conv2dWinogradKernels, conv2d_winograd_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
