// 2-D pooling CUDA kernels and launchers (max_pool2d, avg_pool2d; forward and backward), registered
// under the CUDA dispatch key. The contract is csrc/ops.cpp's ("2-D pooling"); the argument checks are
// csrc/common/pool2d.h's, shared with the CPU launchers (csrc/cpu/pool2d.cpp), so both raise the same
// errors, before anything is allocated or written.
//
// Layout: the launchers bring every tensor into the output's memory format (torch's rule:
// input.suggest_memory_format()): NCHW contiguous, or channels_last (NHWC in memory); other strides
// are copied into it. One thread computes one element, elements enumerated in memory order, so the
// thread's linear index is its element's offset: NCHW -> (n, c, h, w), threads of a warp along w;
// NHWC -> (n, h, w, c), along c (coalesced reads of every window tap). Grid-stride loops.
//
// Forward: each output walks its window in torch's order (kh outer, kw inner, ascending):
//   max  the first maximum wins ties; a NaN wins, and a later NaN wins over it (the last NaN of the
//        window, torch's `v > m || isnan(v)` rule); index = ih * W + iw within the (H, W) plane.
//   avg  the window's in-input elements summed from 0 in that order, divided by torch's divisor
//        (divisor_override, else the window clipped to the padded input (count_include_pad) or to the
//        input); a window with no element in the input gives 0.
// Backward as a gather, no atomics (deterministic, independent of the launch shape): each input
// element visits the outputs whose windows cover it, oh then ow ascending (the order in which the
// CPU kernel and torch add), and sums in acc_t from 0:
//   max  grad_out[o] where indices[o] is this element's ih * W + iw;
//   avg  grad_out[o] / divisor(o), rounded to the input dtype first (torch's CUDA kernel divides a
//        scalar_t by an int: float16/bfloat16 round the quotient to the storage type).
// The outputs covering input row ih (dilated extent K = (k - 1) d + 1): oh in
// [ih + p < K ? 0 : (ih + p - K) / s + 1, min((ih + p) / s + 1, H_out)); with dilation > 1 not every
// one of them reads ih, the index test (max) picks the right ones (avg has no dilation).
//
// Numerics: accumulation in at::opmath_type<scalar_t> (float for float16/bfloat16/float32, double for
// float64): float32 and float64 results are torch's (and the CPU kernel's) bit for bit; a max is exact
// in every dtype.
//
// Index math in int32 where every size, offset and window coordinate fits (fits_int32), else int64
// (tensors of 2^31 elements and more); the loop counter is always int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common/pool2d.h"
#include "common.cuh"

