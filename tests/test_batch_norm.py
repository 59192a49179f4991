"""Batch norm: every backend against torch and the float64 reference, forward and backward,
gradcheck, opcheck, running statistics, drop-in modules, layouts, bad input."""
import os

import pytest
import torch
import torch.nn.functional as F

import pyfastdl
from pyfastdl import backends
from pyfastdl import functional as PF
from helpers import DEVICE, MARKS, TOL, params, rel_err

DTYPES = {
    "cpu": [torch.float32, torch.float64],
    "reference": [torch.float64],
    "cuda": [torch.float32, torch.float64, torch.float16, torch.bfloat16],
    "triton": [torch.float32, torch.float64, torch.float16, torch.bfloat16],
}
# Odd and prime sizes beside round ones; (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W).
SHAPES = [(7, 5), (4, 3, 17), (2, 3, 17, 17), (3, 16, 8, 8), (1, 5, 2, 3), (2, 4, 3, 5, 3)]
# The Triton interpreter is slow: fewer shapes there.
SHAPES_TRITON = [(7, 5), (2, 3, 17, 17), (2, 4, 3, 5, 3)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def make_input(shape, dtype, device, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
    if layout == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
        return x.contiguous(memory_format=fmt) if fmt else x
    if layout == "strided":  # a non-contiguous view with the same values
        big = torch.empty(shape[:-1] + (2 * shape[-1],), dtype=dtype, device=device)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def make_params(C, dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    p = lambda: torch.randn(C, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    return p(), p(), p() * 0.1, p().abs() + 0.5  # weight, bias, running_mean, running_var


def shapes_for(backend):
    return SHAPES_TRITON if backend == "triton" else SHAPES


def cases(backend):
    return [(s, lay) for s in shapes_for(backend) for lay in LAYOUTS
            if not (lay == "channels_last" and len(s) < 4)]


def run_pyfastdl(backend, *args, **kwargs):
    with backends.use(backend):
        out = PF.batch_norm(*args, **kwargs)
    assert backends.last_dispatch().backend == backend
    assert backends.last_dispatch().fallback is None
    return out


# ---- forward / backward against torch in float64 ---------------------------------------------------

@pytest.mark.parametrize("backend,dtype", params(DTYPES))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine,activation", [(True, None), (False, None), (True, "relu"), (True, "sigmoid"),
                                               (False, "sigmoid")],
                         ids=["affine", "noaffine", "affine-relu", "affine-sigmoid", "noaffine-sigmoid"])
def test_forward_backward_match_torch(backend, dtype, training, affine, activation):
    device = DEVICE[backend]
    for shape, layout in cases(backend):
        C = shape[1]
        x = make_input(shape, dtype, device, layout)
        w, b, rm, rv = make_params(C, dtype if dtype == torch.float64 else torch.float32, device)
        w = w.to(dtype) if affine else None
        b = b.to(dtype) if affine else None
        if dtype in (torch.float16, torch.bfloat16) and affine:
            w, b = w.float(), b.float()
        # float64 reference through torch's own op
        xr = x.detach().double().requires_grad_()
        wr = w.detach().double().requires_grad_() if affine else None
        br = b.detach().double().requires_grad_() if affine else None
        rmr, rvr = rm.double().clone(), rv.double().clone()
        ref = F.batch_norm(xr, rmr, rvr, wr, br, training, 0.1, 1e-5)
        if activation is not None:
            ref = getattr(torch, activation)(ref)

        xt = x.detach().requires_grad_()
        wt = w.detach().requires_grad_() if affine else None
        bt = b.detach().requires_grad_() if affine else None
        out = run_pyfastdl(backend, xt, rm, rv, wt, bt, training, 0.1, 1e-5, activation=activation)
        tol = TOL[dtype]
        assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
        assert rel_err(out, ref) <= tol, (shape, layout)
        assert rel_err(rm, rmr) <= max(tol, 1e-6) and rel_err(rv, rvr) <= max(tol, 1e-6), (shape, layout)
        if layout == "channels_last" and backend != "reference":
            assert out.stride() == x.stride(), "channels_last output expected"

        g = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        ref.backward(g.to(device))
        out.backward(g.to(dtype).to(device))
        assert rel_err(xt.grad, xr.grad) <= 10 * tol, (shape, layout)  # two reductions deep
        if affine:
            assert rel_err(wt.grad, wr.grad) <= 10 * tol and rel_err(bt.grad, br.grad) <= 10 * tol


@pytest.mark.parametrize("backend,dtype", params({**DTYPES, "cpu": [torch.float32], "reference": [],
                                                  "cuda": [torch.float32], "triton": [torch.float32]}))
def test_numerically_stable_statistics(backend, dtype):
    """A channel with mean 1e4 and std 1e-2 still normalizes correctly in float32."""
    device = DEVICE[backend]
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(16, 3, 9, 9, generator=g, dtype=torch.float64) * 1e-2 + 1e4
    x = x64.to(dtype).to(device)
    ref = F.batch_norm(x.double(), None, None, training=True)  # float64 stats of the float32 values
    out = run_pyfastdl(backend, x, None, None, training=True)
    assert rel_err(out, ref) <= 1e-3


@pytest.mark.parametrize("backend,dtype", params({"cpu": [torch.float64], "reference": [torch.float64],
                                                  "cuda": [torch.float64], "triton": [torch.float64]}))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"], ids=["plain", "relu", "sigmoid"])
def test_gradcheck(backend, dtype, training, activation):
    device = DEVICE[backend]
    for shape, layout in [((3, 4, 3, 2), "contiguous"), ((3, 4, 3, 2), "channels_last"), ((5, 3), "contiguous")]:
        x = make_input(shape, dtype, device, layout).requires_grad_()
        w, b, rm, rv = make_params(shape[1], dtype, device)
        w.requires_grad_()
        b.requires_grad_()

        def f(x, w, b):
            with backends.use(backend):
                return PF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, activation=activation)

        assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "cuda", "triton")])
