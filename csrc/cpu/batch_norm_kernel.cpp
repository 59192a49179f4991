// Batch-norm CPU kernels (at::vec SIMD + ATen parallel_for), compiled once per capability:
// setup.py defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and the matching -m flags.
//
// Two memory layouts (common/batch_norm.h):
//   NCS: (N, C, S) contiguous. A "run" is one (n, c) row of S contiguous elements; the per-channel
//        constants are broadcast scalars for the whole run.
//   MC:  (M, C) contiguous, C innermost (channels_last, (N, C)). A row holds one element of every
//        channel; the per-channel constants are loaded as vectors alongside.
// Two generic loops cover all four kernels: reduce_* (two per-channel sums) and map_* (elementwise
// with per-channel constants). The ops plugged into them hold the math.
//
// Determinism: reductions write one partial per run (NCS) or per fixed-size row block (MC) and sum
// the partials in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "cpu/batch_norm_kernel.h"

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 32768;  // elements per parallel task, below which one thread runs
constexpr int kMaxK = 7;            // per-channel constants an op can take

template <typename T>
double hsum(const Vectorized<T>& v) {
  alignas(64) T buf[Vectorized<T>::size()];
  v.store(buf);
  double s = 0;
  for (int i = 0; i < Vectorized<T>::size(); ++i) s += buf[i];
  return s;
}

// Per-channel constants for one position: broadcast (NCS) or loaded at channel offset j (MC).
template <typename T>
struct Consts {
  Vectorized<T> v[kMaxK];
};

template <typename T, int NK>
struct ConstPtrs {
  const T* p[NK > 0 ? NK : 1];
  Consts<T> broadcast(int64_t c) const {
    Consts<T> k;
    for (int i = 0; i < NK; ++i) k.v[i] = Vectorized<T>(p[i][c]);
    return k;
  }
  Consts<T> load(int64_t j, int64_t count = Vectorized<T>::size()) const {
    Consts<T> k;
    for (int i = 0; i < NK; ++i) k.v[i] = Vectorized<T>::loadu(p[i] + j, count);
    return k;
  }
};

// ---- generic per-channel reduction: s1[c] = sum op.first(x, g, k), s2[c] = sum op.second(...) --

// Op: void operator()(Vec x, Vec g, const Consts& k, Vec& acc1, Vec& acc2) adds one vector's terms.
// One contiguous run of S elements sharing the constants k; returns its two sums. Precision on long
// runs (a 4096 x 4096 plane is one run): the run is cut into chunks of kChunk elements; a chunk is
// summed in T in 2 x W lanes (at most kChunk / (2 W) = 128..256 terms a lane, float32 error ~1e-7
// of the chunk's sum) and each chunk's sum is added in float64, so the error does not grow with S
// (before: S / (2 W) terms a lane, 2.7e-4 relative error of y at S = 2^24). Costs one horizontal
// sum per kChunk elements. Masked tail: terms are computed into zeroed vectors and blended so
// padding lanes add nothing.
constexpr int64_t kChunk = 4096;

template <typename T, typename Op>
inline std::pair<double, double> reduce_run(const T* xr, const T* gr, int64_t S, const Consts<T>& k, Op& op) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  double s1 = 0, s2 = 0;
  for (int64_t c0 = 0; c0 < S; c0 += kChunk) {
    const int64_t end = std::min<int64_t>(S, c0 + kChunk);
    Vec a1(0), a2(0), b1(0), b2(0);
    int64_t i = c0;
    for (; i + 2 * W <= end; i += 2 * W) {
      op(Vec::loadu(xr + i), Vec::loadu(gr + i), k, a1, a2);
      op(Vec::loadu(xr + i + W), Vec::loadu(gr + i + W), k, b1, b2);
    }
    for (; i < end; i += W) {
      const int64_t n = std::min<int64_t>(W, end - i);
      Vec t1(0), t2(0);
      op(Vec::loadu(xr + i, n), Vec::loadu(gr + i, n), k, t1, t2);
      a1 = a1 + Vec::set(Vec(0), t1, n);
      a2 = a2 + Vec::set(Vec(0), t2, n);
    }
    s1 += hsum(a1 + b1);
    s2 += hsum(a2 + b2);
  }
  return {s1, s2};
}

