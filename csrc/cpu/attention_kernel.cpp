// Flash-attention CPU kernels for one SIMD capability (see attention_kernel.h). setup.py compiles this
// file once per capability with CPU_CAPABILITY set (DEFAULT, AVX2, AVX512) and the matching flags.
//
// Forward (FlashAttention-2): one task per (b, h, block of kBq queries); the key blocks of kBk keys
// stream past with a running row max and sum; scores S = scale Q K^T and the update O += P V are
// small GEMMs -- float32 on AVX2 / AVX-512: the own register-blocked micro-kernel below on K^T / V
// panels packed once per call (a block that causal cuts inside runs in strips of kMR query rows, each
// trimmed to its own last row); otherwise (float64, DEFAULT, PYFASTDL_ATTENTION_GEMM=blas, and by
// measurement on AVX2 the float32 backward at head dims > 64) the BLAS of libtorch_cpu, single-threaded in
// every task --, the masking, exp and row sums SIMD. Only O(kBq x kBk) scores exist at a time. Backward: one task per (b, key/value head,
// partition of its key blocks): for every key block of the partition and every query block of the
// heads that read those keys, P is recomputed from the saved log-sum-exp, dV += P^T dO,
// dS = P (dO V^T - delta), dK += dS^T Q, dQ += dS K into the partition's dQ buffer, and dS itself is
// the gradient of a float attn_mask. The partitions depend on the shapes only, and the buffers are
// summed in partition order, so every output has the same bits whatever the thread count.
//
// NaN and Inf as torch's math SDPA: masked scores get -inf *added* (NaN stays NaN, +inf becomes NaN),
// the row max propagates NaN, and P V runs over every key a row could see -- a block that masks
// skip (causal, 1-D valid_lens) is skipped only when no non-finite value could reach the result; the
// skipping is per key, not per block: a block ends at the last key its queries can see.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ATen.h>
#include <dlfcn.h>
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
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
// On AVX-512 (the EPYC Zen 5, own kernels, 2026-12-02): 64 x 256, 256 x 256, 128 x 128 and 128 x 512
// against 128 x 256, float32 and bf16, fwd and fwd+bwd, 3 shapes causal and not, best of 3 interleaved
// processes: geometric mean 0.975-0.997x (each case 0.90-1.09x, within the noise): 128 x 256 kept for
// every capability.
constexpr int64_t kBq = 128;  // queries per block
// The own micro-kernel keeps 256 keys (measured single-threaded, E = 64 and 128, causal and not: 128
// keys ran fwd+bwd 4-26% slower).
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

// max(a, b) that propagates NaN (IEEE 754-2019 maximum, as at::vec::maximum): std::max drops a NaN in b.
template <typename T>
inline T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// The row helpers below take the row's tail (n not a multiple of the vector) as one partial vector,
// not element by element: attention rows are often short (a 16-token sequence, a valid length of 7),
// and there the scalar tails and lane-by-lane reductions cost more than the block products (perf, 2026-12-02).
template <typename T>
T row_max(const T* x, int64_t n) {
  using V = Vectorized<T>;
  const V ninf(-std::numeric_limits<T>::infinity());
  V acc = ninf;
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) acc = at::vec::maximum(acc, V::loadu(x + c));
  if (c < n) acc = at::vec::maximum(acc, V::set(ninf, V::loadu(x + c, n - c), n - c));
  // maximum propagates NaN
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, acc);
}

// True when x[0, n) holds no NaN and no +-inf (x - x is 0 exactly for finite x, NaN otherwise).
template <typename T>
bool all_finite(const T* x, int64_t n) {
  using V = Vectorized<T>;
  V acc(T(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V e = V::loadu(x + c);
    acc = acc + (e - e);
  }
  T lanes[V::size()];
  acc.store(lanes);
  T s = 0;
  for (int64_t c2 = 0; c2 < V::size(); ++c2) s += lanes[c2];
  for (; c < n; ++c) s += x[c] - x[c];
  return s == T(0);
}

// exp of a vector of x - m <= 0 (or NaN, or -inf). float: ATen's polynomial exp_u20 (measured on the
// EPYC: 1.9x faster than Sleef's expf u10, at most 1.6e-7 relative error on [-10, 0]; below
// ln(FLT_MIN) it gives 0 where Sleef gives a denormal) with NaN put back (its clamping drops NaN);
// double: Sleef.
template <typename T>
inline Vectorized<T> exp_nonpos(const Vectorized<T>& d) {
  if constexpr (std::is_same_v<T, float>) return Vectorized<T>::blendv(d.exp_u20(), d, d.isnan());
  else return d.exp();
}

// x = exp(x - m); returns the sum.
template <typename T>
T exp_sub_sum(T* x, int64_t n, T m) {
  using V = Vectorized<T>;
  const V vm(m);
  V acc(T(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V e = exp_nonpos(V::loadu(x + c) - vm);
    e.store(x + c);
    acc = acc + e;
  }
  if (c < n) {
    const V e = V::set(V(T(0)), exp_nonpos(V::loadu(x + c, n - c) - vm), n - c);
    e.store(x + c, n - c);
    acc = acc + e;
  }
  return at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc);
}

// dst[0, n) = x[0, n) * s (dst may be x).
template <typename T>
void scale_row(const T* x, int64_t n, T s, T* dst) {
  using V = Vectorized<T>;
  const V vs(s);
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(x + c) * vs).store(dst + c);
  if (c < n) (V::loadu(x + c, n - c) * vs).store(dst + c, n - c);
}

template <typename T>
void scale_row(T* x, int64_t n, T s) {
  scale_row(x, n, s, x);
}

inline int64_t valid_len(const AttnArgs& a, int64_t b, int64_t i) {
  return a.valid_lens_dim == 1 ? a.valid_lens[b] : a.valid_lens[b * a.L + i];
}

// The masks of csrc/common/attention.h on a block of scores S[bq x bk] (row stride ld) of head h,
// batch b, rows i0.., keys j0.., in the reference's order (pyfastdl.reference.sdpa_like_torch):
// valid_lens replaces scores (0 for a row of length <= 0, -inf past the length), then is_causal and a
// bool mask *add* -inf and a float mask is added, as torch's math SDPA does -- so a NaN score (or a NaN
// in a float mask) stays NaN and +inf + -inf gives NaN, even at a masked key.
template <typename T>
void apply_masks(const AttnArgs& a, T* S, int64_t ld, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0,
                 int64_t bk) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < bq; ++r) {
    const int64_t i = i0 + r;
    T* row = S + r * ld;
    if (a.valid_lens_dim) {
      const int64_t lim = valid_len(a, b, i);
      if (lim > 0) {
        for (int64_t c = std::max<int64_t>(lim - j0, 0); c < bk; ++c) row[c] = ninf;
      } else {
        std::fill(row, row + bk, T(0));  // the notes' -1e6 fill everywhere: equal weights
      }
    }
    if (a.causal)
      for (int64_t c = std::max<int64_t>(i - j0 + 1, 0); c < bk; ++c) row[c] += ninf;
    if (a.mask_kind == MaskKind::NONE) continue;
    const int64_t* ms = a.mask_stride;
    const int64_t base = b * ms[0] + h * ms[1] + i * ms[2] + j0 * ms[3];
    if (a.mask_kind == MaskKind::BOOL) {
      const bool* m = static_cast<const bool*>(a.mask) + base;
      for (int64_t c = 0; c < bk; ++c)
        if (!m[c * ms[3]]) row[c] += ninf;
    } else if (a.mask_kind == MaskKind::FLOAT32) {
      const float* m = static_cast<const float*>(a.mask) + base;
      for (int64_t c = 0; c < bk; ++c) row[c] += static_cast<T>(m[c * ms[3]]);
    } else {
      const double* m = static_cast<const double*>(a.mask) + base;
      for (int64_t c = 0; c < bk; ++c) row[c] += static_cast<T>(m[c * ms[3]]);
    }
  }
}

