"""Fused-optimizer cases of the benchmark report (``python -m pyfastdl bench --families optim``).

Mode "step": one ``optimizer.step()`` over a parameter set whose gradients are already there.
Providers: ``pyfastdl-<backend>`` (``pyfastdl.optim.X``), ``torch`` (``torch.optim.X(foreach=False)``,
one tensor at a time), ``torch-foreach`` (``foreach=True``), ``torch-fused`` (``fused=True``, where
torch has a fused kernel for that optimizer on the device) and ``reference`` (the notes' from-scratch
function, ``pyfastdl.reference.optim``, as the notes run it: a Python loop over the params). Each
provider has its own params and state; the gradients are shared (every provider only reads them).

Bytes of one step = numel x itemsize x (tensors read + tensors written), e.g. Adam reads param,
grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq: 7 x 4 B per float32 element.

Mode "train step": a whole training step (forward, backward, optimizer step) of an MLP of about
50 M parameters (batch 64; a deep and a wide one, see MLP_DEEP) and of a ResNet-18 at width 16
(batch 32, 3x32x32): backward then ``opt.step()`` vs ``pyfastdl.optim.step_in_backward`` (the update inside backward, gradients freed
as they are used). "other" shows the peak memory of one iteration above what was allocated before it
(CPU: measured in a fresh process, its peak resident set, reset through /proc/self/clear_refs; GPU:
torch.cuda.max_memory_allocated) and the size of the gradients. The notes' reference runs on the
ResNet-18 set only (on 100 M elements it takes 2.5 s and faults 5 GB of fresh pages per step, which
disturbs the other providers' timing).
"""
from __future__ import annotations

import ctypes
import functools
import gc
import json
import os
import subprocess
import sys

import torch

from .core import Case, Target, pyfastdl_providers

__all__ = ["cases", "resnet18_shapes", "BYTES_PER_ELEMENT"]

FAMILY = "optim"

# (name in torch.optim / pyfastdl.optim, constructor kwargs, tensors read + written per element)
OPTIMIZERS = [
    ("SGD", dict(lr=1e-3, momentum=0.9), 5),     # read p, g, buf; write p, buf
    ("Adam", dict(lr=1e-3), 7),                   # read p, g, m, v; write p, m, v
    ("AdamW", dict(lr=1e-3, weight_decay=1e-2), 7),
    ("Adagrad", dict(lr=1e-2), 5),                # read p, g, sum; write p, sum
    ("RMSprop", dict(lr=1e-3), 5),                # read p, g, sq; write p, sq
    ("Adadelta", dict(), 7),                      # read p, g, sq, acc; write p, sq, acc
]
BYTES_PER_ELEMENT = {name: k for name, _, k in OPTIMIZERS}
# torch's fused=True kernels: CPU (2.4+) Adam, AdamW, SGD, Adagrad; CUDA Adam, AdamW, SGD
_TORCH_FUSED = {"cpu": {"Adam", "AdamW", "SGD", "Adagrad"}, "cuda": {"Adam", "AdamW", "SGD"}}
FORMULA = ("step: bytes = numel x itemsize x (tensors read + written per element): SGD-momentum, Adagrad, "
           "RMSprop 5; Adam, AdamW, Adadelta 7")


