// Direct Python entries (pyfastdl._C.attention, .batch_norm, .conv2d, .max_pool2d, .avg_pool2d) for
// the per-call path of the cpu and cuda backends: a METH_FASTCALL function that unpacks its positional
// arguments and calls the registered op (pyfastdl::attention, ...) through the dispatcher -- the same op, its
// C++ autograd node, every dispatch key (autograd, functorch, Python dispatch modes) as through
// torch.ops, without torch.ops' schema-driven argument parsing (about 2 us a call on a 2-core AMD
// EPYC; docs/architecture.md, "Per-call cost").
//
// An entry returns None, having done nothing, where torch.ops would do more than call the op: a
// __torch_function__ override or mode is active, or an argument is not what the fast path takes
// (pyfastdl.functional then takes its full path: its checks, its errors, torch.ops). The registered
// ops stay the one thing torch.compile sees (functional skips these entries while compiling).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <ATen/PythonTorchFunctionTLS.h>

#include <array>
#include <cmath>

namespace pyfastdl {
namespace {

using OptT = c10::optional<at::Tensor>;

// A plain tensor: exactly torch.Tensor or nn.Parameter (no subclass, so no __torch_function__
// override). The entries also step aside while a __torch_function__ mode is active (no_mode()).
inline bool plain_tensor(PyObject* o) { return THPVariable_CheckExact(o); }
inline bool no_mode() { return !at::impl::torch_function_mode_enabled(); }

// None -> nullopt (ok); a plain tensor -> it (ok); anything else -> not ok.
inline bool optional_tensor(PyObject* o, OptT& out) {
  if (o == Py_None) return true;
  if (!plain_tensor(o)) return false;
  out = THPVariable_Unpack(o);
  return true;
}

inline bool as_double(PyObject* o, double& out) {
  if (PyFloat_CheckExact(o)) {
    out = PyFloat_AS_DOUBLE(o);
    return true;
  }
  if (PyLong_CheckExact(o)) {
    out = PyLong_AsDouble(o);
    if (out == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    return true;
  }
  return false;
}

PyObject* not_taken() { Py_RETURN_NONE; }

// attention(q, k, v, is_causal: bool, scale: float | None) -> Tensor | None. Taken for the common
// case only: q (B, H, L, E), k (B, H, S, E), v (B, H, S, Ev) of one dtype and device, nothing empty
// (S = 0 aside), no attn_mask, valid_lens, dropout or GQA; scale None = 1 / sqrt(E).
PyObject* attention_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5 || !no_mode()) return not_taken();
  for (int i = 0; i < 3; ++i)
    if (!plain_tensor(args[i])) return not_taken();
  if (!PyBool_Check(args[3])) return not_taken();
  const at::Tensor& q = THPVariable_Unpack(args[0]);
  const at::Tensor& k = THPVariable_Unpack(args[1]);
  const at::Tensor& v = THPVariable_Unpack(args[2]);
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4) return not_taken();
  const auto qs = q.sizes(), ks = k.sizes(), vs = v.sizes();
  if (qs[0] != ks[0] || qs[0] != vs[0] || qs[1] != ks[1] || qs[1] != vs[1] || qs[3] != ks[3] || ks[2] != vs[2] ||
      qs[0] * qs[1] * qs[2] * qs[3] * vs[3] == 0)
    return not_taken();
  if (k.scalar_type() != q.scalar_type() || v.scalar_type() != q.scalar_type() || k.device() != q.device() ||
      v.device() != q.device())
    return not_taken();
  double scale;
  if (args[4] == Py_None) scale = 1.0 / std::pow(static_cast<double>(qs[3]), 0.5);  // Python's 1.0 / E ** 0.5
  else if (!as_double(args[4], scale)) return not_taken();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastdl::attention", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                                               const OptT&, bool, double, double, int64_t)>();
  const bool causal = args[3] == Py_True;
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(q, k, v, c10::nullopt, c10::nullopt, causal, scale, 0.0, 0);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// batch_norm(input, weight, bias, running_mean, running_var, training: bool, momentum: float,
// eps: float, activation: int) -> Tensor | None. None as well for what functional's full path treats
// itself: a tensor on another device than input, a non-floating input, a 1-D input.
PyObject* batch_norm_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 9 || !plain_tensor(args[0]) || !no_mode()) return not_taken();
  std::array<OptT, 4> opt;
  for (int i = 0; i < 4; ++i)
    if (!optional_tensor(args[1 + i], opt[i])) return not_taken();
  if (!PyBool_Check(args[5]) || !PyLong_CheckExact(args[8])) return not_taken();
  const long activation = PyLong_AsLong(args[8]);
  if (activation == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return not_taken();
  }
  double momentum, eps;
  if (!as_double(args[6], momentum) || !as_double(args[7], eps)) return not_taken();
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  if (input.dim() < 2 || !at::isFloatingType(input.scalar_type())) return not_taken();
  const c10::Device device = input.device();
  for (const OptT& t : opt)
    if (t.has_value() && t->device() != device) return not_taken();
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("pyfastdl::batch_norm", "")
          .typed<at::Tensor(const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, bool, double,
                            double, int64_t)>();
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(input, opt[0], opt[1], opt[2], opt[3], args[5] == Py_True, momentum, eps, activation);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// An int, or a tuple/list of `n` ints (exact Python ints, no bool) -> out[0..n). n = 1 or 2.
inline bool int_or_pair(PyObject* o, std::array<int64_t, 2>& out) {
  if (PyLong_CheckExact(o)) {
    const long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    out = {v, v};
    return true;
  }
  if (!PyTuple_CheckExact(o) && !PyList_CheckExact(o)) return false;
  PyObject* seq = o;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  if (n != 2) return false;
  PyObject** items = PySequence_Fast_ITEMS(seq);
  for (int i = 0; i < 2; ++i) {
    if (!PyLong_CheckExact(items[i])) return false;
    const long long v = PyLong_AsLongLong(items[i]);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    out[i] = v;
  }
  return true;
}

