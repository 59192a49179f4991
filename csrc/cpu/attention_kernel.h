// Flash-attention CPU kernels, one table per SIMD capability (attention_kernel.cpp is compiled once
// per capability; attention.cpp validates, lays the tensors out and picks the table at run time).
// Semantics: csrc/common/attention.h. Kernels trust their arguments: q, k, v, out, grad_out are
// contiguous (B, H, L or S, E or Ev) arrays of T; masks are read through their strides.
#pragma once

#include <cstdint>

#include "cpu/capability.h"

namespace pyfastdl {
namespace cpu {

enum class MaskKind { NONE, BOOL, FLOAT32, FLOAT64 };

struct AttnArgs {
  int64_t B = 0, Hq = 0, Hk = 0, L = 0, S = 0, E = 0, Ev = 0;
  double scale = 1;
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  void* out = nullptr;          // (B, Hq, L, Ev), fwd output / bwd input
  void* lse = nullptr;          // (B, Hq, L) of T (float32 / float64), fwd output / bwd input
  MaskKind mask_kind = MaskKind::NONE;
  const void* mask = nullptr;   // (B, Hq, L, S) through mask_stride
  int64_t mask_stride[4] = {0, 0, 0, 0};
  const int64_t* valid_lens = nullptr;  // (B,) or (B, L)
  int valid_lens_dim = 0;               // 0 (none), 1 or 2
  bool causal = false;
  double dropout_p = 0;
  uint64_t seed = 0, offset = 0;
  // backward: a gradient pointer that is null is not computed (the op's output_mask)
  const void* grad_out = nullptr;       // (B, Hq, L, Ev)
  void *grad_q = nullptr, *grad_k = nullptr, *grad_v = nullptr;  // (B, Hq, L, E), (B, Hk, S, E), (B, Hk, S, Ev)
  void* grad_mask = nullptr;            // (B, Hq, L, S) contiguous T, zeroed: dL/d(attn_mask) = dS
};

struct AttentionKernels {
  void (*fwd_float)(const AttnArgs& a);
  void (*fwd_double)(const AttnArgs& a);
  // bfloat16 q, k, v, out with bf16 block products (AVX512_BF16 dot products, float32 sums and softmax):
  // null where the capability has none (DEFAULT, AVX2); call only when cpu_has_avx512_bf16() and E is even.
  void (*fwd_bf16)(const AttnArgs& a);
  void (*bwd_float)(const AttnArgs& a);
  void (*bwd_double)(const AttnArgs& a);
  // bfloat16 q, k, v, out, grad_out; float32 gradients (bf16 block products, as fwd_bf16): null where the
  // capability has none; call only when cpu_has_avx512_bf16() and E, Ev are even.
  void (*bwd_bf16)(const AttnArgs& a);
};

PYFASTDL_CPU_KERNELS(AttentionKernels, attention_kernels)

// Philox-4x32-10 (Random123), first output word, key = (seed lo, seed hi), counter = (ctr lo, ctr hi, 0, 0).
inline uint32_t philox_first_word(uint64_t seed, uint64_t ctr) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return c0;
}

// Dropout keeps element (b, h, i, j) when this is true (csrc/common/attention.h).
inline bool dropout_keep(uint64_t seed, uint64_t offset, uint64_t linear_index, double p) {
  return static_cast<double>(philox_first_word(seed, offset + linear_index)) * 2.3283064365386963e-10 >= p;
}

}  // namespace cpu
}  // namespace pyfastdl
