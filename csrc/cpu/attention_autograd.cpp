// pyfastdl::attention: attention_fwd with its derivative (attention_bwd) registered in C++, under the
// Autograd dispatch key, so that a forward+backward of the C++ backends (cpu, cuda) runs no Python
// after the call itself (as pyfastdl::batch_norm, csrc/cpu/batch_norm_autograd.cpp; docs/architecture.md,
// "Per-call cost"). The Triton backend keeps the Python autograd Function (pyfastdl/autograd/attention.py).
//
// The op reaches attention_fwd / attention_bwd through the dispatcher, so one registration serves CPU
// and CUDA tensors alike (the kernels are csrc/cpu/attention.cpp and csrc/cuda/attention.cu).
// Differentiable inputs: q, k, v and a floating-point attn_mask (its gradient is attention_bwd's
// grad_attn_mask, (B, Hq, L, S); autograd sums it over what the caller broadcast with expand).
// backward(create_graph=True) runs pyfastdl::attention_bwd_graph (Python, CompositeImplicitAutograd:
// the reference math differentiated by autograd), so the gradients carry their own graph.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace pyfastdl {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptT = c10::optional<at::Tensor>;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Tensor2 call_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& attn_mask,
                 const OptT& valid_lens, bool is_causal, double scale, double dropout_p, int64_t seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastdl::attention_fwd", "")
                             .typed<Tensor2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                                            const OptT&, bool, double, double, int64_t, int64_t)>();
  return op.call(q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed, 0);
}

OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : c10::nullopt; }

// The one call of attention_bwd: `mask` says which of (grad_q, grad_k, grad_v, grad_attn_mask) the
// graph needs; the others are not computed.
Tensor4 call_bwd(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& out, const at::Tensor& lse, const at::Tensor& attn_mask,
                 const at::Tensor& valid_lens, bool is_causal, double scale, double dropout_p, int64_t seed,
                 std::array<bool, 4> mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyfastdl::attention_bwd", "")
          .typed<Tensor4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const OptT&, const OptT&, bool, double, double,
                         int64_t, int64_t, std::array<bool, 4>)>();
  return op.call(grad_out, q, k, v, out, lse, opt(attn_mask), opt(valid_lens), is_causal, scale, dropout_p, seed, 0,
                 mask);
}

// create_graph=True: the same gradients as differentiable functions of their inputs.
Tensor4 call_bwd_graph(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& attn_mask, const at::Tensor& valid_lens, bool is_causal, double scale,
                       double dropout_p, std::array<bool, 4> mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyfastdl::attention_bwd_graph", "")
          .typed<Tensor4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                         const OptT&, bool, double, double, std::array<bool, 4>)>();
  return op.call(grad_out, q, k, v, opt(attn_mask), opt(valid_lens), is_causal, scale, dropout_p, mask);
}

// The graph node of one attention call: inputs (q, k, v, attn_mask) -> out.
struct AttentionBackward final : torch::autograd::Node {
  SavedVariable q_, k_, v_, out_, lse_, mask_, valid_lens_;
  bool causal_ = false;
  double scale_ = 1.0, dropout_p_ = 0.0;
  int64_t seed_ = 0;

  std::string name() const override { return "pyfastdl::AttentionBackward"; }

  void release_variables() override {
    q_.reset_data();
    k_.reset_data();
    v_.reset_data();
    out_.reset_data();
    lse_.reset_data();
    mask_.reset_data();
    valid_lens_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor attn_mask = mask_.unpack();
    const bool float_mask = attn_mask.defined() && at::isFloatingType(attn_mask.scalar_type());
    const std::array<bool, 4> mask = {task_should_compute_output(0), task_should_compute_output(1),
                                      task_should_compute_output(2), float_mask && task_should_compute_output(3)};
    variable_list res(4);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return res;
    const at::Tensor q = q_.unpack(), k = k_.unpack(), v = v_.unpack(), vl = valid_lens_.unpack();
    const bool graph = torch::autograd::GradMode::is_enabled() &&  // create_graph=True
                       (grad_out.requires_grad() || q.requires_grad() || k.requires_grad() || v.requires_grad() ||
                        (float_mask && attn_mask.requires_grad()));
    Tensor4 g;
    if (graph) {
      g = call_bwd_graph(grad_out, q, k, v, attn_mask, vl, causal_, scale_, dropout_p_, mask);
    } else {
      // Below autograd: the kernel op has no autograd formula of its own (it would otherwise go through
      // autograd's boxed not-implemented fallback).
      at::AutoGradMode no_grad(false);
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      g = call_bwd(grad_out.contiguous(), q, k, v, out_.unpack(getptr()), lse_.unpack(), attn_mask, vl,
                   causal_, scale_, dropout_p_, seed_, mask);
    }
    if (mask[0]) res[0] = std::move(std::get<0>(g));
    if (mask[1]) res[1] = std::move(std::get<1>(g));
    if (mask[2]) res[2] = std::move(std::get<2>(g));
    if (mask[3]) res[3] = std::move(std::get<3>(g));
    return res;
  }
};

// Autograd kernel: runs the forward below autograd and, when a gradient is wanted, attaches an
// AttentionBackward node to the output. A bool mask never requires grad; a float one may.
at::Tensor attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& attn_mask,
                              const OptT& valid_lens, bool is_causal, double scale, double dropout_p, int64_t seed) {
  const bool need_grad = torch::autograd::compute_requires_grad(q, k, v, attn_mask);
  TORCH_CHECK(!torch::autograd::isFwGradDefined(q) && !torch::autograd::isFwGradDefined(k) &&
                  !torch::autograd::isFwGradDefined(v) && !torch::autograd::isFwGradDefined(attn_mask),
              "pyfastdl.scaled_dot_product_attention: forward-mode AD is not supported");
  Tensor2 r;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    r = call_fwd(q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed);
  }
  at::Tensor& out = std::get<0>(r);
  if (!need_grad) return out;
  const at::Tensor m = attn_mask.has_value() ? *attn_mask : at::Tensor();
  auto node = c10::make_intrusive<AttentionBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(q, k, v, m));
  node->q_ = SavedVariable(q, false);
  node->k_ = SavedVariable(k, false);
  node->v_ = SavedVariable(v, false);
  node->lse_ = SavedVariable(std::get<1>(r), false);
  node->mask_ = SavedVariable(m, false);
  node->valid_lens_ = SavedVariable(valid_lens.has_value() ? *valid_lens : at::Tensor(), false);
  node->causal_ = is_causal;
  node->scale_ = scale;
  node->dropout_p_ = dropout_p;
  node->seed_ = seed;
  torch::autograd::set_history(out, node);
  node->out_ = SavedVariable(out, true);  // an output of the node: saved after set_history, no cycle
  return out;
}

// Below autograd (inference mode, or a caller that excluded the Autograd keys): the forward alone.
at::Tensor attention_no_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& attn_mask,
                             const OptT& valid_lens, bool is_causal, double scale, double dropout_p, int64_t seed) {
  return std::get<0>(call_fwd(q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastdl, Autograd, m) {
  m.impl("attention", &attention_autograd);
}

// One function for both devices: it reaches the device's attention_fwd through the dispatcher.
TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("attention", &attention_no_grad);
}

TORCH_LIBRARY_IMPL(pyfastdl, CUDA, m) {
  m.impl("attention", &attention_no_grad);
}

}  // namespace pyfastdl
