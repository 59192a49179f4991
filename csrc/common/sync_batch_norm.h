// Argument checks shared by the CPU and CUDA launchers of the sync-batch-norm ops (csrc/ops.cpp:
// sync_batch_norm_stats, sync_batch_norm_bwd_elemt). Every message names the argument; all run
// before anything is written.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

#include "common/batch_norm.h"

namespace pyfastdl {
namespace sbn {

inline void check_input(const char* op, const at::Tensor& input, std::initializer_list<at::ScalarType> allowed) {
  TORCH_CHECK(input.dim() >= 2, op, ": expected input of rank >= 2, (N, C, *), got input of rank ", input.dim(),
              " and shape ", input.sizes());
  bool ok = false;
  for (auto t : allowed) ok = ok || input.scalar_type() == t;
  TORCH_CHECK(ok, op, ": input dtype ", input.scalar_type(), " is not supported by this kernel on ",
              input.device().type());
}

inline void check_stats(const at::Tensor& input, std::initializer_list<at::ScalarType> allowed) {
  check_input("sync_batch_norm_stats", input, allowed);
}

inline void check_bwd_elemt(const at::Tensor& grad_out, const at::Tensor& input,
                            const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& sum_dy, const at::Tensor& sum_dy_xhat,
                            int64_t count, std::initializer_list<at::ScalarType> allowed) {
  constexpr const char* op = "sync_batch_norm_bwd_elemt";
  check_input(op, input, allowed);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), op, ": expected grad_out of shape ", input.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), op, ": expected grad_out of dtype ",
              input.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), op, ": expected grad_out on ", input.device(), ", got ",
              grad_out.device());
  const int64_t C = input.size(1);
  const auto acc = bn::acc_dtype(input.scalar_type());
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK(weight->dim() == 1 && weight->numel() == C, op, ": expected weight of shape (", C,
                ",) to match input channels, got ", weight->sizes());
    TORCH_CHECK(weight->device() == input.device(), op, ": expected weight on ", input.device(), ", got ",
                weight->device());
    TORCH_CHECK(weight->scalar_type() == input.scalar_type() || weight->scalar_type() == acc, op,
                ": expected weight of dtype ", input.scalar_type(), " (or ", acc, "), got ", weight->scalar_type());
  }
  const std::pair<const char*, const at::Tensor*> stats[] = {
      {"mean", &mean}, {"invstd", &invstd}, {"sum_dy", &sum_dy}, {"sum_dy_xhat", &sum_dy_xhat}};
  for (const auto& [name, t] : stats) {
    TORCH_CHECK(t->dim() == 1 && t->numel() == C, op, ": expected ", name, " of shape (", C, ",), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == acc, op, ": expected ", name, " of dtype ", acc, ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == input.device(), op, ": expected ", name, " on ", input.device(), ", got ",
                t->device());
  }
  int64_t n = input.size(0);
  for (int64_t d = 2; d < input.dim(); ++d) n *= input.size(d);
  TORCH_CHECK_VALUE(count >= 1 && count >= n, op, ": expected count (elements per channel over all ranks) >= ",
                    std::max<int64_t>(n, 1), " (this rank's), got ", count);
}

}  // namespace sbn
}  // namespace pyfastdl
