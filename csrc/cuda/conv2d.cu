// conv2d CUDA kernels and launchers (torch.nn.functional.conv2d semantics: cross-correlation, zero
// padding (top, bottom, left, right), stride, dilation, groups), registered under the CUDA key.
//
// Every pass is one implicit GEMM per group g (grid z), NHWC internally: the launchers make input and
// grad_out channels_last and the weight (C_out, kH, kW, Cg) contiguous, so the gathered operand rows
// run along contiguous channels. Nothing is materialised (no im2col): operand tiles are gathered
// from global memory into shared memory by address arithmetic, zero outside the input.
//
//   forward  out[m, co]  = sum_k x[m, k] w[k, co]     m = (n, ho, wo), k = (kh, kw, ci), K = kH kW Cg
//            x[(n, ho, wo), (kh, kw, ci)] = input[n, ho sh - pt + kh dh, wo sw - pl + kw dw, g Cg + ci]
//   dgrad    gin[m, ci]  = sum_k go[m, k] w[k, ci]    m = (n, h, w), k = (kh, kw, co), K = kH kW Cog
//            go[(n, h, w), (kh, kw, co)] = grad_out[n, ho, wo, g Cog + co] where h + pt - kh dh = ho sh
//            exactly with 0 <= ho < H_out (likewise w); zero otherwise (any stride)
//   wgrad    gw[co, k]   = sum_m go[m, co] x[m, k]    a reduction over m = (n, ho, wo), split in P
//            chunks; each block writes its partial tile to a (P, C_out, K) buffer (acc_t), and
//            _conv2d_sum_partials_kernel sums the P partials in split order into grad_weight
//            (C_out, Cg, kH, kW). Deterministic: no atomics.
//   gbias    gb[co]      = sum_m go[m, co]           partials per (split, channel), summed the same way.
//
// Tiles: BM x BN outputs per block of 128 threads, K in steps of BK through shared memory.
//   Path::kWmma16  float16 / bfloat16: tensor cores (nvcuda::wmma 16x16x16), float accumulation.
//   Path::kTf32    float32 when at::globalContext().allowTF32CuDNN() (torch's rule for convolutions):
//                  tensor cores (wmma 16x16x8, precision::tf32), float accumulation.
//   Path::kSimt    float32 otherwise, float64: an 8x4 register tile per thread, FMA in acc_t.
// Output and grad_input are written through their four strides, in the memory format of input.
//
// Cg = 1 (depthwise, or one input channel): K = kH kW is too short for a GEMM tile; _conv2d_dw_*
// kernels compute one output (forward) / input (dgrad) element a thread in NHWC order, and the wgrad
// partials per (split, channel, kh kW + kw) with a fixed-order block reduction.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common/conv2d.h"
#include "common.cuh"

