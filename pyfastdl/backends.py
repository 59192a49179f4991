"""Which implementation runs: one place decides (docs/architecture.md, "Backends and dispatch").

Backends: ``cpu`` (C++ kernels, CPU tensors), ``cuda`` (CUDA C++ kernels, CUDA tensors), ``triton``
(Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``reference`` (the
notes' pure-Python math, following torch's conventions).

Default: ``cpu`` for CPU tensors, ``cuda`` for CUDA tensors. ``use(name)`` (a setter and a context
manager) or the environment variable ``PYFASTDL_BACKEND`` chooses another; an explicitly chosen
backend that is not built, or does not run on the tensor's device, raises. When a kernel does not
cover a case (a dtype, say) the call falls back visibly -- ``last_dispatch()`` says what ran and why --
and with ``PYFASTDL_STRICT=1`` the fallback raises instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import os
import pkgutil
import threading

import torch

__all__ = ["NAMES", "built", "available", "use", "current", "last_dispatch", "strict", "set_strict", "Dispatch",
           "BackendError", "resolve", "pick", "ops", "record", "dtype_covers", "picked"]

NAMES = ("cpu", "cuda", "triton", "reference")
_log = logging.getLogger("pyfastdl.backends")


class _State(threading.local):
    """Per-thread choice and last dispatch. Class-level defaults: reading an attribute a thread has not
    set finds these, instead of raising (and catching) an AttributeError on every call (~1.5 us)."""
    chosen: str | None = None
    last: "Dispatch | None" = None


_state = _State()


class BackendError(RuntimeError):
    """A backend was asked for that cannot run this call, or a fallback was refused (strict mode)."""


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """What ran for the last pyfastdl call of this thread."""
    op: str
    backend: str              # "cpu" | "cuda" | "triton" | "reference" | "torch"
    fallback: str | None = None  # why the intended backend did not run, when it did not


# Facts about this installation, computed once. Plain module-level values rather than
# functools.lru_cache: torch.compile warns about (and traces through) lru_cache-wrapped calls.
_BUILD_INFO = dict(item.partition("=")[::2] for item in torch.ops.pyfastdl.build_info().split(";"))
_CUDA_BUILT = _BUILD_INFO.get("cuda") == "1"


def _build_info() -> dict:
    return _BUILD_INFO


_memo: dict = {}


def _triton_importable() -> bool:
    # find_spec, not import: choosing a backend must not import triton (slow) until it is used
    if "triton" not in _memo:
        _memo["triton"] = importlib.util.find_spec("triton") is not None
    return _memo["triton"]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


# Configuration is read once, at import (per-call cost: no environment lookups on the hot path).
# ``set_strict`` changes it at run time (the tests use it as a context manager).
_config = {"strict": _env_flag("PYFASTDL_STRICT"),
           "backend": os.environ.get("PYFASTDL_BACKEND", "").strip().lower() or None,
           "interpret": os.environ.get("TRITON_INTERPRET", "0") == "1"}


def strict() -> bool:
    """True when PYFASTDL_STRICT=1 was set at import (or ``set_strict(True)``): every fallback raises."""
    return _config["strict"]


class set_strict(contextlib.ContextDecorator):
    """``set_strict(False)`` turns strict mode off (process-wide); as a context manager it restores the
    previous setting on exit: ``with pyfastdl.backends.set_strict(False): ...``."""

    def __init__(self, on: bool):
        self._previous = _config["strict"]
        _config["strict"] = bool(on)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _config["strict"] = self._previous
        return False


def built() -> dict:
    """Which backends this installation has: {"cpu": True, "cuda": bool, "triton": bool, "reference": True}."""
    return {"cpu": True, "cuda": _CUDA_BUILT, "triton": _triton_importable(), "reference": True}


def _interpreting() -> bool:
    # read when first needed (the test session sets TRITON_INTERPRET before triton's first import)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str) -> list[str]:
    """The backends that can run tensors on ``device`` here, fastest first."""
    device = torch.device(device)
    b = built()
    if device.type == "cpu":
        names = ["cpu"] + (["triton"] if b["triton"] and _interpreting() else [])
    elif device.type == "cuda":
        names = (["cuda"] if b["cuda"] else []) + (["triton"] if b["triton"] else [])
    else:
        names = []
    return names + ["reference"]


def current() -> str | None:
    """The explicitly chosen backend (``use`` or PYFASTDL_BACKEND), or None for the default."""
    chosen = _state.chosen
    return chosen if chosen is not None else _config["backend"]


class use(contextlib.ContextDecorator):
    """Choose the backend: ``pyfastdl.backends.use("triton")`` sets it for this thread;
    ``with pyfastdl.backends.use("triton"): ...`` sets it for the block. ``use(None)`` restores the
    default choice."""

    def __init__(self, name: str | None):
        if name is not None and name not in NAMES:
            raise ValueError(f"unknown backend {name!r}; expected one of {NAMES} or None")
        if name == "triton":
            _import_triton_families()
        self._previous = _state.chosen
        _state.chosen = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state.chosen = self._previous
        return False


def record(op: str, backend: str, fallback: str | None = None) -> None:
    """Notes what ran; a fallback raises under PYFASTDL_STRICT=1 and is logged otherwise."""
    if fallback is not None:
        if strict():
            raise BackendError(f"pyfastdl.{op}: {fallback}; refusing to fall back to {backend} "
                               "because PYFASTDL_STRICT=1")
        _log.info("pyfastdl.%s: %s; running %s", op, fallback, backend)
        _state.last = Dispatch(op, backend, fallback)
    else:  # the hot path: one cached record per (op, backend)
        key = (op, backend)
        d = _CLEAN.get(key)
        if d is None:
            d = _CLEAN[key] = Dispatch(op, backend, None)
        _state.last = d


# (op, backend) -> Dispatch; a plain dict, not functools.lru_cache (which torch.compile warns about)
_CLEAN: dict = {}


def last_dispatch() -> Dispatch | None:
    """The backend that ran the last pyfastdl call of this thread (and the fallback reason, if any)."""
    return _state.last


def resolve(op: str, device: torch.device, covers) -> tuple[str, str | None]:
    """Picks the backend for ``op`` on ``device``. ``covers(backend)`` returns None when that backend's
    kernel handles the call, or the reason it does not. Returns (backend, fallback_reason); backend
    "torch" means PyTorch's own op."""
    chosen = current()
    if chosen is None and (device.type == "cpu" or (device.type == "cuda" and _CUDA_BUILT)):
        intended = device.type  # the common case, kept cheap: the default kernel backend is built
        reason = covers(intended)
        if reason is None:
            return intended, None
        return "torch", f"backend {intended!r} does not cover this call ({reason})"
    names = available(device)
    if chosen is not None:
        if chosen not in NAMES:
            raise BackendError(f"PYFASTDL_BACKEND={chosen!r} is not one of {NAMES}")
        if chosen not in names:
            why = ("not built in this installation" if not built().get(chosen, False)
                   else f"does not run {device.type} tensors"
                   + (" (set TRITON_INTERPRET=1 before importing triton for CPU tensors)"
                      if chosen == "triton" and device.type == "cpu" else ""))
            raise BackendError(f"pyfastdl.{op}: backend {chosen!r} was requested but it is {why}")
        reason = covers(chosen)
        if reason is None:
            return chosen, None
        return "torch", f"backend {chosen!r} does not cover this call ({reason})"
    intended = "cuda" if device.type == "cuda" else "cpu"
    if intended not in names:
        kernels = [n for n in names if n != "reference" and covers(n) is None]
        why = f"backend {intended!r} is not built" if device.type in ("cpu", "cuda") else \
            f"no pyfastdl backend runs {device.type} tensors"
        return (kernels[0] if kernels else "torch"), why
    reason = covers(intended)
    if reason is None:
        return intended, None
    return "torch", f"backend {intended!r} does not cover this call ({reason})"


