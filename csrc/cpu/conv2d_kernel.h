// conv2d CPU kernels, one table per SIMD capability (conv2d_kernel.cpp is compiled once per
// capability; conv2d.cpp picks the table at run time). Kernels trust their arguments: the launcher in
// conv2d.cpp has validated shapes, dtypes (float32/float64) and made every tensor contiguous in the
// layout stated below.
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"
#include "cpu/capability.h"

namespace pyfastdl {
namespace cpu {

struct Conv2dKernels {
  // y = conv(x, w) + bias.  x: (N, C_in, H, W) channels_last; w: (C_out, C_in/groups, kH, kW)
  // contiguous; bias: (C_out,) or undefined; y: (N, C_out, H_out, W_out) channels_last, or contiguous
  // NCHW (written directly, not for depthwise), written.
  void (*fwd)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p,
              at::Tensor& y);
  // grad_input = conv_transpose(g, w).  g: (N, C_out, H_out, W_out) channels_last; w as above;
  // gi: (N, C_in, H, W) channels_last, or contiguous NCHW (not for depthwise), written.
  void (*bwd_input)(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi);
  // grad_weight and/or grad_bias (either may be undefined = not asked).  g, x channels_last as above;
  // gw: (C_out, C_in/groups, kH, kW) contiguous; gb: (C_out,). Deterministic: each element is summed
  // by one task in a fixed order, whatever the thread count.
  void (*bwd_weight)(const at::Tensor& g, const at::Tensor& x, const conv::Params& p, at::Tensor& gw,
                     at::Tensor& gb);
  // The forward on NCHW directly, for few input channels and for depthwise (conv2d.cpp:
  // use_nchw_direct): x, y contiguous NCHW; any stride; groups 1, or depthwise.
  void (*fwd_nchw)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p,
                   at::Tensor& y);
  // grad_weight and/or grad_bias on NCHW directly, for few input channels (conv2d.cpp:
  // use_nchw_bwd_weight): g, x contiguous NCHW; groups 1; any stride, padding, dilation. Deterministic:
  // fixed tasks of output pixels, their partial sums added in order.
  void (*bwd_weight_nchw)(const at::Tensor& g, const at::Tensor& x, const conv::Params& p, at::Tensor& gw,
                          at::Tensor& gb);
  // dst = src in the other memory format: src (N, C, H, W) contiguous NCHW and dst channels_last
  // (to_nhwc), or the reverse; both float or both double, same sizes. Per image blocks of pixels
  // transposed (16 x 16 in registers on AVX-512).
  void (*reorder)(const at::Tensor& src, at::Tensor& dst, bool to_nhwc);
};

PYFASTDL_CPU_KERNELS(Conv2dKernels, conv2d_kernels)

}  // namespace cpu
}  // namespace pyfastdl
