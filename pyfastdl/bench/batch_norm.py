"""Batch-norm cases of the benchmark report (``python -m pyfastdl bench --families batch_norm``).

Providers: ``pyfastdl-<backend>`` (``pyfastdl.functional.batch_norm``, each kernel backend of the
device), ``torch`` (``torch.nn.functional.batch_norm`` eager, which is what ``torch.nn.BatchNorm2d``
runs), ``torch.compile`` (of that same function) and ``reference`` (the notes' ``BatchNorm`` module,
2-D or 4-D input only). Modes: "train fwd", "train fwd+bwd" (forward, then ``autograd.grad`` of input,
weight and bias; nothing accumulates into ``.grad``) and "eval fwd". The per-call row, BatchNorm1d on
(2, 1) (the smallest valid training input), measures the cost of a call itself: Python, dispatch,
autograd and the launchers' allocations; its target is parity with torch's own call.

Bytes one iteration must move at least (numel x itemsize per pass over the activation; the (C,)
statistics and parameters are negligible and not counted):
  train fwd      3 passes: read x (one-pass statistics), read x again to normalize, write y
  eval fwd       2 passes: read x, write y
  train fwd+bwd  8 passes: forward 3 + backward 5 (read dy and x for sum(dy) and sum(dy * x_hat),
                 then read dy and x again and write dx)
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .core import Case, Target, pyfastdl_providers, torch_compile

__all__ = ["cases", "PASSES", "make_inputs", "torch_batch_norm"]

FAMILY = "batch_norm"
MOMENTUM, EPS = 0.1, 1e-5
PASSES = {"train fwd": 3, "eval fwd": 2, "train fwd+bwd": 8}
FORMULA = ("bytes = passes x numel x itemsize; passes: train fwd 3 (read x for the statistics, read x, "
           "write y), eval fwd 2 (read x, write y), train fwd+bwd 8 (forward 3 + backward 5: read dy and "
           "x for the two reductions, read dy and x, write dx)")

# (shape, layout); the targets hold for the CPU, float32, NCHW. (2, 1) is the per-call row:
# the smallest valid training input, whose time is the call's overhead (Python, dispatch, autograd).
PER_CALL = ((2, 1), "NC")
SHAPES = [((32, 64, 56, 56), "NCHW"), ((32, 256, 14, 14), "NCHW"), ((256, 120), "NC"),
          ((32, 64, 56, 56), "channels_last"), ((32, 256, 14, 14), "channels_last"), ((8, 3, 17, 17), "NCHW"),
          PER_CALL]
_CONV_TARGETS = {"train fwd": [("torch", 2.2), ("torch.compile", 1.2)],
                 "train fwd+bwd": [("torch", 2.2), ("torch.compile", 1.2)],
                 "eval fwd": [("torch", 1.0)]}
_BN1D_TARGETS = {"train fwd": [("torch", 1.5)], "train fwd+bwd": [("torch", 1.5)]}
_PER_CALL_TARGETS = {"train fwd": [("torch", 1.0)], "train fwd+bwd": [("torch", 1.0)]}
CPU_TARGETS = {((32, 64, 56, 56), "NCHW"): _CONV_TARGETS, ((32, 256, 14, 14), "NCHW"): _CONV_TARGETS,
               ((256, 120), "NC"): _BN1D_TARGETS, PER_CALL: _PER_CALL_TARGETS}


def torch_batch_norm(x, running_mean, running_var, weight, bias, training):
    """The PyTorch side, eager or under torch.compile."""
    return F.batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)


def make_inputs(shape, layout, dtype, device, grad):
    """x (N, C, *) in ``layout``, weight and bias (C,), running statistics (C,), and dy like x when
    ``grad`` (then x, weight and bias require grad). Random, never all zeros or ones."""
    gen = torch.Generator().manual_seed(0)
    C = shape[1]

    def rand(*size, scale=1.0, shift=0.0):
        return (torch.randn(*size, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    x = rand(*shape, scale=2.0, shift=0.5)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = {"x": x, "weight": rand(C, scale=0.2, shift=1.0), "bias": rand(C, scale=0.2),
              "running_mean": rand(C, scale=0.1), "running_var": rand(C, scale=0.1, shift=1.0).abs()}
    if grad:
        inputs["dy"] = torch.randn_like(x)
        for name in ("x", "weight", "bias"):
            inputs[name].requires_grad_(True)
    return inputs


def _providers(shape, layout, dtype, device, mode, with_reference):
    """Inputs created once, shared by every provider; each provider has its own running statistics
    (training updates them in place)."""
    training, grad = mode != "eval fwd", mode == "train fwd+bwd"
    inp = make_inputs(shape, layout, dtype, device, grad)
    x, w, b = inp["x"], inp["weight"], inp["bias"]

    def stats():
        return inp["running_mean"].clone(), inp["running_var"].clone()

    def step(forward, params=(w, b)):
        """One iteration of the mode around ``forward(x) -> y``."""
        if not grad:
            return lambda: forward(x)
        return lambda: torch.autograd.grad(forward(x), (x, *params), inp["dy"])

    import pyfastdl
    rm, rv = stats()
    out = pyfastdl_providers(device, step(lambda x: pyfastdl.functional.batch_norm(x, rm, rv, w, b, training)))
    rm_t, rv_t = stats()
    out["torch"] = step(lambda x: torch_batch_norm(x, rm_t, rv_t, w, b, training))
    rm_c, rv_c = stats()
    compiled = torch_compile(torch_batch_norm)
    out["torch.compile"] = step(lambda x: compiled(x, rm_c, rv_c, w, b, training))
    if with_reference:
        from pyfastdl.reference import BatchNorm
        C, view = shape[1], (1, shape[1]) + (1,) * (len(shape) - 2)
        module = BatchNorm(C, len(shape)).to(device=device, dtype=dtype).train(training)
        with torch.no_grad():
            module.gamma.copy_(w.view(view))
            module.beta.copy_(b.view(view))
        module.gamma.requires_grad_(grad)
        module.beta.requires_grad_(grad)
        module.moving_mean = inp["running_mean"].view(view).clone()
        module.moving_var = inp["running_var"].view(view).clone()
        out["reference"] = step(module, params=(module.gamma, module.beta))
    return out


def cases(device: str, quick: bool) -> list[Case]:
    """The batch-norm cases for ``device``. Full: every shape x mode (CPU float32; GPU float32 and
    bfloat16). Quick: the target shapes in their target modes only; the reference only on the
    smallest of them (it is slow)."""
    on_cpu = not str(device).startswith("cuda")
    dtypes = [torch.float32] if on_cpu else [torch.float32, torch.bfloat16]
    plan = []
    for shape, layout in SHAPES:
        targets = CPU_TARGETS.get((shape, layout), {})
        if quick and not targets:
            continue
        for mode in PASSES:
            if quick and mode not in targets:
                continue
            plan.append((shape, layout, mode, targets.get(mode, []) if on_cpu else []))
    smallest = min((s for s, _, _, _ in plan), key=lambda s: torch.Size(s).numel()) if quick else None
    out = []
    for dtype in dtypes:
        itemsize = torch.empty((), dtype=dtype).element_size()
        for shape, layout, mode, targets in plan:
            reference = len(shape) in (2, 4) and (not quick or shape == smallest)
            numel = torch.Size(shape).numel()
            name = f"BatchNorm{len(shape) - 2 or 1}d {layout}" + (" per-call" if (shape, layout) == PER_CALL else "")
            out.append(Case(
                family=FAMILY, name=name, mode=mode, dtype=dtype,
                params={"shape": shape, "layout": layout, "momentum": MOMENTUM, "eps": EPS},
                make_providers=functools.partial(_providers, shape, layout, dtype, device, mode, reference),
                bytes=PASSES[mode] * numel * itemsize, bound="memory", formula=FORMULA,
                targets=[Target("pyfastdl-cpu", base, k) for base, k in targets]))
    return out