// Non-temporal ("streaming") store of a full vector to a vector-aligned address: the line goes to
// memory without being read first (no read-for-ownership) and without evicting the inputs from the
// caches. Worth it only for outputs much larger than the caches (stream_bytes()), which the next
// layer would read from DRAM anyway. Plain store where the ISA has none.
inline void stream_store(float* p, const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(p, v);
#else
  v.store(p);
#endif
}
inline void stream_store(double* p, const Vectorized<double>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm512_stream_pd(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_pd(p, v);
#else
  v.store(p);
#endif
}
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}
// Outputs above this many bytes skip the caches: 16 MB (about half a server L3 slice; sysconf's
// cache size is not trustworthy in VMs: it reported 320 MB for a 32 MB L3 here);
// PYFASTDL_STREAM_BYTES overrides. Measured on a 2-core EPYC (32 MB L3), float32 (32, 64, 56, 56),
// 25.7 MB: training forward 2.3 -> 1.4 ms, backward 3.75 -> 2.5 ms.
inline int64_t stream_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("PYFASTDL_STREAM_BYTES");
    return e && *e ? static_cast<int64_t>(std::atoll(e)) : int64_t(16) << 20;
  }();
  return v;
}

// One contiguous run mapped: out[i] = op(x[i], g[i], k). Stream: non-temporal stores where the
// output is vector-aligned (the caller fences).
template <bool Stream, typename T, typename Op>
inline void map_run(const T* xr, const T* gr, int64_t S, const Consts<T>& k, Op& op, T* o) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  if (Stream) {  // plain stores up to the first aligned element, then streaming ones
    const int64_t mis = (reinterpret_cast<uintptr_t>(o) % sizeof(Vec)) / sizeof(T);
    const int64_t head = mis == 0 ? 0 : std::min<int64_t>(S, W - mis);
    if (reinterpret_cast<uintptr_t>(o) % sizeof(T) == 0) {
      if (head > 0) op(Vec::loadu(xr, head), Vec::loadu(gr, head), k).store(o, head);
      for (i = head; i + W <= S; i += W) stream_store(o + i, op(Vec::loadu(xr + i), Vec::loadu(gr + i), k));
    }
  }
  for (; i + 2 * W <= S; i += 2 * W) {
    op(Vec::loadu(xr + i), Vec::loadu(gr + i), k).store(o + i);
    op(Vec::loadu(xr + i + W), Vec::loadu(gr + i + W), k).store(o + i + W);
  }
  for (; i < S; i += W) {
    const int64_t n = std::min<int64_t>(W, S - i);
    op(Vec::loadu(xr + i, n), Vec::loadu(gr + i, n), k).store(o + i, n);
  }
}

template <typename T, int NK, typename Op>
void reduce_ncs(const T* x, const T* g, const bn::Layout& L, const ConstPtrs<T, NK>& kp, Op op,
                double* out1, double* out2) {
  const int64_t rows = L.N * L.C, S = L.S, C = L.C;
  std::vector<double> part(2 * rows);
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1)),
                   [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto s = reduce_run(x + r * S, g + r * S, S, kp.broadcast(r % C), op);
      part[2 * r] = s.first;
      part[2 * r + 1] = s.second;
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t n = 0; n < L.N; ++n) {
      s1 += part[2 * (n * C + c)];
      s2 += part[2 * (n * C + c) + 1];
    }
    out1[c] = s1;
    out2[c] = s2;
  }
}