// S[bq x bk] = scale * Q K^T (Q (bq, E), K (bk, E), row-major); 0 when E = 0 (torch: an empty dot).
template <typename T>
void scores(const AttnArgs& a, const T* Q, const T* K, int64_t bq, int64_t bk, T* S) {
  if (a.E == 0) std::fill(S, S + bq * bk, T(0));
  else mm<T>(false, true, bq, bk, a.E, static_cast<T>(a.scale), Q, a.E, K, a.E, T(0), S, bk);
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

// Last key (exclusive end) that query rows [.., i_last] can see, from the masks that are the same for a
// whole block: causal and 1-D valid_lens.
int64_t key_end(const AttnArgs& a, int64_t b, int64_t i_last) {
  int64_t end = a.S;
  if (a.causal) end = std::min(end, i_last + 1);
  if (a.valid_lens_dim == 1 && a.valid_lens[b] > 0) end = std::min(end, a.valid_lens[b]);
  return std::max<int64_t>(end, 0);
}

// Whether blocks that causal / 1-D valid_lens mask may be skipped at all: not with a float mask (a NaN
// in it at a masked key still makes the row NaN).
bool may_skip(const AttnArgs& a) {
  return (a.causal || a.valid_lens_dim == 1) &&
         (a.mask_kind == MaskKind::NONE || a.mask_kind == MaskKind::BOOL);
}

// Whether the BLAS runs single-threaded inside our own tasks, so that a task's bits do not depend on
// the thread count (MKL would use its own threads when called outside an OpenMP region, i.e. whenever
// at::parallel_for runs the tasks inline). MKL: mkl_set_num_threads_local(1) for the calling thread;
// restored at the end of the task range.
class BlasSingleThread {
 public:
  BlasSingleThread() {
    if (set_) previous_ = set_(1);
  }
  ~BlasSingleThread() {
    if (set_) set_(previous_);
  }
  BlasSingleThread(const BlasSingleThread&) = delete;
  BlasSingleThread& operator=(const BlasSingleThread&) = delete;

 private:
  using SetFn = int (*)(int);
  static inline const SetFn set_ = reinterpret_cast<SetFn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  int previous_ = 0;
};

// A zeroed scratch array of n T, 64-byte aligned: MKL may pick its code path by the alignment of its
// operands, and the heap's alignment differs between threads -- so unaligned scratch could make the
// bits depend on which thread ran a task.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n, bool zero = true)
      : p_(static_cast<T*>(std::aligned_alloc(64, (std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64 * 64))), n_(n) {
    TORCH_CHECK(p_ != nullptr, "attention: out of memory for ", n, " scratch elements");
    if (zero) std::fill(p_, p_ + n_, T(0));
  }
  ~Scratch() { std::free(p_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p_; }
  T* begin() const { return p_; }
  T* end() const { return p_ + n_; }
  T& operator[](int64_t i) const { return p_[i]; }

 private:
  T* p_;
  int64_t n_;
};

// ---- the own block product (float32, AVX2 / AVX-512) ------------------------------------------------
// C[M x N] = alpha A B + beta C with A read in place through strides (A(i, k) = A[i rsa + k csa], so a
// row-major block and a transposed one alike) and B packed: panels of kNR columns, panel p at
// Bp + p * panel_stride, its row k the kNR floats at k * kNR (zero past the last column). K^T and V
// (and in the backward K, V^T, Q, dO) are packed once per call into these panels, for every head, and
// every query block reads them in place: no packing and no BLAS call per block. The micro-kernel keeps
// a kMR x kNR tile of C in registers (AVX2: 6 x 16, 12 ymm accumulators; AVX-512: 12 x 32, 24 zmm)
// and runs the k loop with two vector loads of B and kMR broadcasts of A per step. Each element of C
// is one sequential FMA chain over k: its bits depend on neither the thread count nor the blocking.
#if defined(CPU_CAPABILITY_AVX512)
#define PYFASTDL_ATTN_UKERNEL 1
using VReg = __m512;
constexpr int kW = 16;
constexpr int kMR = 12;
inline VReg vzero() { return _mm512_setzero_ps(); }
inline VReg vload(const float* p) { return _mm512_loadu_ps(p); }
inline VReg vbcast(const float* p) { return _mm512_set1_ps(*p); }
inline VReg vset(float x) { return _mm512_set1_ps(x); }
inline VReg vfma(VReg a, VReg b, VReg c) { return _mm512_fmadd_ps(a, b, c); }
inline VReg vmul(VReg a, VReg b) { return _mm512_mul_ps(a, b); }
inline void vstore(float* p, VReg v) { _mm512_storeu_ps(p, v); }
#elif defined(CPU_CAPABILITY_AVX2)
#define PYFASTDL_ATTN_UKERNEL 1
using VReg = __m256;
constexpr int kW = 8;
constexpr int kMR = 6;
inline VReg vzero() { return _mm256_setzero_ps(); }
inline VReg vload(const float* p) { return _mm256_loadu_ps(p); }
inline VReg vbcast(const float* p) { return _mm256_broadcast_ss(p); }
inline VReg vset(float x) { return _mm256_set1_ps(x); }
inline VReg vfma(VReg a, VReg b, VReg c) { return _mm256_fmadd_ps(a, b, c); }
inline VReg vmul(VReg a, VReg b) { return _mm256_mul_ps(a, b); }
inline void vstore(float* p, VReg v) { _mm256_storeu_ps(p, v); }
#else
#define PYFASTDL_ATTN_UKERNEL 0
constexpr int kW = 8;  // the panel width of the (unused) packing helpers below
constexpr int kMR = 6;  // the strip height of the (unused) own forward path
#endif
constexpr int64_t kNR = 2 * kW;  // columns of a packed panel and of the register tile

// Packs X(k, c) = X[k sk + c sc] (k < K, c < N) into panels of kNR columns: panel p at dst + p K kNR,
// row k of it at + k kNR, zero past column N. dst holds ceil(N / kNR) K kNR floats.
template <typename T>
void pack_panels(const T* X, int64_t sk, int64_t sc, int64_t K, int64_t N, T* dst) {
  for (int64_t c0 = 0; c0 < N; c0 += kNR) {
    T* panel = dst + (c0 / kNR) * K * kNR;
    const int64_t n = std::min<int64_t>(kNR, N - c0);
    if (sc == 1) {
      for (int64_t k = 0; k < K; ++k) {
        const T* src = X + k * sk + c0;
        T* row = panel + k * kNR;
        for (int64_t c = 0; c < n; ++c) row[c] = src[c];
        for (int64_t c = n; c < kNR; ++c) row[c] = T(0);
      }
    } else {
      for (int64_t c = 0; c < kNR; ++c) {
        if (c < n) {
          const T* src = X + (c0 + c) * sc;
          for (int64_t k = 0; k < K; ++k) panel[k * kNR + c] = src[k * sk];
        } else {
          for (int64_t k = 0; k < K; ++k) panel[k * kNR + c] = T(0);
        }
      }
    }
  }
}

// Floats of the panels of an N-column, K-row operand.
inline int64_t panels_size(int64_t K, int64_t N) { return (N + kNR - 1) / kNR * kNR * K; }

#if PYFASTDL_ATTN_UKERNEL
// Stores the kMR x kNR register tile (c0 | c1 per row) of a micro-kernel: C[MR x n] = alpha acc + beta C,
// beta 0 (C not read) or 1. Inlined into each micro-kernel, so the accumulators stay in registers.
template <int MR>
inline void store_tile(const VReg (&c0)[MR], const VReg (&c1)[MR], float alpha, float beta, float* C, int64_t ldc,
                       int64_t n) {
  const VReg va = vset(alpha);
  if (n == kNR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      float* c = C + i * ldc;
      if (beta == 0.f) {
        vstore(c, vmul(va, c0[i]));
        vstore(c + kW, vmul(va, c1[i]));
      } else {
        vstore(c, vfma(va, c0[i], vload(c)));
        vstore(c + kW, vfma(va, c1[i], vload(c + kW)));
      }
    }
    return;
  }
  // A partial panel: through a tile on the stack. Every access to c0 / c1 is in an unrolled loop, so
  // the accumulators stay in registers (a loop with a run-time index would put them in memory, with a
  // store per FMA in the k loop: measured 2.5x slower).
  alignas(64) float tile[MR][kNR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    vstore(tile[i], vmul(va, c0[i]));
    vstore(tile[i] + kW, vmul(va, c1[i]));
  }
  for (int i = 0; i < MR; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.f) {
      for (int64_t j = 0; j < n; ++j) c[j] = tile[i][j];
    } else {
      for (int64_t j = 0; j < n; ++j) c[j] += tile[i][j];
    }
  }
}

