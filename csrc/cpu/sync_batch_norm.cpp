// Sync-batch-norm CPU launchers (csrc/ops.cpp: sync_batch_norm_stats, sync_batch_norm_bwd_elemt):
// the per-channel statistics a rank contributes to the process group's, and the backward's
// elementwise pass from the all-reduced sums. Registered under the CPU dispatch key.
//
// Numerics: the statistics are two passes in float64 (the mean, then the sum of squared deviations
// from it: Welford's M2, exact to float64 rounding however large |mean| / std is), summed over fixed
// chunks merged in a fixed order, so the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/batch_norm.h"
#include "common/sync_batch_norm.h"

namespace pyfastdl {
namespace {

// (M, C) rows, C innermost, split into at most kMaxChunks chunks of whole rows; the chunking depends
// on M only (never on the thread count).
constexpr int64_t kMaxChunks = 64, kMinRows = 64;

template <typename T>
void stats_channels_last(const T* x, int64_t M, int64_t C, double* mean, double* m2) {
  const int64_t rows = std::max(kMinRows, (M + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (M + rows - 1) / rows;
  std::vector<double> part(static_cast<size_t>(chunks * C));
  auto pass = [&](bool second) {
    std::fill(part.begin(), part.end(), 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        double* acc = part.data() + k * C;
        const int64_t r1 = std::min(M, (k + 1) * rows);
        for (int64_t r = k * rows; r < r1; ++r) {
          const T* row = x + r * C;
          if (second) {
            for (int64_t c = 0; c < C; ++c) {
              const double d = static_cast<double>(row[c]) - mean[c];
              acc[c] += d * d;
            }
          } else {
            for (int64_t c = 0; c < C; ++c) acc[c] += static_cast<double>(row[c]);
          }
        }
      }
    });
    double* out = second ? m2 : mean;
    for (int64_t c = 0; c < C; ++c) out[c] = 0.0;
    for (int64_t k = 0; k < chunks; ++k)
      for (int64_t c = 0; c < C; ++c) out[c] += part[k * C + c];
  };
  pass(false);
  for (int64_t c = 0; c < C; ++c) mean[c] = M > 0 ? mean[c] / static_cast<double>(M) : 0.0;
  pass(true);
}

// (N, C, S) contiguous: channel c is N planes of S elements. Channels in parallel.
template <typename T>
void stats_ncs(const T* x, int64_t N, int64_t C, int64_t S, double* mean, double* m2) {
  const double n = static_cast<double>(N * S);
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      double s = 0.0;
      for (int64_t i = 0; i < N; ++i) {
        const T* p = x + (i * C + c) * S;
        double ps = 0.0;
        for (int64_t j = 0; j < S; ++j) ps += static_cast<double>(p[j]);
        s += ps;
      }
      const double mu = n > 0 ? s / n : 0.0;
      double q = 0.0;
      for (int64_t i = 0; i < N; ++i) {
        const T* p = x + (i * C + c) * S;
        double pq = 0.0;
        for (int64_t j = 0; j < S; ++j) {
          const double d = static_cast<double>(p[j]) - mu;
          pq += d * d;
        }
        q += pq;
      }
      mean[c] = mu;
      m2[c] = q;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sync_batch_norm_stats_cpu(const at::Tensor& input) {
  sbn::check_stats(input, {at::kFloat, at::kDouble});
  bn::Layout L;
  const at::Tensor x = bn::to_kernel_layout(input, L);
  const auto opts = x.options().dtype(at::kDouble);
  at::Tensor mean = at::zeros({L.C}, opts), m2 = at::zeros({L.C}, opts);
  if (x.numel() == 0) return {mean, m2};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sync_batch_norm_stats_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (L.channels_last) {
      stats_channels_last(xp, L.N * L.S, L.C, mean.mutable_data_ptr<double>(), m2.mutable_data_ptr<double>());
    } else {
      stats_ncs(xp, L.N, L.C, L.S, mean.mutable_data_ptr<double>(), m2.mutable_data_ptr<double>());
    }
  });
  return {mean, m2};
}

at::Tensor sync_batch_norm_bwd_elemt_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                         const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                         const at::Tensor& invstd, const at::Tensor& sum_dy,
                                         const at::Tensor& sum_dy_xhat, int64_t count) {
  sbn::check_bwd_elemt(grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xhat, count, {at::kFloat, at::kDouble});
  bn::Layout L;
  const at::Tensor x = bn::to_kernel_layout(input, L);
  const at::Tensor g = bn::to_layout(grad_out, L);
  at::Tensor grad_input = at::empty_like(x);
  if (x.numel() == 0) return grad_input;
  const int64_t C = L.C;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sync_batch_norm_bwd_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // grad_input = a * g + b * (x - mean) + d per channel:
    //   a = weight * invstd, b = -a * invstd * sum_dy_xhat / count, d = -a * sum_dy / count
    std::vector<acc_t> a(C), b(C), d(C), mu(C);
    const at::Tensor w = weight.has_value() && weight->defined() ? weight->to(at::kDouble).contiguous() : at::Tensor();
    const at::Tensor m64 = mean.to(at::kDouble).contiguous(), i64 = invstd.to(at::kDouble).contiguous();
    const at::Tensor s64 = sum_dy.to(at::kDouble).contiguous(), sx64 = sum_dy_xhat.to(at::kDouble).contiguous();
    const double* wp = w.defined() ? w.const_data_ptr<double>() : nullptr;
    const double *mp = m64.const_data_ptr<double>(), *ip = i64.const_data_ptr<double>();
    const double *sp = s64.const_data_ptr<double>(), *sxp = sx64.const_data_ptr<double>();
    const double n = static_cast<double>(count);
    for (int64_t c = 0; c < C; ++c) {
      const double ac = (wp ? wp[c] : 1.0) * ip[c];
      a[c] = static_cast<acc_t>(ac);
      b[c] = static_cast<acc_t>(-ac * ip[c] * sxp[c] / n);
      d[c] = static_cast<acc_t>(-ac * sp[c] / n);
      mu[c] = static_cast<acc_t>(mp[c]);
    }
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* op = grad_input.mutable_data_ptr<scalar_t>();
    if (L.channels_last) {
      const int64_t M = L.N * L.S;
      at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = xp + r * C;
          const scalar_t* gr = gp + r * C;
          scalar_t* orow = op + r * C;
          for (int64_t c = 0; c < C; ++c)
            orow[c] = static_cast<scalar_t>(a[c] * static_cast<acc_t>(gr[c]) +
                                            b[c] * (static_cast<acc_t>(xr[c]) - mu[c]) + d[c]);
        }
      });
    } else {
      const int64_t S = L.S;
      at::parallel_for(0, L.N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1)), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c = p % C;
          const acc_t ac = a[c], bc = b[c], dc = d[c], mc = mu[c];
          const scalar_t* xr = xp + p * S;
          const scalar_t* gr = gp + p * S;
          scalar_t* orow = op + p * S;
          for (int64_t j = 0; j < S; ++j)
            orow[j] = static_cast<scalar_t>(ac * static_cast<acc_t>(gr[j]) + bc * (static_cast<acc_t>(xr[j]) - mc) + dc);
        }
      });
    }
  });
  return grad_input;
}

TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("sync_batch_norm_stats", &sync_batch_norm_stats_cpu);
  m.impl("sync_batch_norm_bwd_elemt", &sync_batch_norm_bwd_elemt_cpu);
}

}  // namespace pyfastdl
