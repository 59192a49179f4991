"""2-D pooling cases of the benchmark report (``python -m pyfastdl bench --families pool2d``).

Providers: ``pyfastdl-<backend>`` (``pyfastdl.functional.max_pool2d`` / ``avg_pool2d``, each kernel
backend of the device) and ``torch`` (``torch.nn.functional.max_pool2d`` / ``avg_pool2d`` eager:
what ``torch.nn.MaxPool2d`` / ``AvgPool2d`` run). Modes: "fwd" (no gradient: max pool computes no
indices, as torch's inference path) and "fwd+bwd" (forward, then ``autograd.grad`` of the input).
Layers: the notes' LeNet pools at batch 256 (2x2/2 on (256, 6, 28, 28) and (256, 16, 10, 10): the
5.3 ms of the LeNet-BN step the model issue looks at), ResNet's stem pool 3x3/2 pad 1 on
(8, 64, 112, 112), NCHW and channels_last; the per-call row, (1, 1, 1, 1) with a 1x1 window,
measures the cost of a call itself.

Bytes one iteration must move at least (x = input numel, y = output numel, s = itemsize):
  fwd      max: read x, write y;  avg: the same                         (x + y) s
  fwd+bwd  max: forward with indices (x s + y s + 8 y), backward reads dy and the indices and
           writes dx (y s + 8 y + x s)                                   2 x s + 2 y s + 16 y
           avg: (x + y) s forward, (y + x) s backward                    2 (x + y) s
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .core import Case, Target, pyfastdl_providers

__all__ = ["cases", "LAYERS"]

FAMILY = "pool2d"
FORMULA = ("bytes: fwd (x + y) s; fwd+bwd max 2 x s + 2 y s + 16 y (int64 indices written and read), "
           "avg 2 (x + y) s; x, y = input, output numel, s = itemsize")
MODES = ("fwd", "fwd+bwd")

# name -> (op, (N, C, H, W), kernel, stride, padding)
LAYERS = {
    "lenet max 2x2/2 28": ("max", (256, 6, 28, 28), 2, 2, 0),
    "lenet max 2x2/2 10": ("max", (256, 16, 10, 10), 2, 2, 0),
    "lenet avg 2x2/2 28": ("avg", (256, 6, 28, 28), 2, 2, 0),
    "lenet avg 2x2/2 10": ("avg", (256, 16, 10, 10), 2, 2, 0),
    "resnet stem max 3x3/2 112": ("max", (8, 64, 112, 112), 3, 2, 1),
    "per-call": ("max", (1, 1, 1, 1), 1, 1, 0),
}


def _out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def nbytes(layer, mode, itemsize=4):
    op, (N, C, H, W), k, s, p = layer
    x = N * C * H * W
    y = N * C * _out(H, k, s, p) * _out(W, k, s, p)
    if mode == "fwd":
        return (x + y) * itemsize
    if op == "max":
        return 2 * x * itemsize + 2 * y * itemsize + 16 * y
    return 2 * (x + y) * itemsize


def _providers(layer, layout, mode, dtype, device):
    import pyfastdl

    op, shape, k, s, p = layer
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    grad = mode == "fwd+bwd"
    ours = pyfastdl.functional.max_pool2d if op == "max" else pyfastdl.functional.avg_pool2d
    theirs = F.max_pool2d if op == "max" else F.avg_pool2d
    if grad:
        x.requires_grad_(True)
        dy = torch.randn(theirs(x.detach(), k, s, p).shape, generator=gen).to(device=device, dtype=dtype)
        dy = dy.contiguous(memory_format=fmt)

    def step(forward):
        if not grad:
            return lambda: forward(x)
        return lambda: torch.autograd.grad(forward(x), (x,), dy)

    out = pyfastdl_providers(device, step(lambda x: ours(x, k, s, p)))
    out["torch"] = step(lambda x: theirs(x, k, s, p))
    return out


def _targets(name):
    # memory-bound kernels: faster than torch's (the LeNet step's 5.3 ms of pooling); parity per call
    return [Target("pyfastdl-cpu", "torch", 1.0 if name == "per-call" else 1.5)]


def cases(device: str, quick: bool) -> list[Case]:
    """Every layer x layout x mode, float32 (quick: the same; these are cheap)."""
    on_cpu = not str(device).startswith("cuda")
    out = []
    for name, layer in LAYERS.items():
        layouts = ["NCHW"] if name == "per-call" else ["NCHW", "channels_last"]
        for layout in layouts:
            for mode in MODES:
                op, shape, k, s, p = layer
                out.append(Case(
                    family=FAMILY, name=f"{name} {layout}", mode=mode, dtype=torch.float32,
                    params={"op": f"{op}_pool2d", "shape": shape, "kernel_size": k, "stride": s, "padding": p,
                            "layout": layout},
                    make_providers=functools.partial(_providers, layer, layout, mode, torch.float32, device),
                    bytes=nbytes(layer, mode), bound="memory", formula=FORMULA,
                    targets=_targets(name) if on_cpu else []))
    return out
