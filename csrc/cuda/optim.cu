// Fused multi-tensor optimizer steps on CUDA (SGD, Adam/AdamW, Adagrad, RMSprop, Adadelta), registered
// under the CUDA dispatch key; schemas and update rules in csrc/ops.cpp, argument checks in
// common/optim.h.
//
// Multi-tensor apply: each tensor is cut into chunks of kChunk elements and every chunk is one thread
// block. The tensors' pointers, sizes and steps travel in the kernel's arguments (ListArgs, under
// 4 KiB), up to ListArgs<D>::kMaxTensors tensors a launch; longer lists take several launches. A
// block finds its tensor by a walk over the launch's cumulative chunk counts (chunk_end), so one
// launch covers its tensors whatever their sizes (no per-block table, no block limit).
// Inside a chunk, threads take kILP consecutive elements at a time with one vector load per list
// when every pointer of the tensor is aligned to kILP elements; the last chunk's < kILP leftover
// elements, and unaligned tensors (views at odd offsets), take the scalar path.
//
// Steps: a step on the device is read by the kernel, which uses step + 1 (as torch adds 1 to the
// step tensor before using it) to compute the tensor's constants (bias corrections, lr decay) in
// float64, like torch's Python code; a separate one-block kernel adds 1 to the device steps after
// the main launches, so no block reads a step another has already advanced. Steps on the CPU are
// advanced on the host and their new values travel in the arguments.
//
// found_inf (device, 1 element): every block of every kernel reads it and writes nothing when it is
// nonzero, so a skipped step costs no host sync. The one exception: with steps on the CPU, found_inf
// is read on the host (a sync) to decide whether to advance them.
//
// Numerics: element math in at::opmath_type<scalar_t> (float32 for float16/bfloat16/float32 params,
// float64 for float64), state tensors in that same type; hyper-parameters are rounded to it from the
// float64 values torch's Python code would compute (1 - beta1, lr / bias_correction1, ...).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/optim.h"
#include "common.cuh"