namespace pyfastdl {
namespace {

constexpr int kThreads = 256;              // threads of every block
constexpr int64_t kMaxBlocks = 65535 * 8;  // grid cap; the kernels' grid-stride loops cover the rest

// The problem's sizes in the kernels' index type (int32_t or int64_t: fits_int32).
template <typename index_t>
struct Geom {
  index_t C, H, W;    // input (N, C, H, W); N is implied by the element count
  index_t Ho, Wo;     // output (N, C, Ho, Wo)
  index_t kH, kW;     // window
  index_t sH, sW;     // stride
  index_t pH, pW;     // padding, both sides
  index_t dH, dW;     // dilation (1, 1 for avg)
};

template <typename index_t>
Geom<index_t> geom(const pool::Params& p) {
  auto c = [](int64_t v) { return static_cast<index_t>(v); };
  return {c(p.C), c(p.H), c(p.W), c(p.H_out), c(p.W_out), c(p.kH), c(p.kW),
          c(p.sH), c(p.sW), c(p.pH), c(p.pW), c(p.dH), c(p.dW)};
}

// ---- device helpers -------------------------------------------------------------------------------

// Element q (memory order) of an (N, C, A, B) tensor in NCHW (CL = false) or NHWC (CL = true):
// its (a, b) position and the offset of its (n, c) plane's element (0, 0); element (a', b') of the
// plane lies at base + (a' B + b') * step, step = 1 (NCHW) or C (NHWC).
template <bool CL, typename index_t>
__device__ __forceinline__ void locate(index_t q, index_t C, index_t A, index_t B, index_t& a, index_t& b,
                                       index_t& n, index_t& c) {
  if (CL) {
    c = q % C;
    index_t t = q / C;
    b = t % B;
    t /= B;
    a = t % A;
    n = t / A;
  } else {
    b = q % B;
    index_t t = q / B;
    a = t % A;
    t /= A;
    c = t % C;
    n = t / C;
  }
}

template <bool CL, typename index_t>
__device__ __forceinline__ index_t plane_base(index_t n, index_t c, index_t C, index_t plane_size) {
  return CL ? n * plane_size * C + c : (n * C + c) * plane_size;
}

template <typename index_t>
__device__ __forceinline__ index_t imin(index_t a, index_t b) {
  return a < b ? a : b;
}
template <typename index_t>
__device__ __forceinline__ index_t imax(index_t a, index_t b) {
  return a > b ? a : b;
}

// [lo, hi) of the taps k in [0, K) with 0 <= start + k d < n (the window's taps inside the input)
template <typename index_t>
__device__ __forceinline__ void tap_range(index_t start, index_t d, index_t K, index_t n, index_t& lo,
                                          index_t& hi) {
  lo = start >= 0 ? index_t(0) : (-start + d - 1) / d;
  hi = start + (K - 1) * d < n ? K : (n - 1 - start) / d + 1;
  if (hi < lo) hi = lo;
}

// [lo, hi) of the outputs o in [0, O) whose window (start o s - p, dilated extent keff) covers i
template <typename index_t>
__device__ __forceinline__ void cover_range(index_t i, index_t p, index_t keff, index_t s, index_t O, index_t& lo,
                                            index_t& hi) {
  const index_t ip = i + p;
  lo = ip < keff ? index_t(0) : (ip - keff) / s + 1;
  hi = imin<index_t>(ip / s + 1, O);
}

// torch's avg-pool window along one axis for output o: [i0, i1) inside the input, and the window's
// extent clipped to the padded input (count_include_pad's count)
template <typename index_t>
struct Span {
  index_t i0, i1, padded;
};

template <typename index_t>
__device__ __forceinline__ Span<index_t> avg_span(index_t o, index_t s, index_t pad, index_t k, index_t n) {
  const index_t a = o * s - pad;
  const index_t b = imin<index_t>(a + k, n + pad);
  return {imax<index_t>(a, 0), imin<index_t>(b, n), b - a};
}

template <typename index_t>
__device__ __forceinline__ int64_t avg_divisor(const Span<index_t>& h, const Span<index_t>& w, bool count_include_pad,
                                               int64_t divisor_override) {
  if (divisor_override != 0) return divisor_override;
  return count_include_pad ? static_cast<int64_t>(h.padded) * w.padded
                           : static_cast<int64_t>(h.i1 - h.i0) * (w.i1 - w.i0);
}

// torch's grad_delta, `grad_out[o] / divide_factor` with a scalar_t numerator and an int divisor:
// computed in acc_t, rounded to scalar_t (a no-op for float32 / float64), the divisor converted to
// scalar_t first as c10::Half / c10::BFloat16's operator/(T, int) does.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t grad_delta(scalar_t g, int64_t div) {
  const acc_t d = static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(div)));
  return static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(g) / d));
}

// ---- kernels --------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t, bool CL, bool IDX>
__global__ void __launch_bounds__(kThreads)
    _max_pool2d_fwd_kernel(const scalar_t* __restrict__ x,  // (N, C, H, W), NCHW or NHWC (CL)
                           scalar_t* __restrict__ y,        // (N, C, Ho, Wo), x's layout
                           int64_t* __restrict__ idx,       // like y, or unused (!IDX)
                           const Geom<index_t> g,
                           const int64_t total) {           // y.numel()
  using acc_t = at::opmath_type<scalar_t>;
  const index_t step = CL ? g.C : index_t(1);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    index_t oh, ow, n, c;
    locate<CL>(static_cast<index_t>(i), g.C, g.Ho, g.Wo, oh, ow, n, c);
    const scalar_t* xp = x + plane_base<CL>(n, c, g.C, g.H * g.W);
    const index_t ih0 = oh * g.sH - g.pH, iw0 = ow * g.sW - g.pW;
    index_t kh_lo, kh_hi, kw_lo, kw_hi;
    tap_range(ih0, g.dH, g.kH, g.H, kh_lo, kh_hi);
    tap_range(iw0, g.dW, g.kW, g.W, kw_lo, kw_hi);
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    index_t mi = -1;
    for (index_t kh = kh_lo; kh < kh_hi; ++kh) {
      const index_t row = (ih0 + kh * g.dH) * g.W + iw0;
      for (index_t kw = kw_lo; kw < kw_hi; ++kw) {
        const index_t j = row + kw * g.dW;  // ih * W + iw
        const acc_t v = static_cast<acc_t>(xp[j * step]);
        if (mi < 0 || v > m || v != v) {  // the first element, a greater one, or a NaN (torch's rule)
          m = v;
          mi = j;
        }
      }
    }
    y[i] = static_cast<scalar_t>(m);
    if (IDX) idx[i] = mi < 0 ? int64_t(0) : static_cast<int64_t>(mi);
  }
}

