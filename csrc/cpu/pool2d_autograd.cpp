// pyfastdl::max_pool2d and pyfastdl::avg_pool2d: the pooling forwards with their derivatives
// registered in C++ under the Autograd dispatch key, so that a forward+backward of the C++ backends
// (cpu, cuda) runs no Python after the call itself (as pyfastdl::conv2d, csrc/cpu/conv2d_autograd.cpp;
// docs/architecture.md, "Per-call cost"). The Triton backend keeps the Python autograd Functions
// (pyfastdl/autograd/pool2d.py).
//
// The ops reach max_pool2d_fwd/_bwd and avg_pool2d_fwd/_bwd through the dispatcher, so one
// registration serves CPU and CUDA tensors alike. max_pool2d's forward computes the indices only
// when a gradient is wanted. backward(create_graph=True) runs pyfastdl::max_pool2d_bwd_graph /
// avg_pool2d_bwd_graph (Python, CompositeImplicitAutograd: the Python Functions, whose backwards are
// linear in grad_out), so the gradient carries its own graph.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

namespace pyfastdl {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using OptInt = c10::optional<int64_t>;
using IntRef = at::IntArrayRef;

Tensor2 call_max_fwd(const at::Tensor& input, IntRef k, IntRef s, IntRef p, IntRef d, bool ceil_mode, bool need_idx) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastdl::max_pool2d_fwd", "")
                             .typed<Tensor2(const at::Tensor&, IntRef, IntRef, IntRef, IntRef, bool, bool)>();
  return op.call(input, k, s, p, d, ceil_mode, need_idx);
}

at::Tensor call_avg_fwd(const at::Tensor& input, IntRef k, IntRef s, IntRef p, bool ceil_mode, bool count_include_pad,
                        OptInt divisor) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastdl::avg_pool2d_fwd", "")
                             .typed<at::Tensor(const at::Tensor&, IntRef, IntRef, IntRef, bool, bool, OptInt)>();
  return op.call(input, k, s, p, ceil_mode, count_include_pad, divisor);
}

// True when backward(create_graph=True) asks for a gradient with a graph of its own.
bool wants_graph(const at::Tensor& grad_out, const at::Tensor& input) {
  return torch::autograd::GradMode::is_enabled() && (grad_out.requires_grad() || input.requires_grad());
}

// The window of a call, kept by its node.
struct Window {
  std::vector<int64_t> k, s, p;
  bool ceil_mode = false;
  void set(IntRef k_, IntRef s_, IntRef p_, bool ceil_mode_) {
    k = k_.vec();
    s = s_.vec();
    p = p_.vec();
    ceil_mode = ceil_mode_;
  }
};

// The graph node of one max_pool2d call: input -> out (its indices saved).
struct MaxPool2dBackward final : torch::autograd::Node {
  SavedVariable input_, indices_;
  Window w_;
  std::vector<int64_t> dilation_;

  std::string name() const override { return "pyfastdl::MaxPool2dBackward"; }

  void release_variables() override {
    input_.reset_data();
    indices_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list res(1);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined() || !task_should_compute_output(0)) return res;
    const at::Tensor input = input_.unpack(), idx = indices_.unpack();
    using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, IntRef, IntRef, IntRef, IntRef, bool);
    if (wants_graph(grad_out, input)) {
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pyfastdl::max_pool2d_bwd_graph", "").typed<Sig>();
      res[0] = op.call(grad_out, input, idx, w_.k, w_.s, w_.p, dilation_, w_.ceil_mode);
    } else {
      at::AutoGradMode no_grad(false);
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pyfastdl::max_pool2d_bwd", "").typed<Sig>();
      res[0] = op.call(grad_out, input, idx, w_.k, w_.s, w_.p, dilation_, w_.ceil_mode);
    }
    return res;
  }
};

// The graph node of one avg_pool2d call: input -> out.
struct AvgPool2dBackward final : torch::autograd::Node {
  SavedVariable input_;
  Window w_;
  bool count_include_pad_ = true;
  OptInt divisor_;

  std::string name() const override { return "pyfastdl::AvgPool2dBackward"; }

