// Argument checks, the problem description and the output allocation shared by the CPU
// (csrc/cpu/pool2d.cpp) and CUDA (csrc/cuda/pool2d.cu) pool2d launchers.
// Launchers validate, kernels trust (docs/adding-an-op-family.md, 2): every user-facing check is here,
// each message naming the argument, all run before anything is allocated or written. The error
// conditions are torch's (aten/src/ATen/native/Pool.h: pooling_output_shape, pool2d_shape_check).
//
// Entry points:
//   pool::Params pool::check_fwd(input, kernel_size, stride, padding, dilation, ceil_mode, allowed, op)
//   pool::Params pool::check_bwd(grad_out, input, ..., op)      -- and grad_out of the output's shape
//   int64_t      pool::out_size(in, k, pad, stride, dilation, ceil_mode)  -- torch's rule
//   at::Tensor   pool::to_layout(t, channels_last), pool::empty_out(like, p, dtype), pool::empty_in(like, p)
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

namespace pyfastdl {
namespace pool {

// One pooling problem, every size resolved. Input (N, C, H, W), output (N, C, H_out, W_out); padding
// (pH rows top and bottom, pW columns left and right). channels_last: input, output (and indices,
// grad_input) are NHWC in memory, else NCHW contiguous.
struct Params {
  int64_t N = 0, C = 0, H = 0, W = 0;
  int64_t H_out = 0, W_out = 0;
  int64_t kH = 1, kW = 1;
  int64_t sH = 1, sW = 1;
  int64_t pH = 0, pW = 0;
  int64_t dH = 1, dW = 1;
  bool ceil_mode = false;
  bool channels_last = false;
};

// torch's pooling_output_shape: floor or ceil of (in + 2 pad - dilation (k - 1) - 1) / stride + 1;
// with ceil_mode the last window must start inside the input or its left padding.
inline int64_t out_size(int64_t in, int64_t k, int64_t pad, int64_t stride, int64_t dilation, bool ceil_mode) {
  const int64_t num = in + 2 * pad - dilation * (k - 1) - 1 + (ceil_mode ? stride - 1 : 0);
  // floor division (num may be negative)
  int64_t q = num / stride;
  if ((num % stride != 0) && ((num < 0) != (stride < 0))) --q;
  int64_t out = q + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// The memory format of the output: torch's rule for pooling on the CPU and on CUDA
// (input.suggest_memory_format()).
inline bool is_channels_last(const at::Tensor& input) {
  return input.dim() == 4 && input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline at::Tensor to_layout(const at::Tensor& t, bool channels_last) {
  return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// (N, C, H_out, W_out) of `dtype` on like's device, in the layout p.channels_last says (the output, indices).
inline at::Tensor empty_out(const at::Tensor& like, const Params& p, at::ScalarType dtype) {
  return at::empty({p.N, p.C, p.H_out, p.W_out}, like.options().dtype(dtype),
                   p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// (N, C, H, W) like `like` (dtype, device), in the layout p.channels_last says (grad_input).
inline at::Tensor empty_in(const at::Tensor& like, const Params& p) {
  return at::empty({p.N, p.C, p.H, p.W}, like.options(),
                   p.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// avg_pool2d's dilation for check_fwd / check_bwd: torch's avg_pool2d has none.
inline constexpr int64_t kNoDilation[2] = {1, 1};

inline Params check_fwd(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation, bool ceil_mode,
                        std::initializer_list<at::ScalarType> allowed, const char* op) {
  TORCH_CHECK(input.dim() == 4, op, ": expected input of rank 4, (N, C, H, W), got input of shape ",
              input.sizes());
  TORCH_CHECK(input.size(1) > 0 && input.size(2) > 0 && input.size(3) > 0, op,
              ": expected input (N, C, H, W) with C, H, W > 0 (N may be 0), got input of shape ", input.sizes());
  TORCH_CHECK(kernel_size.size() == 2, op, ": expected kernel_size of 2 values (kH, kW), got ", kernel_size);
  TORCH_CHECK(stride.size() == 2, op, ": expected stride of 2 values (sH, sW), got ", stride);
  TORCH_CHECK(padding.size() == 2, op, ": expected padding of 2 values (pH, pW), got ", padding);
  TORCH_CHECK(dilation.size() == 2, op, ": expected dilation of 2 values (dH, dW), got ", dilation);
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1, op, ": expected kernel_size >= 1, got kernel_size = ",
              kernel_size);
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1, op, ": expected stride >= 1, got stride = ", stride);
  TORCH_CHECK(dilation[0] >= 1 && dilation[1] >= 1, op, ": expected dilation >= 1, got dilation = ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": expected padding >= 0, got padding = ", padding);
  // torch's two rules: pad <= k / 2, and pad <= half the effective (dilated) kernel
  for (int i = 0; i < 2; ++i) {
    const int64_t k = kernel_size[i], p = padding[i], d = dilation[i];
    TORCH_CHECK(p <= k / 2 && p <= ((k - 1) * d + 1) / 2, op,
                ": expected padding <= kernel_size / 2 (and <= half the dilated kernel), got padding = ", padding,
                ", kernel_size = ", kernel_size, ", dilation = ", dilation);
  }
  bool ok = false;
  for (auto t : allowed) ok = ok || input.scalar_type() == t;
  TORCH_CHECK(ok, op, ": input dtype ", input.scalar_type(), " is not supported by this kernel on ",
              input.device().type());
  Params p;
  p.N = input.size(0);
  p.C = input.size(1);
  p.H = input.size(2);
  p.W = input.size(3);
  p.kH = kernel_size[0];
  p.kW = kernel_size[1];
  p.sH = stride[0];
  p.sW = stride[1];
  p.pH = padding[0];
  p.pW = padding[1];
  p.dH = dilation[0];
  p.dW = dilation[1];
  p.ceil_mode = ceil_mode;
  p.H_out = out_size(p.H, p.kH, p.pH, p.sH, p.dH, ceil_mode);
  p.W_out = out_size(p.W, p.kW, p.pW, p.sW, p.dW, ceil_mode);
  TORCH_CHECK(p.H_out >= 1 && p.W_out >= 1, op, ": the output would be empty: input of shape ", input.sizes(),
              ", kernel_size = ", kernel_size, ", stride = ", stride, ", padding = ", padding, ", dilation = ",
              dilation, " give an output of ", p.H_out, " x ", p.W_out, " (output size is too small)");
  p.channels_last = is_channels_last(input);
  return p;
}

// The forward's checks, and grad_out (and indices, when given) of the forward output's shape.
inline Params check_bwd(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor* indices,
                        at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, bool ceil_mode, std::initializer_list<at::ScalarType> allowed,
                        const char* op) {
  Params p = check_fwd(input, kernel_size, stride, padding, dilation, ceil_mode, allowed, op);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == p.N && grad_out.size(1) == p.C &&
                  grad_out.size(2) == p.H_out && grad_out.size(3) == p.W_out,
              op, ": expected grad_out of shape (", p.N, ", ", p.C, ", ", p.H_out, ", ", p.W_out,
              ") (the forward output's), got grad_out of shape ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == input.scalar_type(), op, ": expected grad_out of dtype ",
              input.scalar_type(), " like input, got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == input.device(), op, ": expected grad_out on ", input.device(),
              " like input, got ", grad_out.device());
  if (indices) {
    TORCH_CHECK(indices->sizes() == grad_out.sizes(), op, ": expected indices of shape ", grad_out.sizes(),
                " (the forward output's), got indices of shape ", indices->sizes());
    TORCH_CHECK(indices->scalar_type() == at::kLong, op, ": expected indices of dtype int64, got ",
                indices->scalar_type());
    TORCH_CHECK(indices->device() == input.device(), op, ": expected indices on ", input.device(),
                " like input, got ", indices->device());
  }
  return p;
}

inline void check_divisor(const c10::optional<int64_t>& divisor_override, const char* op) {
  TORCH_CHECK(!divisor_override.has_value() || *divisor_override != 0, op,
              ": expected divisor_override != 0 (or None), got 0");
}

}  // namespace pool
}  // namespace pyfastdl
