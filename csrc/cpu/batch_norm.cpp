// Batch-norm CPU launchers: validate (common/batch_norm.h), allocate, do the per-channel math of
// the statistics in float64, and run the SIMD kernels of the CPU's capability
// (batch_norm_kernel.cpp). Registered under the CPU dispatch key.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "common/batch_norm.h"
#include "cpu/batch_norm_kernel.h"
#include "cpu/capability.h"

namespace pyfastdl {
namespace {

const cpu::BatchNormKernels* kernels() {
  switch (cpu::capability()) {
    case cpu::Capability::AVX512: return cpu::batch_norm_kernels_AVX512();
    case cpu::Capability::AVX2: return cpu::batch_norm_kernels_AVX2();
    default: return cpu::batch_norm_kernels_DEFAULT();
  }
}

// The kernels' per-channel constants (cpu/batch_norm_kernel.h): m1 = mean rounded to T,
// m2 = the rest of the float64 mean (nullptr: 0), scale = weight * invstd, bias (None: 0).
// Forward and backward both build them here, so the backward's ReLU mask is the forward's.
template <typename T>
cpu::NormConsts norm_consts(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& m1, const double* mean, const at::Tensor& invstd) {
  const int64_t C = m1.numel();
  cpu::NormConsts k{m1, at::zeros({C}, m1.options()), at::empty({C}, m1.options()),
                    at::zeros({C}, m1.options())};
  const bool has_w = weight.has_value() && weight->defined();
  const at::Tensor w = has_w ? weight->contiguous() : at::Tensor();
  if (bias.has_value() && bias->defined()) k.bias.copy_(*bias);
  const T* wp = has_w ? w.const_data_ptr<T>() : nullptr;
  const T* mp = m1.const_data_ptr<T>();
  const T* ip = invstd.const_data_ptr<T>();
  T* m2 = k.m2.mutable_data_ptr<T>();
  T* sc = k.scale.mutable_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    sc[c] = (wp ? wp[c] : T(1)) * ip[c];
    if (mean) m2[c] = static_cast<T>(mean[c] - static_cast<double>(mp[c]));
  }
  return k;
}

// Brings grad_out into the memory layout chosen for input.
at::Tensor like_layout(const at::Tensor& g, const at::Tensor& x, const bn::Layout& L) {
  if (!L.channels_last || g.dim() <= 3 || L.S == 1) return g.contiguous();
  return g.contiguous(g.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    bool relu) {
  bn::check_fwd(input, weight, bias, running_mean, running_var, training, momentum, eps,
                {at::kFloat, at::kDouble});
  bn::Layout L;
  const at::Tensor x = bn::to_kernel_layout(input, L);
  const int64_t C = L.C;
  at::Tensor y = at::empty_like(x);
  at::Tensor save_mean = at::empty({C}, x.options());
  at::Tensor save_invstd = at::empty({C}, x.options());
  if (x.numel() == 0) {
    save_mean.zero_();
    save_invstd.zero_();
    return {y, save_mean, save_invstd};
  }
  const bool has_running = running_mean.has_value() && running_mean->defined();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_fwd_cpu", [&] {
    auto sm = save_mean.accessor<scalar_t, 1>();
    auto si = save_invstd.accessor<scalar_t, 1>();
    std::vector<double> batch_mean(training ? C : 0);
    if (training) {
      std::vector<double> var(C);
      double* mean = batch_mean.data();
      kernels()->stats(x, L, mean, var.data());
      for (int64_t c = 0; c < C; ++c) {
        sm[c] = static_cast<scalar_t>(mean[c]);
        si[c] = static_cast<scalar_t>(1.0 / std::sqrt(var[c] + eps));
      }
      if (has_running) {
        auto rm = running_mean->accessor<scalar_t, 1>();
        auto rv = running_var->accessor<scalar_t, 1>();
        const double n = static_cast<double>(L.reduce_size());
        const double unbias = n / (n - 1);
        for (int64_t c = 0; c < C; ++c) {
          rm[c] = static_cast<scalar_t>((1 - momentum) * rm[c] + momentum * mean[c]);
          rv[c] = static_cast<scalar_t>((1 - momentum) * rv[c] + momentum * var[c] * unbias);
        }
      }
    } else {
      auto rm = running_mean->accessor<scalar_t, 1>();
      auto rv = running_var->accessor<scalar_t, 1>();
      for (int64_t c = 0; c < C; ++c) {
        sm[c] = rm[c];
        si[c] = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
      }
    }
    const cpu::NormConsts k =
        norm_consts<scalar_t>(weight, bias, save_mean, training ? batch_mean.data() : nullptr, save_invstd);
    kernels()->apply(x, L, k, relu, y);
  });
  return {y, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, bool relu) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "batch_norm_bwd: input dtype ", input.scalar_type(), " is not supported on cpu");
  bn::check_bwd(grad_out, input, save_mean, save_invstd);
  bn::Layout L;
  const at::Tensor x = bn::to_kernel_layout(input, L);
  const at::Tensor g = like_layout(grad_out, x, L);
  const int64_t C = L.C;
  at::Tensor grad_input = at::empty_like(x);
  at::Tensor grad_weight = at::zeros({C}, x.options());
  at::Tensor grad_bias = at::zeros({C}, x.options());
  if (x.numel() == 0) return {grad_input, grad_weight, grad_bias};
  const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_bwd_cpu", [&] {
    const cpu::NormConsts k = norm_consts<scalar_t>(weight, bias, mean, nullptr, invstd);
    std::vector<double> sum_g(C), sum_gx(C);
    kernels()->bwd_reduce(g, x, L, k, relu, sum_g.data(), sum_gx.data());
    // grad_input = scale * (g' - sum_g / n - xhat * sum(g' * xhat) / n), xhat = (x - mean) * invstd
    //            = a * g' + b * (x - mean) + d
    const at::Tensor& scale = k.scale;
    at::Tensor a = scale, b = at::zeros({C}, x.options()), d = at::zeros({C}, x.options());
    const scalar_t* ip = invstd.const_data_ptr<scalar_t>();
    const scalar_t* sp = scale.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
    scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
    scalar_t* bp = b.mutable_data_ptr<scalar_t>();
    scalar_t* dp = d.mutable_data_ptr<scalar_t>();
    const double n = static_cast<double>(L.reduce_size());
    for (int64_t c = 0; c < C; ++c) {
      gb[c] = static_cast<scalar_t>(sum_g[c]);
      gw[c] = static_cast<scalar_t>(sum_gx[c] * ip[c]);
      if (training) {
        const double s = sp[c], is = ip[c];
        const double bc = -s * is * is * sum_gx[c] / n;
        bp[c] = static_cast<scalar_t>(bc);
        dp[c] = static_cast<scalar_t>(-s * sum_g[c] / n);
      }
    }
    kernels()->bwd_apply(g, x, L, k, a, b, d, relu, grad_input);
  });
  return {grad_input, grad_weight, grad_bias};
}

TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cpu);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cpu);
}

}  // namespace pyfastdl