// conv2d(input, weight, bias, stride, padding, dilation, groups) -> Tensor | None: pyfastdl::conv2d
// (conv2d_fwd with its C++ derivative, csrc/cpu/conv2d_autograd.cpp). Taken for a 4-D input, a 4-D
// weight and bias (or None) on input's device; stride, padding, dilation each an int or 2 ints
// (padding (ph, pw) -> (ph, ph, pw, pw); a string -> not taken); groups an int.
PyObject* conv2d_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 7 || !plain_tensor(args[0]) || !plain_tensor(args[1]) || !no_mode()) return not_taken();
  OptT bias;
  if (!optional_tensor(args[2], bias)) return not_taken();
  std::array<int64_t, 2> stride, pad, dilation;
  if (!int_or_pair(args[3], stride) || !int_or_pair(args[4], pad) || !int_or_pair(args[5], dilation) ||
      !PyLong_CheckExact(args[6]))
    return not_taken();
  const long long groups = PyLong_AsLongLong(args[6]);
  if (groups == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return not_taken();
  }
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  const at::Tensor& weight = THPVariable_Unpack(args[1]);
  if (input.dim() != 4 || weight.dim() != 4 || weight.device() != input.device() ||
      (bias.has_value() && bias->device() != input.device()))
    return not_taken();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastdl::conv2d", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptT&, at::IntArrayRef,
                                               at::IntArrayRef, at::IntArrayRef, int64_t)>();
  const std::array<int64_t, 4> pad4 = {pad[0], pad[0], pad[1], pad[1]};
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(input, weight, bias, stride, pad4, dilation, groups);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// A pooling call's leading arguments: a plain 4-D input with C, H, W >= 1, kernel_size, stride
// (None: kernel_size) and padding each an int or 2 ints. False: not taken.
inline bool pool_args(PyObject* const* args, std::array<int64_t, 2>& k, std::array<int64_t, 2>& s,
                      std::array<int64_t, 2>& p) {
  if (!plain_tensor(args[0]) || !no_mode()) return false;
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  if (input.dim() != 4 || input.size(1) == 0 || input.size(2) == 0 || input.size(3) == 0) return false;
  if (!int_or_pair(args[1], k) || !int_or_pair(args[3], p)) return false;
  if (args[2] == Py_None) s = k;
  else if (!int_or_pair(args[2], s)) return false;
  return true;
}

// max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode: bool) -> Tensor | None:
// pyfastdl::max_pool2d (the output; indices only inside its C++ node, csrc/cpu/pool2d_autograd.cpp).
// functional calls it only when return_indices is False.
PyObject* max_pool2d_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  std::array<int64_t, 2> k, s, p, d;
  if (nargs != 6 || !pool_args(args, k, s, p) || !int_or_pair(args[4], d) || !PyBool_Check(args[5]))
    return not_taken();
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastdl::max_pool2d", "")
                             .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                               at::IntArrayRef, bool)>();
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(input, k, s, p, d, args[5] == Py_True);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// avg_pool2d(input, kernel_size, stride, padding, ceil_mode: bool, count_include_pad: bool,
// divisor_override: int != 0 | None) -> Tensor | None: pyfastdl::avg_pool2d.
PyObject* avg_pool2d_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  std::array<int64_t, 2> k, s, p;
  if (nargs != 7 || !pool_args(args, k, s, p) || !PyBool_Check(args[4]) || !PyBool_Check(args[5]))
    return not_taken();
  c10::optional<int64_t> divisor;
  if (args[6] != Py_None) {
    if (!PyLong_CheckExact(args[6])) return not_taken();
    const long long v = PyLong_AsLongLong(args[6]);
    if (v == 0 || (v == -1 && PyErr_Occurred())) {  // 0: functional's full path raises its error
      PyErr_Clear();
      return not_taken();
    }
    divisor = v;
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pyfastdl::avg_pool2d", "")
                             .typed<at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                               bool, bool, c10::optional<int64_t>)>();
  const at::Tensor& input = THPVariable_Unpack(args[0]);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.call(input, k, s, p, args[4] == Py_True, args[5] == Py_True, divisor);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

}  // namespace
}  // namespace pyfastdl

// The methods of the pyfastdl._C module (csrc/ops.cpp, PyInit__C).
PyMethodDef pyfastdl_percall_methods[] = {
    {"attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&pyfastdl::attention_entry)),
     METH_FASTCALL, "pyfastdl::attention(q, k, v, None, None, is_causal, scale, 0.0, 0), or None (not taken)"},
    {"batch_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&pyfastdl::batch_norm_entry)),
     METH_FASTCALL,
     "pyfastdl::batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, activation), or None "
     "(not taken)"},
    {"conv2d", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&pyfastdl::conv2d_entry)), METH_FASTCALL,
     "pyfastdl::conv2d(input, weight, bias, stride, padding (ph, ph, pw, pw), dilation, groups), or None (not taken)"},
    {"max_pool2d", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&pyfastdl::max_pool2d_entry)),
     METH_FASTCALL,
     "pyfastdl::max_pool2d(input, kernel_size, stride (None: kernel_size), padding, dilation, ceil_mode), or None "
     "(not taken)"},
    {"avg_pool2d", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&pyfastdl::avg_pool2d_entry)),
     METH_FASTCALL,
     "pyfastdl::avg_pool2d(input, kernel_size, stride (None: kernel_size), padding, ceil_mode, count_include_pad, "
     "divisor_override), or None (not taken)"},
    {nullptr, nullptr, 0, nullptr}};