// C[m x n] (m = MR, n <= kNR) = alpha A B + beta C on one panel Bp; beta is 0 (C not read) or 1.
template <int MR>
inline void ukernel(int64_t K, const float* A, int64_t rsa, int64_t csa, const float* Bp, float alpha, float beta,
                    float* C, int64_t ldc, int64_t n) {
  VReg c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = vzero();
  int64_t off[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) off[i] = i * rsa;
  const float* a = A;
  for (int64_t k = 0; k < K; ++k) {
    const VReg b0 = vload(Bp), b1 = vload(Bp + kW);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const VReg ai = vbcast(a + off[i]);
      c0[i] = vfma(ai, b0, c0[i]);
      c1[i] = vfma(ai, b1, c1[i]);
    }
    a += csa;
    Bp += kNR;
  }
  store_tile<MR>(c0, c1, alpha, beta, C, ldc, n);
}

template <int R>
inline void ukernel_rows(int64_t m, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* Bp, float alpha,
                         float beta, float* C, int64_t ldc, int64_t n) {
  if constexpr (R > 0) {
    if (m == R) ukernel<R>(K, A, rsa, csa, Bp, alpha, beta, C, ldc, n);
    else ukernel_rows<R - 1>(m, K, A, rsa, csa, Bp, alpha, beta, C, ldc, n);
  }
}

// C[M x N] = alpha A B + beta C (beta 0 or 1), B in panels (pack_panels) of panel_stride floats apart,
// already offset to its row 0. The B panel (at most 256 x kNR floats here) stays in L1 while the
// kMR-row strips of A pass.
void gemm_panels(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t rsa, int64_t csa,
                 const float* Bp, int64_t panel_stride, float beta, float* C, int64_t ldc) {
  for (int64_t j = 0; j < N; j += kNR) {
    const float* bp = Bp + (j / kNR) * panel_stride;
    const int64_t n = std::min<int64_t>(kNR, N - j);
    int64_t i = 0;
    for (; i + kMR <= M; i += kMR) ukernel<kMR>(K, A + i * rsa, rsa, csa, bp, alpha, beta, C + i * ldc + j, ldc, n);
    if (i < M) ukernel_rows<kMR - 1>(M - i, K, A + i * rsa, rsa, csa, bp, alpha, beta, C + i * ldc + j, ldc, n);
  }
}
#endif

// ---- the bf16 block product (AVX512_BF16) -------------------------------------------------------------
// bfloat16 operands held as their bits (uint16_t). vdpbf16ps multiplies pairs of bf16 exactly and adds
// both products into a float32 lane, so the k loop runs over *pairs* of k: B is packed in pair panels
// (panel of kNR columns; pair row kp holds, per column c, B(2kp, c) and B(2kp + 1, c) side by side --
// 2 kNR bf16, two zmm), and A's pair (A(i, 2kp), A(i, 2kp + 1)) is one 32-bit broadcast, so A must be
// contiguous along k with an even row length (zero-padded where the operand is our own scratch). The
// same 12 x 32 register tile and epilogue as the float32 kernel: twice the multiply-adds per
// instruction. The instruction reads no MXCSR: round to nearest even, bf16 denormals read as zero.
inline int64_t round2(int64_t x) { return (x + 1) / 2 * 2; }

// bf16 elements of the pair panels of an N-column, K-row operand.
inline int64_t pair_panels_size(int64_t K, int64_t N) { return (N + kNR - 1) / kNR * kNR * round2(K); }

#if defined(CPU_CAPABILITY_AVX512)
#define PYFASTDL_ATTN_BF16 1
#define PYFASTDL_TARGET_BF16 __attribute__((target("avx512bf16")))

// Packs X(k, c) = X[k sk + c sc] (k < K, c < N) into pair panels: panel p at dst + p round2(K) kNR, X(k, c)
// at [(k / 2) 2 kNR + 2 (c - p kNR) + k % 2]; zero past column N and at the odd K's last row.
void pack_pair_panels(const uint16_t* X, int64_t sk, int64_t sc, int64_t K, int64_t N, uint16_t* dst) {
  const int64_t K2 = round2(K);
  for (int64_t c0 = 0; c0 < N; c0 += kNR) {
    uint16_t* panel = dst + (c0 / kNR) * K2 * kNR;
    const int64_t n = std::min<int64_t>(kNR, N - c0);
    for (int64_t k = 0; k < K2; ++k) {
      uint16_t* row = panel + (k / 2) * 2 * kNR + k % 2;
      for (int64_t c = 0; c < kNR; ++c) row[2 * c] = k < K && c < n ? X[k * sk + (c0 + c) * sc] : uint16_t(0);
    }
  }
}

inline __m512i load_pair(const uint16_t* p) {
  int32_t x;
  std::memcpy(&x, p, sizeof x);
  return _mm512_set1_epi32(x);
}

// C[MR x n] = alpha A B + beta C over Kp pairs of k: A rows at A + i rsa (bf16, contiguous along k), B one
// pair panel.
template <int MR>
PYFASTDL_TARGET_BF16 inline void ukernel_bf16(int64_t Kp, const uint16_t* A, int64_t rsa, const uint16_t* Bp,
                                              float alpha, float beta, float* C, int64_t ldc, int64_t n) {
  VReg c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = vzero();
  for (int64_t kp = 0; kp < Kp; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(Bp), b1 = (__m512bh)_mm512_loadu_si512(Bp + 2 * kW);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512bh ai = (__m512bh)load_pair(A + i * rsa + 2 * kp);
      c0[i] = _mm512_dpbf16_ps(c0[i], ai, b0);
      c1[i] = _mm512_dpbf16_ps(c1[i], ai, b1);
    }
    Bp += 2 * kNR;
  }
  store_tile<MR>(c0, c1, alpha, beta, C, ldc, n);
}

