// SIMD helpers shared by the conv2d kernel files (conv2d_kernel.cpp, conv2d_1x1_kernel.cpp). Include
// only from a *_kernel.cpp: each is compiled once per capability, and CPU_CAPABILITY names the
// namespace, so every capability gets its own copy.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace conv_simd {

// grad_bias of an NCHW grad_out g (N, C, P pixels): per channel, per image a vector sum of the plane,
// the images summed in float64 in order (deterministic whatever the thread count).
template <typename T>
inline void grad_bias_nchw(const T* g, int64_t N, int64_t C, int64_t P, T* gb) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t V = Vec::size();
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      double tot = 0;
      for (int64_t n = 0; n < N; ++n) {
        const T* s = g + (n * C + c) * P;
        Vec a0(T(0)), a1(T(0));
        int64_t j = 0;
        for (; j + 2 * V <= P; j += 2 * V) {
          a0 = a0 + Vec::loadu(s + j);
          a1 = a1 + Vec::loadu(s + j + V);
        }
        for (; j < P; j += V) a0 = a0 + Vec::loadu(s + j, static_cast<int>(std::min<int64_t>(V, P - j)));
        alignas(64) T buf[V];
        (a0 + a1).store(buf);
        for (int64_t l = 0; l < V; ++l) tot += static_cast<double>(buf[l]);
      }
      gb[c] = static_cast<T>(tot);
    }
  });
}

}  // namespace conv_simd
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace pyfastdl