def resnet18_shapes() -> list[tuple]:
    """The parameter shapes of torchvision's resnet18 (1000 classes): 62 tensors, 11,689,512 elements."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    for _ in range(2):
        shapes += [(64, 64, 3, 3), (64,), (64,)] * 2
    c_in = 64
    for c in (128, 256, 512):
        shapes += [(c, c_in, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,), (c, c_in, 1, 1), (c,), (c,)]
        shapes += [(c, c, 3, 3), (c,), (c,)] * 2
        c_in = c
    return shapes + [(1000, 512), (1000,)]


def _notes_step(name: str, params: list[torch.Tensor], kwargs: dict):
    """The notes' function for ``name`` with its states and hyper-parameters, as one step."""
    from pyfastdl.reference import optim as ref

    zeros = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    lr = kwargs.get("lr", 1.0)
    if name == "SGD":
        states, hp, fn = zeros(), {"lr": lr, "momentum": kwargs["momentum"]}, ref.sgd_momentum
    elif name in ("Adam", "AdamW"):  # the notes have no AdamW: their Adam stands for both
        states, hp, fn = list(zip(zeros(), zeros())), {"lr": lr, "t": 1}, ref.adam
    elif name == "Adagrad":
        states, hp, fn = zeros(), {"lr": lr}, ref.adagrad
    elif name == "RMSprop":
        states, hp, fn = zeros(), {"lr": lr, "gamma": 0.99}, ref.rmsprop
    else:
        states, hp, fn = list(zip(zeros(), zeros())), {"rho": 0.9}, ref.adadelta

    @torch.no_grad()
    def step():
        fn(params, states, hp)
    return step


def _step_providers(name, kwargs, shapes, dtype, device, with_reference):
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).mul_(1e-2).to(device=device, dtype=dtype) for s in shapes]

    def params():
        ps = [b.clone().requires_grad_() for b in base]
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    import pyfastdl.optim as po
    ours = po.__dict__[name](params(), **kwargs)
    out = pyfastdl_providers(device, ours.step)
    cls = getattr(torch.optim, name)
    out["torch"] = cls(params(), foreach=False, **kwargs).step
    out["torch-foreach"] = cls(params(), foreach=True, **kwargs).step
    if name in _TORCH_FUSED.get(torch.device(device).type, ()):
        out["torch-fused"] = cls(params(), fused=True, **kwargs).step
    if with_reference:
        out["reference"] = _notes_step(name, params(), kwargs)
    return out


def _targets(name: str, device: str) -> list[Target]:
    if device.startswith("cuda"):
        return [Target("pyfastdl-cuda", "torch-fused", 1.0)] if name in _TORCH_FUSED["cuda"] else []
    if name in _TORCH_FUSED["cpu"]:
        return [Target("pyfastdl-cpu", "torch-fused", 1.05)]
    # no fused CPU path in torch: 2.5x its fastest one (checked against each)
    return [Target("pyfastdl-cpu", "torch", 2.5), Target("pyfastdl-cpu", "torch-foreach", 2.5)]


# ---- whole training steps --------------------------------------------------------------------------

def mlp(width: int, hidden_layers: int) -> torch.nn.Module:
    """width -> width -> ... (hidden_layers + 1 Linear layers of width x width, ReLU between)."""
    layers = [torch.nn.Linear(width, width)]
    for _ in range(hidden_layers):
        layers += [torch.nn.ReLU(), torch.nn.Linear(width, width)]
    return torch.nn.Sequential(*layers)


# Two MLPs of about 50 M parameters. Per-parameter hooks free each gradient after its update, so
# the smallest possible peak is the largest single gradient: deep (12 x 2048^2, each gradient 8% of
# all) saves up to 92% of the gradients' size, wide (3 x 4096^2, each 33%) at most 67%.
MLP_DEEP = functools.partial(mlp, 2048, 11)   # 12 layers, 50.36 M parameters
MLP_WIDE = functools.partial(mlp, 4096, 2)    # 3 layers, 50.34 M parameters