namespace pyfastdl {
namespace {

using namespace cuda_common;  // sqrt_acc (common.cuh)

constexpr int kThreads = 256;                       // threads of every block
constexpr int kILP = 4;                             // elements a thread takes at a time
constexpr int kChunk = 16 * kThreads * kILP;        // elements a block: 16 vector steps a thread
constexpr int kArgBytes = 3584;                     // ListArgs budget within CUDA's 4 KiB of arguments
constexpr int kMaxSteps = kThreads;                 // device steps advanced per increment launch
constexpr int64_t kMaxGrid = std::numeric_limits<int32_t>::max();

// ---- kernel arguments -------------------------------------------------------------------------------

// One launch's tensors. List d of tensor t starts at ptr[d][t] (null: the list is absent); lists 0
// (params) and 1 (grads) hold scalar_t, the others (state, master params) opmath_type<scalar_t>.
template <int D>
struct ListArgs {
  static constexpr int kMaxTensors = kArgBytes / (8 * D + 8 + 8 + 8 + 4 + 1);
  void* ptr[D][kMaxTensors];            // (D, tensors): flat, dense, numel[t] elements each
  int64_t numel[kMaxTensors];           // elements of tensor t (> 0)
  const void* step_ptr[kMaxTensors];    // the tensor's step on the device (0-dim), or null
  double step_host[kMaxTensors];        // the new step when step_ptr is null (CPU steps)
  int32_t chunk_end[kMaxTensors];       // blocks [chunk_end[t-1], chunk_end[t]) are tensor t's chunks
  uint8_t step_double[kMaxTensors];     // step_ptr points to a double (else a float)
  int n;                                // tensors in this launch
};

// Device steps to advance by 1.
struct StepArgs {
  void* ptr[kMaxSteps];        // 0-dim float or double on the device
  uint8_t is_double[kMaxSteps];
  int n;
};

// ---- device helpers -------------------------------------------------------------------------------

// torch's lerp (ATen/native/Lerp.h): self + w * (end - self) for |w| < 0.5, else
// end - (end - self) * (1 - w).
template <typename acc_t>
__device__ __forceinline__ acc_t lerp_acc(acc_t self, acc_t end, acc_t w) {
  return (w < acc_t(0.5) && w > acc_t(-0.5)) ? self + w * (end - self) : end - (end - self) * (acc_t(1) - w);
}

// torch.maximum: NaN in either argument gives NaN.
template <typename acc_t>
__device__ __forceinline__ acc_t max_nan(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;  // b NaN: a > b is false, b returned
}

template <typename T>
struct alignas(sizeof(T) * kILP) VecT {
  T v[kILP];
};

template <typename T, typename acc_t>
__device__ __forceinline__ void load_vec(acc_t (&out)[kILP], const void* base, int i) {
  const VecT<T> v = *reinterpret_cast<const VecT<T>*>(static_cast<const T*>(base) + i);
#pragma unroll
  for (int k = 0; k < kILP; ++k) out[k] = static_cast<acc_t>(v.v[k]);
}

template <typename T, typename acc_t>
__device__ __forceinline__ void store_vec(const acc_t (&in)[kILP], void* base, int i) {
  VecT<T> v;
#pragma unroll
  for (int k = 0; k < kILP; ++k) v.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<VecT<T>*>(static_cast<T*>(base) + i) = v;
}

// The tensor's step after this call's increment, as torch's Python code sees it (step_t += 1 in the
// step's dtype, then .item()).
template <int D>
__device__ __forceinline__ double new_step(const ListArgs<D>& a, int t) {
  const void* p = a.step_ptr[t];
  if (p == nullptr) return a.step_host[t];
  if (a.step_double[t]) return *static_cast<const double*>(p) + 1.0;
  return static_cast<double>(*static_cast<const float*>(p) + 1.0f);
}

// ---- update rules -----------------------------------------------------------------------------------
// Each rule: kLists lists (0 params, 1 grads, then state), whether it uses the step, the per-tensor
// constants Coef (from the new step), and operator() on one element's values x[0..kLists), where
// x[1] holds the unscaled gradient; it updates x[0] (param) and the state entries in place.
// skip_load: lists whose old values the rule does not read (bit d = list d).

// SGD. Lists: params, grads, momentum_buffers (null when momentum == 0).
struct SgdRule {
  static constexpr int kLists = 3;
  static constexpr bool kUsesStep = false;
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, first_step;
  unsigned skip_load;

  template <typename acc_t>
  struct Coef {
    acc_t neg_lr, momentum, one_minus_damp, wd;
  };
  template <typename acc_t>
  __device__ __forceinline__ Coef<acc_t> coef(double) const {
    return {static_cast<acc_t>(-lr), static_cast<acc_t>(momentum), static_cast<acc_t>(1 - dampening),
            static_cast<acc_t>(weight_decay)};
  }
  template <typename acc_t>
  __device__ __forceinline__ void operator()(acc_t (&x)[kLists], const Coef<acc_t>& c) const {
    const acc_t p = x[0];
    acc_t g = maximize ? -x[1] : x[1];
    if (weight_decay != 0) g = g + c.wd * p;
    if (momentum != 0) {
      const acc_t buf = first_step ? g : x[2] * c.momentum + c.one_minus_damp * g;
      x[2] = buf;
      g = nesterov ? g + c.momentum * buf : buf;
    }
    x[0] = p + c.neg_lr * g;
  }
};

// Adam / AdamW. Lists: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (null unless amsgrad),
// master_params (null unless given; then the param's value is read from and written to it, and the
// param gets its rounding).
struct AdamRule {
  static constexpr int kLists = 6;
  static constexpr bool kUsesStep = true;
  double lr, beta1, beta2, weight_decay, eps;
  bool amsgrad, maximize, decoupled, master;
  unsigned skip_load;

