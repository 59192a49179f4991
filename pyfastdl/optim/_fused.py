"""Drop-in replacements for torch.optim's SGD, Adam, AdamW, Adagrad, RMSprop and Adadelta.

Each class subclasses torch's own (same constructor, defaults, checks, param groups, state_dict
layout, hooks, LR schedulers) and replaces ``step()``: per param group and per (device, dtype), one
call of a fused multi-tensor kernel (csrc/ops.cpp has the update rules) that reads every param,
gradient and state tensor once and writes them once.

Backends as everywhere in pyfastdl (``pyfastdl.backends``): ``cpu`` (float32/float64), ``cuda`` and
``triton`` (float32/float16/bfloat16, float32 state for the low-precision params), ``reference``
(``pyfastdl.reference.optim``: the same rules as plain per-tensor torch ops). Calls a kernel does not
cover run the reference and say so (``last_dispatch()``; ``PYFASTDL_STRICT=1`` raises instead).

Complex params (torch accepts them): their state is complex, as torch's state_dict keeps it, and
the kernels update the real views (``torch.view_as_real``) of param, gradient and state, which is
what torch's single-tensor rules do. FSDP2 (``fully_shard``): DTensor params, their gradients and
state (DTensors too, sharded alike, as torch's) are updated through their local shards; the update
is elementwise, so each rank steps its shard (tests/test_distributed.py).

Where this differs from torch: the fused kernels do not write the unscaled gradient back into
``p.grad`` when a GradScaler passes ``grad_scale`` (torch's fused kernels do); a tensor ``lr`` on a
GPU is read with ``.item()`` (one sync per step); ``differentiable=True`` is refused.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

from .. import backends
from ..reference import optim as _reference
from ._lists import FAKES as _FAKES

# The C++ ops' fake implementations (torch.compile, opcheck): the same functions as the Triton ops'
# (pyfastdl/optim/_lists.py), which check the lists and return nothing.
for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"pyfastdl::{_name}")(_fake)

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta"]

_KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
_LOW = (torch.float16, torch.bfloat16)


def _value(x) -> float:
    """A hyper-parameter as a Python float (tensor lr / betas are allowed, as in torch)."""
    return float(x) if isinstance(x, torch.Tensor) else x


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _new_step(p: torch.Tensor) -> torch.Tensor:
    """torch's state["step"]: on the CPU in the default scalar dtype (torch's non-fused layout);
    on a GPU on the param's device in float32, as torch's fused optimizers keep it (no host sync)."""
    if p.device.type == "cpu":
        return torch.tensor(0.0, dtype=_scalar_dtype())
    return torch.zeros((), dtype=torch.float32, device=p.device)


_HUGE_PAGE = 2 << 20


@functools.lru_cache(None)
def _madvise():
    """libc's madvise when transparent huge pages can be asked for (Linux, THP not "never",
    PYFASTDL_HUGE_PAGES not 0), else None."""
    if not sys.platform.startswith("linux") or os.environ.get("PYFASTDL_HUGE_PAGES", "1") == "0":
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def _empty_state(p: torch.Tensor) -> torch.Tensor:
    """An uninitialized state tensor for ``p`` (float32 for float16/bfloat16 params). A large CPU
    state tensor asks for 2 MB pages (madvise(MADV_HUGEPAGE) before its pages are first touched):
    the step streams several arrays at once, and with 4 KB pages in a VM each stream pays nested
    page walks -- measured 6% of an Adam step on the ResNet-18 set (bench/results)."""
    dtype = torch.float32 if p.dtype in _LOW else p.dtype
    t = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
    nbytes = t.numel() * t.element_size()
    madvise = _madvise() if type(t) is torch.Tensor and t.device.type == "cpu" and nbytes >= 2 * _HUGE_PAGE else None
    if madvise is not None:
        lo = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        hi = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        madvise(lo, hi - lo, 14)  # MADV_HUGEPAGE; a refusal only costs the speed-up
    return t


def _state_like(p: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """A state tensor for ``p`` filled with ``fill``; complex params get ``fill`` in both the real
    and the imaginary part (torch's Adagrad: complex(initial_accumulator_value, same))."""
    return _empty_state(p).fill_(complex(fill, fill) if p.is_complex() else fill)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


_DTensor = _dtensor_type()


def _real(t):
    """What the kernels see of a param-shaped tensor: a DTensor's local shard (FSDP2's sharded
    params, their gradients and state: the update is elementwise, so each rank updates its shard),
    and of a complex tensor its real view (..., 2), as torch's single-tensor rules do."""
    if not isinstance(t, torch.Tensor):
        return t
    if _DTensor is not None and isinstance(t, _DTensor):
        t = t.to_local()
    return torch.view_as_real(t) if t.is_complex() else t


def _plain(params) -> bool:
    """One bucket's params (one dtype) need no views: real and no DTensor among them."""
    return not params[0].is_complex() and (_DTensor is None or not any(isinstance(p, _DTensor) for p in params))


def _check_dtensors(op_name, lists, state_lists):
    """A DTensor param's gradient and state must be laid out like it (same mesh and placements),
    for its local shard to be updated from theirs; plain tensors cannot mix with DTensor params."""
    if _DTensor is None:
        return
    params = lists[0]
    for pos in (1,) + state_lists:
        for i, (p, t) in enumerate(zip(params, lists[pos])):
            if t is None or isinstance(p, _DTensor) == isinstance(t, _DTensor) and (
                    not isinstance(p, _DTensor) or (t.device_mesh == p.device_mesh
                                                    and t.placements == p.placements)):
                continue
            what = "gradient" if pos == 1 else "state tensor"
            lay = lambda x: f"DTensor{tuple(x.placements)}" if isinstance(x, _DTensor) else "a plain tensor"
            raise RuntimeError(f"pyfastdl.optim.{op_name}: the {what} of param {i} is {lay(t)} but the param is "
                               f"{lay(p)}; a sharded (DTensor) param needs its gradient and state sharded alike")


class _FusedStep:
    """The shared step(): collects each group's params with gradients (lazily creating state the way
    torch does), splits them by (device, dtype), and hands each bucket's lists (``_lists``) to ``_call``."""

    _op: str  # the op's name in csrc/ops.cpp

    def _check_supported(self):
        for group in self.param_groups:
            if group.get("differentiable", False):
                raise ValueError(f"pyfastdl.optim.{type(self).__name__} does not support differentiable=True; "
                                 f"use torch.optim.{type(self).__name__}")
        # GradScaler hands grad_scale / found_inf to the step instead of unscaling gradients itself
        self._step_supports_amp_scaling = True

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if param_group.get("differentiable", False):
            raise ValueError(f"pyfastdl.optim.{type(self).__name__} does not support differentiable=True")

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step (one fused kernel call per group and device/dtype).

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        if getattr(self, "_in_backward", False):
            raise RuntimeError(f"pyfastdl.optim.{type(self).__name__}: this optimizer steps inside backward "
                               "(step_in_backward); step() must not be called as well")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_params(group, params, grad_scale, found_inf)
        return loss

    def _step_params(self, group, params, grad_scale=None, found_inf=None):
        """One group's update for ``params`` (all with gradients)."""
        first = params[0]
        device, dtype = first.device, first.dtype
        if all(p.device == device and p.dtype == dtype for p in params):
            buckets = [self._lists(group, params)]
        else:  # several kernel calls: every bucket's state is checked before the first one writes
            by_kind = {}
            for p in params:
                by_kind.setdefault((p.device, p.dtype), []).append(p)
            buckets = [self._lists(group, ps) for ps in by_kind.values()]
            for lists in buckets:
                self._check_states(lists)
        name = f"optim.{type(self).__name__}"
        for lists in buckets:
            b_dev, b_dtype = lists[0][0].device, lists[0][0].dtype
            if b_dtype.is_complex:  # the kernels run on the real views
                b_dtype = b_dtype.to_real()
            backend, fallback = backends.resolve(name, b_dev, backends.dtype_covers(_KERNEL_DTYPES, b_dtype))
            scale = grad_scale.to(b_dev) if grad_scale is not None else None
            inf = found_inf.to(b_dev) if found_inf is not None else None
            if backend in ("cpu", "cuda", "triton"):
                backends.record(name, backend)
                fn = getattr(backends.ops(backend, "optim"), self._op)
            else:  # reference, or a kernel that does not cover this call
                backends.record(name, "reference", fallback)
                fn = getattr(_reference, self._op)
            self._call(fn, group, self._real_lists(lists), scale, inf)

    def _real_lists(self, lists):
        """``lists`` with the param-shaped tensors as the kernels see them (``_real``)."""
        if _plain(lists[0]):
            return lists
        _check_dtensors(type(self).__name__, lists, self._state_lists)
        return tuple([_real(t) for t in ts] if pos in (0, 1) + self._state_lists else ts
                     for pos, ts in enumerate(lists))

    # positions, in the tuple _lists returns, of the lists of state tensors shaped like the params
    _state_lists: tuple = ()

    def _check_states(self, lists):
        """Each state tensor on its param's device, in its dtype (float32 for float16/bfloat16) and
        shape -- what the kernel launchers check, for the case of several kernel calls."""
        params = lists[0]
        for pos in self._state_lists:
            for p, t in zip(params, lists[pos]):
                if t is None:
                    continue
                want = torch.float32 if p.dtype in _LOW else p.dtype
                if t.device != p.device or t.dtype != want or t.shape != p.shape:
                    raise RuntimeError(
                        f"pyfastdl.optim.{type(self).__name__}: state tensor of dtype {t.dtype} on {t.device} "
                        f"with shape {tuple(t.shape)} does not match its param ({p.dtype} on {p.device}, shape "
                        f"{tuple(p.shape)})")

    def _grads(self, params):
        grads = []
        for p in params:
            g = p.grad
            if g.is_sparse:
                raise RuntimeError(f"pyfastdl.optim.{type(self).__name__} does not support sparse gradients")
            grads.append(g)
        return grads


class SGD(_FusedStep, torch.optim.SGD):
    __doc__ = torch.optim.SGD.__doc__
    _op = "sgd_step_"
    _state_lists = (2,)  # momentum buffers (None before the first step)

    def _real_lists(self, lists):
        if not _plain(lists[0]):
            _check_dtensors(type(self).__name__, lists, self._state_lists)
        return lists  # _call takes the views itself (it creates buffers, keyed by the params)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported()

    def _lists(self, group, params):
        grads = self._grads(params)
        bufs = []
        if group["momentum"] != 0:
            for p in params:
                bufs.append(self.state[p].get("momentum_buffer"))
        return (params, grads, bufs)

    def _call(self, fn, group, lists, scale, inf):
        keys, grads, bufs = lists
        view = (lambda ts: ts) if _plain(keys) else (lambda ts: [_real(t) for t in ts])
        params, grads = view(keys), view(grads)
        lr, momentum = _value(group["lr"]), group["momentum"]
        rest = (group["dampening"], group["weight_decay"], group["nesterov"], group["maximize"])
        if momentum == 0:
            fn(params, grads, [], lr, momentum, *rest, False, scale, inf)
            return
        fresh = [i for i, b in enumerate(bufs) if b is None]
        if fresh and inf is not None and float(inf) != 0:
            # a skipped first step creates no buffer (torch's fused SGD would keep an uninitialized
            # one); this reads found_inf on the host, only while some buffer is still missing
            return
        if len(fresh) == len(bufs):
            bufs = [_empty_state(p) for p in keys]
            fn(params, grads, view(bufs), lr, momentum, *rest, True, scale, inf)
        elif fresh:
            old = [i for i, b in enumerate(bufs) if b is not None]
            new_bufs = {i: _empty_state(keys[i]) for i in fresh}
            fn([params[i] for i in old], [grads[i] for i in old], view([bufs[i] for i in old]), lr, momentum,
               *rest, False, scale, inf)
            fn([params[i] for i in fresh], [grads[i] for i in fresh], view([new_bufs[i] for i in fresh]), lr,
               momentum, *rest, True, scale, inf)
            bufs = [new_bufs.get(i, b) for i, b in enumerate(bufs)]
        else:
            fn(params, grads, view(bufs), lr, momentum, *rest, False, scale, inf)
        for p, b in zip(keys, bufs):
            self.state[p]["momentum_buffer"] = b


class Adam(_FusedStep, torch.optim.Adam):
    __doc__ = torch.optim.Adam.__doc__
    _op = "adam_step_"
    _state_lists = (2, 3, 4)

    def __init__(self, *args, master_weights: bool = False, **kwargs):
        """torch.optim.Adam's arguments, plus ``master_weights``: keep a float32 master copy of each
        float16/bfloat16 param in the state ("master_param") and update that (GPU backends)."""
        super().__init__(*args, **kwargs)
        self.master_weights = master_weights
        self._check_supported()

    def _lists(self, group, params):
        grads = self._grads(params)
        exp_avgs, exp_avg_sqs, max_sqs, steps, masters = [], [], [], [], []
        amsgrad = group["amsgrad"]
        master = getattr(self, "master_weights", False)
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step(p)
                state["exp_avg"] = _state_like(p)
                state["exp_avg_sq"] = _state_like(p)
                if amsgrad:
                    state["max_exp_avg_sq"] = _state_like(p)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_sqs.append(state["max_exp_avg_sq"])
            steps.append(state["step"])
            if master and p.dtype in _LOW:
                if "master_param" not in state:
                    state["master_param"] = p.detach().float()
                masters.append(state["master_param"])
        return (params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, masters)

    def _call(self, fn, group, lists, scale, inf):
        beta1, beta2 = group["betas"]
        fn(*lists, _value(group["lr"]), _value(beta1), _value(beta2), group["weight_decay"], group["eps"],
           group["amsgrad"], group["maximize"], group.get("decoupled_weight_decay", False), scale, inf)


class AdamW(_FusedStep, torch.optim.AdamW):
    __doc__ = torch.optim.AdamW.__doc__
    _op = "adam_step_"
    _state_lists = (2, 3, 4)
    _lists = Adam._lists

    def __init__(self, *args, master_weights: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.master_weights = master_weights
        self._check_supported()

    def _call(self, fn, group, lists, scale, inf):
        beta1, beta2 = group["betas"]
        fn(*lists, _value(group["lr"]), _value(beta1), _value(beta2), group["weight_decay"], group["eps"],
           group["amsgrad"], group["maximize"], True, scale, inf)


class Adagrad(_FusedStep, torch.optim.Adagrad):
    __doc__ = torch.optim.Adagrad.__doc__
    _op = "adagrad_step_"
    _state_lists = (2,)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported()
        # torch's constructor creates the state (sum = initial_accumulator_value); the sums are
        # made again by _state_like (large pages), GPU steps go to the device (the kernels read them there)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["sum"] = _state_like(p, group["initial_accumulator_value"])
                if p.device.type != "cpu":
                    state["step"] = _new_step(p)

    def _lists(self, group, params):
        grads = self._grads(params)
        sums, steps = [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:  # a param added after construction without add_param_group's init
                state["step"] = _new_step(p)
                state["sum"] = _state_like(p, group["initial_accumulator_value"])
            sums.append(state["sum"])
            steps.append(state["step"])
        return (params, grads, sums, steps)

    def _call(self, fn, group, lists, scale, inf):
        fn(*lists, _value(group["lr"]), group["lr_decay"], group["weight_decay"], group["eps"], group["maximize"],
           scale, inf)


class RMSprop(_FusedStep, torch.optim.RMSprop):
    __doc__ = torch.optim.RMSprop.__doc__
    _op = "rmsprop_step_"
    _state_lists = (2, 3, 4)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported()

    def _lists(self, group, params):
        grads = self._grads(params)
        sq, ga, bufs, steps = [], [], [], []
        centered, momentum = group["centered"], group["momentum"]
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step(p)
                state["square_avg"] = _state_like(p)
                if momentum > 0:
                    state["momentum_buffer"] = _state_like(p)
                if centered:
                    state["grad_avg"] = _state_like(p)
            sq.append(state["square_avg"])
            if centered:
                ga.append(state["grad_avg"])
            if momentum > 0:
                bufs.append(state["momentum_buffer"])
            steps.append(state["step"])
        return (params, grads, sq, ga, bufs, steps)

    def _call(self, fn, group, lists, scale, inf):
        fn(*lists, _value(group["lr"]), group["alpha"], group["eps"], group["weight_decay"], group["momentum"],
           group["centered"], group["maximize"], scale, inf)


class Adadelta(_FusedStep, torch.optim.Adadelta):
    __doc__ = torch.optim.Adadelta.__doc__
    _op = "adadelta_step_"
    _state_lists = (2, 3)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_supported()

    def _lists(self, group, params):
        grads = self._grads(params)
        sq, acc, steps = [], [], []
        for p in params:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = _new_step(p)
                state["square_avg"] = _state_like(p)
                state["acc_delta"] = _state_like(p)
            sq.append(state["square_avg"])
            acc.append(state["acc_delta"])
            steps.append(state["step"])
        return (params, grads, sq, acc, steps)

    def _call(self, fn, group, lists, scale, inf):
        fn(*lists, _value(group["lr"]), group["rho"], group["eps"], group["weight_decay"], group["maximize"],
           scale, inf)