namespace pyfastdl {
namespace {

using cuda_common::fma_acc;

constexpr int kBM = 64;       // GEMM rows per block
constexpr int kBN = 64;       // GEMM columns per block
constexpr int kBK = 32;       // reduction step through shared memory
constexpr int kThreads = 128;  // 4 warps
constexpr int kMaxSplits = 256;                 // partial buffers of a wgrad reduction, at most
constexpr int64_t kMaxPartialElems = 1LL << 26;  // elements of all the partial buffers, at most
constexpr int64_t kMaxGridYZ = 65535;

enum class Mode : int { kFwd = 0, kDgrad = 1, kWgrad = 2 };
enum class Path : int { kSimt = 0, kWmma16 = 1, kTf32 = 2 };

// The problem as the kernels see it (int64 sizes; offsets are computed in int64).
struct Problem {
  int64_t N, H, W, C_in, H_out, W_out, C_out;
  int64_t Cg, Cog, kH, kW, sh, sw, pt, pl, dh, dw;
  int64_t M;      // GEMM rows of a group:    fwd N H_out W_out, dgrad N H W, wgrad Cog
  int64_t Ncols;  // GEMM columns of a group: fwd Cog, dgrad Cg, wgrad KT
  int64_t K;      // reduction length:        fwd KT, dgrad kH kW Cog, wgrad N H_out W_out
  int64_t KT;     // kH kW Cg: the weight's row length (co, kh, kw, ci)
  int64_t chunk;  // wgrad: reduction positions per split
  int64_t splits;
  int64_t so_n, so_c, so_h, so_w;  // strides of the tensor written (output / grad_input)
};

template <typename scalar_t>
struct WmmaType {
  using type = scalar_t;
};
template <>
struct WmmaType<c10::Half> {
  using type = __half;
};
template <>
struct WmmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// Shared memory of one block. Row paddings: wmma needs ld % 8 == 0 (16-bit) / % 4 == 0 (float) and
// 32-byte aligned fragment pointers (every tile row offset below is a multiple of 32 bytes); the SIMT
// path pads by one element against bank conflicts.
template <typename scalar_t, Path P>
struct Smem {
  static constexpr int kPad = P == Path::kSimt ? 1 : (sizeof(scalar_t) == 2 ? 8 : 4);
  static constexpr int kLdA = kBK + kPad;
  static constexpr int kLdB = kBN + kPad;
  static constexpr int kLdC = kBN + 4;
  alignas(128) scalar_t a[kBM * kLdA];  // A tile, row-major (BM x BK)
  alignas(128) scalar_t b[kBK * kLdB];  // B tile, row-major (BK x BN)
  alignas(128) float c[P == Path::kSimt ? 1 : kBM * kLdC];  // tensor-core epilogue staging
  int64_t row_n[kBM];  // row decode (fwd, dgrad): image index, -1 past the end
  int row_y[kBM], row_x[kBM];
  int64_t red_n[kBK];  // per-step decode of the reduction index
  int red_y[kBK], red_x[kBK], red_c[kBK];
  int col_kh[kBN], col_kw[kBN], col_ci[kBN];  // wgrad column decode, kh = -1 past the end
};

// One implicit-GEMM tile: rows [blockIdx.x BM, +BM), columns [blockIdx.y BN, +BN) of group g (and,
// for wgrad, reduction split s), blockIdx.z = g (fwd, dgrad) or g * splits + s (wgrad).
//   fwd:   src_a = x (NHWC), src_b = w (C_out, kH, kW, Cg), dst = output, bias optional
//   dgrad: src_a = grad_out (NHWC), src_b = w, dst = grad_input
//   wgrad: src_a = grad_out (NHWC), src_b = x (NHWC), partial = (P, C_out, KT) acc_t
template <typename scalar_t, Mode MODE, Path P>
__global__ void __launch_bounds__(kThreads)
    _conv2d_igemm_kernel(const Problem p, const scalar_t* __restrict__ src_a, const scalar_t* __restrict__ src_b,
                         const scalar_t* __restrict__ bias, scalar_t* __restrict__ dst,
                         at::opmath_type<scalar_t>* __restrict__ partial) {
  using acc_t = at::opmath_type<scalar_t>;
  using S = Smem<scalar_t, P>;
  __shared__ __align__(128) unsigned char smem_raw[sizeof(S)];
  S& s = *reinterpret_cast<S*>(smem_raw);
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBN;
  int64_t g, split = 0;
  if constexpr (MODE == Mode::kWgrad) {
    g = blockIdx.z / p.splits;
    split = blockIdx.z % p.splits;
  } else {
    g = blockIdx.z;
  }
  const int64_t kbeg = MODE == Mode::kWgrad ? split * p.chunk : 0;
  const int64_t kend = MODE == Mode::kWgrad ? std::min(p.K, kbeg + p.chunk) : p.K;

  // Block-constant decodes: the rows (output or input positions), or the wgrad columns (kh, kw, ci).
  if constexpr (MODE == Mode::kWgrad) {
    for (int c = tid; c < kBN; c += kThreads) {
      const int64_t k = col0 + c;
      if (k < p.KT) {
        const int64_t khw = k / p.Cg;
        s.col_ci[c] = static_cast<int>(k - khw * p.Cg);
        s.col_kh[c] = static_cast<int>(khw / p.kW);
        s.col_kw[c] = static_cast<int>(khw % p.kW);
      } else {
        s.col_kh[c] = -1;
        s.col_kw[c] = 0;
        s.col_ci[c] = 0;
      }
    }
  } else {
    const int64_t RW = MODE == Mode::kFwd ? p.W_out : p.W;
    const int64_t RH = MODE == Mode::kFwd ? p.H_out : p.H;
    for (int r = tid; r < kBM; r += kThreads) {
      const int64_t m = row0 + r;
      if (m < p.M) {
        const int64_t t = m / RW;
        s.row_x[r] = static_cast<int>(m - t * RW);
        s.row_y[r] = static_cast<int>(t % RH);
        s.row_n[r] = t / RH;
      } else {
        s.row_n[r] = -1;
        s.row_x[r] = 0;
        s.row_y[r] = 0;
      }
    }
  }

  // Accumulators.
  constexpr int kTM = 8, kTN = 4;  // SIMT register tile: rows tr * 8 + i, columns tc + 16 j
  acc_t acc[kTM][kTN];
  const int tr = tid / 16, tc = tid % 16;
  const int warp = tid / cuda_common::kWarpSize;
  const int wr = (warp / 2) * 32, wc = (warp % 2) * 32;  // a warp's 32 x 32 quarter of the tile
  namespace wmma = nvcuda::wmma;
  constexpr int kFragK = P == Path::kTf32 ? 8 : 16;
  using FragIn = std::conditional_t<P == Path::kTf32, wmma::precision::tf32, typename WmmaType<scalar_t>::type>;
  using FragLoad = std::conditional_t<P == Path::kTf32, float, typename WmmaType<scalar_t>::type>;
  wmma::fragment<wmma::accumulator, 16, 16, kFragK, float> cf[2][2];
  if constexpr (P == Path::kSimt) {
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = acc_t(0);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(cf[i][j], 0.0f);
  }

  for (int64_t k0 = kbeg; k0 < kend; k0 += kBK) {
    __syncthreads();  // the previous step's tiles are consumed (and the block decodes written)
    // Per-step decode of the reduction index.
    for (int kk = tid; kk < kBK; kk += kThreads) {
      const int64_t k = k0 + kk;
      if constexpr (MODE == Mode::kWgrad) {  // k = (n, ho, wo)
        if (k < kend) {
          const int64_t t = k / p.W_out;
          s.red_x[kk] = static_cast<int>(k - t * p.W_out);
          s.red_y[kk] = static_cast<int>(t % p.H_out);
          s.red_n[kk] = t / p.H_out;
        } else {
          s.red_n[kk] = -1;
          s.red_x[kk] = 0;
          s.red_y[kk] = 0;
        }
        s.red_c[kk] = 0;
      } else {  // k = (kh, kw, c), c = ci (fwd) or co (dgrad)
        const int64_t C = MODE == Mode::kFwd ? p.Cg : p.Cog;
        if (k < kend) {
          const int64_t khw = k / C;
          s.red_c[kk] = static_cast<int>(k - khw * C);
          s.red_y[kk] = static_cast<int>(khw / p.kW);
          s.red_x[kk] = static_cast<int>(khw % p.kW);
          s.red_n[kk] = 0;
        } else {
          s.red_n[kk] = -1;
          s.red_c[kk] = 0;
          s.red_y[kk] = 0;
          s.red_x[kk] = 0;
        }
      }
    }
    __syncthreads();

    // A tile (BM x BK).
    for (int idx = tid; idx < kBM * kBK; idx += kThreads) {
      scalar_t v = scalar_t(0);
      if constexpr (MODE == Mode::kWgrad) {  // A(co, m) = grad_out[m, g Cog + co]: coalesced along co
        const int r = idx % kBM, kk = idx / kBM;
        const int64_t co = row0 + r;
        const int64_t n = s.red_n[kk];
        if (co < p.Cog && n >= 0) {
          const int64_t m = (n * p.H_out + s.red_y[kk]) * p.W_out + s.red_x[kk];
          v = src_a[m * p.C_out + g * p.Cog + co];
        }
        s.a[r * S::kLdA + kk] = v;
      } else {
        const int r = idx / kBK, kk = idx % kBK;  // along the channels: coalesced
        const int64_t n = s.row_n[r];
        if (n >= 0 && s.red_n[kk] >= 0) {
          const int kh = s.red_y[kk], kw = s.red_x[kk], c = s.red_c[kk];
          if constexpr (MODE == Mode::kFwd) {
            const int64_t ih = s.row_y[r] * p.sh - p.pt + kh * p.dh;
            const int64_t iw = s.row_x[r] * p.sw - p.pl + kw * p.dw;
            if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) {
              v = src_a[((n * p.H + ih) * p.W + iw) * p.C_in + g * p.Cg + c];
            }
          } else {
            const int64_t hn = s.row_y[r] + p.pt - kh * p.dh;
            const int64_t wn = s.row_x[r] + p.pl - kw * p.dw;
            if (hn >= 0 && wn >= 0 && hn % p.sh == 0 && wn % p.sw == 0) {
              const int64_t ho = hn / p.sh, wo = wn / p.sw;
              if (ho < p.H_out && wo < p.W_out) {
                v = src_a[((n * p.H_out + ho) * p.W_out + wo) * p.C_out + g * p.Cog + c];
              }
            }
          }
        }
        s.a[r * S::kLdA + kk] = v;
      }
    }
    // B tile (BK x BN).
    for (int idx = tid; idx < kBK * kBN; idx += kThreads) {
      scalar_t v = scalar_t(0);
      if constexpr (MODE == Mode::kFwd) {  // B(k, co) = w[g Cog + co, k]: coalesced along k
        const int kk = idx % kBK, c = idx / kBK;
        const int64_t co = col0 + c, k = k0 + kk;
        if (co < p.Cog && k < kend) v = src_b[(g * p.Cog + co) * p.KT + k];
        s.b[kk * S::kLdB + c] = v;
      } else if constexpr (MODE == Mode::kDgrad) {  // B((kh, kw, co), ci) = w[g Cog + co, kh, kw, ci]
        const int kk = idx / kBN, c = idx % kBN;
        const int64_t ci = col0 + c;
        if (ci < p.Cg && s.red_n[kk] >= 0) {
          v = src_b[(g * p.Cog + s.red_c[kk]) * p.KT + (s.red_y[kk] * p.kW + s.red_x[kk]) * p.Cg + ci];
        }
        s.b[kk * S::kLdB + c] = v;
      } else {  // B(m, (kh, kw, ci)) = x[n, ho sh - pt + kh dh, wo sw - pl + kw dw, g Cg + ci]
        const int kk = idx / kBN, c = idx % kBN;
        const int64_t n = s.red_n[kk];
        const int kh = s.col_kh[c];
        if (n >= 0 && kh >= 0) {
          const int64_t ih = s.red_y[kk] * p.sh - p.pt + kh * p.dh;
          const int64_t iw = s.red_x[kk] * p.sw - p.pl + s.col_kw[c] * p.dw;
          if (ih >= 0 && ih < p.H && iw >= 0 && iw < p.W) {
            v = src_b[((n * p.H + ih) * p.W + iw) * p.C_in + g * p.Cg + s.col_ci[c]];
          }
        }
        s.b[kk * S::kLdB + c] = v;
      }
    }
    __syncthreads();

    // Products.
    if constexpr (P == Path::kSimt) {
#pragma unroll 4
      for (int kk = 0; kk < kBK; ++kk) {
        acc_t av[kTM], bv[kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i) av[i] = static_cast<acc_t>(s.a[(tr * kTM + i) * S::kLdA + kk]);
#pragma unroll
        for (int j = 0; j < kTN; ++j) bv[j] = static_cast<acc_t>(s.b[kk * S::kLdB + tc + 16 * j]);
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
          for (int j = 0; j < kTN; ++j) acc[i][j] = fma_acc(av[i], bv[j], acc[i][j]);
      }
    } else {
      const FragLoad* a_base = reinterpret_cast<const FragLoad*>(s.a);
      const FragLoad* b_base = reinterpret_cast<const FragLoad*>(s.b);
#pragma unroll
      for (int ks = 0; ks < kBK; ks += kFragK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kFragK, FragIn, wmma::row_major> af[2];
        wmma::fragment<wmma::matrix_b, 16, 16, kFragK, FragIn, wmma::row_major> bf[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(af[i], a_base + (wr + 16 * i) * S::kLdA + ks, S::kLdA);
          wmma::load_matrix_sync(bf[i], b_base + ks * S::kLdB + wc + 16 * i, S::kLdB);
          if constexpr (P == Path::kTf32) {
#pragma unroll
            for (int e = 0; e < af[i].num_elements; ++e) af[i].x[e] = wmma::__float_to_tf32(af[i].x[e]);
#pragma unroll
            for (int e = 0; e < bf[i].num_elements; ++e) bf[i].x[e] = wmma::__float_to_tf32(bf[i].x[e]);
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(cf[i][j], af[i], bf[j], cf[i][j]);
      }
    }
  }

  // Epilogue: (r, c) of the tile -> the destination.
  auto store = [&](int r, int c, acc_t v) {
    if constexpr (MODE == Mode::kWgrad) {
      const int64_t co = row0 + r, k = col0 + c;
      if (co < p.Cog && k < p.KT) partial[((split * p.C_out) + g * p.Cog + co) * p.KT + k] = v;
    } else {
      const int64_t n = s.row_n[r];
      const int64_t ch = col0 + c;
      if (n < 0 || ch >= p.Ncols) return;
      int64_t full;
      if constexpr (MODE == Mode::kFwd) {
        full = g * p.Cog + ch;
        if (bias != nullptr) v += static_cast<acc_t>(bias[full]);
      } else {
        full = g * p.Cg + ch;
      }
      dst[n * p.so_n + full * p.so_c + s.row_y[r] * p.so_h + s.row_x[r] * p.so_w] = static_cast<scalar_t>(v);
    }
  };
  if constexpr (P == Path::kSimt) {
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) store(tr * kTM + i, tc + 16 * j, acc[i][j]);
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(s.c + (wr + 16 * i) * S::kLdC + wc + 16 * j, cf[i][j], S::kLdC,
                                wmma::mem_row_major);
    __syncthreads();
    for (int idx = tid; idx < kBM * kBN; idx += kThreads) {
      const int r = idx / kBN, c = idx % kBN;
      store(r, c, static_cast<acc_t>(s.c[r * S::kLdC + c]));
    }
  }
}

// grad_bias partials: pb[split, co] = sum of grad_out[m, co] (NHWC) over the split's positions, one
// column of threads per channel, a fixed-order tree over threadIdx.y.
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    _conv2d_bias_partials_kernel(const scalar_t* __restrict__ go, at::opmath_type<scalar_t>* __restrict__ pb,
                                 int64_t M, int64_t C, int64_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[8][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t m0 = split * chunk, m1 = std::min(M, m0 + chunk);
  acc_t sum = acc_t(0);
  if (c < C) {
    for (int64_t m = m0 + threadIdx.y; m < m1; m += 8) sum += static_cast<acc_t>(go[m * C + c]);
  }
  red[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    acc_t t = red[0][threadIdx.x];
#pragma unroll
    for (int y = 1; y < 8; ++y) t += red[y][threadIdx.x];
    pb[split * C + c] = t;
  }
}

// out[i] = sum over the splits of part[split, j(i)] in split order. weight_layout: out is grad_weight
// (C_out, Cg, kH, kW) and the partial index of (co, ci, khw) is co KT + khw Cg + ci; else j(i) = i.
template <typename scalar_t>
__global__ void _conv2d_sum_partials_kernel(const at::opmath_type<scalar_t>* __restrict__ part,
                                            scalar_t* __restrict__ out, int64_t L, int64_t splits, int64_t Cg,
                                            int64_t KHW, bool weight_layout) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < L;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t j = i;
    if (weight_layout) {
      const int64_t KT = Cg * KHW;
      const int64_t co = i / KT, rest = i - co * KT;
      const int64_t ci = rest / KHW, khw = rest - ci * KHW;
      j = co * KT + khw * Cg + ci;
    }
    acc_t t = part[j];
    for (int64_t sp = 1; sp < splits; ++sp) t += part[sp * L + j];
    out[i] = static_cast<scalar_t>(t);
  }
}

// ---- Cg = 1 (depthwise, or a single input channel): elementwise kernels, K = kH kW per channel ----
// Output channel co reads input channel co / Cog. One thread per output (forward) or input (dgrad)
// element in NHWC order (channels fastest: coalesced), a grid-stride loop; w is (C_out, kH kW).
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    _conv2d_dw_fwd_kernel(const Problem p, const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                          const scalar_t* __restrict__ bias, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = p.N * p.H_out * p.W_out * p.C_out;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t co = i % p.C_out;
    int64_t t = i / p.C_out;
    const int64_t wo = t % p.W_out;
    t /= p.W_out;
    const int64_t ho = t % p.H_out, n = t / p.H_out;
    const int64_t ci = co / p.Cog;
    acc_t acc = bias != nullptr ? static_cast<acc_t>(bias[co]) : acc_t(0);
    for (int64_t kh = 0; kh < p.kH; ++kh) {
      const int64_t ih = ho * p.sh - p.pt + kh * p.dh;
      if (ih < 0 || ih >= p.H) continue;
      for (int64_t kw = 0; kw < p.kW; ++kw) {
        const int64_t iw = wo * p.sw - p.pl + kw * p.dw;
        if (iw < 0 || iw >= p.W) continue;
        acc = fma_acc(static_cast<acc_t>(x[((n * p.H + ih) * p.W + iw) * p.C_in + ci]),
                      static_cast<acc_t>(w[co * p.KT + kh * p.kW + kw]), acc);
      }
    }
    out[n * p.so_n + co * p.so_c + ho * p.so_h + wo * p.so_w] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(256)
    _conv2d_dw_dgrad_kernel(const Problem p, const scalar_t* __restrict__ go, const scalar_t* __restrict__ w,
                            scalar_t* __restrict__ gi) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = p.N * p.H * p.W * p.C_in;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ci = i % p.C_in;
    int64_t t = i / p.C_in;
    const int64_t x_ = t % p.W;
    t /= p.W;
    const int64_t y_ = t % p.H, n = t / p.H;
    acc_t acc = acc_t(0);
    for (int64_t kh = 0; kh < p.kH; ++kh) {
      const int64_t hn = y_ + p.pt - kh * p.dh;
      if (hn < 0 || hn % p.sh != 0 || hn / p.sh >= p.H_out) continue;
      const int64_t ho = hn / p.sh;
      for (int64_t kw = 0; kw < p.kW; ++kw) {
        const int64_t wn = x_ + p.pl - kw * p.dw;
        if (wn < 0 || wn % p.sw != 0 || wn / p.sw >= p.W_out) continue;
        const int64_t wo = wn / p.sw;
        const int64_t row = ((n * p.H_out + ho) * p.W_out + wo) * p.C_out;
        for (int64_t j = 0; j < p.Cog; ++j) {
          const int64_t co = ci * p.Cog + j;
          acc = fma_acc(static_cast<acc_t>(go[row + co]), static_cast<acc_t>(w[co * p.KT + kh * p.kW + kw]), acc);
        }
      }
    }
    gi[n * p.so_n + ci * p.so_c + y_ * p.so_h + x_ * p.so_w] = static_cast<scalar_t>(acc);
  }
}

