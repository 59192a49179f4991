// conv2d CPU launchers: validate (common/conv2d.h), bring the activations into NHWC (the kernels'
// layout: channels_last input is read in place; NCHW input is reordered once, and the output
// reordered back), allocate, and run the SIMD kernels of the CPU's capability (conv2d_kernel.cpp).
// Registered under the CPU dispatch key.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>

#include "common/conv2d.h"
#include "cpu/conv2d_1x1_kernel.h"
#include "cpu/conv2d_kernel.h"
#include "cpu/conv2d_panel_kernel.h"
#include "cpu/conv2d_winograd_kernel.h"

namespace pyfastdl {
namespace {

constexpr auto kernels = &cpu::conv2d_kernels;  // the table of the CPU's capability (cpu/capability.h)
constexpr auto kernels_1x1 = &cpu::conv2d_1x1_kernels;
constexpr auto kernels_panel = &cpu::conv2d_panel_kernels;

// t in memory format fmt: itself if it already is; an NCHW <-> NHWC copy of a 4-D float tensor on the
// kernels' transposes (torch's .contiguous(format) moved 3 MB at about 10 GB/s here, 2026-12-02, Zen 5:
// a third of a ResNet-18 downsample's grad_input on NCHW); anything else (strided views) by torch.
at::Tensor as_format(const at::Tensor& t, at::MemoryFormat fmt) {
  if (t.is_contiguous(fmt)) {
    // (a tensor contiguous in both formats, C == 1 or H W == 1, gets fmt's strides: the same memory order)
    if (t.dim() != 4 || fmt != at::MemoryFormat::Contiguous) return t;
    const int64_t C = t.size(1), H = t.size(2), W = t.size(3);
    const std::array<int64_t, 4> st = {C * H * W, H * W, W, 1};
    return t.strides() == at::IntArrayRef(st) ? t : t.as_strided(t.sizes(), st);
  }
  const bool to_nhwc = fmt == at::MemoryFormat::ChannelsLast;
  const at::MemoryFormat from = to_nhwc ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  if (t.dim() != 4 || !t.is_contiguous(from) || t.numel() == 0 ||
      (t.scalar_type() != at::kFloat && t.scalar_type() != at::kDouble))
    return t.contiguous(fmt);
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(fmt));
  kernels()->reorder(t, out, to_nhwc);
  return out;
}

// Output of the op in the input's memory format, from the NHWC result of the kernel.
at::Tensor to_input_format(const at::Tensor& nhwc, bool channels_last) {
  return channels_last ? nhwc : as_format(nhwc, at::MemoryFormat::Contiguous);
}

// Few input channels on NCHW input (LeNet's convolutions): the direct NCHW kernel, vectorized along
// the output row, beats reordering to NHWC (whose tiles would waste most of their output-channel lanes).
bool is_depthwise(const conv::Params& p) { return p.cin_g() == 1 && p.cout_g() == 1; }

// ... and depthwise on NCHW input: one plane at a time, no reorder.
// Any stride (phase-split rows: the stem). Not for 1x1 downsamples (C_in 64+): measured slower than the
// reorder and the gather GEMM (0.36x vs 0.67x torch, one thread, 2026-12-01).
bool use_nchw_direct(const conv::Params& p) {
  if (p.channels_last || p.W_out < 8) return false;
  // (rows shorter than 2 vectors waste most lanes: LeNet's second conv, W_out = 10, takes the panel
  // kernels before this: use_nchw_panel_fwd)
  return (p.groups == 1 && p.C_in <= 8 && p.C_in * p.kH * p.kW <= 512 && (p.W_out >= 16 || p.C_in <= 2)) ||
         (p.groups > 1 && is_depthwise(p));
}

// grad_input of a stride-1, one-group convolution on NCHW input with few output channels (LeNet's
// second conv: C_out = 16, C_in = 6): the forward of grad_out by the flipped, transposed weight
// (C_in, C_out, kH, kW) with padding dh (kH - 1) - top (...) on the direct NCHW kernel, vectorized
// along the row; the gather GEMM would spend most of its NB-wide tiles on absent input channels.
bool use_bwd_input_as_nchw_fwd(const conv::Params& p) {
  if (p.channels_last || p.groups != 1 || p.sh != 1 || p.sw != 1 || p.W < 8) return false;
  if (p.C_out > 16 || p.C_out * p.kH * p.kW > 512 || p.C_in > 64) return false;
  return p.pt <= p.dh * (p.kH - 1) && p.pb <= p.dh * (p.kH - 1) && p.pl <= p.dw * (p.kW - 1) &&
         p.pr <= p.dw * (p.kW - 1);
}

// grad_weight / grad_bias of a one-group convolution on NCHW input with few input channels (LeNet's
// convolutions, the ResNet stem): the direct NCHW kernel (vectorized along the output row, a register
// tile of output channels x taps) on grad_out and input as they are, no reorder to NHWC.
// Also any grouped convolution with few input channels per group (depthwise: one group after the other).
bool use_nchw_bwd_weight(const conv::Params& p) { static const bool off = std::getenv("EXP_GW"); return !off && !p.channels_last && p.cin_g() <= 4; }

// grad_input of a stride-1 depthwise convolution: the depthwise forward of grad_out by the flipped
// weight, with padding dh (kH - 1) - top (...), on the forward's kernels of the layout (NCHW: the direct
// kernel along the row; NHWC: the pixel-blocked one). No transpose: each channel is its own group.
bool use_depthwise_bwd_input_as_fwd(const conv::Params& p) {
  if (p.groups == 1 || !is_depthwise(p) || p.sh != 1 || p.sw != 1) return false;
  return p.pt <= p.dh * (p.kH - 1) && p.pb <= p.dh * (p.kH - 1) && p.pl <= p.dw * (p.kW - 1) &&
         p.pr <= p.dw * (p.kW - 1);
}

// 1x1, one group (ResNet's downsamples): the kernels of conv2d_1x1_kernel.cpp.
// PYFASTDL_CONV2D_1X1=0 (read once) turns them off (benchmarks of the old paths).
bool use_1x1(const conv::Params& p) {
  static const bool enabled = [] {
    const char* e = std::getenv("PYFASTDL_CONV2D_1X1");
    return !(e && std::strcmp(e, "0") == 0);
  }();
  return enabled && p.groups == 1 && p.kH == 1 && p.kW == 1;
}

// On NCHW input: the pixel GEMM, its strided input panel packed per tile straight from the NCHW planes
// and the output written in NCHW, for the forward and both gradients; no reorder to NHWC and back.
// Measured on the 2-core AMD EPYC (AVX2), 2026-12-01, one thread (the machine shared, load 2.3-3), the
// ResNet-18 downsample 8x64x56x56 -> 128, stride 2: forward 4.3-9.4 -> 2.0-3.4 ms (torch 2.6-4.7 ms),
// grad_input 6.3 -> 2.6-3.3 ms, grad_weight 7.0 -> 2.3-2.6 ms (minimums of 15).
bool use_nchw_1x1(const conv::Params& p) { return use_1x1(p) && !p.channels_last; }
// ... but its gradients only on large planes: on small ones each channel's plane is a short row, and
// grad_out and the input reordered to NHWC (and grad_input back) win. Measured on the 2-core AMD EPYC
// Zen 5 (AVX-512), 2026-12-02, 2 threads, ResNet-18's downsamples at batch 8, grad_input + grad_weight
// + grad_bias: 256 -> 512 at 14 -> 7 px 3.85 -> 1.2 ms, 128 -> 256 at 28 -> 14 px 2.15 -> 1.34 ms; 64 -> 128
// at 56 -> 28 px (784 output pixels) stays on the NCHW kernels (1.3 ms against 5.0). A padded 1x1 also
// stays: the NHWC grad_weight skips the padding, so a non-finite grad_out there would not reach it as
// in torch (test_conv2d_1x1.py: test_1x1_nhwc_grad_weight_skips_padding).
bool use_nchw_1x1_bwd(const conv::Params& p) {
  const bool padded = p.pt != 0 || p.pb != 0 || p.pl != 0 || p.pr != 0;
  return use_nchw_1x1(p) && (padded || p.H_out * p.W_out >= 392);
}

// grad_input on channels_last input: per output pixel the C_in channels of W^T g (K = C_out contiguous),
// written to the input pixel it read; the rest zeroed row by row. The gather GEMM over the input pixels
// spent a tile on every input pixel, 3/4 of them without a grad_out pixel at stride 2: 4.1 -> 2.1-2.3 ms
// on the same layer (same machine, one thread, load 3.1).
bool use_nhwc_1x1_bwd_input(const conv::Params& p) { return use_1x1(p) && p.channels_last; }

// The im2col-panel kernels (conv2d_panel_kernel.cpp) on NCHW input: one group, few input channels
// (C_in <= 8), K = C_in kH kW <= 512, output rows narrower than 16 (the direct kernel wastes most lanes
// of their vectors; the NHWC gather GEMM reorders and gathers 24-byte pieces per tile). Taken before
// use_nchw_direct and use_bwd_input_as_nchw_fwd. Measured on the 2-core AMD EPYC (AVX2), 2026-12-01,
// one thread, LeNet's second conv 256x6x14x14 -> 16, 5x5 (the machine shared, load 4.5-5.3: thread
// CPU time, min of 25-30, interleaved with torch): forward 5.0-5.4 -> 4.2-4.6 ms (torch 4.2-4.6),
// grad_input 7.6 -> 3.1-3.7 ms (torch 3.6-5.2). grad_weight stays on the direct NCHW kernel.
// PYFASTDL_CONV2D_PANEL=0 (read once) turns them off (A/B against the old paths); =all takes them for
// every one-group NCHW convolution with 0 < K <= 512, kH kW <= 64 (measurements; grad_input: stride 1
// along W).
int panel_mode() {
  static const int mode = [] {
    const char* e = std::getenv("PYFASTDL_CONV2D_PANEL");
    if (e && std::strcmp(e, "0") == 0) return 0;
    if (e && std::strcmp(e, "all") == 0) return 2;
    return 1;
  }();
  return mode;
}
bool panel_admits(const conv::Params& p) {
  const int64_t K = p.C_in * p.kH * p.kW;
  return !p.channels_last && p.groups == 1 && K > 0 && K <= 512 && p.kH * p.kW <= 64;
}
bool use_nchw_panel_fwd(const conv::Params& p) {
  const int mode = panel_mode();
  if (mode == 0 || !panel_admits(p)) return false;
  return mode == 2 || (p.C_in <= 8 && p.W_out < 16);
}
bool use_nchw_panel_bwd_input(const conv::Params& p) {
  const int mode = panel_mode();
  if (mode == 0 || !panel_admits(p) || p.sw != 1) return false;
  return mode == 2 || (p.C_in <= 8 && p.W_out < 16);
}
// ... and on channels_last input with as few input channels and rows as narrow (ResNet-18 / 8's
// 8 -> 8 layers at 8x8): grad_out reordered to NCHW, the panel kernel, grad_input reordered back.
// Measured on the 2-core AMD EPYC (2026-12-02, one thread, thread CPU time, min of 200), 128x8x8x8,
// 3x3, 8 -> 8: the NHWC gather GEMM 0.62-0.66 ms, the panel 0.32 ms, the two reorders 0.07-0.09 ms.
bool use_cl_panel_bwd_input(const conv::Params& p) {
  conv::Params q = p;
  q.channels_last = false;
  return p.channels_last && panel_mode() == 1 && !use_nhwc_1x1_bwd_input(p) && use_nchw_panel_bwd_input(q);
}

}  // namespace