  template <typename acc_t>
  struct Coef {
    acc_t neg_step_size, bc2_sqrt, w1, beta2, one_minus_beta2, eps, wd, decay;
  };
  template <typename acc_t>
  __device__ __forceinline__ Coef<acc_t> coef(double step) const {
    const double bc1 = 1 - pow(beta1, step);
    const double bc2 = 1 - pow(beta2, step);
    return {static_cast<acc_t>(-(lr / bc1)), static_cast<acc_t>(sqrt(bc2)), static_cast<acc_t>(1 - beta1),
            static_cast<acc_t>(beta2), static_cast<acc_t>(1 - beta2), static_cast<acc_t>(eps),
            static_cast<acc_t>(weight_decay), static_cast<acc_t>(1 - lr * weight_decay)};
  }
  template <typename acc_t>
  __device__ __forceinline__ void operator()(acc_t (&x)[kLists], const Coef<acc_t>& c) const {
    acc_t p = master ? x[5] : x[0];
    acc_t g = maximize ? -x[1] : x[1];
    if (weight_decay != 0) {
      if (decoupled) p = p * c.decay;
      else g = g + c.wd * p;
    }
    x[2] = lerp_acc(x[2], g, c.w1);
    x[3] = fma(c.one_minus_beta2 * g, g, x[3] * c.beta2);  // addcmul: (w * g) * g fused, never g * g first
    acc_t v = x[3];
    if (amsgrad) {
      x[4] = max_nan(x[4], v);
      v = x[4];
    }
    const acc_t denom = sqrt_acc(v) / c.bc2_sqrt + c.eps;
    p = p + c.neg_step_size * (x[2] / denom);
    x[0] = p;
    x[5] = p;
  }
};

// Adagrad. Lists: params, grads, state_sums.
struct AdagradRule {
  static constexpr int kLists = 3;
  static constexpr bool kUsesStep = true;
  double lr, lr_decay, weight_decay, eps;
  bool maximize;
  unsigned skip_load;

  template <typename acc_t>
  struct Coef {
    acc_t neg_clr, wd, eps;
  };
  template <typename acc_t>
  __device__ __forceinline__ Coef<acc_t> coef(double step) const {
    const double clr = lr / (1 + (step - 1) * lr_decay);
    return {static_cast<acc_t>(-clr), static_cast<acc_t>(weight_decay), static_cast<acc_t>(eps)};
  }
  template <typename acc_t>
  __device__ __forceinline__ void operator()(acc_t (&x)[kLists], const Coef<acc_t>& c) const {
    const acc_t p = x[0];
    acc_t g = maximize ? -x[1] : x[1];
    if (weight_decay != 0) g = g + c.wd * p;
    x[2] = fma(g, g, x[2]);
    const acc_t std = sqrt_acc(x[2]) + c.eps;
    x[0] = p + c.neg_clr * (g / std);
  }
};

// RMSprop. Lists: params, grads, square_avgs, grad_avgs (null unless centered), momentum_buffers
// (null unless momentum > 0).
struct RmspropRule {
  static constexpr int kLists = 5;
  static constexpr bool kUsesStep = false;
  double lr, alpha, eps, weight_decay, momentum;
  bool centered, maximize;
  unsigned skip_load;

  template <typename acc_t>
  struct Coef {
    acc_t neg_lr, alpha, one_minus_alpha, eps, wd, momentum;
  };
  template <typename acc_t>
  __device__ __forceinline__ Coef<acc_t> coef(double) const {
    return {static_cast<acc_t>(-lr), static_cast<acc_t>(alpha), static_cast<acc_t>(1 - alpha),
            static_cast<acc_t>(eps), static_cast<acc_t>(weight_decay), static_cast<acc_t>(momentum)};
  }
  template <typename acc_t>
  __device__ __forceinline__ void operator()(acc_t (&x)[kLists], const Coef<acc_t>& c) const {
    const acc_t p = x[0];
    acc_t g = maximize ? -x[1] : x[1];
    if (weight_decay != 0) g = g + c.wd * p;
    x[2] = fma(c.one_minus_alpha * g, g, x[2] * c.alpha);
    acc_t avg;
    if (centered) {
      x[3] = lerp_acc(x[3], g, c.one_minus_alpha);
      avg = sqrt_acc(fma(-x[3], x[3], x[2]));
    } else {
      avg = sqrt_acc(x[2]);
    }
    avg = avg + c.eps;
    if (momentum > 0) {
      x[4] = x[4] * c.momentum + g / avg;
      x[0] = p + c.neg_lr * x[4];
    } else {
      x[0] = p + c.neg_lr * (g / avg);
    }
  }
};

// Adadelta. Lists: params, grads, square_avgs, acc_deltas.
struct AdadeltaRule {
  static constexpr int kLists = 4;
  static constexpr bool kUsesStep = false;
  double lr, rho, eps, weight_decay;
  bool maximize;
  unsigned skip_load;

