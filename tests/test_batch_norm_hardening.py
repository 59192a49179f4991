"""Batch norm, hardening (issue 9) and PyTorch's own catalogues (issue 8): precision on long planes,
NaN/Inf semantics, double backward, the backward's output mask, OpInfo and ModuleInfo samples,
threads, bad input and property tests, each against torch.nn.functional.batch_norm."""
import copy
import os
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import pyfastdl
from pyfastdl import backends
from pyfastdl import functional as PF
from helpers import DEVICE, MARKS, rel_err

KERNEL_BACKENDS = [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "cuda", "triton")]


def run(backend, *args, **kwargs):
    with backends.use(backend):
        out = PF.batch_norm(*args, **kwargs)
    d = backends.last_dispatch()
    assert d.backend == backend and d.fallback is None
    return out


def same(a, b):
    """Equal values with NaN == NaN (and equal infinities)."""
    return a.shape == b.shape and torch.equal(torch.nan_to_num(a, 7.0, 8.0, 9.0), torch.nan_to_num(b, 7.0, 8.0, 9.0)) \
        and torch.equal(a.isnan(), b.isnan())


# ---- defect 6: statistics precision on long planes ------------------------------------------------

def _errors(fn, x, g, w, b):
    """Relative errors of y and dx (training, float32) against float64 math on the same values."""
    xd = x.double().requires_grad_()
    yd = F.batch_norm(xd, None, None, w.double(), b.double(), True)
    (gxd,) = torch.autograd.grad(yd, xd, g.double())
    xx = x.clone().requires_grad_()
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    y = fn(xx, rm, rv, w, b, True)
    (gx,) = torch.autograd.grad(y, xx, g)
    rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()  # noqa: E731
    return rel(y, yd.detach()), rel(gx, gxd)


@pytest.mark.parametrize("shape", [(2, 4, 128, 128, 128), (1, 2, 4096, 4096), (1, 1, 2**24), (2**24, 1),
                                   (4, 2, 1 << 20)],
                         ids=["bn3d-128^3", "4096^2", "one-channel-2^24-ncs", "one-channel-2^24-nc", "4x2^20"])
