// Argument checks and list preparation shared by the CPU and CUDA fused-optimizer launchers
// (schemas and update rules: csrc/ops.cpp). Launchers validate, kernels trust (docs/adding-an-op-family.md, 2):
// every check runs before any parameter, state tensor or step is written.
//
// A launcher builds the op's TensorLists (sgd_lists() etc. below), calls check(), drop_absent(),
// dense(), runs its kernel over the lists, then finish() (copies back tensors made dense).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

namespace pyfastdl {
namespace optim {

// One role in the step: "grads", "exp_avgs", ...; `writes` for state tensors the step updates.
struct Role {
  const char* name;
  std::vector<at::Tensor> tensors;
  bool writes;
  bool state;  // float32 when params are float16/bfloat16
};

struct TensorLists {
  const char* op;               // "adam_step_" etc., for the messages
  std::vector<Role> roles;      // roles[0] is "params"; roles[1] is "grads"
  std::vector<at::Tensor> steps;  // may be empty (SGD)
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (original, dense working copy)
  std::vector<size_t> absent;   // roles the call does not use (amsgrad off, ...): emptied by drop_absent()

  TensorLists(const char* op_name, at::TensorList params, at::TensorList grads) : op(op_name) {
    roles.push_back({"params", params.vec(), true, false});
    roles.push_back({"grads", grads.vec(), false, false});
  }
  void add(const char* name, at::TensorList ts, bool writes = true) {
    roles.push_back({name, ts.vec(), writes, true});
  }
  size_t size() const { return roles[0].tensors.size(); }
  const at::Tensor& param(size_t i) const { return roles[0].tensors[i]; }

  // Every structural check of the schema's contract. `optional_roles` may be empty lists.
  void check(const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
             bool cpu_kernel) const {
    const size_t n = size();
    TORCH_CHECK(roles[1].tensors.size() == n, op, ": expected grads to have one tensor per param (", n,
                "), got ", roles[1].tensors.size());
    for (size_t r = 2; r < roles.size(); ++r)
      TORCH_CHECK(roles[r].tensors.empty() || roles[r].tensors.size() == n, op, ": expected ", roles[r].name,
                  " to be empty or have one tensor per param (", n, "), got ", roles[r].tensors.size());
    TORCH_CHECK(steps.empty() || steps.size() == n, op, ": expected state_steps to have one tensor per param (",
                n, "), got ", steps.size());
    if (n == 0) return;
    const at::Device dev = param(0).device();
    const at::ScalarType dt = param(0).scalar_type();
    const bool low = dt == at::kHalf || dt == at::kBFloat16;
    if (cpu_kernel) {
      TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": the CPU kernel takes float32 or float64 params, got ",
                  dt);
    } else {
      TORCH_CHECK(dt == at::kFloat || low || dt == at::kDouble, op,
                  ": expected float32, float64, float16 or bfloat16 params, got ", dt);
    }
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& p = param(i);
      TORCH_CHECK(p.device() == dev && p.scalar_type() == dt, op, ": params[", i, "] is ", p.scalar_type(), " on ",
                  p.device(), " but params[0] is ", dt, " on ", dev, "; one call takes one device and dtype");
      for (size_t r = 1; r < roles.size(); ++r) {
        if (roles[r].tensors.empty()) continue;
        const at::Tensor& t = roles[r].tensors[i];
        TORCH_CHECK(t.defined(), op, ": ", roles[r].name, "[", i, "] is undefined");
        TORCH_CHECK(t.layout() == at::kStrided, op, ": ", roles[r].name, "[", i,
                    "] is sparse; fused optimizers do not support sparse gradients");
        TORCH_CHECK(t.device() == dev, op, ": ", roles[r].name, "[", i, "] is on ", t.device(), " but params[", i,
                    "] is on ", dev);
        const at::ScalarType want = (roles[r].state && low) ? at::kFloat : dt;
        TORCH_CHECK(t.scalar_type() == want, op, ": ", roles[r].name, "[", i, "] is ", t.scalar_type(),
                    " but params[", i, "] is ", dt, " (expected ", want, ")");
        TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", roles[r].name, "[", i, "] has shape ", t.sizes(),
                    " but params[", i, "] has shape ", p.sizes());
      }
      if (!steps.empty()) {
        const at::Tensor& s = steps[i];
        TORCH_CHECK(s.numel() == 1 && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble), op,
                    ": state_steps[", i, "] must be a 1-element float32 or float64 tensor, got ", s.scalar_type(),
                    " of shape ", s.sizes());
        TORCH_CHECK(s.device().is_cpu() || s.device() == dev, op, ": state_steps[", i, "] is on ", s.device(),
                    "; expected the CPU or ", dev);
      }
    }
    for (const auto* t : {&grad_scale, &found_inf}) {
      if (!t->has_value() || !(*t)->defined()) continue;
      const char* name = t == &grad_scale ? "grad_scale" : "found_inf";
      TORCH_CHECK((*t)->numel() == 1 && (*t)->scalar_type() == at::kFloat, op, ": ", name,
                  " must be a 1-element float32 tensor, got ", (*t)->scalar_type(), " of shape ", (*t)->sizes());
      TORCH_CHECK((*t)->device() == dev, op, ": ", name, " is on ", (*t)->device(), " but params are on ", dev);
    }
  }

  // Makes every tensor of param i share param i's strides and be dense (no holes, no overlap), so
  // a kernel can treat them as flat arrays of numel elements. Grads that differ are copied
  // (read-only); params and state tensors that differ get a dense working copy written back by
  // finish(). The common case (everything created by zeros_like(param)) copies nothing.
  void dense() {
    for (size_t i = 0; i < size(); ++i) {
      at::Tensor& p = roles[0].tensors[i];
      const bool p_ok = p.is_non_overlapping_and_dense();
      if (!p_ok) {
        at::Tensor w = at::empty_like(p, at::MemoryFormat::Contiguous);
        w.copy_(p);
        copy_back.emplace_back(p, w);
        p = w;
      }
      for (size_t r = 1; r < roles.size(); ++r) {
        if (roles[r].tensors.empty()) continue;
        at::Tensor& t = roles[r].tensors[i];
        if (t.strides() == p.strides() || t.numel() <= 1) continue;
        at::Tensor w = at::empty_strided(p.sizes(), p.strides(), t.options());
        w.copy_(t);
        if (roles[r].writes) copy_back.emplace_back(t, w);
        t = w;
      }
    }
  }

  void drop_absent() {
    for (size_t r : absent) roles[r].tensors.clear();
  }

  // The lists as the kernels see them (after dense()): roles[r].tensors.
  const std::vector<at::Tensor>& list(size_t r) const { return roles[r].tensors; }

  void finish() {
    for (auto& [orig, work] : copy_back) orig.copy_(work);
    copy_back.clear();
  }
};