  template <typename acc_t>
  struct Coef {
    acc_t neg_lr, rho, one_minus_rho, eps, wd;
  };
  template <typename acc_t>
  __device__ __forceinline__ Coef<acc_t> coef(double) const {
    return {static_cast<acc_t>(-lr), static_cast<acc_t>(rho), static_cast<acc_t>(1 - rho),
            static_cast<acc_t>(eps), static_cast<acc_t>(weight_decay)};
  }
  template <typename acc_t>
  __device__ __forceinline__ void operator()(acc_t (&x)[kLists], const Coef<acc_t>& c) const {
    const acc_t p = x[0];
    acc_t g = maximize ? -x[1] : x[1];
    if (weight_decay != 0) g = g + c.wd * p;
    x[2] = fma(c.one_minus_rho * g, g, x[2] * c.rho);
    const acc_t std = sqrt_acc(x[2] + c.eps);
    const acc_t delta = sqrt_acc(x[3] + c.eps) / std * g;
    x[3] = fma(c.one_minus_rho * delta, delta, x[3] * c.rho);
    x[0] = p + c.neg_lr * delta;
  }
};

// ---- kernels ----------------------------------------------------------------------------------------

// One chunk of one tensor a block: the block's tensor t and chunk come from args.chunk_end; its
// elements [chunk * kChunk, min(numel, (chunk + 1) * kChunk)) are updated by `rule`.
template <typename scalar_t, typename Rule>
__global__ void __launch_bounds__(kThreads) _optim_multi_tensor_kernel(
    const ListArgs<Rule::kLists> args,  // the launch's tensors (see ListArgs)
    const Rule rule,                    // hyper-parameters
    const float* found_inf,             // (1,) or null: nonzero skips everything
    const float* grad_scale) {          // (1,) or null: grads are divided by it
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int D = Rule::kLists;
  if (found_inf != nullptr && *found_inf != 0.f) return;

  const int32_t b = static_cast<int32_t>(blockIdx.x);
  int t = 0;
  while (b >= args.chunk_end[t]) ++t;
  const int32_t first_block = t == 0 ? 0 : args.chunk_end[t - 1];
  const int64_t start = static_cast<int64_t>(b - first_block) * kChunk;
  const int64_t left = args.numel[t] - start;
  const int n = left < kChunk ? static_cast<int>(left) : kChunk;

  const typename Rule::template Coef<acc_t> c = rule.template coef<acc_t>(Rule::kUsesStep ? new_step(args, t) : 0.0);
  const bool has_scale = grad_scale != nullptr;
  const acc_t scale = has_scale ? static_cast<acc_t>(*grad_scale) : acc_t(1);

  void* base[D];
  unsigned present = 0;
  bool aligned = true;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    void* p = args.ptr[d][t];
    const size_t elem = d < 2 ? sizeof(scalar_t) : sizeof(acc_t);
    base[d] = p == nullptr ? nullptr : static_cast<char*>(p) + start * static_cast<int64_t>(elem);
    if (p != nullptr) {
      present |= 1u << d;
      aligned = aligned && reinterpret_cast<uintptr_t>(base[d]) % (elem * kILP) == 0;
    }
  }
  const unsigned load = present & ~rule.skip_load;
  const unsigned store = present & ~2u;  // never the grads