at::Tensor conv2d_fwd_cpu(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const conv::Params p =
      conv::check_fwd(input, weight, bias, stride, padding, dilation, groups, {at::kFloat, at::kDouble}, "conv2d");
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  if (cpu::winograd_selected(p, input.scalar_type(), false)) return cpu::conv2d_winograd_fwd(input, w, b, p);  // 3x3/1
  if (use_nchw_1x1(p)) {
    at::Tensor y = at::empty({p.N, p.C_out, p.H_out, p.W_out}, input.options());
    if (y.numel() > 0) kernels_1x1()->fwd_nchw(input.contiguous(), w, b, p, y);
    return y;
  }
  if (use_nchw_panel_fwd(p)) {
    at::Tensor y = at::empty({p.N, p.C_out, p.H_out, p.W_out}, input.options());
    if (y.numel() > 0) kernels_panel()->fwd_nchw(input.contiguous(), w, b, p, y);
    return y;
  }
  if (use_nchw_direct(p)) {
    at::Tensor y = at::empty({p.N, p.C_out, p.H_out, p.W_out}, input.options());
    if (y.numel() > 0) kernels()->fwd_nchw(input.contiguous(), w, b, p, y);
    return y;
  }
  const at::Tensor x = as_format(input, at::MemoryFormat::ChannelsLast);
  // NCHW output written by the kernel directly (no reorder), except for depthwise (NHWC vectors)
  const bool nhwc_out = p.channels_last || is_depthwise(p);
  at::Tensor y = at::empty({p.N, p.C_out, p.H_out, p.W_out},
                           input.options().memory_format(nhwc_out ? at::MemoryFormat::ChannelsLast
                                                                  : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return to_input_format(y, p.channels_last);
  kernels()->fwd(x, w, b, p, y);
  return to_input_format(y, p.channels_last);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                              const at::Tensor& weight, at::IntArrayRef stride,
                                                              at::IntArrayRef padding, at::IntArrayRef dilation,
                                                              int64_t groups, std::array<bool, 3> output_mask) {
  const conv::Params p = conv::check_bwd(grad_out, input, weight, stride, padding, dilation, groups,
                                         {at::kFloat, at::kDouble}, "conv2d_bwd");
  const auto cl = at::MemoryFormat::ChannelsLast;
  at::Tensor gi, gw, gb;
  if (use_nchw_1x1_bwd(p)) {  // grad_out, input and grad_input in NCHW as they are
    const at::Tensor go = grad_out.contiguous();
    if (output_mask[0]) {
      gi = at::empty({p.N, p.C_in, p.H, p.W}, input.options().memory_format(at::MemoryFormat::Contiguous));
      if (gi.numel() > 0) {
        if (go.numel() == 0 || weight.numel() == 0) gi.zero_();
        else kernels_1x1()->bwd_input_nchw(go, weight.contiguous(), p, gi);
      }
    }
    if (output_mask[1]) gw = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
    if (output_mask[2]) gb = at::empty({p.C_out}, weight.options());
    if (output_mask[1] || output_mask[2]) {
      if (go.numel() == 0 || input.numel() == 0) {
        if (gw.defined()) gw.zero_();
        if (gb.defined()) gb.zero_();
        if (gb.defined() && go.numel() > 0) gb.copy_(go.sum({0, 2, 3}));  // input empty, grad_out not: C_in = 0
      } else {
        kernels_1x1()->bwd_weight_nchw(go, input.contiguous(), p, gw, gb);
      }
    }
    return {gi, gw, gb};
  }
  const bool wb_nchw = (output_mask[1] || output_mask[2]) && use_nchw_bwd_weight(p);
  const bool gi_dw = output_mask[0] && use_depthwise_bwd_input_as_fwd(p);
  // Winograd first when it is selected (forced, or measured faster): the panel is for shapes it skips
  const bool gi_wino = output_mask[0] && cpu::winograd_selected(p, input.scalar_type(), true);
  const bool gi_cl_panel = output_mask[0] && !gi_wino && use_cl_panel_bwd_input(p);
  const bool gi_panel = output_mask[0] && !gi_wino && (use_nchw_panel_bwd_input(p) || gi_cl_panel);
  // 1x1 grad_input on the NHWC kernel: channels_last input, or NCHW input on small planes (reordered)
  const bool gi_1x1_nhwc = output_mask[0] && (use_nhwc_1x1_bwd_input(p) || (use_1x1(p) && !p.channels_last &&
                                                                            !use_bwd_input_as_nchw_fwd(p) && !gi_panel));
  const at::Tensor g = ((output_mask[0] && !use_bwd_input_as_nchw_fwd(p) && !gi_dw && !gi_panel) || ((output_mask[1] || output_mask[2]) && !wb_nchw))
                           ? as_format(grad_out, cl)
                           : grad_out;  // (only its sizes are read on the direct NCHW paths)
  if (gi_dw) {
    const at::Tensor wf = weight.flip({2, 3}).contiguous();
    const std::array<int64_t, 2> st = {1, 1}, dil = {p.dh, p.dw};
    const std::array<int64_t, 4> pad = {p.dh * (p.kH - 1) - p.pt, p.dh * (p.kH - 1) - p.pb,
                                        p.dw * (p.kW - 1) - p.pl, p.dw * (p.kW - 1) - p.pr};
    const at::MemoryFormat fmt = p.channels_last ? cl : at::MemoryFormat::Contiguous;
    gi = conv2d_fwd_cpu(grad_out.contiguous(fmt), wf, c10::nullopt, st, pad, dil, p.groups).contiguous(fmt);
  } else if (output_mask[0]) {
    gi = at::empty({p.N, p.C_in, p.H, p.W},
                   input.options().memory_format((p.channels_last && !gi_cl_panel) || (is_depthwise(p) && !gi_panel) ||
                                                 gi_1x1_nhwc
                                                     ? cl : at::MemoryFormat::Contiguous));
    if (gi.numel() > 0) {
      if (g.numel() == 0 || weight.numel() == 0) gi.zero_();
      else if (gi_1x1_nhwc) kernels_1x1()->bwd_input_nhwc(g, weight.contiguous(), p, gi);
      else if (gi_panel) {
        kernels_panel()->bwd_input_nchw(grad_out.contiguous(), weight.contiguous(), p, gi);
        if (gi_cl_panel) gi = as_format(gi, cl);
      }
      else if (gi_wino) cpu::conv2d_winograd_bwd_input(g, weight, p, gi);
      else if (use_bwd_input_as_nchw_fwd(p)) {
        const at::Tensor wt = weight.flip({2, 3}).transpose(0, 1).contiguous();
        const std::array<int64_t, 2> st = {1, 1}, dil = {p.dh, p.dw};
        const std::array<int64_t, 4> pad = {p.dh * (p.kH - 1) - p.pt, p.dh * (p.kH - 1) - p.pb,
                                            p.dw * (p.kW - 1) - p.pl, p.dw * (p.kW - 1) - p.pr};
        const at::Tensor go = grad_out.contiguous();
        const conv::Params q = conv::check_fwd(go, wt, c10::nullopt, st, pad, dil, 1, {at::kFloat, at::kDouble},
                                               "conv2d_bwd");
        kernels()->fwd_nchw(go, wt, at::Tensor(), q, gi);
      } else kernels()->bwd_input(g, weight.contiguous(), p, gi);
    }
    gi = to_input_format(gi, p.channels_last);
  }
  if (output_mask[1] || output_mask[2]) {
    if (output_mask[1]) gw = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
    if (output_mask[2]) gb = at::empty({p.C_out}, weight.options());
    if (g.numel() == 0 || input.numel() == 0) {
      if (gw.defined()) gw.zero_();
      if (gb.defined()) gb.zero_();
      if (gb.defined() && g.numel() > 0) gb.copy_(g.sum({0, 2, 3}));  // input empty, grad_out not: C_in = 0
    } else if (wb_nchw) {
      kernels()->bwd_weight_nchw(grad_out.contiguous(), input.contiguous(), p, gw, gb);
    } else {
      kernels()->bwd_weight(g, as_format(input, cl), p, gw, gb);
    }
  }
  return {gi, gw, gb};
}

TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("conv2d_fwd", &conv2d_fwd_cpu);
  m.impl("conv2d_bwd", &conv2d_bwd_cpu);
}

}  // namespace pyfastdl
