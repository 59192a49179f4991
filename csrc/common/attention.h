// Scaled dot-product attention: the ops' contract (the schemas go into csrc/ops.cpp once both the CPU
// and the CUDA kernels exist) and the argument checks shared by the CPU and CUDA launchers.
//
//   attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? valid_lens, bool is_causal,
//                 float scale, float dropout_p, int seed, int offset) -> (Tensor out, Tensor lse)
//   attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
//                 Tensor? attn_mask, Tensor? valid_lens, bool is_causal, float scale, float dropout_p,
//                 int seed, int offset, bool[4] output_mask=[True, True, True, False])
//                 -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_attn_mask)
//   output_mask says which of the four gradients to compute; one not asked for comes back as an
//   empty (0,) tensor. grad_attn_mask (B, Hq, L, S) contiguous, in attn_mask's dtype: dL/d(attn_mask)
//   = dS = P (dP - delta) (the mask is added to the scaled scores), only for a float attn_mask; the
//   caller sums it over the dimensions it broadcast.
//
// Shapes: q (B, Hq, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), Hq % Hk == 0: query head h reads key/value
// head h / (Hq / Hk) (grouped-query attention; grad_k, grad_v sum over the group). Any strides (the
// last dimension need not be contiguous; kernels may copy). out (B, Hq, L, Ev) in q's dtype, lse
// (B, Hq, L) float32 (float64 for float64 q): log(sum_j exp(s_ij)) of the masked, scaled scores
// s_ij = scale * q_i . k_j (+ mask).
// Masks (a key j takes part in query i's softmax when all of these allow it):
//   attn_mask: None, or bool (True = takes part) or float (added to s_ij, the dtype of q or float32),
//     shape (B, Hq, L, S) with any strides (the caller expands a broadcastable mask: stride 0 where
//     broadcast);
//   is_causal: j <= i (top-left aligned, as torch: tril of ones(L, S));
//   valid_lens: None, or int64 (B,) or (B, L) (the notes' masked_softmax): j < valid_lens[b] (or
//     [b, i]). A row whose valid length is 0 (or less) gives every key the same weight: the notes fill
//     masked scores with -1e6, so all its scores are equal and it averages the values. The kernels
//     replace that row's scores scale * q_i . k_j by 0 (then attn_mask and is_causal apply as usual);
//     being constant, they pass no gradient to q and k (dS = 0 on that row).
// A query row with no key left (attn_mask / is_causal): out = 0, lse = -inf, its gradients 0 (torch
// 2.14's behaviour for fully masked rows).
// NaN and Inf propagate as in torch's math SDPA (softmax(scale q k^T + bias) v with bias = -inf at
// masked keys): masks *add* -inf (a NaN score stays NaN even at a masked key, +inf + -inf is NaN),
// a NaN in a float mask makes its row NaN, and P v sums over every key (0 * inf = NaN), so a row sees
// the non-finite values of keys it does not attend to. valid_lens (the notes' fill) *replaces* the
// scores past the length. The kernels skip blocks that causal / valid_lens mask only when no
// non-finite value could reach the result (one known difference: finite q, k whose dot product
// overflows to +inf at a skipped key).
// Empty sizes: E = 0 gives scores 0 (out = the mean of v over the keys a row sees, as torch); B, H,
// L, S or Ev = 0 give empty or zero results and zero gradients.
// Dropout (dropout_p in [0, 1)): after the softmax, p_ij is kept with probability 1 - dropout_p and
// scaled by 1 / (1 - dropout_p). The keep decision is a pure function of (seed, offset, b, h, i, j)
// through Philox-4x32-10 (key = (seed & 0xffffffff, seed >> 32); counter = (offset + linear index (((b * Hq + h) * L + i) * S + j)
// as 64 bits in two words, 0, 0); uniform = first output word * 2^-32; keep if uniform >= dropout_p),
// so the backward regenerates the forward's mask. lse is the log-sum-exp before dropout.
// Forward and backward are tiled (FlashAttention-2): blocks of queries against blocks of keys, a
// running max and sum, memory O(L * E) -- the (L, S) score matrix is never materialized.
#pragma once

#include <ATen/ATen.h>

#include <array>

