// LSTM/GRU CPU launchers (family "rnn"; schemas and layout in csrc/ops.cpp): validate
// (common/rnn.h), allocate, run the GEMMs through ATen's BLAS and the fused pointwise kernels of the
// CPU's capability (rnn_kernel.cpp) over row blocks with at::parallel_for. Registered under the CPU
// dispatch key.
//
// Whole sequence, forward: gates = x W_ih^T + b_ih for all N rows in one GEMM before the loop; per
// step t (batch_sizes[t] active rows) one recurrent GEMM h_prev W_hh^T (LSTM: accumulated into the
// step's gate rows in place; GRU: into a (B, 3H) scratch, since r multiplies its n part) and one
// fused pointwise pass that adds b_hh, applies the nonlinearities and writes c, h and what the
// backward needs.
// The per-step recurrent GEMMs (forward h_prev W_hh^T, backward dgates W_hh) do not go through ATen:
// W_hh is packed once per call (rnn_kernel.h, pack_b) and each step runs the packed micro-kernel over
// its panels; at 1 thread on the 2-core EPYC this beat at::mm (MKL) by 8-10% per layer on the issue's
// sizes (T35 B32 H256, T100 B64 H512).
// Threads: the batch rows are split over the threads for the whole time loop (row_parts, seq_loop):
// one parallel region per op, no barrier per step. Small batches (B < 8) or little work keep one part;
// then each step's GEMM is split over panels (step_gemm) and its pointwise pass over rows, as before.
// Backward through time: per step the fused pointwise backward -> dgates, then dh_prev = dgates W_hh
// (the carried gradient, (B, H)); after the loop grad_w_ih = dgates^T X, grad_w_hh = dgates^T H_prev
// and grad_input = dgates W_ih as single GEMMs over all steps, grad_bias the column sums.
//
// The previous state of row b at step t ("prev segments"): forward direction, h of step t - 1 (rows
// [0, batch_sizes[t]) of it) or h0 at t = 0; reverse direction, h of step t + 1 for the rows still
// active there (b < batch_sizes[t + 1]) and h0 for the rows whose sequence ends at t.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/rnn.h"
#include "cpu/rnn_kernel.h"

namespace pyfastdl {
namespace {

using rnn::Seq;

template <typename T>
const cpu::RnnKernelsT<T>& kern();
template <>
const cpu::RnnKernelsT<float>& kern<float>() {
  return cpu::rnn_kernels()->f32;
}
template <>
const cpu::RnnKernelsT<double>& kern<double>() {
  return cpu::rnn_kernels()->f64;
}

constexpr std::initializer_list<at::ScalarType> kDtypes = {at::kFloat, at::kDouble};

at::Tensor opt(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// x W^T (+ b): (rows, G*H).
at::Tensor project(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return b.defined() ? at::addmm(b, x, w.t()) : at::mm(x, w.t());
}

// Rows [0, n) of a pointwise kernel, split over threads in blocks of about kGrain elements.
template <typename F>
void rows_parallel(int64_t n, int64_t H, int64_t G, const F& f) {
  constexpr int64_t kGrain = 16384;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, H * G));
  if (n <= grain) {
    if (n > 0) f(0, n);
    return;
  }
  at::parallel_for(0, n, grain, [&](int64_t a, int64_t b) { f(a, b); });
}

// The previous state of rows [r0, r1) of step t: rows [src, src + r1 - r0) of the sequence's
// output (from_init = false) or of h0/c0 (from_init = true, src = r0).
struct Seg {
  int64_t r0, r1, src;
  bool from_init;
};

int prev_segments(const Seq& s, int64_t t, bool reverse, std::array<Seg, 2>& seg) {
  const int64_t n = s.sizes[t];
  if (!reverse) {
    seg[0] = t == 0 ? Seg{0, n, 0, true} : Seg{0, n, s.offsets[t - 1], false};
    return n > 0 ? 1 : 0;
  }
  const int64_t m = t + 1 < s.T ? s.sizes[t + 1] : 0;
  int k = 0;
  if (m > 0) seg[k++] = Seg{0, m, s.offsets[t + 1], false};
  if (n > m) seg[k++] = Seg{m, n, m, true};
  return k;
}

// seg restricted to the rows [q0, q1) (empty: r1 <= r0).
Seg clip(const Seg& sg, int64_t q0, int64_t q1) {
  const int64_t a = std::max(sg.r0, q0), e = std::max(a, std::min(sg.r1, q1));
  return Seg{a, e, sg.src + (a - sg.r0), sg.from_init};
}

// The batch rows split over threads for a whole time loop. Row b's recurrence reads only row b of the
// previous state (forward h_{t-1}[b], c_{t-1}[b]; backward the carried dh[b], dc[b]), so each thread
// runs every step on its own rows with no barrier between steps (the per-step alternative, splitting
// each step's GEMM over columns and its pointwise pass over rows, costs two barriers per step, and on
// a shared machine a descheduled thread stalls both cores at every one of them). The parts are
// contiguous rows balancing the rows' step counts (packed: lengths non-increasing in b, so the first
// part has fewer rows). One part (small batches or small work): the caller's thread runs the loop and
// the per-step GEMM and pointwise pass split over threads as before.
std::vector<int64_t> row_parts(const Seq& s, int64_t G) {
  const int64_t B = s.d.B, H = s.d.H;
  constexpr int64_t kMinRows = 4;         // rows per part at least (the GEMM micro-kernel takes 6)
  constexpr int64_t kMinWork = 1 << 13;   // multiply-adds of the recurrent GEMMs per part at least
  int64_t parts = std::min<int64_t>(at::get_num_threads(), B / kMinRows);
  parts = std::min<int64_t>(parts, s.N * G * H * H / kMinWork);
  if (at::in_parallel_region() || parts < 2) return {0, B};
  std::vector<int64_t> len(B + 1, 0);  // len[b] = steps of row b (difference array first)
  for (int64_t t = 0; t < s.T; ++t) len[s.sizes[t]] -= 1;
  int64_t run = s.T;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t l = run;
    run += len[b + 1];
    len[b] = l;
  }
  std::vector<int64_t> bounds{0};
  int64_t acc = 0, b = 0;
  for (int64_t p = 1; p < parts; ++p) {
    while (b < B && (acc + len[b] / 2) * parts < s.N * p) acc += len[b++];
    if (b > bounds.back()) bounds.push_back(b);
  }
  if (B > bounds.back()) bounds.push_back(B);
  return bounds;
}

