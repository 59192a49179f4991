// 2-D pooling CPU kernels (max and average, forward and backward), one table per SIMD capability
// (pool2d_kernel.cpp is compiled once per capability; pool2d.cpp picks the table at run time).
// Kernels trust their arguments: the launcher has validated them (common/pool2d.h) and brought every
// tensor into the layout p.channels_last says (NHWC in memory, else NCHW contiguous), float32/float64.
#pragma once

#include <ATen/ATen.h>

#include "common/pool2d.h"
#include "cpu/capability.h"

namespace pyfastdl {
namespace cpu {

struct Pool2dKernels {
  // y = max over each window (NaN wins; torch's order), idx (int64, like y; or nullptr) = the flat
  // index ih * W + iw within the (H, W) plane of the first maximum in window order (the last NaN
  // when the window holds NaN: torch's rule).                 x: (N, C, H, W); y, idx: (N, C, Ho, Wo)
  void (*max_fwd)(const at::Tensor& x, const pool::Params& p, at::Tensor& y, at::Tensor* idx);
  // gi = 0, then gi[plane][idx] += g for every output in order (torch's summation order).
  void (*max_bwd)(const at::Tensor& g, const at::Tensor& idx, const pool::Params& p, at::Tensor& gi);
  // y = sum over the window's in-input elements (row-major, as torch) / divisor; divisor =
  // divisor_override when != 0, else the window's size clipped to the padded input
  // (count_include_pad) or to the input.                      x: (N, C, H, W); y: (N, C, Ho, Wo)
  void (*avg_fwd)(const at::Tensor& x, const pool::Params& p, bool count_include_pad, int64_t divisor_override,
                  at::Tensor& y);
  // gi = 0, then gi[window] += g / divisor for every output in order (torch's summation order).
  void (*avg_bwd)(const at::Tensor& g, const pool::Params& p, bool count_include_pad, int64_t divisor_override,
                  at::Tensor& gi);
};

PYFASTDL_CPU_KERNELS(Pool2dKernels, pool2d_kernels)

}  // namespace cpu
}  // namespace pyfastdl