def test_opcheck(backend):
    device = DEVICE[backend]
    ops = backends.ops(backend, "batch_norm")
    for shape, layout in [((4, 3, 5, 5), "contiguous"), ((4, 3, 5, 5), "channels_last"), ((6, 3), "contiguous")]:
        x = make_input(shape, torch.float32, device, layout)
        w, b, rm, rv = make_params(shape[1], torch.float32, device)
        for training in (True, False):
            torch.library.opcheck(ops.batch_norm_fwd, (x, w, b, rm, rv, training, 0.1, 1e-5, True))
            torch.library.opcheck(ops.batch_norm_fwd, (x, None, None, None if training else rm,
                                                       None if training else rv, training, 0.1, 1e-5, 0))
            _, mean, invstd = ops.batch_norm_fwd(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, 0)
            g = torch.randn_like(x)
            torch.library.opcheck(ops.batch_norm_bwd, (g, x, w, b, mean, invstd, training, True, [True, True, True]))


# ---- modules: running statistics, drop-in parity ---------------------------------------------------

MODULE_BACKENDS = [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "cuda", "triton")]


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_module_running_stats_several_steps(backend, momentum):
    device = DEVICE[backend]
    torch.manual_seed(0)
    ours = pyfastdl.nn.BatchNorm2d(3, momentum=momentum).to(device)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum).to(device)
    with backends.use(backend):
        for step in range(4):
            x = torch.randn(4, 3, 5, 7, device=device) * (step + 1) + step
            assert rel_err(ours(x), ref(x)) <= 1e-5
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
        assert rel_err(ours.running_mean, ref.running_mean) <= 1e-5
        assert rel_err(ours.running_var, ref.running_var) <= 1e-5
        ours.eval(), ref.eval()
        x = torch.randn(2, 3, 5, 7, device=device)
        assert rel_err(ours(x), ref(x)) <= 1e-5


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_module_variants_match_torch(backend):
    device = DEVICE[backend]
    torch.manual_seed(0)
    for cls, tcls, shape in [(pyfastdl.nn.BatchNorm1d, torch.nn.BatchNorm1d, (16, 6)),
                             (pyfastdl.nn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 6, 9)),
                             (pyfastdl.nn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 6, 3, 4, 5))]:
        for kwargs in ({}, {"affine": False}, {"track_running_stats": False}):
            ours, ref = cls(6, **kwargs).to(device), tcls(6, **kwargs).to(device)
            x = torch.randn(shape, device=device)
            with backends.use(backend):
                for mode in ("train", "eval"):
                    getattr(ours, mode)(), getattr(ref, mode)()
                    assert rel_err(ours(x), ref(x)) <= 1e-5, (cls, kwargs, mode)


