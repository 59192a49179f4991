// Fused-optimizer CPU kernels for one SIMD capability (see optim_kernel.h). setup.py compiles this
// file once per capability with CPU_CAPABILITY set (DEFAULT, AVX2, AVX512) and the matching flags.
//
// Each update reads every element of param, grad and state once and writes param and state once,
// in one pass over the concatenated tensors. The arithmetic follows torch.optim's single-tensor
// updates operation by operation, in the order of ATen's CPU kernels (same roundings in the same
// order, up to FMA contraction), so the results match torch.optim.X(foreach=False) to a few ulps:
//   addcmul_(t1, t2, value=w):  self + (w * t1) * t2, as fmadd(w * t1, t2, self) -- the scaled
//     factor first, so one gradient of 1e20 with w = 1 - beta2 = 1e-3 gives 1e37, not inf (g * g
//     first overflows float32 and would freeze the parameter for good: issue 9, defect 5);
//   addcdiv_(t1, t2, value=w):  self + (w * t1) / t2.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

#include "cpu/optim_kernel.h"

namespace pyfastdl {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Elements per work unit of the parallel split: the split lands on multiples of 1024 elements (whole
// cache lines, whole vectors), and a step of fewer than kGrain units runs on the calling thread.
constexpr int64_t kUnit = 1024;
constexpr int64_t kGrain = 32;  // 32 K elements

template <typename T>
struct Io {
  using V = Vectorized<T>;
  static V load(const T* p, int n) { return n == V::size() ? V::loadu(p) : V::loadu(p, n); }
  static void store(const V& v, T* p, int n) {
    if (n == V::size()) v.store(p);
    else v.store(p, n);
  }
};

// Calls body(tensor, first element, count) for every piece of the concatenated element range,
// the range split over the threads.
template <typename T, typename Body>
void for_pieces(const MultiTensor<T>& mt, const Body& body) {
  const int64_t total = mt.offset.back();
  if (total == 0) return;
  const int64_t units = (total + kUnit - 1) / kUnit;
  at::parallel_for(0, units, kGrain, [&](int64_t u0, int64_t u1) {
    int64_t lo = u0 * kUnit;
    const int64_t hi = std::min(u1 * kUnit, total);
    // the tensor holding element lo (skipping empty tensors)
    int64_t t = std::upper_bound(mt.offset.begin(), mt.offset.end(), lo) - mt.offset.begin() - 1;
    while (lo < hi) {
      const int64_t end = std::min(hi, mt.offset[t + 1]);
      if (end > lo) body(t, lo - mt.offset[t], end - lo);
      lo = end;
      ++t;
    }
  });
}

// Runs op(i, n) over [0, count) in full vectors, then the tail (n < vector size).
template <typename T, typename Op>
inline void vector_loop(int64_t count, const Op& op) {
  constexpr int64_t W = Vectorized<T>::size();
  int64_t i = 0;
  for (; i + 2 * W <= count; i += 2 * W) {
    op(i, static_cast<int>(W));
    op(i + W, static_cast<int>(W));
  }
  for (; i + W <= count; i += W) op(i, static_cast<int>(W));
  if (i < count) op(i, static_cast<int>(count - i));
}

// torch's lerp: self + w * (end - self) for |w| < 0.5, end - (end - self) * (1 - w) otherwise.
template <typename T>
inline Vectorized<T> lerp(const Vectorized<T>& self, const Vectorized<T>& end, T w) {
  if (std::abs(w) < T(0.5)) return self + Vectorized<T>(w) * (end - self);
  return end - (end - self) * Vectorized<T>(T(1) - w);
}

// torch's addcmul on the CPU: self + (value * t1) * t2, the product fused with the addition.
template <typename T>
inline Vectorized<T> addcmul(const Vectorized<T>& self, const Vectorized<T>& value, const Vectorized<T>& t1,
                             const Vectorized<T>& t2) {
  return at::vec::fmadd(value * t1, t2, self);
}

// The gradient as every update rule starts: unscaled, negated for maximize, plus L2 weight decay.
template <typename T>
struct GradPrep {
  using V = Vectorized<T>;
  bool scale, maximize, l2;
  V vscale, vwd;
  GradPrep(const OptimHyper& h, bool l2_decay)
      : scale(h.has_scale), maximize(h.maximize), l2(l2_decay && h.weight_decay != 0),
        vscale(static_cast<T>(h.grad_scale)), vwd(static_cast<T>(h.weight_decay)) {}
  inline V operator()(V g, const V& p) const {
    if (scale) g = g / vscale;
    if (maximize) g = g.neg();
    if (l2) g = g + vwd * p;  // grad.add(param, alpha=weight_decay)
    return g;
  }
};

template <typename T>
void sgd(const MultiTensor<T>& mt, const OptimHyper& h) {
  using V = Vectorized<T>;
  using IO = Io<T>;
  const GradPrep<T> prep(h, true);
  const bool mom = h.momentum != 0;
  const V vlr(static_cast<T>(-h.lr)), vmom(static_cast<T>(h.momentum)), vdamp(static_cast<T>(1 - h.dampening));
  for_pieces(mt, [&](int64_t t, int64_t s, int64_t count) {
    T* p = mt.ptr[0][t] + s;
    const T* g = mt.ptr[1][t] + s;
    T* b = mom ? mt.ptr[2][t] + s : nullptr;
    vector_loop<T>(count, [&](int64_t i, int n) {
      V pv = IO::load(p + i, n);
      V gv = prep(IO::load(g + i, n), pv);
      if (mom) {
        V bv = h.first_step ? gv : IO::load(b + i, n) * vmom + vdamp * gv;
        IO::store(bv, b + i, n);
        gv = h.nesterov ? gv + vmom * bv : bv;
      }
      IO::store(pv + vlr * gv, p + i, n);
    });
  });
}

template <typename T>
void adam(const MultiTensor<T>& mt, const OptimHyper& h) {
  using V = Vectorized<T>;
  using IO = Io<T>;
  const GradPrep<T> prep(h, !h.decoupled);
  const bool decay = h.decoupled && h.weight_decay != 0;
  const V vdecay(static_cast<T>(1 - h.lr * h.weight_decay));
  const T w1 = static_cast<T>(1 - h.beta1);
  const V vb2(static_cast<T>(h.beta2)), v1mb2(static_cast<T>(1 - h.beta2)), veps(static_cast<T>(h.eps));
  for_pieces(mt, [&](int64_t t, int64_t s, int64_t count) {
    T* p = mt.ptr[0][t] + s;
    const T* g = mt.ptr[1][t] + s;
    T* m = mt.ptr[2][t] + s;
    T* v = mt.ptr[3][t] + s;
    T* vmax = h.amsgrad ? mt.ptr[4][t] + s : nullptr;
    const V neg_step(static_cast<T>(-mt.c0[t])), bc2_sqrt(static_cast<T>(mt.c1[t]));
    vector_loop<T>(count, [&](int64_t i, int n) {
      V pv = IO::load(p + i, n);
      const V gv = prep(IO::load(g + i, n), pv);
      if (decay) pv = pv * vdecay;
      const V mv = lerp(IO::load(m + i, n), gv, w1);
      V vv = addcmul(IO::load(v + i, n) * vb2, v1mb2, gv, gv);  // v.mul_(beta2).addcmul_(g, g, 1 - beta2)
      IO::store(mv, m + i, n);
      IO::store(vv, v + i, n);
      if (vmax) {
        vv = at::vec::maximum(IO::load(vmax + i, n), vv);
        IO::store(vv, vmax + i, n);
      }
      const V denom = vv.sqrt() / bc2_sqrt + veps;
      IO::store(pv + neg_step * mv / denom, p + i, n);  // param.addcdiv_(exp_avg, denom, value=-step_size)
    });
  });
}

template <typename T>
void adagrad(const MultiTensor<T>& mt, const OptimHyper& h) {
  using V = Vectorized<T>;
  using IO = Io<T>;
  const GradPrep<T> prep(h, true);
  const V veps(static_cast<T>(h.eps));
  for_pieces(mt, [&](int64_t t, int64_t s, int64_t count) {
    T* p = mt.ptr[0][t] + s;
    const T* g = mt.ptr[1][t] + s;
    T* sum = mt.ptr[2][t] + s;
    const V neg_clr(static_cast<T>(-mt.c0[t]));
    vector_loop<T>(count, [&](int64_t i, int n) {
      const V pv = IO::load(p + i, n);
      const V gv = prep(IO::load(g + i, n), pv);
      const V sv = at::vec::fmadd(gv, gv, IO::load(sum + i, n));  // state_sum.addcmul_(g, g, value=1)
      IO::store(sv, sum + i, n);
      IO::store(pv + neg_clr * gv / (sv.sqrt() + veps), p + i, n);  // param.addcdiv_(g, std, value=-clr)
    });
  });
}

template <typename T>
void rmsprop(const MultiTensor<T>& mt, const OptimHyper& h) {
  using V = Vectorized<T>;
  using IO = Io<T>;
  const GradPrep<T> prep(h, true);
  const bool mom = h.momentum > 0;
  const T w = static_cast<T>(1 - h.alpha);
  const V valpha(static_cast<T>(h.alpha)), v1ma(w), veps(static_cast<T>(h.eps)),
      vmom(static_cast<T>(h.momentum)), vlr(static_cast<T>(-h.lr));
  for_pieces(mt, [&](int64_t t, int64_t s, int64_t count) {
    T* p = mt.ptr[0][t] + s;
    const T* g = mt.ptr[1][t] + s;
    T* sq = mt.ptr[2][t] + s;
    T* ga = h.centered ? mt.ptr[3][t] + s : nullptr;
    T* b = mom ? mt.ptr[4][t] + s : nullptr;
    vector_loop<T>(count, [&](int64_t i, int n) {
      const V pv = IO::load(p + i, n);
      const V gv = prep(IO::load(g + i, n), pv);
      const V sv = addcmul(IO::load(sq + i, n) * valpha, v1ma, gv, gv);
      IO::store(sv, sq + i, n);
      V avg;
      if (ga) {
        const V gav = lerp(IO::load(ga + i, n), gv, w);
        IO::store(gav, ga + i, n);
        avg = at::vec::fmadd(gav.neg(), gav, sv).sqrt() + veps;  // square_avg.addcmul(ga, ga, value=-1)
      } else {
        avg = sv.sqrt() + veps;
      }
      if (b) {
        const V bv = IO::load(b + i, n) * vmom + gv / avg;
        IO::store(bv, b + i, n);
        IO::store(pv + vlr * bv, p + i, n);
      } else {
        IO::store(pv + vlr * gv / avg, p + i, n);  // param.addcdiv_(g, avg, value=-lr)
      }
    });
  });
}

template <typename T>
void adadelta(const MultiTensor<T>& mt, const OptimHyper& h) {
  using V = Vectorized<T>;
  using IO = Io<T>;
  const GradPrep<T> prep(h, true);
  const V vrho(static_cast<T>(h.rho)), v1mr(static_cast<T>(1 - h.rho)), veps(static_cast<T>(h.eps)),
      vlr(static_cast<T>(-h.lr));
  for_pieces(mt, [&](int64_t t, int64_t s, int64_t count) {
    T* p = mt.ptr[0][t] + s;
    const T* g = mt.ptr[1][t] + s;
    T* sq = mt.ptr[2][t] + s;
    T* acc = mt.ptr[3][t] + s;
    vector_loop<T>(count, [&](int64_t i, int n) {
      const V pv = IO::load(p + i, n);
      const V gv = prep(IO::load(g + i, n), pv);
      const V sv = addcmul(IO::load(sq + i, n) * vrho, v1mr, gv, gv);
      IO::store(sv, sq + i, n);
      const V av = IO::load(acc + i, n);
      const V delta = (av + veps).sqrt() / (sv + veps).sqrt() * gv;
      IO::store(addcmul(av * vrho, v1mr, delta, delta), acc + i, n);
      IO::store(pv + vlr * delta, p + i, n);
    });
  });
}

template <typename T>
void step(OptimKind kind, const MultiTensor<T>& mt, const OptimHyper& h) {
  switch (kind) {
    case OptimKind::SGD: return sgd(mt, h);
    case OptimKind::ADAM: return adam(mt, h);
    case OptimKind::ADAGRAD: return adagrad(mt, h);
    case OptimKind::RMSPROP: return rmsprop(mt, h);
    case OptimKind::ADADELTA: return adadelta(mt, h);
  }
}

const OptimKernels kTable{&step<float>, &step<double>};

}  // namespace
}  // namespace CPU_CAPABILITY

PYFASTDL_CPU_KERNELS_DEFINE(OptimKernels, optim_kernels, CPU_CAPABILITY::kTable)

}  // namespace cpu
}  // namespace pyfastdl
