// Fused-optimizer CPU launchers: validate (common/optim.h), honour found_inf, advance the steps and
// compute the per-tensor constants on the host in float64 (as torch.optim does in Python), then run
// the SIMD kernel of the CPU's capability over all tensors at once (optim_kernel.cpp).
// Registered under the CPU dispatch key; schemas and update rules in csrc/ops.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "common/optim.h"
#include "cpu/optim_kernel.h"

namespace pyfastdl {
namespace {

using cpu::OptimHyper;
using cpu::OptimKind;

constexpr auto kernels = &cpu::optim_kernels;  // the table of the CPU's capability (cpu/capability.h)

// Checks, then returns false when found_inf says to skip the step (nothing is written then).
bool prepare(optim::TensorLists& L, const c10::optional<at::Tensor>& grad_scale,
             const c10::optional<at::Tensor>& found_inf, OptimHyper& h) {
  L.check(grad_scale, found_inf, /*cpu_kernel=*/true);
  if (L.size() > 0)
    TORCH_CHECK(L.param(0).device().is_cpu(), L.op, ": the CPU kernel got params on ", L.param(0).device());
  for (size_t i = 0; i < L.steps.size(); ++i)
    TORCH_CHECK(L.steps[i].device().is_cpu(), L.op, ": state_steps[", i, "] is on ", L.steps[i].device(),
                "; the CPU kernel keeps steps on the CPU");
  if (found_inf.has_value() && found_inf->defined() && optim::host_value(*found_inf) != 0) return false;
  h.has_scale = grad_scale.has_value() && grad_scale->defined();
  if (h.has_scale) h.grad_scale = optim::host_value(*grad_scale);
  L.drop_absent();
  L.dense();
  return true;
}

// Adds 1 to every step and returns the new values.
std::vector<double> advance_steps(const optim::TensorLists& L) {
  std::vector<double> t(L.steps.size());
  for (size_t i = 0; i < L.steps.size(); ++i) {
    const at::Tensor& s = L.steps[i];
    if (s.scalar_type() == at::kDouble) t[i] = ++*s.data_ptr<double>();
    else t[i] = ++*s.data_ptr<float>();
  }
  return t;
}

template <typename T>
cpu::MultiTensor<T> flat(const optim::TensorLists& L) {
  cpu::MultiTensor<T> mt;
  const size_t n = L.size();
  mt.offset.resize(n + 1);
  mt.offset[0] = 0;
  for (size_t i = 0; i < n; ++i) mt.offset[i + 1] = mt.offset[i] + L.param(i).numel();
  for (size_t r = 0; r < L.roles.size(); ++r) {
    if (L.roles[r].tensors.empty()) continue;
    mt.ptr[r].resize(n);
    for (size_t i = 0; i < n; ++i) mt.ptr[r][i] = static_cast<T*>(L.roles[r].tensors[i].data_ptr());
  }
  return mt;
}

// per_tensor(mt, i, t_i) fills the tensor's constants from its new step.
template <typename PerTensor>
void run(OptimKind kind, optim::TensorLists& L, const OptimHyper& h, const std::vector<double>& t,
         const PerTensor& per_tensor) {
  if (L.size() == 0) return;
  if (L.param(0).scalar_type() == at::kDouble) {
    auto mt = flat<double>(L);
    per_tensor(mt, t);
    kernels()->step_double(kind, mt, h);
  } else {
    auto mt = flat<float>(L);
    per_tensor(mt, t);
    kernels()->step_float(kind, mt, h);
  }
  L.finish();
}

constexpr auto kNoConsts = [](auto&, const std::vector<double>&) {};

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                  double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                  bool first_step, const c10::optional<at::Tensor>& grad_scale,
                  const c10::optional<at::Tensor>& found_inf) {
  auto L = optim::sgd_lists(params, grads, momentum_buffers, momentum);
  OptimHyper h;
  if (!prepare(L, grad_scale, found_inf, h)) return;
  h.lr = lr, h.momentum = momentum, h.dampening = dampening, h.weight_decay = weight_decay;
  h.nesterov = nesterov, h.maximize = maximize, h.first_step = first_step;
  run(OptimKind::SGD, L, h, {}, kNoConsts);
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                   at::TensorList master_params, double lr, double beta1, double beta2, double weight_decay,
                   double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                   const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  auto L = optim::adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
                             amsgrad);
  OptimHyper h;
  if (!prepare(L, grad_scale, found_inf, h)) return;
  h.lr = lr, h.beta1 = beta1, h.beta2 = beta2, h.weight_decay = weight_decay, h.eps = eps;
  h.amsgrad = amsgrad, h.maximize = maximize, h.decoupled = decoupled_weight_decay;
  run(OptimKind::ADAM, L, h, advance_steps(L), [&](auto& mt, const std::vector<double>& t) {
    mt.c0.resize(t.size());
    mt.c1.resize(t.size());
    for (size_t i = 0; i < t.size(); ++i) {
      mt.c0[i] = lr / (1 - std::pow(beta1, t[i]));
      mt.c1[i] = std::sqrt(1 - std::pow(beta2, t[i]));
    }
  });
}

void adagrad_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                      at::TensorList state_steps, double lr, double lr_decay, double weight_decay, double eps,
                      bool maximize, const c10::optional<at::Tensor>& grad_scale,
                      const c10::optional<at::Tensor>& found_inf) {
  auto L = optim::adagrad_lists(params, grads, state_sums, state_steps);
  OptimHyper h;
  if (!prepare(L, grad_scale, found_inf, h)) return;
  h.lr = lr, h.weight_decay = weight_decay, h.eps = eps, h.maximize = maximize;
  run(OptimKind::ADAGRAD, L, h, advance_steps(L), [&](auto& mt, const std::vector<double>& t) {
    mt.c0.resize(t.size());
    for (size_t i = 0; i < t.size(); ++i) mt.c0[i] = lr / (1 + (t[i] - 1) * lr_decay);
  });
}

void rmsprop_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                      at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList state_steps,
                      double lr, double alpha, double eps, double weight_decay, double momentum, bool centered,
                      bool maximize, const c10::optional<at::Tensor>& grad_scale,
                      const c10::optional<at::Tensor>& found_inf) {
  auto L = optim::rmsprop_lists(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, centered,
                                momentum);
  OptimHyper h;
  if (!prepare(L, grad_scale, found_inf, h)) return;
  h.lr = lr, h.alpha = alpha, h.eps = eps, h.weight_decay = weight_decay, h.momentum = momentum;
  h.centered = centered, h.maximize = maximize;
  advance_steps(L);
  run(OptimKind::RMSPROP, L, h, {}, kNoConsts);
}

void adadelta_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList acc_deltas, at::TensorList state_steps, double lr, double rho, double eps,
                       double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                       const c10::optional<at::Tensor>& found_inf) {
  auto L = optim::adadelta_lists(params, grads, square_avgs, acc_deltas, state_steps);
  OptimHyper h;
  if (!prepare(L, grad_scale, found_inf, h)) return;
  h.lr = lr, h.rho = rho, h.eps = eps, h.weight_decay = weight_decay, h.maximize = maximize;
  advance_steps(L);
  run(OptimKind::ADADELTA, L, h, {}, kNoConsts);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("adam_step_", &adam_step_cpu);
  m.impl("adagrad_step_", &adagrad_step_cpu);
  m.impl("rmsprop_step_", &rmsprop_step_cpu);
  m.impl("adadelta_step_", &adadelta_step_cpu);
}

}  // namespace pyfastdl
