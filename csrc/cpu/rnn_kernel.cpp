// LSTM/GRU CPU pointwise kernels (at::vec SIMD), compiled once per capability: setup.py defines
// CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and the matching -m flags. The launchers (rnn.cpp) run
// them over row blocks with at::parallel_for, between the GEMMs.
//
// Each kernel walks one row at a time, the H features of a row in SIMD chunks; the tail chunk is a
// partial load/store of the same vector math, so every feature gets the same rounding.
// sigmoid(x) = 1 / (1 + exp(-x)): 0 at -inf, 1 at +inf, NaN in -> NaN out.
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "cpu/rnn_kernel.h"

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  return one / (one + (Vectorized<T>(T(0)) - x).exp());
}

template <typename T>
inline Vectorized<T> ld(const T* p, int64_t cnt) {
  return cnt == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, cnt);
}

template <typename T>
inline void st(const Vectorized<T>& v, T* p, int64_t cnt) {
  if (cnt == Vectorized<T>::size())
    v.store(p);
  else
    v.store(p, cnt);
}

template <typename T>
void lstm_fwd(int64_t n, int64_t H, T* gates, int64_t ldg, const T* bias, const T* c_prev, int64_t ldcp, T* c,
              int64_t ldc, T* h, int64_t ldh) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  for (int64_t r = 0; r < n; ++r) {
    T* g = gates + r * ldg;
    const T* cp = c_prev + r * ldcp;
    T* cr = c + r * ldc;
    T* hr = h + r * ldh;
    for (int64_t j = 0; j < H; j += W) {
      const int64_t cnt = std::min<int64_t>(W, H - j);
      V ai = ld(g + j, cnt), af = ld(g + H + j, cnt), ag = ld(g + 2 * H + j, cnt), ao = ld(g + 3 * H + j, cnt);
      if (bias) {
        ai = ai + ld(bias + j, cnt);
        af = af + ld(bias + H + j, cnt);
        ag = ag + ld(bias + 2 * H + j, cnt);
        ao = ao + ld(bias + 3 * H + j, cnt);
      }
      const V i = sigmoid(ai), f = sigmoid(af), gg = ag.tanh(), o = sigmoid(ao);
      const V cn = f * ld(cp + j, cnt) + i * gg;
      st(i, g + j, cnt);
      st(f, g + H + j, cnt);
      st(gg, g + 2 * H + j, cnt);
      st(o, g + 3 * H + j, cnt);
      st(cn, cr + j, cnt);
      st(o * cn.tanh(), hr + j, cnt);
    }
  }
}

template <typename T>
void lstm_bwd(int64_t n, int64_t H, const T* gates, int64_t ldg, const T* c, int64_t ldc, const T* c_prev,
              int64_t ldcp, const T* go, int64_t ldgo, const T* dh_in, int64_t lddh, const T* dc_in, T* dc_out,
              int64_t lddc, T* dgates, int64_t lddg) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V zero(T(0)), one(T(1));
  for (int64_t r = 0; r < n; ++r) {
    const T* g = gates + r * ldg;
    const T* cr = c + r * ldc;
    const T* cp = c_prev + r * ldcp;
    T* dg = dgates + r * lddg;
    for (int64_t j = 0; j < H; j += W) {
      const int64_t cnt = std::min<int64_t>(W, H - j);
      V dh = go ? ld(go + r * ldgo + j, cnt) : zero;
      if (dh_in) dh = dh + ld(dh_in + r * lddh + j, cnt);
      const V i = ld(g + j, cnt), f = ld(g + H + j, cnt), gg = ld(g + 2 * H + j, cnt), o = ld(g + 3 * H + j, cnt);
      const V tc = ld(cr + j, cnt).tanh();
      V dc = dh * o * (one - tc * tc);
      if (dc_in) dc = dc + ld(dc_in + r * lddc + j, cnt);
      st(dc * gg * i * (one - i), dg + j, cnt);
      st(dc * ld(cp + j, cnt) * f * (one - f), dg + H + j, cnt);
      st(dc * i * (one - gg * gg), dg + 2 * H + j, cnt);
      st(dh * tc * o * (one - o), dg + 3 * H + j, cnt);
      if (dc_out) st(dc * f, dc_out + r * lddc + j, cnt);
    }
  }
}

