// 2-D pooling CPU launchers: validate (common/pool2d.h), bring the input into the layout of the
// output (torch's rule: input.suggest_memory_format()), allocate, and run the SIMD kernels of the
// CPU's capability (pool2d_kernel.cpp). Registered under the CPU dispatch key.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "common/pool2d.h"
#include "cpu/pool2d_kernel.h"

namespace pyfastdl {
namespace {

constexpr auto kernels = &cpu::pool2d_kernels;  // the table of the CPU's capability (cpu/capability.h)

using pool::empty_in;
using pool::empty_out;
using pool::kNoDilation;

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd_cpu(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool ceil_mode, bool need_indices) {
  const pool::Params p =
      pool::check_fwd(input, kernel_size, stride, padding, dilation, ceil_mode, {at::kFloat, at::kDouble}, "max_pool2d");
  const at::Tensor x = pool::to_layout(input, p.channels_last);
  at::Tensor y = empty_out(x, p, x.scalar_type());
  at::Tensor idx = need_indices ? empty_out(x, p, at::kLong) : at::Tensor();
  if (y.numel() > 0) kernels()->max_fwd(x, p, y, need_indices ? &idx : nullptr);
  return {y, idx};
}

at::Tensor max_pool2d_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& indices,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, bool ceil_mode) {
  const pool::Params p = pool::check_bwd(grad_out, input, &indices, kernel_size, stride, padding, dilation, ceil_mode,
                                         {at::kFloat, at::kDouble}, "max_pool2d_bwd");
  const at::Tensor g = pool::to_layout(grad_out, p.channels_last);
  const at::Tensor idx = pool::to_layout(indices, p.channels_last);
  at::Tensor gi = empty_in(input, p);
  if (gi.numel() > 0) kernels()->max_bwd(g, idx, p, gi);
  return gi;
}

at::Tensor avg_pool2d_fwd_cpu(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                              c10::optional<int64_t> divisor_override) {
  const pool::Params p = pool::check_fwd(input, kernel_size, stride, padding, kNoDilation, ceil_mode,
                                         {at::kFloat, at::kDouble}, "avg_pool2d");
  pool::check_divisor(divisor_override, "avg_pool2d");
  const at::Tensor x = pool::to_layout(input, p.channels_last);
  at::Tensor y = empty_out(x, p, x.scalar_type());
  if (y.numel() > 0) kernels()->avg_fwd(x, p, count_include_pad, divisor_override.value_or(0), y);
  return y;
}

at::Tensor avg_pool2d_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef kernel_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                              bool count_include_pad, c10::optional<int64_t> divisor_override) {
  const pool::Params p = pool::check_bwd(grad_out, input, nullptr, kernel_size, stride, padding, kNoDilation,
                                         ceil_mode, {at::kFloat, at::kDouble}, "avg_pool2d_bwd");
  pool::check_divisor(divisor_override, "avg_pool2d_bwd");
  const at::Tensor g = pool::to_layout(grad_out, p.channels_last);
  at::Tensor gi = empty_in(input, p);
  if (gi.numel() > 0) kernels()->avg_bwd(g, p, count_include_pad, divisor_override.value_or(0), gi);
  return gi;
}

TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("max_pool2d_fwd", &max_pool2d_fwd_cpu);
  m.impl("max_pool2d_bwd", &max_pool2d_bwd_cpu);
  m.impl("avg_pool2d_fwd", &avg_pool2d_fwd_cpu);
  m.impl("avg_pool2d_bwd", &avg_pool2d_bwd_cpu);
}

}  // namespace pyfastdl
