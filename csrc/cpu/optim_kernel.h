// Fused-optimizer CPU kernels, one table per SIMD capability (optim_kernel.cpp is compiled once per
// capability; optim.cpp picks the table at run time). Kernels trust their arguments: the launcher
// (optim.cpp, common/optim.h) has checked lengths, dtypes and shapes and made every tensor of a
// parameter dense with the parameter's strides, so each is a flat array of numel elements.
//
// One call updates all tensors of a list. The work is the concatenation of the tensors' elements,
// split evenly over the threads (one big tensor and many small ones balance), SIMD inside.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/capability.h"

namespace pyfastdl {
namespace cpu {

enum class OptimKind { SGD, ADAM, ADAGRAD, RMSPROP, ADADELTA };

// Roles, the order of the op schemas' lists: 0 = param, 1 = grad, then the state tensors
//   SGD: 2 = momentum buffer            ADAM: 2 = exp_avg, 3 = exp_avg_sq, 4 = max_exp_avg_sq
//   ADAGRAD: 2 = sum                    RMSPROP: 2 = square_avg, 3 = grad_avg, 4 = momentum buffer
//   ADADELTA: 2 = square_avg, 3 = acc_delta
// A role absent from the call (amsgrad off, ...) has no pointers.
constexpr int kMaxRoles = 6;  // (role 5, master_params, never reaches the CPU kernels)

template <typename T>
struct MultiTensor {
  std::vector<int64_t> offset;             // n + 1 prefix sums of the tensors' numel
  std::vector<T*> ptr[kMaxRoles];          // ptr[role][tensor]; empty when the role is absent
  // Per-tensor constants (double): ADAM: c0 = lr / (1 - beta1^t), c1 = sqrt(1 - beta2^t);
  // ADAGRAD: c0 = lr / (1 + (t - 1) * lr_decay). Unused otherwise.
  std::vector<double> c0, c1;
  int64_t tensors() const { return static_cast<int64_t>(offset.size()) - 1; }
  bool has(int role) const { return !ptr[role].empty(); }
};

struct OptimHyper {
  double lr = 0, weight_decay = 0, eps = 0;
  double beta1 = 0, beta2 = 0;              // ADAM
  double momentum = 0, dampening = 0;       // SGD, RMSPROP (momentum)
  double alpha = 0, rho = 0;                // RMSPROP, ADADELTA
  bool maximize = false, nesterov = false, first_step = false, amsgrad = false, decoupled = false,
       centered = false;
  bool has_scale = false;
  double grad_scale = 1;                    // grad / grad_scale when has_scale
};

struct OptimKernels {
  void (*step_float)(OptimKind kind, const MultiTensor<float>& mt, const OptimHyper& h);
  void (*step_double)(OptimKind kind, const MultiTensor<double>& mt, const OptimHyper& h);
};

PYFASTDL_CPU_KERNELS(OptimKernels, optim_kernels)

}  // namespace cpu
}  // namespace pyfastdl