template <int R>
PYFASTDL_TARGET_BF16 inline void ukernel_bf16_rows(int64_t m, int64_t Kp, const uint16_t* A, int64_t rsa,
                                                   const uint16_t* Bp, float alpha, float beta, float* C, int64_t ldc,
                                                   int64_t n) {
  if constexpr (R > 0) {
    if (m == R) ukernel_bf16<R>(Kp, A, rsa, Bp, alpha, beta, C, ldc, n);
    else ukernel_bf16_rows<R - 1>(m, Kp, A, rsa, Bp, alpha, beta, C, ldc, n);
  }
}

// C[M x N] = alpha A B + beta C (beta 0 or 1) over K (even) rows of B in pair panels panel_stride apart.
PYFASTDL_TARGET_BF16 void gemm_pair_panels(int64_t M, int64_t N, int64_t K, float alpha, const uint16_t* A,
                                           int64_t rsa, const uint16_t* Bp, int64_t panel_stride, float beta, float* C,
                                           int64_t ldc) {
  const int64_t Kp = K / 2;
  for (int64_t j = 0; j < N; j += kNR) {
    const uint16_t* bp = Bp + (j / kNR) * panel_stride;
    const int64_t n = std::min<int64_t>(kNR, N - j);
    int64_t i = 0;
    for (; i + kMR <= M; i += kMR) ukernel_bf16<kMR>(Kp, A + i * rsa, rsa, bp, alpha, beta, C + i * ldc + j, ldc, n);
    if (i < M) ukernel_bf16_rows<kMR - 1>(M - i, Kp, A + i * rsa, rsa, bp, alpha, beta, C + i * ldc + j, ldc, n);
  }
}

// Pb[r, 0 .. n) = bf16(P[r, 0 .. n)) (round to nearest even, NaN stays NaN) for rows r < m (row strides ldp,
// ldb); with pad, also Pb[r, n] = 0 where n is odd (the pair panels' zero row).
PYFASTDL_TARGET_BF16 void to_bf16_rows(const float* P, int64_t ldp, int64_t m, int64_t n, uint16_t* Pb, int64_t ldb,
                                       bool pad) {
  for (int64_t r = 0; r < m; ++r) {
    const float* src = P + r * ldp;
    uint16_t* dst = Pb + r * ldb;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + c)));
    if (c < n) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (n - c)) - 1);
      _mm256_mask_storeu_epi16(dst + c, tail, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(tail, src + c)));
    }
    if (pad && n % 2) dst[n] = 0;
  }
}

// The float32 pair panels of the backward's B operands P and dS (rows: queries, columns: keys), rounded to
// bf16: X[r, c] (r < K, c < N, row stride ld) into pack_pair_panels' layout, zero past column N and at an
// odd K's last row. Per pair of rows and 16 columns: both rows rounded and each pair put in one 32-bit lane.
PYFASTDL_TARGET_BF16 void pack_pair_panels_f32(const float* X, int64_t ld, int64_t K, int64_t N, uint16_t* dst) {
  const int64_t K2 = round2(K);
  for (int64_t c0 = 0; c0 < N; c0 += kNR) {
    uint16_t* panel = dst + (c0 / kNR) * K2 * kNR;
    for (int64_t k = 0; k < K2; k += 2) {
      uint16_t* row = panel + k * kNR;
      for (int64_t h = 0; h < kNR; h += 16) {
        const int64_t n = std::clamp<int64_t>(N - c0 - h, 0, 16);
        const __mmask16 live = static_cast<__mmask16>((1u << n) - 1);
        const __m512 x0 = _mm512_maskz_loadu_ps(live, X + k * ld + c0 + h);
        const __m512 x1 = k + 1 < K ? _mm512_maskz_loadu_ps(live, X + (k + 1) * ld + c0 + h) : _mm512_setzero_ps();
        const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x0));
        const __m512i hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x1)), 16);
        _mm512_storeu_si512(row + 2 * h, _mm512_or_si512(lo, hi));
      }
    }
  }
}

// True when the bf16 x[0, n) holds no NaN and no +-inf (exponent bits all ones).
bool all_finite(const uint16_t* x, int64_t n) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= (x[i] & 0x7f80) == 0x7f80;
  return !bad;
}
#else
#define PYFASTDL_ATTN_BF16 0
// for the kernels' discarded bf16 branches; never called here
[[noreturn]] inline void no_bf16() {
  TORCH_INTERNAL_ASSERT(false, "attention: the bf16 kernels need AVX512_BF16 and the AVX-512 table");
  std::abort();
}
inline void pack_pair_panels(const uint16_t*, int64_t, int64_t, int64_t, int64_t, uint16_t*) { no_bf16(); }
inline void gemm_pair_panels(int64_t, int64_t, int64_t, float, const uint16_t*, int64_t, const uint16_t*, int64_t, float,
                             float*, int64_t) {
  no_bf16();
}
inline void to_bf16_rows(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t, bool) { no_bf16(); }
inline void pack_pair_panels_f32(const float*, int64_t, int64_t, int64_t, uint16_t*) { no_bf16(); }
inline bool all_finite(const uint16_t*, int64_t) { no_bf16(); }
#endif

// An element of q, k, v, out or grad_out as float (bf16: its bits are the float's upper half).
inline float as_float(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
template <typename T>
inline T as_float(T x) {
  return x;
}

// dst[c, r] = X[r, c] for r < rows, c < cols (X row stride ldx, dst row stride ldd), dst[c, rows..ldd) zero.
template <typename In>
void transpose_pad(const In* X, int64_t ldx, int64_t rows, int64_t cols, In* dst, int64_t ldd) {
  for (int64_t c = 0; c < cols; ++c) {
    In* d = dst + c * ldd;
    for (int64_t r = 0; r < rows; ++r) d[r] = X[r * ldx + c];
    std::fill(d + rows, d + ldd, In(0));
  }
}

}  // namespace (reopened below after the mode's declarations)
}  // namespace CPU_CAPABILITY

// csrc/cpu/attention_gemm.cpp: 0 auto, 1 own, 2 blas; which product the last call used.
int attention_gemm_mode();
void attention_gemm_note(bool backward, bool own, bool bf16 = false);