template <typename scalar_t, typename index_t, bool CL>
__global__ void __launch_bounds__(kThreads)
    _max_pool2d_bwd_kernel(const scalar_t* __restrict__ go,  // (N, C, Ho, Wo), NCHW or NHWC (CL)
                           const int64_t* __restrict__ idx,  // (N, C, Ho, Wo), go's layout
                           scalar_t* __restrict__ gi,        // (N, C, H, W), go's layout
                           const Geom<index_t> g,
                           const int64_t total) {            // gi.numel()
  using acc_t = at::opmath_type<scalar_t>;
  const index_t step = CL ? g.C : index_t(1);
  const index_t keff_h = (g.kH - 1) * g.dH + 1, keff_w = (g.kW - 1) * g.dW + 1;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    index_t ih, iw, n, c;
    locate<CL>(static_cast<index_t>(i), g.C, g.H, g.W, ih, iw, n, c);
    const int64_t here = static_cast<int64_t>(ih) * g.W + iw;
    const index_t base = plane_base<CL>(n, c, g.C, g.Ho * g.Wo);
    index_t oh_lo, oh_hi, ow_lo, ow_hi;
    cover_range(ih, g.pH, keff_h, g.sH, g.Ho, oh_lo, oh_hi);
    cover_range(iw, g.pW, keff_w, g.sW, g.Wo, ow_lo, ow_hi);
    acc_t acc = acc_t(0);
    for (index_t oh = oh_lo; oh < oh_hi; ++oh) {
      for (index_t ow = ow_lo; ow < ow_hi; ++ow) {
        const index_t o = base + (oh * g.Wo + ow) * step;
        if (idx[o] == here) acc += static_cast<acc_t>(go[o]);
      }
    }
    gi[i] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename index_t, bool CL>
__global__ void __launch_bounds__(kThreads)
    _avg_pool2d_fwd_kernel(const scalar_t* __restrict__ x,  // (N, C, H, W), NCHW or NHWC (CL)
                           scalar_t* __restrict__ y,        // (N, C, Ho, Wo), x's layout
                           const Geom<index_t> g,
                           const bool count_include_pad,
                           const int64_t divisor_override,  // 0: none
                           const int64_t total) {           // y.numel()
  using acc_t = at::opmath_type<scalar_t>;
  const index_t step = CL ? g.C : index_t(1);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    index_t oh, ow, n, c;
    locate<CL>(static_cast<index_t>(i), g.C, g.Ho, g.Wo, oh, ow, n, c);
    const Span<index_t> sh = avg_span(oh, g.sH, g.pH, g.kH, g.H);
    const Span<index_t> sw = avg_span(ow, g.sW, g.pW, g.kW, g.W);
    if (sh.i0 >= sh.i1 || sw.i0 >= sw.i1) {  // no element of the window in the input
      y[i] = scalar_t(0);
      continue;
    }
    const scalar_t* xp = x + plane_base<CL>(n, c, g.C, g.H * g.W);
    acc_t sum = acc_t(0);
    for (index_t ih = sh.i0; ih < sh.i1; ++ih)
      for (index_t iw = sw.i0; iw < sw.i1; ++iw) sum += static_cast<acc_t>(xp[(ih * g.W + iw) * step]);
    const int64_t div = avg_divisor(sh, sw, count_include_pad, divisor_override);
    y[i] = static_cast<scalar_t>(sum / static_cast<acc_t>(div));
  }
}

