// Batch-norm CUDA kernels and launchers, registered under the CUDA dispatch key.
//
// Forward (training):  stats kernel (per-block Welford partials)  ->  finalize kernel (merge the
// partials per channel, running-stat update, save_mean/save_invstd, scale/shift)  ->  elementwise
// kernel y = (x - mean) * scale + shift (+ ReLU; see channel_affine). Eval skips the stats kernel; finalize reads the running
// statistics. Backward: reduce kernel (per-block partial sums of g' and g' * (x - mean))  ->
// finalize kernel (grad_weight, grad_bias, per-channel coefficients)  ->  elementwise kernel.
//
// Two memory layouts (bn::Layout), each with its own kernels:
//   NCS (N, C, S) contiguous: a channel is N rows of S contiguous elements. Thread blocks are
//       (BX, BY) = (threads along S, rows); the statistics grid is (C, row splits, S splits), one
//       partial per block.
//   MC  (M, C) contiguous, C innermost (NHWC, (N, C), and NCS with S == 1): blocks are
//       (BX, BY) = (channels, rows) so a warp reads consecutive channels of a row (coalesced); the
//       statistics grid is (channel tiles, row splits).
//
// Determinism: no floating-point atomics. Every reduction runs in a fixed order: per thread, a
// warp shuffle tree, a fixed walk over the warps in shared memory, then one warp per channel over
// the per-block partials in the finalize kernel.
//
// Numerics: statistics are Welford (mean, M2, count) states with Chan's parallel merge, computed on
// x - x0 where x0 is the channel's first element, so a channel with a large mean and a small spread
// (mean 1e4, std 1e-2 in float32) keeps its variance. Everything per channel runs in
// at::opmath_type<scalar_t> (float for half/bfloat16/float, double for double).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/batch_norm.h"
#include "common.cuh"