namespace CPU_CAPABILITY {
namespace {

// Whether this call's float32 block products run on the own micro-kernel (PYFASTDL_ATTENTION_GEMM /
// attention_cpu_gemm); float64 and the DEFAULT capability keep the BLAS. "auto" is the faster one as
// measured single-threaded, own / BLAS time:
//  - AVX2 (2-core EPYC Zen 4, AVX-512 hidden): the own kernel everywhere except the backward at head dims
//    > 64, where MKL's sgemm was as fast or faster (fwd+bwd at (1, 4, 1024, 128): 0.91-1.01x non-causal,
//    0.87-0.95x causal, against 1.00-1.12x at head dim 64 and 0.99-1.08x for the forward at 128);
//  - AVX-512 (2-core EPYC Zen 5): the own kernel everywhere -- its backward ran 1.3-2.1x faster than the
//    BLAS at head dims 64, 96 and 128, causal and not (one and two threads, 2026-12-02).
template <typename T>
bool use_own_gemm(bool backward, const AttnArgs& a) {
  bool own = false;
#if PYFASTDL_ATTN_UKERNEL
  const int mode = attention_gemm_mode();
  const bool blas_faster = kW == 8 && backward && std::max(a.E, a.Ev) > 64;  // AVX2 only
  own = std::is_same_v<T, float> && (mode == 1 || (mode == 0 && !blas_faster));
#endif
  attention_gemm_note(backward, own);
  return own;
}

// The own product on packed B (T = float where the micro-kernel exists; never reached otherwise).
template <typename T>
void own_mm(int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t rsa, int64_t csa, const T* Bp,
            int64_t panel_stride, T beta, T* C, int64_t ldc) {
#if PYFASTDL_ATTN_UKERNEL
  if constexpr (std::is_same_v<T, float>) {
    gemm_panels(M, N, K, alpha, A, rsa, csa, Bp, panel_stride, beta, C, ldc);
    return;
  }
#endif
  TORCH_INTERNAL_ASSERT(false, "attention: the own block product is float32 on AVX2 / AVX-512 only");
}

// T: the arithmetic (float32 / float64). kBf16: q, k, v and out are bfloat16 (their bits, In = uint16_t), the
// block products the AVX512_BF16 kernel on bf16 pair panels (P rounded to bf16 before P V, as torch's bf16
// flash attention does), the masks, softmax, sums and O float32; needs an even head dim E.
template <typename T, bool kBf16 = false>
void fwd(const AttnArgs& a) {
  using In = std::conditional_t<kBf16, uint16_t, T>;
  const int64_t nqb = (a.L + kBq - 1) / kBq, group = a.Hq / a.Hk;
  const In* q = static_cast<const In*>(a.q);
  const In* k = static_cast<const In*>(a.k);
  const In* v = static_cast<const In*>(a.v);
  In* out = static_cast<In*>(a.out);
  const T ninf = -std::numeric_limits<T>::infinity();
  // Per key/value head (b, hk): K or V holds a NaN or an Inf, so masked keys still matter (NaN + -inf,
  // 0 * inf in P V) and no key block is skipped.
  std::vector<char> kv_bad;
  if (may_skip(a)) {
    kv_bad.assign(a.B * a.Hk, 0);
    at::parallel_for(0, a.B * a.Hk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        kv_bad[t] = !all_finite(k + t * a.S * a.E, a.S * a.E) || !all_finite(v + t * a.S * a.Ev, a.S * a.Ev);
    });
  }
  // The own product: K^T (keys as columns) and V in panels (bf16: pair panels), once per key/value head.
  // Ek, Sk: the packed row counts (bf16: rounded up to pairs).
  const bool own = kBf16 || use_own_gemm<T>(false, a);
  if constexpr (kBf16) attention_gemm_note(false, true, true);
  const int64_t Ek = kBf16 ? round2(a.E) : a.E, Sk = kBf16 ? round2(a.S) : a.S;
  const int64_t kt_size = kBf16 ? pair_panels_size(a.E, a.S) : panels_size(a.E, a.S);
  const int64_t v_size = kBf16 ? pair_panels_size(a.S, a.Ev) : panels_size(a.S, a.Ev);
  std::unique_ptr<Scratch<In>> kt_pack, v_pack;
  if (own) {
    kt_pack = std::make_unique<Scratch<In>>(a.B * a.Hk * kt_size, false);
    v_pack = std::make_unique<Scratch<In>>(a.B * a.Hk * v_size, false);
    at::parallel_for(0, a.B * a.Hk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if constexpr (kBf16) {
          pack_pair_panels(k + t * a.S * a.E, 1, a.E, a.E, a.S, kt_pack->data() + t * kt_size);
          pack_pair_panels(v + t * a.S * a.Ev, a.Ev, 1, a.S, a.Ev, v_pack->data() + t * v_size);
        } else {
          pack_panels(k + t * a.S * a.E, 1, a.E, a.E, a.S, kt_pack->data() + t * kt_size);
          pack_panels(v + t * a.S * a.Ev, a.Ev, 1, a.S, a.Ev, v_pack->data() + t * v_size);
        }
      }
    });
  }
  // The two block products of the own kernel: S[mr x bk] = scale Q K^T (rows of Q at Qr, K^T panels at kt),
  // and O[mr x Ev] += P V (P = S, row stride ld; V panels at vp); bf16: P rounded into Pb first.
  auto qk = [&](int64_t mr, int64_t bk, const In* Qr, const In* kt, T* S) {
    if constexpr (kBf16) gemm_pair_panels(mr, bk, Ek, static_cast<float>(a.scale), Qr, a.E, kt, Ek * kNR, 0.f, S, bk);
    else own_mm<T>(mr, bk, a.E, static_cast<T>(a.scale), Qr, a.E, 1, kt, a.E * kNR, T(0), S, bk);
  };
  auto pv = [&](int64_t mr, int64_t bk, const T* P, In* Pb, const In* vp, T* O) {
    if constexpr (kBf16) {
      to_bf16_rows(P, bk, mr, bk, Pb, round2(bk), true);
      gemm_pair_panels(mr, a.Ev, round2(bk), 1.f, Pb, round2(bk), vp, Sk * kNR, 1.f, O, a.Ev);
    } else {
      own_mm<T>(mr, a.Ev, bk, T(1), P, bk, 1, vp, a.S * kNR, T(1), O, a.Ev);
    }
  };
  at::parallel_for(0, a.B * a.Hq * nqb, 1, [&](int64_t t0, int64_t t1) {
    BlasSingleThread blas1;
    // Sized to the blocks that occur (small inputs: a few elements, not 128 KiB mmapped and zeroed per call)
    const int64_t sq = std::min(kBq, a.L), sk = std::min(kBk, a.S);
    Scratch<T> S(sq * sk), O(sq * a.Ev), m(sq), l(sq);
    Scratch<In> Pb(kBf16 ? sq * round2(sk) : 0, false);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb, b = bh / a.Hq, h = bh % a.Hq;
      const int64_t i0 = (t % nqb) * kBq, bq = std::min(kBq, a.L - i0);
      const In* Q = q + (bh * a.L + i0) * a.E;
      const In* K = k + (b * a.Hk + h / group) * a.S * a.E;
      const In* Vv = v + (b * a.Hk + h / group) * a.S * a.Ev;
      std::fill(O.begin(), O.end(), T(0));
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), T(0));
      // trim: the keys that causal / 1-D valid_lens mask for every row of a block (or of a strip) may
      // be left out -- no NaN or Inf in Q, K or V could reach the result through them. key_end grows
      // with the row, so when the block's first row sees every key nothing is left out (and Q is not
      // scanned).
      int64_t jend = a.S;
      const bool trim = may_skip(a) && key_end(a, b, i0) < a.S && !kv_bad[b * a.Hk + h / group] &&
                        all_finite(Q, bq * a.E);
      if (trim) jend = key_end(a, b, i0 + bq - 1);
      const int64_t hk_index = b * a.Hk + h / group;
      // Online softmax over rows [r0, r1) of the scores S (row stride ld; row r of the block at S + (r - r0) ld):
      // the running max m and sum l, O rescaled where the max moved; S becomes P.
      auto softmax_rows = [&](T* Sb, int64_t ld, int64_t r0, int64_t r1, int64_t bk) {
        for (int64_t r = r0; r < r1; ++r) {
          T* row = Sb + (r - r0) * ld;
          const T m_new = nan_max(m[r], row_max(row, bk));  // NaN once any score of the row is NaN
          if (m_new == ninf) {  // nothing seen yet in this row
            std::fill(row, row + bk, T(0));
            continue;
          }
          if (m[r] == ninf) {  // the row's first keys: O and l are still 0, nothing to rescale
            l[r] = exp_sub_sum(row, bk, m_new);
          } else {
            const T alpha = std::exp(m[r] - m_new);
            l[r] = l[r] * alpha + exp_sub_sum(row, bk, m_new);
            if (alpha != T(1)) scale_row(O.data() + r * a.Ev, a.Ev, alpha);
          }
          m[r] = m_new;
        }
      };
      // The last key block stops at jend itself: the keys past it are masked for every row of the
      // block (causal, 1-D valid_lens), so they are never computed -- a 300-key sequence in a batch
      // padded to 512 costs 300 keys, not 512.
      for (int64_t j0 = 0; j0 < jend; j0 += kBk) {
        const int64_t bk = std::min(kBk, jend - j0);
        const In* kt = own ? kt_pack->data() + hk_index * kt_size + j0 / kNR * Ek * kNR : nullptr;
        const In* vp = own ? v_pack->data() + hk_index * v_size + j0 * kNR : nullptr;
        // A block that causal cuts inside (its first row sees fewer keys than the block has) runs, with the
        // own product, in strips of kMR query rows, each strip's keys ending at its own last row (a
        // skipped key would add exp(-inf) = 0; the strip's scores stay in L1). Every other block runs
        // whole. Interleaved single-threaded A/B on the 2-core EPYC (AVX2), (1, 8, 1024, E) and (4, 8,
        // 512, 64): strips on every block were no faster on non-causal blocks (0-13% slower, within the
        // VM's noise); the causal forward with the trimmed strips ran 7-16% faster than whole blocks at head
        // dim 64 (no gain measured at 128).
        if (own && trim && a.causal && key_end(a, b, i0) < j0 + bk) {
          const int64_t bk_block = bk;
          for (int64_t r0 = 0; r0 < bq; r0 += kMR) {
            const int64_t mr = std::min<int64_t>(kMR, bq - r0);
            // causal: a strip's keys end at its own last row (a skipped key would add exp(-inf) = 0)
            const int64_t bk = std::min(bk_block, key_end(a, b, i0 + r0 + mr - 1) - j0);
            if (bk <= 0) continue;
            if (a.E > 0) qk(mr, bk, Q + r0 * a.E, kt, S.data());
            else std::fill(S.data(), S.data() + mr * bk, T(0));
            apply_masks(a, S.data(), bk, b, h, i0 + r0, mr, j0, bk);
            softmax_rows(S.data(), bk, r0, r0 + mr, bk);
            if (a.dropout_p > 0) apply_dropout(a, S.data(), bk, b, h, i0 + r0, mr, j0, bk);
            pv(mr, bk, S.data(), Pb.data(), vp, O.data() + r0 * a.Ev);
          }
          continue;
        }
        if (own && a.E > 0) {
          qk(bq, bk, Q, kt, S.data());
        } else {
          if constexpr (kBf16) std::fill(S.data(), S.data() + bq * bk, T(0));  // E = 0 (E > 0 is own)
          else scores(a, Q, K + j0 * a.E, bq, bk, S.data());
        }
        apply_masks(a, S.data(), bk, b, h, i0, bq, j0, bk);
        softmax_rows(S.data(), bk, 0, bq, bk);
        if (a.dropout_p > 0) apply_dropout(a, S.data(), bk, b, h, i0, bq, j0, bk);
        if (own) {
          pv(bq, bk, S.data(), Pb.data(), vp, O.data());
        } else if constexpr (!kBf16) {
          mm<T>(false, false, bq, a.Ev, bk, T(1), S.data(), bk, Vv + j0 * a.Ev, a.Ev, T(1), O.data(), a.Ev);
        }
      }
      for (int64_t r = 0; r < bq; ++r) {
        T* o_row = O.data() + r * a.Ev;
        T* lse = static_cast<T*>(a.lse) + bh * a.L + i0 + r;
        In* dst = out + (bh * a.L + i0 + r) * a.Ev;
        // a fully masked row: P = 0, out = 0 V (0, or NaN where V is not finite, as torch)
        *lse = l[r] == T(0) ? ninf : m[r] + std::log(l[r]);
        if constexpr (kBf16) {  // scaled in place, then rounded into out
          if (l[r] != T(0)) scale_row(o_row, a.Ev, T(1) / l[r]);
          to_bf16_rows(o_row, a.Ev, 1, a.Ev, dst, a.Ev, false);
        } else if (l[r] == T(0)) {
          std::copy(o_row, o_row + a.Ev, dst);
        } else {
          scale_row(o_row, a.Ev, T(1) / l[r], dst);  // straight into out
        }
      }
    }
  });
}

