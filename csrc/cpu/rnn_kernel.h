// LSTM/GRU CPU pointwise kernels, one table per SIMD capability (rnn_kernel.cpp is compiled once per
// capability; rnn.cpp picks the table at run time and does the GEMMs and the threading). Kernels
// trust their arguments: the launchers in rnn.cpp have validated everything (common/rnn.h).
//
// Each kernel handles rows [0, n) of one step; every matrix argument is row-major with its own row
// stride ("ld", in elements), H the hidden size. Gate order is torch's: LSTM (i, f, g, o), GRU
// (r, z, n). Math in T (float32 for float32, float64 for float64).
#pragma once

#include <cstdint>

#include "cpu/capability.h"

namespace pyfastdl {
namespace cpu {

template <typename T>
struct RnnKernelsT {
  // LSTM forward. gates (n, 4H): in, the pre-activations without bias; out, the activated
  // (i, f, g, o). bias (4H,) or null: added first. c = f * c_prev + i * g, h = o * tanh(c).
  void (*lstm_fwd)(int64_t n, int64_t H, T* gates, int64_t ldg, const T* bias, const T* c_prev, int64_t ldcp,
                   T* c, int64_t ldc, T* h, int64_t ldh);
  // LSTM backward. dh = go + dh_in (each null = 0), dc = dc_in (null = 0) + dh * o * (1 - tanh(c)^2);
  // dgates (n, 4H) = gradient of the pre-activations; dc_out = dc * f (null: not written; may
  // alias dc_in, row by row).
  void (*lstm_bwd)(int64_t n, int64_t H, const T* gates, int64_t ldg, const T* c, int64_t ldc, const T* c_prev,
                   int64_t ldcp, const T* go, int64_t ldgo, const T* dh_in, int64_t lddh, const T* dc_in,
                   T* dc_out, int64_t lddc, T* dgates, int64_t lddg);
  // GRU forward. gx (n, 3H): x W_ih^T + b_ih; gh (n, 3H): h_prev W_hh^T; b_hh (3H,) or null.
  // r, z = sigmoid(gx + gh + b_hh), hn = gh_n + b_hn, n = tanh(gx_n + r * hn),
  // h = (1 - z) * n + z * h_prev; ws (n, 4H) = (r, z, n, hn).
  void (*gru_fwd)(int64_t n, int64_t H, const T* gx, int64_t ldgx, const T* gh, int64_t ldgh, const T* b_hh,
                  const T* h_prev, int64_t ldhp, T* ws, int64_t ldws, T* h, int64_t ldh);
  // GRU backward. dh = go + dh_in (each null = 0); dgx (n, 3H), dgh (n, 3H) = the gradients of
  // gx and of gh + b_hh; dh_out = dh * z (the direct part of dh_prev; null: not written; may alias
  // dh_in, row by row).
  void (*gru_bwd)(int64_t n, int64_t H, const T* ws, int64_t ldws, const T* h_prev, int64_t ldhp, const T* go,
                  int64_t ldgo, const T* dh_in, int64_t lddh, T* dh_out, int64_t lddo, T* dgx, int64_t lddgx,
                  T* dgh, int64_t lddgh);
  // The recurrent GEMM of the time loop, C (m, N) (+)= A (m, K) B (K, N), with B packed once per call
  // (pack_b) into panels of nr columns: panel p holds B[k][p*nr + j] at bp[p*nr*K + k*nr + j], the
  // columns past N zero. gemm_packed computes the columns of panels [p0, p1) with a register-blocked
  // micro-kernel (rows in blocks of up to 6, one panel at a time, so a panel stays in L1 over all the
  // row blocks); accumulate: C += A B, else C = A B.
  int64_t nr;
  // B[k][n] = b[k * ldk + n * ldn]; out holds ceil(N / nr) * nr * K elements.
  void (*pack_b)(int64_t K, int64_t N, const T* b, int64_t ldk, int64_t ldn, T* out);
  void (*gemm_packed)(int64_t m, int64_t K, int64_t N, int64_t p0, int64_t p1, const T* a, int64_t lda,
                      const T* bp, T* c, int64_t ldc, bool accumulate);
};

struct RnnKernels {
  RnnKernelsT<float> f32;
  RnnKernelsT<double> f64;
};

PYFASTDL_CPU_KERNELS(RnnKernels, rnn_kernels)

}  // namespace cpu
}  // namespace pyfastdl