template <typename scalar_t, typename index_t, bool CL>
__global__ void __launch_bounds__(kThreads)
    _avg_pool2d_bwd_kernel(const scalar_t* __restrict__ go,  // (N, C, Ho, Wo), NCHW or NHWC (CL)
                           scalar_t* __restrict__ gi,        // (N, C, H, W), go's layout
                           const Geom<index_t> g,
                           const bool count_include_pad,
                           const int64_t divisor_override,   // 0: none
                           const int64_t total) {            // gi.numel()
  using acc_t = at::opmath_type<scalar_t>;
  const index_t step = CL ? g.C : index_t(1);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    index_t ih, iw, n, c;
    locate<CL>(static_cast<index_t>(i), g.C, g.H, g.W, ih, iw, n, c);
    const index_t base = plane_base<CL>(n, c, g.C, g.Ho * g.Wo);
    index_t oh_lo, oh_hi, ow_lo, ow_hi;
    cover_range(ih, g.pH, g.kH, g.sH, g.Ho, oh_lo, oh_hi);
    cover_range(iw, g.pW, g.kW, g.sW, g.Wo, ow_lo, ow_hi);
    acc_t acc = acc_t(0);
    for (index_t oh = oh_lo; oh < oh_hi; ++oh) {
      const Span<index_t> sh = avg_span(oh, g.sH, g.pH, g.kH, g.H);
      for (index_t ow = ow_lo; ow < ow_hi; ++ow) {
        const Span<index_t> sw = avg_span(ow, g.sW, g.pW, g.kW, g.W);
        // (every output here covers (ih, iw), so its window holds an input element: never empty)
        const int64_t div = avg_divisor(sh, sw, count_include_pad, divisor_override);
        acc += grad_delta<scalar_t, acc_t>(go[base + (oh * g.Wo + ow) * step], div);
      }
    }
    gi[i] = static_cast<scalar_t>(acc);
  }
}

// ---- launch helpers -------------------------------------------------------------------------------

unsigned blocks_for(int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks)));
}

// Whether every value the kernels form in index_t fits int32: element offsets (< numel of input and
// output), window coordinates (oh s - p + k d, ih + p), window sizes (kH kW). Each factor is checked
// first, so the int64 products below cannot overflow.
bool fits_int32(const pool::Params& p) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  for (int64_t v : {p.N, p.C, p.H, p.W, p.H_out, p.W_out, p.kH, p.kW, p.sH, p.sW, p.pH, p.pW, p.dH, p.dW})
    if (v > kMax) return false;
  if (p.C * p.H > kMax || p.C * p.H_out > kMax) return false;
  const int64_t plane_in = p.C * p.H * p.W, plane_out = p.C * p.H_out * p.W_out;
  if (plane_in > kMax || plane_out > kMax) return false;
  if (p.N * plane_in > kMax || p.N * plane_out > kMax) return false;
  const int64_t reach_h = p.H_out * p.sH + p.kH * p.dH + p.pH, reach_w = p.W_out * p.sW + p.kW * p.dW + p.pW;
  return reach_h <= kMax && reach_w <= kMax && p.H + p.pH <= kMax && p.W + p.pW <= kMax && p.kH * p.kW <= kMax;
}

// Calls f(index_t{}, std::bool_constant<CL>{}) with the problem's index type and layout.
template <typename F>
void with_index_and_layout(const pool::Params& p, F&& f) {
  if (fits_int32(p)) {
    if (p.channels_last) return f(int32_t{}, std::true_type{});
    return f(int32_t{}, std::false_type{});
  }
  if (p.channels_last) return f(int64_t{}, std::true_type{});
  return f(int64_t{}, std::false_type{});
}

void check_cuda(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.is_cuda(), op, ": expected input on a CUDA device, got ", input.device());
}

constexpr std::initializer_list<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16};

}  // namespace

// max_pool2d forward on CUDA (csrc/ops.cpp): (output, indices int64 or undefined), both
// (N, C, H_out, W_out) in input.suggest_memory_format(), output of input's dtype.
std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd_cuda(const at::Tensor& input, at::IntArrayRef kernel_size,
                                                       at::IntArrayRef stride, at::IntArrayRef padding,
                                                       at::IntArrayRef dilation, bool ceil_mode, bool need_indices) {
  const char* op = "max_pool2d";
  const pool::Params p = pool::check_fwd(input, kernel_size, stride, padding, dilation, ceil_mode, kDtypes, op);
  check_cuda(input, op);
  c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = pool::to_layout(input, p.channels_last);
  at::Tensor y = pool::empty_out(x, p, x.scalar_type());
  at::Tensor idx = need_indices ? pool::empty_out(x, p, at::kLong) : at::Tensor();
  const int64_t total = y.numel();
  if (total == 0) return {y, idx};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_fwd_cuda", [&] {
    with_index_and_layout(p, [&](auto index_tag, auto cl_tag) {
      using index_t = decltype(index_tag);
      constexpr bool CL = decltype(cl_tag)::value;
      const Geom<index_t> g = geom<index_t>(p);
      if (need_indices) {
        _max_pool2d_fwd_kernel<scalar_t, index_t, CL, true><<<blocks_for(total), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>(), g, total);
      } else {
        _max_pool2d_fwd_kernel<scalar_t, index_t, CL, false><<<blocks_for(total), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), nullptr, g, total);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {y, idx};
}