// f(q0, q1): the whole time loop over the rows [q0, q1), once per part, the parts in parallel.
template <typename F>
void for_row_parts(const std::vector<int64_t>& bounds, const F& f) {
  const int64_t parts = static_cast<int64_t>(bounds.size()) - 1;
  if (parts <= 1) {
    if (parts == 1) f(bounds[0], bounds[1]);
    return;
  }
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) f(bounds[p], bounds[p + 1]);
  });
}

// The time loop shared by the four sequence ops. Steps in processing order (forward op: t = 0 .. T-1,
// reverse t = T-1 .. 0; the backward op the other way round); per step, for the rows [q0, q1) of each
// part: step(t, seg) for each prev segment of the step clipped to the part (the pointwise pass, with
// the forward's recurrent GEMM before it), then after(t, a, e) for the part's active rows [a, e) (the
// backward's dh_prev GEMM).
template <typename Step, typename After>
void seq_loop(const Seq& s, bool reverse, bool backward, const std::vector<int64_t>& parts, const Step& step,
              const After& after) {
  for_row_parts(parts, [&](int64_t q0, int64_t q1) {
    std::array<Seg, 2> seg;
    for (int64_t i = 0; i < s.T; ++i) {
      const int64_t t = (reverse != backward) ? s.T - 1 - i : i;
      const int nseg = prev_segments(s, t, reverse, seg);
      for (int j = 0; j < nseg; ++j) {
        const Seg sg = clip(seg[j], q0, q1);
        if (sg.r1 > sg.r0) step(t, sg);
      }
      const int64_t e = std::min(q1, s.sizes[t]);
      if (e > q0) after(t, q0, e);
    }
  });
}

// hy[b] = h after row b's last processed step (forward direction: the step t with
// batch_sizes[t + 1] <= b < batch_sizes[t]; reverse: t = 0). T = 0: hy = init.
at::Tensor final_state(const Seq& s, const at::Tensor& seq, const at::Tensor& init, bool reverse) {
  at::Tensor out = at::empty_like(init);
  if (s.T == 0) return out.copy_(init);
  if (reverse) return out.copy_(seq.narrow(0, 0, s.sizes[0]));
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t hi = s.sizes[t], lo = t + 1 < s.T ? s.sizes[t + 1] : 0;
    if (hi > lo) out.narrow(0, lo, hi - lo).copy_(seq.narrow(0, s.offsets[t] + lo, hi - lo));
  }
  return out;
}

// H_prev (N, H): row (t, b) = the previous state of row b at step t.
at::Tensor prev_states(const Seq& s, const at::Tensor& seq, const at::Tensor& init, bool reverse) {
  const int64_t H = init.size(1);
  at::Tensor out = at::empty({s.N, H}, seq.options());
  const int64_t row_bytes = H * seq.element_size();
  if (row_bytes == 0) return out;
  char* o = static_cast<char*>(out.data_ptr());
  const char* sq = static_cast<const char*>(seq.const_data_ptr());
  const char* in = static_cast<const char*>(init.const_data_ptr());
  std::array<Seg, 2> seg;
  for (int64_t t = 0; t < s.T; ++t) {
    const int k = prev_segments(s, t, reverse, seg);
    for (int i = 0; i < k; ++i) {
      const char* src = (seg[i].from_init ? in : sq) + seg[i].src * row_bytes;
      std::memcpy(o + (s.offsets[t] + seg[i].r0) * row_bytes, src, (seg[i].r1 - seg[i].r0) * row_bytes);
    }
  }
  return out;
}

