"""The helpers every Triton family shares (triton_kernels/_common.py): the float split, interpreter
detection and the device guard -- one copy, used by every launcher -- and the guard's purpose: a
tensor on a second GPU runs there, on every GPU backend (cuda, triton), whatever the current device.
"""
import math
import struct

import pytest
import torch

import pyfastdl
import pyfastdl.functional as PF
from pyfastdl import backends
from helpers import HAS_TRITON, MARKS

FAMILIES = ["attention", "batch_norm", "optim"]
needs_triton_module = pytest.mark.skipif(not HAS_TRITON, reason="needs triton installed")
TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
two_gpus = [pytest.mark.cuda, pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA GPUs")]


@pytest.fixture(scope="module")
def common():
    pytest.importorskip("triton")
    from pyfastdl.triton_kernels import _common
    return _common


def _is_f32(x: float) -> bool:
    return math.isnan(x) or struct.unpack("f", struct.pack("f", x))[0] == x


# ---- the float split -----------------------------------------------------------------------------
@needs_triton_module
@pytest.mark.parametrize("v", [0.1, 1 / 3, 1e-5, 0.9, 0.999, -2.5e-7, 1e30, -1e30, 3.0e38, 1e-30,
                               math.pi * 1e10, 2.0**-126, 0.0])
def test_split_f32_finite(common, v):
    hi, lo = common.split_f32(v)
    assert _is_f32(hi) and _is_f32(lo)
    assert abs((hi + lo) - v) <= 2.0**-47 * abs(v)


@needs_triton_module
@pytest.mark.parametrize("v, want", [(math.inf, (math.inf, 0.0)), (-math.inf, (-math.inf, 0.0)),
                                     (1e39, (math.inf, 0.0)), (-1e39, (-math.inf, 0.0)),
                                     (1.7e308, (math.inf, 0.0))])
def test_split_f32_inf_and_beyond_float32(common, v, want):
    assert common.split_f32(v) == want


@needs_triton_module
def test_split_f32_nan_keeps_lo_finite(common):
    hi, lo = common.split_f32(math.nan)
    assert math.isnan(hi) and lo == 0.0  # lo = nan - nan would be NaN (the copies drifted here)


@needs_triton_module
def test_split_f32_below_float32_range(common):
    assert common.split_f32(1e-50) == (0.0, 0.0)
    hi, lo = common.split_f32(-1e-50)
    assert hi == 0.0 and math.copysign(1.0, hi) == -1.0 and lo == 0.0


# ---- one copy, used by every family ----------------------------------------------------------------
@needs_triton_module
@pytest.mark.parametrize("family", FAMILIES)
def test_families_share_the_helpers(common, family):
    import importlib
    m = importlib.import_module(f"pyfastdl.triton_kernels.{family}")
    assert m._device_guard is common.device_guard
    assert m._INTERPRETED is common.INTERPRETED
    if hasattr(m, "_split_f32"):
        assert m._split_f32 is common.split_f32
    assert not hasattr(m, "_is_interpreted") and not hasattr(m, "_Null")


@needs_triton_module
def test_interpreter_detection_matches_the_environment(common):
    import os
    assert common.INTERPRETED == (os.environ.get("TRITON_INTERPRET") == "1")


@needs_triton_module
def test_device_guard_is_a_no_op_off_the_gpu(common):
    with common.device_guard(torch.zeros(1)):
        pass
    with common.device_guard(None):
        pass


# Every Triton launcher enters the shared guard with its input (a spy in place of the guard).
def _bn_fwd(ops, dev):
    x = torch.randn(4, 3, 5, device=dev)
    return x, lambda: ops.batch_norm_fwd(x, None, None, None, None, True, 0.1, 1e-5, 0)


def _bn_bwd(ops, dev):
    x = torch.randn(4, 3, 5, device=dev)
    _, m, s = ops.batch_norm_fwd(x, None, None, None, None, True, 0.1, 1e-5, 0)
    return x, lambda: ops.batch_norm_bwd(torch.randn_like(x), x, None, None, m, s, True, 0, [True, True, True])


def _attn_fwd(ops, dev):
    q = torch.randn(1, 2, 5, 16, device=dev)
    return q, lambda: ops.attention_fwd(q, q, q, None, None, False, 0.25, 0.0, 0, 0)


def _attn_bwd(ops, dev):
    q = torch.randn(1, 2, 5, 16, device=dev)
    out, lse = ops.attention_fwd(q, q, q, None, None, False, 0.25, 0.0, 0, 0)
    return q, lambda: ops.attention_bwd(torch.randn_like(out), q, q, q, out, lse, None, None, False,
                                        0.25, 0.0, 0, 0)


def _sgd(ops, dev):
    p = torch.randn(7, device=dev)
    return p, lambda: ops.sgd_step_([p], [torch.randn_like(p)], [], 0.1, 0.0, 0.0, 0.0, False, False,
                                    True, None, None)


LAUNCHES = {"batch_norm_fwd": ("batch_norm", _bn_fwd), "batch_norm_bwd": ("batch_norm", _bn_bwd),
            "attention_fwd": ("attention", _attn_fwd), "attention_bwd": ("attention", _attn_bwd),
            "sgd_step_": ("optim", _sgd)}


@pytest.mark.parametrize("launch", [pytest.param(n, marks=MARKS["triton"]) for n in sorted(LAUNCHES)])
def test_every_triton_launcher_takes_the_device_guard(common, launch, monkeypatch):
    import contextlib
    import importlib
    from helpers import TRITON_DEVICE
    family, make = LAUNCHES[launch]
    m = importlib.import_module(f"pyfastdl.triton_kernels.{family}")
    first, call = make(torch.ops.pyfastdl_triton, TRITON_DEVICE)
    seen = []

    def spy(t):
        seen.append(t)
        return common.device_guard(t) if t is not None else contextlib.nullcontext()

    monkeypatch.setattr(m, "_device_guard", spy)
    call()
    # the guard is taken on the input itself (or its kernel-layout view: same memory)
    assert seen and all(t.device == first.device and t.data_ptr() == first.data_ptr() for t in seen), \
        f"{launch}: guard taken on {seen!r}"


# ---- a tensor on the second GPU runs there ---------------------------------------------------------
def _run_family(family, cpu_inputs, dev):
    """Forward + backward (or two optimizer steps) of `family` on copies of `cpu_inputs` on `dev`;
    returns the outputs, gradients and updated state."""
    ins = [t.detach().to(dev).requires_grad_(t.requires_grad) for t in cpu_inputs]
    if family == "batch_norm":
        x, w, b, rm, rv, g = ins
        y = PF.batch_norm(x, rm, rv, w, b, training=True)
        y.backward(g)
        return [y, x.grad, w.grad, b.grad, rm, rv]
    if family == "attention":
        q, k, v, g = ins
        y = PF.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.backward(g)
        return [y, q.grad, k.grad, v.grad]
    p, grad = ins
    p = torch.nn.Parameter(p)
    opt = pyfastdl.optim.Adam([p], lr=1e-2)
    for _ in range(2):
        p.grad = grad.clone()
        opt.step()
    return [p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]]