// max_pool2d backward on CUDA (csrc/ops.cpp): grad_input (N, C, H, W) in the forward output's
// memory format; input is read for its shape and memory format only.
at::Tensor max_pool2d_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& indices,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, bool ceil_mode) {
  const char* op = "max_pool2d_bwd";
  const pool::Params p =
      pool::check_bwd(grad_out, input, &indices, kernel_size, stride, padding, dilation, ceil_mode, kDtypes, op);
  check_cuda(input, op);
  c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor g = pool::to_layout(grad_out, p.channels_last);
  const at::Tensor idx = pool::to_layout(indices, p.channels_last);
  at::Tensor gi = pool::empty_in(input, p);
  const int64_t total = gi.numel();
  if (total == 0) return gi;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "max_pool2d_bwd_cuda", [&] {
    with_index_and_layout(p, [&](auto index_tag, auto cl_tag) {
      using index_t = decltype(index_tag);
      constexpr bool CL = decltype(cl_tag)::value;
      _max_pool2d_bwd_kernel<scalar_t, index_t, CL><<<blocks_for(total), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), gi.mutable_data_ptr<scalar_t>(),
          geom<index_t>(p), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return gi;
}

// avg_pool2d forward on CUDA (csrc/ops.cpp): (N, C, H_out, W_out) in input.suggest_memory_format().
at::Tensor avg_pool2d_fwd_cuda(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                               c10::optional<int64_t> divisor_override) {
  const char* op = "avg_pool2d";
  const pool::Params p =
      pool::check_fwd(input, kernel_size, stride, padding, pool::kNoDilation, ceil_mode, kDtypes, op);
  pool::check_divisor(divisor_override, op);
  check_cuda(input, op);
  c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = pool::to_layout(input, p.channels_last);
  at::Tensor y = pool::empty_out(x, p, x.scalar_type());
  const int64_t total = y.numel();
  if (total == 0) return y;
  const int64_t ovr = divisor_override.value_or(0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "avg_pool2d_fwd_cuda", [&] {
    with_index_and_layout(p, [&](auto index_tag, auto cl_tag) {
      using index_t = decltype(index_tag);
      constexpr bool CL = decltype(cl_tag)::value;
      _avg_pool2d_fwd_kernel<scalar_t, index_t, CL><<<blocks_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), geom<index_t>(p), count_include_pad, ovr,
          total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

// avg_pool2d backward on CUDA (csrc/ops.cpp): grad_input (N, C, H, W) in the output's memory format;
// input is read for its shape and memory format only.
at::Tensor avg_pool2d_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& input, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode,
                               bool count_include_pad, c10::optional<int64_t> divisor_override) {
  const char* op = "avg_pool2d_bwd";
  const pool::Params p = pool::check_bwd(grad_out, input, nullptr, kernel_size, stride, padding, pool::kNoDilation,
                                         ceil_mode, kDtypes, op);
  pool::check_divisor(divisor_override, op);
  check_cuda(input, op);
  c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor g = pool::to_layout(grad_out, p.channels_last);
  at::Tensor gi = pool::empty_in(input, p);
  const int64_t total = gi.numel();
  if (total == 0) return gi;
  const int64_t ovr = divisor_override.value_or(0);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "avg_pool2d_bwd_cuda", [&] {
    with_index_and_layout(p, [&](auto index_tag, auto cl_tag) {
      using index_t = decltype(index_tag);
      constexpr bool CL = decltype(cl_tag)::value;
      _avg_pool2d_bwd_kernel<scalar_t, index_t, CL><<<blocks_for(total), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(), geom<index_t>(p), count_include_pad, ovr,
          total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return gi;
}

TORCH_LIBRARY_IMPL(pyfastdl, CUDA, m) {
  m.impl("max_pool2d_fwd", &max_pool2d_fwd_cuda);
  m.impl("max_pool2d_bwd", &max_pool2d_bwd_cuda);
  m.impl("avg_pool2d_fwd", &avg_pool2d_fwd_cuda);
  m.impl("avg_pool2d_bwd", &avg_pool2d_bwd_cuda);
}

}  // namespace pyfastdl
