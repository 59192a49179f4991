// conv2d CPU kernels for one-group convolutions on NCHW input with a small K = C_in kH kW (LeNet's
// second convolution: 6 x 5 x 5 = 150 on 10 x 10 output planes), one table per SIMD capability
// (conv2d_panel_kernel.cpp is compiled once per capability; conv2d.cpp picks the table at run time
// and selects the path: use_nchw_panel). Per image (or chunk of its output pixels) the "im2col panel"
// P[k][q] (k = (ci, kh, kw), q = the flattened output pixel oh W_out + ow) is packed straight from the
// NCHW planes, and a GEMM along the flattened pixels runs on it, so that output planes narrower than
// two vectors waste no lanes. Kernels trust their arguments (validated by conv2d.cpp).
#pragma once

#include <ATen/ATen.h>

#include "common/conv2d.h"
#include "cpu/capability.h"

namespace pyfastdl {
namespace cpu {

struct Conv2dPanelKernels {
  // y = conv(x, w) + bias.  x: (N, C_in, H, W) contiguous NCHW; w: (C_out, C_in, kH, kW) contiguous;
  // bias: (C_out,) or undefined; y: (N, C_out, H_out, W_out) contiguous NCHW, written. groups 1; any
  // stride, padding and dilation.
  void (*fwd_nchw)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p,
                   at::Tensor& y);
  // grad_input: per image and input channel ci the GEMM D (kH kW x P) = W[:, ci]^T (kH kW x C_out) x
  // g_n (C_out x P), then gi[ci][ih][iw] = sum over (kh, kw) of D[kh, kw][oh, ow] for the output pixels
  // that read (ih, iw) (col2im, vectorized along iw: only products of grad_out pixels that exist).
  // g: (N, C_out, H_out, W_out) contiguous NCHW; w as above; gi: (N, C_in, H, W) contiguous NCHW,
  // written. groups 1; stride 1 along W (any along H); any padding and dilation.
  void (*bwd_input_nchw)(const at::Tensor& g, const at::Tensor& w, const conv::Params& p, at::Tensor& gi);
};

PYFASTDL_CPU_KERNELS(Conv2dPanelKernels, conv2d_panel_kernels)

}  // namespace cpu
}  // namespace pyfastdl
