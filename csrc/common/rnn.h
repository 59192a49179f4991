// Argument checks and the packed-sequence layout shared by the CPU and CUDA LSTM/GRU launchers
// (family "rnn"; the schemas and their comments in csrc/ops.cpp are the contract).
// Launchers validate, kernels trust (docs/adding-an-op-family.md, 2): every user-facing check is here,
// each message names the op and the argument, and all of them run before anything is written.
//
// Entry points (one per op; `allowed` lists the dtypes this backend's kernels cover):
//   check_lstm_cell_fwd / check_lstm_cell_bwd / check_gru_cell_fwd / check_gru_cell_bwd -> Dims
//   check_lstm_seq_fwd / check_lstm_seq_bwd / check_gru_seq_fwd / check_gru_seq_bwd     -> Seq
// None of them requires contiguity: launchers call .contiguous() on what they read.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <vector>

namespace pyfastdl {
namespace rnn {

// Sizes of one cell step or one layer-direction. G = 4 (LSTM, gates i, f, g, o) or 3 (GRU, r, z, n).
struct Dims {
  int64_t B = 0;  // batch (rows of hx / h0)
  int64_t I = 0;  // input features
  int64_t H = 0;  // hidden features
  int64_t G = 0;  // gates
};

// The packed layout of a whole sequence (ops.cpp): step t is the rows [offsets[t], offsets[t] +
// sizes[t]) of input/output/gates, sizes non-increasing, offsets[T] = N.
struct Seq {
  Dims d;
  int64_t T = 0;                 // steps
  int64_t N = 0;                 // rows of input = sum(sizes)
  std::vector<int64_t> sizes;    // (T,) batch_sizes
  std::vector<int64_t> offsets;  // (T + 1,) prefix sums of sizes
};

// The accumulation ("opmath") dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// `t` (named `name`) is defined, on input's device, of input's dtype, and of shape `shape`.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input,
                       at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": expected a tensor for ", name, ", got None");
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " on ", input.device(),
              " like input, got ", name, " on ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name, " of dtype ",
              input.scalar_type(), " like input, got ", name, " of dtype ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", name, " of shape ",
              t.sizes());
}

inline void check_optional_like(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                                const at::Tensor& input, at::IntArrayRef shape) {
  if (t.has_value() && t->defined()) check_like(op, name, *t, input, shape);
}

// input (rows, I) of an allowed dtype; w_ih (G*H, I), w_hh (G*H, H), b_ih/b_hh (G*H,) or None, with
// H = hidden.size(1) taken from hx / h0 (`hidden_name`). Returns the sizes (B = hidden.size(0)).
inline Dims check_weights(const char* op, const at::Tensor& input, const at::Tensor& hidden,
                          const char* hidden_name, const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                          int64_t G, std::initializer_list<at::ScalarType> allowed) {
  TORCH_CHECK(input.dim() == 2, op, ": expected input of rank 2, (rows, input_size), got input of shape ",
              input.sizes());
  bool ok = false;
  for (auto t : allowed) ok = ok || input.scalar_type() == t;
  TORCH_CHECK(ok, op, ": input dtype ", input.scalar_type(), " is not supported by this kernel on ",
              input.device().type());
  TORCH_CHECK(hidden.defined() && hidden.dim() == 2, op, ": expected ", hidden_name,
              " of rank 2, (batch, hidden_size), got ", hidden_name, " of shape ",
              hidden.defined() ? hidden.sizes() : at::IntArrayRef{});
  Dims d;
  d.B = hidden.size(0);
  d.H = hidden.size(1);
  d.I = input.size(1);
  d.G = G;
  TORCH_CHECK(w_ih.defined() && w_ih.dim() == 2 && w_ih.size(0) == G * d.H, op, ": expected w_ih of shape (",
              G, " * hidden_size, input_size) = (", G * d.H, ", ", d.I, ") with hidden_size = ", hidden_name,
              ".size(1) = ", d.H, ", got w_ih of shape ", w_ih.defined() ? w_ih.sizes() : at::IntArrayRef{});
  TORCH_CHECK(w_ih.size(1) == d.I, op, ": expected input of shape (rows, ", w_ih.size(1),
              ") to match w_ih of shape ", w_ih.sizes(), " (input_size = w_ih.size(1)), got input of shape ",
              input.sizes());
  check_like(op, "w_ih", w_ih, input, {G * d.H, d.I});
  check_like(op, "w_hh", w_hh, input, {G * d.H, d.H});
  check_optional_like(op, "b_ih", b_ih, input, {G * d.H});
  check_optional_like(op, "b_hh", b_hh, input, {G * d.H});
  TORCH_CHECK(hidden.device() == input.device(), op, ": expected ", hidden_name, " on ", input.device(),
              " like input, got ", hidden_name, " on ", hidden.device());
  TORCH_CHECK(hidden.scalar_type() == input.scalar_type(), op, ": expected ", hidden_name, " of dtype ",
              input.scalar_type(), " like input, got ", hidden_name, " of dtype ", hidden.scalar_type());
  return d;
}

