// Run-time choice of the SIMD translation units (csrc/cpu/*_kernel.cpp are compiled once per
// capability by setup.py). PYFASTDL_CPU_ARCH=default|avx2|avx512 forces one.
//
// The one home of CPU capability dispatch. A family with SIMD kernels writes a table of function
// pointers (struct FooKernels) and
//   in cpu/foo_kernel.h:    PYFASTDL_CPU_KERNELS(FooKernels, foo_kernels)
//                           -- declares foo_kernels_DEFAULT/_AVX2/_AVX512() and foo_kernels(), the
//                              table of the capability in use (the launcher calls this one);
//   in cpu/foo_kernel.cpp:  PYFASTDL_CPU_KERNELS_DEFINE(FooKernels, foo_kernels, CPU_CAPABILITY::kTable)
//                           -- after namespace CPU_CAPABILITY, inside pyfastdl::cpu: this
//                              capability's getter.
// Both sit in namespace pyfastdl::cpu.
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

// Whether the CPU runs AVX512_BF16 (vdpbf16ps); checked beside the capability by the kernels
// that have a bf16 path (the attention forward); PYFASTDL_CPU_ARCH below AVX512 leaves it unused.
inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") != 0;
  }();
  return has;
#else
  return false;
#endif
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

#define PYFASTDL_CPU_CAT_(a, b) a##b
#define PYFASTDL_CPU_CAT(a, b) PYFASTDL_CPU_CAT_(a, b)

#define PYFASTDL_CPU_KERNELS(Table, name)                                          \
  const Table* name##_DEFAULT();                                                   \
  const Table* name##_AVX2();                                                      \
  const Table* name##_AVX512();                                                    \
  inline const Table* name() {                                                     \
    static const Table* const chosen = [] {                                        \
      switch (::pyfastdl::cpu::capability()) {                                     \
        case ::pyfastdl::cpu::Capability::AVX512: return name##_AVX512();          \
        case ::pyfastdl::cpu::Capability::AVX2: return name##_AVX2();              \
        default: return name##_DEFAULT();                                          \
      }                                                                            \
    }();                                                                           \
    return chosen;                                                                 \
  }

#define PYFASTDL_CPU_KERNELS_DEFINE(Table, name, table) \
  const Table* PYFASTDL_CPU_CAT(name##_, CPU_CAPABILITY)() { return &(table); }
