// Argument checks and the problem description shared by the CPU and CUDA conv2d launchers.
// Launchers validate, kernels trust (docs/adding-an-op-family.md, 2): every user-facing check is here,
// each message naming the argument, all run before anything is allocated or written.
//
// Entry points (signatures stable: csrc/cpu/conv2d.cpp and csrc/cuda/conv2d.cu both call them):
//   conv::Params conv::check_fwd(input, weight, bias, stride, padding, dilation, groups, allowed, op)
//   conv::Params conv::check_bwd(grad_out, input, weight, stride, padding, dilation, groups, allowed, op)
//   bool         conv::is_channels_last(input, weight) -- the memory format the output is given
//   at::Tensor   conv::to_layout(t, channels_last)  -- t itself or a copy in that format
//   at::ScalarType conv::acc_dtype(dtype)           -- float64 for float64, float32 otherwise
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

namespace pyfastdl {
namespace conv {

// One convolution problem, every size resolved. Input (N, C_in, H, W), weight (C_out, C_in / groups,
// kH, kW), output (N, C_out, H_out, W_out); padding (top pt, bottom pb, left pl, right pr) of zeros.
// channels_last: the output (and grad_input) is NHWC in memory, else NCHW contiguous; the input is
// read in either (the launchers bring it into the kernels' layout).
struct Params {
  int64_t N = 0, C_in = 0, H = 0, W = 0;
  int64_t C_out = 0, kH = 0, kW = 0;
  int64_t H_out = 0, W_out = 0;
  int64_t sh = 1, sw = 1;                  // stride
  int64_t pt = 0, pb = 0, pl = 0, pr = 0;  // padding
  int64_t dh = 1, dw = 1;                  // dilation
  int64_t groups = 1;
  bool channels_last = false;
  int64_t cin_g() const { return groups > 0 ? C_in / groups : 0; }    // input channels per group
  int64_t cout_g() const { return groups > 0 ? C_out / groups : 0; }  // output channels per group
  double flops() const {  // 2 * multiply-adds of the forward
    return 2.0 * N * C_out * H_out * W_out * cin_g() * kH * kW;
  }
};

// The accumulation ("opmath") dtype: float64 for float64 input, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The output's memory format, torch's rule for a CPU or cuDNN convolution: channels_last when the
// input's or the weight's strides suggest channels_last (suggest_memory_format: a (N, 1, H, W)
// input converted with .to(memory_format=torch.channels_last) does, a contiguous one does not), for
// float64 too -- so a model converted to channels_last (weights channels_last, the first input NCHW)
// stays channels_last from its first convolution on, as with torch. The rule of
// pyfastdl/autograd/conv2d.py's _memory_format.
inline bool is_channels_last(const at::Tensor& input, const at::Tensor& weight) {
  return input.dim() == 4 && (input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                              (weight.dim() == 4 && weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast));
}

// `t` itself when it already is in the layout, else a copy in it.
inline at::Tensor to_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

namespace detail {

inline void check_dtype(const at::Tensor& t, const char* name, const at::Tensor& input, const char* op) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name, " of dtype ",
              input.scalar_type(), " like input, got ", name, " of dtype ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " on ", input.device(),
              " like input, got ", name, " on ", t.device());
}

// Shapes, strides, padding, dilation, groups, dtypes and devices of input and weight; fills p.
inline Params check_common(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           std::initializer_list<at::ScalarType> allowed, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": expected input of rank 4, (N, C_in, H, W), got input of rank ",
              input.dim(), " and shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, op,
              ": expected weight of rank 4, (C_out, C_in / groups, kH, kW), got weight of rank ",
              weight.dim(), " and shape ", weight.sizes());
  TORCH_CHECK(stride.size() == 2, op, ": expected stride of 2 values (sh, sw), got ", stride.size());
  TORCH_CHECK(padding.size() == 4, op, ": expected padding of 4 values (top, bottom, left, right), got ",
              padding.size());
  TORCH_CHECK(dilation.size() == 2, op, ": expected dilation of 2 values (dh, dw), got ", dilation.size());
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": expected stride >= 1, got stride = ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": expected dilation >= 1, got dilation = ",
              dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0 && padding[2] >= 0 && padding[3] >= 0, op,
              ": expected padding >= 0, got padding = ", padding);
  TORCH_CHECK(groups >= 1, op, ": expected groups >= 1, got groups = ", groups);
  detail::check_dtype(weight, "weight", input, op);
  bool ok = false;
  for (auto t : allowed) ok = ok || input.scalar_type() == t;
  TORCH_CHECK(ok, op, ": input dtype ", input.scalar_type(), " is not supported by this kernel on ",
              input.device().type());
  Params p;
  p.N = input.size(0);
  p.C_in = input.size(1);
  p.H = input.size(2);
  p.W = input.size(3);
  p.C_out = weight.size(0);
  p.kH = weight.size(2);
  p.kW = weight.size(3);
  p.sh = stride[0];
  p.sw = stride[1];
  p.pt = padding[0];
  p.pb = padding[1];
  p.pl = padding[2];
  p.pr = padding[3];
  p.dh = dilation[0];
  p.dw = dilation[1];
  p.groups = groups;
  TORCH_CHECK(p.C_in % groups == 0, op, ": expected input channels (input.size(1) = ", p.C_in,
              ") divisible by groups = ", groups);
  TORCH_CHECK(p.C_out % groups == 0, op, ": expected output channels (weight.size(0) = ", p.C_out,
              ") divisible by groups = ", groups);
  TORCH_CHECK(weight.size(1) == p.C_in / groups, op, ": expected weight.size(1) = input channels / groups = ",
              p.C_in, " / ", groups, " = ", p.C_in / groups, ", got weight of shape ", weight.sizes());
  TORCH_CHECK(p.kH >= 1 && p.kW >= 1, op, ": expected a kernel of size >= 1, got weight of shape ",
              weight.sizes());
  const int64_t eff_h = p.dh * (p.kH - 1) + 1, eff_w = p.dw * (p.kW - 1) + 1;
  const int64_t ph = p.H + p.pt + p.pb, pw = p.W + p.pl + p.pr;
  TORCH_CHECK(eff_h <= ph && eff_w <= pw, op, ": the kernel (", eff_h, " x ", eff_w,
              " with dilation; weight of shape ", weight.sizes(), ") is larger than the padded input (", ph,
              " x ", pw, "; input of shape ", input.sizes(), ", padding ", padding, ")");
  p.H_out = (ph - eff_h) / p.sh + 1;
  p.W_out = (pw - eff_w) / p.sw + 1;
  p.channels_last = is_channels_last(input, weight);
  return p;
}

}  // namespace detail

