"""The tensor lists of one fused-optimizer op call, by role, with every check of the op schemas'
contract (``csrc/ops.cpp``; the C++ twin is ``csrc/common/optim.h``), and the per-op list builders.

Shared by the Triton launchers (``triton_kernels/optim.py``) and by the one fake implementation of
each op, registered for both ``pyfastdl::<op>`` (C++: CPU, CUDA) and ``pyfastdl_triton::<op>``: a
fake runs the same checks on fake tensors (the ops return nothing; they mutate their lists).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_LOW = (torch.float16, torch.bfloat16)
_PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _fmt(shape) -> str:
    return str(list(shape))


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill numel consecutive slots from data_ptr()."""
    if t.numel() <= 1:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(t: Tensor, p: Tensor) -> bool:
    """t's element k sits at the same flat offset as p's (p dense): equal strides wherever a
    dimension has more than one element."""
    if t.numel() <= 1:
        return True
    return all(st == sp for sz, st, sp in zip(p.shape, t.stride(), p.stride()) if sz != 1)


class _Lists:
    """The op's tensor lists by role (mirrors pyfastdl::optim::TensorLists, csrc/common/optim.h):
    role 0 is params, role 1 grads, the others state tensors (float32 for float16/bfloat16
    params) that the step writes."""

    def __init__(self, op: str, params: Sequence[Tensor], grads: Sequence[Tensor]):
        self.op = op
        # [name, tensors, writes, state]
        self.roles: List[list] = [["params", list(params), True, False],
                                  ["grads", list(grads), False, False]]
        self.steps: List[Tensor] = []
        self.copy_back: List[Tuple[Tensor, Tensor]] = []

    def add(self, name: str, tensors: Sequence[Tensor]):
        self.roles.append([name, list(tensors), True, True])

    def role(self, name: str) -> List[Tensor]:
        return next(r[1] for r in self.roles if r[0] == name)

    def clear(self, name: str):
        """Drops an optional role the step does not use (after the checks)."""
        next(r for r in self.roles if r[0] == name)[1] = []

    @property
    def n(self) -> int:
        return len(self.roles[0][1])

    def require(self, name: str, why: str = ""):
        """Role `name` must have one tensor per param (not empty)."""
        ts = self.steps if name == "state_steps" else self.role(name)
        if len(ts) != self.n:
            raise RuntimeError(f"{self.op}: expected {name} to have one tensor per param "
                               f"({self.n}){why}, got {len(ts)}")

    def check(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """Every structural check of the contract, before anything is written."""
        op, n = self.op, self.n
        if len(self.roles[1][1]) != n:
            raise RuntimeError(f"{op}: expected grads to have one tensor per param ({n}), got "
                               f"{len(self.roles[1][1])}")
        for name, ts, _, _ in self.roles[2:]:
            if len(ts) not in (0, n):
                raise RuntimeError(f"{op}: expected {name} to be empty or have one tensor per "
                                   f"param ({n}), got {len(ts)}")
        if self.steps and len(self.steps) != n:
            raise RuntimeError(f"{op}: expected state_steps to have one tensor per param ({n}), "
                               f"got {len(self.steps)}")
        if n == 0:
            return
        p0 = self.roles[0][1][0]
        dev, dt = p0.device, p0.dtype
        if dt not in _PARAM_DTYPES:
            raise RuntimeError(f"{op}: expected float32, float64, float16 or bfloat16 params, "
                               f"got {dt}")
        low = dt in _LOW
        for i in range(n):
            p = self.roles[0][1][i]
            if p.layout != torch.strided:
                raise RuntimeError(f"{op}: params[{i}] is not a strided tensor ({p.layout})")
            if p.device != dev or p.dtype != dt:
                raise RuntimeError(f"{op}: params[{i}] is {p.dtype} on {p.device} but params[0] "
                                   f"is {dt} on {dev}; one call takes one device and dtype")
            for name, ts, _, state in self.roles[1:]:
                if not ts:
                    continue
                t = ts[i]
                if t.layout != torch.strided:
                    raise RuntimeError(f"{op}: {name}[{i}] is sparse; fused optimizers do not "
                                       f"support sparse gradients")
                if t.device != dev:
                    raise RuntimeError(f"{op}: {name}[{i}] is on {t.device} but params[{i}] is "
                                       f"on {dev}")
                want = torch.float32 if (state and low) else dt
                if t.dtype != want:
                    raise RuntimeError(f"{op}: {name}[{i}] is {t.dtype} but params[{i}] is {dt} "
                                       f"(expected {want})")
                if t.shape != p.shape:
                    raise RuntimeError(f"{op}: {name}[{i}] has shape {_fmt(t.shape)} but "
                                       f"params[{i}] has shape {_fmt(p.shape)}")
            if self.steps:
                s = self.steps[i]
                if s.numel() != 1 or s.dtype not in (torch.float32, torch.float64):
                    raise RuntimeError(f"{op}: state_steps[{i}] must be a 1-element float32 or "
                                       f"float64 tensor, got {s.dtype} of shape {_fmt(s.shape)}")
                if s.device.type != "cpu" and s.device != dev:
                    raise RuntimeError(f"{op}: state_steps[{i}] is on {s.device}; expected the "
                                       f"CPU or {dev}")
        for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
            if t is None:
                continue
            if t.numel() != 1 or t.dtype != torch.float32:
                raise RuntimeError(f"{op}: {name} must be a 1-element float32 tensor, got "
                                   f"{t.dtype} of shape {_fmt(t.shape)}")
            if t.device != dev:
                raise RuntimeError(f"{op}: {name} is on {t.device} but params are on {dev}")


    def dense(self) -> None:
        """Makes param i dense and every tensor of slot i share its layout, through working copies
        (params and state written back by finish(); grads only read). Copies nothing in the common
        case."""
        for i in range(self.n):
            p = self.roles[0][1][i]
            if not _dense(p):
                w = torch.empty_like(p, memory_format=torch.contiguous_format).copy_(p)
                self.copy_back.append((p, w))
                self.roles[0][1][i] = p = w
            for role in self.roles[1:]:
                ts, writes = role[1], role[2]
                if not ts or _same_layout(ts[i], p):
                    continue
                w = torch.empty_strided(p.shape, p.stride(), dtype=ts[i].dtype,
                                        device=p.device).copy_(ts[i])
                if writes:
                    self.copy_back.append((ts[i], w))
                ts[i] = w

    def finish(self) -> None:
        if self.copy_back:
            torch._foreach_copy_([o for o, _ in self.copy_back], [w for _, w in self.copy_back])
            self.copy_back.clear()




def _sgd_lists(params, grads, momentum_buffers, momentum, grad_scale, found_inf) -> _Lists:
    L = _Lists("sgd_step_", params, grads)
    L.add("momentum_buffers", momentum_buffers)
    L.check(grad_scale, found_inf)
    if momentum != 0:
        L.require("momentum_buffers", ", since momentum != 0")
    return L


def _adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                master_params, amsgrad, grad_scale, found_inf) -> _Lists:
    L = _Lists("adam_step_", params, grads)
    L.add("exp_avgs", exp_avgs)
    L.add("exp_avg_sqs", exp_avg_sqs)
    L.add("max_exp_avg_sqs", max_exp_avg_sqs)
    L.add("master_params", master_params)
    L.steps = list(state_steps)
    L.check(grad_scale, found_inf)  # master_params: float32 for low-precision params
    for name in ("exp_avgs", "exp_avg_sqs", "state_steps"):
        L.require(name)
    if amsgrad:
        L.require("max_exp_avg_sqs", ", since amsgrad=True")
    if master_params and L.roles[0][1][0].dtype not in _LOW:
        raise RuntimeError(f"adam_step_: master_params are for float16/bfloat16 params, got "
                           f"{L.roles[0][1][0].dtype} params; pass an empty list")
    return L