// wgrad partials: part[split, co, kh kW + kw] = sum over the split's positions m of
// grad_out[m, co] x[m @ (kh, kw), co / Cog]; one column of threads per channel, a fixed-order tree
// over threadIdx.y (deterministic).
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    _conv2d_dw_wgrad_kernel(const Problem p, const scalar_t* __restrict__ go, const scalar_t* __restrict__ x,
                            at::opmath_type<scalar_t>* __restrict__ part) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t red[8][33];
  const int64_t co = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t m0 = split * p.chunk, m1 = std::min(p.K, m0 + p.chunk);
  const int64_t ci = co / p.Cog;
  for (int64_t khw = 0; khw < p.KT; ++khw) {
    const int64_t kh = khw / p.kW, kw = khw % p.kW;
    acc_t sum = acc_t(0);
    if (co < p.C_out) {
      for (int64_t m = m0 + threadIdx.y; m < m1; m += 8) {
        const int64_t wo = m % p.W_out, t = m / p.W_out;
        const int64_t ho = t % p.H_out, n = t / p.H_out;
        const int64_t ih = ho * p.sh - p.pt + kh * p.dh, iw = wo * p.sw - p.pl + kw * p.dw;
        if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) continue;
        sum = fma_acc(static_cast<acc_t>(go[m * p.C_out + co]),
                      static_cast<acc_t>(x[((n * p.H + ih) * p.W + iw) * p.C_in + ci]), sum);
      }
    }
    red[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && co < p.C_out) {
      acc_t t = red[0][threadIdx.x];
#pragma unroll
      for (int y = 1; y < 8; ++y) t += red[y][threadIdx.x];
      part[(split * p.C_out + co) * p.KT + khw] = t;
    }
    __syncthreads();
  }
}

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, 65535LL * 8)));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