// NCS, per block of channels: reduce each channel's N runs (same order as reduce_ncs), hand the
// sums to on_sums(c, s1, s2) (which fills channel c's constants), then map the same runs while they
// are still in L2: DRAM sees the data once where the two-phase path reads it twice. A block holds
// as many channels as keep its inputs within kBlockBytes, so that for small planes (14x14) each
// image's runs of the block are one contiguous stretch the hardware prefetcher can follow, not a
// 784-byte run per page. Measured on the 2-core EPYC, float32 (32, 256, 14, 14) in a fwd+bwd loop:
// one channel per task made forward 1.7 ms and backward 2.4 ms (0.45 / 1.55 ms when looped alone).
template <typename T, int NKR, int NKM, typename RedOp, typename MapOp>
void reduce_then_map_per_channel(const T* x, const T* g, const bn::Layout& L,
                                 const ConstPtrs<T, NKR>& kr, RedOp red, PerChannelFn on_sums,
                                 const ConstPtrs<T, NKM>& km, MapOp mp, T* out) {
  constexpr int64_t kBlockBytes = 256 << 10;
  const int64_t C = L.C, S = L.S, N = L.N;
  const bool stream = N * C * S * static_cast<int64_t>(sizeof(T)) > stream_bytes();
  constexpr int64_t kMaxBlock = 64;
  const int64_t CB = std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(N * S * sizeof(T), 1), 1, kMaxBlock);
  // At least kGrain elements a task: a small input runs inline, without a parallel region's fork and
  // join (each channel's sums are in the same order whatever the split).
  at::parallel_for(0, C, std::max<int64_t>(1, kGrain / std::max<int64_t>(N * S, 1)), [&](int64_t c0, int64_t c1) {
    double s1[kMaxBlock], s2[kMaxBlock];
    for (int64_t cb = c0; cb < c1; cb += CB) {
      const int64_t ce = std::min(c1, cb + CB);
      std::fill(s1, s1 + (ce - cb), 0.0);
      std::fill(s2, s2 + (ce - cb), 0.0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = cb; c < ce; ++c) {
          const auto s = reduce_run(x + (n * C + c) * S, g + (n * C + c) * S, S, kr.broadcast(c), red);
          s1[c - cb] += s.first;
          s2[c - cb] += s.second;
        }
      for (int64_t c = cb; c < ce; ++c) on_sums(c, s1[c - cb], s2[c - cb]);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = cb; c < ce; ++c) {
          const int64_t o = (n * C + c) * S;
          if (stream)
            map_run<true>(x + o, g + o, S, km.broadcast(c), mp, out + o);
          else
            map_run<false>(x + o, g + o, S, km.broadcast(c), mp, out + o);
        }
    }
    if (stream) stream_fence();
  });
}

template <typename T, int NK, typename Op>
void reduce_mc(const T* x, const T* g, const bn::Layout& L, const ConstPtrs<T, NK>& kp, Op op,
               double* out1, double* out2) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t M = L.N * L.S, C = L.C;
  // A task sums SB rows (at most 1024 terms per lane in T, ~256 K elements) into one partial; the
  // partials are summed in float64 in a fixed order.
  const int64_t SB = std::max<int64_t>(1, std::min<int64_t>(1024, 262144 / C));
  const int64_t nb = (M + SB - 1) / SB;
  std::vector<double> part(2 * nb * C);
  const bool small = M * C * static_cast<int64_t>(sizeof(T)) <= (int64_t(1) << 20);
  at::parallel_for(0, nb, std::max<int64_t>(1, kGrain / (SB * C)), [&](int64_t b0, int64_t b1) {
    std::vector<T> acc(2 * C);
    const ConstPtrs<T, NK> kl = kp;  // (the task's own copy: not reloaded after each store)
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), T(0));
      const int64_t end = std::min(M, (b + 1) * SB);
      T* acc1 = acc.data();
      T* acc2 = acc1 + C;
      if (small) {
        // The block sits in L1/L2: one channel tile at a time down the rows, sums in registers.
        // Full tiles: four rows at a time into four accumulator pairs (the adds of one row do not
        // wait for the previous row's), combined in a fixed order.
        for (int64_t j = 0; j < C; j += W) {
          const int64_t n = std::min<int64_t>(W, C - j);
          const Consts<T> k = kl.load(j, n);
          if (n == W) {
            Vec a1[4] = {Vec(0), Vec(0), Vec(0), Vec(0)}, a2[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
            int64_t m = b * SB;
            for (; m + 4 <= end; m += 4)
              for (int u = 0; u < 4; ++u)
                op(Vec::loadu(x + (m + u) * C + j), Vec::loadu(g + (m + u) * C + j), k, a1[u], a2[u]);
            for (; m < end; ++m) op(Vec::loadu(x + m * C + j), Vec::loadu(g + m * C + j), k, a1[0], a2[0]);
            ((a1[0] + a1[1]) + (a1[2] + a1[3])).store(acc1 + j);
            ((a2[0] + a2[1]) + (a2[2] + a2[3])).store(acc2 + j);
            continue;
          }
          Vec a1(0), a2(0);
          for (int64_t m = b * SB; m < end; ++m) {
            Vec t1(0), t2(0);
            op(Vec::loadu(x + m * C + j, n), Vec::loadu(g + m * C + j, n), k, t1, t2);
            a1 = a1 + Vec::set(Vec(0), t1, n);
            a2 = a2 + Vec::set(Vec(0), t2, n);
          }
          a1.store(acc1 + j, n);
          a2.store(acc2 + j, n);
        }
      } else {
        // Row by row, contiguous (the prefetcher streams); the running sums acc (2, C) stay in L1.
        for (int64_t m = b * SB; m < end; ++m) {
          const T* xr = x + m * C;
          const T* gr = g + m * C;
          int64_t j = 0;
          for (; j + W <= C; j += W) {
            Vec a1 = Vec::loadu(acc1 + j), a2 = Vec::loadu(acc2 + j);
            op(Vec::loadu(xr + j), Vec::loadu(gr + j), kl.load(j), a1, a2);
            a1.store(acc1 + j);
            a2.store(acc2 + j);
          }
          if (j < C) {
            const int64_t n = C - j;
            Vec t1(0), t2(0);
            op(Vec::loadu(xr + j, n), Vec::loadu(gr + j, n), kl.load(j, n), t1, t2);
            (Vec::loadu(acc1 + j, n) + t1).store(acc1 + j, n);
            (Vec::loadu(acc2 + j, n) + t2).store(acc2 + j, n);
          }
        }
      }
      double* p = part.data() + 2 * b * C;
      for (int64_t c = 0; c < 2 * C; ++c) p[c] = acc[c];
    }
  });
  for (int64_t c = 0; c < C; ++c) out1[c] = out2[c] = 0;
  for (int64_t b = 0; b < nb; ++b) {
    const double* p = part.data() + 2 * b * C;
    for (int64_t c = 0; c < C; ++c) {
      out1[c] += p[c];
      out2[c] += p[C + c];
    }
  }
}