def _adagrad_lists(params, grads, state_sums, state_steps, grad_scale, found_inf) -> _Lists:
    L = _Lists("adagrad_step_", params, grads)
    L.add("state_sums", state_sums)
    L.steps = list(state_steps)
    L.check(grad_scale, found_inf)
    L.require("state_sums")
    L.require("state_steps")
    return L


def _rmsprop_lists(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps,
                   momentum, centered, grad_scale, found_inf) -> _Lists:
    L = _Lists("rmsprop_step_", params, grads)
    L.add("square_avgs", square_avgs)
    L.add("grad_avgs", grad_avgs)
    L.add("momentum_buffers", momentum_buffers)
    L.steps = list(state_steps)
    L.check(grad_scale, found_inf)
    L.require("square_avgs")
    L.require("state_steps")
    if centered:
        L.require("grad_avgs", ", since centered=True")
    if momentum > 0:
        L.require("momentum_buffers", ", since momentum > 0")
    return L


def _adadelta_lists(params, grads, square_avgs, acc_deltas, state_steps, grad_scale,
                    found_inf) -> _Lists:
    L = _Lists("adadelta_step_", params, grads)
    L.add("square_avgs", square_avgs)
    L.add("acc_deltas", acc_deltas)
    L.steps = list(state_steps)
    L.check(grad_scale, found_inf)
    for name in ("square_avgs", "acc_deltas", "state_steps"):
        L.require(name)
    return L


# ---- the fake implementations (the same for pyfastdl:: and pyfastdl_triton::) ---------------------
def sgd_step_fake(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                  maximize, first_step, grad_scale, found_inf) -> None:
    _sgd_lists(params, grads, momentum_buffers, momentum, grad_scale, found_inf)


def adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
                   lr, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
                   grad_scale, found_inf) -> None:
    _adam_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, master_params,
                amsgrad, grad_scale, found_inf)


def adagrad_step_fake(params, grads, state_sums, state_steps, lr, lr_decay, weight_decay, eps,
                      maximize, grad_scale, found_inf) -> None:
    _adagrad_lists(params, grads, state_sums, state_steps, grad_scale, found_inf)


def rmsprop_step_fake(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, lr,
                      alpha, eps, weight_decay, momentum, centered, maximize, grad_scale,
                      found_inf) -> None:
    _rmsprop_lists(params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps, momentum,
                   centered, grad_scale, found_inf)


def adadelta_step_fake(params, grads, square_avgs, acc_deltas, state_steps, lr, rho, eps,
                       weight_decay, maximize, grad_scale, found_inf) -> None:
    _adadelta_lists(params, grads, square_avgs, acc_deltas, state_steps, grad_scale, found_inf)


FAKES = {"sgd_step_": sgd_step_fake, "adam_step_": adam_step_fake, "adagrad_step_": adagrad_step_fake,
         "rmsprop_step_": rmsprop_step_fake, "adadelta_step_": adadelta_step_fake}
