// conv2d by Winograd F(4x4, 3x3) on the CPU: 3x3 kernels, stride 1, dilation 1, one group (the
// ResNet/VGG 3x3 layers). The SIMD kernels (conv2d_winograd_kernel.cpp) are compiled once per
// capability; the launchers, the selection rule and the algorithm switch live in conv2d_winograd.cpp
// (compiled once), called from conv2d.cpp's launchers.
//
// Algorithm switch (tests, benchmark): PYFASTDL_CONV2D_ALGO=auto|direct|winograd, read once at the
// first convolution, or at run time torch.ops.pyfastdl.conv2d_cpu_algo(mode) (csrc/ops.cpp):
//   "auto"     -- Winograd where it was measured faster and within 1e-4 of float64 (winograd_selected);
//   "direct"   -- never Winograd;
//   "winograd" -- Winograd wherever it applies (3x3, stride 1, dilation 1, groups 1, float32/float64;
//                 grad_input also needs padding <= 2 on each side).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "common/conv2d.h"
#include "cpu/capability.h"

namespace pyfastdl {
namespace cpu {

struct Conv2dWinogradKernels {
  // y = conv(x, w') + bias by F(4x4, 3x3), p the problem of this convolution (kH = kW = 3, stride 1,
  // dilation 1, groups 1). x: (N, C_in, H, W) channels_last; bias: (C_out,) or undefined;
  // y: (N, C_out, H_out, W_out) channels_last or contiguous NCHW, written.
  // w' = w, (C_out, C_in, 3, 3) contiguous, when flip_transpose is false; with flip_transpose, w is
  // (C_in, C_out, 3, 3) contiguous and w'[o][i][a][b] = w[i][o][2 - a][2 - b] (grad_input as a forward).
  void (*fwd)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const conv::Params& p,
              bool flip_transpose, at::Tensor& y);
};

PYFASTDL_CPU_KERNELS(Conv2dWinogradKernels, conv2d_winograd_kernels)

// ---- conv2d_winograd.cpp: selection and launchers ------------------------------------------------

// Winograd applies to p (grad_input: also padding <= 2 on each side, the padding 2 - p of its forward).
bool winograd_applies(const conv::Params& p, at::ScalarType dtype, bool grad_input);
// The launcher's choice for p under the switch (records it: conv2d_cpu_algo("last")).
bool winograd_selected(const conv::Params& p, at::ScalarType dtype, bool grad_input);
// The forward: input in either layout; the output in the input's layout (like conv2d_fwd_cpu).
at::Tensor conv2d_winograd_fwd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                               const conv::Params& p);
// grad_input into gi (channels_last or contiguous NCHW, allocated by the caller): g = grad_out
// channels_last, w the forward's weight (C_out, C_in, 3, 3).
void conv2d_winograd_bwd_input(const at::Tensor& g, const at::Tensor& weight, const conv::Params& p, at::Tensor& gi);
// The switch: mode "auto" | "direct" | "winograd" sets it and returns the previous mode; "" returns the
// mode; "last" returns "fwd=<algo>;bwd_input=<algo>", the algorithms of the last CPU conv2d forward and
// grad_input (process-wide; "none" before the first).
std::string conv2d_cpu_algo(c10::string_view mode);

}  // namespace cpu
}  // namespace pyfastdl
