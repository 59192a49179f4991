// The op cpu_fma_peak(): the float32 FMA throughput of all threads, in GFLOP/s, with the SIMD
// capability in use (csrc/cpu/peak_kernel.cpp) -- the hardware's compute limit, which torch's matmul
// (the report's "matmul peak") may not reach (MKL runs its AVX2 code on AMD CPUs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>

#include "cpu/peak_kernel.h"

namespace pyfastdl {
namespace {

// Best of `reps` runs of the loop on every thread at once (iters steps each, about 0.1 s at 200 GFLOP/s
// per thread for AVX-512); flops counted over all threads, time the slowest thread's.
double cpu_fma_peak(int64_t iters, int64_t reps) {
  TORCH_CHECK(iters > 0 && reps > 0, "cpu_fma_peak: expected iters > 0 and reps > 0, got ", iters, " and ", reps);
  const auto* k = cpu::peak_kernels();
  const int64_t threads = at::get_num_threads();
  std::atomic<float> sink{0.f};
  double best = 0;
  for (int64_t r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    at::parallel_for(0, threads, 1, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t) sink.store(sink.load() + k->fma_chains(iters));
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * 12 * k->lanes * iters * threads / s / 1e9);
  }
  TORCH_CHECK(sink.load() == sink.load(), "cpu_fma_peak: the loop's value is NaN");
  return best;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyfastdl, m) {
  // float32 FMA GFLOP/s of all torch threads with the CPU capability in use (best of reps)
  m.def("cpu_fma_peak(int iters=30000000, int reps=3) -> float", &cpu_fma_peak);
}

}  // namespace pyfastdl
