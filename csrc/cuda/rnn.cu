// LSTM and GRU CUDA launchers and kernels, registered under the CUDA dispatch key (family "rnn"; the
// contract: the schemas and comments in csrc/ops.cpp; the checks: csrc/common/rnn.h).
//
// Per layer and direction (the cells are the same with one step of batch_sizes [B]):
//   forward   xw = input @ w_ih^T for all steps (one cuBLAS GEMM, input dtype), h0w = h0 @ w_hh^T
//             (one GEMM: the recurrent product of the rows that start from h0); then per step in
//             processing order one GEMM rec = h_prev @ w_hh^T for the rows that continue from the
//             previous step, and one fused pointwise kernel (_lstm_fwd_step_kernel /
//             _gru_fwd_step_kernel): biases, gate nonlinearities, c' and h', saving gates and cs
//             (LSTM) or ws = (r, z, n, hn) (GRU), hy (cy) of the rows that finish at this step.
//   backward  per step in reverse processing order one GEMM dh_rec = dgates_next @ w_hh for the rows
//             that continue into the step processed after, and one fused pointwise kernel
//             (_lstm_bwd_step_kernel / _gru_bwd_step_kernel) -> dgates of the step; after the loop
//             the weight gradients, grad_input and grad_h0 as single GEMMs over all steps (h_prev
//             gathered once), the bias gradients as sums. Only the gradients in output_mask.
//
// Packed layout and processing order (ops.cpp): steps s_0, s_1, ... (t = k, or T - 1 - k when
// reverse). Row b of step s_k continues from step s_{k-1} when b < n_a(k) = min(bs[s_k], bs[s_{k-1}])
// (n_a(0) = 0), else it starts from h0[b] (c0[b]); its state after s_k is final (hy, cy) when
// b >= n_a(k + 1).
//
// Numerics: the GEMMs in the input dtype (cuBLAS accumulates in float32); the pointwise math in
// at::opmath_type (float32, float64 for float64); the LSTM's c and the backward's carried gradients in
// float32 buffers (B, H) from step to step (cs is only the saved, rounded copy). NaN propagates.
// Launchers: checks (rnn.h) first, then c10::cuda::CUDAGuard on input's device, kernels on the current
// stream, C10_CUDA_KERNEL_LAUNCH_CHECK after each. batch_sizes is read on the host (a CPU tensor).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../common/rnn.h"
#include "common.cuh"