Path choose_path(at::ScalarType st) {
  if (st == at::kHalf || st == at::kBFloat16) return Path::kWmma16;
  if (st == at::kFloat && at::globalContext().allowTF32CuDNN(at::Float32Op::CONV)) return Path::kTf32;
  return Path::kSimt;
}

Problem make_problem(const conv::Params& q) {
  Problem p{};
  p.N = q.N;
  p.H = q.H;
  p.W = q.W;
  p.C_in = q.C_in;
  p.H_out = q.H_out;
  p.W_out = q.W_out;
  p.C_out = q.C_out;
  p.Cg = q.cin_g();
  p.Cog = q.cout_g();
  p.kH = q.kH;
  p.kW = q.kW;
  p.sh = q.sh;
  p.sw = q.sw;
  p.pt = q.pt;
  p.pl = q.pl;
  p.dh = q.dh;
  p.dw = q.dw;
  p.KT = q.kH * q.kW * p.Cg;
  p.splits = 1;
  return p;
}

template <typename scalar_t, Mode MODE>
void launch_igemm(Path path, const Problem& p, dim3 grid, const scalar_t* a, const scalar_t* b,
                  const scalar_t* bias, scalar_t* dst, at::opmath_type<scalar_t>* partial, cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    _conv2d_igemm_kernel<scalar_t, MODE, Path::kWmma16><<<grid, kThreads, 0, stream>>>(p, a, b, bias, dst, partial);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    if (path == Path::kTf32) {
      _conv2d_igemm_kernel<scalar_t, MODE, Path::kTf32><<<grid, kThreads, 0, stream>>>(p, a, b, bias, dst, partial);
    } else {
      _conv2d_igemm_kernel<scalar_t, MODE, Path::kSimt><<<grid, kThreads, 0, stream>>>(p, a, b, bias, dst, partial);
    }
  } else {
    _conv2d_igemm_kernel<scalar_t, MODE, Path::kSimt><<<grid, kThreads, 0, stream>>>(p, a, b, bias, dst, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda(const at::Tensor& input, const conv::Params& q, const char* op) {
  TORCH_CHECK(input.is_cuda(), op, ": expected input on a CUDA device, got ", input.device());
  TORCH_CHECK(q.groups <= kMaxGridYZ, op, ": expected groups <= ", kMaxGridYZ, " on CUDA, got ", q.groups);
}

// The weight as (C_out, kH, kW, Cg) contiguous: a GEMM row (kh, kw, ci) per output channel.
at::Tensor weight_rows(const at::Tensor& weight) { return weight.permute({0, 2, 3, 1}).contiguous(); }

constexpr std::initializer_list<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

}  // namespace

// conv2d forward on CUDA (csrc/ops.cpp): output (N, C_out, H_out, W_out) in input's memory format.
at::Tensor conv2d_fwd_cuda(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d";
  const conv::Params q = conv::check_fwd(input, weight, bias, stride, padding, dilation, groups, kDtypes, op);
  check_cuda(input, q, op);
  c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({q.N, q.C_out, q.H_out, q.W_out},
                             input.options().memory_format(q.channels_last ? at::MemoryFormat::ChannelsLast
                                                                           : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor x = conv::to_layout(input, true);
  const at::Tensor w = weight_rows(weight);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  Problem p = make_problem(q);
  p.M = q.N * q.H_out * q.W_out;
  p.Ncols = p.Cog;
  p.K = p.KT;
  p.so_n = out.stride(0);
  p.so_c = out.stride(1);
  p.so_h = out.stride(2);
  p.so_w = out.stride(3);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (p.Cg == 1) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_dw_fwd_cuda", [&] {
      _conv2d_dw_fwd_kernel<scalar_t><<<elementwise_blocks(out.numel()), 256, 0, stream>>>(
          p, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          has_bias ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, kBM)), static_cast<unsigned>(ceil_div(p.Ncols, kBN)),
                  static_cast<unsigned>(q.groups));
  TORCH_CHECK(ceil_div(p.M, kBM) <= std::numeric_limits<int32_t>::max(), op, ": output too large");
  const Path path = choose_path(input.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_fwd_cuda", [&] {
    launch_igemm<scalar_t, Mode::kFwd>(path, p, grid, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                       has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                                       out.mutable_data_ptr<scalar_t>(), nullptr, stream);
  });
  return out;
}

