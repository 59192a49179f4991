// conv2d Winograd F(4x4, 3x3) on the CPU: the selection rule, the algorithm switch and the launchers
// called by conv2d.cpp (the SIMD kernels: conv2d_winograd_kernel.cpp; the switch:
// conv2d_winograd_kernel.h). The launchers follow conv2d.cpp's: NHWC inside, the output in the input's
// layout, NCHW written directly by the output transform.
#include <ATen/ATen.h>

#include <array>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

#include "common/conv2d.h"
#include "cpu/conv2d_winograd_kernel.h"

namespace pyfastdl {
namespace cpu {
namespace {

enum Algo : int { kAuto = 0, kDirect = 1, kWinograd = 2 };
const char* const kAlgoNames[] = {"auto", "direct", "winograd"};

int parse(c10::string_view s, bool* ok) {
  std::string m(s);
  for (auto& ch : m) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  *ok = true;
  if (m == "auto") return kAuto;
  if (m == "direct") return kDirect;
  if (m == "winograd") return kWinograd;
  *ok = false;
  return kAuto;
}

// The mode, from PYFASTDL_CONV2D_ALGO at the first use, then conv2d_cpu_algo(mode).
std::atomic<int>& mode_ref() {
  static std::atomic<int> mode{[] {
    const char* env = std::getenv("PYFASTDL_CONV2D_ALGO");
    if (!env || !*env) return int(kAuto);
    bool ok = false;
    const int m = parse(env, &ok);
    TORCH_CHECK(ok, "PYFASTDL_CONV2D_ALGO: expected auto, direct or winograd, got '", env, "'");
    return m;
  }()};
  return mode;
}

// The algorithm of the last forward / grad_input: -1 none yet, else kDirect or kWinograd.
std::atomic<int> last_fwd{-1}, last_bwd_input{-1};

// Measured faster than the direct kernel (float32; 2-core AMD EPYC, AVX2; the ResNet-18 3x3 layers at
// batch 8, 64..512 channels at 56..7 px: 1.3-2.6x the direct kernel forward; docs/architecture.md,
// "Winograd"), with an error against float64 of 1-3e-6 normwise there (bound: 1e-4): 64+ channels on both sides and 7+ output pixels
// along H and W (smaller images waste most of a 4x4 tile; fewer channels: not measured). Up to 1024
// input channels (the error grows with the contraction; measured up to 512).
bool measured_faster(const conv::Params& p, bool grad_input) {
  // the convolution that runs: grad_input is a forward with the channel counts swapped, onto H x W
  const int64_t cin = grad_input ? p.C_out : p.C_in, cout = grad_input ? p.C_in : p.C_out;
  const int64_t ho = grad_input ? p.H : p.H_out, wo = grad_input ? p.W : p.W_out;
  return cin >= 64 && cout >= 64 && cin <= 1024 && ho >= 7 && wo >= 7;
}

}  // namespace

bool winograd_applies(const conv::Params& p, at::ScalarType dtype, bool grad_input) {
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  if (p.kH != 3 || p.kW != 3 || p.sh != 1 || p.sw != 1 || p.dh != 1 || p.dw != 1 || p.groups != 1) return false;
  if (p.N < 1 || p.C_in < 1 || p.C_out < 1 || p.H_out < 1 || p.W_out < 1) return false;
  return !grad_input || (p.pt <= 2 && p.pb <= 2 && p.pl <= 2 && p.pr <= 2);
}

bool winograd_selected(const conv::Params& p, at::ScalarType dtype, bool grad_input) {
  const int mode = mode_ref().load(std::memory_order_relaxed);
  bool use = false;
  if (mode != kDirect && winograd_applies(p, dtype, grad_input))
    use = mode == kWinograd || (dtype == at::kFloat && measured_faster(p, grad_input));
  (grad_input ? last_bwd_input : last_fwd).store(use ? kWinograd : kDirect, std::memory_order_relaxed);
  return use;
}

at::Tensor conv2d_winograd_fwd(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                               const conv::Params& p) {
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.defined() ? bias.contiguous() : at::Tensor();
  at::Tensor y = at::empty({p.N, p.C_out, p.H_out, p.W_out},
                           input.options().memory_format(p.channels_last ? at::MemoryFormat::ChannelsLast
                                                                          : at::MemoryFormat::Contiguous));
  conv2d_winograd_kernels()->fwd(x, w, b, p, /*flip_transpose=*/false, y);
  return y;
}

void conv2d_winograd_bwd_input(const at::Tensor& g, const at::Tensor& weight, const conv::Params& p, at::Tensor& gi) {
  // grad_input = the forward of g by the flipped, transposed weight with padding 2 - p, stride 1
  conv::Params q = p;
  q.C_in = p.C_out;
  q.H = p.H_out;
  q.W = p.W_out;
  q.C_out = p.C_in;
  q.H_out = p.H;
  q.W_out = p.W;
  q.pt = 2 - p.pt;
  q.pb = 2 - p.pb;
  q.pl = 2 - p.pl;
  q.pr = 2 - p.pr;
  conv2d_winograd_kernels()->fwd(g, weight.contiguous(), at::Tensor(), q, /*flip_transpose=*/true, gi);
}

std::string conv2d_cpu_algo(c10::string_view mode) {
  auto name = [](int a) { return a < 0 ? "none" : kAlgoNames[a]; };
  if (mode.empty()) return kAlgoNames[mode_ref().load()];
  if (mode == "last")
    return std::string("fwd=") + name(last_fwd.load()) + ";bwd_input=" + name(last_bwd_input.load());
  bool ok = false;
  const int m = parse(mode, &ok);
  TORCH_CHECK(ok, "conv2d_cpu_algo: expected mode 'auto', 'direct', 'winograd', '' or 'last', got '",
              std::string(mode), "'");
  return kAlgoNames[mode_ref().exchange(m)];
}

}  // namespace cpu
}  // namespace pyfastdl