namespace pyfastdl {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;
constexpr int64_t kDim0Storage[] = {0};
const at::IntArrayRef kDim0(kDim0Storage);  // the bias gradients sum over dim 0

// dtypes the CUDA kernels cover (float64 too, for gradcheck on a GPU).
const std::initializer_list<at::ScalarType> kAllowed = {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble};

// ---- device helpers -------------------------------------------------------------------------------
__device__ __forceinline__ float tanh_acc(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_acc(double x) { return tanh(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_acc(acc_t x) {
  return acc_t(1) / (acc_t(1) + cuda_common::exp_acc(-x));
}

template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> ld(const scalar_t* p, int64_t i) {
  return static_cast<at::opmath_type<scalar_t>>(p[i]);
}

// One step's rows: the pointwise kernels handle element e = b * H + j of the step's (bt, H) block.
struct Step {
  int64_t off;       // first packed row of this step
  int64_t bt;        // rows of this step
  int64_t prev_off;  // first packed row of the step processed before (rows < n_a continue from it)
  int64_t n_a;       // rows continuing from the step processed before
  int64_t next_off;  // first packed row of the step processed after
  int64_t n_next;    // rows continuing into the step processed after (the others are final here)
};

std::vector<Step> schedule(const rnn::Seq& s, bool reverse) {
  std::vector<Step> steps;
  const int64_t T = s.T;
  steps.reserve(T);
  auto order = [&](int64_t k) { return reverse ? T - 1 - k : k; };
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = order(k);
    Step st{};
    st.off = s.offsets[t];
    st.bt = s.sizes[t];
    if (k > 0) {
      const int64_t p = order(k - 1);
      st.prev_off = s.offsets[p];
      st.n_a = std::min(s.sizes[t], s.sizes[p]);
    }
    if (k + 1 < T) {
      const int64_t q = order(k + 1);
      st.next_off = s.offsets[q];
      st.n_next = std::min(s.sizes[t], s.sizes[q]);
    }
    steps.push_back(st);
  }
  return steps;
}

// For each row b < B, the packed row of its first processed step (every row has one when N > 0).
std::vector<int64_t> first_rows(const std::vector<Step>& steps, int64_t B) {
  std::vector<int64_t> idx(B, 0);
  for (const Step& st : steps)
    for (int64_t b = st.n_a; b < st.bt; ++b) idx[b] = st.off + b;
  return idx;
}

// For each packed row, where its previous hidden state lives in cat([output, h0]).
std::vector<int64_t> prev_rows(const std::vector<Step>& steps, int64_t N) {
  std::vector<int64_t> idx(N, 0);
  for (const Step& st : steps)
    for (int64_t b = 0; b < st.bt; ++b) idx[st.off + b] = b < st.n_a ? st.prev_off + b : N + b;
  return idx;
}

at::Tensor index_tensor(const std::vector<int64_t>& v, const at::Tensor& like) {
  at::Tensor cpu = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(v.begin(), v.end(), cpu.mutable_data_ptr<int64_t>());
  return cpu.to(like.options().dtype(at::kLong));
}

// The gradients that are single GEMMs over all steps, after the time loop (LSTM: dgx = dgh = dgates):
// grad_input = dG_x W_ih, grad_w_ih = dG_x^T x, grad_w_hh = dG_h^T h_prev (h_prev gathered once from
// cat(output, h0)). Undefined where not wanted.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gemm_grads(const at::Tensor& dgx, const at::Tensor& dgh,
                                                          const at::Tensor& x, const at::Tensor& output,
                                                          const at::Tensor& h0, const at::Tensor& w_ih,
                                                          const at::Tensor& w_hh, const std::vector<Step>& steps,
                                                          bool want_input, bool want_w_ih, bool want_w_hh) {
  at::Tensor gi, gw_ih, gw_hh;
  if (want_input) gi = at::mm(dgx, w_ih);
  if (want_w_ih) gw_ih = at::mm(dgx.t(), x);
  if (want_w_hh) {
    const at::Tensor hprev =
        at::cat({output.contiguous(), h0}, 0).index_select(0, index_tensor(prev_rows(steps, x.size(0)), x));
    gw_hh = at::mm(dgh.t(), hprev);
  }
  return {gi, gw_ih, gw_hh};
}

// rows [0, rows) of dst (contiguous) = a @ b (cuBLAS on the current stream, input dtype).
void mm_into(const at::Tensor& dst, int64_t rows, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor view = dst.narrow(0, 0, rows);
  at::mm_out(view, a, b);
}

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

// ---- LSTM kernels -----------------------------------------------------------------------------------
template <typename scalar_t>
struct LstmFwdArgs {
  const scalar_t* xw;     // (N, 4H): input @ w_ih^T
  const scalar_t* rec;    // (B, 4H): h_prev @ w_hh^T of the rows < n_a (row b)
  const scalar_t* h0w;    // (B, 4H): h0 @ w_hh^T (rows >= n_a)
  const scalar_t* b_ih;   // (4H,) or nullptr
  const scalar_t* b_hh;   // (4H,) or nullptr
  const scalar_t* c0;     // (B, H)
  at::opmath_type<scalar_t>* carry;  // (B, H): c of each row after its previous step; overwritten
  scalar_t* out;          // (N, H)
  scalar_t* cs;           // (N, H)
  scalar_t* gates;        // (N, 4H)
  scalar_t* hy;           // (B, H): rows >= fin_lo, or nullptr
  scalar_t* cy;           // (B, H)
  int64_t off, bt, n_a, fin_lo, H;
};

template <typename scalar_t>
__global__ void _lstm_fwd_step_kernel(LstmFwdArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, total = a.bt * H;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / H, j = e - b * H;
    const bool prev = b < a.n_a;
    const scalar_t* r = prev ? a.rec : a.h0w;
    const int64_t x4 = (a.off + b) * 4 * H, r4 = b * 4 * H;
    acc_t pre[4];
#pragma unroll
    for (int g = 0; g < 4; ++g) {
      acc_t v = ld(a.xw, x4 + g * H + j) + ld(r, r4 + g * H + j);
      if (a.b_ih) v += ld(a.b_ih, g * H + j);
      if (a.b_hh) v += ld(a.b_hh, g * H + j);
      pre[g] = v;
    }
    const acc_t i = sigmoid_acc(pre[0]), f = sigmoid_acc(pre[1]), gg = tanh_acc(pre[2]), o = sigmoid_acc(pre[3]);
    const acc_t c_prev = prev ? a.carry[e] : ld(a.c0, e);
    const acc_t c = f * c_prev + i * gg;
    const acc_t h = o * tanh_acc(c);
    a.carry[e] = c;
    const int64_t orow = (a.off + b) * H + j;
    a.out[orow] = static_cast<scalar_t>(h);
    a.cs[orow] = static_cast<scalar_t>(c);
    a.gates[x4 + j] = static_cast<scalar_t>(i);
    a.gates[x4 + H + j] = static_cast<scalar_t>(f);
    a.gates[x4 + 2 * H + j] = static_cast<scalar_t>(gg);
    a.gates[x4 + 3 * H + j] = static_cast<scalar_t>(o);
    if (a.hy != nullptr && b >= a.fin_lo) {
      a.hy[e] = static_cast<scalar_t>(h);
      a.cy[e] = static_cast<scalar_t>(c);
    }
  }
}

template <typename scalar_t>
struct LstmBwdArgs {
  const scalar_t* dhrec;  // (B, 4H>=H): dgates_next @ w_hh of rows < n_next, (B, H)
  const scalar_t* gout;   // (N, H) or nullptr
  const scalar_t* ghy;    // (B, H) or nullptr
  const scalar_t* gcy;    // (B, H) or nullptr
  at::opmath_type<scalar_t>* carry;  // (B, H): dL/dc after this step for rows < n_next; overwritten
  const scalar_t* gates;  // (N, 4H)
  const scalar_t* cs;     // (N, H)
  const scalar_t* c0;     // (B, H)
  scalar_t* dg;           // (N, 4H) out
  at::opmath_type<scalar_t>* gc0;  // (B, H) out: rows >= n_a
  int64_t off, bt, prev_off, n_a, n_next, H;
};

template <typename scalar_t>
__global__ void _lstm_bwd_step_kernel(LstmBwdArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, total = a.bt * H;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / H, j = e - b * H;
    const bool next = b < a.n_next;
    const int64_t orow = (a.off + b) * H + j, g4 = (a.off + b) * 4 * H + j;
    acc_t dh = a.gout ? ld(a.gout, orow) : acc_t(0);
    acc_t dc = 0;
    if (next) {
      dh += ld(a.dhrec, e);
      dc = a.carry[e];
    } else {
      if (a.ghy) dh += ld(a.ghy, e);
      if (a.gcy) dc = ld(a.gcy, e);
    }
    const acc_t i = ld(a.gates, g4), f = ld(a.gates, g4 + H), gg = ld(a.gates, g4 + 2 * H), o = ld(a.gates, g4 + 3 * H);
    const acc_t tc = tanh_acc(ld(a.cs, orow));
    const bool prev = b < a.n_a;
    const acc_t c_prev = prev ? ld(a.cs, (a.prev_off + b) * H + j) : ld(a.c0, e);
    dc += dh * o * (acc_t(1) - tc * tc);
    a.dg[g4] = static_cast<scalar_t>(dc * gg * i * (acc_t(1) - i));
    a.dg[g4 + H] = static_cast<scalar_t>(dc * c_prev * f * (acc_t(1) - f));
    a.dg[g4 + 2 * H] = static_cast<scalar_t>(dc * i * (acc_t(1) - gg * gg));
    a.dg[g4 + 3 * H] = static_cast<scalar_t>(dh * tc * o * (acc_t(1) - o));
    const acc_t dc_prev = dc * f;
    if (prev) a.carry[e] = dc_prev;
    else a.gc0[e] = dc_prev;
  }
}