template <typename T, int NK, typename Op>
void reduce(const T* x, const T* g, const bn::Layout& L, const ConstPtrs<T, NK>& kp, Op op,
            double* out1, double* out2) {
  if (L.channels_last)
    reduce_mc<T, NK>(x, g, L, kp, op, out1, out2);
  else
    reduce_ncs<T, NK>(x, g, L, kp, op, out1, out2);
}

// ---- generic elementwise map with per-channel constants: out = op(x, g, k) ----------------------

template <typename T, int NK, typename Op>
void map(const T* x, const T* g, const bn::Layout& L, const ConstPtrs<T, NK>& kp, Op op, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t C = L.C;
  if (!L.channels_last) {
    const int64_t rows = L.N * C, S = L.S;
    const bool stream = rows * S * static_cast<int64_t>(sizeof(T)) > stream_bytes();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(S, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (stream)
          map_run<true>(x + r * S, g + r * S, S, kp.broadcast(r % C), op, out + r * S);
        else
          map_run<false>(x + r * S, g + r * S, S, kp.broadcast(r % C), op, out + r * S);
      }
      if (stream) stream_fence();
    });
  } else {
    const int64_t M = L.N * L.S;
    at::parallel_for(0, M, std::max<int64_t>(1, kGrain / C), [&](int64_t m0, int64_t m1) {
      // Row by row, contiguous: the hardware prefetcher streams; the constants come from L1. The
      // constants' pointers are copied to the task's own frame: read through the caller's struct,
      // they were reloaded after every store to out (which might alias it).
      const ConstPtrs<T, NK> kl = kp;
      const int64_t Cv = C - C % W;
      for (int64_t m = m0; m < m1; ++m) {
        const T* xr = x + m * C;
        const T* gr = g + m * C;
        T* o = out + m * C;
        for (int64_t j = 0; j < Cv; j += W) op(Vec::loadu(xr + j), Vec::loadu(gr + j), kl.load(j)).store(o + j);
        if (Cv < C) {
          const int64_t n = C - Cv;
          op(Vec::loadu(xr + Cv, n), Vec::loadu(gr + Cv, n), kl.load(Cv, n)).store(o + Cv, n);
        }
      }
    });
  }
}

// ---- the batch-norm math ------------------------------------------------------------------------

