"""Batch-norm micro-benchmarks (pytest-benchmark): pyfastdl's CPU kernels vs torch eager, float32,
training forward, training forward+backward and eval forward, on the issue's shapes. One benchmark
group per (mode, shape); compare within a group. The full report, with torch.compile, the notes'
reference, interleaved timing and the bandwidth fraction, is ``python -m pyfastdl bench``.

    .venv/bin/python -m pytest bench/bench_batch_norm.py --benchmark-only
"""
import pytest
import torch

from pyfastdl.bench.batch_norm import PASSES, make_inputs, torch_batch_norm
from pyfastdl.bench.core import pyfastdl_providers

SHAPES = [((32, 64, 56, 56), "NCHW"), ((32, 256, 14, 14), "NCHW"), ((256, 120), "NC")]


def _step(provider, shape, layout, mode):
    """One iteration of ``mode`` for ``provider``, inputs created here (outside the timing)."""
    import pyfastdl

    training, grad = mode != "eval fwd", mode == "train fwd+bwd"
    inp = make_inputs(shape, layout, torch.float32, "cpu", grad)
    x, w, b, rm, rv = (inp[k] for k in ("x", "weight", "bias", "running_mean", "running_var"))
    if provider == "torch":
        def forward():
            return torch_batch_norm(x, rm, rv, w, b, training)
    else:
        def forward():
            return pyfastdl.functional.batch_norm(x, rm, rv, w, b, training)
    if grad:
        def step():
            return torch.autograd.grad(forward(), (x, w, b), inp["dy"])
    else:
        step = forward
    if provider == "torch":
        return step
    return pyfastdl_providers("cpu", step)["pyfastdl-cpu"]


@pytest.mark.parametrize("provider", ["pyfastdl-cpu", "torch"])
@pytest.mark.parametrize("mode", list(PASSES))
@pytest.mark.parametrize("shape,layout", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_batch_norm(benchmark, provider, mode, shape, layout):
    benchmark.group = f"batch_norm {mode} {'x'.join(map(str, shape))} {layout}"
    benchmark.extra_info.update(shape=list(shape), layout=layout, dtype="float32", mode=mode,
                                threads=torch.get_num_threads(),
                                bytes=PASSES[mode] * torch.Size(shape).numel() * 4)
    step = _step(provider, shape, layout, mode)
    step()  # warm-up
    benchmark(step)