// Checks of conv2d_fwd; `allowed` lists the input dtypes this backend's kernels cover.
inline Params check_fwd(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        std::initializer_list<at::ScalarType> allowed, const char* op = "conv2d") {
  Params p = detail::check_common(input, weight, stride, padding, dilation, groups, allowed, op);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.C_out, op, ": expected bias of shape (", p.C_out,
                ",) to match output channels (weight.size(0)), got bias of shape ", bias->sizes());
    detail::check_dtype(*bias, "bias", input, op);
  }
  return p;
}

// Checks of conv2d_bwd: those of the forward, and grad_out of the forward output's shape.
inline Params check_bwd(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& weight,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        std::initializer_list<at::ScalarType> allowed, const char* op = "conv2d_bwd") {
  Params p = detail::check_common(input, weight, stride, padding, dilation, groups, allowed, op);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == p.N && grad_out.size(1) == p.C_out &&
                  grad_out.size(2) == p.H_out && grad_out.size(3) == p.W_out,
              op, ": expected grad_out of shape (", p.N, ", ", p.C_out, ", ", p.H_out, ", ", p.W_out,
              ") (the forward output's), got grad_out of shape ", grad_out.sizes());
  detail::check_dtype(grad_out, "grad_out", input, op);
  return p;
}

}  // namespace conv
}  // namespace pyfastdl
