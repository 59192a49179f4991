// The CPU's float32 multiply-add throughput with the SIMD capability in use (python -m pyfastdl bench:
// the report's "FMA peak" row, beside torch's matmul): a register-only loop of independent FMA chains,
// compiled once per capability like the other kernels (capability.h).
#pragma once

#include <cstdint>

#include "cpu/capability.h"

namespace pyfastdl {
namespace cpu {

struct PeakKernels {
  int64_t lanes;  // floats per vector of this capability
  // Runs iters steps of 12 independent vector FMA chains; returns a value derived from every chain
  // (so that the loop is not optimized away). Flops: 2 * 12 * lanes * iters.
  float (*fma_chains)(int64_t iters);
};

PYFASTDL_CPU_KERNELS(PeakKernels, peak_kernels)

}  // namespace cpu
}  // namespace pyfastdl