// ---- GRU kernels ------------------------------------------------------------------------------------
template <typename scalar_t>
struct GruFwdArgs {
  const scalar_t* xw;    // (N, 3H): input @ w_ih^T
  const scalar_t* rec;   // (B, 3H): h_prev @ w_hh^T of rows < n_a
  const scalar_t* h0w;   // (B, 3H): h0 @ w_hh^T
  const scalar_t* b_ih;  // (3H,) or nullptr
  const scalar_t* b_hh;  // (3H,) or nullptr
  const scalar_t* h0;    // (B, H)
  scalar_t* out;         // (N, H); the previous step's rows are read (prev_off)
  scalar_t* ws;          // (N, 4H) = (r, z, n, hn)
  scalar_t* hy;          // (B, H) or nullptr
  int64_t off, bt, prev_off, n_a, fin_lo, H;
};

template <typename scalar_t>
__global__ void _gru_fwd_step_kernel(GruFwdArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, total = a.bt * H;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / H, j = e - b * H;
    const bool prev = b < a.n_a;
    const scalar_t* r = prev ? a.rec : a.h0w;
    const int64_t x3 = (a.off + b) * 3 * H, r3 = b * 3 * H;
    acc_t xr = ld(a.xw, x3 + j) + ld(r, r3 + j);
    acc_t xz = ld(a.xw, x3 + H + j) + ld(r, r3 + H + j);
    acc_t xn = ld(a.xw, x3 + 2 * H + j);
    acc_t hn = ld(r, r3 + 2 * H + j);
    if (a.b_ih) {
      xr += ld(a.b_ih, j);
      xz += ld(a.b_ih, H + j);
      xn += ld(a.b_ih, 2 * H + j);
    }
    if (a.b_hh) {
      xr += ld(a.b_hh, j);
      xz += ld(a.b_hh, H + j);
      hn += ld(a.b_hh, 2 * H + j);
    }
    const acc_t rr = sigmoid_acc(xr), z = sigmoid_acc(xz);
    const acc_t n = tanh_acc(xn + rr * hn);
    const acc_t h_prev = prev ? ld(a.out, (a.prev_off + b) * H + j) : ld(a.h0, e);
    const acc_t h = n + z * (h_prev - n);
    a.out[(a.off + b) * H + j] = static_cast<scalar_t>(h);
    const int64_t w4 = (a.off + b) * 4 * H + j;
    a.ws[w4] = static_cast<scalar_t>(rr);
    a.ws[w4 + H] = static_cast<scalar_t>(z);
    a.ws[w4 + 2 * H] = static_cast<scalar_t>(n);
    a.ws[w4 + 3 * H] = static_cast<scalar_t>(hn);
    if (a.hy != nullptr && b >= a.fin_lo) a.hy[e] = static_cast<scalar_t>(h);
  }
}

