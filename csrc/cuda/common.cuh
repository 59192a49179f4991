// Device helpers shared by the CUDA kernel files (csrc/cuda/*.cu): the warp size, warp reductions and
// the float/double overloads of the math the kernels accumulate with. One home: a family includes
// this header instead of copying them (docs/adding-an-op-family.md).
//
// Launcher rule (docs/adding-an-op-family.md, 2), kept in each launcher because it names its own input: take
// `c10::cuda::CUDAGuard guard(input.device());` after the checks and before the first allocation,
// launch on `at::cuda::getCurrentCUDAStream()`, then `C10_CUDA_KERNEL_LAUNCH_CHECK()`.
#pragma once

#include <cstdint>

namespace pyfastdl {
namespace cuda_common {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;  // every lane of the warp takes part

// Explicit fused multiply-add (round once), so two kernels that must agree bit for bit (a forward
// and the backward that recomputes its mask) round identically, whatever the compiler contracts.
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return __fma_rn(a, b, c); }

__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }
__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// Butterfly reduction within each group of WIDTH consecutive lanes (WIDTH a power of two, at most
// 32): every lane of a group ends with the group's result, combined in the same fixed order on every
// run (deterministic). All 32 lanes of the warp must call it.
template <int WIDTH = kWarpSize, typename T, typename Combine>
__device__ __forceinline__ T warp_reduce(T v, Combine combine) {
  static_assert(WIDTH >= 1 && WIDTH <= kWarpSize && (WIDTH & (WIDTH - 1)) == 0, "WIDTH: a power of two <= 32");
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) v = combine(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

template <int WIDTH = kWarpSize, typename T>
__device__ __forceinline__ T warp_sum(T v) {
  return warp_reduce<WIDTH>(v, [](T a, T b) { return a + b; });
}

// max over the group; a NaN from another lane is ignored (b > a is false), as in a running max
// whose inputs are scores that are finite or -inf.
template <int WIDTH = kWarpSize, typename T>
__device__ __forceinline__ T warp_max(T v) {
  return warp_reduce<WIDTH>(v, [](T a, T b) { return b > a ? b : a; });
}

}  // namespace cuda_common
}  // namespace pyfastdl
