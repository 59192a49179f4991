// Run-time choice of the SIMD translation units (csrc/cpu/*_kernel.cpp are compiled once per
// capability by setup.py). PYFASTDL_CPU_ARCH=default|avx2|avx512 forces one.
#pragma once

#include <cstdlib>
#include <string>

namespace pyfastdl {
namespace cpu {

enum class Capability { DEFAULT = 0, AVX2 = 1, AVX512 = 2 };

inline const char* capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512: return "AVX512";
    case Capability::AVX2: return "AVX2";
    default: return "DEFAULT";
  }
}

inline Capability detect_capability() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma"))
    return Capability::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Capability::AVX2;
#endif
  return Capability::DEFAULT;
}

// The capability in use: the best the CPU has, or a lower one forced by PYFASTDL_CPU_ARCH.
inline Capability capability() {
  static const Capability chosen = [] {
    Capability best = detect_capability();
    const char* env = std::getenv("PYFASTDL_CPU_ARCH");
    if (!env || !*env) return best;
    std::string s(env);
    for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    Capability want = s == "avx512" ? Capability::AVX512 : s == "avx2" ? Capability::AVX2 : Capability::DEFAULT;
    return static_cast<int>(want) <= static_cast<int>(best) ? want : best;
  }();
  return chosen;
}

}  // namespace cpu
}  // namespace pyfastdl