  void release_variables() override { input_.reset_data(); }

  variable_list apply(variable_list&& grads) override {
    variable_list res(1);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined() || !task_should_compute_output(0)) return res;
    const at::Tensor input = input_.unpack();
    using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, IntRef, IntRef, IntRef, bool, bool, OptInt);
    if (wants_graph(grad_out, input)) {
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pyfastdl::avg_pool2d_bwd_graph", "").typed<Sig>();
      res[0] = op.call(grad_out, input, w_.k, w_.s, w_.p, w_.ceil_mode, count_include_pad_, divisor_);
    } else {
      at::AutoGradMode no_grad(false);
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pyfastdl::avg_pool2d_bwd", "").typed<Sig>();
      res[0] = op.call(grad_out, input, w_.k, w_.s, w_.p, w_.ceil_mode, count_include_pad_, divisor_);
    }
    return res;
  }
};

void check_no_forward_ad(const at::Tensor& input, const char* op) {
  TORCH_CHECK(!torch::autograd::isFwGradDefined(input), "pyfastdl.", op, ": forward-mode AD is not supported");
}

// Autograd kernels: the forward below autograd and, when a gradient is wanted, a node on the output.
at::Tensor max_pool2d_autograd(const at::Tensor& input, IntRef k, IntRef s, IntRef p, IntRef d, bool ceil_mode) {
  check_no_forward_ad(input, "max_pool2d");
  const bool need_grad = torch::autograd::compute_requires_grad(input);
  Tensor2 res;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    res = call_max_fwd(input, k, s, p, d, ceil_mode, need_grad);
  }
  at::Tensor& out = std::get<0>(res);
  if (!need_grad) return out;
  auto node = c10::make_intrusive<MaxPool2dBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  node->input_ = SavedVariable(input, false);
  node->indices_ = SavedVariable(std::get<1>(res), false);
  node->w_.set(k, s, p, ceil_mode);
  node->dilation_ = d.vec();
  torch::autograd::set_history(out, node);
  return out;
}

at::Tensor avg_pool2d_autograd(const at::Tensor& input, IntRef k, IntRef s, IntRef p, bool ceil_mode,
                               bool count_include_pad, OptInt divisor) {
  check_no_forward_ad(input, "avg_pool2d");
  const bool need_grad = torch::autograd::compute_requires_grad(input);
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call_avg_fwd(input, k, s, p, ceil_mode, count_include_pad, divisor);
  }
  if (!need_grad) return out;
  auto node = c10::make_intrusive<AvgPool2dBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  node->input_ = SavedVariable(input, false);
  node->w_.set(k, s, p, ceil_mode);
  node->count_include_pad_ = count_include_pad;
  node->divisor_ = divisor;
  torch::autograd::set_history(out, node);
  return out;
}

// Below autograd (inference mode, or a caller that excluded the Autograd keys): the forward alone.
at::Tensor max_pool2d_no_grad(const at::Tensor& input, IntRef k, IntRef s, IntRef p, IntRef d, bool ceil_mode) {
  return std::get<0>(call_max_fwd(input, k, s, p, d, ceil_mode, false));
}

at::Tensor avg_pool2d_no_grad(const at::Tensor& input, IntRef k, IntRef s, IntRef p, bool ceil_mode,
                              bool count_include_pad, OptInt divisor) {
  return call_avg_fwd(input, k, s, p, ceil_mode, count_include_pad, divisor);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastdl, Autograd, m) {
  m.impl("max_pool2d", &max_pool2d_autograd);
  m.impl("avg_pool2d", &avg_pool2d_autograd);
}

// One function for both devices: it reaches the device's kernels through the dispatcher.
TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("max_pool2d", &max_pool2d_no_grad);
  m.impl("avg_pool2d", &avg_pool2d_no_grad);
}

TORCH_LIBRARY_IMPL(pyfastdl, CUDA, m) {
  m.impl("max_pool2d", &max_pool2d_no_grad);
  m.impl("avg_pool2d", &avg_pool2d_no_grad);
}

}  // namespace pyfastdl
