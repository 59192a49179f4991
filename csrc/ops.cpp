// Every pyfastdl op's schema, in one place (STYLE.md rule 2: the schema is the contract).
//
// Implementations register elsewhere: csrc/cpu/<family>.cpp under CPU, csrc/cuda/<family>.cu under
// CUDA. Fake (meta) implementations live in pyfastdl/_fake.py. The Triton kernels have their own
// namespace, pyfastdl_triton::, with the same schemas (triton_kernels/<family>.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pyfastdl, m) {
  // ---- batch norm -------------------------------------------------------------------------------
  // input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W); contiguous or channels_last(_3d).
  // weight, bias: (C,) or None (None = 1 and 0). running_mean, running_var: (C,) or None, updated in
  // place when training: r = (1 - momentum) * r + momentum * batch_stat, the variance unbiased
  // (n / (n - 1)), n = numel / C. Eval (training=false) normalizes with the running statistics.
  // relu=true applies max(y, 0) in the epilogue.
  // Returns (output [input's shape and memory format], save_mean (C,), save_invstd (C,)); the saved
  // statistics are in the accumulation dtype (float32, or float64 for float64 input): the batch mean
  // and 1/sqrt(biased var + eps) in training, the running ones in eval.
  m.def(
      "batch_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, bool relu) "
      "-> (Tensor, Tensor, Tensor)");
  // Backward of batch_norm_fwd. With relu=true the ReLU mask is recomputed from input with the
  // forward's formula, y = (input - save_mean) * weight * save_invstd + bias, and grad_out is zeroed
  // where y <= 0. (Each backend's forward centres x on the batch mean held to twice the
  // accumulation precision -- save_mean plus its rounding error --, so that a channel with
  // |mean| >> std normalizes accurately; the backward, which has only save_mean, may differ from the
  // forward's mask only where |y| is below that rounding error times the scale.)
  // Returns (grad_input [input's shape and memory format], grad_weight (C,), grad_bias (C,)), the
  // last two in the accumulation dtype.
  m.def(
      "batch_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor save_mean, "
      "Tensor save_invstd, bool training, bool relu) -> (Tensor, Tensor, Tensor)");
}

// ---- build information (python -m pyfastdl info) ---------------------------------------------------
#include "cpu/capability.h"

namespace {
std::string build_info() {
  return std::string("cpu_capability=") + pyfastdl::cpu::capability_name(pyfastdl::cpu::capability()) +
         ";cpu_best=" + pyfastdl::cpu::capability_name(pyfastdl::cpu::detect_capability()) +
         ";cuda=" + (PYFASTDL_WITH_CUDA ? "1" : "0") + ";cuda_archs=" + PYFASTDL_CUDA_ARCHS;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(pyfastdl, m) {
  m.def("build_info() -> str", &build_info);
}

// `import pyfastdl._C` loads this library, whose static initializers register the ops above; the
// module itself is empty (the ops are reached through torch.ops.pyfastdl).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