  if (aligned) {
    const int n_vec = n - n % kILP;
    for (int i = threadIdx.x * kILP; i < n_vec; i += kThreads * kILP) {
      acc_t v[D][kILP];
#pragma unroll
      for (int d = 0; d < D; ++d) {
#pragma unroll
        for (int k = 0; k < kILP; ++k) v[d][k] = acc_t(0);
        if (load >> d & 1u) {
          if (d < 2) load_vec<scalar_t>(v[d], base[d], i);
          else load_vec<acc_t>(v[d], base[d], i);
        }
      }
#pragma unroll
      for (int k = 0; k < kILP; ++k) {
        acc_t x[D];
#pragma unroll
        for (int d = 0; d < D; ++d) x[d] = v[d][k];
        if (has_scale) x[1] = x[1] / scale;
        rule(x, c);
#pragma unroll
        for (int d = 0; d < D; ++d) v[d][k] = x[d];
      }
#pragma unroll
      for (int d = 0; d < D; ++d) {
        if (store >> d & 1u) {
          if (d < 2) store_vec<scalar_t>(v[d], base[d], i);
          else store_vec<acc_t>(v[d], base[d], i);
        }
      }
    }
  }
  // Scalar path: the whole chunk when unaligned, else the < kILP elements after n_vec.
  for (int i = (aligned ? n - n % kILP : 0) + static_cast<int>(threadIdx.x); i < n; i += kThreads) {
    acc_t x[D];
#pragma unroll
    for (int d = 0; d < D; ++d) {
      x[d] = acc_t(0);
      if (load >> d & 1u) {
        x[d] = d < 2 ? static_cast<acc_t>(static_cast<const scalar_t*>(base[d])[i])
                     : static_cast<const acc_t*>(base[d])[i];
      }
    }
    if (has_scale) x[1] = x[1] / scale;
    rule(x, c);
#pragma unroll
    for (int d = 0; d < D; ++d) {
      if (store >> d & 1u) {
        if (d < 2) static_cast<scalar_t*>(base[d])[i] = static_cast<scalar_t>(x[d]);
        else static_cast<acc_t*>(base[d])[i] = x[d];
      }
    }
  }
}

// Adds 1 to each device step (after the main launches, which read the old values); one thread a step.
__global__ void __launch_bounds__(kThreads) _optim_step_increment_kernel(
    const StepArgs args,         // (n,) step pointers
    const float* found_inf) {    // (1,) or null: nonzero skips
  if (found_inf != nullptr && *found_inf != 0.f) return;
  const int i = static_cast<int>(threadIdx.x);
  if (i >= args.n) return;
  if (args.is_double[i]) *static_cast<double*>(args.ptr[i]) += 1.0;
  else *static_cast<float*>(args.ptr[i]) += 1.0f;
}

// ---- host side --------------------------------------------------------------------------------------

const float* optional_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<float>() : nullptr;
}

// Checks (before anything is written), the device guard, the found_inf decision for CPU
// steps, dense working copies. Returns false when there is nothing to do (empty lists, or found_inf
// read on the host as nonzero). The roles the call does not use (L.absent) are dropped before
// dense() so no copy is made of them.
bool prepare(optim::TensorLists& L, const c10::optional<at::Tensor>& grad_scale,
             const c10::optional<at::Tensor>& found_inf, c10::cuda::OptionalCUDAGuard& guard) {
  L.check(grad_scale, found_inf, /*cpu_kernel=*/false);
  if (L.size() == 0) return false;
  TORCH_CHECK(L.param(0).is_cuda(), L.op, ": the CUDA kernel got params on ", L.param(0).device());
  guard.set_device(L.param(0).device());
  L.drop_absent();
  bool host_steps = false;
  for (const at::Tensor& s : L.steps) host_steps = host_steps || s.device().is_cpu();
  // Steps on the CPU are advanced on the host, so found_inf must be known there: one sync.
  if (host_steps && found_inf.has_value() && found_inf->defined() && found_inf->item<float>() != 0.f) return false;
  L.dense();
  return true;
}