// The backward's work split: key blocks kb of head (b, hk) go to partition kb % parts, one task per
// (b, hk, partition), each with its own dQ buffer (partition 0 writes grad_q itself). parts depends on
// the shapes only -- never on the thread count -- so the sums, and their bits, do too. About 32 tasks
// when the heads alone give fewer; at most 8 dQ buffers.
int64_t bwd_parts(const AttnArgs& a, int64_t nkb) {
  const int64_t heads = std::max<int64_t>(a.B * a.Hk, 1);
  return std::max<int64_t>(1, std::min<int64_t>({nkb, 8, (32 + heads - 1) / heads}));
}

// kBf16: q, k, v, out and grad_out are bfloat16 (In = uint16_t), the five block products the AVX512_BF16
// kernel (P and dS rounded to bf16 as their operands, as torch's bf16 backward does), everything else and
// the gradients float32; needs even head dims E and Ev. dV and dK are then accumulated transposed,
// dV^T += dO^T P and dK^T += scale Q^T dS, so that P and dS are the packed operand (rows rounded in pairs)
// and dO^T, Q^T (transposed once per call) the broadcast one.
template <typename T, bool kBf16 = false>
void bwd(const AttnArgs& a) {
  using In = std::conditional_t<kBf16, uint16_t, T>;
  const bool own = kBf16 || use_own_gemm<T>(true, a);
  if constexpr (kBf16) attention_gemm_note(true, true, true);
  const int64_t nkb = (a.S + kBk - 1) / kBk, group = a.Hq / a.Hk;
  const In* q = static_cast<const In*>(a.q);
  const In* k = static_cast<const In*>(a.k);
  const In* v = static_cast<const In*>(a.v);
  const In* o = static_cast<const In*>(a.out);
  const T* lse_all = static_cast<const T*>(a.lse);
  const In* dout = static_cast<const In*>(a.grad_out);
  T* dq = static_cast<T*>(a.grad_q);
  T* dk = static_cast<T*>(a.grad_k);
  T* dv = static_cast<T*>(a.grad_v);
  T* dmask = static_cast<T*>(a.grad_mask);
  const bool need_ds = dq != nullptr || dk != nullptr || dmask != nullptr;
  const int64_t rows = a.B * a.Hq * a.L;
  // delta_i = sum_c dO_ic O_ic (the row term of the softmax backward)
  std::vector<T> delta(rows);
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T s = 0;
      for (int64_t c = 0; c < a.Ev; ++c) s += as_float(dout[r * a.Ev + c]) * as_float(o[r * a.Ev + c]);
      delta[r] = s;
    }
  });
  // Per key/value head (b, hk): some input of its blocks is not finite (K, V, Q, delta -- not finite
  // when dO or out is not -- or an lse that is NaN / +inf), so the blocks that masks let us skip may
  // hold NaN (0 * inf) as they do in torch: skip nothing there.
  std::vector<char> head_bad;
  if (may_skip(a)) {
    head_bad.assign(a.B * a.Hk, 0);
    at::parallel_for(0, a.B * a.Hk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        bool ok = all_finite(k + t * a.S * a.E, a.S * a.E) && all_finite(v + t * a.S * a.Ev, a.S * a.Ev);
        const int64_t bh0 = (t / a.Hk) * a.Hq + (t % a.Hk) * group;  // first query head of the group
        ok = ok && all_finite(q + bh0 * a.L * a.E, group * a.L * a.E) && all_finite(delta.data() + bh0 * a.L, group * a.L);
        for (int64_t r = bh0 * a.L; ok && r < (bh0 + group) * a.L; ++r)
          ok = !(lse_all[r] != lse_all[r] || lse_all[r] == std::numeric_limits<T>::infinity());
        head_bad[t] = !ok;
      }
    });
  }
  const int64_t parts = bwd_parts(a, nkb);
  // dQ buffers of partitions 1.. (partition 0 accumulates into grad_q, zeroed by the launcher)
  std::vector<std::unique_ptr<Scratch<T>>> dq_part(dq != nullptr ? parts - 1 : 0);
  for (auto& part : dq_part) part = std::make_unique<Scratch<T>>(rows * a.E);
  const T ninf = -std::numeric_limits<T>::infinity();
  // The own product: per key/value head K^T (for the scores), K (dQ += dS K), V^T (dP = dO V^T); per
  // query head Q (dK += dS^T Q) and dO (dV += P^T dO), each packed once into panels. bf16: pair panels, and
  // Q, dO instead transposed (rows of Lk = round2(L) bf16, the pad zero): the A operands of dK^T and dV^T.
  const int64_t Ek = kBf16 ? round2(a.E) : a.E, Evk = kBf16 ? round2(a.Ev) : a.Ev, Sk = kBf16 ? round2(a.S) : a.S;
  const int64_t Lk = round2(a.L);
  const auto psize = [](int64_t K, int64_t N) { return kBf16 ? pair_panels_size(K, N) : panels_size(K, N); };
  const int64_t kt_size = psize(a.E, a.S), kr_size = psize(a.S, a.E), vt_size = psize(a.Ev, a.S);
  const int64_t qr_size = kBf16 ? a.E * Lk : panels_size(a.L, a.E), dor_size = kBf16 ? a.Ev * Lk : panels_size(a.L, a.Ev);
  std::unique_ptr<Scratch<In>> kt_pack, kr_pack, vt_pack, qr_pack, dor_pack;
  const auto pack = [](const In* X, int64_t sk, int64_t sc, int64_t K, int64_t N, In* dst) {
    if constexpr (kBf16) pack_pair_panels(X, sk, sc, K, N, dst);
    else pack_panels(X, sk, sc, K, N, dst);
  };
  if (own) {
    kt_pack = std::make_unique<Scratch<In>>(a.B * a.Hk * kt_size, false);
    if (dq != nullptr) kr_pack = std::make_unique<Scratch<In>>(a.B * a.Hk * kr_size, false);
    if (need_ds) vt_pack = std::make_unique<Scratch<In>>(a.B * a.Hk * vt_size, false);
    if (dk != nullptr) qr_pack = std::make_unique<Scratch<In>>(a.B * a.Hq * qr_size, false);
    if (dv != nullptr) dor_pack = std::make_unique<Scratch<In>>(a.B * a.Hq * dor_size, false);
    at::parallel_for(0, a.B * a.Hk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        pack(k + t * a.S * a.E, 1, a.E, a.E, a.S, kt_pack->data() + t * kt_size);
        if (kr_pack) pack(k + t * a.S * a.E, a.E, 1, a.S, a.E, kr_pack->data() + t * kr_size);
        if (vt_pack) pack(v + t * a.S * a.Ev, 1, a.Ev, a.Ev, a.S, vt_pack->data() + t * vt_size);
      }
    });
    if (qr_pack || dor_pack)
      at::parallel_for(0, a.B * a.Hq, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          if constexpr (kBf16) {
            if (qr_pack) transpose_pad(q + t * a.L * a.E, a.E, a.L, a.E, qr_pack->data() + t * qr_size, Lk);
            if (dor_pack) transpose_pad(dout + t * a.L * a.Ev, a.Ev, a.L, a.Ev, dor_pack->data() + t * dor_size, Lk);
          } else {
            if (qr_pack) pack_panels(q + t * a.L * a.E, a.E, 1, a.L, a.E, qr_pack->data() + t * qr_size);
            if (dor_pack) pack_panels(dout + t * a.L * a.Ev, a.Ev, 1, a.L, a.Ev, dor_pack->data() + t * dor_size);
          }
        }
      });
  }
  at::parallel_for(0, a.B * a.Hk * parts, 1, [&](int64_t t0, int64_t t1) {
    BlasSingleThread blas1;
    // Sized to the blocks that occur; Pd only with dropout, dP only when dS is needed
    const int64_t sq = std::min(kBq, a.L), sk = std::min(kBk, a.S);
    Scratch<T> P(sq * sk), Pd(a.dropout_p > 0 ? sq * sk : 0), dP(need_ds ? sq * sk : 0), dK(sk * a.E),
        dV(sk * a.Ev);
    // bf16: P or dS in pair panels, dS rows; dK, dV above hold dK^T, dV^T (E x sk, Ev x sk)
    Scratch<In> Pp(kBf16 ? round2(sq) * ((sk + kNR - 1) / kNR * kNR) : 0, false), dSb(kBf16 ? sq * round2(sk) : 0, false);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bhk = t / parts, part = t % parts, b = bhk / a.Hk, hk = bhk % a.Hk;
      T* dqp = dq == nullptr ? nullptr : part == 0 ? dq : dq_part[part - 1]->data();
      const bool skip_ok = may_skip(a) && !head_bad[bhk];
      for (int64_t kb = part; kb < nkb; kb += parts) {
        const int64_t j0 = kb * kBk, bk_all = std::min(kBk, a.S - j0);
        // Keys of this block past a 1-D valid length are masked for every query: never computed (their
        // dK, dV rows stay 0). Below, causal trims further per query block.
        const int64_t bk_live = skip_ok && a.valid_lens_dim == 1 && a.valid_lens[b] > 0
                                    ? std::min(bk_all, a.valid_lens[b] - j0) : bk_all;
        const In* K = k + (bhk * a.S + j0) * a.E;
        const In* Vv = v + (bhk * a.S + j0) * a.Ev;
        std::fill(dK.begin(), dK.end(), T(0));
        std::fill(dV.begin(), dV.end(), T(0));
        const bool keys_dead = bk_live <= 0;
        for (int64_t h = hk * group; !keys_dead && h < (hk + 1) * group; ++h) {
          const int64_t bh = b * a.Hq + h;
          for (int64_t i0 = skip_ok && a.causal ? j0 / kBq * kBq : 0; i0 < a.L; i0 += kBq) {
            const int64_t bq = std::min(kBq, a.L - i0);
            // causal: keys past this query block's last row are masked for all of its rows
            const int64_t bk = skip_ok && a.causal ? std::min(bk_live, i0 + bq - j0) : bk_live;
            if (bk <= 0) continue;
            const In* Q = q + (bh * a.L + i0) * a.E;
            const In* dO = dout + (bh * a.L + i0) * a.Ev;
            const In* kt = own ? kt_pack->data() + bhk * kt_size + j0 / kNR * Ek * kNR : nullptr;
            if constexpr (kBf16) {
              if (a.E > 0) gemm_pair_panels(bq, bk, Ek, static_cast<float>(a.scale), Q, a.E, kt, Ek * kNR, 0.f, P.data(), bk);
              else std::fill(P.data(), P.data() + bq * bk, T(0));
            } else if (own && a.E > 0) {
              own_mm<T>(bq, bk, a.E, static_cast<T>(a.scale), Q, a.E, 1, kt, a.E * kNR, T(0), P.data(), bk);
            } else {
              scores(a, Q, K, bq, bk, P.data());
            }
            apply_masks(a, P.data(), bk, b, h, i0, bq, j0, bk);
            for (int64_t r = 0; r < bq; ++r) {
              const T lse = lse_all[bh * a.L + i0 + r];
              T* row = P.data() + r * bk;
              if (lse == ninf) std::fill(row, row + bk, T(0));  // no key in the row: P = 0
              else exp_sub_sum(row, bk, lse);
            }
            const T* Pv = P.data();
            if (a.dropout_p > 0) {
              std::copy(P.begin(), P.begin() + bq * bk, Pd.begin());
              apply_dropout(a, Pd.data(), bk, b, h, i0, bq, j0, bk);
              Pv = Pd.data();
            }
            if constexpr (kBf16) {
              if (dv != nullptr) {  // dV^T += dO^T Pd
                pack_pair_panels_f32(Pv, bk, bq, bk, Pp.data());
                gemm_pair_panels(a.Ev, bk, round2(bq), 1.f, dor_pack->data() + bh * dor_size + i0, Lk, Pp.data(),
                                 round2(bq) * kNR, 1.f, dV.data(), sk);
              }
            } else if (dv != nullptr) {  // dV += Pd^T dO
              if (own)
                own_mm<T>(bk, a.Ev, bq, T(1), Pv, 1, bk, dor_pack->data() + bh * dor_size + i0 * kNR, a.L * kNR, T(1),
                          dV.data(), a.Ev);
              else
                mm<T>(true, false, bk, a.Ev, bq, T(1), Pv, bk, dO, a.Ev, T(1), dV.data(), a.Ev);
            }
            if (!need_ds) continue;
            if constexpr (kBf16)  // dPd = dO V^T
              gemm_pair_panels(bq, bk, Evk, 1.f, dO, a.Ev, vt_pack->data() + bhk * vt_size + j0 / kNR * Evk * kNR,
                               Evk * kNR, 0.f, dP.data(), bk);
            else if (own)  // dPd = dO V^T
              own_mm<T>(bq, bk, a.Ev, T(1), dO, a.Ev, 1, vt_pack->data() + bhk * vt_size + j0 / kNR * a.Ev * kNR,
                        a.Ev * kNR, T(0), dP.data(), bk);
            else
              mm<T>(false, true, bq, bk, a.Ev, T(1), dO, a.Ev, Vv, a.Ev, T(0), dP.data(), bk);
            if (a.dropout_p > 0) apply_dropout(a, dP.data(), bk, b, h, i0, bq, j0, bk);
            for (int64_t r = 0; r < bq; ++r) {  // dS = P (dP - delta), in place in dP
              const T d = delta[bh * a.L + i0 + r];
              T* ds = dP.data() + r * bk;
              const T* p = P.data() + r * bk;
              for (int64_t c = 0; c < bk; ++c) ds[c] = p[c] * (ds[c] - d);
              if (dmask != nullptr)  // the float mask is added to the scores: its gradient is dS
                std::copy(ds, ds + bk, dmask + (bh * a.L + i0 + r) * a.S + j0);
              if (a.valid_lens_dim && valid_len(a, b, i0 + r) <= 0)  // constant scores: no gradient to q, k
                std::fill(ds, ds + bk, T(0));
            }
            if (a.E == 0) continue;
            const T sc = static_cast<T>(a.scale);
            if constexpr (kBf16) {
              if (dk != nullptr) {  // dK^T += scale Q^T dS
                pack_pair_panels_f32(dP.data(), bk, bq, bk, Pp.data());
                gemm_pair_panels(a.E, bk, round2(bq), sc, qr_pack->data() + bh * qr_size + i0, Lk, Pp.data(),
                                 round2(bq) * kNR, 1.f, dK.data(), sk);
              }
              if (dqp != nullptr) {  // dQ += scale dS K
                to_bf16_rows(dP.data(), bk, bq, bk, dSb.data(), round2(bk), true);
                gemm_pair_panels(bq, a.E, round2(bk), sc, dSb.data(), round2(bk), kr_pack->data() + bhk * kr_size + j0 * kNR,
                                 Sk * kNR, 1.f, dqp + (bh * a.L + i0) * a.E, a.E);
              }
            } else {
              if (dk != nullptr) {  // dK += scale dS^T Q
                if (own)
                  own_mm<T>(bk, a.E, bq, sc, dP.data(), 1, bk, qr_pack->data() + bh * qr_size + i0 * kNR, a.L * kNR, T(1),
                            dK.data(), a.E);
                else
                  mm<T>(true, false, bk, a.E, bq, sc, dP.data(), bk, Q, a.E, T(1), dK.data(), a.E);
              }
              if (dqp != nullptr) {  // dQ += scale dS K
                if (own)
                  own_mm<T>(bq, a.E, bk, sc, dP.data(), bk, 1, kr_pack->data() + bhk * kr_size + j0 * kNR, a.S * kNR,
                            T(1), dqp + (bh * a.L + i0) * a.E, a.E);
                else
                  mm<T>(false, false, bq, a.E, bk, sc, dP.data(), bk, K, a.E, T(1), dqp + (bh * a.L + i0) * a.E, a.E);
              }
            }
          }
        }
        if constexpr (kBf16) {  // dK^T, dV^T (row stride sk) back to rows
          if (dk != nullptr) transpose_pad(dK.data(), sk, a.E, bk_all, dk + (bhk * a.S + j0) * a.E, a.E);
          if (dv != nullptr) transpose_pad(dV.data(), sk, a.Ev, bk_all, dv + (bhk * a.S + j0) * a.Ev, a.Ev);
        } else {
          if (dk != nullptr) std::copy(dK.begin(), dK.begin() + bk_all * a.E, dk + (bhk * a.S + j0) * a.E);
          if (dv != nullptr) std::copy(dV.begin(), dV.begin() + bk_all * a.Ev, dv + (bhk * a.S + j0) * a.Ev);
        }
      }
    }
  });
  if (dq_part.empty()) return;
  at::parallel_for(0, rows * a.E, 4096, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      T s = dq[e];
      for (const auto& part : dq_part) s += (*part)[e];
      dq[e] = s;
    }
  });
}

#if PYFASTDL_ATTN_BF16
const AttentionKernels kTable{&fwd<float>, &fwd<double>, &fwd<float, true>, &bwd<float>, &bwd<double>,
                              &bwd<float, true>};
#else
const AttentionKernels kTable{&fwd<float>, &fwd<double>, nullptr, &bwd<float>, &bwd<double>, nullptr};
#endif

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(AttentionKernels, attention_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
