// Every pyfastdl op's schema, in one place (docs/adding-an-op-family.md, 1: the schema is the contract).
//
// Implementations register elsewhere: csrc/cpu/<family>.cpp under CPU, csrc/cuda/<family>.cu under
// CUDA. Fake (meta) implementations live in pyfastdl/autograd/<family>.py (the optimizers': pyfastdl/optim/_lists.py). The Triton kernels have their own
// namespace, pyfastdl_triton::, with the same schemas (triton_kernels/<family>.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pyfastdl, m) {
  // ---- batch norm -------------------------------------------------------------------------------
  // input: (N, C, *) of any rank >= 2 ((N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W), ...);
  // contiguous or channels_last(_3d).
  // weight, bias: (C,) or None (None = 1 and 0). running_mean, running_var: (C,) or None, updated in
  // place when training: r = (1 - momentum) * r + momentum * batch_stat, the variance unbiased
  // (n / (n - 1)), n = numel / C. Eval (training=false) normalizes with the running statistics.
  // activation, applied in the epilogue: 0 none, 1 ReLU max(y, 0), 2 sigmoid 1 / (1 + exp(-y)) (the
  // layers the notes put after a batch norm); anything else is refused.
  // Returns (output [input's shape and memory format], save_mean (C,), save_invstd (C,)); the saved
  // statistics are in the accumulation dtype (float32, or float64 for float64 input): the batch mean
  // and 1/sqrt(biased var + eps) in training, the running ones in eval.
  m.def(
      "batch_norm_fwd(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, int activation) "
      "-> (Tensor, Tensor, Tensor)");
  // Backward of batch_norm_fwd. With an activation, its input y is recomputed from input with the
  // forward's formula, y = (input - save_mean) * weight * save_invstd + bias, and grad_out is zeroed
  // where y <= 0 (ReLU) or multiplied by s (1 - s), s = sigmoid(y) (sigmoid). (Each backend's
  // forward centres x on the batch mean held to twice the accumulation precision -- save_mean plus
  // its rounding error --, so that a channel with |mean| >> std normalizes accurately; the backward,
  // which has only save_mean, may differ from the forward's ReLU mask only where |y| is below that
  // rounding error times the scale, and in its sigmoid by that rounding error.)
  // output_mask = which of (grad_input, grad_weight, grad_bias) to compute (ctx.needs_input_grad);
  // an output not asked for is not computed and is returned undefined (None in Python). In eval,
  // grad_input = grad_out * weight * save_invstd (x only enters the activation's derivative): finite
  // for a non-finite x, as torch, except a NaN x through the sigmoid (NaN, as torch's sigmoid).
  // Returns (grad_input [input's shape and memory format], grad_weight (C,), grad_bias (C,)), the
  // last two in the accumulation dtype.
  m.def(
      "batch_norm_bwd(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor save_mean, "
      "Tensor save_invstd, bool training, int activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // batch_norm_fwd's output, differentiable: its derivative (batch_norm_bwd) is registered in C++
  // under the Autograd key (csrc/cpu/batch_norm_autograd.cpp), so the C++ backends run a
  // forward+backward without Python. Arguments and output as batch_norm_fwd.
  m.def(
      "batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, int activation) -> Tensor");
  // batch_norm_bwd's results as differentiable functions of (grad_out, input, weight, bias), for
  // backward(create_graph=True) through pyfastdl::batch_norm (double backward, gradient penalties):
  // implemented in Python as CompositeImplicitAutograd (pyfastdl/autograd/batch_norm.py: the
  // reference math, differentiated by autograd with create_graph). Outputs not in output_mask are
  // returned empty (0,).
  m.def(
      "batch_norm_bwd_graph(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor save_mean, "
      "Tensor save_invstd, bool training, float eps, int activation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- fused optimizers (one multi-tensor step per call) ---------------------------------------
  // Each op applies one step of torch.optim.<X>(foreach=False)'s update rule to every tensor of the
  // lists, in place. List i of every argument describes parameter i: params[i], grads[i] and the
  // state tensors have params[i]'s shape; all params share one device and dtype. Dtypes: params and
  // grads float32/float64 (CPU), float32/float16/bfloat16 (CUDA, Triton); state tensors float32 for
  // float16/bfloat16 params, the param's dtype otherwise. Any strides: the kernels run over the
  // flattened elements when param, grad and state share strides and are dense, and over dense
  // copies (written back) otherwise.
  // state_steps: one 0-dim float32/float64 tensor per param (torch's state["step"]) on the CPU or
  // on the params' device; the op adds 1 to each and uses the new value (bias corrections, lr decay)
  // of that param.
  // grad_scale, found_inf: 1-element float32 tensors on the params' device, as torch.amp.GradScaler
  // gives fused optimizers. found_inf != 0: nothing at all is written (params, state, steps).
  // Otherwise each gradient is divided by grad_scale before use (grads themselves stay read-only;
  // torch's fused kernels write the unscaled gradient back, these do not).
  // lr and the other hyper-parameters are Python floats; checks on their ranges are the
  // optimizers' constructors' (torch's).

  // SGD: g = (maximize ? -grad : grad) + weight_decay * p; with momentum != 0,
  // buf = first_step ? g : momentum * buf + (1 - dampening) * g, and g = nesterov ? g + momentum * buf
  // : buf; then p -= lr * g. momentum_buffers: empty when momentum == 0; with first_step=true their
  // content is ignored (torch's buffer created by clone(g)).
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step, Tensor? grad_scale, Tensor? found_inf) -> ()");
  // Adam / AdamW (decoupled_weight_decay=true: p *= 1 - lr * weight_decay instead of adding
  // weight_decay * p to g). t = step after the increment, m = lerp(m, g, 1 - beta1),
  // v = beta2 * v + (1 - beta2) * g * g, vmax = max(vmax, v) with amsgrad (max_exp_avg_sqs empty
  // otherwise), p -= lr / (1 - beta1^t) * m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps).
  // master_params: empty, or one float32 tensor per float16/bfloat16 param, a master copy that is
  // updated in float32 and rounded into params (the params' own values are then not read).
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor(f!)[] master_params, float lr, "
      "float beta1, float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, "
      "bool decoupled_weight_decay, Tensor? grad_scale, Tensor? found_inf) -> ()");
  // Adagrad: clr = lr / (1 + (t - 1) * lr_decay), sum += g * g, p -= clr * g / (sqrt(sum) + eps).
  m.def(
      "adagrad_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state_sums, "
      "Tensor(c!)[] state_steps, float lr, float lr_decay, float weight_decay, float eps, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");
  // RMSprop: sq = alpha * sq + (1 - alpha) * g * g; centered: ga = lerp(ga, g, 1 - alpha),
  // avg = sqrt(sq - ga * ga) + eps, else avg = sqrt(sq) + eps; momentum > 0: buf = momentum * buf +
  // g / avg, p -= lr * buf; else p -= lr * g / avg. grad_avgs empty unless centered,
  // momentum_buffers empty unless momentum > 0.
  m.def(
      "rmsprop_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs, "
      "Tensor(d!)[] momentum_buffers, Tensor(e!)[] state_steps, float lr, float alpha, float eps, "
      "float weight_decay, float momentum, bool centered, bool maximize, Tensor? grad_scale, "
      "Tensor? found_inf) -> ()");
  // Adadelta: sq = rho * sq + (1 - rho) * g * g, delta = sqrt(acc + eps) / sqrt(sq + eps) * g,
  // acc = rho * acc + (1 - rho) * delta * delta, p -= lr * delta.
  m.def(
      "adadelta_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] acc_deltas, "
      "Tensor(d!)[] state_steps, float lr, float rho, float eps, float weight_decay, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");

  // ---- scaled dot-product attention --------------------------------------------------------------
  // The contract (shapes, masks, valid_lens, fully masked rows, Philox dropout, lse) is spelled out in
  // csrc/common/attention.h.
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? valid_lens, bool is_causal, "
      "float scale, float dropout_p, int seed, int offset) -> (Tensor, Tensor)");
  // attention_fwd's output (offset 0), differentiable in q, k, v and a floating-point attn_mask: its
  // derivative (attention_bwd) is registered in C++ under the Autograd key
  // (csrc/cpu/attention_autograd.cpp), so the C++ backends run a forward+backward without Python.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? valid_lens, bool is_causal, "
      "float scale, float dropout_p, int seed) -> Tensor");
  // attention_bwd's gradients (grad_q, grad_k, grad_v, grad_attn_mask) as differentiable functions of
  // (grad_out, q, k, v, attn_mask), for backward(create_graph=True) through pyfastdl::attention:
  // implemented in Python as CompositeImplicitAutograd (pyfastdl/autograd/attention.py: the reference
  // math differentiated by autograd; dropout_p > 0 raises). Outputs not in output_mask are empty (0,).
  m.def(
      "attention_bwd_graph(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? valid_lens, "
      "bool is_causal, float scale, float dropout_p, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
      "Tensor? valid_lens, bool is_causal, float scale, float dropout_p, int seed, int offset, "
      "bool[4] output_mask=[True, True, True, False]) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- conv2d ------------------------------------------------------------------------------------
  // input (N, C_in, H, W), contiguous (NCHW) or channels_last (any other strides: the launcher makes
  // it contiguous); weight (C_out, C_in / groups, kH, kW); bias (C_out,) or None. groups divides C_in
  // and C_out. stride = (sh, sw) >= 1, dilation = (dh, dw) >= 1, padding = (top, bottom, left, right)
  // >= 0 of zeros (asymmetric, so padding='same' with an even effective kernel needs no copy).
  // H_out = (H + top + bottom - dh * (kH - 1) - 1) / sh + 1 (likewise W_out), both >= 1.
  // Returns the output (N, C_out, H_out, W_out) in input's memory format (channels_last in,
  // channels_last out), in input's dtype, accumulated in float32 (float64 for float64).
  m.def(
      "conv2d_fwd(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups) -> Tensor");
  // Backward of conv2d_fwd. output_mask = which of (grad_input, grad_weight, grad_bias) to compute; an
  // output not asked for is returned undefined (None in Python). grad_input has input's shape and
  // memory format, grad_weight weight's shape (contiguous), grad_bias (C_out,); all in input's dtype.
  m.def(
      "conv2d_bwd(Tensor grad_out, Tensor input, Tensor weight, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // conv2d_fwd with its derivative (conv2d_bwd) registered in C++ under the Autograd key
  // (csrc/cpu/conv2d_autograd.cpp), for the per-call path of the cpu and cuda backends: a
  // forward+backward runs no Python after the call. Same arguments and result as conv2d_fwd.
  m.def(
      "conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups) -> Tensor");
  // (grad_input, grad_weight, grad_bias) as differentiable functions of (grad_out, input, weight), for
  // backward(create_graph=True) through pyfastdl::conv2d: CompositeImplicitAutograd in Python
  // (pyfastdl/autograd/conv2d.py: the reference math differentiated by autograd).
  m.def(
      "conv2d_bwd_graph(Tensor grad_out, Tensor input, Tensor weight, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // ---- LSTM and GRU (family "rnn") ---------------------------------------------------------------
  // Gate order is torch's: LSTM (i, f, g, o), GRU (r, z, n). w_ih (G*H, I), w_hh (G*H, H), b_ih and
  // b_hh (G*H,) or None (zero), G = 4 (LSTM) or 3 (GRU). All tensors on one device, one dtype
  // (float32/float64 on the CPU; float32/float16/bfloat16 on CUDA and Triton), accumulation in
  // float32 (float64 for float64).
  //
  // Cells: one step, both GEMMs inside the op. input (B, I), hx and cx (B, H).
  // LSTM: gates = input @ w_ih^T + b_ih + hx @ w_hh^T + b_hh; i, f, o = sigmoid, g = tanh;
  // cy = f * cx + i * g, hy = o * tanh(cy). Returns (hy, cy, gates): gates (B, 4H) holds the activated
  // (i, f, g, o), saved for the backward.
  m.def(
      "lstm_cell_fwd(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor, Tensor, Tensor)");
  // grad_hy, grad_cy: (B, H) or None (= zero). output_mask = which of (input, hx, cx, w_ih, w_hh,
  // bias) get a gradient; the rest are returned undefined. grad_bias (4H,) is the gradient of b_ih and
  // of b_hh alike.
  m.def(
      "lstm_cell_bwd(Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor hx, Tensor cx, Tensor w_ih, "
      "Tensor w_hh, Tensor cy, Tensor gates, bool[6] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // GRU: r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr), z likewise, hn = h W_hn^T + b_hn,
  // n = tanh(x W_in^T + b_in + r * hn), hy = (1 - z) * n + z * hx. Returns (hy, ws): ws (B, 4H) holds
  // (r, z, n, hn), saved for the backward.
  m.def(
      "gru_cell_fwd(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) "
      "-> (Tensor, Tensor)");
  // output_mask = which of (input, hx, w_ih, w_hh, b_ih, b_hh) get a gradient (b_ih and b_hh differ
  // in the n gate).
  m.def(
      "gru_cell_bwd(Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor ws, "
      "bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  //
  // Whole sequences: one layer, one direction, the time loop inside the op. The layout is
  // PackedSequence's: input (N, I) holds the steps one after another, step t being the
  // batch_sizes[t] rows starting at sum(batch_sizes[:t]); batch_sizes is a non-increasing int64 tensor
  // (T,) on the CPU, whatever the device of the data. A padded (T, B, I) input is the same with
  // batch_sizes = [B] * T and input viewed as (T * B, I). h0, c0: (B, H), B = batch_sizes[0]; row b
  // is active at the steps t with b < batch_sizes[t] (a prefix of the steps). Steps past a row's
  // length are not computed.
  // reverse=false runs t = 0 .. T-1; reverse=true runs t = T-1 .. 0, each row starting from its own
  // last step with h0[b] (and c0[b]).
  // hy, cy (B, H): each row's state after its last processed step.
  // LSTM returns (output (N, H), hy, cy, gates (N, 4H) activated (i, f, g, o), cs (N, H) the cell
  // state after each step).
  m.def(
      "lstm_seq_fwd(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad_output (N, H), grad_hy, grad_cy (B, H): None = zero. output_mask = which of (input, h0, c0,
  // w_ih, w_hh, bias) get a gradient; grad_bias (4H,) is the gradient of b_ih and of b_hh alike. The
  // weight gradients are accumulated over all steps as GEMMs.
  m.def(
      "lstm_seq_bwd(Tensor? grad_output, Tensor? grad_hy, Tensor? grad_cy, Tensor input, Tensor batch_sizes, "
      "Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor output, Tensor gates, Tensor cs, "
      "bool reverse, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // GRU returns (output (N, H), hy, ws (N, 4H) = (r, z, n, hn) of each step).
  m.def(
      "gru_seq_fwd(Tensor input, Tensor batch_sizes, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, bool reverse) -> (Tensor, Tensor, Tensor)");
  // output_mask = which of (input, h0, w_ih, w_hh, b_ih, b_hh) get a gradient.
  m.def(
      "gru_seq_bwd(Tensor? grad_output, Tensor? grad_hy, Tensor input, Tensor batch_sizes, Tensor h0, "
      "Tensor w_ih, Tensor w_hh, Tensor output, Tensor ws, bool reverse, bool[6] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- sync batch norm (pyfastdl.nn.SyncBatchNorm: statistics combined over a process group) -----
  // The forward's normalization and the backward's two per-channel sums are batch_norm_fwd (eval, the
  // global statistics as running_*) and batch_norm_bwd (eval, output_mask [false, true, true]:
  // grad_bias = sum(dy), grad_weight = sum(dy * xhat)); these two ops add what batch norm lacks.
  // input: (N, C, *) of any rank >= 2, contiguous or channels_last(_3d) (other strides are copied).
  // Returns (mean (C,), m2 (C,)), both float64 whatever input's dtype: this rank's per-channel batch
  // mean and the sum of squared deviations from it, sum((x - mean)^2) (Welford's M2), over the
  // n = numel / C elements of the channel (n = 0: mean 0, m2 0). Ranks combine (n, mean, m2) exactly
  // (Chan et al.'s parallel formula), so no variance is recovered from an invstd.
  m.def("sync_batch_norm_stats(Tensor input) -> (Tensor, Tensor)");
  // grad_input of batch norm in training from the sums over every rank (the backward's elementwise pass):
  //   grad_input = weight * invstd * (grad_out - sum_dy / count - (input - mean) * invstd * sum_dy_xhat / count)
  // grad_out, input: (N, C, *) of one shape and dtype; weight: (C,) or None (= 1); mean, invstd,
  // sum_dy, sum_dy_xhat: (C,) in the accumulation dtype (float32, float64 for float64 input): the
  // global statistics the forward normalized with and the all-reduced sum(dy), sum(dy * xhat);
  // count >= 1: the elements per channel over all ranks. Returns grad_input in input's layout.
  m.def(
      "sync_batch_norm_bwd_elemt(Tensor grad_out, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
      "Tensor sum_dy, Tensor sum_dy_xhat, int count) -> Tensor");
}

// ---- build information (python -m pyfastdl info) ---------------------------------------------------
#include "cpu/capability.h"

namespace {
std::string build_info() {
  return std::string("cpu_capability=") + pyfastdl::cpu::capability_name(pyfastdl::cpu::capability()) +
         ";cpu_best=" + pyfastdl::cpu::capability_name(pyfastdl::cpu::detect_capability()) +
         ";cpu_avx512_bf16=" + (pyfastdl::cpu::cpu_has_avx512_bf16() ? "1" : "0") +
         ";cuda=" + (PYFASTDL_WITH_CUDA ? "1" : "0") + ";cuda_archs=" + PYFASTDL_CUDA_ARCHS;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(pyfastdl, m) {
  m.def("build_info() -> str", &build_info);
}

// `import pyfastdl._C` loads this library, whose static initializers register the ops above; the
// module itself is empty (the ops are reached through torch.ops.pyfastdl).
extern PyMethodDef pyfastdl_percall_methods[];  // csrc/cpu/percall.cpp: direct entries of the per-call path

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, pyfastdl_percall_methods};
  return PyModule_Create(&module_def);
}

// ---- conv2d CPU algorithm switch (tests, benchmark): csrc/cpu/conv2d_winograd_kernel.h ---------------
#include "cpu/conv2d_winograd_kernel.h"

TORCH_LIBRARY_FRAGMENT(pyfastdl, m) {
  // mode "auto" | "direct" | "winograd" sets the CPU conv2d algorithm and returns the previous mode;
  // "" returns the mode; "last" returns "fwd=<algo>;bwd_input=<algo>" of the last CPU conv2d calls.
  m.def("conv2d_cpu_algo(str mode) -> str", &pyfastdl::cpu::conv2d_cpu_algo);
}

// ---- attention CPU block-product switch (tests, benchmark): csrc/cpu/attention_gemm.cpp ------------
namespace pyfastdl {
namespace cpu {
std::string attention_cpu_gemm(c10::string_view mode);
}  // namespace cpu
}  // namespace pyfastdl

TORCH_LIBRARY_FRAGMENT(pyfastdl, m) {
  // mode "auto" | "own" | "blas" sets the float32 block product of the CPU flash attention (own SIMD
  // micro-kernel or one BLAS sgemm per block) and returns the previous mode; "" returns the mode;
  // "last" returns "fwd=<own|blas>;bwd=<own|blas>" of the last CPU attention calls.
  m.def("attention_cpu_gemm(str mode) -> str", &pyfastdl::cpu::attention_cpu_gemm);
}

// ---- LSTM/GRU CPU whole-sequence GEMM switch (tests, benchmark): csrc/cpu/rnn.cpp ----------------------
namespace pyfastdl {
namespace cpu {
std::string rnn_cpu_gemm(c10::string_view mode);
}  // namespace cpu
}  // namespace pyfastdl

TORCH_LIBRARY_FRAGMENT(pyfastdl, m) {
  // mode "auto" | "own" | "blas" sets the whole-sequence GEMMs of the CPU LSTM/GRU (input projection,
  // grad_input, weight gradients: the packed micro-kernel or ATen's BLAS) and returns the previous mode;
  // "" returns the mode; "last" returns "own" / "blas" of the last such GEMM ("none" before any).
  m.def("rnn_cpu_gemm(str mode) -> str", &pyfastdl::cpu::rnn_cpu_gemm);
}

// ---- 2-D pooling (family "pool2d") -------------------------------------------------------------------
// input (N, C, H, W): N >= 0, C, H, W >= 1 (the functional takes unbatched (C, H, W) and adds N = 1);
// float32/float64 on the CPU, float32/float64/float16/bfloat16 on CUDA; contiguous (NCHW) or
// channels_last (other strides are copied into input.suggest_memory_format()). Outputs are in that
// memory format (torch's rule), input's dtype.
// kernel_size (kH, kW) >= 1, stride (sH, sW) >= 1 (the functional's default: kernel_size),
// padding (pH, pW) >= 0 on both sides, pH <= kH / 2 and <= half the dilated kernel (likewise pW),
// dilation (dH, dW) >= 1. H_out = floor((H + 2 pH - dH (kH - 1) - 1 + (ceil_mode ? sH - 1 : 0)) / sH) + 1,
// minus 1 when ceil_mode and (H_out - 1) sH >= H + pH (the last window starts in the input or its left
// padding); likewise W_out; both >= 1. torch's semantics throughout (errors name the argument).
TORCH_LIBRARY_FRAGMENT(pyfastdl, m) {
  // Max over each window; padding never wins (it is -inf). A NaN in a window gives NaN. Returns
  // (output (N, C, H_out, W_out), indices (N, C, H_out, W_out) int64 or undefined when !need_indices):
  // index = ih * W + iw within the (H, W) plane of the first maximum in window order (kh outer, kw inner),
  // the last NaN when the window holds NaN -- torch's index and tie rule.
  m.def(
      "max_pool2d_fwd(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode, bool need_indices) -> (Tensor, Tensor)");
  // Backward of max_pool2d_fwd: grad_input (input's shape, the forward output's memory format), zero
  // except grad_input[n, c].flat[indices[n, c, i]] += grad_out[n, c, i], added in output order.
  // input is read for its shape and memory format only. indices as max_pool2d_fwd gives them: each in
  // its output's window (the CUDA and Triton kernels gather over the windows, so an index outside its
  // window would not be counted there).
  m.def(
      "max_pool2d_bwd(Tensor grad_out, Tensor input, Tensor indices, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
  // Mean over each window: the sum of the window's elements inside the input (row-major order, as
  // torch) divided by divisor_override when given (!= 0), else by the window's size clipped to the
  // padded input (count_include_pad) or to the input. A window with no element in the input gives 0.
  // Returns (N, C, H_out, W_out). (No dilation: torch's avg_pool2d has none.)
  m.def(
      "avg_pool2d_fwd(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
      "bool count_include_pad, int? divisor_override) -> Tensor");
  // Backward of avg_pool2d_fwd: grad_input (input's shape and the output's memory format),
  // grad_input[window of o] += grad_out[o] / divisor(o) for each output o in order. input is read for
  // its shape and memory format only.
  m.def(
      "avg_pool2d_bwd(Tensor grad_out, Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
  // max_pool2d_fwd (the output only) and avg_pool2d_fwd with their derivatives registered in C++
  // under the Autograd key (csrc/cpu/pool2d_autograd.cpp), for the per-call path of the cpu and cuda
  // backends: a forward+backward runs no Python after the call. Same arguments and result as the
  // forwards.
  m.def(
      "max_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
      "bool ceil_mode) -> Tensor");
  m.def(
      "avg_pool2d(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
      "bool count_include_pad, int? divisor_override) -> Tensor");
  // The backwards as differentiable functions of grad_out, for backward(create_graph=True) through
  // pyfastdl::max_pool2d / avg_pool2d: CompositeImplicitAutograd in Python (pyfastdl/autograd/pool2d.py).
  m.def(
      "max_pool2d_bwd_graph(Tensor grad_out, Tensor input, Tensor indices, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, bool ceil_mode) -> Tensor");
  m.def(
      "avg_pool2d_bwd_graph(Tensor grad_out, Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor");
}