// ---- each op's lists, with the checks on their counts (the roles' order is the schema's) ------------

inline void check_count(const char* op, const char* name, size_t got, size_t n, const char* why = "") {
  TORCH_CHECK(got == n, op, ": expected ", name, " to have one tensor per param (", n, ")", why, ", got ", got);
}

// roles: 0 params, 1 grads, 2 momentum_buffers (absent when momentum == 0)
inline TensorLists sgd_lists(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                             double momentum) {
  TensorLists L("sgd_step_", params, grads);
  L.add("momentum_buffers", momentum_buffers);
  if (momentum != 0) check_count(L.op, "momentum_buffers", momentum_buffers.size(), params.size(), " as momentum != 0");
  else L.absent = {2};
  return L;
}

// roles: 0 params, 1 grads, 2 exp_avgs, 3 exp_avg_sqs, 4 max_exp_avg_sqs (absent unless amsgrad),
// 5 master_params (absent when empty; only for float16/bfloat16 params)
inline TensorLists adam_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                              at::TensorList state_steps, at::TensorList master_params, bool amsgrad) {
  TensorLists L("adam_step_", params, grads);
  L.add("exp_avgs", exp_avgs);
  L.add("exp_avg_sqs", exp_avg_sqs);
  L.add("max_exp_avg_sqs", max_exp_avg_sqs);
  L.add("master_params", master_params);
  L.steps = state_steps.vec();
  check_count(L.op, "exp_avgs", exp_avgs.size(), params.size());
  check_count(L.op, "exp_avg_sqs", exp_avg_sqs.size(), params.size());
  check_count(L.op, "state_steps", state_steps.size(), params.size());
  if (amsgrad) check_count(L.op, "max_exp_avg_sqs", max_exp_avg_sqs.size(), params.size(), " as amsgrad=True");
  else L.absent.push_back(4);
  if (master_params.empty()) {
    L.absent.push_back(5);
  } else if (!params.empty()) {
    const at::ScalarType dt = params[0].scalar_type();
    TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16, L.op,
                ": master_params are float32 copies of float16/bfloat16 params; params are ", dt);
  }
  return L;
}

// roles: 0 params, 1 grads, 2 state_sums
inline TensorLists adagrad_lists(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                                 at::TensorList state_steps) {
  TensorLists L("adagrad_step_", params, grads);
  L.add("state_sums", state_sums);
  L.steps = state_steps.vec();
  check_count(L.op, "state_sums", state_sums.size(), params.size());
  check_count(L.op, "state_steps", state_steps.size(), params.size());
  return L;
}

// roles: 0 params, 1 grads, 2 square_avgs, 3 grad_avgs (absent unless centered), 4 momentum_buffers
// (absent unless momentum > 0)
inline TensorLists rmsprop_lists(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                                 at::TensorList grad_avgs, at::TensorList momentum_buffers,
                                 at::TensorList state_steps, bool centered, double momentum) {
  TensorLists L("rmsprop_step_", params, grads);
  L.add("square_avgs", square_avgs);
  L.add("grad_avgs", grad_avgs);
  L.add("momentum_buffers", momentum_buffers);
  L.steps = state_steps.vec();
  check_count(L.op, "square_avgs", square_avgs.size(), params.size());
  check_count(L.op, "state_steps", state_steps.size(), params.size());
  if (centered) check_count(L.op, "grad_avgs", grad_avgs.size(), params.size(), " as centered=True");
  else L.absent.push_back(3);
  if (momentum > 0) check_count(L.op, "momentum_buffers", momentum_buffers.size(), params.size(), " as momentum > 0");
  else L.absent.push_back(4);
  return L;
}

// roles: 0 params, 1 grads, 2 square_avgs, 3 acc_deltas
inline TensorLists adadelta_lists(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                                  at::TensorList acc_deltas, at::TensorList state_steps) {
  TensorLists L("adadelta_step_", params, grads);
  L.add("square_avgs", square_avgs);
  L.add("acc_deltas", acc_deltas);
  L.steps = state_steps.vec();
  check_count(L.op, "square_avgs", square_avgs.size(), params.size());
  check_count(L.op, "acc_deltas", acc_deltas.size(), params.size());
  check_count(L.op, "state_steps", state_steps.size(), params.size());
  return L;
}

// Reads a 1-element CPU tensor of any floating dtype as double (steps, found_inf, grad_scale).
inline double host_value(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>() : static_cast<double>(*t.const_data_ptr<float>());
}

}  // namespace optim
}  // namespace pyfastdl
