// Batch-norm CPU launchers: validate (common/batch_norm.h), allocate, do the per-channel math of
// the statistics in float64, and run the SIMD kernels of the CPU's capability
// (batch_norm_kernel.cpp). Registered under the CPU dispatch key.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "common/batch_norm.h"
#include "cpu/batch_norm_kernel.h"

namespace pyfastdl {
namespace {

constexpr auto kernels = &cpu::batch_norm_kernels;  // the table of the CPU's capability (cpu/capability.h)

// The kernels' per-channel constants (cpu/batch_norm_kernel.h): m1 = mean rounded to T, m2 = the
// rest of the float64 mean (0 in the backward), scale = weight * invstd, bias (None: 0). Forward and
// backward both fill them with set(), so the backward's activation input is the forward's.
template <typename T>
struct Consts {
  cpu::NormConsts k;
  const T* w;
  T *m1, *m2, *scale;
  at::Tensor m1_keep;  // m1's tensor, held (the caller may pass a temporary)
  at::Tensor buf;      // m2, scale, bias, then `extra` more (C,) slots for the caller: one allocation
  Consts(const c10::optional<at::Tensor>& bias, const at::Tensor& m1_tensor, const at::Tensor& w_contig,
         int64_t extra = 0) {
    const int64_t C = m1_tensor.numel();
    // one allocation (this runs on every call: small inputs feel it)
    buf = at::empty({(3 + extra) * C}, m1_tensor.options());
    w = w_contig.defined() ? w_contig.const_data_ptr<T>() : nullptr;
    m1_keep = m1_tensor;
    m1 = m1_keep.mutable_data_ptr<T>();
    m2 = buf.mutable_data_ptr<T>();
    scale = m2 + C;
    T* bp = m2 + 2 * C;
    k = {m1, m2, scale, bp};
    const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    const T* src = b.defined() ? b.const_data_ptr<T>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      m2[c] = T(0);
      bp[c] = src ? src[c] : T(0);
    }
  }
  // Channel c, given m1[c] already set (the saved mean) and the exact mean when known.
  void set(int64_t c, T invstd, const double* exact_mean) {
    scale[c] = (w ? w[c] : T(1)) * invstd;
    if (exact_mean) m2[c] = static_cast<T>(*exact_mean - static_cast<double>(m1[c]));
  }
};

at::Tensor contiguous_or_undefined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

// The fused per-channel kernels (statistics and normalization of a channel while it is in cache)
// run on the NCS layout when the channels split evenly enough over the threads.
bool use_fused(const bn::Layout& L) {
  const int64_t t = at::get_num_threads();
  return !L.channels_last && L.S > 1 && (L.C % t == 0 || L.C >= 8 * t);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& running_mean,
    const c10::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
    int64_t activation) {
  const int act = bn::check_activation(activation, "batch_norm");
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
  const at::Tensor w = contiguous_or_undefined(weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_fwd_cpu", [&] {
    Consts<scalar_t> k(bias, save_mean, w);
    scalar_t* si = save_invstd.mutable_data_ptr<scalar_t>();
    if (training) {
      at::TensorAccessor<scalar_t, 1> rm(nullptr, nullptr, nullptr), rv(nullptr, nullptr, nullptr);
      if (has_running) {
        rm = running_mean->accessor<scalar_t, 1>();
        rv = running_var->accessor<scalar_t, 1>();
      }
      const double n = static_cast<double>(L.reduce_size());
      // Everything per channel that follows from its batch statistics.
      auto on_stats = [&](int64_t c, double mean, double var) {
        k.m1[c] = static_cast<scalar_t>(mean);
        si[c] = static_cast<scalar_t>(1.0 / std::sqrt(var + eps));
        k.set(c, si[c], &mean);
        if (has_running) {
          rm[c] = static_cast<scalar_t>((1 - momentum) * rm[c] + momentum * mean);
          rv[c] = static_cast<scalar_t>((1 - momentum) * rv[c] + momentum * var * n / (n - 1));
        }
      };
      if (use_fused(L)) {
        kernels()->train_fwd_fused(x, L, on_stats, k.k, act, y);
      } else {
        std::vector<double> mean(C), var(C);
        kernels()->stats(x, L, mean.data(), var.data());
        for (int64_t c = 0; c < C; ++c) on_stats(c, mean[c], var[c]);
        kernels()->apply(x, L, k.k, act, y);
      }
    } else {
      auto rm = running_mean->accessor<scalar_t, 1>();
      auto rv = running_var->accessor<scalar_t, 1>();
      for (int64_t c = 0; c < C; ++c) {
        k.m1[c] = rm[c];
        si[c] = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(rv[c]) + eps));
        k.set(c, si[c], nullptr);
      }
      kernels()->apply(x, L, k.k, act, y);
    }
  });
  return {y, save_mean, save_invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, int64_t activation, std::array<bool, 3> output_mask) {
  const int act = bn::check_activation(activation, "batch_norm_bwd");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "batch_norm_bwd: input dtype ", input.scalar_type(), " is not supported on cpu");
  bn::check_bwd(grad_out, input, save_mean, save_invstd);
  bn::Layout L;
  const at::Tensor x = bn::to_kernel_layout(input, L);
  const at::Tensor g = bn::to_layout(grad_out, L);
  const int64_t C = L.C;
  // Only what output_mask asks for is computed; the rest is returned undefined (None in Python).
  const bool need_gi = output_mask[0], need_sums = output_mask[1] || output_mask[2];
  at::Tensor grad_input = need_gi ? at::empty_like(x) : at::Tensor();
  // not zero-filled: on_sums below writes every channel
  at::Tensor grad_weight = output_mask[1] ? at::empty({C}, x.options()) : at::Tensor();
  at::Tensor grad_bias = output_mask[2] ? at::empty({C}, x.options()) : at::Tensor();
  if (x.numel() == 0 || !(need_gi || need_sums)) {
    if (grad_weight.defined()) grad_weight.zero_();  // no element: zero sums
    if (grad_bias.defined()) grad_bias.zero_();
    return {grad_input, grad_weight, grad_bias};
  }
  const at::Tensor invstd = save_invstd.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_bwd_cpu", [&] {
    Consts<scalar_t> k(bias, save_mean.contiguous(), w, /*extra=*/2);
    const scalar_t* ip = invstd.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) k.set(c, ip[c], nullptr);
    // grad_input = scale * (g' - sum_g / n - xhat * sum(g' * xhat) / n), xhat = (x - mean) * invstd
    //            = a * g' + b * (x - mean) + d,  a = scale (eval: a * g' alone, see bwd_apply)
    const scalar_t* a = k.scale;
    // b, d: Consts' extra slots, zeroed (eval leaves them so)
    scalar_t* bp = k.m2 + 3 * C;
    scalar_t* dp = bp + C;
    std::fill_n(bp, 2 * C, scalar_t(0));
    scalar_t* gw = output_mask[1] ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gb = output_mask[2] ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
    const double n = static_cast<double>(L.reduce_size());
    auto on_sums = [&](int64_t c, double sum_g, double sum_gx) {
      if (gb) gb[c] = static_cast<scalar_t>(sum_g);
      if (gw) gw[c] = static_cast<scalar_t>(sum_gx * ip[c]);
      if (training) {
        const double s = k.scale[c], is = ip[c];
        bp[c] = static_cast<scalar_t>(-s * is * is * sum_gx / n);
        dp[c] = static_cast<scalar_t>(-s * sum_g / n);
      }
    };
    if (training && need_gi && use_fused(L)) {
      kernels()->bwd_fused(g, x, L, k.k, on_sums, a, bp, dp, act, grad_input);
    } else {
      // The sums: for grad_weight / grad_bias, and for grad_input when training.
      if (need_sums || training) {
        std::vector<double> sum_g(C), sum_gx(C);
        kernels()->bwd_reduce(g, x, L, k.k, act, sum_g.data(), sum_gx.data());
        for (int64_t c = 0; c < C; ++c) on_sums(c, sum_g[c], sum_gx[c]);
      }
      if (need_gi) kernels()->bwd_apply(g, x, L, k.k, a, bp, dp, act, training, grad_input);
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("batch_norm_fwd", &batch_norm_fwd_cpu);
  m.impl("batch_norm_bwd", &batch_norm_bwd_cpu);
}

}  // namespace pyfastdl