def resnet18_small(width: int = 16, num_classes: int = 10) -> torch.nn.Module:
    """The notes' ResNet-18 (d2l: a 7x7 stem, four stages of two residual blocks, global pooling),
    channels width, 2 width, 4 width, 8 width."""
    nn = torch.nn

    class Residual(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, stride=stride)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
            self.conv3 = nn.Conv2d(c_in, c_out, 1, stride=stride) if stride != 1 or c_in != c_out else None
            self.bn1, self.bn2 = nn.BatchNorm2d(c_out), nn.BatchNorm2d(c_out)

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (self.conv3(x) if self.conv3 is not None else x))

    layers = [nn.Conv2d(3, width, 7, stride=2, padding=3), nn.BatchNorm2d(width), nn.ReLU(),
              nn.MaxPool2d(3, stride=2, padding=1)]
    c = width
    for i, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
        layers += [Residual(c, c_out, 1 if i == 0 else 2), Residual(c_out, c_out, 1)]
        c = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _mallopt_mmap_threshold(nbytes: int) -> bool:
    """glibc: blocks of at least nbytes come from mmap and go back to the OS when freed."""
    try:
        return ctypes.CDLL(None).mallopt(-3, ctypes.c_int(nbytes)) == 1  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def peak_bytes(fn, device: str) -> int:
    """Peak memory of one call of ``fn`` above what was in use before it.

    CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the call,
    minus the resident set before it; the smallest of three calls (other activity on the machine can
    only add resident pages). For that to follow the tensors, blocks of 4 KB and more are
    taken from mmap (and unmapped when freed) during the measurement and the free heap pages are
    returned to the OS first (malloc_trim) -- with --tuned-malloc glibc would otherwise keep freed
    blocks resident and the peak would read 0 --; afterwards the threshold goes back to the run's
    setting (64 MB tuned, else glibc's largest dynamic value, 32 MB)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    tuned = "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
    if not _mallopt_mmap_threshold(4096):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) unavailable: cannot follow the peak through the RSS")
    try:
        fn()  # once with the new threshold, so that its blocks come from mmap
        peaks = []
        for _ in range(3):
            gc.collect()
            ctypes.CDLL(None).malloc_trim(0)  # free heap pages back to the OS: reusing them faults again
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set (VmHWM) to the current one
            before = _rss_bytes()
            fn()
            peaks.append(_hwm_bytes() - before)
        return min(peaks)
    finally:
        _mallopt_mmap_threshold((64 if tuned else 32) << 20)


# the training-step models: key -> (label, model factory, input shape, target)
TRAIN_MODELS = {
    "mlp-deep": ("MLP 50M deep (12 x 2048^2), batch 64", MLP_DEEP, (64, 2048), ("mse", 2048)),
    "mlp-wide": ("MLP 50M wide (3 x 4096^2), batch 64", MLP_WIDE, (64, 4096), ("mse", 4096)),
    "resnet18-16": ("ResNet-18 width 16, batch 32", resnet18_small, (32, 3, 32, 32), ("ce", 10)),
}


def _train_providers(model_fn, input_shape, target, device, memo):
    """target: ("mse", output features) or ("ce", classes)."""
    import pyfastdl.optim as po
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(input_shape, generator=gen).to(device)
    kind, n = target
    y = (torch.randn(input_shape[0], n, generator=gen).to(device) if kind == "mse" else
         torch.randint(0, n, (input_shape[0],), generator=gen).to(device))
    loss_fn = torch.nn.functional.cross_entropy if kind == "ce" else torch.nn.functional.mse_loss
    memo["grad_bytes"] = 0

    def setup(cls, **kw):
        torch.manual_seed(0)
        model = model_fn().to(device)
        memo["grad_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        return model, cls(model.parameters(), lr=1e-4, **kw)

    def plain(model, opt):
        def it():
            loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return it

    out = {}
    m1, o1 = setup(po.Adam)
    out["pyfastdl: backward + step"] = plain(m1, o1)
    m2, o2 = setup(po.Adam)
    po.step_in_backward(o2)  # kept on for the life of the case

    def in_backward():
        loss_fn(m2(x), y).backward()
    out["pyfastdl: step in backward"] = in_backward
    if device.startswith("cuda") or torch.device(device).type in _TORCH_FUSED:
        m3, o3 = setup(torch.optim.Adam, fused=True)
        out["torch-fused: backward + step"] = plain(m3, o3)
    return out


def _child_peak(key: str, provider: str) -> None:
    """In a fresh process (see _memory_extra): prints the peak bytes of one iteration of
    ``provider`` of training model ``key`` on the CPU."""
    _mallopt_mmap_threshold(4096)
    _, model_fn, shape, target = TRAIN_MODELS[key]
    memo = {}
    fn = _train_providers(model_fn, shape, target, "cpu", memo)[provider]
    fn()
    print(json.dumps({"peak": peak_bytes(fn, "cpu"), "grad_bytes": memo["grad_bytes"]}))


def _memory_extra(device, key, memo, name, fn):
    """Peak memory of one iteration of provider ``name``. On the CPU it is measured in a fresh
    process with the default allocator: in a long run the heap holds many freed blocks, and glibc
    serving a gradient from a different freed (and trimmed) block each time makes the resident set
    grow where the live memory does not."""
    if device.startswith("cuda"):
        peak, grad_bytes = peak_bytes(fn, device), memo["grad_bytes"]
    else:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        code = f"from pyfastdl.bench.optim import _child_peak; _child_peak({key!r}, {name!r})"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError((out.stderr.strip().splitlines() or ["child failed"])[-1])
        got = json.loads(out.stdout.strip().splitlines()[-1])
        peak, grad_bytes = got["peak"], got["grad_bytes"]
    memo[name] = peak
    extra = {"peak MB": peak / 2**20, "grads MB": grad_bytes / 2**20}
    plain = memo.get("pyfastdl: backward + step")
    if name == "pyfastdl: step in backward" and plain is not None and grad_bytes:
        extra["saved % of grads"] = 100.0 * (plain - peak) / grad_bytes
    return extra


def cases(device: str, quick: bool) -> list[Case]:
    """Full: every optimizer on the ResNet-18 set and on one 100 M-element tensor, and the two
    training steps, and each optimizer on one 1-element parameter (the per-call row). Quick: the
    ResNet-18 set (notes' reference only for Adam), Adam's per-call row and the MLP step."""
    on_cuda = str(device).startswith("cuda")
    dtypes = [torch.float32, torch.bfloat16] if on_cuda else [torch.float32]
    out = []
    # "per-call": one parameter of one element, the smallest valid set: the step's fixed overhead
    sets = ([("ResNet-18 params", resnet18_shapes())] + ([] if quick else [("one tensor", [(100_000_000,)])])
            + [("per-call", [(1,)])])
    for set_name, shapes in sets:
        numel = sum(torch.Size(s).numel() for s in shapes)
        for dtype in dtypes:
            itemsize = torch.empty((), dtype=dtype).element_size()
            for name, kwargs, k in OPTIMIZERS:
                per_call = set_name == "per-call"
                if per_call and quick and name != "Adam":
                    continue
                # the notes' code on 100 M elements: 2.5 s a step, 5 GB of fresh pages a step (its
                # temporaries), which disturbs the timing of the others; it is timed on the ResNet-18 set
                reference = (dtype == torch.float32 and set_name == "ResNet-18 params"
                             and (not quick or name == "Adam"))
                out.append(Case(
                    family=FAMILY, name=f"{name} {set_name}", mode="step", dtype=dtype,
                    params={"shape": (numel,), "tensors": len(shapes), **kwargs},
                    make_providers=functools.partial(_step_providers, name, kwargs, shapes, dtype, device, reference),
                    # float32 state for low-precision params: count the state at 4 B
                    bytes=numel * (3 * itemsize + (k - 3) * 4), bound="memory", formula=FORMULA,
                    targets=_targets(name, device) if dtype == torch.float32 and not per_call else []))
    for key in (["mlp-deep"] if quick else list(TRAIN_MODELS)):
        label, model_fn, shape, target = TRAIN_MODELS[key]
        memo = {}
        out.append(Case(
            family=FAMILY, name=f"Adam train step, {label}", mode="train step", dtype=torch.float32,
            params={"shape": shape},
            make_providers=functools.partial(_train_providers, model_fn, shape, target, device, memo),
            bound="time", formula="train step: forward, backward, Adam update (time only)",
            targets=[Target("pyfastdl: step in backward", "pyfastdl: backward + step", 1.0)],
            extra=functools.partial(_memory_extra, device, key, memo)))
    return out
