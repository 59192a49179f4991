// 2-D pooling CPU kernels (at::vec SIMD + ATen parallel_for), compiled once per capability: setup.py
// defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and the matching -m flags.
//
// NCHW: one task = a run of output rows (plane, oh). Within a row the outputs are vectorized along W:
//   stride 1 loads V consecutive inputs per tap; stride 2 loads 2V and keeps the even lanes
//   (at::vec::deinterleave2), so 2x2/2 and 3x3/2 (any dilation) run on whole vectors. Outputs whose
//   windows leave the row (padding, the ceil_mode tail) and other strides run the scalar loop; the
//   last vector of a row is shifted back to end at W_out (it rewrites a few outputs, same values).
// NHWC: one task = a run of output pixels; each window tap is a vector load along C (the channels
//   past the last whole vector: the last V channels again, or one partial vector when C < V).
// Window order is torch's (kh outer, kw inner, ascending), so ties pick the first maximum, a NaN
// wins (the last NaN of the window), sums are added in torch's order (the results are torch's
// bit for bit for float32 and float64) and nothing depends on the thread count.
// Max-pool indices are tracked as T in the vector loops (exact below 2^24 for float32: the launcher
// routes planes of H * W > 2^24 to the scalar loop) and widened to int64 on store.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/pool2d_kernel.h"

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using pool::Params;

constexpr int64_t kGrain = 16384;  // input elements read per parallel task, roughly

template <typename T>
inline bool greater_or_nan(T v, T m) {
  return v > m || std::isnan(v);
}

// [lo, hi) of k in [0, K) with 0 <= start + k * d < n
inline void tap_range(int64_t start, int64_t d, int64_t K, int64_t n, int64_t& lo, int64_t& hi) {
  lo = start >= 0 ? 0 : (-start + d - 1) / d;
  hi = start + (K - 1) * d < n ? K : (n - 1 - start) / d + 1;
  if (hi < lo) hi = lo;
}

// The windows along W that the vector loops cover: outputs ow in [ow_lo, last_start + V) whose
// loads stay in the row. Returns false when no vector fits.
template <typename T>
struct VecSpan {
  int64_t lo = 0, last = -1;  // first and last valid vector start
};

template <typename T>
VecSpan<T> vec_span(const Params& p, int64_t kW, int64_t dW) {
  constexpr int64_t V = Vectorized<T>::size();
  VecSpan<T> s;
  if (p.sW != 1 && p.sW != 2) return s;
  s.lo = (p.pW + p.sW - 1) / p.sW;  // first ow whose window starts in the row
  const int64_t reach = (kW - 1) * dW + (p.sW == 1 ? V : 2 * V);  // elements loaded past the window start
  const int64_t num = p.W - reach + p.pW;  // ow * sW <= num
  s.last = num < 0 ? -1 : std::min(num / p.sW, p.W_out - V);
  return s;
}

// Calls scalar(ow) and vector(ow0) so that every ow in [0, W_out) is written.
template <typename T, typename S, typename Vf>
inline void row_loop(int64_t W_out, const VecSpan<T>& s, S&& scalar, Vf&& vector) {
  constexpr int64_t V = Vectorized<T>::size();
  int64_t ow = 0;
  if (s.last < s.lo) {
    for (; ow < W_out; ++ow) scalar(ow);
    return;
  }
  for (; ow < s.lo; ++ow) scalar(ow);
  for (; ow <= s.last; ow += V) vector(ow);
  if (ow < W_out && s.last > ow - V) {  // a shifted last vector reaches further
    vector(s.last);
    ow = s.last + V;
  }
  for (; ow < W_out; ++ow) scalar(ow);
}

template <typename T>
inline Vectorized<T> load_taps(const T* ptr, int64_t sW) {
  constexpr int64_t V = Vectorized<T>::size();
  if (sW == 1) return Vectorized<T>::loadu(ptr);
  return at::vec::deinterleave2(Vectorized<T>::loadu(ptr), Vectorized<T>::loadu(ptr + V)).first;
}