// ---- cells -------------------------------------------------------------------------------------------

inline Dims check_lstm_cell_fwd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                                const at::Tensor& w_ih, const at::Tensor& w_hh,
                                const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                std::initializer_list<at::ScalarType> allowed) {
  const char* op = "lstm_cell_fwd";
  Dims d = check_weights(op, input, hx, "hx", w_ih, w_hh, b_ih, b_hh, 4, allowed);
  TORCH_CHECK(input.size(0) == d.B, op, ": expected input of shape (batch, input_size) with batch = hx.size(0) = ",
              d.B, ", got input of shape ", input.sizes());
  check_like(op, "cx", cx, input, {d.B, d.H});
  return d;
}

inline Dims check_lstm_cell_bwd(const c10::optional<at::Tensor>& grad_hy, const c10::optional<at::Tensor>& grad_cy,
                                const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
                                const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& cy,
                                const at::Tensor& gates, std::initializer_list<at::ScalarType> allowed) {
  const char* op = "lstm_cell_bwd";
  Dims d = check_weights(op, input, hx, "hx", w_ih, w_hh, c10::nullopt, c10::nullopt, 4, allowed);
  TORCH_CHECK(input.size(0) == d.B, op, ": expected input of shape (batch, input_size) with batch = hx.size(0) = ",
              d.B, ", got input of shape ", input.sizes());
  check_like(op, "cx", cx, input, {d.B, d.H});
  check_like(op, "cy", cy, input, {d.B, d.H});
  check_like(op, "gates", gates, input, {d.B, 4 * d.H});
  check_optional_like(op, "grad_hy", grad_hy, input, {d.B, d.H});
  check_optional_like(op, "grad_cy", grad_cy, input, {d.B, d.H});
  return d;
}

inline Dims check_gru_cell_fwd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                               const c10::optional<at::Tensor>& b_hh, std::initializer_list<at::ScalarType> allowed) {
  const char* op = "gru_cell_fwd";
  Dims d = check_weights(op, input, hx, "hx", w_ih, w_hh, b_ih, b_hh, 3, allowed);
  TORCH_CHECK(input.size(0) == d.B, op, ": expected input of shape (batch, input_size) with batch = hx.size(0) = ",
              d.B, ", got input of shape ", input.sizes());
  return d;
}

inline Dims check_gru_cell_bwd(const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws,
                               std::initializer_list<at::ScalarType> allowed) {
  const char* op = "gru_cell_bwd";
  Dims d = check_weights(op, input, hx, "hx", w_ih, w_hh, c10::nullopt, c10::nullopt, 3, allowed);
  TORCH_CHECK(input.size(0) == d.B, op, ": expected input of shape (batch, input_size) with batch = hx.size(0) = ",
              d.B, ", got input of shape ", input.sizes());
  check_like(op, "ws", ws, input, {d.B, 4 * d.H});
  check_like(op, "grad_hy", grad_hy, input, {d.B, d.H});
  return d;
}

// ---- whole sequences ---------------------------------------------------------------------------------