// Runs `rule` over every tensor of L (after prepare()), then advances the steps on the device.
template <typename scalar_t, typename Rule>
void run_lists(const optim::TensorLists& L, const Rule& rule, const float* found_inf, const float* grad_scale) {
  constexpr int D = Rule::kLists;
  using Args = ListArgs<D>;
  static_assert(sizeof(Args) + sizeof(Rule) + 2 * sizeof(void*) <= 4096, "kernel arguments exceed 4 KiB");
  TORCH_CHECK(static_cast<int>(L.roles.size()) == D, L.op, ": internal error: ", L.roles.size(), " lists, rule takes ",
              D);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const size_t n = L.size();

  // Steps: new values of CPU steps (advanced here), pointers of device steps.
  std::vector<double> host_step(L.steps.size(), 0.0);
  for (size_t i = 0; i < L.steps.size(); ++i) {
    const at::Tensor& s = L.steps[i];
    if (!s.device().is_cpu()) continue;
    if (s.scalar_type() == at::kDouble) host_step[i] = ++*s.data_ptr<double>();
    else host_step[i] = static_cast<double>(++*s.data_ptr<float>());
  }

  Args a{};
  int64_t blocks = 0;
  auto flush = [&]() {
    if (a.n == 0) return;
    _optim_multi_tensor_kernel<scalar_t, Rule><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        a, rule, found_inf, grad_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    a = Args{};
    blocks = 0;
  };
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = L.param(i).numel();
    if (numel == 0) continue;
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= kMaxGrid, L.op, ": params[", i, "] has ", numel, " elements, more than the kernel's ",
                kMaxGrid * kChunk);
    if (a.n == Args::kMaxTensors || blocks + chunks > kMaxGrid) flush();
    const int t = a.n;
    for (int d = 0; d < D; ++d) {
      const auto& list = L.list(d);
      a.ptr[d][t] = list.empty() ? nullptr : list[i].data_ptr();
    }
    a.numel[t] = numel;
    if (!L.steps.empty()) {
      const at::Tensor& s = L.steps[i];
      a.step_ptr[t] = s.device().is_cpu() ? nullptr : s.const_data_ptr();
      a.step_double[t] = s.scalar_type() == at::kDouble;
      a.step_host[t] = host_step[i];
    }
    blocks += chunks;
    a.chunk_end[t] = static_cast<int32_t>(blocks);
    a.n = t + 1;
  }
  flush();

  StepArgs s{};
  auto flush_steps = [&]() {
    if (s.n == 0) return;
    _optim_step_increment_kernel<<<1, kThreads, 0, stream>>>(s, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    s = StepArgs{};
  };
  for (const at::Tensor& st : L.steps) {
    if (st.device().is_cpu()) continue;
    if (s.n == kMaxSteps) flush_steps();
    s.ptr[s.n] = st.data_ptr();
    s.is_double[s.n] = st.scalar_type() == at::kDouble;
    ++s.n;
  }
  flush_steps();
}

template <typename Rule>
void run(optim::TensorLists& L, const Rule& rule, const c10::optional<at::Tensor>& grad_scale,
         const c10::optional<at::Tensor>& found_inf) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.param(0).scalar_type(), "optim_step_cuda", [&] {
    run_lists<scalar_t>(L, rule, optional_ptr(found_inf), optional_ptr(grad_scale));
  });
  L.finish();
}

// One SGD step (torch.optim.SGD(foreach=False)) over all params. params, grads (any shapes, one per
// param), momentum_buffers (params' shapes; empty when momentum == 0) on one CUDA device.
void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool first_step, const c10::optional<at::Tensor>& grad_scale,
                   const c10::optional<at::Tensor>& found_inf) {
  auto L = optim::sgd_lists(params, grads, momentum_buffers, momentum);
  c10::cuda::OptionalCUDAGuard guard;
  if (!prepare(L, grad_scale, found_inf, guard)) return;
  SgdRule rule{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
               first_step ? (1u << 2) : 0u};
  run(L, rule, grad_scale, found_inf);
}