template <typename T>
inline Vectorized<T> iota(T step) {
  constexpr int64_t V = Vectorized<T>::size();
  alignas(64) T buf[V];
  for (int64_t i = 0; i < V; ++i) buf[i] = static_cast<T>(i) * step;
  return Vectorized<T>::loadu(buf);
}

template <typename T>
inline void store_index(const Vectorized<T>& mi, int64_t* dst, int64_t count = Vectorized<T>::size()) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  // float32: the indices (exact below 2^24) converted to int32 and widened to int64 in registers,
  // not lane by lane through memory (a quarter of the channels_last forward's time with indices)
  if constexpr (std::is_same_v<T, float>) {
    if (count == Vectorized<T>::size()) {
#if defined(CPU_CAPABILITY_AVX512)
      const __m512i i32 = _mm512_cvttps_epi32(mi);
      _mm512_storeu_si512(dst, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(i32)));
      _mm512_storeu_si512(dst + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(i32, 1)));
#else
      const __m256i i32 = _mm256_cvttps_epi32(mi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(i32)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 4),
                          _mm256_cvtepi32_epi64(_mm256_extracti128_si256(i32, 1)));
#endif
      return;
    }
  }
#endif
  alignas(64) T buf[Vectorized<T>::size()];
  mi.store(buf);
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<int64_t>(buf[i]);
}

// ---- channels_last helpers -------------------------------------------------------------------------

// (n, oh, ow) of output pixel q = (n Ho + oh) Wo + ow, stepped without a division per pixel.
struct PixelCursor {
  int64_t n, oh, ow;
  const int64_t Ho, Wo;
  PixelCursor(int64_t q, int64_t Ho_, int64_t Wo_) : n(q / (Ho_ * Wo_)), oh((q / Wo_) % Ho_), ow(q % Wo_), Ho(Ho_), Wo(Wo_) {}
  void next() {
    if (++ow == Wo) {
      ow = 0;
      if (++oh == Ho) {
        oh = 0;
        ++n;
      }
    }
  }
};

// Calls f(c, count) over the C channels of a pixel in vectors: whole vectors, then, when C is not a
// multiple of V, the last V channels again (an overlapping whole vector: a forward writes the same
// values twice) or, when C < V, one partial vector of count = C lanes. Pixel by pixel, torch's
// per-channel results are unchanged (each lane computes one channel).
template <typename T, typename F>
inline void channel_blocks(int64_t C, F&& f) {
  constexpr int64_t V = Vectorized<T>::size();
  int64_t c = 0;
  for (; c + V <= C; c += V) f(c, V);
  if (c < C) {
    if (C >= V) f(C - V, V);
    else f(int64_t(0), C);
  }
}

template <typename T>
inline Vectorized<T> load_channels(const T* ptr, int64_t count) {
  return count == Vectorized<T>::size() ? Vectorized<T>::loadu(ptr) : Vectorized<T>::loadu(ptr, count);
}

template <typename T>
inline void store_channels(const Vectorized<T>& v, T* ptr, int64_t count) {
  if (count == Vectorized<T>::size()) v.store(ptr);
  else v.store(ptr, count);
}

// ---- max pool, forward -------------------------------------------------------------------------