def _family_inputs(family):
    torch.manual_seed(0)
    if family == "batch_norm":
        return [torch.randn(8, 6, 5, 5, requires_grad=True), torch.rand(6, requires_grad=True),
                torch.randn(6, requires_grad=True), torch.zeros(6), torch.ones(6), torch.randn(8, 6, 5, 5)]
    if family == "attention":
        return [torch.randn(2, 3, 33, 64, requires_grad=True) for _ in range(3)] + [torch.randn(2, 3, 33, 64)]
    return [torch.randn(1000), torch.randn(1000)]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("_", [pytest.param(None, marks=two_gpus, id="two-gpus")])
def test_second_device_runs_there(backend, family, _):
    """cuda:0 is current; the same inputs on cuda:1 must run on cuda:1 (outputs, gradients and state
    there) and give what cuda:0 gives. Without the guard a launch goes to the current device: an
    illegal address, or wrong values."""
    cpu_inputs = _family_inputs(family)
    torch.cuda.set_device(0)
    results = {}
    for dev in ("cuda:0", "cuda:1"):
        with backends.use(backend):
            outs = _run_family(family, cpu_inputs, dev)
        assert backends.last_dispatch().backend == backend
        assert torch.cuda.current_device() == 0
        assert all(o.device == torch.device(dev) for o in outs), [o.device for o in outs]
        torch.cuda.synchronize(dev)
        results[dev] = [o.detach().cpu() for o in outs]
    for a, b in zip(results["cuda:0"], results["cuda:1"]):
        # same kernels and inputs; attention's dQ sums through atomics (order may differ)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