// Constants of the normalization, per channel: the mean split in two (m1 = mean rounded to T,
// m2 = the rest), so that x - mean keeps its precision when |mean| >> std (x - m1 is exact for x
// near m1), the scale (weight * invstd) and the bias.
//   xc = (x - m1) - m2,  y = xc * scale + bias
// The backward adds a, b, d: grad_input = a * g' + b * xc + d.
enum { kM1 = 0, kM2 = 1, kScale = 2, kBias = 3, kA = 4, kB = 5, kD = 6 };

template <typename T>
inline Vectorized<T> centered(const Vectorized<T>& xv, const Consts<T>& k) {
  return (xv - k.v[kM1]) - k.v[kM2];
}

// sigmoid(y) = 1 / (1 + exp(-y)). float: ATen's polynomial exp_u20 (error ~1e-6 relative; -y
// clamped to [-88, 88], where exp is finite: sigmoid(y) for y < -88 is below 1e-38), NaN put back
// (the polynomial does not keep it); float64: Sleef's exp.
template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& yv) {
  const Vectorized<T> one(1);
  if constexpr (std::is_same_v<T, float>) {
    const Vectorized<T> e = at::vec::clamp(yv.neg(), Vectorized<T>(-88.f), Vectorized<T>(88.f)).exp_u20();
    return Vectorized<T>::blendv(one / (one + e), yv, yv.isnan());
  } else {
    return one / (one + yv.neg().exp());
  }
}

// y -> act(y) (bn::Activation).
template <typename T, int Act>
inline Vectorized<T> activate(const Vectorized<T>& yv) {
  if constexpr (Act == bn::kActRelu) return at::vec::maximum(yv, Vectorized<T>(0));
  else if constexpr (Act == bn::kActSigmoid) return sigmoid(yv);
  else return yv;
}

// The gradient through the activation: g * act'(y), y = xc * scale + bias recomputed (the ReLU mask
// y > 0, or s (1 - s), s = sigmoid(y)).
template <typename T, int Act>
inline Vectorized<T> masked_grad(const Vectorized<T>& xc, const Vectorized<T>& gv, const Consts<T>& k) {
  if constexpr (Act == bn::kActNone) {
    return gv;
  } else {
    const Vectorized<T> yv = at::vec::fmadd(xc, k.v[kScale], k.v[kBias]);
    if constexpr (Act == bn::kActRelu) {
      return Vectorized<T>::blendv(Vectorized<T>(0), gv, yv > Vectorized<T>(0));
    } else {
      const Vectorized<T> sv = sigmoid(yv);
      return gv * (sv - sv * sv);
    }
  }
}

// Shifted sums for the statistics: sum (x - k0), sum (x - k0)^2, k0 = the channel's first element.
template <typename T>
struct StatsOp {
  void operator()(Vectorized<T> xv, Vectorized<T>, const Consts<T>& k, Vectorized<T>& a1, Vectorized<T>& a2) const {
    const Vectorized<T> d = xv - k.v[0];
    a1 = a1 + d;
    a2 = at::vec::fmadd(d, d, a2);
  }
};

template <typename T, int Act>
struct ApplyOp {
  Vectorized<T> operator()(Vectorized<T> xv, Vectorized<T>, const Consts<T>& k) const {
    const Vectorized<T> yv = at::vec::fmadd(centered(xv, k), k.v[kScale], k.v[kBias]);
    return activate<T, Act>(yv);
  }
};

template <typename T, int Act>
struct BwdReduceOp {
  void operator()(Vectorized<T> xv, Vectorized<T> gv, const Consts<T>& k, Vectorized<T>& a1, Vectorized<T>& a2) const {
    const Vectorized<T> xc = centered(xv, k);
    const Vectorized<T> gp = masked_grad<T, Act>(xc, gv, k);
    a1 = a1 + gp;
    a2 = at::vec::fmadd(gp, xc, a2);
  }
};

template <typename T, int Act>
struct BwdApplyOp {
  Vectorized<T> operator()(Vectorized<T> xv, Vectorized<T> gv, const Consts<T>& k) const {
    const Vectorized<T> xc = centered(xv, k);
    const Vectorized<T> gp = masked_grad<T, Act>(xc, gv, k);
    return at::vec::fmadd(k.v[kA], gp, at::vec::fmadd(k.v[kB], xc, k.v[kD]));
  }
};