def test_precision_long_planes_within_2x_torch(shape):
    """Before: y 2.7e-4 and dx 3.9e-4 at (1, 2, 4096, 4096) (torch 4.5e-8 / 6.1e-8): each lane summed
    S / 16 terms in float32. Now chunks of 4096 elements are summed in float32, chunks in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 2 + 3
    dy = torch.randn(shape, generator=g)
    C = shape[1]
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    ey, edx = _errors(lambda *a: run("cpu", *a), x, dy, w, b)
    ty, tdx = _errors(F.batch_norm, x, dy, w, b)
    assert ey <= 2 * ty + 1e-8 and edx <= 2 * tdx + 1e-8, (ey, edx, ty, tdx)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cuda", "triton")])
def test_precision_long_plane_gpu_backends(backend, monkeypatch):
    """Many partials per channel merged in float64 (CUDA, Triton), at most 1024 (CUDA) / 512 (Triton)
    elements a thread or lane. On a GPU: one channel of 2^24. Under the Triton interpreter (slow):
    2^16 elements with one SM and 8 elements a lane, which takes the same code path (many partials)."""
    interpreted = backend == "triton" and DEVICE[backend] == "cpu"
    n = 1 << (16 if interpreted else 24)
    if interpreted:
        from pyfastdl.triton_kernels import batch_norm as tbn
        monkeypatch.setattr(tbn, "_DEFAULT_SMS", 1)
        monkeypatch.setattr(tbn, "_MAX_LANE_ELEMS", 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, n, generator=g) * 2 + 3
    dy = torch.randn(1, 1, n, generator=g)
    w, b = torch.tensor([1.5]), torch.tensor([0.25])
    dev = DEVICE[backend]

    def fn(xx, rm, rv, w, b, training):
        return run(backend, xx.to(dev), rm.to(dev), rv.to(dev), w.to(dev), b.to(dev), training).cpu()
    ey, edx = _errors(fn, x, dy, w, b)
    ty, tdx = _errors(F.batch_norm, x, dy, w, b)
    assert ey <= 2 * ty + 1e-8 and edx <= 2 * tdx + 1e-8, (ey, edx, ty, tdx)


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PYFASTDL_HUGE_TESTS") != "1" or _mem_available() < 20 * 2**30,
                    reason="needs ~17 GiB free (8 GiB input + 8 GiB output): PYFASTDL_HUGE_TESTS=1 "
                           "(make bench-full sets it) on a machine with 20 GiB free")
def test_one_channel_past_2_pow_31_running_stats_exact():
    """One channel of 2^31 + 18 elements (64-bit indexing; before: running_var off by 8%). The
    input repeats a 1024-value pattern, so the exact statistics are known in float64."""
    n = 2**31 + 18
    base = torch.randn(1024, generator=torch.Generator().manual_seed(0)) + 3
    x = torch.empty(n)
    q, r = divmod(n, 1024)
    x[: q * 1024].view(q, 1024).copy_(base.expand(q, 1024))
    x[q * 1024:] = base[:r]
    bd = base.double()
    s1 = q * bd.sum() + bd[:r].sum()
    mean = s1 / n
    s2 = q * ((bd - mean) ** 2).sum() + ((bd[:r] - mean) ** 2).sum()
    var_unbiased = s2 / (n - 1)
    rm, rv = torch.zeros(1), torch.ones(1)
    with torch.no_grad():
        y = run("cpu", x.view(1, 1, n), rm, rv, None, None, True, 1.0)
    del y
    assert abs(rm.double().item() - mean.item()) <= 1e-6 * abs(mean.item())
    assert abs(rv.double().item() - var_unbiased.item()) <= 1e-5 * var_unbiased.item()


# ---- defects 4 and 8: non-finite values, rank, eps ------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_eval_backward_with_nonfinite_x_is_finite_as_torch(backend, value):
    """Eval: dx = dy * weight * invstd does not depend on x (before: 0 * NaN = NaN at that element)."""
    dev = DEVICE[backend]
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 3, 4] = value
    x[0, 0, 0, 0] = value
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    dy = torch.randn(4, 3, 5, 5)
    outs = []
    for f in ("torch", backend):
        xx, ww, bb = (t.clone().to(dev).requires_grad_() for t in (x, w, b))
        args = (xx, rm.to(dev), rv.to(dev), ww, bb, False)
        y = F.batch_norm(*args) if f == "torch" else run(backend, *args)
        y.backward(dy.to(dev))
        outs.append((xx.grad.cpu(), ww.grad.cpu(), bb.grad.cpu()))
    (tx, tw, tb), (px, pw, pb) = outs
    assert torch.isfinite(px).all()
    torch.testing.assert_close(px, tx)
    torch.testing.assert_close(pw, tw, equal_nan=True)  # grad_weight still non-finite, as torch
    assert not torch.isfinite(pw).all()
    torch.testing.assert_close(pb, tb)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("pos", [0, 7], ids=["first-element", "other"])
@pytest.mark.parametrize("layout", ["ncs", "nc"])
def test_training_with_inf_in_a_channel_running_mean_inf_as_torch(backend, pos, layout):
    """Before: the statistics' shift (the channel's first element) was inf: mean inf - inf = NaN."""
    dev = DEVICE[backend]
    x = torch.randn(4, 3, 5) if layout == "ncs" else torch.randn(20, 3)
    if layout == "ncs":
        x[pos // 5, 1, pos % 5] = float("inf")  # pos 0: channel 1's first element
    else:
        x[pos, 1] = float("inf")
    rm_t, rv_t = torch.zeros(3), torch.ones(3)
    F.batch_norm(x, rm_t, rv_t, training=True)
    rm, rv = torch.zeros(3, device=dev), torch.ones(3, device=dev)
    run(backend, x.to(dev), rm, rv, None, None, True)
    assert rm_t[1].item() == float("inf")
    assert rm[1].item() == float("inf")  # before: NaN when the inf was the channel's first element
    torch.testing.assert_close(rm.cpu(), rm_t, equal_nan=True)
    torch.testing.assert_close(rv.cpu(), rv_t, equal_nan=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_six_dim_input_as_torch(backend, training):
    dev = DEVICE[backend]
    x = torch.randn(2, 3, 2, 3, 2, 2, dtype=torch.float64)
    w, b, rm, rv = torch.rand(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64), \
        torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    ref = F.batch_norm(x, rm_t, rv_t, w, b, training)
    rm_p, rv_p = rm.to(dev), rv.to(dev)
    out = run(backend, x.to(dev), rm_p, rv_p, w.to(dev), b.to(dev), training)
    torch.testing.assert_close(out.cpu(), ref)
    torch.testing.assert_close(rm_p.cpu(), rm_t)
    torch.testing.assert_close(rv_p.cpu(), rv_t)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_eps_rules_as_torch(backend):
    """torch: eps > 0 when training, eps >= 0 in eval, ValueError otherwise (before: eps=0 accepted in
    training). Negative momentum is accepted, as torch."""
    dev = DEVICE[backend]
    x = torch.randn(4, 3, 5, device=dev)
    rm, rv = torch.zeros(3, device=dev), torch.ones(3, device=dev)
    for training, eps in ((True, 0.0), (True, -1.0), (False, -1.0)):
        with pytest.raises(ValueError):
            F.batch_norm(x.cpu(), rm.cpu().clone(), rv.cpu().clone(), training=training, eps=eps)
        with backends.use(backend), pytest.raises(ValueError, match="eps"):
            PF.batch_norm(x, rm, rv, training=training, eps=eps)
        assert torch.equal(rm.cpu(), torch.zeros(3)) and torch.equal(rv.cpu(), torch.ones(3))
    torch.testing.assert_close(run(backend, x, rm, rv, training=False, eps=0.0).cpu(),
                               F.batch_norm(x.cpu(), torch.zeros(3), torch.ones(3), eps=0.0))
    rm_t, rv_t = torch.zeros(3), torch.ones(3)
    F.batch_norm(x.cpu(), rm_t, rv_t, training=True, momentum=-1.0)
    run(backend, x, rm, rv, training=True, momentum=-1.0)
    torch.testing.assert_close(rm.cpu(), rm_t)
    torch.testing.assert_close(rv.cpu(), rv_t)


# ---- defect 3: double backward --------------------------------------------------------------------

def _gradgrad_cases():
    """Every combination on the CPU kernels; two on the others (under the Triton interpreter each of
    gradgradcheck's hundreds of forward calls costs a second: smaller inputs, fewer cases)."""
    cases = []
    for backend in KERNEL_BACKENDS:
        name = backend.values[0] if hasattr(backend, "values") else backend
        marks = backend.marks if hasattr(backend, "marks") else ()
        for training in (True, False):
            for affine in (True, False):
                for act in (None, "relu", "sigmoid"):
                    if name != "cpu" and (affine is False or (act is not None) is training):
                        continue
                    if act == "sigmoid" and not affine:
                        continue
                    cases.append(pytest.param(name, training, affine, act, marks=marks,
                                              id=f"{name}-{'train' if training else 'eval'}-"
                                                 f"{'affine' if affine else 'no-affine'}-{act or 'plain'}"))
    return cases


@pytest.mark.parametrize("backend,training,affine,activation", _gradgrad_cases())
def test_gradgradcheck(backend, training, affine, activation):
    """Before: backward was once_differentiable and create_graph was silently dropped."""
    dev = DEVICE[backend]
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 5) if backend == "cpu" else (2, 4, 2)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5).to(dev).requires_grad_()
    w = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(dev).requires_grad_() if affine else None
    b = torch.randn(4, generator=g, dtype=torch.float64).to(dev).requires_grad_() if affine else None
    rm = torch.randn(4, generator=g, dtype=torch.float64).to(dev)
    rv = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).to(dev)

    def f(*args):
        with backends.use(backend):
            return PF.batch_norm(args[0], rm.clone(), rv.clone(), *args[1:], training=training,
                                 activation=activation)
    inputs = (x, w, b) if affine else (x,)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradient_penalty_matches_torch():
    """WGAN-GP style: the penalty on ||dy/dx|| trains weight (issue 9: torch's weight.grad is
    [182.97, -1.66, 3.18]-like, pyfastdl's was [1.37, -0.02, 0.04] with the penalty dropped)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 3, 4, 4, generator=g)
    w0, b0 = torch.rand(3, generator=g) + 0.5, torch.randn(3, generator=g)
    grads = []
    for f in (F.batch_norm, PF.batch_norm):
        x, w, b = x0.clone().requires_grad_(), w0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = f(x, torch.zeros(3), torch.ones(3), w, b, True)
        out = (y ** 3).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        assert gx.requires_grad
        loss = out + 10 * ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean()
        loss.backward()
        grads.append((x.grad, w.grad, b.grad))
    for t, p in zip(*grads):
        torch.testing.assert_close(p, t, rtol=1e-4, atol=1e-4)
    assert backends.last_dispatch() is not None


def test_first_order_backward_stays_on_the_kernel(monkeypatch):
    """Only create_graph=True takes the reference recomputation; a plain backward calls the op."""
    calls = []
    real = backends.record

    def spy(op, backend, fallback=None):
        calls.append(op)
        return real(op, backend, fallback)
    monkeypatch.setattr(backends, "record", spy)
    monkeypatch.setattr(pyfastdl.autograd.batch_norm.backends, "record", spy)
    x = torch.randn(4, 3, 5, requires_grad=True)
    PF.batch_norm(x, None, None, training=True).sum().backward()
    assert "batch_norm_double_backward" not in calls
    y = PF.batch_norm(x, None, None, training=True)
    torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    assert "batch_norm_double_backward" in calls


# ---- issue 8 item 2: the backward's output mask ---------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["ncs", "channels_last", "nc"])
def test_bwd_output_mask_computes_only_what_is_asked(backend, training, layout):
    dev = DEVICE[backend]
    ops = backends.ops(backend, "batch_norm")
    shape = (6, 3) if layout == "nc" else (4, 3, 5, 5)
    x = torch.randn(shape, device=dev)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(3, device=dev) + 0.5, torch.randn(3, device=dev)
    rm, rv = torch.randn(3, device=dev), torch.rand(3, device=dev) + 0.5
    _, mean, invstd = ops.batch_norm_fwd(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, 0)
    dy = torch.randn_like(x)
    full = ops.batch_norm_bwd(dy, x, w, b, mean, invstd, training, 0, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True],
                 [False, False, False]):
        out = ops.batch_norm_bwd(dy, x, w, b, mean, invstd, training, 0, mask)
        for want, o, f in zip(mask, out, full):
            if want:
                assert torch.equal(o, f)
            else:
                assert o is None
        torch.library.opcheck(ops.batch_norm_bwd, (dy, x, w, b, mean, invstd, training, True, mask))


def test_function_passes_needs_input_grad_as_mask():
    seen = []
    ops = backends.ops("cpu", "batch_norm")

    class Spy:
        batch_norm_fwd = ops.batch_norm_fwd

        @staticmethod
        def batch_norm_bwd(*args):
            seen.append(list(args[-1]))
            return ops.batch_norm_bwd(*args)
    # The Python Function (the Triton backend's path; cpu/cuda calls go through the C++ node of
    # pyfastdl::batch_norm, whose mask is tested in tests/test_percall.py), given the cpu ops.
    from pyfastdl.autograd import BatchNormFunction
    x = torch.randn(4, 3, 5)
    w = torch.rand(3, requires_grad=True)
    b = torch.rand(3)
    BatchNormFunction.apply(x, w, b, None, None, True, 0.1, 1e-5, 0, Spy).sum().backward()
    assert seen == [[False, True, False]]


# ---- issue 8: PyTorch's OpInfo and ModuleInfo samples ---------------------------------------------

def _op_samples(dtype):
    from torch.testing._internal.common_methods_invocations import op_db
    op = next(o for o in op_db if o.name == "nn.functional.batch_norm" and o.variant_test_name == "")
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opinfo_samples_match_torch(dtype):
    pytest.importorskip("expecttest")
    for i, s in enumerate(_op_samples(dtype)):
        results = []
        for f in (F.batch_norm, PF.batch_norm):
            x = s.input.detach().clone().requires_grad_(s.input.requires_grad)
            args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                    for a in s.args]
            try:
                y = f(x, *args, **s.kwargs)
            except Exception as e:  # noqa: BLE001
                results.append(("error", type(e)))
                continue
            leaves = [t for t in [x] + args if isinstance(t, torch.Tensor) and t.requires_grad]
            # a random grad_output: with ones, grad_weight = sum(xhat) = 0 and only rounding noise is compared
            dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(i), dtype=y.dtype)
            grads = torch.autograd.grad(y, leaves, dy, allow_unused=True) if leaves and y.numel() else []
            results.append((y.detach(), [a for a in args if isinstance(a, torch.Tensor)], grads))
        (t, p) = results
        if t[0] == "error":
            assert p[0] == "error", (i, s)
            continue
        assert p[0] != "error", (i, s, p)
        torch.testing.assert_close(p[0], t[0], msg=f"sample {i}")
        for a, b in zip(p[1], t[1]):
            torch.testing.assert_close(a.detach(), b.detach(), msg=f"sample {i} (mutated arguments)")
        for a, b in zip(p[2], t[2]):
            torch.testing.assert_close(a, b, msg=f"sample {i} (gradients)")


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_moduleinfo_samples_match_torch(name, training):
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_modules import module_db
    info = next(m for m in module_db if m.module_cls.__name__ == name)
    samples = info.module_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=True,
                                      training=training)
    assert samples
    for i, mi in enumerate(samples):
        ca, fi = mi.constructor_input, mi.forward_input
        ref = getattr(torch.nn, name)(*ca.args, **ca.kwargs)
        mod = getattr(pyfastdl.nn, name)(*ca.args, **ca.kwargs)
        mod.load_state_dict(ref.state_dict())
        ref.train(training)
        mod.train(training)
        for step in range(2):  # twice: the running statistics (and num_batches_tracked) carry over
            outs = []
            for m in (ref, mod):
                args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                        for a in fi.args]
                y = m(*args, **fi.kwargs)
                y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(step), dtype=y.dtype))
                outs.append((y.detach(), [a.grad for a in args if isinstance(a, torch.Tensor)]))
            torch.testing.assert_close(outs[1][0], outs[0][0], msg=f"{name} sample {i}")
            for a, b in zip(outs[1][1], outs[0][1]):
                torch.testing.assert_close(a, b, msg=f"{name} sample {i} (input grad)")
            for (k, a), (_, b) in zip(mod.named_buffers(), ref.named_buffers()):
                torch.testing.assert_close(a, b, msg=f"{name} sample {i} buffer {k}")
            for (k, a), (_, b) in zip(mod.named_parameters(), ref.named_parameters()):
                torch.testing.assert_close(a.grad, b.grad, msg=f"{name} sample {i} grad {k}")


# ---- NaN / Inf table ------------------------------------------------------------------------------
# Positions in a (2, 3, 37) NCS input (37 = 4 vectors of 8 + a 5-element tail on AVX2, 2 of 16 + 5 on
# AVX-512), channel 1: SIMD lane 0 (s = 0 and 16), another lane (s = 5), the tail (s = 36); and a
# channels_last (2, 3, 5, 7) input, where a row holds one element of each channel.
POSITIONS = {"lane0": (1, 1, 16), "lane5": (0, 1, 5), "tail": (1, 1, 36), "first": (0, 1, 0),
             "channels_last": (1, 2, 3, 4)}
NONFINITE = {"nan": float("nan"), "+inf": float("inf"), "-inf": -float("inf")}


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "triton")])
@pytest.mark.parametrize("where", list(POSITIONS))
@pytest.mark.parametrize("value", list(NONFINITE))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nonfinite_table_forward_backward_as_torch(backend, where, value, training):
    dev = DEVICE[backend]
    g = torch.Generator().manual_seed(0)
    if where == "channels_last":
        x = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(2, 3, 37, generator=g, dtype=torch.float64)
    x[POSITIONS[where]] = NONFINITE[value]
    if where == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w, b = torch.rand(3, generator=g, dtype=torch.float64) + 0.5, torch.randn(3, generator=g, dtype=torch.float64)
    rm0, rv0 = torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64) + .5
    res = []
    for f in ("torch", backend):
        xx, ww, bb = (t.clone().to(dev).requires_grad_() for t in (x, w, b))
        rm, rv = rm0.clone().to(dev), rv0.clone().to(dev)
        y = F.batch_norm(xx, rm, rv, ww, bb, training) if f == "torch" else run(backend, xx, rm, rv, ww, bb, training)
        y.backward(dy.to(dev))
        res.append([t.detach().cpu() for t in (y, rm, rv, xx.grad, ww.grad, bb.grad)])
    for name, p, t in zip(("y", "running_mean", "running_var", "grad_input", "grad_weight", "grad_bias"), *res[::-1]):
        torch.testing.assert_close(p, t, equal_nan=True, msg=name)


# ---- threads --------------------------------------------------------------------------------------

THREAD_CASES = [((4, 3, 37), None), ((8, 16, 9, 9), None), ((4, 6, 5, 7), torch.channels_last), ((64, 5), None),
                ((2, 32, 3000), None)]


def _all_outputs(shape, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 1
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g)
    C = shape[1]
    w, b = (torch.rand(C, generator=g) + 0.5).requires_grad_(), torch.randn(C, generator=g).requires_grad_()
    x.requires_grad_()
    rm, rv = torch.zeros(C), torch.ones(C)
    y = PF.batch_norm(x, rm, rv, w, b, True)
    y.backward(dy)
    ye = PF.batch_norm(x.detach(), rm, rv, w.detach(), b.detach(), False)
    return [t.detach().clone() for t in (y, x.grad, w.grad, b.grad, rm, rv, ye)]


@pytest.mark.parametrize("shape,fmt", THREAD_CASES)
def test_one_and_two_threads_give_the_same_bits(shape, fmt):
    """Reductions sum fixed per-run / per-block partials in a fixed order, whatever the thread count
    (the fused per-channel path, chosen by thread count, sums in the same order as the two-pass one)."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_outputs(shape, fmt)
        torch.set_num_threads(2)
        two = _all_outputs(shape, fmt)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_four_python_threads_equal_single_thread():
    expected = {i: _all_outputs(*THREAD_CASES[i % len(THREAD_CASES)], seed=i) for i in range(8)}
    got, errors = {}, []

    def worker(k):
        try:
            for i in range(k, 8, 4):
                got[i] = _all_outputs(*THREAD_CASES[i % len(THREAD_CASES)], seed=i)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(8):
        for a, b in zip(got[i], expected[i]):
            assert torch.equal(a, b)