// W packed once per call for the time loop's recurrent GEMM (rnn_kernel.h, pack_b): B (K, N) with
// B[k][n] = w[k * ldk + n * ldn], w a contiguous tensor of dtype T.
template <typename T>
at::Tensor pack_weight(const cpu::RnnKernelsT<T>& k, const at::Tensor& w, int64_t K, int64_t N, int64_t ldk,
                       int64_t ldn) {
  const int64_t np = (N + k.nr - 1) / k.nr;
  at::Tensor out = at::empty({np * k.nr * K}, w.options());
  k.pack_b(K, N, w.const_data_ptr<T>(), ldk, ldn, out.mutable_data_ptr<T>());
  return out;
}

// C (m, N) (+)= A (m, K) B, B packed: the panels split over threads (each thread gets the same
// panels at every step, so its part of B stays in its core's cache over the time loop).
template <typename T>
void step_gemm(const cpu::RnnKernelsT<T>& k, int64_t m, int64_t K, int64_t N, const T* a, int64_t lda,
               const T* bp, T* c, int64_t ldc, bool acc) {
  if (m <= 0 || N <= 0) return;
  const int64_t np = (N + k.nr - 1) / k.nr;
  constexpr int64_t kMinWork = 1 << 15;  // multiply-adds per thread at least
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, m * K * k.nr));
  if (np <= grain) {
    k.gemm_packed(m, K, N, 0, np, a, lda, bp, c, ldc, acc);
    return;
  }
  at::parallel_for(0, np, grain, [&](int64_t p0, int64_t p1) { k.gemm_packed(m, K, N, p0, p1, a, lda, bp, c, ldc, acc); });
}

// ---- the whole-sequence GEMMs: the input projection before the time loop, grad_input and the weight
// gradients after it -------------------------------------------------------------------------------
// Either ATen's BLAS (at::mm / at::addmm) or the packed micro-kernel above run as a full GEMM: B packed
// in parallel over its panels, C split into tasks of kSeqRows rows (all panels), each element summed in
// a fixed order (K in chunks, below: bits independent of the thread count); a transposed A (the weight
// gradients' dgates^T) is transposed per task into a row block first (read in place, with K-strided
// broadcasts, it ran 1.3x slower; ATen's transposing copy of the whole A took longer than the GEMM's gain).
// The switch: PYFASTDL_RNN_GEMM=auto|own|blas (read once) or the op rnn_cpu_gemm(mode). auto = own on
// the AVX-512 capability of an AMD CPU, BLAS elsewhere: torch's MKL runs its AVX2 code on AMD CPUs (its
// square float32 matmul reached 192 GFLOP/s of the 474 an AVX-512 FMA loop reaches on the 2-core EPYC
// Zen 5, and these GEMMs took 67% of an LSTM layer's fwd+bwd there), while on Intel MKL has AVX-512
// kernels, and on AVX2 (the EPYC Zen 4) ours was not measured against it as a full GEMM.
constexpr int64_t kSeqRows = 48;  // rows per task: a multiple of the micro-kernel's 6
// K in chunks: each chunk's products are summed from zero in registers and then added to C, so the
// rounding error grows with K / kSeqKc + kSeqKc rather than with K (the weight gradients sum over T B
// rows: at T100 B64 H512 one sequential sum gave 1.7e-6 / 2.9e-6 relative error against float64, MKL
// 3.6e-7 / 4.3e-7).
constexpr int64_t kSeqKc = 256;

constexpr const char* kSeqModes[] = {"auto", "own", "blas"};

int parse_seq_mode(std::string m) {
  for (auto& ch : m) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (int i = 0; i < 3; ++i)
    if (m == kSeqModes[i]) return i;
  return -1;
}

std::atomic<int>& seq_mode() {
  static std::atomic<int> mode{[] {
    const char* env = std::getenv("PYFASTDL_RNN_GEMM");
    if (!env || !*env) return 0;
    const int m = parse_seq_mode(env);
    TORCH_CHECK(m >= 0, "PYFASTDL_RNN_GEMM: expected auto, own or blas, got '", env, "'");
    return m;
  }()};
  return mode;
}

std::atomic<int> last_seq_gemm{-1};  // the last sequence GEMM: -1 none yet, 1 own, 2 blas

bool own_seq_gemm() {
  const int m = seq_mode().load();
  bool own = m == 1;
  if (m == 0) {
#if defined(__x86_64__) || defined(__i386__)
    own = cpu::capability() == cpu::Capability::AVX512 && __builtin_cpu_is("amd");
#endif
  }
  last_seq_gemm.store(own ? 1 : 2);
  return own;
}