// Eval: grad_input = a * g' (a = weight * invstd). x enters only through the ReLU mask, so a NaN or
// Inf in x leaves its grad_input finite (training's b * xc + d would give 0 * Inf = NaN), as torch.
template <typename T, int Act>
struct BwdApplyEvalOp {
  Vectorized<T> operator()(Vectorized<T> xv, Vectorized<T> gv, const Consts<T>& k) const {
    if constexpr (Act == bn::kActNone) return k.v[kA] * gv;
    return k.v[kA] * masked_grad<T, Act>(centered(xv, k), gv, k);
  }
};

template <typename T>
ConstPtrs<T, 4> norm_ptrs(const NormConsts& nc) {
  return {{static_cast<const T*>(nc.m1), static_cast<const T*>(nc.m2), static_cast<const T*>(nc.scale),
           static_cast<const T*>(nc.bias)}};
}

template <typename T>
ConstPtrs<T, 7> bwd_ptrs(const NormConsts& nc, const void* a, const void* b, const void* d) {
  return {{static_cast<const T*>(nc.m1), static_cast<const T*>(nc.m2), static_cast<const T*>(nc.scale),
           static_cast<const T*>(nc.bias), static_cast<const T*>(a), static_cast<const T*>(b),
           static_cast<const T*>(d)}};
}

// The shift of the statistics: each channel's first element, or 0 where that is not finite (an inf
// shift would turn every finite element into -inf and the channel's mean into inf - inf = NaN;
// torch gives mean = inf for a channel holding +inf).
template <typename T>
std::vector<T> first_elements(const T* x, const bn::Layout& L) {
  std::vector<T> shift(L.C);
  for (int64_t c = 0; c < L.C; ++c) {
    const T v = L.channels_last ? x[c] : x[c * L.S];
    shift[c] = std::isfinite(static_cast<double>(v)) ? v : T(0);
  }
  return shift;
}

template <typename T>
void stats_impl(const at::Tensor& x_, const bn::Layout& L, double* mean, double* var) {
  const T* x = x_.const_data_ptr<T>();
  const std::vector<T> shift = first_elements(x, L);
  std::vector<double> s1(L.C), s2(L.C);
  reduce<T, 1>(x, x, L, ConstPtrs<T, 1>{{shift.data()}}, StatsOp<T>{}, s1.data(), s2.data());
  const double n = static_cast<double>(L.reduce_size());
  for (int64_t c = 0; c < L.C; ++c) {
    const double m = s1[c] / n;
    mean[c] = static_cast<double>(shift[c]) + m;
    var[c] = std::max(s2[c] / n - m * m, 0.0);
  }
}

template <typename T, int Act>
void apply_impl(const at::Tensor& x, const bn::Layout& L, const NormConsts& nc, at::Tensor& y) {
  const T* xp = x.const_data_ptr<T>();
  map<T, 4>(xp, xp, L, norm_ptrs<T>(nc), ApplyOp<T, Act>{}, y.mutable_data_ptr<T>());
}

template <typename T, int Act>
void bwd_reduce_impl(const at::Tensor& g, const at::Tensor& x, const bn::Layout& L,
                     const NormConsts& nc, double* sum_g, double* sum_gx) {
  reduce<T, 4>(x.const_data_ptr<T>(), g.const_data_ptr<T>(), L, norm_ptrs<T>(nc), BwdReduceOp<T, Act>{},
               sum_g, sum_gx);
}

template <typename T, int Act>
void bwd_apply_impl(const at::Tensor& g, const at::Tensor& x, const bn::Layout& L,
                    const NormConsts& nc, const void* a, const void* b,
                    const void* d, bool training, at::Tensor& gi) {
  if (training)
    map<T, 7>(x.const_data_ptr<T>(), g.const_data_ptr<T>(), L, bwd_ptrs<T>(nc, a, b, d), BwdApplyOp<T, Act>{},
              gi.mutable_data_ptr<T>());
  else
    map<T, 7>(x.const_data_ptr<T>(), g.const_data_ptr<T>(), L, bwd_ptrs<T>(nc, a, b, d),
              BwdApplyEvalOp<T, Act>{}, gi.mutable_data_ptr<T>());
}

