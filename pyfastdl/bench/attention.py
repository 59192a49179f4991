"""Attention cases of the benchmark report (``python -m pyfastdl bench --families attention``).

Providers: ``pyfastdl-<backend>`` (``pyfastdl.functional.scaled_dot_product_attention``), ``torch``
(``torch.nn.functional.scaled_dot_product_attention``, its default backend choice: on the CPU its own
flash kernel) and ``reference`` (the notes' ``DotProductAttention`` on (B*H, L, E): materialized
scores, ``masked_softmax``, two bmm's; causal through 2-D valid_lens i + 1). Modes: "fwd" and
"fwd+bwd" (forward, then ``autograd.grad`` of q, k, v).

FLOPs counted (the matmul work; causal counts the half that is needed):
  fwd      4 B H L S E             (Q K^T and P V)
  fwd+bwd  14 B H L S E            (forward 4 + backward 10: Q K^T again, dO V^T, P^T dO, dS^T Q, dS K)
varlen: (8, 12, 512, 64) with 1-D valid_lens drawn uniformly from [64, 512] (seed 0): pyfastdl's
``valid_lens`` against torch with the equivalent boolean mask (keys past the length masked), and
against torch on the sequences one by one (each cut to its length). FLOPs counted: the valid keys only.
"other" shows, for the L = 4096 / 8192 forward cases, the peak memory of one call above what was in
use before it (CPU: peak resident set, measured as in bench/optim.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .core import Case, Target, pyfastdl_providers

__all__ = ["cases"]

FAMILY = "attention"
SHAPES = [(4, 8, 512, 64), (1, 8, 2048, 64), (2, 12, 1024, 64), (1, 8, 4096, 128)]
# The sweep of issue 12 (full mode): L = 512 .. 4096 at head dims 64 and 128, causal and not, fwd and
# fwd+bwd, each with its % of the measured matmul peak; (1, 8, 4096, 128) is in SHAPES already.
SWEEP = [(1, 8, L, E) for L in (512, 1024, 2048, 4096) for E in (64, 128)]
# The per-call row: the smallest valid input, whose time is the call's overhead (Python, dispatch,
# autograd); the target, on the CPU: no slower than torch's own call.
PER_CALL = (1, 1, 1, 1)
FORMULA = "flops = 4 B H L S E (fwd), 14 B H L S E (fwd+bwd); causal: half"


def _step(fn, inputs, dout, grad):
    """The timed call: fn(*inputs) under no_grad ("fwd"), or with autograd.grad of the inputs."""
    if not grad:
        def fwd():
            with torch.no_grad():
                return fn(*inputs)
        return fwd
    return lambda: torch.autograd.grad(fn(*inputs), inputs, dout)


def _providers(shape, causal, mode, dtype, device, with_reference):
    B, H, L, E = shape
    g = torch.Generator().manual_seed(0)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(B, H, L, E, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
               for _ in range(3))
    dout = torch.randn(B, H, L, E, generator=g).to(device=device, dtype=dtype)

    def step(fn, inputs=(q, k, v), d=dout):
        return _step(fn, inputs, d, grad)

    import pyfastdl
    out = pyfastdl_providers(device, step(lambda a, b, c: pyfastdl.functional.scaled_dot_product_attention(
        a, b, c, is_causal=causal)))
    out["torch"] = step(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal))
    if with_reference:
        from pyfastdl.reference import DotProductAttention
        notes = DotProductAttention(0.0).eval()
        lens = (torch.arange(1, L + 1, device=device).expand(B * H, L) if causal else None)
        q3, k3, v3 = (t.detach().reshape(B * H, L, E).requires_grad_(grad) for t in (q, k, v))
        out["reference"] = step(lambda a, b, c: notes(a, b, c, lens), (q3, k3, v3), dout.reshape(B * H, L, E))
    if dtype != torch.float32 and str(device) == "cpu":
        # the same inputs in float32 through pyfastdl: the low-precision path against our own float32
        q32, k32, v32 = (t.detach().float().requires_grad_(grad) for t in (q, k, v))
        out["pyfastdl-cpu float32"] = step(lambda a, b, c: pyfastdl.functional.scaled_dot_product_attention(
            a, b, c, is_causal=causal), (q32, k32, v32), dout.float())
    return out


VARLEN = (8, 12, 512, 64)
# CPU bfloat16 (full mode), against torch's bfloat16 and our own float32: the bf16 kernels where the CPU
# has AVX512_BF16 (issue 12's target there: 1.3x our own float32), elsewhere the float32 kernel on
# inputs converted once per call
CPU_BF16_SHAPES = [(1, 8, 1024, 64), (1, 8, 2048, 64), (1, 8, 1024, 128)]


def _cpu_has_bf16_kernel() -> bool:
    import pyfastdl  # noqa: F401  (registers torch.ops.pyfastdl)
    info = dict(item.partition("=")[::2] for item in torch.ops.pyfastdl.build_info().split(";"))
    return info.get("cpu_capability") == "AVX512" and info.get("cpu_avx512_bf16") == "1"


def _varlen_lens(B, L):
    g = torch.Generator().manual_seed(0)
    return torch.randint(64, L + 1, (B,), generator=g)


def _varlen_providers(mode, dtype, device):
    B, H, L, E = VARLEN
    g = torch.Generator().manual_seed(0)
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(B, H, L, E, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
               for _ in range(3))
    dout = torch.randn(B, H, L, E, generator=g).to(device=device, dtype=dtype)
    lens = _varlen_lens(B, L).to(device)
    keep = (torch.arange(L, device=device) < lens[:, None])[:, None, None, :]  # (B, 1, 1, L)

    def step(fn):
        return _step(lambda a, b, c: fn(), (q, k, v), dout, grad)

    def one_by_one():
        outs = []
        for b, n in enumerate(lens.tolist()):
            outs.append(F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n]))
        return torch.cat(outs)

    import pyfastdl
    out = pyfastdl_providers(device, step(lambda: pyfastdl.functional.scaled_dot_product_attention(
        q, k, v, valid_lens=lens)))
    out["torch"] = step(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep))
    out["torch one by one"] = step(one_by_one)
    return out


def _memory_extra(device, name, fn):
    from .optim import peak_bytes
    return {"peak MB": peak_bytes(fn, device) / 2**20}


def cases(device: str, quick: bool) -> list[Case]:
    """Full: every shape (SHAPES, then the L sweep SWEEP) x causal x mode, float32 (GPU: also
    bfloat16; CPU: bfloat16 on CPU_BF16_SHAPES), the notes' reference up to L = 2048, and the forward at L = 8192 for memory. Quick: (1, 8, 2048, 64) and (2, 12, 1024, 64),
    fwd+bwd, the reference only at L = 2048 causal."""
    on_cuda = str(device).startswith("cuda")
    dtypes = [torch.float32, torch.bfloat16] if on_cuda else [torch.float32]
    shapes = SHAPES + [s for s in SWEEP if s not in SHAPES] if not quick else [(1, 8, 2048, 64), (2, 12, 1024, 64)]
    modes = ["fwd", "fwd+bwd"] if not quick else ["fwd+bwd"]
    out = []
    for dtype in dtypes + ([torch.bfloat16] if not on_cuda and not quick else []):
        cpu_low = not on_cuda and dtype != torch.float32
        for shape in (CPU_BF16_SHAPES if cpu_low else shapes + ([] if quick else [(1, 8, 8192, 64)])):
            B, H, L, E = shape
            for causal in (False, True):
                for mode in (modes if L <= 4096 else ["fwd"]):
                    reference = dtype == torch.float32 and L <= 2048 and (not quick or (L == 2048 and causal))
                    flops = (4 if mode == "fwd" else 14) * B * H * L * L * E // (2 if causal else 1)
                    # CPU bfloat16 (issue 12): at least torch's own bfloat16; with AVX512_BF16 also 1.3x our float32
                    targets = [Target("pyfastdl-cpu", "torch", 1.0)] if cpu_low else []
                    if cpu_low and _cpu_has_bf16_kernel():
                        targets.append(Target("pyfastdl-cpu", "pyfastdl-cpu float32", 1.3))
                    if not on_cuda and dtype == torch.float32:
                        # issue 12: at L >= 512, forward and fwd+bwd, 1.5x torch causal and 1.2x not
                        # (its % of peak targets -- forward 65%, fwd+bwd 60% at L >= 1024 -- are read
                        # from the "% limit" column)
                        if L >= 512:
                            targets.append(Target("pyfastdl-cpu", "torch", 1.5 if causal else 1.2))
                        if L == 2048 and causal and reference:
                            targets.append(Target("pyfastdl-cpu", "reference", 8.0))
                    out.append(Case(
                        family=FAMILY, name="SDPA causal" if causal else "SDPA", mode=mode, dtype=dtype,
                        params={"shape": shape, "causal": causal},
                        make_providers=functools.partial(_providers, shape, causal, mode, dtype, device, reference),
                        flops=flops, bound="compute", formula=FORMULA, targets=targets,
                        extra=(functools.partial(_memory_extra, device) if mode == "fwd" and L >= 4096 else None)))
        if cpu_low:
            continue
        for mode in ("fwd", "fwd+bwd"):
            B, H, L, E = VARLEN
            valid = int(_varlen_lens(B, L).sum())
            out.append(Case(
                family=FAMILY, name="SDPA varlen", mode=mode, dtype=dtype,
                params={"shape": VARLEN, "valid keys": f"{valid / (B * L):.0%}"},
                make_providers=functools.partial(_varlen_providers, mode, dtype, device),
                flops=(4 if mode == "fwd" else 14) * H * L * valid * E, bound="compute", formula=FORMULA,
                targets=[Target("pyfastdl-cpu", "torch", 1.6)] if not on_cuda and dtype == torch.float32 else []))
        for mode in ("fwd", "fwd+bwd"):
            B, H, L, E = PER_CALL
            out.append(Case(
                family=FAMILY, name="SDPA per-call", mode=mode, dtype=dtype, params={"shape": PER_CALL, "causal": False},
                make_providers=functools.partial(_providers, PER_CALL, False, mode, dtype, device, False),
                flops=(4 if mode == "fwd" else 14) * B * H * L * L * E, bound="compute", formula=FORMULA,
                targets=[Target("pyfastdl-cpu", "torch", 1.0)] if not on_cuda and dtype == torch.float32 else []))
    return out
