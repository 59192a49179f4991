// Flash-attention CPU kernels for one SIMD capability (see attention_kernel.h). setup.py compiles this
// file once per capability with CPU_CAPABILITY set (DEFAULT, AVX2, AVX512) and the matching flags.
//
// Forward (FlashAttention-2): one task per (b, h, block of kBq queries); the key blocks of kBk keys
// stream past with a running row max and sum; scores S = scale Q K^T and the update O += P V are
// small GEMMs (ATen's CPU BLAS), the masking, exp and row sums SIMD. Only O(kBq x kBk) scores exist at
// a time. Backward: one task per (b, key/value head, block of keys): for every query block of the
// heads that read those keys, P is recomputed from the saved log-sum-exp, dV += P^T dO,
// dS = P (dO V^T - delta), dK += dS^T Q, and dQ += dS K into a per-thread buffer summed at the end
// (so no two threads write the same dQ row), memory O(threads x L x E).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ATen.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention_kernel.h"

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
// Block sizes measured on the 2-core EPYC, (1, 8, 2048, 64) float32 fwd / fwd+bwd: 64 x 128 ran at
// 128 / 139 GFLOP/s, 128 x 256 at 147 / 155, 256 x 256 at 153 / 158, 128 x 512 at 151 / 155 (fewer,
// larger BLAS calls; the scores of a block, 128 KB, stay in L2).
constexpr int64_t kBq = 128;  // queries per block
constexpr int64_t kBk = 256;  // keys per block

// The BLAS gemm that libtorch_cpu carries (MKL or OpenBLAS, Fortran interface), looked up at run time:
// ATen's own cpublas::gemm is not exported to extensions. Without it, at::mm on the blocks (slower).
template <typename T>
using GemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                        const T*, const int*, const T*, T*, const int*);

template <typename T>
GemmFn<T> blas_gemm() {
  static const GemmFn<T> fn = reinterpret_cast<GemmFn<T>>(dlsym(RTLD_DEFAULT, sizeof(T) == 4 ? "sgemm_" : "dgemm_"));
  return fn;
}