template <typename T, bool IDX>
void max_fwd_nchw(const at::Tensor& x, const Params& p, at::Tensor& y, at::Tensor* idx, bool vec_ok) {
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  int64_t* ip = IDX ? idx->mutable_data_ptr<int64_t>() : nullptr;
  const int64_t H = p.H, W = p.W, Ho = p.H_out, Wo = p.W_out;
  VecSpan<T> span = vec_ok ? vec_span<T>(p, p.kW, p.dW) : VecSpan<T>();
  const Vectorized<T> lane = iota<T>(static_cast<T>(p.sW));
  const int64_t rows = p.N * p.C * Ho;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, Wo * p.kH * p.kW));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t plane = r / Ho, oh = r % Ho;
      const T* xpl = xp + plane * H * W;
      T* yrow = yp + r * Wo;
      int64_t* irow = IDX ? ip + r * Wo : nullptr;
      const int64_t ih0 = oh * p.sH - p.pH;
      int64_t kh_lo, kh_hi;
      tap_range(ih0, p.dH, p.kH, H, kh_lo, kh_hi);
      auto scalar = [&](int64_t ow) {
        const int64_t iw0 = ow * p.sW - p.pW;
        int64_t kw_lo, kw_hi;
        tap_range(iw0, p.dW, p.kW, W, kw_lo, kw_hi);
        if (!IDX) {  // the value alone: a max instruction and a NaN flag, no branch
          T m = -std::numeric_limits<T>::infinity();
          bool nan = false;
          for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
            const T* row = xpl + (ih0 + kh * p.dH) * W + iw0;
            for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
              const T v = row[kw * p.dW];
              m = v > m ? v : m;
              nan |= v != v;
            }
          }
          yrow[ow] = nan ? std::numeric_limits<T>::quiet_NaN() : m;
          return;
        }
        // Branchless (random data mispredicts every compare): m = the max of the non-NaN values
        // (a max instruction), the index updated arithmetically; torch's result: the first max,
        // or the last NaN once one is seen.
        T m = -std::numeric_limits<T>::infinity();
        int64_t mi = -1, nan = 0;
        for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
          const int64_t ih = ih0 + kh * p.dH;
          for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
            const int64_t j = ih * W + iw0 + kw * p.dW;
            const T v = xpl[j];
            const int64_t isnan_v = v != v;
            const int64_t upd = isnan_v | ((1 - nan) & ((v > m) | (mi < 0)));
            mi += (j - mi) * upd;
            nan |= isnan_v;
            m = v > m ? v : m;
          }
        }
        yrow[ow] = nan ? std::numeric_limits<T>::quiet_NaN() : m;
        irow[ow] = mi < 0 ? 0 : mi;
      };
      auto vector = [&](int64_t ow0) {
        const int64_t iw0 = ow0 * p.sW - p.pW;
        Vectorized<T> m, mi;
        bool first = true;
        for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
          const int64_t ih = ih0 + kh * p.dH;
          const T* row = xpl + ih * W;
          for (int64_t kw = 0; kw < p.kW; ++kw) {
            const int64_t iw = iw0 + kw * p.dW;
            const Vectorized<T> v = load_taps(row + iw, p.sW);
            if (first) {
              m = v;
              if (IDX) mi = Vectorized<T>(static_cast<T>(ih * W + iw)) + lane;
              first = false;
            } else if (IDX) {
              const Vectorized<T> take = (v > m) | v.isnan();
              m = Vectorized<T>::blendv(m, v, take);
              mi = Vectorized<T>::blendv(mi, Vectorized<T>(static_cast<T>(ih * W + iw)) + lane, take);
            } else {
              m = at::vec::maximum(m, v);  // NaN in either operand propagates
            }
          }
        }
        if (first) {  // no row of the window in the input (cannot happen with pad <= k / 2)
          for (int64_t i = 0; i < Vectorized<T>::size(); ++i) scalar(ow0 + i);
          return;
        }
        m.store(yrow + ow0);
        if (IDX) store_index(mi, irow + ow0);
      };
      row_loop<T>(Wo, span, scalar, vector);
    }
  });
}