template <typename scalar_t>
struct GruBwdArgs {
  const scalar_t* dhrec;  // (B, H): dgh_next @ w_hh of rows < n_next
  const scalar_t* gout;   // (N, H) or nullptr
  const scalar_t* ghy;    // (B, H) or nullptr
  at::opmath_type<scalar_t>* carry;  // (B, H): z * dh of the step processed after (rows < n_next)
  const scalar_t* ws;     // (N, 4H)
  const scalar_t* out;    // (N, H)
  const scalar_t* h0;     // (B, H)
  scalar_t* dgh;          // (N, 3H) out: d(h w_hh^T + b_hh)
  scalar_t* dgx;          // (N, 3H) out: d(x w_ih^T + b_ih)
  at::opmath_type<scalar_t>* gh0;  // (B, H) out: the direct part of grad_h0, rows >= n_a
  int64_t off, bt, prev_off, n_a, n_next, H;
};

template <typename scalar_t>
__global__ void _gru_bwd_step_kernel(GruBwdArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.H, total = a.bt * H;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / H, j = e - b * H;
    const int64_t orow = (a.off + b) * H + j;
    acc_t dh = a.gout ? ld(a.gout, orow) : acc_t(0);
    if (b < a.n_next) dh += ld(a.dhrec, e) + a.carry[e];
    else if (a.ghy) dh += ld(a.ghy, e);
    const int64_t w4 = (a.off + b) * 4 * H + j;
    const acc_t r = ld(a.ws, w4), z = ld(a.ws, w4 + H), n = ld(a.ws, w4 + 2 * H), hn = ld(a.ws, w4 + 3 * H);
    const bool prev = b < a.n_a;
    const acc_t h_prev = prev ? ld(a.out, (a.prev_off + b) * H + j) : ld(a.h0, e);
    const acc_t da_n = dh * (acc_t(1) - z) * (acc_t(1) - n * n);
    const acc_t da_r = da_n * hn * r * (acc_t(1) - r);
    const acc_t da_z = dh * (h_prev - n) * z * (acc_t(1) - z);
    const int64_t g3 = (a.off + b) * 3 * H + j;
    a.dgh[g3] = static_cast<scalar_t>(da_r);
    a.dgh[g3 + H] = static_cast<scalar_t>(da_z);
    a.dgh[g3 + 2 * H] = static_cast<scalar_t>(da_n * r);
    a.dgx[g3] = static_cast<scalar_t>(da_r);
    a.dgx[g3 + H] = static_cast<scalar_t>(da_z);
    a.dgx[g3 + 2 * H] = static_cast<scalar_t>(da_n);
    const acc_t direct = dh * z;
    if (prev) a.carry[e] = direct;
    else a.gh0[e] = direct;
  }
}

template <typename T>
const T* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}

c10::optional<at::Tensor> contig(const c10::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined()) return t->contiguous();
  return c10::nullopt;
}

void check_cuda(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), op, ": expected input on a CUDA device, got ", input.device());
}

// ---- LSTM host loops --------------------------------------------------------------------------------

