// The FMA loop of csrc/cpu/peak_kernel.h for one SIMD capability.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu/peak_kernel.h"

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using V = at::vec::Vectorized<float>;

float fma_chains(int64_t iters) {
  // 12 chains: enough independent FMAs to cover two FMA pipes x 4-6 cycles of latency
  V a0(1.0f), a1(1.1f), a2(1.2f), a3(1.3f), a4(1.4f), a5(1.5f), a6(1.6f), a7(1.7f), a8(1.8f), a9(1.9f), a10(2.0f),
      a11(2.1f);
  const V b(0.999999f), c(1e-7f);
  for (int64_t i = 0; i < iters; ++i) {
    a0 = at::vec::fmadd(a0, b, c);
    a1 = at::vec::fmadd(a1, b, c);
    a2 = at::vec::fmadd(a2, b, c);
    a3 = at::vec::fmadd(a3, b, c);
    a4 = at::vec::fmadd(a4, b, c);
    a5 = at::vec::fmadd(a5, b, c);
    a6 = at::vec::fmadd(a6, b, c);
    a7 = at::vec::fmadd(a7, b, c);
    a8 = at::vec::fmadd(a8, b, c);
    a9 = at::vec::fmadd(a9, b, c);
    a10 = at::vec::fmadd(a10, b, c);
    a11 = at::vec::fmadd(a11, b, c);
  }
  const V s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11));
  float out[V::size()];
  s.store(out);
  float total = 0;
  for (int i = 0; i < V::size(); ++i) total += out[i];
  return total;
}

const PeakKernels kTable{V::size(), &fma_chains};

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(PeakKernels, peak_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
