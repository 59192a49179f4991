// pyfastdl::conv2d: conv2d_fwd with its derivative (conv2d_bwd) registered in C++, under the Autograd
// dispatch key, so that a forward+backward of the C++ backends (cpu, cuda) runs no Python after the
// call itself (as pyfastdl::attention, csrc/cpu/attention_autograd.cpp; docs/architecture.md,
// "Per-call cost"). The Triton backend keeps the Python autograd Function (pyfastdl/autograd/conv2d.py).
//
// The op reaches conv2d_fwd / conv2d_bwd through the dispatcher, so one registration serves CPU and
// CUDA tensors alike. backward asks conv2d_bwd only for the gradients the graph needs.
// backward(create_graph=True) runs pyfastdl::conv2d_bwd_graph (Python, CompositeImplicitAutograd: the
// reference math differentiated by autograd), so the gradients carry their own graph.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

namespace pyfastdl {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using OptT = c10::optional<at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

at::Tensor call_fwd(const at::Tensor& input, const at::Tensor& weight, const OptT& bias, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastdl::conv2d_fwd", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, at::IntArrayRef,
                                               at::IntArrayRef, at::IntArrayRef, int64_t)>();
  return op.call(input, weight, bias, stride, padding, dilation, groups);
}

using BwdSig = Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                       at::IntArrayRef, int64_t, std::array<bool, 3>);

// The graph node of one conv2d call: inputs (input, weight, bias) -> out.
struct Conv2dBackward final : torch::autograd::Node {
  SavedVariable input_, weight_;
  std::vector<int64_t> stride_, padding_, dilation_;
  int64_t groups_ = 1;
  bool has_bias_ = false;

  std::string name() const override { return "pyfastdl::Conv2dBackward"; }

  void release_variables() override {
    input_.reset_data();
    weight_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const std::array<bool, 3> mask = {task_should_compute_output(0), task_should_compute_output(1),
                                      has_bias_ && task_should_compute_output(2)};
    variable_list res(3);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined() || !(mask[0] || mask[1] || mask[2])) return res;
    const at::Tensor input = input_.unpack(), weight = weight_.unpack();
    const bool graph = torch::autograd::GradMode::is_enabled() &&  // create_graph=True
                       (grad_out.requires_grad() || input.requires_grad() || weight.requires_grad());
    Tensor3 g;
    if (graph) {
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pyfastdl::conv2d_bwd_graph", "").typed<BwdSig>();
      g = op.call(grad_out, input, weight, stride_, padding_, dilation_, groups_, mask);
    } else {
      at::AutoGradMode no_grad(false);
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("pyfastdl::conv2d_bwd", "").typed<BwdSig>();
      g = op.call(grad_out, input, weight, stride_, padding_, dilation_, groups_, mask);
    }
    if (mask[0]) res[0] = std::move(std::get<0>(g));
    if (mask[1]) res[1] = std::move(std::get<1>(g));
    if (mask[2]) res[2] = std::move(std::get<2>(g));
    return res;
  }
};

// Autograd kernel: runs the forward below autograd and, when a gradient is wanted, attaches a
// Conv2dBackward node to the output.
at::Tensor conv2d_autograd(const at::Tensor& input, const at::Tensor& weight, const OptT& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const bool need_grad = torch::autograd::compute_requires_grad(input, weight, bias);
  TORCH_CHECK(!torch::autograd::isFwGradDefined(input) && !torch::autograd::isFwGradDefined(weight) &&
                  !torch::autograd::isFwGradDefined(bias),
              "pyfastdl.conv2d: forward-mode AD is not supported");
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = call_fwd(input, weight, bias, stride, padding, dilation, groups);
  }
  if (!need_grad) return out;
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  auto node = c10::make_intrusive<Conv2dBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, b));
  node->input_ = SavedVariable(input, false);
  node->weight_ = SavedVariable(weight, false);
  node->stride_ = stride.vec();
  node->padding_ = padding.vec();
  node->dilation_ = dilation.vec();
  node->groups_ = groups;
  node->has_bias_ = b.defined();
  torch::autograd::set_history(out, node);
  return out;
}

// Below autograd (inference mode, or a caller that excluded the Autograd keys): the forward alone.
at::Tensor conv2d_no_grad(const at::Tensor& input, const at::Tensor& weight, const OptT& bias, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return call_fwd(input, weight, bias, stride, padding, dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastdl, Autograd, m) {
  m.impl("conv2d", &conv2d_autograd);
}

// One function for both devices: it reaches the device's conv2d_fwd through the dispatcher.
TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("conv2d", &conv2d_no_grad);
}

TORCH_LIBRARY_IMPL(pyfastdl, CUDA, m) {
  m.impl("conv2d", &conv2d_no_grad);
}

}  // namespace pyfastdl
