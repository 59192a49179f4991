// Argument checks and layout description shared by the CPU and CUDA batch-norm launchers.
// Launchers validate, kernels trust (docs/adding-an-op-family.md, 2): every user-facing check is here, run before
// any output or running statistic is written.
#pragma once

#include <ATen/ATen.h>

namespace pyfastdl {
namespace bn {

// The two memory layouts the kernels read without a copy.
//   channels_last = false: (N, C, S) contiguous, S = prod(spatial)   (NCHW, (N, C, L))
//   channels_last = true:  (M, C) contiguous, M = N * S, C innermost  ((N, C), NHWC, NDHWC)
struct Layout {
  int64_t N = 0, C = 0, S = 1;
  bool channels_last = false;
  int64_t reduce_size() const { return N * S; }  // elements per channel
};

// The activation fused into the epilogue (the schemas' `int activation`, csrc/ops.cpp).
enum Activation : int { kActNone = 0, kActRelu = 1, kActSigmoid = 2 };

inline int check_activation(int64_t activation, const char* op) {
  TORCH_CHECK_VALUE(activation >= kActNone && activation <= kActSigmoid, op,
                    ": expected activation 0 (none), 1 (relu) or 2 (sigmoid), got ", activation);
  return static_cast<int>(activation);
}

// Returns `input` itself when it is in one of the two layouts, a contiguous copy otherwise.
inline at::Tensor to_kernel_layout(const at::Tensor& input, Layout& layout) {
  layout.N = input.size(0);
  layout.C = input.size(1);
  layout.S = 1;
  for (int64_t d = 2; d < input.dim(); ++d) layout.S *= input.size(d);
  // (N, C) and contiguous (N, C, 1, ...) are (M, C) with C innermost.
  if (layout.S == 1 && input.is_contiguous()) {
    layout.channels_last = true;
    return input;
  }
  if (input.is_contiguous()) {
    layout.channels_last = false;
    return input;
  }
  if ((input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    layout.channels_last = true;
    return input;
  }
  layout.channels_last = false;
  return input.contiguous();
}

// `t` (grad_out, same shape as the input) in the memory layout chosen for the input.
inline at::Tensor to_layout(const at::Tensor& t, const Layout& layout) {
  if (layout.channels_last && layout.S > 1 && t.dim() == 4) return t.contiguous(at::MemoryFormat::ChannelsLast);
  if (layout.channels_last && layout.S > 1 && t.dim() == 5) return t.contiguous(at::MemoryFormat::ChannelsLast3d);
  return t.contiguous();
}

// The accumulation ("opmath") dtype: float64 for float64 input, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_param(const c10::optional<at::Tensor>& t, const char* name, const at::Tensor& input,
                        int64_t C) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->numel() == C, "batch_norm: expected ", name, " of shape (", C,
              ",) to match input channels (input.size(1)), got ", name, " of shape ", t->sizes());
  TORCH_CHECK(t->device() == input.device(), "batch_norm: expected ", name, " on ", input.device(),
              " like input, got ", name, " on ", t->device());
  const auto st = t->scalar_type();
  TORCH_CHECK(st == input.scalar_type() || st == acc_dtype(input.scalar_type()),
              "batch_norm: expected ", name, " of dtype ", input.scalar_type(), " (or ",
              acc_dtype(input.scalar_type()), "), got ", st);
}

// Checks of batch_norm_fwd; `allowed` lists the input dtypes this backend's kernels cover.
inline void check_fwd(const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& running_mean,
                      const c10::optional<at::Tensor>& running_var, bool training, double momentum,
                      double eps, std::initializer_list<at::ScalarType> allowed) {
  TORCH_CHECK(input.dim() >= 2,
              "batch_norm: expected input of rank >= 2, (N, C, *), got input of rank ",
              input.dim(), " and shape ", input.sizes());
  bool ok = false;
  for (auto t : allowed) ok = ok || input.scalar_type() == t;
  TORCH_CHECK(ok, "batch_norm: input dtype ", input.scalar_type(),
              " is not supported by this kernel on ", input.device().type());
  const int64_t C = input.size(1);
  check_param(weight, "weight", input, C);
  check_param(bias, "bias", input, C);
  check_param(running_mean, "running_mean", input, C);
  check_param(running_var, "running_var", input, C);
  const bool has_rm = running_mean.has_value() && running_mean->defined();
  const bool has_rv = running_var.has_value() && running_var->defined();
  TORCH_CHECK(has_rm == has_rv,
              "batch_norm: running_mean and running_var must be given together or both be None");
  TORCH_CHECK(training || has_rm,
              "batch_norm: running_mean and running_var are required when training=False");
  // As torch: eps > 0 when training (eps = 0 would divide by zero for a constant channel), eps >= 0
  // in eval; both ValueError. Any finite momentum, negative included, as torch (pyfastdl refuses a
  // NaN or Inf momentum, which torch accepts and turns into NaN running statistics).
  TORCH_CHECK_VALUE(std::isfinite(eps) && (training ? eps > 0 : eps >= 0), "batch_norm: expected eps ",
                    training ? "> 0 when training" : ">= 0", ", got eps = ", eps);
  TORCH_CHECK_VALUE(std::isfinite(momentum), "batch_norm: expected a finite momentum, got momentum = ",
                    momentum);
  if (training) {  // torch's rule: N * prod(spatial) == 1 (C = 0 included) is refused
    int64_t n = input.size(0);
    for (int64_t d = 2; d < input.dim(); ++d) n *= input.size(d);
    TORCH_CHECK_VALUE(n != 1, "Expected more than 1 value per channel when training, got input size ",
                      input.sizes());
  }
}

inline void check_bwd(const at::Tensor& grad_out, const at::Tensor& input,
                      const at::Tensor& save_mean, const at::Tensor& save_invstd) {
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "batch_norm_bwd: expected grad_out of shape ",
              input.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), "batch_norm_bwd: expected grad_out of dtype ",
              input.scalar_type(), ", got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), "batch_norm_bwd: expected grad_out on ",
              input.device(), ", got ", grad_out.device());
  const int64_t C = input.size(1);
  TORCH_CHECK(save_mean.numel() == C && save_invstd.numel() == C,
              "batch_norm_bwd: expected save_mean and save_invstd of shape (", C, ",)");
  TORCH_CHECK(save_mean.scalar_type() == acc_dtype(input.scalar_type()) &&
                  save_invstd.scalar_type() == acc_dtype(input.scalar_type()),
              "batch_norm_bwd: expected save_mean and save_invstd of dtype ",
              acc_dtype(input.scalar_type()));
}

}  // namespace bn
}  // namespace pyfastdl
