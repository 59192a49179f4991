"""conv2d cases of the benchmark report (``python -m pyfastdl bench --families conv2d``).

Providers: ``pyfastdl-<backend>`` (``pyfastdl.functional.conv2d``, each kernel backend of the device)
and ``torch`` (``torch.nn.functional.conv2d`` eager: oneDNN on the CPU, cuDNN on a GPU; what
``torch.nn.Conv2d`` runs). Modes: "fwd" and "fwd+bwd" (forward, then ``autograd.grad`` of input,
weight and bias; of the input too, except for the stem and LeNet's first conv, whose input is the
images, as in training). Layers: ResNet-18's convolutions at batch 8 (224 x 224 input: the 7x7 stem, the
3x3 layers at 56/28/14/7, the 1x1 stride-2 downsamples), the notes' LeNet convolutions at batch 256,
a depthwise 3x3; NCHW (torch's default) and channels_last. The per-call row, (1, 1, 1, 1) with a 1x1
kernel, measures the cost of a call itself (Python, dispatch, autograd, launchers).

flops = 2 N C_out H_out W_out (C_in / groups) kH kW for the forward; fwd+bwd 3x that (grad_input
and grad_weight each cost one forward; grad_bias is negligible); 2x for the first layers (no grad_input).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .core import Case, Target, pyfastdl_providers

__all__ = ["cases", "LAYERS"]

FAMILY = "conv2d"
FORMULA = "flops = 2 N C_out H_out W_out (C_in / groups) kH kW (fwd); fwd+bwd: 3x"
MODES = {"fwd": 1, "fwd+bwd": 3}

# name -> (N, C_in, H, W, C_out, k, stride, padding, groups)
LAYERS = {
    "resnet18 stem 7x7/2": (8, 3, 224, 224, 64, 7, 2, 3, 1),
    "resnet18 3x3 56": (8, 64, 56, 56, 64, 3, 1, 1, 1),
    "resnet18 3x3 28": (8, 128, 28, 28, 128, 3, 1, 1, 1),
    "resnet18 3x3 14": (8, 256, 14, 14, 256, 3, 1, 1, 1),
    "resnet18 3x3 7": (8, 512, 7, 7, 512, 3, 1, 1, 1),
    "resnet18 1x1/2 down 128": (8, 64, 56, 56, 128, 1, 2, 0, 1),
    "resnet18 1x1/2 down 512": (8, 256, 14, 14, 512, 1, 2, 0, 1),
    "lenet conv1 5x5": (256, 1, 28, 28, 6, 5, 1, 2, 1),
    "lenet conv2 5x5": (256, 6, 14, 14, 16, 5, 1, 0, 1),
    "depthwise 3x3 56": (8, 64, 56, 56, 64, 3, 1, 1, 64),
    "per-call": (1, 1, 1, 1, 1, 1, 1, 0, 1),
}
QUICK = ["resnet18 stem 7x7/2", "resnet18 3x3 56", "resnet18 3x3 14", "resnet18 3x3 7",
         "resnet18 1x1/2 down 128", "lenet conv1 5x5", "lenet conv2 5x5", "depthwise 3x3 56", "per-call"]


def _targets(name, layout, mode):
    """The issue's CPU targets (float32, ratio to torch in the same run)."""
    if name == "per-call":
        return [Target("pyfastdl-cpu", "torch", 1.0)]
    if name.startswith("lenet"):
        return [Target("pyfastdl-cpu", "torch", 3.0)] if mode == "fwd+bwd" else []
    if name.startswith("resnet18"):
        return [Target("pyfastdl-cpu", "torch", 1.2 if layout == "NCHW" else 0.9)]
    return []


def _first_layer(layer):
    """The stem and LeNet's first conv read the images: no gradient of their input, as in training."""
    return layer[1] <= 3 and layer[2] >= 28