// C (M, N) = op(A) op(B) (+ bias, an (N,) row added to every row): op(A) = A (M, K), or A^T with A
// given (K, M) when ta; op(B) = B (K, N), or B^T with B given (N, K) when tb.
at::Tensor seq_mm(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, const at::Tensor& bias = {}) {
  if (!own_seq_gemm()) {
    const at::Tensor a = ta ? A.t() : A, b = tb ? B.t() : B;
    return bias.defined() ? at::addmm(bias, a, b) : at::mm(a, b);
  }
  const at::Tensor a = A.contiguous(), b = B.contiguous();
  const int64_t M = a.size(ta ? 1 : 0), K = a.size(ta ? 0 : 1), N = tb ? b.size(0) : b.size(1);
  at::Tensor c = at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return c;
  if (K == 0) return bias.defined() ? c.copy_(bias.view({1, N}).expand({M, N})) : c.zero_();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rnn_seq_mm", [&] {
    using T = scalar_t;
    const auto& k = kern<T>();
    const int64_t np = (N + k.nr - 1) / k.nr, ldk = tb ? 1 : N, ldn = tb ? K : 1;
    // B in chunks of kSeqKc rows (chunk q at bp + np nr q kSeqKc, its panel p at + p nr kc)
    const int64_t nq = (K + kSeqKc - 1) / kSeqKc;
    at::Tensor packed = at::empty({np * k.nr * K}, a.options());
    const T* bsrc = b.const_data_ptr<T>();
    T* bp = packed.mutable_data_ptr<T>();
    at::parallel_for(0, nq * np, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t q = t / np, p = t % np, k0 = q * kSeqKc, kc = std::min(kSeqKc, K - k0);
        k.pack_b(kc, std::min<int64_t>(k.nr, N - p * k.nr), bsrc + k0 * ldk + p * k.nr * ldn, ldk, ldn,
                 bp + np * k.nr * k0 + p * k.nr * kc);
      }
    });
    const bool acc = bias.defined();
    if (acc) c.copy_(bias.contiguous().view({1, N}).expand({M, N}));
    const T* ap = a.const_data_ptr<T>();
    T* cp = c.mutable_data_ptr<T>();
    const int64_t nrb = (M + kSeqRows - 1) / kSeqRows;
    at::parallel_for(0, nrb, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> rows(ta ? kSeqRows * K : 0);  // op(A)'s rows [r0, r0 + m) when A is given transposed
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * kSeqRows, m = std::min(kSeqRows, M - r0);
        const T* arows = ap + r0 * K;
        if (ta) {  // rows[i][k] = A[k][r0 + i], in tiles of 16 k
          for (int64_t k0 = 0; k0 < K; k0 += 16)
            for (int64_t i = 0; i < m; ++i)
              for (int64_t kk = k0; kk < std::min(K, k0 + 16); ++kk) rows[i * K + kk] = ap[kk * M + r0 + i];
          arows = rows.data();
        }
        for (int64_t q = 0; q < nq; ++q) {  // C (+)= the chunk's product, summed from zero in registers
          const int64_t k0 = q * kSeqKc, kc = std::min(kSeqKc, K - k0);
          k.gemm_packed(m, kc, N, 0, np, arows + k0, K, bp + np * k.nr * k0, cp + r0 * N, N, acc || q > 0);
        }
      }
    });
  });
  return c;
}

}  // namespace

namespace cpu {
// The op rnn_cpu_gemm (csrc/ops.cpp): sets the whole-sequence GEMM mode and returns the previous one;
// "" returns the mode, "last" what the last sequence GEMM used ("own", "blas" or "none").
std::string rnn_cpu_gemm(c10::string_view mode) {
  if (mode.empty()) return kSeqModes[seq_mode().load()];
  if (mode == "last") {
    const int l = last_seq_gemm.load();
    return l < 0 ? "none" : kSeqModes[l];
  }
  const int m = parse_seq_mode(std::string(mode));
  TORCH_CHECK(m >= 0, "rnn_cpu_gemm: expected mode 'auto', 'own', 'blas', '' or 'last', got '", std::string(mode),
              "'");
  return kSeqModes[seq_mode().exchange(m)];
}
}  // namespace cpu