# ---- bad input: every argument, nothing written ---------------------------------------------------

def _bad_cases(dev):
    x = torch.randn(4, 3, 5, device=dev)
    ok = dict(input=x, running_mean=torch.zeros(3, device=dev), running_var=torch.ones(3, device=dev),
              weight=torch.ones(3, device=dev), bias=torch.zeros(3, device=dev), training=True)
    return ok, [
        ("rank 1", dict(input=torch.randn(4, device=dev)), RuntimeError, "input"),
        ("rank 0", dict(input=torch.tensor(1.0, device=dev)), RuntimeError, "input"),
        ("int input", dict(input=torch.ones(4, 3, 5, dtype=torch.long, device=dev)), RuntimeError, "input"),
        ("weight size", dict(weight=torch.ones(4, device=dev)), RuntimeError, "weight"),
        ("weight rank", dict(weight=torch.ones(3, 1, device=dev)), RuntimeError, "weight"),
        ("bias size", dict(bias=torch.ones(2, device=dev)), RuntimeError, "bias"),
        ("running_mean size", dict(running_mean=torch.zeros(4, device=dev)), RuntimeError, "running_mean"),
        ("running_var size", dict(running_var=torch.ones(5, device=dev)), RuntimeError, "running_var"),
        ("running_var dtype", dict(running_var=torch.ones(3, dtype=torch.int32, device=dev)), RuntimeError,
         "running_var"),
        ("weight dtype", dict(weight=torch.ones(3, dtype=torch.float16, device=dev)), RuntimeError, "weight"),
        ("weight device", dict(weight=torch.ones(3, device="meta")), RuntimeError, "weight"),
        ("running_mean device", dict(running_mean=torch.zeros(3, device="meta")), RuntimeError, "running_mean"),
        ("only running_mean", dict(running_var=None), RuntimeError, "running_mean and running_var"),
        ("eval without stats", dict(running_mean=None, running_var=None, training=False), RuntimeError,
         "required"),
        ("negative eps", dict(eps=-1e-5), ValueError, "eps"),
        ("zero eps training", dict(eps=0.0), ValueError, "eps"),
        ("nan momentum", dict(momentum=float("nan")), ValueError, "momentum"),
        ("one value per channel", dict(input=torch.randn(1, 3, 1, device=dev)), ValueError, "more than 1 value"),
    ]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bad_input_table_names_the_argument_and_writes_nothing(backend):
    dev = DEVICE[backend]
    ok, cases = _bad_cases(dev)
    for desc, change, exc, match in cases:
        kw = {**ok, **change}
        watched = [t for k, t in kw.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"
                   and k != "input"]
        before = [t.clone() for t in watched]
        with backends.use(backend), pytest.raises(exc, match=match):
            PF.batch_norm(**kw)
        for t, t0 in zip(watched, before):
            assert torch.equal(t, t0), desc