template <typename T>
void gru_fwd(int64_t n, int64_t H, const T* gx, int64_t ldgx, const T* gh, int64_t ldgh, const T* b_hh,
             const T* h_prev, int64_t ldhp, T* ws, int64_t ldws, T* h, int64_t ldh) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V one(T(1));
  for (int64_t r = 0; r < n; ++r) {
    const T* x = gx + r * ldgx;
    const T* hh = gh + r * ldgh;
    const T* hp = h_prev + r * ldhp;
    T* w = ws + r * ldws;
    T* hr = h + r * ldh;
    for (int64_t j = 0; j < H; j += W) {
      const int64_t cnt = std::min<int64_t>(W, H - j);
      V ar = ld(x + j, cnt) + ld(hh + j, cnt);
      V az = ld(x + H + j, cnt) + ld(hh + H + j, cnt);
      V hn = ld(hh + 2 * H + j, cnt);
      if (b_hh) {
        ar = ar + ld(b_hh + j, cnt);
        az = az + ld(b_hh + H + j, cnt);
        hn = hn + ld(b_hh + 2 * H + j, cnt);
      }
      const V rg = sigmoid(ar), z = sigmoid(az);
      const V nn = (ld(x + 2 * H + j, cnt) + rg * hn).tanh();
      const V hp_v = ld(hp + j, cnt);
      st(rg, w + j, cnt);
      st(z, w + H + j, cnt);
      st(nn, w + 2 * H + j, cnt);
      st(hn, w + 3 * H + j, cnt);
      st((one - z) * nn + z * hp_v, hr + j, cnt);
    }
  }
}

template <typename T>
void gru_bwd(int64_t n, int64_t H, const T* ws, int64_t ldws, const T* h_prev, int64_t ldhp, const T* go,
             int64_t ldgo, const T* dh_in, int64_t lddh, T* dh_out, int64_t lddo, T* dgx, int64_t lddgx, T* dgh,
             int64_t lddgh) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const V zero(T(0)), one(T(1));
  for (int64_t r = 0; r < n; ++r) {
    const T* w = ws + r * ldws;
    const T* hp = h_prev + r * ldhp;
    T* dx = dgx + r * lddgx;
    T* dhh = dgh + r * lddgh;
    for (int64_t j = 0; j < H; j += W) {
      const int64_t cnt = std::min<int64_t>(W, H - j);
      V dh = go ? ld(go + r * ldgo + j, cnt) : zero;
      if (dh_in) dh = dh + ld(dh_in + r * lddh + j, cnt);
      const V rg = ld(w + j, cnt), z = ld(w + H + j, cnt), nn = ld(w + 2 * H + j, cnt), hn = ld(w + 3 * H + j, cnt);
      const V dn = dh * (one - z) * (one - nn * nn);  // gradient of n's pre-activation
      const V dz = dh * (ld(hp + j, cnt) - nn) * z * (one - z);
      const V dr = dn * hn * rg * (one - rg);
      st(dr, dx + j, cnt);
      st(dz, dx + H + j, cnt);
      st(dn, dx + 2 * H + j, cnt);
      st(dr, dhh + j, cnt);
      st(dz, dhh + H + j, cnt);
      st(dn * rg, dhh + 2 * H + j, cnt);
      if (dh_out) st(dh * z, dh_out + r * lddo + j, cnt);
    }
  }
}

// ---- the packed recurrent GEMM ------------------------------------------------------------------------
// Panels of NR = 2 vectors of columns; the micro-kernel keeps an MR x NR block of C in 2 * MR vector
// registers (AVX2 float: 6 x 16 in 12 of the 16 ymm registers) and per k loads two vectors of the panel
// and broadcasts MR elements of A: 2 * MR FMAs per 2 loads + MR broadcasts.
template <typename T>
constexpr int64_t kNr = 2 * Vectorized<T>::size();
constexpr int64_t kMr = 6;