// One Adam / AdamW step (torch.optim.Adam / AdamW(foreach=False)). exp_avgs, exp_avg_sqs,
// max_exp_avg_sqs (empty unless amsgrad) and master_params (empty, or float32 copies of
// float16/bfloat16 params) have the params' shapes; state_steps: one 0-dim float32/float64 tensor
// per param, on the params' device or the CPU.
void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                    at::TensorList master_params, double lr, double beta1, double beta2, double weight_decay,
                    double eps, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                    const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  auto L = optim::adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
                             amsgrad);
  c10::cuda::OptionalCUDAGuard guard;
  if (!prepare(L, grad_scale, found_inf, guard)) return;
  const bool master = !master_params.empty();
  AdamRule rule{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, master,
                master ? 1u : 0u};
  run(L, rule, grad_scale, found_inf);
}

// One Adagrad step (torch.optim.Adagrad(foreach=False)); state_sums have the params' shapes,
// state_steps as for adam_step_.
void adagrad_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                       at::TensorList state_steps, double lr, double lr_decay, double weight_decay, double eps,
                       bool maximize, const c10::optional<at::Tensor>& grad_scale,
                       const c10::optional<at::Tensor>& found_inf) {
  auto L = optim::adagrad_lists(params, grads, state_sums, state_steps);
  c10::cuda::OptionalCUDAGuard guard;
  if (!prepare(L, grad_scale, found_inf, guard)) return;
  AdagradRule rule{lr, lr_decay, weight_decay, eps, maximize, 0u};
  run(L, rule, grad_scale, found_inf);
}

// One RMSprop step (torch.optim.RMSprop(foreach=False)); square_avgs, grad_avgs (empty unless
// centered), momentum_buffers (empty unless momentum > 0) have the params' shapes; state_steps as
// for adam_step_ (advanced, not used by the rule).
void rmsprop_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                       at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList state_steps,
                       double lr, double alpha, double eps, double weight_decay, double momentum, bool centered,
                       bool maximize, const c10::optional<at::Tensor>& grad_scale,
                       const c10::optional<at::Tensor>& found_inf) {
  auto L = optim::rmsprop_lists(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, centered,
                                momentum);
  c10::cuda::OptionalCUDAGuard guard;
  if (!prepare(L, grad_scale, found_inf, guard)) return;
  RmspropRule rule{lr, alpha, eps, weight_decay, momentum, centered, maximize, 0u};
  run(L, rule, grad_scale, found_inf);
}

// One Adadelta step (torch.optim.Adadelta(foreach=False)); square_avgs, acc_deltas have the params'
// shapes; state_steps as for adam_step_ (advanced, not used by the rule).
void adadelta_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                        at::TensorList acc_deltas, at::TensorList state_steps, double lr, double rho, double eps,
                        double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                        const c10::optional<at::Tensor>& found_inf) {
  auto L = optim::adadelta_lists(params, grads, square_avgs, acc_deltas, state_steps);
  c10::cuda::OptionalCUDAGuard guard;
  if (!prepare(L, grad_scale, found_inf, guard)) return;
  AdadeltaRule rule{lr, rho, eps, weight_decay, maximize, 0u};
  run(L, rule, grad_scale, found_inf);
}

}  // namespace
}  // namespace pyfastdl

TORCH_LIBRARY_IMPL(pyfastdl, CUDA, m) {
  m.impl("sgd_step_", &pyfastdl::sgd_step_cuda);
  m.impl("adam_step_", &pyfastdl::adam_step_cuda);
  m.impl("adagrad_step_", &pyfastdl::adagrad_step_cuda);
  m.impl("rmsprop_step_", &pyfastdl::rmsprop_step_cuda);
  m.impl("adadelta_step_", &pyfastdl::adadelta_step_cuda);
}
