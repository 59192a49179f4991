// Flash-attention CPU launchers: validate (csrc/common/attention.h), lay q, k, v (and grad_out) out
// contiguously (in float32 for bfloat16 / float16), allocate, and run the SIMD kernels of the CPU's capability (attention_kernel.cpp).
// Registered under the CPU dispatch key; the schemas are in csrc/ops.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "common/attention.h"
#include "cpu/attention_kernel.h"

namespace pyfastdl {
namespace {

constexpr auto kernels = &cpu::attention_kernels;  // the table of the CPU's capability (cpu/capability.h)

// bfloat16 / float16 run the float32 kernel: q, k, v (and in the backward grad_out, out) are converted
// to contiguous float32 once per call, the products, softmax and sums are float32, and each output is
// rounded to the input dtype once at the end. The exception: bfloat16 on a CPU with AVX512_BF16 (even
// head dims, gemm mode auto) runs the bf16 kernels on the inputs as they are: bf16 block products with
// float32 sums and softmax (attention_kernel.cpp); the backward's gradients are float32 there too, and
// rounded once.
bool low_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

}  // namespace
namespace cpu {
int attention_gemm_mode();  // csrc/cpu/attention_gemm.cpp: 0 auto, 1 own, 2 blas
}  // namespace cpu
namespace {

// Whether the bf16 kernels run (the forward reads q's head dim; the backward also v's).
bool native_bf16(const at::Tensor& q, const at::Tensor& v) {
  return q.scalar_type() == at::kBFloat16 && kernels()->fwd_bf16 != nullptr && cpu::cpu_has_avx512_bf16() &&
         q.dim() == 4 && v.dim() == 4 && q.size(3) % 2 == 0 && cpu::attention_gemm_mode() == 0;  // (prepare checks)
}

at::Tensor as_kernel_dtype(const at::Tensor& t) {
  if (!low_precision(t.scalar_type())) return t.contiguous();
  return t.to(t.options().dtype(at::kFloat), /*non_blocking=*/false, /*copy=*/false, at::MemoryFormat::Contiguous);
}

// The arguments both ops share, checked and laid out; the tensors are kept alive here.
struct Prepared {
  at::Tensor q, k, v, mask, valid_lens;
  cpu::AttnArgs a;
};

Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& valid_lens,
                 bool is_causal, double scale, double dropout_p, int64_t seed, int64_t offset, bool keep_bf16 = false) {
  attention::check(op, q, k, v, attn_mask, valid_lens, dropout_p);
  TORCH_CHECK(q.device().is_cpu(), op, ": the CPU kernel got q on ", q.device());
  const at::ScalarType dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": the CPU kernel takes float32, float64, bfloat16 or float16 q, k, v; got ", dt);
  Prepared p;
  p.q = keep_bf16 ? q.contiguous() : as_kernel_dtype(q);
  p.k = keep_bf16 ? k.contiguous() : as_kernel_dtype(k);
  p.v = keep_bf16 ? v.contiguous() : as_kernel_dtype(v);
  cpu::AttnArgs& a = p.a;
  a.B = q.size(0), a.Hq = q.size(1), a.L = q.size(2), a.E = q.size(3);
  a.Hk = k.size(1), a.S = k.size(2), a.Ev = v.size(3);
  a.scale = scale, a.causal = is_causal, a.dropout_p = dropout_p;
  a.seed = static_cast<uint64_t>(seed), a.offset = static_cast<uint64_t>(offset);
  a.q = p.q.const_data_ptr(), a.k = p.k.const_data_ptr(), a.v = p.v.const_data_ptr();
  if (attn_mask.has_value() && attn_mask->defined()) {
    p.mask = *attn_mask;
    const at::ScalarType mt = p.mask.scalar_type();
    if (mt != at::kBool && mt != at::kFloat && mt != at::kDouble) p.mask = p.mask.to(at::kFloat);  // a float16 mask
    a.mask_kind = p.mask.scalar_type() == at::kBool    ? cpu::MaskKind::BOOL
                  : p.mask.scalar_type() == at::kFloat ? cpu::MaskKind::FLOAT32
                                                       : cpu::MaskKind::FLOAT64;
    a.mask = p.mask.const_data_ptr();
    for (int d = 0; d < 4; ++d) a.mask_stride[d] = p.mask.stride(d);
  }
  if (valid_lens.has_value() && valid_lens->defined()) {
    p.valid_lens = valid_lens->to(at::kLong).contiguous();
    a.valid_lens = p.valid_lens.const_data_ptr<int64_t>();
    a.valid_lens_dim = static_cast<int>(p.valid_lens.dim());
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const c10::optional<at::Tensor>& attn_mask,
                                                     const c10::optional<at::Tensor>& valid_lens, bool is_causal,
                                                     double scale, double dropout_p, int64_t seed, int64_t offset) {
  const bool bf16 = native_bf16(q, v);
  Prepared p = prepare("attention_fwd", q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed, offset, bf16);
  at::Tensor out = at::empty({p.a.B, p.a.Hq, p.a.L, p.a.Ev}, p.q.options());  // float32 for bf16 / fp16 (not native)
  at::Tensor lse = at::empty({p.a.B, p.a.Hq, p.a.L}, q.options().dtype(attention::lse_dtype(q.scalar_type())));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out.to(q.scalar_type()), lse};
  }
  p.a.out = out.data_ptr();
  p.a.lse = lse.data_ptr();
  if (p.a.S == 0) {  // no key at all: every row is fully masked
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out.zero_().to(q.scalar_type()), lse};
  }
  if (bf16) kernels()->fwd_bf16(p.a);
  else if (q.scalar_type() == at::kDouble) kernels()->fwd_double(p.a);
  else kernels()->fwd_float(p.a);
  return {low_precision(q.scalar_type()) && !bf16 ? out.to(q.scalar_type()) : out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& valid_lens,
    bool is_causal, double scale, double dropout_p, int64_t seed, int64_t offset, std::array<bool, 4> output_mask) {
  attention::check_output_mask("attention_bwd", attn_mask, output_mask);
  const bool bf16 = native_bf16(q, v) && v.size(3) % 2 == 0;
  Prepared p = prepare("attention_bwd", q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed, offset, bf16);
  attention::check_bwd_tensors("attention_bwd", grad_out, out, lse, q, v);
  const at::Tensor g = bf16 ? grad_out.contiguous() : as_kernel_dtype(grad_out);
  const at::Tensor o = bf16 ? out.contiguous() : as_kernel_dtype(out), l = lse.contiguous();
  const at::TensorOptions opts = p.q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  // Gradients not asked for are empty (0,) tensors. When the kernel runs, grad_q and grad_mask start
  // at zero (skipped blocks and the dQ sum of csrc/cpu/attention_kernel.cpp rely on it), while
  // grad_k and grad_v are written whole (every key block is copied out); otherwise all are zero.
  const bool runs = p.a.B * p.a.Hq * p.a.L > 0 && p.a.S > 0 && p.a.Ev > 0;
  const auto grad = [&](bool need, const at::Tensor& like, bool zero) {  // float32 / float64, like's shape
    if (!need) return at::empty({0}, opts);
    return zero ? at::zeros(like.sizes(), opts) : at::empty(like.sizes(), opts);
  };
  at::Tensor gq = grad(output_mask[0], p.q, true), gk = grad(output_mask[1], p.k, !runs),
             gv = grad(output_mask[2], p.v, !runs);
  at::Tensor gm = output_mask[3] ? at::zeros({p.a.B, p.a.Hq, p.a.L, p.a.S}, opts) : at::empty({0}, opts);
  const bool any = gq.numel() > 0 || gk.numel() > 0 || gv.numel() > 0 || gm.numel() > 0;
  if (any && runs) {
    p.a.out = const_cast<void*>(o.const_data_ptr());
    p.a.lse = const_cast<void*>(l.const_data_ptr());
    p.a.grad_out = g.const_data_ptr();
    p.a.grad_q = gq.numel() > 0 ? gq.data_ptr() : nullptr;
    p.a.grad_k = gk.numel() > 0 ? gk.data_ptr() : nullptr;
    p.a.grad_v = gv.numel() > 0 ? gv.data_ptr() : nullptr;
    p.a.grad_mask = gm.numel() > 0 ? gm.data_ptr() : nullptr;
    if (bf16) kernels()->bwd_bf16(p.a);
    else if (q.scalar_type() == at::kDouble) kernels()->bwd_double(p.a);
    else kernels()->bwd_float(p.a);
  }
  // the mask's gradient in the mask's dtype (a float32 mask on float64 q, say)
  if (output_mask[3] && gm.scalar_type() != attn_mask->scalar_type()) gm = gm.to(attn_mask->scalar_type());
  if (low_precision(q.scalar_type())) {  // float32 gradients, rounded once
    gq = gq.to(q.scalar_type()), gk = gk.to(q.scalar_type()), gv = gv.to(q.scalar_type());
    if (!output_mask[3]) gm = gm.to(q.scalar_type());
  }
  return {gq, gk, gv, gm};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace pyfastdl