// Returns (output, hy, cy, gates, cs); hy, cy undefined unless `final`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward(
    const at::Tensor& input, const rnn::Seq& s, const at::Tensor& h0_, const at::Tensor& c0_, const at::Tensor& w_ih,
    const at::Tensor& w_hh_, const c10::optional<at::Tensor>& b_ih_, const c10::optional<at::Tensor>& b_hh_,
    bool reverse, bool final) {
  const int64_t N = s.N, B = s.d.B, H = s.d.H;
  const at::Tensor x = input.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), w_hh = w_hh_.contiguous();
  const auto b_ih = contig(b_ih_), b_hh = contig(b_hh_);
  at::Tensor out = at::empty({N, H}, x.options()), cs = at::empty({N, H}, x.options());
  at::Tensor gates = at::empty({N, 4 * H}, x.options());
  at::Tensor hy = final ? h0.clone() : at::Tensor(), cy = final ? c0.clone() : at::Tensor();
  if (N == 0 || H == 0) return {out, hy, cy, gates, cs};
  const at::Tensor xw = at::mm(x, w_ih.t());
  const at::Tensor h0w = at::mm(h0, w_hh.t());
  at::Tensor rec = at::empty({B, 4 * H}, x.options());
  at::Tensor carry = at::empty({B, H}, x.options().dtype(rnn::acc_dtype(x.scalar_type())));
  const std::vector<Step> steps = schedule(s, reverse);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_seq_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (const Step& st : steps) {
      if (st.bt == 0) continue;
      if (st.n_a > 0) mm_into(rec, st.n_a, out.narrow(0, st.prev_off, st.n_a), w_hh.t());
      LstmFwdArgs<scalar_t> a{};
      a.xw = xw.const_data_ptr<scalar_t>();
      a.rec = rec.const_data_ptr<scalar_t>();
      a.h0w = h0w.const_data_ptr<scalar_t>();
      a.b_ih = opt_ptr<scalar_t>(b_ih);
      a.b_hh = opt_ptr<scalar_t>(b_hh);
      a.c0 = c0.const_data_ptr<scalar_t>();
      a.carry = carry.mutable_data_ptr<acc_t>();
      a.out = out.mutable_data_ptr<scalar_t>();
      a.cs = cs.mutable_data_ptr<scalar_t>();
      a.gates = gates.mutable_data_ptr<scalar_t>();
      a.hy = final ? hy.mutable_data_ptr<scalar_t>() : nullptr;
      a.cy = final ? cy.mutable_data_ptr<scalar_t>() : nullptr;
      a.off = st.off, a.bt = st.bt, a.n_a = st.n_a, a.fin_lo = st.n_next, a.H = H;
      _lstm_fwd_step_kernel<scalar_t><<<blocks_for(st.bt * H), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, hy, cy, gates, cs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward(
    const c10::optional<at::Tensor>& grad_output_, const c10::optional<at::Tensor>& grad_hy_,
    const c10::optional<at::Tensor>& grad_cy_, const at::Tensor& input, const rnn::Seq& s, const at::Tensor& h0_,
    const at::Tensor& c0_, const at::Tensor& w_ih, const at::Tensor& w_hh_, const at::Tensor& output,
    const at::Tensor& gates_, const at::Tensor& cs_, bool reverse, std::array<bool, 6> mask) {
  const int64_t N = s.N, B = s.d.B, H = s.d.H;
  const bool any = mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5];
  if (!any) return {};
  const at::Tensor x = input.contiguous(), h0 = h0_.contiguous(), c0 = c0_.contiguous(), w_hh = w_hh_.contiguous();
  const auto grad_output = contig(grad_output_), grad_hy = contig(grad_hy_), grad_cy = contig(grad_cy_);
  const at::ScalarType acc = rnn::acc_dtype(x.scalar_type());
  at::Tensor dg = at::empty({N, 4 * H}, x.options());
  // rows without a step pass grad_cy through; a fresh buffer (the kernel writes it), never grad_cy itself
  at::Tensor gc0 = at::zeros({B, H}, x.options().dtype(acc));
  if (grad_cy.has_value()) gc0.copy_(*grad_cy);
  const std::vector<Step> steps = schedule(s, reverse);
  if (N > 0 && H > 0) {
    const at::Tensor gates = gates_.contiguous(), cs = cs_.contiguous();
    at::Tensor carry = at::empty({B, H}, x.options().dtype(acc));
    at::Tensor dhrec = at::empty({B, H}, x.options());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lstm_seq_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
        const Step& st = *it;
        if (st.bt == 0) continue;
        if (st.n_next > 0) mm_into(dhrec, st.n_next, dg.narrow(0, st.next_off, st.n_next), w_hh);
        LstmBwdArgs<scalar_t> a{};
        a.dhrec = dhrec.const_data_ptr<scalar_t>();
        a.gout = opt_ptr<scalar_t>(grad_output);
        a.ghy = opt_ptr<scalar_t>(grad_hy);
        a.gcy = opt_ptr<scalar_t>(grad_cy);
        a.carry = carry.mutable_data_ptr<acc_t>();
        a.gates = gates.const_data_ptr<scalar_t>();
        a.cs = cs.const_data_ptr<scalar_t>();
        a.c0 = c0.const_data_ptr<scalar_t>();
        a.dg = dg.mutable_data_ptr<scalar_t>();
        a.gc0 = gc0.mutable_data_ptr<acc_t>();
        a.off = st.off, a.bt = st.bt, a.prev_off = st.prev_off, a.n_a = st.n_a, a.n_next = st.n_next, a.H = H;
        _lstm_bwd_step_kernel<scalar_t><<<blocks_for(st.bt * H), kThreads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  } else {
    dg.zero_();
  }
  auto [gi, gw_ih, gw_hh] = gemm_grads(dg, dg, x, output, h0, w_ih, w_hh, steps, mask[0], mask[3], mask[4]);
  at::Tensor gh0, gc0_out, gb;
  if (mask[1]) {
    if (N > 0) gh0 = at::mm(dg.index_select(0, index_tensor(first_rows(steps, B), x)), w_hh);
    else gh0 = grad_hy.has_value() ? grad_hy->clone() : at::zeros({B, H}, x.options());
  }
  if (mask[2]) gc0_out = gc0.to(x.scalar_type());
  if (mask[5]) gb = dg.sum(kDim0, /*keepdim=*/false, acc).to(x.scalar_type());
  return {gi, gh0, gc0_out, gw_ih, gw_hh, gb};
}

