// conv2d CPU kernels for 1x1 convolutions on NCHW input (ResNet's downsamples, bottleneck 1x1s),
// one table per SIMD capability (conv2d_1x1_kernel.cpp is compiled once per capability; conv2d.cpp
// picks the table at run time and selects the path: use_nchw_1x1). Per image a GEMM along the
// pixels: out (C_out x P) = W (C_out x C_in) x X_s (C_in x P), P = H_out * W_out, X_s the input
// pixels the output pixels read (stride: every sh-th row and sw-th column; padding: zeros), packed per
// tile of pixels straight into the micro-kernel's layout; the output written in NCHW directly. No
// reorder to NHWC and back. Kernels trust their arguments (validated by conv2d.cpp).
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"
#include "cpu/capability.h"

namespace pyfastdl {
namespace cpu {

struct Conv2d1x1Kernels {
  // y = conv(x, w) + bias.  x: (N, C_in, H, W) contiguous NCHW; w: (C_out, C_in, 1, 1) contiguous;
  // bias: (C_out,) or undefined; y: (N, C_out, H_out, W_out) contiguous NCHW, written. groups 1; any
  // stride and padding.
  void (*fwd_nchw)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p,
                   at::Tensor& y);
  // grad_input = W^T g scattered to the pixels the forward read (zeros elsewhere).  g: (N, C_out,
  // H_out, W_out) contiguous NCHW; w as above; gi: (N, C_in, H, W) contiguous NCHW, written.
  void (*bwd_input_nchw)(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi);
  // grad_input on channels_last: per output pixel (a row of C_out contiguous channels) the C_in
  // channels W^T g, written to the input pixel it read; every other input pixel zero.  g: (N, C_out,
  // H_out, W_out) channels_last; w as above; gi: (N, C_in, H, W) channels_last, written.
  void (*bwd_input_nhwc)(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi);
  // grad_weight = sum_n g_n X_s,n^T and/or grad_bias (either may be undefined = not asked).  g, x
  // contiguous NCHW; gw: (C_out, C_in, 1, 1) contiguous; gb: (C_out,). Deterministic: fixed tasks of
  // (image, band of output rows), their partial sums added in task order (float64) at the end.
  void (*bwd_weight_nchw)(const at::Tensor& g, const at::Tensor& x, const conv::Params& p, at::Tensor& gw,
                          at::Tensor& gb);
};

PYFASTDL_CPU_KERNELS(Conv2d1x1Kernels, conv2d_1x1_kernels)

}  // namespace cpu
}  // namespace pyfastdl