// Row-major C[M x N] = alpha * op(A) op(B) + beta * C; op(A) is M x K (A given K x M when ta), op(B) is
// K x N (B given N x K when tb). Column-major BLAS computes C^T = op(B)^T op(A)^T.
template <typename T>
void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda, const T* B,
        int64_t ldb, T beta, T* C, int64_t ldc) {
  if (const GemmFn<T> gemm = blas_gemm<T>()) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    gemm(tb ? "T" : "N", ta ? "T" : "N", &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(sizeof(T) == 4 ? at::kFloat : at::kDouble);
  at::Tensor a = at::from_blob(const_cast<T*>(A), {ta ? K : M, ta ? M : K}, {lda, 1}, opts);
  at::Tensor b = at::from_blob(const_cast<T*>(B), {tb ? N : K, tb ? K : N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  at::Tensor prod = at::mm(ta ? a.t() : a, tb ? b.t() : b);
  if (beta == T(0)) c.copy_(prod.mul_(alpha));
  else c.mul_(beta).add_(prod, alpha);
}

template <typename T>
T row_max(const T* x, int64_t n) {
  using V = Vectorized<T>;
  V acc(-std::numeric_limits<T>::infinity());
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) acc = at::vec::maximum(acc, V::loadu(x + c));
  T lanes[V::size()];
  acc.store(lanes);
  T m = lanes[0];
  for (int64_t c2 = 1; c2 < V::size(); ++c2) m = std::max(m, lanes[c2]);
  for (; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// x = exp(x - m); returns the sum.
template <typename T>
T exp_sub_sum(T* x, int64_t n, T m) {
  using V = Vectorized<T>;
  const V vm(m);
  V acc(T(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V e = (V::loadu(x + c) - vm).exp();
    e.store(x + c);
    acc = acc + e;
  }
  T lanes[V::size()];
  acc.store(lanes);
  T s = 0;
  for (int64_t c2 = 0; c2 < V::size(); ++c2) s += lanes[c2];
  for (; c < n; ++c) {
    x[c] = std::exp(x[c] - m);
    s += x[c];
  }
  return s;
}

template <typename T>
void scale_row(T* x, int64_t n, T s) {
  using V = Vectorized<T>;
  const V vs(s);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(x + c) * vs).store(x + c);
  for (; c < n; ++c) x[c] *= s;
}

inline int64_t valid_len(const AttnArgs& a, int64_t b, int64_t i) {
  return a.valid_lens_dim == 1 ? a.valid_lens[b] : a.valid_lens[b * a.L + i];
}

// The masks of csrc/common/attention.h on a block of scores S[bq x bk] (row stride ld) of head h,
// batch b, rows i0.., keys j0..: excluded scores become -inf, a float mask is added.
template <typename T>
void apply_masks(const AttnArgs& a, T* S, int64_t ld, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0,
                 int64_t bk) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t i = i0 + r;
    T* row = S + r * ld;
    int64_t end = bk;  // keys [0, end) of the block may take part
    if (a.causal) end = std::min(end, std::max<int64_t>(i - j0 + 1, 0));
    if (a.valid_lens_dim) {
      const int64_t lim = valid_len(a, b, i);
      if (lim > 0) end = std::min(end, std::max<int64_t>(lim - j0, 0));
      else std::fill(row, row + bk, T(0));  // the notes' -1e6 fill everywhere: equal weights
    }
    for (int64_t c = end; c < bk; ++c) row[c] = ninf;
    if (a.mask_kind == MaskKind::NONE || end == 0) continue;
    const int64_t* ms = a.mask_stride;
    const int64_t base = b * ms[0] + h * ms[1] + i * ms[2] + j0 * ms[3];
    if (a.mask_kind == MaskKind::BOOL) {
      const bool* m = static_cast<const bool*>(a.mask) + base;
      for (int64_t c = 0; c < end; ++c)
        if (!m[c * ms[3]]) row[c] = ninf;
    } else if (a.mask_kind == MaskKind::FLOAT32) {
      const float* m = static_cast<const float*>(a.mask) + base;
      for (int64_t c = 0; c < end; ++c) row[c] += static_cast<T>(m[c * ms[3]]);
    } else {
      const double* m = static_cast<const double*>(a.mask) + base;
      for (int64_t c = 0; c < end; ++c) row[c] += static_cast<T>(m[c * ms[3]]);
    }
  }
}

// Multiplies P[bq x bk] by the dropout keep mask / (1 - p) (the forward's and the backward's mask).
template <typename T>
void apply_dropout(const AttnArgs& a, T* P, int64_t ld, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0,
                   int64_t bk) {
  const T inv_keep = static_cast<T>(1.0 / (1.0 - a.dropout_p));
  for (int64_t r = 0; r < bq; ++r) {
    const uint64_t row_index = static_cast<uint64_t>(((b * a.Hq + h) * a.L + i0 + r) * a.S + j0);
    T* row = P + r * ld;
    for (int64_t c = 0; c < bk; ++c)
      row[c] = dropout_keep(a.seed, a.offset, row_index + c, a.dropout_p) ? row[c] * inv_keep : T(0);
  }
}

// Last key block (exclusive end) that query rows [i0, i0 + bq) can see, from the masks that are the
// same for a whole block: causal and 1-D valid_lens.
int64_t key_end(const AttnArgs& a, int64_t b, int64_t i_last) {
  int64_t end = a.S;
  if (a.causal) end = std::min(end, i_last + 1);
  if (a.valid_lens_dim == 1 && a.valid_lens[b] > 0) end = std::min(end, a.valid_lens[b]);
  return std::max<int64_t>(end, 0);
}

template <typename T>
void fwd(const AttnArgs& a) {
  const int64_t nqb = (a.L + kBq - 1) / kBq, group = a.Hq / a.Hk;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  T* out = static_cast<T*>(a.out);
  at::parallel_for(0, a.B * a.Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> S(kBq * kBk), O(kBq * a.Ev), m(kBq), l(kBq);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb, b = bh / a.Hq, h = bh % a.Hq;
      const int64_t i0 = (t % nqb) * kBq, bq = std::min(kBq, a.L - i0);
      const T* Q = q + (bh * a.L + i0) * a.E;
      const T* K = k + (b * a.Hk + h / group) * a.S * a.E;
      const T* Vv = v + (b * a.Hk + h / group) * a.S * a.Ev;
      std::fill(O.begin(), O.end(), T(0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      const int64_t jend = key_end(a, b, i0 + bq - 1);
      for (int64_t j0 = 0; j0 < jend; j0 += kBk) {
        const int64_t bk = std::min(kBk, a.S - j0);
        mm<T>(false, true, bq, bk, a.E, static_cast<T>(a.scale), Q, a.E, K + j0 * a.E, a.E, T(0), S.data(), bk);
        apply_masks(a, S.data(), bk, b, h, i0, bq, j0, bk);
        for (int64_t r = 0; r < bq; ++r) {
          T* row = S.data() + r * bk;
          const T m_new = std::max(m[r], row_max(row, bk));
          if (m_new == -std::numeric_limits<T>::infinity()) {  // nothing seen yet in this row
            std::fill(row, row + bk, T(0));
            continue;
          }
          const T alpha = std::exp(m[r] - m_new);  // 0 when m[r] = -inf
          l[r] = l[r] * alpha + exp_sub_sum(row, bk, m_new);
          if (alpha != T(1)) scale_row(O.data() + r * a.Ev, a.Ev, alpha);
          m[r] = m_new;
        }
        if (a.dropout_p > 0) apply_dropout(a, S.data(), bk, b, h, i0, bq, j0, bk);
        mm<T>(false, false, bq, a.Ev, bk, T(1), S.data(), bk, Vv + j0 * a.Ev, a.Ev, T(1), O.data(), a.Ev);
      }
      for (int64_t r = 0; r < bq; ++r) {
        T* dst = out + (bh * a.L + i0 + r) * a.Ev;
        T* lse = static_cast<T*>(a.lse) + bh * a.L + i0 + r;
        if (l[r] == T(0)) {  // a fully masked row: zeros, as torch
          std::fill(dst, dst + a.Ev, T(0));
          *lse = -std::numeric_limits<T>::infinity();
        } else {
          const T inv = T(1) / l[r];
          for (int64_t c = 0; c < a.Ev; ++c) dst[c] = O[r * a.Ev + c] * inv;
          *lse = m[r] + std::log(l[r]);
        }
      }
    }
  });
}

template <typename T>
void bwd(const AttnArgs& a) {
  const int64_t nkb = (a.S + kBk - 1) / kBk, group = a.Hq / a.Hk;
  const T* q = static_cast<const T*>(a.q);
  const T* k = static_cast<const T*>(a.k);
  const T* v = static_cast<const T*>(a.v);
  const T* o = static_cast<const T*>(a.out);
  const T* dout = static_cast<const T*>(a.grad_out);
  T* dq = static_cast<T*>(a.grad_q);
  T* dk = static_cast<T*>(a.grad_k);
  T* dv = static_cast<T*>(a.grad_v);
  const int64_t rows = a.B * a.Hq * a.L;
  // delta_i = sum_c dO_ic O_ic (the row term of the softmax backward)
  std::vector<T> delta(rows);
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T s = 0;
      for (int64_t c = 0; c < a.Ev; ++c) s += dout[r * a.Ev + c] * o[r * a.Ev + c];
      delta[r] = s;
    }
  });
  const int nthreads = at::get_num_threads();
  std::vector<std::vector<T>> dq_part(nthreads);
  const T ninf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, a.B * a.Hk * nkb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T>& dqp = dq_part[at::get_thread_num()];
    if (dqp.empty()) dqp.assign(rows * a.E, T(0));
    std::vector<T> P(kBq * kBk), Pd(kBq * kBk), dP(kBq * kBk), dK(kBk * a.E), dV(kBk * a.Ev);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bhk = t / nkb, b = bhk / a.Hk, hk = bhk % a.Hk;
      const int64_t j0 = (t % nkb) * kBk, bk = std::min(kBk, a.S - j0);
      const T* K = k + (bhk * a.S + j0) * a.E;
      const T* Vv = v + (bhk * a.S + j0) * a.Ev;
      std::fill(dK.begin(), dK.end(), T(0));
      std::fill(dV.begin(), dV.end(), T(0));
      if (!(a.valid_lens_dim == 1 && a.valid_lens[b] > 0 && j0 >= a.valid_lens[b])) {
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const int64_t bh = b * a.Hq + h;
          for (int64_t i0 = a.causal ? j0 / kBq * kBq : 0; i0 < a.L; i0 += kBq) {
            const int64_t bq = std::min(kBq, a.L - i0);
            const T* Q = q + (bh * a.L + i0) * a.E;
            const T* dO = dout + (bh * a.L + i0) * a.Ev;
            mm<T>(false, true, bq, bk, a.E, static_cast<T>(a.scale), Q, a.E, K, a.E, T(0), P.data(), bk);
            apply_masks(a, P.data(), bk, b, h, i0, bq, j0, bk);
            for (int64_t r = 0; r < bq; ++r) {
              const T lse = static_cast<const T*>(a.lse)[bh * a.L + i0 + r];
              T* row = P.data() + r * bk;
              if (lse == ninf) std::fill(row, row + bk, T(0));
              else exp_sub_sum(row, bk, lse);
            }
            const T* Pv = P.data();
            if (a.dropout_p > 0) {
              std::copy(P.begin(), P.begin() + bq * bk, Pd.begin());
              apply_dropout(a, Pd.data(), bk, b, h, i0, bq, j0, bk);
              Pv = Pd.data();
            }
            mm<T>(true, false, bk, a.Ev, bq, T(1), Pv, bk, dO, a.Ev, T(1), dV.data(), a.Ev);  // dV += Pd^T dO
            mm<T>(false, true, bq, bk, a.Ev, T(1), dO, a.Ev, Vv, a.Ev, T(0), dP.data(), bk);  // dPd = dO V^T
            if (a.dropout_p > 0) apply_dropout(a, dP.data(), bk, b, h, i0, bq, j0, bk);
            for (int64_t r = 0; r < bq; ++r) {  // dS = P (dP - delta), in place in dP
              const T d = delta[bh * a.L + i0 + r];
              T* ds = dP.data() + r * bk;
              const T* p = P.data() + r * bk;
              for (int64_t c = 0; c < bk; ++c) ds[c] = p[c] * (ds[c] - d);
              if (a.valid_lens_dim && valid_len(a, b, i0 + r) <= 0)  // constant scores: no gradient to q, k
                std::fill(ds, ds + bk, T(0));
            }
            mm<T>(true, false, bk, a.E, bq, static_cast<T>(a.scale), dP.data(), bk, Q, a.E, T(1), dK.data(), a.E);
            mm<T>(false, false, bq, a.E, bk, static_cast<T>(a.scale), dP.data(), bk, K, a.E, T(1),
                  dqp.data() + (bh * a.L + i0) * a.E, a.E);
          }
        }
      }
      std::copy(dK.begin(), dK.begin() + bk * a.E, dk + (bhk * a.S + j0) * a.E);
      std::copy(dV.begin(), dV.begin() + bk * a.Ev, dv + (bhk * a.S + j0) * a.Ev);
    }
  });
  at::parallel_for(0, rows * a.E, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      T s = 0;
      for (const auto& part : dq_part)
        if (!part.empty()) s += part[e];
      dq[e] = s;
    }
  });
}

const AttentionKernels kTable{&fwd<float>, &fwd<double>, &bwd<float>, &bwd<double>};

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(AttentionKernels, attention_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