// ---- GRU host loops ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward(const at::Tensor& input, const rnn::Seq& s,
                                                           const at::Tensor& h0_, const at::Tensor& w_ih,
                                                           const at::Tensor& w_hh_,
                                                           const c10::optional<at::Tensor>& b_ih_,
                                                           const c10::optional<at::Tensor>& b_hh_, bool reverse,
                                                           bool final) {
  const int64_t N = s.N, B = s.d.B, H = s.d.H;
  const at::Tensor x = input.contiguous(), h0 = h0_.contiguous(), w_hh = w_hh_.contiguous();
  const auto b_ih = contig(b_ih_), b_hh = contig(b_hh_);
  at::Tensor out = at::empty({N, H}, x.options()), ws = at::empty({N, 4 * H}, x.options());
  at::Tensor hy = final ? h0.clone() : at::Tensor();
  if (N == 0 || H == 0) return {out, hy, ws};
  const at::Tensor xw = at::mm(x, w_ih.t());
  const at::Tensor h0w = at::mm(h0, w_hh.t());
  at::Tensor rec = at::empty({B, 3 * H}, x.options());
  const std::vector<Step> steps = schedule(s, reverse);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gru_seq_fwd_cuda", [&] {
    for (const Step& st : steps) {
      if (st.bt == 0) continue;
      if (st.n_a > 0) mm_into(rec, st.n_a, out.narrow(0, st.prev_off, st.n_a), w_hh.t());
      GruFwdArgs<scalar_t> a{};
      a.xw = xw.const_data_ptr<scalar_t>();
      a.rec = rec.const_data_ptr<scalar_t>();
      a.h0w = h0w.const_data_ptr<scalar_t>();
      a.b_ih = opt_ptr<scalar_t>(b_ih);
      a.b_hh = opt_ptr<scalar_t>(b_hh);
      a.h0 = h0.const_data_ptr<scalar_t>();
      a.out = out.mutable_data_ptr<scalar_t>();
      a.ws = ws.mutable_data_ptr<scalar_t>();
      a.hy = final ? hy.mutable_data_ptr<scalar_t>() : nullptr;
      a.off = st.off, a.bt = st.bt, a.prev_off = st.prev_off, a.n_a = st.n_a, a.fin_lo = st.n_next, a.H = H;
      _gru_fwd_step_kernel<scalar_t><<<blocks_for(st.bt * H), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, hy, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_backward(
    const c10::optional<at::Tensor>& grad_output_, const c10::optional<at::Tensor>& grad_hy_, const at::Tensor& input,
    const rnn::Seq& s, const at::Tensor& h0_, const at::Tensor& w_ih, const at::Tensor& w_hh_,
    const at::Tensor& output_, const at::Tensor& ws_, bool reverse, std::array<bool, 6> mask) {
  const int64_t N = s.N, B = s.d.B, H = s.d.H;
  const bool any = mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5];
  if (!any) return {};
  const at::Tensor x = input.contiguous(), h0 = h0_.contiguous(), w_hh = w_hh_.contiguous();
  const at::Tensor output = output_.contiguous();
  const auto grad_output = contig(grad_output_), grad_hy = contig(grad_hy_);
  const at::ScalarType acc = rnn::acc_dtype(x.scalar_type());
  at::Tensor dgh = at::empty({N, 3 * H}, x.options()), dgx = at::empty({N, 3 * H}, x.options());
  at::Tensor gh0 = at::zeros({B, H}, x.options().dtype(acc));  // a fresh buffer, never grad_hy itself
  if (grad_hy.has_value()) gh0.copy_(*grad_hy);
  const std::vector<Step> steps = schedule(s, reverse);
  if (N > 0 && H > 0) {
    const at::Tensor ws = ws_.contiguous();
    at::Tensor carry = at::empty({B, H}, x.options().dtype(acc));
    at::Tensor dhrec = at::empty({B, H}, x.options());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gru_seq_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
        const Step& st = *it;
        if (st.bt == 0) continue;
        if (st.n_next > 0) mm_into(dhrec, st.n_next, dgh.narrow(0, st.next_off, st.n_next), w_hh);
        GruBwdArgs<scalar_t> a{};
        a.dhrec = dhrec.const_data_ptr<scalar_t>();
        a.gout = opt_ptr<scalar_t>(grad_output);
        a.ghy = opt_ptr<scalar_t>(grad_hy);
        a.carry = carry.mutable_data_ptr<acc_t>();
        a.ws = ws.const_data_ptr<scalar_t>();
        a.out = output.const_data_ptr<scalar_t>();
        a.h0 = h0.const_data_ptr<scalar_t>();
        a.dgh = dgh.mutable_data_ptr<scalar_t>();
        a.dgx = dgx.mutable_data_ptr<scalar_t>();
        a.gh0 = gh0.mutable_data_ptr<acc_t>();
        a.off = st.off, a.bt = st.bt, a.prev_off = st.prev_off, a.n_a = st.n_a, a.n_next = st.n_next, a.H = H;
        _gru_bwd_step_kernel<scalar_t><<<blocks_for(st.bt * H), kThreads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  } else {
    dgh.zero_();
    dgx.zero_();
  }
  auto [gi, gw_ih, gw_hh] = gemm_grads(dgx, dgh, x, output, h0, w_ih, w_hh, steps, mask[0], mask[2], mask[3]);
  at::Tensor gh0_out, gb_ih, gb_hh;
  if (mask[1]) {
    if (N > 0 && H > 0) {
      const at::Tensor first = index_tensor(first_rows(steps, B), x);
      gh0.add_(at::mm(dgh.index_select(0, first), w_hh).to(acc));
    }
    gh0_out = gh0.to(x.scalar_type());
  }
  if (mask[4]) gb_ih = dgx.sum(kDim0, /*keepdim=*/false, acc).to(x.scalar_type());
  if (mask[5]) gb_hh = dgh.sum(kDim0, /*keepdim=*/false, acc).to(x.scalar_type());
  return {gi, gh0_out, gw_ih, gw_hh, gb_ih, gb_hh};
}

// A cell is one step of batch_sizes [B].
rnn::Seq cell_seq(const rnn::Dims& d) {
  rnn::Seq s;
  s.d = d;
  s.T = d.B > 0 ? 1 : 0;
  s.N = d.B;
  if (s.T) s.sizes = {d.B};
  s.offsets = s.T ? std::vector<int64_t>{0, d.B} : std::vector<int64_t>{0};
  return s;
}

}  // namespace