def test_state_dict_round_trip_both_ways():
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(5)
    ref(torch.randn(4, 5, 3, 3))
    ours = pyfastdl.nn.BatchNorm2d(5)
    ours.load_state_dict(ref.state_dict())
    assert set(ours.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    back = torch.nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    ours.eval(), ref.eval()
    x = torch.randn(2, 5, 3, 3)
    assert rel_err(ours(x), ref(x)) <= 1e-6


def test_convert_swaps_layers_and_keeps_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 6), torch.nn.BatchNorm1d(6))
    model(torch.randn(4, 3, 6, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = model.eval()(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)))
    pyfastdl.convert(model)
    assert type(model[1]) is pyfastdl.nn.BatchNorm2d and type(model[5]) is pyfastdl.nn.BatchNorm1d
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    out = model(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)))
    assert backends.last_dispatch().backend == "cpu"
    assert rel_err(out, expected) <= 1e-5


# ---- the notes' reference ------------------------------------------------------------------------

def test_notes_reference_batch_norm_runs_as_the_notes_wrote_it():
    """The notes' module: training output equals torch's; moving stats follow the notes' convention
    (momentum 0.9 weights the old value, biased variance)."""
    torch.manual_seed(0)
    for num_dims, shape in [(4, (4, 6, 5, 5)), (2, (8, 6))]:
        bn = pyfastdl.reference.BatchNorm(6, num_dims=num_dims)
        x = torch.randn(shape)
        y = bn(x)
        assert rel_err(y, F.batch_norm(x, None, None, training=True)) <= 1e-5
        dims = [0] + list(range(2, x.dim()))
        expected_var = 0.9 * 1 + 0.1 * x.var(dim=dims, unbiased=False)
        assert rel_err(bn.moving_var.flatten(), expected_var) <= 1e-5
        bn.eval()
        assert bn(x).shape == x.shape


# ---- edge cases and bad input ---------------------------------------------------------------------