template <typename T>
void pack_b(int64_t K, int64_t N, const T* b, int64_t ldk, int64_t ldn, T* out) {
  constexpr int64_t NR = kNr<T>;
  for (int64_t p = 0; p * NR < N; ++p) {
    T* o = out + p * NR * K;
    const int64_t n0 = p * NR, cnt = std::min<int64_t>(NR, N - n0);
    for (int64_t k = 0; k < K; ++k) {
      T* ok = o + k * NR;
      for (int64_t j = 0; j < cnt; ++j) ok[j] = b[k * ldk + (n0 + j) * ldn];
      for (int64_t j = cnt; j < NR; ++j) ok[j] = T(0);
    }
  }
}

// The accumulators are named variables, not an array: GCC keeps an array of Vectorized in memory and
// stores it back at every k.
template <typename T, int MR>
inline void micro(int64_t K, const T* a, int64_t lda, const T* bp, T* c, int64_t ldc, int64_t cnt, bool acc) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  V x00(T(0)), x01(T(0)), x10(T(0)), x11(T(0)), x20(T(0)), x21(T(0)), x30(T(0)), x31(T(0)), x40(T(0)),
      x41(T(0)), x50(T(0)), x51(T(0));
  const T *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = V::loadu(bp + k * 2 * W), b1 = V::loadu(bp + k * 2 * W + W);
#define PYFASTDL_RNN_ROW(i)                 \
  if constexpr (MR > i) {                   \
    const V ai(a##i[k]);                    \
    x##i##0 = at::vec::fmadd(ai, b0, x##i##0); \
    x##i##1 = at::vec::fmadd(ai, b1, x##i##1); \
  }
    PYFASTDL_RNN_ROW(0)
    PYFASTDL_RNN_ROW(1)
    PYFASTDL_RNN_ROW(2)
    PYFASTDL_RNN_ROW(3)
    PYFASTDL_RNN_ROW(4)
    PYFASTDL_RNN_ROW(5)
#undef PYFASTDL_RNN_ROW
  }
  const int64_t n0 = std::min<int64_t>(W, cnt), n1 = cnt - n0;
  const auto put = [&](V v0, V v1, T* cr) {
    if (acc) {
      v0 = v0 + ld(cr, n0);
      if (n1 > 0) v1 = v1 + ld(cr + W, n1);
    }
    st(v0, cr, n0);
    if (n1 > 0) st(v1, cr + W, n1);
  };
  put(x00, x01, c);
  if constexpr (MR > 1) put(x10, x11, c + ldc);
  if constexpr (MR > 2) put(x20, x21, c + 2 * ldc);
  if constexpr (MR > 3) put(x30, x31, c + 3 * ldc);
  if constexpr (MR > 4) put(x40, x41, c + 4 * ldc);
  if constexpr (MR > 5) put(x50, x51, c + 5 * ldc);
}

template <typename T>
void gemm_packed(int64_t m, int64_t K, int64_t N, int64_t p0, int64_t p1, const T* a, int64_t lda, const T* bp,
                 T* c, int64_t ldc, bool acc) {
  constexpr int64_t NR = kNr<T>;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * NR, cnt = std::min<int64_t>(NR, N - n0);
    const T* b = bp + p * NR * K;
    int64_t r = 0;
    for (; r + kMr <= m; r += kMr) micro<T, kMr>(K, a + r * lda, lda, b, c + r * ldc + n0, ldc, cnt, acc);
    const T* ar = a + r * lda;
    T* cr = c + r * ldc + n0;
    switch (m - r) {
      case 5: micro<T, 5>(K, ar, lda, b, cr, ldc, cnt, acc); break;
      case 4: micro<T, 4>(K, ar, lda, b, cr, ldc, cnt, acc); break;
      case 3: micro<T, 3>(K, ar, lda, b, cr, ldc, cnt, acc); break;
      case 2: micro<T, 2>(K, ar, lda, b, cr, ldc, cnt, acc); break;
      case 1: micro<T, 1>(K, ar, lda, b, cr, ldc, cnt, acc); break;
      default: break;
    }
  }
}

template <typename T>
constexpr RnnKernelsT<T> table() {
  return {&lstm_fwd<T>, &lstm_bwd<T>, &gru_fwd<T>, &gru_bwd<T>, kNr<T>, &pack_b<T>, &gemm_packed<T>};
}

const RnnKernels kTable{table<float>(), table<double>()};

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(RnnKernels, rnn_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