// ---- cells -------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_fwd_cpu(const at::Tensor& input, const at::Tensor& hx,
                                                                 const at::Tensor& cx, const at::Tensor& w_ih,
                                                                 const at::Tensor& w_hh,
                                                                 const c10::optional<at::Tensor>& b_ih,
                                                                 const c10::optional<at::Tensor>& b_hh) {
  const at::NoGradGuard no_grad;  // in-place / out= GEMMs on inputs that may require grad
  const rnn::Dims d = rnn::check_lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh, kDtypes);
  const at::Tensor bhh = opt(b_hh), cxc = cx.contiguous();
  at::Tensor gates = project(input, w_ih, opt(b_ih));
  gates.addmm_(hx, w_hh.t());
  at::Tensor hy = at::empty({d.B, d.H}, input.options()), cy = at::empty({d.B, d.H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_cell_fwd", [&] {
    using T = scalar_t;
    const auto& k = kern<T>();
    T* g = gates.mutable_data_ptr<T>();
    const T* b = ptr_or_null<T>(bhh);
    const T* cp = cxc.const_data_ptr<T>();
    T *c = cy.mutable_data_ptr<T>(), *h = hy.mutable_data_ptr<T>();
    const int64_t H = d.H;
    rows_parallel(d.B, H, 4, [&](int64_t a, int64_t e) {
      k.lstm_fwd(e - a, H, g + a * 4 * H, 4 * H, b, cp + a * H, H, c + a * H, H, h + a * H, H);
    });
  });
  return {hy, cy, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_bwd_cpu(
    const c10::optional<at::Tensor>& grad_hy, const c10::optional<at::Tensor>& grad_cy, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& cy,
    const at::Tensor& gates, std::array<bool, 6> mask) {
  const at::NoGradGuard no_grad;  // in-place / out= GEMMs on inputs that may require grad
  const rnn::Dims d = rnn::check_lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates, kDtypes);
  at::Tensor gi, gh, gc, gwi, gwh, gb;
  if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5])) return {gi, gh, gc, gwi, gwh, gb};
  const at::Tensor ghy = opt(grad_hy), gcy = opt(grad_cy), gt = gates.contiguous(), cyc = cy.contiguous(),
                   cxc = cx.contiguous();
  at::Tensor dg = at::empty({d.B, 4 * d.H}, input.options());
  if (mask[2]) gc = at::empty({d.B, d.H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_cell_bwd", [&] {
    using T = scalar_t;
    const auto& k = kern<T>();
    const T *g = gt.const_data_ptr<T>(), *c = cyc.const_data_ptr<T>(), *cp = cxc.const_data_ptr<T>();
    const T *go = ptr_or_null<T>(ghy), *dci = ptr_or_null<T>(gcy);
    T* dco = gc.defined() ? gc.mutable_data_ptr<T>() : nullptr;
    T* dgp = dg.mutable_data_ptr<T>();
    const int64_t H = d.H;
    rows_parallel(d.B, H, 4, [&](int64_t a, int64_t e) {
      k.lstm_bwd(e - a, H, g + a * 4 * H, 4 * H, c + a * H, H, cp + a * H, H, go ? go + a * H : nullptr, H,
                 nullptr, H, dci ? dci + a * H : nullptr, dco ? dco + a * H : nullptr, H, dgp + a * 4 * H, 4 * H);
    });
  });
  if (mask[0]) gi = at::mm(dg, w_ih);
  if (mask[1]) gh = at::mm(dg, w_hh);
  if (mask[3]) gwi = at::mm(dg.t(), input);
  if (mask[4]) gwh = at::mm(dg.t(), hx);
  if (mask[5]) gb = dg.sum(0);
  return {gi, gh, gc, gwi, gwh, gb};
}

std::tuple<at::Tensor, at::Tensor> gru_cell_fwd_cpu(const at::Tensor& input, const at::Tensor& hx,
                                                    const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                    const c10::optional<at::Tensor>& b_ih,
                                                    const c10::optional<at::Tensor>& b_hh) {
  const at::NoGradGuard no_grad;  // in-place / out= GEMMs on inputs that may require grad
  const rnn::Dims d = rnn::check_gru_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh, kDtypes);
  const at::Tensor bhh = opt(b_hh), hxc = hx.contiguous();
  const at::Tensor gx = project(input, w_ih, opt(b_ih));
  const at::Tensor ghh = at::mm(hxc, w_hh.t());
  at::Tensor hy = at::empty({d.B, d.H}, input.options()), ws = at::empty({d.B, 4 * d.H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_cell_fwd", [&] {
    using T = scalar_t;
    const auto& k = kern<T>();
    const T *x = gx.const_data_ptr<T>(), *hh = ghh.const_data_ptr<T>(), *b = ptr_or_null<T>(bhh),
            *hp = hxc.const_data_ptr<T>();
    T *w = ws.mutable_data_ptr<T>(), *h = hy.mutable_data_ptr<T>();
    const int64_t H = d.H;
    rows_parallel(d.B, H, 3, [&](int64_t a, int64_t e) {
      k.gru_fwd(e - a, H, x + a * 3 * H, 3 * H, hh + a * 3 * H, 3 * H, b, hp + a * H, H, w + a * 4 * H, 4 * H,
                h + a * H, H);
    });
  });
  return {hy, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_cell_bwd_cpu(
    const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& ws, std::array<bool, 6> mask) {
  const at::NoGradGuard no_grad;  // in-place / out= GEMMs on inputs that may require grad
  const rnn::Dims d = rnn::check_gru_cell_bwd(grad_hy, input, hx, w_ih, w_hh, ws, kDtypes);
  at::Tensor gi, gh, gwi, gwh, gbi, gbh;
  if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5])) return {gi, gh, gwi, gwh, gbi, gbh};
  const at::Tensor go = grad_hy.contiguous(), hxc = hx.contiguous(), wsc = ws.contiguous();
  at::Tensor dgx = at::empty({d.B, 3 * d.H}, input.options()), dgh = at::empty({d.B, 3 * d.H}, input.options());
  if (mask[1]) gh = at::empty({d.B, d.H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_cell_bwd", [&] {
    using T = scalar_t;
    const auto& k = kern<T>();
    const T *w = wsc.const_data_ptr<T>(), *hp = hxc.const_data_ptr<T>(), *g = go.const_data_ptr<T>();
    T* dho = gh.defined() ? gh.mutable_data_ptr<T>() : nullptr;
    T *dx = dgx.mutable_data_ptr<T>(), *dhh = dgh.mutable_data_ptr<T>();
    const int64_t H = d.H;
    rows_parallel(d.B, H, 3, [&](int64_t a, int64_t e) {
      k.gru_bwd(e - a, H, w + a * 4 * H, 4 * H, hp + a * H, H, g + a * H, H, nullptr, H,
                dho ? dho + a * H : nullptr, H, dx + a * 3 * H, 3 * H, dhh + a * 3 * H, 3 * H);
    });
  });
  if (mask[0]) gi = at::mm(dgx, w_ih);
  if (mask[1]) gh.addmm_(dgh, w_hh);
  if (mask[2]) gwi = at::mm(dgx.t(), input);
  if (mask[3]) gwh = at::mm(dgh.t(), hxc);
  if (mask[4]) gbi = dgx.sum(0);
  if (mask[5]) gbh = dgh.sum(0);
  return {gi, gh, gwi, gwh, gbi, gbh};
}

