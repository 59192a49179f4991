"""Host-side helpers shared by the Triton families (one home: no helper copied per family; docs/adding-an-op-family.md).

- ``INTERPRETED`` / ``is_interpreted``: whether ``@triton.jit`` built interpreter functions
  (``TRITON_INTERPRET=1`` set before triton was first imported); then the kernels run on CPU tensors.
- ``device_guard(t)``: every launcher runs its kernels inside it, so a tensor on ``cuda:1`` launches
  on ``cuda:1`` whatever the current device is (Triton launches on the current device and stream).
- ``split_f32(v)``: a Python float as two float32 values, for float64 kernels (Triton passes Python
  floats as float32).
"""
from __future__ import annotations

import contextlib
import math
import struct
from typing import Optional, Tuple

import torch
from torch import Tensor

import triton


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``@triton.jit`` function) runs under the Triton interpreter."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


@triton.jit
def _probe():
    pass


# Read once, when the first family module imports this one: TRITON_INTERPRET is read by
# @triton.jit at decoration time, so every family's kernels agree with this probe.
INTERPRETED = is_interpreted(_probe)

_NO_GUARD = contextlib.nullcontext()


def device_guard(t: Optional[Tensor]):
    """Context manager that makes ``t``'s CUDA device current for the launches inside it (what
    c10::cuda::CUDAGuard does for the CUDA C++ launchers); a no-op for CPU tensors (interpreter)
    and for None."""
    if t is not None and t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return _NO_GUARD


def split_f32(v: float) -> Tuple[float, float]:
    """v = hi + lo with hi, lo float32 values, to 2**-48 relative for 2**-100 <= |v| <= float32's
    largest value (below, lo is subnormal or zero and the relative precision drops: 1e-50 gives 0).

    NaN gives (nan, 0.0) and +-inf gives (+-inf, 0.0): lo is never NaN, so a kernel's hi + lo is v.
    A finite v beyond float32's range (1e39) gives (+-inf, 0.0)."""
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # finite, but rounds beyond float32's largest value
        hi = math.copysign(math.inf, v)
    if math.isinf(hi) or math.isnan(hi):
        return hi, 0.0
    return hi, struct.unpack("f", struct.pack("f", v - hi))[0]


__all__ = ["INTERPRETED", "is_interpreted", "device_guard", "split_f32"]