namespace pyfastdl {
namespace attention {

// lse's dtype: float64 for float64 q, float32 otherwise.
inline at::ScalarType lse_dtype(at::ScalarType q) { return q == at::kDouble ? at::kDouble : at::kFloat; }

// Every check of the contract above, before any output is allocated or written.
inline void check(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& valid_lens,
                  double dropout_p) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op, ": expected q, k, v of 4 dimensions (B, H, L, E), got ",
              q.dim(), ", ", k.dim(), " and ", v.dim());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": expected q, k, v of one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": expected q, k, v on one device, got ",
              q.device(), ", ", k.device(), " and ", v.device());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": batch sizes differ: q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.size(3) == k.size(3), op, ": q and k must have the same head dim (last dimension), got ", q.size(3),
              " and ", k.size(3));
  TORCH_CHECK(k.size(2) == v.size(2), op, ": k and v must have the same sequence length, got ", k.size(2), " and ",
              v.size(2));
  TORCH_CHECK(k.size(1) == v.size(1) && (k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0), op,
              ": the number of query heads (", q.size(1), ") must be a multiple of the key/value heads (", k.size(1),
              ", ", v.size(1), ")");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    const std::vector<int64_t> want{q.size(0), q.size(1), q.size(2), k.size(2)};
    TORCH_CHECK(m.sizes() == at::IntArrayRef(want), op, ": expected attn_mask expanded to (B, Hq, L, S) = ",
                at::IntArrayRef(want), ", got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), op,
                ": attn_mask must be bool or floating point, got ", m.scalar_type());
    TORCH_CHECK(m.device() == q.device(), op, ": attn_mask is on ", m.device(), " but q is on ", q.device());
  }
  if (valid_lens.has_value() && valid_lens->defined()) {
    const at::Tensor& vl = *valid_lens;
    TORCH_CHECK(!at::isFloatingType(vl.scalar_type()) && vl.scalar_type() != at::kBool, op,
                ": valid_lens must be an integer tensor, got ", vl.scalar_type());
    TORCH_CHECK((vl.dim() == 1 && vl.size(0) == q.size(0)) ||
                    (vl.dim() == 2 && vl.size(0) == q.size(0) && vl.size(1) == q.size(2)),
                op, ": expected valid_lens of shape (B,) = (", q.size(0), ",) or (B, L) = (", q.size(0), ", ",
                q.size(2), "), got ", vl.sizes());
    TORCH_CHECK(vl.device() == q.device(), op, ": valid_lens is on ", vl.device(), " but q is on ", q.device());
  }
}

// output_mask[3] (the attn_mask gradient) needs a floating-point attn_mask.
inline void check_output_mask(const char* op, const c10::optional<at::Tensor>& attn_mask,
                              const std::array<bool, 4>& output_mask) {
  TORCH_CHECK(!output_mask[3] || (attn_mask.has_value() && attn_mask->defined() &&
                                  at::isFloatingType(attn_mask->scalar_type())),
              op, ": output_mask[3] asks for the gradient of attn_mask, which needs a floating-point attn_mask, got ",
              attn_mask.has_value() && attn_mask->defined() ? c10::toString(attn_mask->scalar_type()) : "none");
}

}  // namespace attention
}  // namespace pyfastdl

#include <vector>

namespace pyfastdl {
namespace attention {

// The backward's extra tensors: grad_out and out (B, Hq, L, Ev) in q's dtype, lse (B, Hq, L) in lse_dtype.
inline void check_bwd_tensors(const char* op, const at::Tensor& grad_out, const at::Tensor& out,
                              const at::Tensor& lse, const at::Tensor& q, const at::Tensor& v) {
  const std::vector<int64_t> o_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(o_shape), op, ": expected grad_out of shape ",
              at::IntArrayRef(o_shape), ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(o_shape), op, ": expected out of shape ",
              at::IntArrayRef(o_shape), ", got ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": expected grad_out and out of q's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(),
              " and ", out.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                  lse.size(2) == q.size(2),
              op, ": expected lse of shape (B, Hq, L) = (", q.size(0), ", ", q.size(1), ", ", q.size(2),
              "), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q.scalar_type()), op, ": expected lse of dtype ", lse_dtype(q.scalar_type()),
              ", got ", lse.scalar_type());
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(), op,
              ": expected grad_out, out and lse on q's device ", q.device());
}

}  // namespace attention
}  // namespace pyfastdl