// ---- whole sequences ---------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_seq_fwd_cpu(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
    const c10::optional<at::Tensor>& b_hh, bool reverse) {
  const at::NoGradGuard no_grad;  // in-place / out= GEMMs on inputs that may require grad
  const Seq s = rnn::check_lstm_seq_fwd(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, kDtypes);
  const int64_t H = s.d.H;
  const at::Tensor h0c = h0.contiguous(), c0c = c0.contiguous(), bhh = opt(b_hh), whh = w_hh.contiguous();
  at::Tensor gates = seq_mm(input, false, w_ih, true, opt(b_ih));  // (N, 4H) contiguous
  at::Tensor output = at::empty({s.N, H}, input.options()), cs = at::empty({s.N, H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_seq_fwd", [&] {
    using T = scalar_t;
    const auto& k = kern<T>();
    T *g = gates.mutable_data_ptr<T>(), *c = cs.mutable_data_ptr<T>(), *h = output.mutable_data_ptr<T>();
    const T *b = ptr_or_null<T>(bhh), *c0p = c0c.const_data_ptr<T>(), *h0p = h0c.const_data_ptr<T>();
    const at::Tensor wp = pack_weight<T>(k, whh, H, 4 * H, 1, H);  // B = W_hh^T (H, 4H)
    const T* bp = wp.const_data_ptr<T>();
    seq_loop(s, reverse, false, row_parts(s, 4), [&](int64_t t, const Seg& sg) {
      const int64_t off = s.offsets[t], m = sg.r1 - sg.r0;
      step_gemm(k, m, H, 4 * H, (sg.from_init ? h0p : h) + sg.src * H, H, bp, g + (off + sg.r0) * 4 * H, 4 * H,
                true);
      const T* cp = (sg.from_init ? c0p : c) + sg.src * H;
      rows_parallel(m, H, 4, [&](int64_t a, int64_t e) {
        const int64_t r = off + sg.r0 + a;
        k.lstm_fwd(e - a, H, g + r * 4 * H, 4 * H, b, cp + a * H, H, c + r * H, H, h + r * H, H);
      });
    }, [](int64_t, int64_t, int64_t) {});
  });
  return {output, final_state(s, output, h0c, reverse), final_state(s, cs, c0c, reverse), gates, cs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_seq_bwd_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_hy,
    const c10::optional<at::Tensor>& grad_cy, const at::Tensor& input, const at::Tensor& batch_sizes,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cs, bool reverse,
    std::array<bool, 6> mask) {
  const at::NoGradGuard no_grad;  // in-place / out= GEMMs on inputs that may require grad
  const Seq s = rnn::check_lstm_seq_bwd(grad_output, grad_hy, grad_cy, input, batch_sizes, h0, c0, w_ih, w_hh,
                                        output, gates, cs, kDtypes);
  at::Tensor gi, gh0, gc0, gwi, gwh, gb;
  if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5])) return {gi, gh0, gc0, gwi, gwh, gb};
  const int64_t H = s.d.H, B = s.d.B;
  const at::Tensor go = opt(grad_output), h0c = h0.contiguous(), c0c = c0.contiguous(), gt = gates.contiguous(),
                   csc = cs.contiguous(), outc = output.contiguous(), whh = w_hh.contiguous();
  // dh, dc: the gradient carried to the previous step ((B, H); grad_h0, grad_c0 at the end)
  at::Tensor dh = grad_hy.has_value() && grad_hy->defined() ? grad_hy->contiguous().clone()
                                                            : at::zeros({B, H}, input.options());
  at::Tensor dc = grad_cy.has_value() && grad_cy->defined() ? grad_cy->contiguous().clone()
                                                            : at::zeros({B, H}, input.options());
  at::Tensor dg = at::empty({s.N, 4 * H}, input.options());
  const int64_t last_t = reverse ? s.T - 1 : 0;  // the step processed last (dh_prev only for grad_h0)
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstm_seq_bwd", [&] {
    using T = scalar_t;
    const auto& k = kern<T>();
    const T *g = gt.const_data_ptr<T>(), *c = csc.const_data_ptr<T>(), *c0p = c0c.const_data_ptr<T>(),
            *gop = ptr_or_null<T>(go);
    T *dhp = dh.mutable_data_ptr<T>(), *dcp = dc.mutable_data_ptr<T>(), *dgp = dg.mutable_data_ptr<T>();
    const at::Tensor wp = pack_weight<T>(k, whh, 4 * H, H, H, 1);  // B = W_hh (4H, H)
    const T* bp = wp.const_data_ptr<T>();
    seq_loop(s, reverse, true, row_parts(s, 4), [&](int64_t t, const Seg& sg) {
      const int64_t off = s.offsets[t];
      const T* cp = (sg.from_init ? c0p : c) + sg.src * H;
      rows_parallel(sg.r1 - sg.r0, H, 4, [&](int64_t a, int64_t e) {
        const int64_t r = sg.r0 + a, row = off + r;
        k.lstm_bwd(e - a, H, g + row * 4 * H, 4 * H, c + row * H, H, cp + a * H, H, gop ? gop + row * H : nullptr,
                   H, dhp + r * H, H, dcp + r * H, dcp + r * H, H, dgp + row * 4 * H, 4 * H);
      });
    }, [&](int64_t t, int64_t a, int64_t e) {  // dh_prev of the active rows [a, e)
      if (t != last_t || mask[1]) step_gemm(k, e - a, 4 * H, H, dgp + (s.offsets[t] + a) * 4 * H, 4 * H, bp,
                                            dhp + a * H, H, false);
    });
  });
  if (mask[0]) gi = seq_mm(dg, false, w_ih, false);
  if (mask[1]) gh0 = dh;
  if (mask[2]) gc0 = dc;
  if (mask[3]) gwi = seq_mm(dg, true, input, false);
  if (mask[4]) gwh = seq_mm(dg, true, prev_states(s, outc, h0c, reverse), false);
  if (mask[5]) gb = dg.sum(0);
  return {gi, gh0, gc0, gwi, gwh, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_seq_fwd_cpu(const at::Tensor& input, const at::Tensor& batch_sizes,
                                                               const at::Tensor& h0, const at::Tensor& w_ih,
                                                               const at::Tensor& w_hh,
                                                               const c10::optional<at::Tensor>& b_ih,
                                                               const c10::optional<at::Tensor>& b_hh, bool reverse) {
  const at::NoGradGuard no_grad;  // in-place / out= GEMMs on inputs that may require grad
  const Seq s = rnn::check_gru_seq_fwd(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, kDtypes);
  const int64_t H = s.d.H;
  const at::Tensor h0c = h0.contiguous(), bhh = opt(b_hh), whh = w_hh.contiguous();
  const at::Tensor gx = seq_mm(input, false, w_ih, true, opt(b_ih));  // (N, 3H)
  at::Tensor ghh = at::empty({s.d.B, 3 * H}, input.options());
  at::Tensor output = at::empty({s.N, H}, input.options()), ws = at::empty({s.N, 4 * H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_seq_fwd", [&] {
    using T = scalar_t;
    const auto& k = kern<T>();
    const T *x = gx.const_data_ptr<T>(), *hh = ghh.const_data_ptr<T>(), *b = ptr_or_null<T>(bhh),
            *h0p = h0c.const_data_ptr<T>();
    T *w = ws.mutable_data_ptr<T>(), *h = output.mutable_data_ptr<T>();
    const at::Tensor wp = pack_weight<T>(k, whh, H, 3 * H, 1, H);  // B = W_hh^T (H, 3H)
    const T* bp = wp.const_data_ptr<T>();
    T* hhw = ghh.mutable_data_ptr<T>();
    seq_loop(s, reverse, false, row_parts(s, 3), [&](int64_t t, const Seg& sg) {
      const int64_t off = s.offsets[t];
      const T* hp = (sg.from_init ? h0p : h) + sg.src * H;
      step_gemm(k, sg.r1 - sg.r0, H, 3 * H, hp, H, bp, hhw + sg.r0 * 3 * H, 3 * H, false);
      rows_parallel(sg.r1 - sg.r0, H, 3, [&](int64_t a, int64_t e) {
        const int64_t r = sg.r0 + a, row = off + r;
        k.gru_fwd(e - a, H, x + row * 3 * H, 3 * H, hh + r * 3 * H, 3 * H, b, hp + a * H, H, w + row * 4 * H, 4 * H,
                  h + row * H, H);
      });
    }, [](int64_t, int64_t, int64_t) {});
  });
  return {output, final_state(s, output, h0c, reverse), ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_seq_bwd_cpu(
    const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_hy, const at::Tensor& input,
    const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& output, const at::Tensor& ws, bool reverse, std::array<bool, 6> mask) {
  const at::NoGradGuard no_grad;  // in-place / out= GEMMs on inputs that may require grad
  const Seq s = rnn::check_gru_seq_bwd(grad_output, grad_hy, input, batch_sizes, h0, w_ih, w_hh, output, ws, kDtypes);
  at::Tensor gi, gh0, gwi, gwh, gbi, gbh;
  if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5])) return {gi, gh0, gwi, gwh, gbi, gbh};
  const int64_t H = s.d.H, B = s.d.B;
  const at::Tensor go = opt(grad_output), h0c = h0.contiguous(), wsc = ws.contiguous(), outc = output.contiguous(),
                   whh = w_hh.contiguous();
  at::Tensor dh = grad_hy.has_value() && grad_hy->defined() ? grad_hy->contiguous().clone()
                                                            : at::zeros({B, H}, input.options());
  at::Tensor dgx = at::empty({s.N, 3 * H}, input.options()), dgh = at::empty({s.N, 3 * H}, input.options());
  const int64_t last_t = reverse ? s.T - 1 : 0;  // the step processed last (dh_prev only for grad_h0)
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "gru_seq_bwd", [&] {
    using T = scalar_t;
    const auto& k = kern<T>();
    const T *w = wsc.const_data_ptr<T>(), *h = outc.const_data_ptr<T>(), *h0p = h0c.const_data_ptr<T>(),
            *gop = ptr_or_null<T>(go);
    T *dhp = dh.mutable_data_ptr<T>(), *dx = dgx.mutable_data_ptr<T>(), *dhh = dgh.mutable_data_ptr<T>();
    const at::Tensor wp = pack_weight<T>(k, whh, 3 * H, H, H, 1);  // B = W_hh (3H, H)
    const T* bp = wp.const_data_ptr<T>();
    seq_loop(s, reverse, true, row_parts(s, 3), [&](int64_t t, const Seg& sg) {
      const int64_t off = s.offsets[t];
      const T* hp = (sg.from_init ? h0p : h) + sg.src * H;
      rows_parallel(sg.r1 - sg.r0, H, 3, [&](int64_t a, int64_t e) {
        const int64_t r = sg.r0 + a, row = off + r;
        k.gru_bwd(e - a, H, w + row * 4 * H, 4 * H, hp + a * H, H, gop ? gop + row * H : nullptr, H, dhp + r * H, H,
                  dhp + r * H, H, dx + row * 3 * H, 3 * H, dhh + row * 3 * H, 3 * H);
      });
    }, [&](int64_t t, int64_t a, int64_t e) {  // dh_prev of the active rows [a, e)
      if (t != last_t || mask[1]) step_gemm(k, e - a, 3 * H, H, dhh + (s.offsets[t] + a) * 3 * H, 3 * H, bp,
                                            dhp + a * H, H, true);
    });
  });
  if (mask[0]) gi = seq_mm(dgx, false, w_ih, false);
  if (mask[1]) gh0 = dh;
  if (mask[2]) gwi = seq_mm(dgx, true, input, false);
  if (mask[3]) gwh = seq_mm(dgh, true, prev_states(s, outc, h0c, reverse), false);
  if (mask[4]) gbi = dgx.sum(0);
  if (mask[5]) gbh = dgh.sum(0);
  return {gi, gh0, gwi, gwh, gbi, gbh};
}

TORCH_LIBRARY_IMPL(pyfastdl, CPU, m) {
  m.impl("lstm_cell_fwd", &lstm_cell_fwd_cpu);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd_cpu);
  m.impl("gru_cell_fwd", &gru_cell_fwd_cpu);
  m.impl("gru_cell_bwd", &gru_cell_bwd_cpu);
  m.impl("lstm_seq_fwd", &lstm_seq_fwd_cpu);
  m.impl("lstm_seq_bwd", &lstm_seq_bwd_cpu);
  m.impl("gru_seq_fwd", &gru_seq_fwd_cpu);
  m.impl("gru_seq_bwd", &gru_seq_bwd_cpu);
}

}  // namespace pyfastdl
