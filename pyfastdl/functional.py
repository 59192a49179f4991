"""The functional API: drop-in for ``torch.nn.functional`` (thin: validate, pick a backend, call the
autograd Function). Data flows module -> functional -> backend choice -> Function -> op -> kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from .autograd import BatchNormFunction
from .reference import batch_norm_like_torch

__all__ = ["batch_norm"]

# Input dtypes each kernel backend covers; anything else falls back (visibly, never when strict).
_BATCH_NORM_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
_ACTIVATIONS = (None, "relu")
_BN_TENSOR_ARGS = ("weight", "bias", "running_mean", "running_var")


def _check_same_device(op: str, input: torch.Tensor, names: tuple, tensors: tuple) -> None:
    """Optional tensor arguments must be Tensors on input's device (checked here: the dispatcher
    would otherwise route a mixed call to another device's kernel)."""
    device = input.device
    for name, t in zip(names, tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: expected {name} to be a Tensor or None, got {type(t).__name__}")
        if t.device != device:
            raise RuntimeError(f"{op}: expected {name} on {device} like input, got {name} on {t.device}")


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               activation: str | None = None) -> torch.Tensor:
    """Batch normalization over dim 1, drop-in for ``torch.nn.functional.batch_norm``.

    input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), float32/float64 (CPU kernels; CUDA and
    Triton also float16/bfloat16); contiguous or channels_last (read without a copy).
    running_mean, running_var: (C,) or None, updated in place when training (torch's rule: unbiased
    variance, ``momentum`` weights the new statistic). weight, bias: (C,) or None.
    activation: None, or "relu" to fuse max(y, 0) into the kernel (pyfastdl's own argument).
    Returns y of input's shape, dtype and memory format. Ioffe & Szegedy 2015; notes section 28.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: expected input to be a Tensor, got {type(input).__name__}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"batch_norm: expected activation in {_ACTIVATIONS}, got {activation!r}")
    _check_same_device("batch_norm", input, _BN_TENSOR_ARGS, (weight, bias, running_mean, running_var))
    if not input.is_floating_point():
        raise RuntimeError(f"batch_norm: expected a floating-point input, got input of dtype {input.dtype}")
    relu = activation == "relu"

    def covers(backend):
        if backend == "reference":
            return None
        if input.dtype not in _BATCH_NORM_DTYPES[backend]:
            return f"input dtype {input.dtype}"
        return None

    backend, fallback = backends.resolve("batch_norm", input.device, covers)
    backends.record("batch_norm", backend, fallback)
    if backend == "torch":
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(y) if relu else y
    if backend == "reference":
        if training and input.numel() // max(input.shape[1], 1) <= 1 and input.numel() > 0:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        return batch_norm_like_torch(input, running_mean, running_var, weight, bias, training,
                                     momentum, eps, activation)
    ops = backends.ops(backend, "batch_norm")
    if not (torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                         or (bias is not None and bias.requires_grad))):
        # Nothing to differentiate: the op alone, without the autograd Function's bookkeeping.
        return ops.batch_norm_fwd(input, weight, bias, running_mean, running_var, bool(training),
                                  float(momentum), float(eps), relu)[0]
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, bool(training),
                                   float(momentum), float(eps), relu, ops)
