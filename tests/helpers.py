"""Backend parametrization shared by the test files: (backend, device, dtype) combinations, each
with its skip marker (docs/adding-an-op-family.md: skips through markers, never an `if` inside a test)."""
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

# The one tolerance table of the test suite (docs/testing.md). Two kinds of bound:
#  * norm-wise relative error ||out - ref|| / ||ref|| against a float64 reference, per kind of op:
#    "pointwise" (batch norm, masked softmax), "gemm" (attention, conv: long dot products);
#  * element-wise rtol/atol ("step") for optimizer steps, which follow torch's operation order, so
#    they match torch's own step to a few ulps.
# A test that loosens a bound multiplies it and says why in a comment on that line.
TOLERANCES = {
    "pointwise": {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2},
    "gemm": {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 3e-2},
    "step": {torch.float64: dict(rtol=1e-11, atol=1e-13), torch.float32: dict(rtol=2e-5, atol=2e-6),
             torch.float16: dict(rtol=1e-2, atol=1e-3), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)},
    # the same operations in the same order as torch (the reference optimizers in float64)
    "exact": {torch.float64: dict(rtol=1e-13, atol=1e-15)},
}
TOL = TOLERANCES["pointwise"]
GEMM_TOL = TOLERANCES["gemm"]
STEP_TOL = TOLERANCES["step"]
EXACT_TOL = TOLERANCES["exact"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(out).any(), "NaN in output"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_rel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, kind: str = "pointwise",
               factor: float = 1.0) -> None:
    """||out - ref|| / ||ref|| within TOLERANCES[kind][dtype] * factor (no NaN in out)."""
    bound = TOLERANCES[kind][dtype] * factor
    err = rel_err(out, ref)
    assert err <= bound, f"relative error {err:.3g} > {bound:.3g} ({kind}, {dtype})"


def params(dtypes: dict, backends=("cpu", "cuda", "triton", "reference")):
    """pytest params (backend, dtype) for each backend's dtypes, with the backend's markers."""
    out = []
    for b in backends:
        for dt in dtypes[b]:
            out.append(pytest.param(b, dt, marks=MARKS[b], id=f"{b}-{str(dt).replace('torch.', '')}"))
    return out


def assert_schema_matches_cpp(triton_ops, op: str) -> None:
    """A Triton op's schema against the C++ op of the same name: same arguments, types and mutations;
    return names and alias-set names aside. Skips where the built pyfastdl._C lacks the op."""
    import re

    import pyfastdl  # noqa: F401  (registers torch.ops.pyfastdl)
    import pytest
    if not hasattr(torch.ops.pyfastdl, op):
        pytest.skip(f"the built pyfastdl._C has no {op} op")

    def strip(schema) -> str:
        return re.sub(r"\((\w+)!\)", "(!)", str(schema).split("::", 1)[1])

    assert strip(getattr(triton_ops, op).default._schema) == strip(getattr(torch.ops.pyfastdl, op).default._schema)


# ---- processes on this machine (gloo) -----------------------------------------------------------------

def _rank_worker(rank, tmp, world, scenarios):
    import datetime
    import traceback

    import torch.distributed as dist
    torch.set_num_threads(1)
    # The ranks meet through a file in the fixture's own directory, not a TCP port: a port picked free
    # and then bound by the store could be taken in between by another test's gloo processes (pytest
    # runs two workers). One CI run, 2026-12-02, lost this module's ranks to a SIGABRT at set-up.
    dist.init_process_group("gloo", init_method="file://" + os.path.join(tmp, "rendezvous"), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    out = {}
    try:
        for name, scenario in scenarios:
            try:
                scenario(rank, out)
            except Exception:  # recorded for the test that reads it; the other scenarios still run
                out[f"{name}/exception"] = traceback.format_exc()
            dist.barrier()
    finally:
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
        dist.destroy_process_group()


def run_in_ranks(tmp: str, world: int, scenarios) -> list:
    """One spawn of ``world`` gloo processes on this machine (one thread each): every rank runs each
    ``(name, fn)`` of ``scenarios`` in order as ``fn(rank, out)`` (module-level functions or partials:
    they are pickled), a barrier after each; an exception is recorded as ``out[name + "/exception"]``
    and the next scenario still runs. Returns each rank's ``out``."""
    import torch.multiprocessing as mp
    mp.spawn(_rank_worker, args=(tmp, world, scenarios), nprocs=world, join=True)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def assert_no_exception(ranks: list, name: str) -> None:
    for r, out in enumerate(ranks):
        assert f"{name}/exception" not in out, f"rank {r}:\n{out[f'{name}/exception']}"