# (op, device, dtype) -> the Dispatch of the default kernel backend, for calls whose coverage
# depends on the dtype only (``pick``); filled on first use, valid while no backend is chosen.
_PICKED: dict = {}


def pick(op: str, device: torch.device, dtype: torch.dtype, table: dict) -> str:
    """``resolve`` with ``dtype_covers(table, dtype)``, then ``record``: returns the backend. The
    common case (no backend chosen, the default kernel covers the dtype) is one dict lookup."""
    if _state.chosen is None and _config["backend"] is None:
        d = _PICKED.get((op, device, dtype))  # the device itself: torch.device.type costs ~1 us
        if d is not None:
            _state.last = d
            return d.backend
        backend, fallback = resolve(op, device, dtype_covers(table, dtype))
        record(op, backend, fallback)
        if fallback is None and backend == device.type:
            _PICKED[(op, device, dtype)] = _state.last
        return backend
    backend, fallback = resolve(op, device, dtype_covers(table, dtype))
    record(op, backend, fallback)
    return backend


def dtype_covers(table: dict, dtype: torch.dtype):
    """A ``covers(backend)`` for ``resolve``: None when ``table[backend]`` (the dtypes that backend's
    kernel takes) has ``dtype`` -- the reference takes every dtype --, else the reason."""
    def covers(backend):
        if backend == "reference" or dtype in table.get(backend, ()):
            return None
        return f"dtype {dtype}"
    return covers


def ops(backend: str, family: str):
    """The op namespace of a kernel backend: torch.ops.pyfastdl (cpu, cuda) or, for triton,
    torch.ops.pyfastdl_triton after importing that family's kernels (pyfastdl/triton_kernels/<family>.py)."""
    if backend == "triton":
        if family not in _TRITON_FAMILIES:  # imported once: torch.compile cannot trace an import
            importlib.import_module(f"pyfastdl.triton_kernels.{family}")
            _TRITON_FAMILIES.add(family)
        return torch.ops.pyfastdl_triton
    return _PYFASTDL_OPS


_PYFASTDL_OPS = torch.ops.pyfastdl
_TRITON_FAMILIES: set = set()


def _import_triton_families() -> None:
    """Registers every family's Triton ops now (``use("triton")`` calls it), so that a function
    compiled later with torch.compile finds them registered: dynamo cannot trace an import. Without
    triton this does nothing (resolve then says the backend is not available)."""
    try:
        import pyfastdl.triton_kernels as tk
        for m in pkgutil.iter_modules(tk.__path__):
            if not m.name.startswith("_") and m.name not in _TRITON_FAMILIES:
                importlib.import_module(f"pyfastdl.triton_kernels.{m.name}")
                _TRITON_FAMILIES.add(m.name)
    except ImportError:
        pass


def picked(op: str, device: torch.device, dtype: torch.dtype) -> "Dispatch | None":
    """The per-call path's ``pick``: when no backend is chosen and an earlier ``pick`` of (op, device,
    dtype) found the default kernel backend covering it, records that Dispatch and returns it (its
    ``backend`` is ``device.type``); None otherwise (the caller then takes its full path, which picks)."""
    if _state.chosen is None and _config["backend"] is None:
        d = _PICKED.get((op, device, dtype))
        if d is not None:
            _state.last = d
        return d
    return None