// batch_sizes: int64 (T,) on the CPU, each entry in [0, B], non-increasing, summing to input.size(0);
// B = h0.size(0) must equal batch_sizes[0] when T > 0 (T = 0 needs N = 0 and takes any B).
inline Seq check_batch_sizes(const char* op, const at::Tensor& batch_sizes, const at::Tensor& input, Dims d) {
  TORCH_CHECK(batch_sizes.device().is_cpu(), op, ": expected batch_sizes on the CPU (as PackedSequence keeps it), "
              "got batch_sizes on ", batch_sizes.device());
  TORCH_CHECK(batch_sizes.scalar_type() == at::kLong, op, ": expected batch_sizes of dtype int64, got ",
              batch_sizes.scalar_type());
  TORCH_CHECK(batch_sizes.dim() == 1, op, ": expected batch_sizes of rank 1, (T,), got batch_sizes of shape ",
              batch_sizes.sizes());
  Seq s;
  s.d = d;
  s.T = batch_sizes.size(0);
  s.sizes.resize(s.T);
  s.offsets.resize(s.T + 1);
  const at::Tensor bs = batch_sizes.contiguous();
  const int64_t* p = bs.const_data_ptr<int64_t>();
  int64_t sum = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    const int64_t b = p[t];
    TORCH_CHECK(b >= 0, op, ": expected batch_sizes >= 0, got batch_sizes[", t, "] = ", b);
    TORCH_CHECK(t == 0 || b <= p[t - 1], op, ": expected non-increasing batch_sizes (sequences sorted by "
                "decreasing length), got batch_sizes[", t - 1, "] = ", p[t - 1], " < batch_sizes[", t, "] = ", b);
    s.sizes[t] = b;
    s.offsets[t] = sum;
    sum += b;
  }
  s.offsets[s.T] = sum;
  s.N = sum;
  TORCH_CHECK(input.size(0) == sum, op, ": expected input of shape (sum(batch_sizes), input_size) = (", sum, ", ",
              d.I, "), got input of shape ", input.sizes());
  TORCH_CHECK(s.T == 0 || p[0] == d.B, op, ": expected h0 of shape (batch_sizes[0], hidden_size) = (",
              s.T ? p[0] : 0, ", ", d.H, "), got h0 of shape (", d.B, ", ", d.H, ")");
  return s;
}

inline Seq check_lstm_seq_fwd(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                              const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                              const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                              std::initializer_list<at::ScalarType> allowed) {
  const char* op = "lstm_seq_fwd";
  Dims d = check_weights(op, input, h0, "h0", w_ih, w_hh, b_ih, b_hh, 4, allowed);
  check_like(op, "c0", c0, input, {d.B, d.H});
  return check_batch_sizes(op, batch_sizes, input, d);
}

inline Seq check_lstm_seq_bwd(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_hy,
                              const c10::optional<at::Tensor>& grad_cy, const at::Tensor& input,
                              const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                              const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
                              const at::Tensor& gates, const at::Tensor& cs,
                              std::initializer_list<at::ScalarType> allowed) {
  const char* op = "lstm_seq_bwd";
  Dims d = check_weights(op, input, h0, "h0", w_ih, w_hh, c10::nullopt, c10::nullopt, 4, allowed);
  check_like(op, "c0", c0, input, {d.B, d.H});
  Seq s = check_batch_sizes(op, batch_sizes, input, d);
  check_like(op, "output", output, input, {s.N, d.H});
  check_like(op, "gates", gates, input, {s.N, 4 * d.H});
  check_like(op, "cs", cs, input, {s.N, d.H});
  check_optional_like(op, "grad_output", grad_output, input, {s.N, d.H});
  check_optional_like(op, "grad_hy", grad_hy, input, {d.B, d.H});
  check_optional_like(op, "grad_cy", grad_cy, input, {d.B, d.H});
  return s;
}

inline Seq check_gru_seq_fwd(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                             const at::Tensor& w_ih, const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                             const c10::optional<at::Tensor>& b_hh, std::initializer_list<at::ScalarType> allowed) {
  const char* op = "gru_seq_fwd";
  Dims d = check_weights(op, input, h0, "h0", w_ih, w_hh, b_ih, b_hh, 3, allowed);
  return check_batch_sizes(op, batch_sizes, input, d);
}

inline Seq check_gru_seq_bwd(const c10::optional<at::Tensor>& grad_output, const c10::optional<at::Tensor>& grad_hy,
                             const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                             const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output,
                             const at::Tensor& ws, std::initializer_list<at::ScalarType> allowed) {
  const char* op = "gru_seq_bwd";
  Dims d = check_weights(op, input, h0, "h0", w_ih, w_hh, c10::nullopt, c10::nullopt, 3, allowed);
  Seq s = check_batch_sizes(op, batch_sizes, input, d);
  check_like(op, "output", output, input, {s.N, d.H});
  check_like(op, "ws", ws, input, {s.N, 4 * d.H});
  check_optional_like(op, "grad_output", grad_output, input, {s.N, d.H});
  check_optional_like(op, "grad_hy", grad_hy, input, {d.B, d.H});
  return s;
}

}  // namespace rnn
}  // namespace pyfastdl