@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (4, 3)), ("BatchNorm2d", (4, 3, 2, 2)),
                                        ("BatchNorm3d", (2, 3, 2, 2, 2))])
def test_module_bad_input_leaves_state_untouched(name, shape):
    m = getattr(pyfastdl.nn, name)(3)
    state = copy.deepcopy(m.state_dict())
    for bad in (torch.randn(*shape[:1], 4, *shape[2:]), torch.ones(shape, dtype=torch.long), torch.randn(1, 3)):
        with pytest.raises((RuntimeError, ValueError)):
            m(bad)
        for k, v in m.state_dict().items():
            assert torch.equal(v, state[k]), k


# ---- property tests -------------------------------------------------------------------------------

@st.composite
def _bn_case(draw):
    rank = draw(st.integers(2, 5))
    shape = [draw(st.sampled_from([0, 1, 2, 3, 5, 8, 17])) for _ in range(rank)]
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded", "channels_last", "offset"]))
    return dict(shape=shape, layout=layout, training=draw(st.booleans()), affine=draw(st.booleans()),
                running=draw(st.booleans()), momentum=draw(st.sampled_from([0.1, 0.0, 1.0, -0.5])),
                eps=draw(st.sampled_from([1e-5, 0.3])), seed=draw(st.integers(0, 2**16)))