template <typename T, int Act>
void train_fwd_fused_impl(const at::Tensor& x_, const bn::Layout& L, PerChannelFn on_stats,
                          const NormConsts& nc, at::Tensor& y) {
  const T* x = x_.const_data_ptr<T>();
  const std::vector<T> shift = first_elements(x, L);
  const double n = static_cast<double>(L.reduce_size());
  reduce_then_map_per_channel<T, 1, 4>(
      x, x, L, ConstPtrs<T, 1>{{shift.data()}}, StatsOp<T>{},
      [&](int64_t c, double s1, double s2) {
        const double m = s1 / n;
        on_stats(c, static_cast<double>(shift[c]) + m, std::max(s2 / n - m * m, 0.0));
      },
      norm_ptrs<T>(nc), ApplyOp<T, Act>{}, y.mutable_data_ptr<T>());
}

template <typename T, int Act>
void bwd_fused_impl(const at::Tensor& g, const at::Tensor& x, const bn::Layout& L, const NormConsts& nc,
                    PerChannelFn on_sums, const void* a, const void* b, const void* d,
                    at::Tensor& gi) {
  reduce_then_map_per_channel<T, 4, 7>(x.const_data_ptr<T>(), g.const_data_ptr<T>(), L, norm_ptrs<T>(nc),
                                       BwdReduceOp<T, Act>{}, on_sums, bwd_ptrs<T>(nc, a, b, d),
                                       BwdApplyOp<T, Act>{}, gi.mutable_data_ptr<T>());
}

// ---- type/flag dispatch into the table ----------------------------------------------------------

// Calls FN<T, Act>(args...) for the input's dtype (float32/float64) and the activation.
#define PYFASTDL_BN_DISPATCH_T(T, act, FN, ...)                                            \
  do {                                                                                    \
    if ((act) == bn::kActRelu) FN<T, bn::kActRelu>(__VA_ARGS__);                          \
    else if ((act) == bn::kActSigmoid) FN<T, bn::kActSigmoid>(__VA_ARGS__);               \
    else FN<T, bn::kActNone>(__VA_ARGS__);                                                \
  } while (0)
#define PYFASTDL_BN_DISPATCH(dtype, act, FN, ...)                                           \
  do {                                                                                    \
    if ((dtype) == at::kDouble) PYFASTDL_BN_DISPATCH_T(double, act, FN, __VA_ARGS__);     \
    else PYFASTDL_BN_DISPATCH_T(float, act, FN, __VA_ARGS__);                             \
  } while (0)

void stats(const at::Tensor& x, const bn::Layout& L, double* mean, double* var) {
  if (x.scalar_type() == at::kDouble)
    stats_impl<double>(x, L, mean, var);
  else
    stats_impl<float>(x, L, mean, var);
}

void apply(const at::Tensor& x, const bn::Layout& L, const NormConsts& nc, int act, at::Tensor& y) {
  PYFASTDL_BN_DISPATCH(x.scalar_type(), act, apply_impl, x, L, nc, y);
}

void bwd_reduce(const at::Tensor& g, const at::Tensor& x, const bn::Layout& L, const NormConsts& nc,
                int act, double* sum_g, double* sum_gx) {
  PYFASTDL_BN_DISPATCH(x.scalar_type(), act, bwd_reduce_impl, g, x, L, nc, sum_g, sum_gx);
}

void bwd_apply(const at::Tensor& g, const at::Tensor& x, const bn::Layout& L, const NormConsts& nc,
               const void* a, const void* b, const void* d, int act, bool training,
               at::Tensor& gi) {
  PYFASTDL_BN_DISPATCH(x.scalar_type(), act, bwd_apply_impl, g, x, L, nc, a, b, d, training, gi);
}

void train_fwd_fused(const at::Tensor& x, const bn::Layout& L, PerChannelFn on_stats, const NormConsts& nc,
                     int act, at::Tensor& y) {
  PYFASTDL_BN_DISPATCH(x.scalar_type(), act, train_fwd_fused_impl, x, L, on_stats, nc, y);
}

void bwd_fused(const at::Tensor& g, const at::Tensor& x, const bn::Layout& L, const NormConsts& nc,
               PerChannelFn on_sums, const void* a, const void* b, const void* d,
               int act, at::Tensor& gi) {
  PYFASTDL_BN_DISPATCH(x.scalar_type(), act, bwd_fused_impl, g, x, L, nc, on_sums, a, b, d, gi);
}

const BatchNormKernels kTable{&stats, &apply, &bwd_reduce, &bwd_apply, &train_fwd_fused, &bwd_fused};

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(BatchNormKernels, batch_norm_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