template <typename T, bool IDX>
void max_fwd_nhwc(const at::Tensor& x, const Params& p, at::Tensor& y, at::Tensor* idx) {
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  int64_t* ip = IDX ? idx->mutable_data_ptr<int64_t>() : nullptr;
  const int64_t H = p.H, W = p.W, C = p.C, Ho = p.H_out, Wo = p.W_out;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C * p.kH * p.kW));
  at::parallel_for(0, p.N * Ho * Wo, grain, [&](int64_t q0, int64_t q1) {
    PixelCursor px(q0, Ho, Wo);
    for (int64_t q = q0; q < q1; ++q, px.next()) {
      const T* xn = xp + px.n * H * W * C;
      T* yq = yp + q * C;
      int64_t* iq = IDX ? ip + q * C : nullptr;
      const int64_t ih0 = px.oh * p.sH - p.pH, iw0 = px.ow * p.sW - p.pW;
      int64_t kh_lo, kh_hi, kw_lo, kw_hi;
      tap_range(ih0, p.dH, p.kH, H, kh_lo, kh_hi);
      tap_range(iw0, p.dW, p.kW, W, kw_lo, kw_hi);
      if (kh_lo >= kh_hi || kw_lo >= kw_hi) {  // cannot happen with pad <= k / 2
        for (int64_t c = 0; c < C; ++c) {
          yq[c] = -std::numeric_limits<T>::infinity();
          if (IDX) iq[c] = 0;
        }
        continue;
      }
      channel_blocks<T>(C, [&](int64_t c, int64_t count) {
        Vectorized<T> m, mi;
        bool first = true;
        for (int64_t kh = kh_lo; kh < kh_hi; ++kh) {
          const int64_t ih = ih0 + kh * p.dH;
          for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
            const int64_t j = ih * W + iw0 + kw * p.dW;
            const Vectorized<T> v = load_channels(xn + j * C + c, count);
            if (first) {
              m = v;
              if (IDX) mi = Vectorized<T>(static_cast<T>(j));
              first = false;
            } else if (IDX) {
              const Vectorized<T> take = (v > m) | v.isnan();
              m = Vectorized<T>::blendv(m, v, take);
              mi = Vectorized<T>::blendv(mi, Vectorized<T>(static_cast<T>(j)), take);
            } else {
              m = at::vec::maximum(m, v);
            }
          }
        }
        store_channels(m, yq + c, count);
        if (IDX) store_index(mi, iq + c, count);
      });
    }
  });
}

// Planes of more than 2^24 (float32) elements: indices exceed what T holds exactly; the scalar
// NHWC loop tracks them as int64.
template <typename T>
void max_fwd_nhwc_scalar(const at::Tensor& x, const Params& p, at::Tensor& y, at::Tensor* idx) {
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  int64_t* ip = idx ? idx->mutable_data_ptr<int64_t>() : nullptr;
  const int64_t H = p.H, W = p.W, C = p.C, Ho = p.H_out, Wo = p.W_out;
  at::parallel_for(0, p.N * Ho * Wo, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n = q / (Ho * Wo), oh = (q / Wo) % Ho, ow = q % Wo;
      const int64_t ih0 = oh * p.sH - p.pH, iw0 = ow * p.sW - p.pW;
      int64_t kh_lo, kh_hi, kw_lo, kw_hi;
      tap_range(ih0, p.dH, p.kH, H, kh_lo, kh_hi);
      tap_range(iw0, p.dW, p.kW, W, kw_lo, kw_hi);
      for (int64_t c = 0; c < C; ++c) {
        T m = -std::numeric_limits<T>::infinity();
        int64_t mi = -1;
        for (int64_t kh = kh_lo; kh < kh_hi; ++kh)
          for (int64_t kw = kw_lo; kw < kw_hi; ++kw) {
            const int64_t j = (ih0 + kh * p.dH) * W + iw0 + kw * p.dW;
            const T v = xp[(n * H * W + j) * C + c];
            if (mi < 0 || greater_or_nan(v, m)) {
              m = v;
              mi = j;
            }
          }
        yp[q * C + c] = m;
        if (ip) ip[q * C + c] = mi < 0 ? 0 : mi;
      }
    }
  });
}

