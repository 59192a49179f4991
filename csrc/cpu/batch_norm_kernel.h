// Batch-norm CPU kernels, one table per SIMD capability (batch_norm_kernel.cpp is compiled once per
// capability; batch_norm.cpp picks the table at run time). Kernels trust their arguments: the
// launcher in batch_norm.cpp has validated shapes, dtypes (float32/float64) and layouts.
//
// Every per-channel constant tensor below is (C,) contiguous in the input's dtype.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/FunctionRef.h>

#include "common/batch_norm.h"
#include "cpu/capability.h"

namespace pyfastdl {
namespace cpu {

// Per-channel constants of the normalization, (C,) in the input dtype:
//   xc = (x - m1) - m2      m1 + m2 = mean split in two parts, so x - mean keeps its precision
//                           when |mean| >> std (m2 = 0 in the backward, which has the saved mean)
//   y  = act(xc * scale + bias)  scale = weight * invstd; act (bn::Activation): none, max(y, 0) or sigmoid
// Raw pointers into buffers the launcher owns (float or double, as x): no Tensor views per call.
struct NormConsts {
  const void *m1, *m2, *scale, *bias;
};

// Called once per channel by the fused kernels, from worker threads (distinct c in parallel).
using PerChannelFn = c10::function_ref<void(int64_t c, double a, double b)>;

struct BatchNormKernels {
  // Per-channel mean and biased variance of x, numerically stable (sums shifted by the channel's
  // first element, partial sums of short runs combined in float64). mean, var: (C,) float64.
  void (*stats)(const at::Tensor& x, const bn::Layout& layout, double* mean, double* var);
  // y = act(xc * scale + bias).                                                  y: like x
  void (*apply)(const at::Tensor& x, const bn::Layout& layout, const NormConsts& k, int act,
                at::Tensor& y);
  // g' = g times act'(xc * scale + bias): 1, the ReLU mask (y > 0) or s (1 - s), s = sigmoid(y);
  // sum_g[c] = sum g', sum_gx[c] = sum g' * xc. sum_g, sum_gx: (C,) float64.
  void (*bwd_reduce)(const at::Tensor& g, const at::Tensor& x, const bn::Layout& layout,
                     const NormConsts& k, int act, double* sum_g, double* sum_gx);
  // grad_input = a * g' + b * xc + d (g' as above; a, b, d: (C,) in x's dtype) when training; a * g' in eval (x read only for
  // the activation's derivative, so a non-finite x gives a finite grad_input, as torch; NaN through
  // the sigmoid).   grad_input: like x
  void (*bwd_apply)(const at::Tensor& g, const at::Tensor& x, const bn::Layout& layout,
                    const NormConsts& k, const void* a, const void* b,
                    const void* d, int act, bool training, at::Tensor& grad_input);
  // NCS layout only, one task per channel (fused_ok): the channel's statistics, then
  // on_stats(c, mean, biased var) -- which must fill channel c of k --, then y for that channel while
  // its data is still in cache. Same results as stats + apply.
  void (*train_fwd_fused)(const at::Tensor& x, const bn::Layout& layout, PerChannelFn on_stats,
                          const NormConsts& k, int act, at::Tensor& y);
  // NCS layout only, per channel: bwd_reduce's sums, on_sums(c, sum_g, sum_gx) -- which must fill
  // channel c of a, b, d --, then bwd_apply for that channel.
  void (*bwd_fused)(const at::Tensor& g, const at::Tensor& x, const bn::Layout& layout,
                    const NormConsts& k, PerChannelFn on_sums, const void* a,
                    const void* b, const void* d, int act, at::Tensor& grad_input);
};

PYFASTDL_CPU_KERNELS(BatchNormKernels, batch_norm_kernels)

}  // namespace cpu
}  // namespace pyfastdl