namespace pyfastdl {
namespace {

using namespace cuda_common;  // kWarpSize, fma_acc, sqrt_acc (common.cuh)

constexpr int kThreads = 256;  // threads of every block
constexpr int kWarps = kThreads / kWarpSize;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

// ---- device helpers -------------------------------------------------------------------------------

// fma_acc (common.cuh) rounds once, so the forward's y = x * scale + shift and the backward's
// recomputed ReLU mask round identically.

// Division inside the per-element Welford update: the fast approximate one in float32 (its 2-ulp
// error only perturbs the running mean, which the M2 update tolerates), exact in float64.
__device__ __forceinline__ float welford_div(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double welford_div(double a, double b) { return a / b; }

// The statistics' shift: a channel's first element, or 0 where that is not finite (an inf shift would
// make the mean inf - inf = NaN; torch gives inf for a channel holding +inf).
template <typename acc_t>
__device__ __forceinline__ acc_t finite_or_zero(acc_t v) {
  return v - v == acc_t(0) ? v : acc_t(0);
}

template <typename acc_t>
struct WelfordData {
  acc_t mean;  // of the shifted values x - x0
  acc_t m2;    // sum of squared deviations from mean
  acc_t n;     // count
};

template <typename acc_t>
struct WelfordOp {
  using T = WelfordData<acc_t>;
  static __device__ __forceinline__ T identity() { return {acc_t(0), acc_t(0), acc_t(0)}; }
  static __device__ __forceinline__ T combine(const T& a, const T& b) {  // Chan et al.
    const acc_t n = a.n + b.n;
    if (n == acc_t(0)) return a;
    const acc_t fb = b.n / n;
    const acc_t delta = b.mean - a.mean;
    // A non-finite a.mean (an inf in the data) stays what a sum gives: inf + finite = inf,
    // inf - inf = NaN (a.mean + delta * fb would be inf - inf = NaN), as torch's CPU mean.
    const acc_t mean = a.mean - a.mean == acc_t(0) ? a.mean + delta * fb : a.mean + b.mean;
    return {mean, a.m2 + b.m2 + delta * delta * a.n * fb, n};
  }
  static __device__ __forceinline__ T shfl_xor(const T& v, int offset) {
    return {__shfl_xor_sync(0xffffffffu, v.mean, offset), __shfl_xor_sync(0xffffffffu, v.m2, offset),
            __shfl_xor_sync(0xffffffffu, v.n, offset)};
  }
};

template <typename acc_t>
__device__ __forceinline__ void welford_add(WelfordData<acc_t>& w, acc_t x) {
  w.n += acc_t(1);
  const acc_t delta = x - w.mean;
  // Once the mean is inf it stays inf (or NaN for inf - inf), as a sum would; see WelfordOp.
  w.mean = w.mean - w.mean == acc_t(0) ? w.mean + welford_div(delta, w.n) : w.mean + x;
  w.m2 += delta * (x - w.mean);
}

template <typename acc_t>
struct Sum2 {
  acc_t g;   // sum of g'
  acc_t gx;  // sum of g' * (x - mean)
};

template <typename acc_t>
struct Sum2Op {
  using T = Sum2<acc_t>;
  static __device__ __forceinline__ T identity() { return {acc_t(0), acc_t(0)}; }
  static __device__ __forceinline__ T combine(const T& a, const T& b) { return {a.g + b.g, a.gx + b.gx}; }
  static __device__ __forceinline__ T shfl_xor(const T& v, int offset) {
    return {__shfl_xor_sync(0xffffffffu, v.g, offset), __shfl_xor_sync(0xffffffffu, v.gx, offset)};
  }
};

// Reduces the states of a kThreads-thread block over all threads that share (tid % group), tid the
// linear thread index; group is a power of two <= 32 (1: the whole block). The result is valid in
// the threads tid < group (thread tid holds group member tid). Every thread of the block must call.
template <typename Op>
__device__ __forceinline__ typename Op::T block_reduce(typename Op::T v,
                                                       typename Op::T* smem,  // (kThreads,)
                                                       int group) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  for (int offset = kWarpSize / 2; offset >= group; offset >>= 1) {
    v = Op::combine(v, Op::shfl_xor(v, offset));
  }
  if (lane < group) smem[warp * group + lane] = v;
  __syncthreads();
  if (tid < group) {
    v = smem[tid];
    for (int w = 1; w < kWarps; ++w) v = Op::combine(v, smem[w * group + tid]);
  }
  return v;
}

// y = (x - mean) * scale + shift, scale = weight * invstd, shift = bias - mean_lo * scale (weight = 1,
// bias = 0 when absent). mean + mean_lo is the batch mean to twice acc_t's precision (mean_lo = 0
// in eval and in the backward, which has only the saved mean): x - mean is exact for x near the
// mean, so a channel with |mean| >> std keeps its precision, which x * scale + (bias - mean * scale)
// would not. Forward and backward both take the coefficients from here and y from affine(), so the
// backward's ReLU mask is the forward's.
template <typename acc_t>
__device__ __forceinline__ void channel_affine(const acc_t* __restrict__ weight,  // (C,) or null
                                               const acc_t* __restrict__ bias,    // (C,) or null
                                               int64_t c, acc_t mean_lo, acc_t invstd, acc_t& scale,
                                               acc_t& shift) {
  const acc_t w = weight != nullptr ? weight[c] : acc_t(1);
  const acc_t b = bias != nullptr ? bias[c] : acc_t(0);
  scale = w * invstd;
  shift = fma_acc(-mean_lo, scale, b);
}

// The normalisation y = (x - mean) * scale + shift, before the ReLU. The forward output and the
// backward's ReLU mask (y > 0) both come from here.
template <typename acc_t>
__device__ __forceinline__ acc_t affine(acc_t x, acc_t mean, acc_t scale, acc_t shift) {
  return fma_acc(x - mean, scale, shift);
}

template <typename acc_t>
__device__ __forceinline__ acc_t relu_acc(acc_t y) {
  return y < acc_t(0) ? acc_t(0) : y;  // max(y, 0); NaN propagates
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_acc(acc_t y) {
  if constexpr (std::is_same_v<acc_t, double>) return 1.0 / (1.0 + exp(-y));
  else return 1.f / (1.f + expf(-y));  // NaN propagates; exp overflow gives 0
}

// act(y), act a bn::Activation: none, ReLU or sigmoid.
template <typename acc_t>
__device__ __forceinline__ acc_t activate(acc_t y, int act) {
  if (act == bn::kActRelu) return relu_acc(y);
  if (act == bn::kActSigmoid) return sigmoid_acc(y);
  return y;
}

// g * act'(y) for act != none: the ReLU mask (y > 0), or s (1 - s), s = sigmoid(y).
template <typename acc_t>
__device__ __forceinline__ acc_t act_grad(acc_t g, acc_t y, int act) {
  if (act == bn::kActRelu) return y > acc_t(0) ? g : acc_t(0);
  const acc_t sv = sigmoid_acc(y);
  return g * (sv - sv * sv);
}

using ChannelDivider = at::cuda::detail::IntDivider<unsigned int>;

// Channel of NCS row r = n * C + c (a multiply-shift division while r fits 32 bits).
__device__ __forceinline__ int64_t row_channel(int64_t r, int64_t C, const ChannelDivider& cdiv) {
  return r <= static_cast<int64_t>(UINT32_MAX) ? static_cast<int64_t>(cdiv.mod(static_cast<unsigned int>(r)))
                                               : r % C;
}

// Per-channel values of the backward's elementwise pass.
template <typename acc_t>
struct BwdCoef {
  acc_t scale, shift, k1, k2, mean;
};

template <typename acc_t>
__device__ __forceinline__ BwdCoef<acc_t> load_bwd_coef(const acc_t* __restrict__ coef,  // (4, C)
                                                        const acc_t* __restrict__ mean,  // (C,)
                                                        int64_t C, int64_t c) {
  return {coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c], mean[c]};
}

// grad_input of one element: g' = g * act'(y); training: scale * (g' - k1 - (x - mean) * k2),
// eval: g' * scale.
template <typename acc_t>
__device__ __forceinline__ acc_t bwd_elem(const BwdCoef<acc_t>& k, acc_t x, acc_t g, bool training,
                                          int act) {
  if (act != bn::kActNone) g = act_grad(g, affine(x, k.mean, k.scale, k.shift), act);
  return training ? k.scale * (g - k.k1 - (x - k.mean) * k.k2) : g * k.scale;
}

template <typename acc_t>
struct Pair {
  acc_t x, g;
};

// Visits k = begin, begin + step, ... < end in order, kUnroll at a time: the kUnroll loads are
// issued before the kUnroll bodies, so each thread keeps several loads in flight.
constexpr int kUnroll = 4;
template <typename Load, typename Body>
__device__ __forceinline__ void for_unrolled(int64_t begin, int64_t end, int64_t step, const Load& load,
                                             const Body& body) {
  using V = decltype(load(begin));
  for (int64_t k = begin; k < end; k += kUnroll * step) {
    V v[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t kj = k + j * step;
      if (kj < end) v[j] = load(kj);
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t kj = k + j * step;
      if (kj < end) body(kj, v[j]);
    }
  }
}

// ---- forward: statistics ----------------------------------------------------------------------------
// Partial buffer layout, P partials per channel: [0, C*P) counts, [C*P, 2*C*P) means of x - x0,
// [2*C*P, 3*C*P) M2, then [3*C*P, 3*C*P + C) the shift x0 of each channel. Partial p of channel c
// sits at c * P + p.

// Visits the elements (n, s), n in [n0, n1), s in [s0, s1), of one NCS channel that belong to
// thread (threadIdx.x, threadIdx.y): rows n0 + threadIdx.y + k * blockDim.y, columns
// s0 + threadIdx.x + k * blockDim.x. Unrolls along the rows when a thread owns at most one column.
template <typename Load, typename Body>
__device__ __forceinline__ void for_ncs_block(int64_t n0, int64_t n1, int64_t s0, int64_t s1,
                                              const Load& load,  // (n, s) -> value
                                              const Body& body) {  // (value) -> void
  const int64_t bx = blockDim.x, by = blockDim.y;
  if (s1 - s0 <= bx) {
    const int64_t s = s0 + threadIdx.x;
    if (s < s1) {
      for_unrolled(n0 + threadIdx.y, n1, by, [&](int64_t n) { return load(n, s); },
                   [&](int64_t, const auto& v) { body(v); });
    }
  } else {
    for (int64_t n = n0 + threadIdx.y; n < n1; n += by) {
      for_unrolled(s0 + threadIdx.x, s1, bx, [&](int64_t s) { return load(n, s); },
                   [&](int64_t, const auto& v) { body(v); });
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _batch_norm_stats_ncs_kernel(
    const scalar_t* __restrict__ input,           // (N, C, S) contiguous
    double* __restrict__ part,  // (3 * C * P + C,), P = gridDim.y * gridDim.z
    int64_t N, int64_t C, int64_t S,  // sizes of the (N, C, S) view
    int64_t rows_per,  // rows n of one block: [blockIdx.y * rows_per, + rows_per)
    int64_t s_per) {   // elements s of one block: [blockIdx.z * s_per, + s_per)
  using acc_t = at::opmath_type<scalar_t>;
  using Op = WelfordOp<acc_t>;
  using DOp = WelfordOp<double>;  // the block's merge and its partial in double (precision)
  __shared__ typename DOp::T smem[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t n0 = blockIdx.y * rows_per, n1 = std::min(N, n0 + rows_per);
  const int64_t s0 = blockIdx.z * s_per, s1 = std::min(S, s0 + s_per);
  const acc_t x0 = finite_or_zero(static_cast<acc_t>(input[c * S]));
  typename Op::T w = Op::identity();
  for_ncs_block(
      n0, n1, s0, s1, [&](int64_t n, int64_t s) { return static_cast<acc_t>(input[(n * C + c) * S + s]); },
      [&](acc_t x) { welford_add(w, x - x0); });
  typename DOp::T wd = block_reduce<DOp>({w.mean, w.m2, w.n}, smem, 1);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const int64_t P = static_cast<int64_t>(gridDim.y) * gridDim.z;
    const int64_t p = static_cast<int64_t>(blockIdx.y) * gridDim.z + blockIdx.z;
    part[c * P + p] = wd.n;
    part[C * P + c * P + p] = wd.mean;
    part[2 * C * P + c * P + p] = wd.m2;
    if (p == 0) part[3 * C * P + c] = x0;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _batch_norm_stats_mc_kernel(
    const scalar_t* __restrict__ input,           // (M, C) contiguous, C innermost
    double* __restrict__ part,  // (3 * C * P + C,), P = gridDim.y
    int64_t M, int64_t C,  // sizes of the (M, C) view
    int64_t rows_per) {  // rows m of one block: [blockIdx.y * rows_per, + rows_per)
  using acc_t = at::opmath_type<scalar_t>;
  using Op = WelfordOp<acc_t>;
  using DOp = WelfordOp<double>;  // the block's merge and its partial in double (precision)
  __shared__ typename DOp::T smem[kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t m0 = blockIdx.y * rows_per, m1 = std::min(M, m0 + rows_per);
  typename Op::T w = Op::identity();
  acc_t x0 = acc_t(0);
  if (c < C) {
    x0 = finite_or_zero(static_cast<acc_t>(input[c]));
    for_unrolled(m0 + threadIdx.y, m1, blockDim.y,
                 [&](int64_t m) { return static_cast<acc_t>(input[m * C + c]); },
                 [&](int64_t, acc_t x) { welford_add(w, x - x0); });
  }
  typename DOp::T wd = block_reduce<DOp>({w.mean, w.m2, w.n}, smem, blockDim.x);
  // The threads with threadIdx.y == 0 hold the block's result for their channel c.
  if (threadIdx.y == 0 && c < C) {
    const int64_t P = gridDim.y;
    const int64_t p = blockIdx.y;
    part[c * P + p] = wd.n;
    part[C * P + c * P + p] = wd.mean;
    part[2 * C * P + c * P + p] = wd.m2;
    if (p == 0) part[3 * C * P + c] = x0;
  }
}

// One warp per channel (kWarps channels a block). Training: merges the P partials, updates the
// running statistics, saves mean and invstd = 1 / sqrt(var + eps). Eval: reads the running
// statistics. Both: scale and shift for the elementwise kernel.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) _batch_norm_finalize_kernel(
    const double* __restrict__ part,    // (3 * C * P + C,) training; null in eval
    const acc_t* __restrict__ weight,   // (C,) or null
    const acc_t* __restrict__ bias,     // (C,) or null
    acc_t* __restrict__ running_mean,   // (C,) or null; read in eval, updated in training
    acc_t* __restrict__ running_var,    // (C,) or null; read in eval, updated in training
    acc_t* __restrict__ save_mean,      // (C,)
    acc_t* __restrict__ save_invstd,    // (C,)
    acc_t* __restrict__ coef,           // (3, C): scale, shift, mean (see channel_affine)
    int64_t C, int64_t P,  // channels, partials per channel
    double n_total,                     // elements per channel, N * S
    double momentum, double eps,        // running-stat momentum, variance epsilon
    bool training) {
  // The merge runs in double whatever acc_t is: on long planes the partials are many, and their
  // float32 merge would lose what the per-thread Welford kept (issue 9, defect 6).
  using Op = WelfordOp<double>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (c >= C) return;  // the whole warp leaves together
  acc_t mean, invstd, mean_lo = acc_t(0);
  if (training) {
    typename Op::T w = Op::identity();
    for (int64_t p = lane; p < P; p += kWarpSize) {
      const typename Op::T b = {static_cast<double>(part[C * P + c * P + p]),
                                static_cast<double>(part[2 * C * P + c * P + p]),
                                static_cast<double>(part[c * P + p])};
      w = Op::combine(w, b);
    }
    for (int offset = kWarpSize / 2; offset >= 1; offset >>= 1) w = Op::combine(w, Op::shfl_xor(w, offset));
    const double mean64 = static_cast<double>(part[3 * C * P + c]) + w.mean;
    mean = static_cast<acc_t>(mean64);
    mean_lo = static_cast<acc_t>(mean64 - static_cast<double>(mean));  // mean + mean_lo = mean64
    const double var = w.m2 / n_total;  // biased
    invstd = static_cast<acc_t>(1.0 / sqrt(var + eps));
    if (lane == 0 && running_mean != nullptr) {
      const double unbiased = var * (n_total / (n_total - 1.0));
      running_mean[c] = static_cast<acc_t>((1.0 - momentum) * running_mean[c] + momentum * mean64);
      running_var[c] = static_cast<acc_t>((1.0 - momentum) * running_var[c] + momentum * unbiased);
    }
  } else {
    mean = running_mean[c];
    invstd = static_cast<acc_t>(1.0 / sqrt(static_cast<double>(running_var[c]) + eps));
  }
  if (lane == 0) {
    acc_t scale, shift;
    channel_affine(weight, bias, c, mean_lo, invstd, scale, shift);
    save_mean[c] = mean;
    save_invstd[c] = invstd;
    coef[c] = scale;
    coef[C + c] = shift;
    coef[2 * C + c] = mean;
  }
}

// ---- forward: elementwise -------------------------------------------------------------------------
// NCS: rows r = n * C + c of S elements. With S <= blockDim.x (gridDim.y == 1) a thread owns column
// threadIdx.x of rows blockIdx.x * blockDim.y + threadIdx.y + k * gridDim.x * blockDim.y (unrolled
// along rows); otherwise it walks its rows one by one and, in each, columns
// blockIdx.y * blockDim.x + threadIdx.x + k * gridDim.y * blockDim.x (unrolled along columns).

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _batch_norm_fwd_ncs_kernel(
    const scalar_t* __restrict__ input,                 // (N, C, S) contiguous
    const at::opmath_type<scalar_t>* __restrict__ coef,  // (3, C): scale, shift, mean
    scalar_t* __restrict__ output,                      // (N, C, S) contiguous
    int64_t R,  // rows, N * C
    int64_t C, int64_t S,  // channels, elements a row
    ChannelDivider cdiv,  // divides by C
    int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t r_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t s_step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  if (S <= blockDim.x) {
    if (s_begin >= S) return;
    for_unrolled(r_begin, R, r_step, [&](int64_t r) { return static_cast<acc_t>(input[r * S + s_begin]); },
                 [&](int64_t r, acc_t x) {
                   const int64_t c = row_channel(r, C, cdiv);
                   acc_t y = affine(x, coef[2 * C + c], coef[c], coef[C + c]);
                   y = activate(y, act);
                   output[r * S + s_begin] = static_cast<scalar_t>(y);
                 });
  } else {
    for (int64_t r = r_begin; r < R; r += r_step) {
      const int64_t c = row_channel(r, C, cdiv);
      const acc_t scale = coef[c], shift = coef[C + c], mean = coef[2 * C + c];
      const scalar_t* in_row = input + r * S;
      scalar_t* out_row = output + r * S;
      for_unrolled(s_begin, S, s_step, [&](int64_t s) { return static_cast<acc_t>(in_row[s]); },
                   [&](int64_t s, acc_t x) {
                     acc_t y = affine(x, mean, scale, shift);
                     y = activate(y, act);
                     out_row[s] = static_cast<scalar_t>(y);
                   });
    }
  }
}

// MC: thread (threadIdx.x, threadIdx.y) owns channel c = blockIdx.x * blockDim.x + threadIdx.x of
// rows blockIdx.y * blockDim.y + threadIdx.y + k * gridDim.y * blockDim.y.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _batch_norm_fwd_mc_kernel(
    const scalar_t* __restrict__ input,                 // (M, C) contiguous, C innermost
    const at::opmath_type<scalar_t>* __restrict__ coef,  // (3, C): scale, shift, mean
    scalar_t* __restrict__ output,                      // (M, C) contiguous, C innermost
    int64_t M, int64_t C,  // sizes of the (M, C) view
    int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const acc_t scale = coef[c], shift = coef[C + c], mean = coef[2 * C + c];
  for_unrolled(static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y, M,
               static_cast<int64_t>(gridDim.y) * blockDim.y,
               [&](int64_t m) { return static_cast<acc_t>(input[m * C + c]); },
               [&](int64_t m, acc_t x) {
                 acc_t y = affine(x, mean, scale, shift);
                 y = activate(y, act);
                 output[m * C + c] = static_cast<scalar_t>(y);
               });
}

// ---- backward: reductions ---------------------------------------------------------------------------
// Partial buffer layout: [0, C*P) sums of g', [C*P, 2*C*P) sums of g' * (x - mean); partial p of
// channel c at c * P + p. g' = grad_out * act'(affine(x)).

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _batch_norm_bwd_reduce_ncs_kernel(
    const scalar_t* __restrict__ grad_out,                 // (N, C, S) contiguous
    const scalar_t* __restrict__ input,                    // (N, C, S) contiguous
    const at::opmath_type<scalar_t>* __restrict__ mean,     // (C,)
    const at::opmath_type<scalar_t>* __restrict__ invstd,   // (C,)
    const at::opmath_type<scalar_t>* __restrict__ weight,   // (C,) or null
    const at::opmath_type<scalar_t>* __restrict__ bias,     // (C,) or null
    double* __restrict__ part,                             // (2 * C * P,), P = gridDim.y * gridDim.z
    int64_t N, int64_t C, int64_t S,  // sizes of the (N, C, S) view
    int64_t rows_per,  // rows n of one block: [blockIdx.y * rows_per, + rows_per)
    int64_t s_per,     // elements s of one block: [blockIdx.z * s_per, + s_per)
    int act) {
  using acc_t = at::opmath_type<scalar_t>;
  using Op = Sum2Op<acc_t>;
  using DOp = Sum2Op<double>;  // the block's sum and its partial in double (precision)
  __shared__ typename DOp::T smem[kThreads];
  const int64_t c = blockIdx.x;
  const int64_t n0 = blockIdx.y * rows_per, n1 = std::min(N, n0 + rows_per);
  const int64_t s0 = blockIdx.z * s_per, s1 = std::min(S, s0 + s_per);
  const acc_t mu = mean[c];
  acc_t scale, shift;
  channel_affine(weight, bias, c, acc_t(0), invstd[c], scale, shift);
  typename Op::T acc = Op::identity();
  for_ncs_block(
      n0, n1, s0, s1,
      [&](int64_t n, int64_t s) {
        const int64_t i = (n * C + c) * S + s;
        return Pair<acc_t>{static_cast<acc_t>(input[i]), static_cast<acc_t>(grad_out[i])};
      },
      [&](const Pair<acc_t>& v) {
        const acc_t g = act == bn::kActNone ? v.g : act_grad(v.g, affine(v.x, mu, scale, shift), act);
        acc.g += g;
        acc.gx += g * (v.x - mu);
      });
  const typename DOp::T sum = block_reduce<DOp>({acc.g, acc.gx}, smem, 1);
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    const int64_t P = static_cast<int64_t>(gridDim.y) * gridDim.z;
    const int64_t p = static_cast<int64_t>(blockIdx.y) * gridDim.z + blockIdx.z;
    part[c * P + p] = sum.g;
    part[C * P + c * P + p] = sum.gx;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _batch_norm_bwd_reduce_mc_kernel(
    const scalar_t* __restrict__ grad_out,                 // (M, C) contiguous, C innermost
    const scalar_t* __restrict__ input,                    // (M, C) contiguous, C innermost
    const at::opmath_type<scalar_t>* __restrict__ mean,     // (C,)
    const at::opmath_type<scalar_t>* __restrict__ invstd,   // (C,)
    const at::opmath_type<scalar_t>* __restrict__ weight,   // (C,) or null
    const at::opmath_type<scalar_t>* __restrict__ bias,     // (C,) or null
    double* __restrict__ part,                             // (2 * C * P,), P = gridDim.y
    int64_t M, int64_t C,  // sizes of the (M, C) view
    int64_t rows_per,  // rows m of one block: [blockIdx.y * rows_per, + rows_per)
    int act) {
  using acc_t = at::opmath_type<scalar_t>;
  using Op = Sum2Op<acc_t>;
  using DOp = Sum2Op<double>;  // the block's sum and its partial in double (precision)
  __shared__ typename DOp::T smem[kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t m0 = blockIdx.y * rows_per, m1 = std::min(M, m0 + rows_per);
  typename Op::T acc = Op::identity();
  if (c < C) {
    const acc_t mu = mean[c];
    acc_t scale, shift;
    channel_affine(weight, bias, c, acc_t(0), invstd[c], scale, shift);
    for_unrolled(
        m0 + threadIdx.y, m1, blockDim.y,
        [&](int64_t m) {
          return Pair<acc_t>{static_cast<acc_t>(input[m * C + c]), static_cast<acc_t>(grad_out[m * C + c])};
        },
        [&](int64_t, const Pair<acc_t>& v) {
          const acc_t g = act == bn::kActNone ? v.g : act_grad(v.g, affine(v.x, mu, scale, shift), act);
          acc.g += g;
          acc.gx += g * (v.x - mu);
        });
  }
  const typename DOp::T sum = block_reduce<DOp>({acc.g, acc.gx}, smem, blockDim.x);
  if (threadIdx.y == 0 && c < C) {
    const int64_t P = gridDim.y;
    part[c * P + blockIdx.y] = sum.g;
    part[C * P + c * P + blockIdx.y] = sum.gx;
  }
}

// One warp per channel: grad_bias = sum g', grad_weight = invstd * sum g' (x - mean), and the
// coefficients of grad_input = scale * (g' - k1 - (x - mean) * k2), k1 = grad_bias / n,
// k2 = grad_weight * invstd / n (training; eval: grad_input = g' * scale, k1 = k2 = 0).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) _batch_norm_bwd_finalize_kernel(
    const double* __restrict__ part,    // (2 * C * P,)
    const acc_t* __restrict__ mean,     // (C,)
    const acc_t* __restrict__ invstd,   // (C,)
    const acc_t* __restrict__ weight,   // (C,) or null
    const acc_t* __restrict__ bias,     // (C,) or null
    acc_t* __restrict__ grad_weight,    // (C,)
    acc_t* __restrict__ grad_bias,      // (C,)
    acc_t* __restrict__ coef,           // (4, C): scale, shift, k1, k2
    int64_t C, int64_t P,  // channels, partials per channel
    double n_total,                     // elements per channel, N * S
    bool training) {
  using Op = Sum2Op<double>;  // the partials summed in double whatever acc_t is (long planes)
  const int lane = threadIdx.x % kWarpSize;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (c >= C) return;  // the whole warp leaves together
  typename Op::T acc = Op::identity();
  for (int64_t p = lane; p < P; p += kWarpSize) {  // P = 0: no sums wanted (eval, grad_input only)
    acc.g += part[c * P + p];
    acc.gx += part[C * P + c * P + p];
  }
  for (int offset = kWarpSize / 2; offset >= 1; offset >>= 1) acc = Op::combine(acc, Op::shfl_xor(acc, offset));
  if (lane == 0) {
    const acc_t is = invstd[c];
    const acc_t gb = static_cast<acc_t>(acc.g);
    const acc_t gw = static_cast<acc_t>(acc.gx * is);
    grad_bias[c] = gb;
    grad_weight[c] = gw;
    acc_t scale, shift;
    channel_affine(weight, bias, c, acc_t(0), is, scale, shift);
    coef[c] = scale;
    coef[C + c] = shift;
    coef[2 * C + c] = training ? static_cast<acc_t>(gb / n_total) : acc_t(0);
    coef[3 * C + c] = training ? static_cast<acc_t>(gw * is / n_total) : acc_t(0);
  }
}

// ---- backward: elementwise (same thread mapping as the forward's) ---------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _batch_norm_bwd_ncs_kernel(
    const scalar_t* __restrict__ grad_out,                 // (N, C, S) contiguous
    const scalar_t* __restrict__ input,                    // (N, C, S) contiguous
    const at::opmath_type<scalar_t>* __restrict__ mean,     // (C,)
    const at::opmath_type<scalar_t>* __restrict__ coef,     // (4, C): scale, shift, k1, k2
    scalar_t* __restrict__ grad_input,                     // (N, C, S) contiguous
    int64_t R,  // rows, N * C
    int64_t C, int64_t S,  // channels, elements a row
    ChannelDivider cdiv,  // divides by C
    bool training, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const int64_t r_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t s_begin = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t s_step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  if (S <= blockDim.x) {
    if (s_begin >= S) return;
    for_unrolled(
        r_begin, R, r_step,
        [&](int64_t r) {
          const int64_t i = r * S + s_begin;
          return Pair<acc_t>{static_cast<acc_t>(input[i]), static_cast<acc_t>(grad_out[i])};
        },
        [&](int64_t r, const Pair<acc_t>& v) {
          const BwdCoef<acc_t> k = load_bwd_coef(coef, mean, C, row_channel(r, C, cdiv));
          grad_input[r * S + s_begin] = static_cast<scalar_t>(bwd_elem(k, v.x, v.g, training, act));
        });
  } else {
    for (int64_t r = r_begin; r < R; r += r_step) {
      const BwdCoef<acc_t> k = load_bwd_coef(coef, mean, C, row_channel(r, C, cdiv));
      const int64_t base = r * S;
      for_unrolled(
          s_begin, S, s_step,
          [&](int64_t s) {
            return Pair<acc_t>{static_cast<acc_t>(input[base + s]), static_cast<acc_t>(grad_out[base + s])};
          },
          [&](int64_t s, const Pair<acc_t>& v) {
            grad_input[base + s] = static_cast<scalar_t>(bwd_elem(k, v.x, v.g, training, act));
          });
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _batch_norm_bwd_mc_kernel(
    const scalar_t* __restrict__ grad_out,                 // (M, C) contiguous, C innermost
    const scalar_t* __restrict__ input,                    // (M, C) contiguous, C innermost
    const at::opmath_type<scalar_t>* __restrict__ mean,     // (C,)
    const at::opmath_type<scalar_t>* __restrict__ coef,     // (4, C): scale, shift, k1, k2
    scalar_t* __restrict__ grad_input,                     // (M, C) contiguous, C innermost
    int64_t M, int64_t C,  // sizes of the (M, C) view
    bool training, int act) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const BwdCoef<acc_t> k = load_bwd_coef(coef, mean, C, c);
  for_unrolled(
      static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y, M,
      static_cast<int64_t>(gridDim.y) * blockDim.y,
      [&](int64_t m) {
        return Pair<acc_t>{static_cast<acc_t>(input[m * C + c]), static_cast<acc_t>(grad_out[m * C + c])};
      },
      [&](int64_t m, const Pair<acc_t>& v) {
        grad_input[m * C + c] = static_cast<scalar_t>(bwd_elem(k, v.x, v.g, training, act));
      });
}

// ---- host helpers ---------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Blocks that fill the GPU once (kThreads-thread blocks, 2048 threads an SM).
int64_t target_blocks() {
  return static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) *
         (2048 / kThreads);
}

// The shape the kernels see: NCS (N, C, S) or MC (M, C). NCS with S == 1 is MC.
struct KernelShape {
  bool mc;
  int64_t N, C, S, M;
};

KernelShape kernel_shape(const bn::Layout& L) {
  KernelShape k;
  k.mc = L.channels_last || L.S == 1;
  k.N = L.N;
  k.C = L.C;
  k.S = L.S;
  k.M = L.N * L.S;
  return k;
}

// Grid of the reduction kernels (statistics, backward sums): blocks and per-block ranges.
struct ReduceGrid {
  dim3 grid, block;
  int64_t P = 1;         // partials per channel
  int64_t rows_per = 0;  // rows (n for NCS, m for MC) of one block
  int64_t s_per = 0;     // NCS: elements s of one block
};

constexpr int64_t kMinElemsPerBlock = 4096;  // a reduction block gets at least ~16 elements a thread
// ... and at most kMaxElemsPerThread a thread (each thread accumulates in acc_t; the partials are
// merged in double): more blocks on long planes, for precision.
constexpr int64_t kMaxElemsPerThread = 1024;

ReduceGrid reduce_grid(const KernelShape& k) {
  ReduceGrid g;
  const int64_t target = target_blocks();
  if (k.mc) {
    const int64_t bx = std::min<int64_t>(kWarpSize, pow2_ceil(k.C));
    const int64_t by = kThreads / bx;
    const int64_t tiles = ceil_div(k.C, bx);
    int64_t gy = std::min(ceil_div(target, tiles), ceil_div(k.M * bx, kMinElemsPerBlock));
    gy = std::max(gy, ceil_div(k.M, by * kMaxElemsPerThread));
    gy = std::max<int64_t>(1, std::min(gy, kMaxGridYZ));
    g.rows_per = ceil_div(k.M, gy);
    gy = ceil_div(k.M, g.rows_per);  // no empty block
    g.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
    g.grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(gy));
    g.P = gy;
  } else {
    const int64_t bx = std::min<int64_t>(kThreads, pow2_ceil(k.S));
    const int64_t by = kThreads / bx;
    int64_t p = std::min(ceil_div(target, k.C), ceil_div(k.N * k.S, kMinElemsPerBlock));
    p = std::max<int64_t>({1, p, ceil_div(k.N * k.S, kThreads * kMaxElemsPerThread)});
    // Split S first (long rows), then N.
    int64_t gz = std::max<int64_t>(1, std::min({p, ceil_div(k.S, bx * 4), kMaxGridYZ}));
    g.s_per = ceil_div(ceil_div(k.S, gz), bx) * bx;  // a multiple of bx
    gz = ceil_div(k.S, g.s_per);
    int64_t gy = std::max<int64_t>(1, std::min({ceil_div(p, gz), ceil_div(k.N, by), kMaxGridYZ}));
    g.rows_per = ceil_div(k.N, gy);
    gy = ceil_div(k.N, g.rows_per);
    g.block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
    g.grid = dim3(static_cast<unsigned>(k.C), static_cast<unsigned>(gy), static_cast<unsigned>(gz));
    g.P = gy * gz;
  }
  return g;
}

// Grid of the elementwise kernels: each thread gets about kUnroll elements (see the kernels for the
// thread mapping).
void elementwise_grid(const KernelShape& k, dim3& grid, dim3& block) {
  if (k.mc) {
    const int64_t bx = std::min<int64_t>(kWarpSize, pow2_ceil(k.C));
    const int64_t by = kThreads / bx;
    block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
    grid = dim3(static_cast<unsigned>(ceil_div(k.C, bx)),
                static_cast<unsigned>(std::min(ceil_div(k.M, by * kUnroll), kMaxGridYZ)));
  } else {
    const int64_t bx = std::min<int64_t>(kThreads, pow2_ceil(k.S));
    const int64_t by = kThreads / bx;
    const int64_t R = k.N * k.C;
    block = dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
    if (k.S <= bx) {  // one column a thread, unrolled along rows
      grid = dim3(static_cast<unsigned>(std::min(ceil_div(R, by * kUnroll), kMaxGridX)), 1);
    } else {          // rows one by one, unrolled along columns
      grid = dim3(static_cast<unsigned>(std::min(ceil_div(R, by), kMaxGridX)),
                  static_cast<unsigned>(std::min(ceil_div(k.S, bx * kUnroll), kMaxGridYZ)));
    }
  }
}

// `t` as a contiguous tensor of dtype `acc` (itself when it already is one).
at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  if (t.scalar_type() == acc && t.is_contiguous()) return t;
  return t.to(acc).contiguous();
}

at::Tensor optional_acc(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return as_acc(*t, acc);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

void check_cuda_and_size(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.is_cuda(), op, ": expected input on a CUDA device, got ", input.device());
  TORCH_CHECK(input.size(1) <= kMaxGridX, op, ": expected at most ", kMaxGridX,
              " channels (input.size(1)), got ", input.size(1));
}

}  // namespace

// Batch-norm forward on CUDA (Ioffe & Szegedy 2015; torch.nn.functional.batch_norm semantics).
//   input (N, C, *) float32/float64/float16/bfloat16, contiguous or channels_last(_3d);
//   weight, bias (C,) or None; running_mean, running_var (C,) or None, updated in place when
//   training. Returns (output [input's shape and memory format], save_mean (C,), save_invstd (C,)),
//   the saved statistics in the accumulation dtype (float32; float64 for float64 input).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    int64_t activation) {
  const int act = bn::check_activation(activation, "batch_norm");
  bn::check_fwd(input, weight, bias, running_mean, running_var, training, momentum, eps,
                {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  check_cuda_and_size(input, "batch_norm");
  c10::cuda::CUDAGuard guard(input.device());
  bn::Layout L;
  const at::Tensor x = bn::to_kernel_layout(input, L);
  const KernelShape k = kernel_shape(L);
  const int64_t C = k.C;
  const at::ScalarType acc = bn::acc_dtype(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc);

  at::Tensor output = at::empty_like(x);
  at::Tensor save_mean = at::empty({C}, acc_opts);
  at::Tensor save_invstd = at::empty({C}, acc_opts);
  if (x.numel() == 0) {  // empty batch: nothing to launch, running statistics untouched
    save_mean.zero_();
    save_invstd.zero_();
    return {output, save_mean, save_invstd};
  }

  const bool has_running = running_mean.has_value() && running_mean->defined();
  const at::Tensor rm = has_running ? as_acc(*running_mean, acc) : at::Tensor();
  const at::Tensor rv = has_running ? as_acc(*running_var, acc) : at::Tensor();
  const at::Tensor w = optional_acc(weight, acc);
  const at::Tensor b = optional_acc(bias, acc);
  at::Tensor coef = at::empty({3 * C}, acc_opts);  // scale, shift, mean
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    at::Tensor part;
    int64_t P = 0;
    if (training) {
      const ReduceGrid g = reduce_grid(k);
      P = g.P;
      part = at::empty({3 * C * P + C}, input.options().dtype(at::kDouble));
      if (k.mc) {
        _batch_norm_stats_mc_kernel<scalar_t><<<g.grid, g.block, 0, stream>>>(
            xp, part.mutable_data_ptr<double>(), k.M, C, g.rows_per);
      } else {
        _batch_norm_stats_ncs_kernel<scalar_t><<<g.grid, g.block, 0, stream>>>(
            xp, part.mutable_data_ptr<double>(), k.N, C, k.S, g.rows_per, g.s_per);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    _batch_norm_finalize_kernel<acc_t><<<static_cast<unsigned>(ceil_div(C, kWarps)), kThreads, 0, stream>>>(
        training ? part.const_data_ptr<double>() : nullptr, ptr_or_null<acc_t>(w),
        ptr_or_null<acc_t>(b), has_running ? rm.mutable_data_ptr<acc_t>() : nullptr,
        has_running ? rv.mutable_data_ptr<acc_t>() : nullptr, save_mean.mutable_data_ptr<acc_t>(),
        save_invstd.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>(), C, P,
        static_cast<double>(k.N * k.S), momentum, eps, training);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    dim3 grid, block;
    elementwise_grid(k, grid, block);
    if (k.mc) {
      _batch_norm_fwd_mc_kernel<scalar_t><<<grid, block, 0, stream>>>(
          xp, coef.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), k.M, C, act);
    } else {
      _batch_norm_fwd_ncs_kernel<scalar_t><<<grid, block, 0, stream>>>(
          xp, coef.const_data_ptr<acc_t>(), output.mutable_data_ptr<scalar_t>(), k.N * C, C, k.S,
          ChannelDivider(static_cast<unsigned int>(C)), act);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Running statistics held in another dtype (or strided) were updated in an acc copy.
  if (training && has_running) {
    if (!rm.is_same(*running_mean)) running_mean->copy_(rm);
    if (!rv.is_same(*running_var)) running_var->copy_(rv);
  }
  return {output, save_mean, save_invstd};
}

// Batch-norm backward on CUDA.
//   grad_out, input (N, C, *) of one dtype; weight, bias (C,) or None; save_mean, save_invstd (C,)
//   from batch_norm_fwd (accumulation dtype). Returns (grad_input [input's shape and memory
//   format], grad_weight (C,), grad_bias (C,)), the last two in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, int64_t activation, std::array<bool, 3> output_mask) {
  const int act = bn::check_activation(activation, "batch_norm_bwd");
  TORCH_CHECK(input.dim() >= 2,
              "batch_norm_bwd: expected input of rank >= 2, (N, C, *), got input of rank ",
              input.dim(), " and shape ", input.sizes());
  bn::check_bwd(grad_out, input, save_mean, save_invstd);
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "batch_norm_bwd: input dtype ", st, " is not supported by this kernel on ",
              input.device().type());
  const int64_t C0 = input.size(1);
  bn::check_param(weight, "weight", input, C0);
  bn::check_param(bias, "bias", input, C0);
  TORCH_CHECK(save_mean.device() == input.device() && save_invstd.device() == input.device(),
              "batch_norm_bwd: expected save_mean and save_invstd on ", input.device(), ", got ",
              save_mean.device(), " and ", save_invstd.device());
  check_cuda_and_size(input, "batch_norm_bwd");
  c10::cuda::CUDAGuard guard(input.device());
  bn::Layout L;
  const at::Tensor x = bn::to_kernel_layout(input, L);
  const at::Tensor g = bn::to_layout(grad_out, L);
  const KernelShape k = kernel_shape(L);
  const int64_t C = k.C;
  const at::ScalarType acc = bn::acc_dtype(st);
  const auto acc_opts = input.options().dtype(acc);

  // Only what output_mask asks for is computed and returned (the rest undefined: None in Python).
  const bool need_gi = output_mask[0], need_sums = output_mask[1] || output_mask[2];
  auto masked = [&](const at::Tensor& gi, const at::Tensor& gw, const at::Tensor& gb) {
    return std::make_tuple(need_gi ? gi : at::Tensor(), output_mask[1] ? gw : at::Tensor(),
                           output_mask[2] ? gb : at::Tensor());
  };
  at::Tensor grad_input = need_gi ? at::empty_like(x) : at::Tensor();
  at::Tensor grad_weight = at::empty({C}, acc_opts);
  at::Tensor grad_bias = at::empty({C}, acc_opts);
  if (x.numel() == 0 || !(need_gi || need_sums)) {
    grad_weight.zero_();
    grad_bias.zero_();
    return masked(grad_input, grad_weight, grad_bias);
  }
  const bool reduce = need_sums || training;  // eval grad_input alone needs no sums

  const at::Tensor mean = save_mean.contiguous();
  const at::Tensor invstd = save_invstd.contiguous();
  const at::Tensor w = optional_acc(weight, acc);
  const at::Tensor b = optional_acc(bias, acc);
  at::Tensor coef = at::empty({4 * C}, acc_opts);
  const ReduceGrid rg = reduce_grid(k);
  at::Tensor part = at::empty({reduce ? 2 * C * rg.P : 1}, input.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "batch_norm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* ip = invstd.const_data_ptr<acc_t>();
    const acc_t* wp = ptr_or_null<acc_t>(w);
    const acc_t* bp = ptr_or_null<acc_t>(b);
    if (reduce) {
      if (k.mc) {
        _batch_norm_bwd_reduce_mc_kernel<scalar_t><<<rg.grid, rg.block, 0, stream>>>(
            gp, xp, mp, ip, wp, bp, part.mutable_data_ptr<double>(), k.M, C, rg.rows_per, act);
      } else {
        _batch_norm_bwd_reduce_ncs_kernel<scalar_t><<<rg.grid, rg.block, 0, stream>>>(
            gp, xp, mp, ip, wp, bp, part.mutable_data_ptr<double>(), k.N, C, k.S, rg.rows_per,
            rg.s_per, act);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    _batch_norm_bwd_finalize_kernel<acc_t><<<static_cast<unsigned>(ceil_div(C, kWarps)), kThreads, 0, stream>>>(
        part.const_data_ptr<double>(), mp, ip, wp, bp, grad_weight.mutable_data_ptr<acc_t>(),
        grad_bias.mutable_data_ptr<acc_t>(), coef.mutable_data_ptr<acc_t>(), C, reduce ? rg.P : 0,
        static_cast<double>(k.N * k.S), training);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!need_gi) return;

    dim3 grid, block;
    elementwise_grid(k, grid, block);
    if (k.mc) {
      _batch_norm_bwd_mc_kernel<scalar_t><<<grid, block, 0, stream>>>(
          gp, xp, mp, coef.const_data_ptr<acc_t>(), grad_input.mutable_data_ptr<scalar_t>(), k.M, C,
          training, act);
    } else {
      _batch_norm_bwd_ncs_kernel<scalar_t><<<grid, block, 0, stream>>>(
          gp, xp, mp, coef.const_data_ptr<acc_t>(), grad_input.mutable_data_ptr<scalar_t>(),
          k.N * C, C, k.S, ChannelDivider(static_cast<unsigned int>(C)), training, act);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return masked(grad_input, grad_weight, grad_bias);
}

}  // namespace pyfastdl

TORCH_LIBRARY_IMPL(pyfastdl, CUDA, m) {
  m.impl("batch_norm_fwd", &pyfastdl::batch_norm_fwd_cuda);
  m.impl("batch_norm_bwd", &pyfastdl::batch_norm_bwd_cuda);
}