BAD_BACKENDS = [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "cuda", "triton")]


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_empty_batch(backend):
    device = DEVICE[backend]
    w, b, rm, rv = make_params(3, torch.float32, device)
    rm0, rv0 = rm.clone(), rv.clone()
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    out = run_pyfastdl(backend, x, rm, rv, w, b, True)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def _expect_error(backend, exc, match, x, rm, rv, w=None, b=None, training=True):
    stats = [t for t in (rm, rv) if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    before = [t.clone() for t in stats]
    with backends.use(backend), pytest.raises(exc, match=match):
        PF.batch_norm(x, rm, rv, w, b, training)
    for t, t0 in zip(stats, before):
        assert torch.equal(t, t0), "running statistics touched by bad input"


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_bad_input_raises_clearly_and_touches_nothing(backend):
    device = DEVICE[backend]
    w, b, rm, rv = make_params(3, torch.float32, device)
    x = torch.randn(4, 3, 5, 5, device=device)
    _expect_error(backend, RuntimeError, "rank", torch.randn(4, device=device), rm, rv, w, b)
    _expect_error(backend, RuntimeError, "weight", x, rm, rv, torch.ones(4, device=device), b)
    _expect_error(backend, RuntimeError, "bias", x, rm, rv, w, torch.ones(2, device=device))
    _expect_error(backend, RuntimeError, "running_mean", x, torch.zeros(4, device=device), rv, w, b)
    _expect_error(backend, RuntimeError, "running_var", x, rm, torch.ones(5, device=device), w, b)
    _expect_error(backend, RuntimeError, "floating-point", torch.randint(0, 5, (4, 3, 5, 5), device=device),
                  rm, rv, w, b)
    _expect_error(backend, RuntimeError, "running_mean", x, rm.to("meta"), rv, w, b)
    _expect_error(backend, RuntimeError, "required", x, None, None, w, b, training=False)
    # N=1 with H=W=1 in training: one value per channel, as torch raises
    _expect_error(backend, ValueError, "more than 1 value per channel", torch.randn(1, 3, 1, 1, device=device),
                  rm, rv, w, b)
    _expect_error(backend, ValueError, "more than 1 value per channel", torch.randn(1, 3, device=device),
                  rm, rv, w, b)


def test_bad_activation_and_backend_choice():
    x = torch.randn(4, 3, 5, 5)
    for bad in ("gelu", "Sigmoid", 1, ["relu"]):
        with pytest.raises(ValueError, match="activation"):
            PF.batch_norm(x, None, None, training=True, activation=bad)
    # the ops refuse a code they do not know, on every kernel backend (before writing anything)
    rm, rv = torch.zeros(3), torch.ones(3)
    for name in ("cpu", "triton"):
        ops = backends.ops(name, "batch_norm")
        for code in (-1, 3):
            with pytest.raises(ValueError, match="activation"):
                ops.batch_norm_fwd(x, None, None, rm, rv, True, 0.1, 1e-5, code)
            with pytest.raises(ValueError, match="activation"):
                ops.batch_norm_bwd(x, x, None, None, rm, rv, True, code, [True, False, False])
        assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(ValueError, match="unknown backend"):
        backends.use("tpu")
    with backends.use("cuda"), pytest.raises(backends.BackendError, match="cuda"):
        PF.batch_norm(x, None, None, training=True)


def test_module_bad_input_leaves_buffers_untouched():
    bn = pyfastdl.nn.BatchNorm2d(3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="expected 4D input"):
        bn(torch.randn(3, 5))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_strict_mode_refuses_fallback_and_dispatch_is_visible(monkeypatch):
    x = torch.randn(4, 3, 5, 5, dtype=torch.bfloat16)  # the CPU kernels cover float32/float64 only
    with pytest.raises(backends.BackendError, match="STRICT"):
        PF.batch_norm(x, None, None, training=True)
    monkeypatch.setitem(backends._config, "strict", False)
    out = PF.batch_norm(x, None, None, training=True)
    d = backends.last_dispatch()
    assert d.backend == "torch" and "bfloat16" in d.fallback
    assert rel_err(out, F.batch_norm(x.double(), None, None, training=True)) <= 1e-2
    monkeypatch.setitem(backends._config, "backend", "reference")
    PF.batch_norm(x.float(), None, None, training=True)
    assert backends.last_dispatch().backend == "reference"


_STREAM_CHECK = """
import torch, torch.nn.functional as F, pyfastdl.functional as PF
from pyfastdl import backends
for shape in [(3, 5, 17, 17), (4, 6, 8, 8), (2, 3, 5, 7, 3)]:
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        w = torch.randn(shape[1], dtype=dtype, requires_grad=True)
        b = torch.randn(shape[1], dtype=dtype, requires_grad=True)
        g = torch.randn(shape, dtype=dtype)
        for training, act in ((True, "relu"), (False, "relu"), (True, "sigmoid"), (False, "sigmoid")):
            rm, rv = torch.zeros(shape[1], dtype=dtype), torch.ones(shape[1], dtype=dtype)
            y = PF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, activation=act)
            assert backends.last_dispatch().backend == "cpu"
            r = getattr(torch, act)(F.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(),
                                                 training))
            gy = torch.autograd.grad(y, (x, w, b), g)
            gr = torch.autograd.grad(r, (x, w, b), g.double())
            for a, e in [(y, r)] + list(zip(gy, gr)):
                err = ((a.double() - e).norm() / e.norm()).item()
                assert err < 1e-4, (shape, dtype, training, act, err)
print("ok")
"""


def test_cpu_streaming_stores_path():
    """Outputs above PYFASTDL_STREAM_BYTES take non-temporal stores (with a plain-store head where a
    row is not vector-aligned); force that path on small shapes in a fresh process."""
    import subprocess
    import sys
    env = {**os.environ, "PYFASTDL_STREAM_BYTES": "0"}
    r = subprocess.run([sys.executable, "-c", _STREAM_CHECK], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