template <typename T>
void max_fwd_t(const at::Tensor& x, const Params& p, at::Tensor& y, at::Tensor* idx) {
  // indices held in T by the vector loops: exact up to 2^mantissa
  const bool idx_exact = p.H * p.W <= (int64_t(1) << std::numeric_limits<T>::digits);
  if (p.channels_last) {
    if (idx && !idx_exact) return max_fwd_nhwc_scalar<T>(x, p, y, idx);
    if (idx) return max_fwd_nhwc<T, true>(x, p, y, idx);
    return max_fwd_nhwc<T, false>(x, p, y, idx);
  }
  if (idx) return max_fwd_nchw<T, true>(x, p, y, idx, idx_exact);
  return max_fwd_nchw<T, false>(x, p, y, idx, true);
}

void max_fwd(const at::Tensor& x, const Params& p, at::Tensor& y, at::Tensor* idx) {
  if (x.scalar_type() == at::kDouble) return max_fwd_t<double>(x, p, y, idx);
  return max_fwd_t<float>(x, p, y, idx);
}

// ---- max pool, backward ------------------------------------------------------------------------

template <typename T>
void max_bwd_t(const at::Tensor& g, const at::Tensor& idx, const Params& p, at::Tensor& gi) {
  const T* gp = g.const_data_ptr<T>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  T* op = gi.mutable_data_ptr<T>();
  const int64_t HW = p.H * p.W, HWo = p.H_out * p.W_out, C = p.C;
  if (!p.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, HW));
    at::parallel_for(0, p.N * C, grain, [&](int64_t a, int64_t b) {
      for (int64_t plane = a; plane < b; ++plane) {
        T* o = op + plane * HW;
        const T* gpl = gp + plane * HWo;
        const int64_t* ipl = ip + plane * HWo;
        std::fill_n(o, HW, T(0));
        for (int64_t j = 0; j < HWo; ++j) o[ipl[j]] += gpl[j];
      }
    });
    return;
  }
  // NHWC: tasks of (image, channel block); each zeroes and fills its own slice
  const int64_t cb = C <= 64 ? C : 64;
  const int64_t nblocks = (C + cb - 1) / cb;
  at::parallel_for(0, p.N * nblocks, 1, [&](int64_t a, int64_t b) {
    for (int64_t t = a; t < b; ++t) {
      const int64_t n = t / nblocks, c0 = (t % nblocks) * cb, c1 = std::min(C, c0 + cb);
      T* o = op + n * HW * C;
      const T* gn = gp + n * HWo * C;
      const int64_t* in = ip + n * HWo * C;
      if (c1 - c0 == C) {
        std::fill_n(o, HW * C, T(0));
      } else {
        for (int64_t j = 0; j < HW; ++j) std::fill(o + j * C + c0, o + j * C + c1, T(0));
      }
      for (int64_t q = 0; q < HWo; ++q)
        for (int64_t c = c0; c < c1; ++c) o[in[q * C + c] * C + c] += gn[q * C + c];
    }
  });
}

void max_bwd(const at::Tensor& g, const at::Tensor& idx, const Params& p, at::Tensor& gi) {
  if (g.scalar_type() == at::kDouble) return max_bwd_t<double>(g, idx, p, gi);
  return max_bwd_t<float>(g, idx, p, gi);
}

// ---- average pool ------------------------------------------------------------------------------

// torch's divisor and clipped window of output (oh, ow) along one axis: [i0, i1) in the input and
// the window's extent clipped to the padded input (count_include_pad's count).
struct Axis {
  int64_t i0, i1, padded;
};
inline Axis axis(int64_t o, int64_t s, int64_t pad, int64_t k, int64_t n) {
  int64_t a = o * s - pad;
  int64_t b = std::min(a + k, n + pad);
  Axis r{std::max<int64_t>(a, 0), std::min<int64_t>(b, n), b - a};
  return r;
}
inline int64_t divisor(const Axis& h, const Axis& w, bool count_include_pad, int64_t override_) {
  if (override_ != 0) return override_;
  return count_include_pad ? h.padded * w.padded : (h.i1 - h.i0) * (w.i1 - w.i0);
}

