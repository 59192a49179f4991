"""Fused-optimizer micro-benchmarks (pytest-benchmark): one step of pyfastdl.optim.X vs
torch.optim.X(fused=True) where torch has it on the CPU, else foreach=True, over the ResNet-18
parameter set (62 tensors, 11.7 M float32 elements). One benchmark group per optimizer. The full
report (every torch path, the notes' reference, interleaved timing, bandwidth fraction, training
steps with the step inside backward) is ``python -m pyfastdl bench --families optim``.

    .venv/bin/python -m pytest bench/bench_optim.py --benchmark-only
"""
import pytest
import torch

from pyfastdl.bench.optim import _TORCH_FUSED, BYTES_PER_ELEMENT, OPTIMIZERS, resnet18_shapes

SHAPES = resnet18_shapes()


def _optimizer(provider, name, kwargs):
    import pyfastdl.optim as po
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    if provider == "pyfastdl-cpu":
        return po.__dict__[name](params, **kwargs)
    fast = {"fused": True} if name in _TORCH_FUSED["cpu"] else {"foreach": True}
    return getattr(torch.optim, name)(params, **kwargs, **fast)


@pytest.mark.parametrize("provider", ["pyfastdl-cpu", "torch-fastest"])
@pytest.mark.parametrize("name,kwargs", [(n, kw) for n, kw, _ in OPTIMIZERS], ids=[n for n, _, _ in OPTIMIZERS])
def test_optimizer_step(benchmark, provider, name, kwargs):
    numel = sum(torch.Size(s).numel() for s in SHAPES)
    benchmark.group = f"optim {name} ResNet-18 set"
    benchmark.extra_info.update(optimizer=name, tensors=len(SHAPES), numel=numel, dtype="float32",
                                threads=torch.get_num_threads(), bytes=numel * 4 * BYTES_PER_ELEMENT[name])
    opt = _optimizer(provider, name, kwargs)
    opt.step()  # warm-up, state created
    benchmark(opt.step)