// ---- the launchers ----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cuda(const at::Tensor& input, const at::Tensor& hx,
                                                                  const at::Tensor& cx, const at::Tensor& w_ih,
                                                                  const at::Tensor& w_hh,
                                                                  const c10::optional<at::Tensor>& b_ih,
                                                                  const c10::optional<at::Tensor>& b_hh) {
  const rnn::Dims d = rnn::check_lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh, kAllowed);
  check_cuda("lstm_cell_fwd", input);
  c10::cuda::CUDAGuard guard(input.device());
  auto [out, hy, cy, gates, cs] = lstm_forward(input, cell_seq(d), hx, cx, w_ih, w_hh, b_ih, b_hh, false, false);
  return {out, cs, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd_cuda(
    const c10::optional<at::Tensor>& grad_hy, const c10::optional<at::Tensor>& grad_cy, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& cy,
    const at::Tensor& gates, std::array<bool, 6> output_mask) {
  const rnn::Dims d = rnn::check_lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates, kAllowed);
  check_cuda("lstm_cell_bwd", input);
  c10::cuda::CUDAGuard guard(input.device());
  return lstm_backward(c10::nullopt, grad_hy, grad_cy, input, cell_seq(d), hx, cx, w_ih, w_hh, hx, gates, cy, false,
                       output_mask);
}

