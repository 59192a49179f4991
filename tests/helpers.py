"""Backend parametrization shared by the test files: (backend, device, dtype) combinations, each
with its skip marker (DESIGN.md: skips through markers, never an `if` inside a test)."""
import importlib.util
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
TRITON_RUNS = HAS_TRITON and (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1")

DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": TRITON_DEVICE, "reference": "cpu"}
MARKS = {
    "cpu": [],
    "reference": [],
    "cuda": [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")],
    "triton": [pytest.mark.triton,
               pytest.mark.skipif(not TRITON_RUNS, reason="needs triton and a GPU or TRITON_INTERPRET=1")],
}

# Relative error bounds ||out - ref|| / ||ref|| against a float64 reference (DESIGN.md, Correctness).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(out).any(), "NaN in output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def params(dtypes: dict, backends=("cpu", "cuda", "triton", "reference")):
    """pytest params (backend, dtype) for each backend's dtypes, with the backend's markers."""
    out = []
    for b in backends:
        for dt in dtypes[b]:
            out.append(pytest.param(b, dt, marks=MARKS[b], id=f"{b}-{str(dt).replace('torch.', '')}"))
    return out