def flops(layer, mode):
    N, C, H, W, O, k, s, p, g = layer
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1
    passes = MODES[mode] - (1 if mode == "fwd+bwd" and _first_layer(layer) else 0)
    return passes * 2 * N * O * Ho * Wo * (C // g) * k * k


def _providers(layer, layout, mode, dtype, device):
    N, C, H, W, O, k, s, p, g = layer
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=gen).to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(O, C // g, k, k, generator=gen) / (C // g * k * k) ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(O, generator=gen).to(device=device, dtype=dtype)
    grad = mode == "fwd+bwd"
    wrt = (w, b) if _first_layer(layer) else (x, w, b)
    if grad:
        for t in wrt:
            t.requires_grad_(True)
        dy = F.conv2d(x.detach(), w.detach(), b.detach(), s, p, 1, g)
        dy = torch.randn(dy.shape, generator=gen).to(device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)

    def step(forward):
        if not grad:
            return lambda: forward(x)
        return lambda: torch.autograd.grad(forward(x), wrt, dy)

    import pyfastdl
    out = pyfastdl_providers(device, step(lambda x: pyfastdl.functional.conv2d(x, w, b, s, p, 1, g)))
    out["torch"] = step(lambda x: F.conv2d(x, w, b, s, p, 1, g))
    return out


def cases(device: str, quick: bool) -> list[Case]:
    """Full: every layer x layout x mode, float32 (GPU: also bfloat16). Quick: the QUICK layers."""
    on_cpu = not str(device).startswith("cuda")
    dtypes = [torch.float32] if on_cpu else [torch.float32, torch.bfloat16]
    out = []
    for dtype in dtypes:
        for name, layer in LAYERS.items():
            if quick and name not in QUICK:
                continue
            layouts = ["NCHW"] if name == "per-call" else ["NCHW", "channels_last"]
            for layout in layouts:
                for mode in MODES:
                    out.append(Case(
                        family=FAMILY, name=f"{name} {layout}", mode=mode, dtype=dtype,
                        params={"shape": layer[:4], "C_out": layer[4], "k": layer[5], "stride": layer[6],
                                "padding": layer[7], "groups": layer[8], "layout": layout},
                        make_providers=functools.partial(_providers, layer, layout, mode, dtype, device),
                        flops=flops(layer, mode), bound="compute", formula=FORMULA,
                        targets=_targets(name, layout, mode) if on_cpu and dtype == torch.float32 else []))
    out += winograd_cases(device, quick)
    return out


# --- Winograd F(4x4, 3x3) on the CPU (csrc/cpu/conv2d_winograd_kernel.cpp) ------------------------
# The ResNet-18 3x3 stride-1 layers, each algorithm of pyfastdl's CPU kernel forced by the switch
# torch.ops.pyfastdl.conv2d_cpu_algo ("pyfastdl-cpu winograd", "pyfastdl-cpu direct"), and torch.
# fwd+bwd: grad_input on the algorithm named (Winograd: the forward of grad_out by the flipped weight),
# grad_weight and grad_bias on the direct kernel for both. Target (the issue's): Winograd >= 1.3x
# pyfastdl's direct kernel, with a normwise error against float64 of at most 1e-4, reported beside
# the direct kernel's and torch's own ("other": err = output, gi err = grad_input, vs float64).
# The flop rate is the direct convolution's (the same work for all three), so Winograd can pass 100%.
WINOGRAD_LAYERS = [name for name, layer in LAYERS.items()
                   if name.startswith("resnet18 3x3") and layer[6] == 1]
WINOGRAD_TARGET = 1.3


def _winograd_providers(layer, layout, mode, device, errors):
    from pyfastdl import backends

    N, C, H, W, O, k, s, p, g = layer
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w64 = torch.randn(O, C, k, k, generator=gen, dtype=torch.float64) / (C * k * k) ** 0.5
    b64 = torch.randn(O, generator=gen, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, w, b = x64.float().contiguous(memory_format=fmt), w64.float(), b64.float()
    grad = mode == "fwd+bwd"
    dy64 = torch.randn(N, O, H, W, generator=gen, dtype=torch.float64)
    dy = dy64.float().contiguous(memory_format=fmt)
    if grad:
        for t in (x, w, b):
            t.requires_grad_(True)
    algo = torch.ops.pyfastdl.conv2d_cpu_algo

    def step(forward):
        if not grad:
            return lambda: forward(x)
        return lambda: torch.autograd.grad(forward(x), (x, w, b), dy)

    def forced(algorithm):
        call, checked = step(lambda x: _pf_conv2d(x, w, b, s, p)), []

        def run():
            previous = algo(algorithm)
            try:
                result = call()
            finally:
                algo(previous)
            if not checked:  # refuse to time another path under this name
                d, last = backends.last_dispatch(), algo("last")
                want = f"fwd={algorithm}" + (f";bwd_input={algorithm}" if grad else "")
                if d is None or d.backend != "cpu" or not last.startswith(want):
                    raise RuntimeError(f"pyfastdl ran {d.backend if d else 'nothing'} ({last}), not {want}")
                checked.append(True)
            return result
        return run

    out = {"pyfastdl-cpu winograd": forced("winograd"), "pyfastdl-cpu direct": forced("direct"),
           "torch": step(lambda x: F.conv2d(x, w, b, s, p))}

    def measure_errors():  # normwise relative error against float64, forward and grad_input
        xd = x64.clone().requires_grad_(grad)
        ref = F.conv2d(xd, w64, b64, s, p)
        ref_gi = torch.autograd.grad(ref, xd, dy64)[0] if grad else None

        def err(a, r):
            return f"{((a.detach().double() - r).norm() / r.norm()).item():.1e}"
        for name, fn in out.items():
            xi = x.detach().clone().requires_grad_(grad)
            if name == "torch":
                y = F.conv2d(xi, w.detach(), b.detach(), s, p)
            else:
                previous = algo(name.split()[-1])
                try:
                    y = _pf_conv2d(xi, w.detach(), b.detach(), s, p)
                    gi = torch.autograd.grad(y, xi, dy)[0] if grad else None
                finally:
                    algo(previous)
            if name == "torch" and grad:
                gi = torch.autograd.grad(y, xi, dy)[0]
            errors[name] = {"err": err(y, ref), **({"gi err": err(gi, ref_gi)} if grad else {})}
    errors["_measure"] = measure_errors
    return out


def _pf_conv2d(x, w, b, s, p):
    import pyfastdl
    return pyfastdl.functional.conv2d(x, w, b, s, p, 1, 1)


def _winograd_extra(errors, name, fn):
    if "_measure" in errors:
        errors.pop("_measure")()
    return errors.get(name, {})


def winograd_cases(device: str, quick: bool) -> list[Case]:
    """The Winograd section: CPU only, float32, every ResNet-18 3x3 stride-1 layer x layout x mode
    (quick too: these rows are the Winograd report)."""
    if str(device).startswith("cuda"):
        return []
    out = []
    for name in WINOGRAD_LAYERS:
        layer = LAYERS[name]
        for layout in ["NCHW", "channels_last"]:
            for mode in MODES:
                errors = {}
                out.append(Case(
                    family=FAMILY, name=f"winograd {name} {layout}", mode=mode, dtype=torch.float32,
                    params={"shape": layer[:4], "C_out": layer[4], "k": layer[5], "stride": layer[6],
                            "padding": layer[7], "groups": layer[8], "layout": layout},
                    make_providers=functools.partial(_winograd_providers, layer, layout, mode, device, errors),
                    flops=flops(layer, mode), bound="compute", formula=FORMULA,
                    targets=[Target("pyfastdl-cpu winograd", "pyfastdl-cpu direct", WINOGRAD_TARGET)],
                    extra=functools.partial(_winograd_extra, errors)))
    return out