template <typename T>
void avg_fwd_nchw(const at::Tensor& x, const Params& p, bool cip, int64_t ovr, at::Tensor& y) {
  using acc_t = T;  // at::opmath_type of float32 / float64: the type itself, as torch sums
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const int64_t H = p.H, W = p.W, Ho = p.H_out, Wo = p.W_out;
  const VecSpan<T> span = vec_span<T>(p, p.kW, 1);
  const int64_t rows = p.N * p.C * Ho;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, Wo * p.kH * p.kW));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t plane = r / Ho, oh = r % Ho;
      const T* xpl = xp + plane * H * W;
      T* yrow = yp + r * Wo;
      const Axis ah = axis(oh, p.sH, p.pH, p.kH, H);
      auto scalar = [&](int64_t ow) {
        const Axis aw = axis(ow, p.sW, p.pW, p.kW, W);
        if (ah.i0 >= ah.i1 || aw.i0 >= aw.i1) {
          yrow[ow] = T(0);
          return;
        }
        acc_t sum = 0;
        for (int64_t ih = ah.i0; ih < ah.i1; ++ih)
          for (int64_t iw = aw.i0; iw < aw.i1; ++iw) sum += static_cast<acc_t>(xpl[ih * W + iw]);
        yrow[ow] = static_cast<T>(sum / divisor(ah, aw, cip, ovr));
      };
      // vector windows lie inside the row: every column of the window counts
      const Axis aw_full{0, p.kW, p.kW};
      const Vectorized<T> div(static_cast<T>(divisor(ah, aw_full, cip, ovr)));
      auto vector = [&](int64_t ow0) {
        const int64_t iw0 = ow0 * p.sW - p.pW;
        Vectorized<T> sum(T(0));
        for (int64_t ih = ah.i0; ih < ah.i1; ++ih) {
          const T* row = xpl + ih * W + iw0;
          for (int64_t kw = 0; kw < p.kW; ++kw) sum = sum + load_taps(row + kw, p.sW);
        }
        (sum / div).store(yrow + ow0);
      };
      if (ah.i0 >= ah.i1) {
        for (int64_t ow = 0; ow < Wo; ++ow) scalar(ow);
      } else {
        row_loop<T>(Wo, span, scalar, vector);
      }
    }
  });
}

template <typename T>
void avg_fwd_nhwc(const at::Tensor& x, const Params& p, bool cip, int64_t ovr, at::Tensor& y) {
  const T* xp = x.const_data_ptr<T>();
  T* yp = y.mutable_data_ptr<T>();
  const int64_t H = p.H, W = p.W, C = p.C, Ho = p.H_out, Wo = p.W_out;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, C * p.kH * p.kW));
  at::parallel_for(0, p.N * Ho * Wo, grain, [&](int64_t q0, int64_t q1) {
    PixelCursor px(q0, Ho, Wo);
    for (int64_t q = q0; q < q1; ++q, px.next()) {
      const T* xn = xp + px.n * H * W * C;
      T* yq = yp + q * C;
      const Axis ah = axis(px.oh, p.sH, p.pH, p.kH, H), aw = axis(px.ow, p.sW, p.pW, p.kW, W);
      if (ah.i0 >= ah.i1 || aw.i0 >= aw.i1) {
        std::fill_n(yq, C, T(0));
        continue;
      }
      const Vectorized<T> div(static_cast<T>(divisor(ah, aw, cip, ovr)));
      channel_blocks<T>(C, [&](int64_t c, int64_t count) {
        Vectorized<T> sum(T(0));
        for (int64_t ih = ah.i0; ih < ah.i1; ++ih)
          for (int64_t iw = aw.i0; iw < aw.i1; ++iw) sum = sum + load_channels(xn + (ih * W + iw) * C + c, count);
        store_channels(sum / div, yq + c, count);
      });
    }
  });
}