std::tuple<at::Tensor, at::Tensor> gru_cell_fwd_cuda(const at::Tensor& input, const at::Tensor& hx,
                                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                     const c10::optional<at::Tensor>& b_ih,
                                                     const c10::optional<at::Tensor>& b_hh) {
  const rnn::Dims d = rnn::check_gru_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh, kAllowed);
  check_cuda("gru_cell_fwd", input);
  c10::cuda::CUDAGuard guard(input.device());
  auto [out, hy, ws] = gru_forward(input, cell_seq(d), hx, w_ih, w_hh, b_ih, b_hh, false, false);
  return {out, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_cell_bwd_cuda(
    const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& ws, std::array<bool, 6> output_mask) {
  const rnn::Dims d = rnn::check_gru_cell_bwd(grad_hy, input, hx, w_ih, w_hh, ws, kAllowed);
  check_cuda("gru_cell_bwd", input);
  c10::cuda::CUDAGuard guard(input.device());
  return gru_backward(c10::nullopt, grad_hy, input, cell_seq(d), hx, w_ih, w_hh, hx, ws, false, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_seq_fwd_cuda(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse) {
  const rnn::Seq s = rnn::check_lstm_seq_fwd(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, kAllowed);
  check_cuda("lstm_seq_fwd", input);
  c10::cuda::CUDAGuard guard(input.device());
  return lstm_forward(input, s, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_seq_bwd_cuda(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_hy,
    const c10::optional<at::Tensor>& grad_cy, const at::Tensor& input, const at::Tensor& batch_sizes,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cs, bool reverse,
    std::array<bool, 6> output_mask) {
  const rnn::Seq s = rnn::check_lstm_seq_bwd(grad_output, grad_hy, grad_cy, input, batch_sizes, h0, c0, w_ih, w_hh,
                                             output, gates, cs, kAllowed);
  check_cuda("lstm_seq_bwd", input);
  c10::cuda::CUDAGuard guard(input.device());
  return lstm_backward(grad_output, grad_hy, grad_cy, input, s, h0, c0, w_ih, w_hh, output, gates, cs, reverse,
                       output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_seq_fwd_cuda(const at::Tensor& input, const at::Tensor& batch_sizes,
                                                                const at::Tensor& h0, const at::Tensor& w_ih,
                                                                const at::Tensor& w_hh,
                                                                const c10::optional<at::Tensor>& b_ih,
                                                                const c10::optional<at::Tensor>& b_hh, bool reverse) {
  const rnn::Seq s = rnn::check_gru_seq_fwd(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, kAllowed);
  check_cuda("gru_seq_fwd", input);
  c10::cuda::CUDAGuard guard(input.device());
  return gru_forward(input, s, h0, w_ih, w_hh, b_ih, b_hh, reverse, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_seq_bwd_cuda(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_hy, const at::Tensor& input,
    const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& output, const at::Tensor& ws, bool reverse, std::array<bool, 6> output_mask) {
  const rnn::Seq s =
      rnn::check_gru_seq_bwd(grad_output, grad_hy, input, batch_sizes, h0, w_ih, w_hh, output, ws, kAllowed);
  check_cuda("gru_seq_bwd", input);
  c10::cuda::CUDAGuard guard(input.device());
  return gru_backward(grad_output, grad_hy, input, s, h0, w_ih, w_hh, output, ws, reverse, output_mask);
}

}  // namespace pyfastdl

TORCH_LIBRARY_IMPL(pyfastdl, CUDA, m) {
  m.impl("lstm_cell_fwd", &pyfastdl::lstm_cell_fwd_cuda);
  m.impl("lstm_cell_bwd", &pyfastdl::lstm_cell_bwd_cuda);
  m.impl("gru_cell_fwd", &pyfastdl::gru_cell_fwd_cuda);
  m.impl("gru_cell_bwd", &pyfastdl::gru_cell_bwd_cuda);
  m.impl("lstm_seq_fwd", &pyfastdl::lstm_seq_fwd_cuda);
  m.impl("lstm_seq_bwd", &pyfastdl::lstm_seq_bwd_cuda);
  m.impl("gru_seq_fwd", &pyfastdl::gru_seq_fwd_cuda);
  m.impl("gru_seq_bwd", &pyfastdl::gru_seq_bwd_cuda);
}