// conv2d backward on CUDA (csrc/ops.cpp): (grad_input in input's memory format, grad_weight
// contiguous, grad_bias (C_out,)), undefined where output_mask is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                               const at::Tensor& weight, at::IntArrayRef stride,
                                                               at::IntArrayRef padding, at::IntArrayRef dilation,
                                                               int64_t groups, std::array<bool, 3> output_mask) {
  const char* op = "conv2d_bwd";
  const conv::Params q = conv::check_bwd(grad_out, input, weight, stride, padding, dilation, groups, kDtypes, op);
  check_cuda(input, q, op);
  c10::cuda::CUDAGuard guard(input.device());
  const bool need_gi = output_mask[0], need_gw = output_mask[1], need_gb = output_mask[2];
  at::Tensor gi, gw, gb;
  if (need_gi) {
    gi = at::empty_like(input, input.options().memory_format(q.channels_last ? at::MemoryFormat::ChannelsLast
                                                                             : at::MemoryFormat::Contiguous));
  }
  if (need_gw) gw = at::empty(weight.sizes(), weight.options());
  if (need_gb) gb = at::empty({q.C_out}, weight.options());
  const int64_t M_out = q.N * q.H_out * q.W_out;
  if (M_out == 0 || q.cout_g() == 0) {  // nothing flows back
    if (need_gi) gi.zero_();
    if (need_gw) gw.zero_();
    if (need_gb) gb.zero_();
    return {gi, gw, gb};
  }
  const at::Tensor go = conv::to_layout(grad_out, true);
  const Path path = choose_path(input.scalar_type());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType acc = conv::acc_dtype(input.scalar_type());
  const at::Tensor w = (need_gi && gi.numel() > 0) ? weight_rows(weight) : at::Tensor();
  const at::Tensor x = (need_gw && gw.numel() > 0) ? conv::to_layout(input, true) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (need_gi && gi.numel() > 0) {
      Problem p = make_problem(q);
      p.M = q.N * q.H * q.W;
      p.Ncols = p.Cg;
      p.K = q.kH * q.kW * p.Cog;
      p.so_n = gi.stride(0);
      p.so_c = gi.stride(1);
      p.so_h = gi.stride(2);
      p.so_w = gi.stride(3);
      if (p.Cg == 1) {
        _conv2d_dw_dgrad_kernel<scalar_t><<<elementwise_blocks(gi.numel()), 256, 0, stream>>>(
            p, go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        const dim3 grid(static_cast<unsigned>(ceil_div(p.M, kBM)), static_cast<unsigned>(ceil_div(p.Ncols, kBN)),
                        static_cast<unsigned>(q.groups));
        launch_igemm<scalar_t, Mode::kDgrad>(path, p, grid, go.const_data_ptr<scalar_t>(),
                                             w.const_data_ptr<scalar_t>(), nullptr, gi.mutable_data_ptr<scalar_t>(),
                                             nullptr, stream);
      }
    }
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    if (need_gw && gw.numel() > 0 && q.cin_g() == 1) {
      Problem p = make_problem(q);
      p.K = M_out;
      const int64_t ctiles = ceil_div(q.C_out, 32);
      int64_t splits = std::max<int64_t>(1, std::min<int64_t>({ceil_div(4 * sms, ctiles), ceil_div(M_out, 256),
                                                              kMaxSplits, kMaxPartialElems / (q.C_out * p.KT)}));
      p.chunk = ceil_div(M_out, splits);
      p.splits = ceil_div(M_out, p.chunk);
      at::Tensor part = at::empty({p.splits, q.C_out, p.KT}, input.options().dtype(acc));
      _conv2d_dw_wgrad_kernel<scalar_t>
          <<<dim3(static_cast<unsigned>(ctiles), static_cast<unsigned>(p.splits)), dim3(32, 8), 0, stream>>>(
              p, go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), part.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t L = gw.numel();
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(L, 256), 65535));
      _conv2d_sum_partials_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
          part.const_data_ptr<acc_t>(), gw.mutable_data_ptr<scalar_t>(), L, p.splits, 1, q.kH * q.kW, true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (need_gw && gw.numel() > 0) {
      Problem p = make_problem(q);
      p.M = p.Cog;
      p.Ncols = p.KT;
      p.K = M_out;
      const int64_t tiles = ceil_div(p.M, kBM) * ceil_div(p.Ncols, kBN) * q.groups;
      const int64_t steps = ceil_div(M_out, kBK);
      int64_t splits = std::max<int64_t>(1, std::min<int64_t>({ceil_div(4 * sms, tiles), steps, kMaxSplits}));
      splits = std::min<int64_t>(splits, std::max<int64_t>(1, kMaxGridYZ / q.groups));
      splits = std::min<int64_t>(splits, std::max<int64_t>(1, kMaxPartialElems / (q.C_out * p.KT)));
      p.chunk = ceil_div(steps, splits) * kBK;
      p.splits = ceil_div(M_out, p.chunk);
      TORCH_CHECK(q.groups * p.splits <= kMaxGridYZ && ceil_div(p.Ncols, kBN) <= kMaxGridYZ, op,
                  ": weight too large for the CUDA wgrad grid");
      at::Tensor part = at::empty({p.splits, q.C_out, p.KT}, input.options().dtype(acc));
      const dim3 grid(static_cast<unsigned>(ceil_div(p.M, kBM)), static_cast<unsigned>(ceil_div(p.Ncols, kBN)),
                      static_cast<unsigned>(q.groups * p.splits));
      launch_igemm<scalar_t, Mode::kWgrad>(path, p, grid, go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                           nullptr, nullptr, part.mutable_data_ptr<acc_t>(), stream);
      const int64_t L = gw.numel();
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(L, 256), 65535));
      _conv2d_sum_partials_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
          part.const_data_ptr<acc_t>(), gw.mutable_data_ptr<scalar_t>(), L, p.splits, p.Cg, q.kH * q.kW, true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_gb) {
      const int64_t C = q.C_out;
      const int64_t ctiles = ceil_div(C, 32);
      int64_t splits = std::max<int64_t>(1, std::min<int64_t>({ceil_div(4 * sms, ctiles), ceil_div(M_out, 256),
                                                              kMaxSplits}));
      const int64_t chunk = ceil_div(M_out, splits);
      splits = ceil_div(M_out, chunk);
      at::Tensor part = at::empty({splits, C}, input.options().dtype(acc));
      _conv2d_bias_partials_kernel<scalar_t>
          <<<dim3(static_cast<unsigned>(ctiles), static_cast<unsigned>(splits)), dim3(32, 8), 0, stream>>>(
              go.const_data_ptr<scalar_t>(), part.mutable_data_ptr<acc_t>(), M_out, C, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(C, 256), 65535));
      _conv2d_sum_partials_kernel<scalar_t><<<blocks, 256, 0, stream>>>(
          part.const_data_ptr<acc_t>(), gb.mutable_data_ptr<scalar_t>(), C, splits, 1, 1, false);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gi, gw, gb};
}

}  // namespace pyfastdl

TORCH_LIBRARY_IMPL(pyfastdl, CUDA, m) {
  m.impl("conv2d_fwd", &pyfastdl::conv2d_fwd_cuda);
  m.impl("conv2d_bwd", &pyfastdl::conv2d_bwd_cuda);
}