void avg_fwd(const at::Tensor& x, const Params& p, bool cip, int64_t ovr, at::Tensor& y) {
  if (x.scalar_type() == at::kDouble) {
    if (p.channels_last) return avg_fwd_nhwc<double>(x, p, cip, ovr, y);
    return avg_fwd_nchw<double>(x, p, cip, ovr, y);
  }
  if (p.channels_last) return avg_fwd_nhwc<float>(x, p, cip, ovr, y);
  return avg_fwd_nchw<float>(x, p, cip, ovr, y);
}

template <typename T>
void avg_bwd_t(const at::Tensor& g, const Params& p, bool cip, int64_t ovr, at::Tensor& gi) {
  const T* gp = g.const_data_ptr<T>();
  T* op = gi.mutable_data_ptr<T>();
  const int64_t H = p.H, W = p.W, C = p.C, Ho = p.H_out, Wo = p.W_out, HW = H * W, HWo = Ho * Wo;
  if (!p.channels_last) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, HW));
    at::parallel_for(0, p.N * C, grain, [&](int64_t a, int64_t b) {
      for (int64_t plane = a; plane < b; ++plane) {
        T* o = op + plane * HW;
        const T* gpl = gp + plane * HWo;
        std::fill_n(o, HW, T(0));
        for (int64_t oh = 0; oh < Ho; ++oh) {
          const Axis ah = axis(oh, p.sH, p.pH, p.kH, H);
          for (int64_t ow = 0; ow < Wo; ++ow) {
            const Axis aw = axis(ow, p.sW, p.pW, p.kW, W);
            if (ah.i0 >= ah.i1 || aw.i0 >= aw.i1) continue;
            const T delta = gpl[oh * Wo + ow] / static_cast<T>(divisor(ah, aw, cip, ovr));
            for (int64_t ih = ah.i0; ih < ah.i1; ++ih)
              for (int64_t iw = aw.i0; iw < aw.i1; ++iw) o[ih * W + iw] += delta;
          }
        }
      }
    });
    return;
  }
  if (C < Vectorized<T>::size()) {  // fewer channels than a vector: torch's scatter, lane by lane, per image
    at::parallel_for(0, p.N, 1, [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        T* o = op + n * HW * C;
        const T* gn = gp + n * HWo * C;
        std::fill_n(o, HW * C, T(0));
        for (int64_t oh = 0; oh < Ho; ++oh) {
          const Axis ah = axis(oh, p.sH, p.pH, p.kH, H);
          for (int64_t ow = 0; ow < Wo; ++ow) {
            const Axis aw = axis(ow, p.sW, p.pW, p.kW, W);
            if (ah.i0 >= ah.i1 || aw.i0 >= aw.i1) continue;
            const T dv = static_cast<T>(divisor(ah, aw, cip, ovr));
            for (int64_t c = 0; c < C; ++c) {
              const T delta = gn[(oh * Wo + ow) * C + c] / dv;
              for (int64_t ih = ah.i0; ih < ah.i1; ++ih)
                for (int64_t iw = aw.i0; iw < aw.i1; ++iw) o[(ih * W + iw) * C + c] += delta;
            }
          }
        }
      }
    });
    return;
  }
  // NHWC: a gather. Each input pixel sums, over the outputs whose windows hold it in output order
  // (oh outer, ow inner), grad_out / divisor: the additions of torch's scatter in the same order,
  // so the same bits, with no zeroing pass and one store per element. One task = a run of input
  // rows (n, ih); vectors along C. The quotients grad_out / divisor of the output rows a run reads
  // are computed once per run, into a buffer of the task.
  std::vector<Axis> ah(Ho), aw(Wo);
  for (int64_t o = 0; o < Ho; ++o) ah[o] = axis(o, p.sH, p.pH, p.kH, H);
  for (int64_t o = 0; o < Wo; ++o) aw[o] = axis(o, p.sW, p.pW, p.kW, W);
  // the outputs along one axis whose (clipped) windows hold input i: [lo, hi)
  auto covering = [](const std::vector<Axis>& ax, int64_t i, int64_t s, int64_t pad, int64_t k, int64_t& lo,
                     int64_t& hi) {
    const int64_t n_out = static_cast<int64_t>(ax.size());
    const int64_t first = i + pad - k + 1;  // o * s >= first
    lo = first <= 0 ? 0 : (first + s - 1) / s;
    hi = std::min(n_out, (i + pad) / s + 1);
    while (lo < hi && !(ax[lo].i0 <= i && i < ax[lo].i1)) ++lo;
    while (hi > lo && !(ax[hi - 1].i0 <= i && i < ax[hi - 1].i1)) --hi;
  };
  std::vector<int64_t> ow_lo(W), ow_hi(W);
  for (int64_t iw = 0; iw < W; ++iw) covering(aw, iw, p.sW, p.pW, p.kW, ow_lo[iw], ow_hi[iw]);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, W * C));
  at::parallel_for(0, p.N * H, grain, [&](int64_t r0, int64_t r1) {
    std::vector<T> delta;  // grad_out / divisor of the output rows this run of input rows reads
    for (int64_t r = r0; r < r1;) {
      const int64_t n = r / H, ih_a = r % H, ih_b = std::min(H, ih_a + (r1 - r));  // rows [ih_a, ih_b) of image n
      int64_t oh_begin, oh_end, lo, hi;
      covering(ah, ih_a, p.sH, p.pH, p.kH, oh_begin, hi);
      covering(ah, ih_b - 1, p.sH, p.pH, p.kH, lo, oh_end);
      oh_end = std::max(oh_end, oh_begin);
      delta.resize(static_cast<size_t>((oh_end - oh_begin) * Wo * C));
      const T* gn = gp + n * HWo * C;
      for (int64_t oh = oh_begin; oh < oh_end; ++oh)
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const Vectorized<T> div(static_cast<T>(divisor(ah[oh], aw[ow], cip, ovr)));
          const int64_t off = (oh * Wo + ow) * C;
          T* d = delta.data() + (off - oh_begin * Wo * C);
          channel_blocks<T>(C, [&](int64_t c, int64_t count) {
            store_channels(load_channels(gn + off + c, count) / div, d + c, count);
          });
        }
      for (int64_t ih = ih_a; ih < ih_b; ++ih) {
        int64_t oh_lo, oh_hi;
        covering(ah, ih, p.sH, p.pH, p.kH, oh_lo, oh_hi);
        T* orow = op + (n * H + ih) * W * C;
        for (int64_t iw = 0; iw < W; ++iw) {
          T* dst = orow + iw * C;
          const int64_t w_lo = ow_lo[iw], w_hi = ow_hi[iw];
          channel_blocks<T>(C, [&](int64_t c, int64_t count) {
            Vectorized<T> acc(T(0));
            for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
              const T* drow = delta.data() + (oh - oh_begin) * Wo * C + c;
              for (int64_t ow = w_lo; ow < w_hi; ++ow) acc = acc + load_channels(drow + ow * C, count);
            }
            store_channels(acc, dst + c, count);
          });
        }
      }
      r += ih_b - ih_a;
    }
  });
}

void avg_bwd(const at::Tensor& g, const Params& p, bool cip, int64_t ovr, at::Tensor& gi) {
  if (g.scalar_type() == at::kDouble) return avg_bwd_t<double>(g, p, cip, ovr, gi);
  return avg_bwd_t<float>(g, p, cip, ovr, gi);
}

const Pool2dKernels kTable = {&max_fwd, &max_bwd, &avg_fwd, &avg_bwd};

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(Pool2dKernels, pool2d_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
