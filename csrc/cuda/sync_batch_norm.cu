// Sync-batch-norm CUDA kernels and launchers (csrc/ops.cpp: sync_batch_norm_stats,
// sync_batch_norm_bwd_elemt), registered under the CUDA dispatch key. The normalization and the
// backward's per-channel sums are batch norm's own kernels (csrc/cuda/batch_norm.cu); these two add
// what SyncBatchNorm needs besides.
//
// Both layouts of bn::Layout are one strided view: x[n, c, s] = ptr[n * C * S + c * S + s]
// ((M, C) channels-last is N = M, S = 1), so one kernel serves both.
//
// stats: one block per channel, two passes over the channel in float64 (the mean, then the sum of
// squared deviations from it: Welford's M2), reduced in a fixed order (per thread, warp shuffle tree,
// the warps in shared memory): deterministic, exact to float64 rounding. One block per channel keeps
// it simple; it reads the input twice (the normalization kernel reads it once more).
// bwd_elemt: a grid-stride elementwise pass in at::opmath_type<scalar_t>.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../common/batch_norm.h"
#include "../common/sync_batch_norm.h"
#include "common.cuh"

namespace pyfastdl {
namespace {

using namespace cuda_common;  // kWarpSize, warp_sum (common.cuh)

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;

// Sum of v over the block, in a fixed order; every thread gets the result.
__device__ __forceinline__ double block_sum(double v, double* shared) {
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  __syncthreads();  // shared may still be read from the previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double total = 0.0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += shared[w];
  return total;
}

template <typename scalar_t>
__global__ void _sync_batch_norm_stats_kernel(const scalar_t* __restrict__ x,  // (N, C, S) strided view
                                              int64_t N, int64_t C, int64_t S,
                                              double* __restrict__ mean,  // (C,)
                                              double* __restrict__ m2) {  // (C,)
  __shared__ double shared[kWarps];
  const int64_t c = blockIdx.x;
  const int64_t n_elem = N * S;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n_elem; i += kThreads) {
    const int64_t n = i / S, j = i - n * S;
    s += static_cast<double>(x[(n * C + c) * S + j]);
  }
  const double mu = n_elem > 0 ? block_sum(s, shared) / static_cast<double>(n_elem) : 0.0;
  double q = 0.0;
  for (int64_t i = threadIdx.x; i < n_elem; i += kThreads) {
    const int64_t n = i / S, j = i - n * S;
    const double d = static_cast<double>(x[(n * C + c) * S + j]) - mu;
    q += d * d;
  }
  q = block_sum(q, shared);
  if (threadIdx.x == 0) {
    mean[c] = mu;
    m2[c] = q;
  }
}

template <typename scalar_t, typename w_t>
__global__ void _sync_batch_norm_bwd_elemt_kernel(
    const scalar_t* __restrict__ g,   // (N, C, S) strided view, like x
    const scalar_t* __restrict__ x,   // (N, C, S)
    const w_t* __restrict__ weight,   // (C,) or nullptr (= 1)
    const at::opmath_type<scalar_t>* __restrict__ mean,         // (C,)
    const at::opmath_type<scalar_t>* __restrict__ invstd,       // (C,)
    const at::opmath_type<scalar_t>* __restrict__ sum_dy,       // (C,)
    const at::opmath_type<scalar_t>* __restrict__ sum_dy_xhat,  // (C,)
    at::opmath_type<scalar_t> inv_count, int64_t C, int64_t S, int64_t numel,
    scalar_t* __restrict__ out) {  // like x
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t c = (i / S) % C;
    const acc_t is = invstd[c];
    const acc_t a = (weight ? static_cast<acc_t>(weight[c]) : acc_t(1)) * is;
    const acc_t xhat = (static_cast<acc_t>(x[i]) - mean[c]) * is;
    out[i] = static_cast<scalar_t>(a * (static_cast<acc_t>(g[i]) - sum_dy[c] * inv_count -
                                        xhat * sum_dy_xhat[c] * inv_count));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sync_batch_norm_stats_cuda(const at::Tensor& input) {
  sbn::check_stats(input, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  c10::cuda::CUDAGuard guard(input.device());
  bn::Layout L;
  const at::Tensor x = bn::to_kernel_layout(input, L);
  const int64_t N = L.channels_last ? L.N * L.S : L.N, S = L.channels_last ? 1 : L.S;
  const auto opts = x.options().dtype(at::kDouble);
  at::Tensor mean = at::zeros({L.C}, opts), m2 = at::zeros({L.C}, opts);
  if (x.numel() == 0) return {mean, m2};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_batch_norm_stats_cuda", [&] {
    _sync_batch_norm_stats_kernel<scalar_t><<<static_cast<unsigned>(L.C), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), N, L.C, S, mean.mutable_data_ptr<double>(), m2.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, m2};
}

at::Tensor sync_batch_norm_bwd_elemt_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                          const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                          const at::Tensor& invstd, const at::Tensor& sum_dy,
                                          const at::Tensor& sum_dy_xhat, int64_t count) {
  sbn::check_bwd_elemt(grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xhat, count,
                       {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16});
  c10::cuda::CUDAGuard guard(input.device());
  bn::Layout L;
  const at::Tensor x = bn::to_kernel_layout(input, L);
  const at::Tensor g = bn::to_layout(grad_out, L);
  at::Tensor out = at::empty_like(x);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  const int64_t S = L.channels_last ? 1 : L.S;
  const at::Tensor m = mean.contiguous(), is = invstd.contiguous(), sd = sum_dy.contiguous(),
                   sdx = sum_dy_xhat.contiguous();
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, 65535 * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_batch_norm_bwd_elemt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_count = static_cast<acc_t>(1.0 / static_cast<double>(count));
    auto launch = [&](auto* wp) {
      using w_t = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
      _sync_batch_norm_bwd_elemt_kernel<scalar_t, w_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), wp, m.const_data_ptr<acc_t>(),
          is.const_data_ptr<acc_t>(), sd.const_data_ptr<acc_t>(), sdx.const_data_ptr<acc_t>(), inv_count, L.C, S,
          numel, out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!w.defined()) {
      launch(static_cast<const scalar_t*>(nullptr));
    } else if (w.scalar_type() == x.scalar_type()) {
      launch(w.const_data_ptr<scalar_t>());
    } else {  // the accumulation dtype (float32 weight for half/bfloat16 input)
      launch(w.const_data_ptr<acc_t>());
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(pyfastdl, CUDA, m) {
  m.impl("sync_batch_norm_stats", &sync_batch_norm_stats_cuda);
  m.impl("sync_batch_norm_bwd_elemt", &sync_batch_norm_bwd_elemt_cuda);
}

}  // namespace pyfastdl