def _make(shape, layout, g):
    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 3:
        t = torch.randn(shape[:-2] + (shape[-1], shape[-2]), generator=g, dtype=torch.float64)
        return t.transpose(-1, -2)
    if layout == "sliced":
        return torch.randn(shape[:-1] + (2 * shape[-1],), generator=g, dtype=torch.float64)[..., ::2]
    if layout == "expanded" and shape[0] > 0:
        return torch.randn((1,) + shape[1:], generator=g, dtype=torch.float64).expand(shape)
    if layout == "channels_last" and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return torch.randn(shape, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
    if layout == "offset":
        n = 1
        for d in shape:
            n *= d
        return torch.randn(n + 3, generator=g, dtype=torch.float64)[3:].view(shape)
    return torch.randn(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "triton", "reference")])
def test_one_sample_per_channel_refused_as_torch_found_by_hypothesis(backend):
    """Found by the property test below: training on (1, 0) -- N * prod(spatial) == 1 with C = 0 --
    is refused by torch (ValueError); pyfastdl returned an empty result."""
    for shape in ((1, 0), (1, 0, 1), (1, 3), (1, 3, 1, 1)):
        x = torch.randn(shape, dtype=torch.float64, device=DEVICE[backend])
        with backends.use(backend), pytest.raises(ValueError, match="more than 1 value per channel"):
            PF.batch_norm(x, None, None, training=True)
    with backends.use(backend):  # N = 0: nothing to refuse, as torch
        assert PF.batch_norm(torch.randn(0, 3, dtype=torch.float64, device=DEVICE[backend]), None, None,
                             training=True).shape == (0, 3)


@settings(max_examples=25, deadline=None)
@given(_bn_case())
def test_property_matches_torch(case):
    g = torch.Generator().manual_seed(case["seed"])
    x = _make(case["shape"], case["layout"], g) * 2 + 0.5
    C = x.shape[1]
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if case["affine"] else None
    b = torch.randn(C, generator=g, dtype=torch.float64) if case["affine"] else None
    running = case["running"] or not case["training"]
    rm0 = torch.randn(C, generator=g, dtype=torch.float64) if running else None
    rv0 = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if running else None
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    results = []
    for f in (F.batch_norm, PF.batch_norm):
        xx = x.clone().requires_grad_() if x.stride() == x.contiguous().stride() else x.detach().requires_grad_()
        ww = w.clone().requires_grad_() if w is not None else None
        bb = b.clone().requires_grad_() if b is not None else None
        rm = rm0.clone() if rm0 is not None else None
        rv = rv0.clone() if rv0 is not None else None
        try:
            y = f(xx, rm, rv, ww, bb, case["training"], case["momentum"], case["eps"])
        except Exception as e:  # noqa: BLE001
            results.append(type(e))
            continue
        leaves = [t for t in (xx, ww, bb) if t is not None]
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
        results.append((y.detach(), rm, rv, grads))
    t, p = results
    if isinstance(t, type) and t is IndexError and C == 0:
        return  # torch's IndexError on C = 0 with a weight (select() on an empty tensor); pyfastdl: empty y
    if isinstance(t, type):
        assert p is t, (case, p)
        return
    assert not isinstance(p, type), (case, p)
    torch.testing.assert_close(p[0], t[0])
    for a, b_ in zip(p[1:3], t[1:3]):
        if b_ is not None:
            torch.testing.assert_close(a, b_)
    for a, b_ in zip(p[3], t[3]):
        if b_ is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b_)
