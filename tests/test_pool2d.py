"""2-D pooling (family pool2d): max_pool2d and avg_pool2d forward and backward against torch and the
float64 reference (pyfastdl/reference/pooling.py), both layouts, odd sizes, ceil_mode windows that
start in padding, dilation, NaN/inf, ties, unbatched and empty input, bad input, gradcheck and
gradgradcheck, opcheck, the drop-in modules and convert(). Runs strict: a passing test proves the
pyfastdl CPU kernel ran. The CUDA C++ kernels' tests (test_cuda_*, marked cuda) mirror them on a GPU."""
import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel

import pyfastdl
import pyfastdl.functional as PF
from pyfastdl import backends
from pyfastdl.reference.pooling import avg_pool2d_like_torch, max_pool2d_like_torch, pool2d

DTYPES = [torch.float32, torch.float64]
LAYOUTS = ["NCHW", "channels_last"]

# (shape, kernel_size, stride, padding, dilation, ceil_mode)
MAX_CASES = [
    ((2, 3, 28, 28), 2, 2, 0, 1, False),            # LeNet's pool
    ((3, 4, 10, 10), 2, 2, 0, 1, False),            # LeNet's second pool (W_out 5 < one vector)
    ((2, 3, 17, 41), 3, 2, 1, 1, False),            # ResNet's stem pool, odd sizes
    ((2, 3, 17, 41), 3, 2, 1, 1, True),             # ceil_mode: the last window starts in the padding
    ((1, 2, 6, 6), 3, 2, 1, 1, True),
    ((2, 2, 9, 37), 3, 1, 1, 1, False),             # stride 1 (NiN / GoogLeNet)
    ((1, 3, 23, 45), (2, 3), (1, 2), (1, 1), 1, False),
    ((2, 2, 19, 50), 3, 2, 1, 2, False),            # dilation
    ((1, 2, 16, 40), (3, 2), (2, 2), (1, 0), (2, 3), True),
    ((2, 3, 13, 29), 3, 3, 0, 1, True),             # stride 3: the scalar path
    ((1, 1, 1, 1), 1, 1, 0, 1, False),              # per-call size
    ((2, 17, 5, 7), 2, 1, 1, 1, False),             # channels not a multiple of the vector
    ((1, 5, 3, 127), 3, 2, 1, 1, True),
]
# (shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_CASES = [
    ((2, 3, 28, 28), 2, 2, 0, False, True, None),
    ((3, 4, 10, 10), 2, 2, 0, False, True, None),
    ((2, 3, 17, 41), 3, 2, 1, False, True, None),
    ((2, 3, 17, 41), 3, 2, 1, True, False, None),
    ((1, 2, 6, 6), 3, 2, 1, True, True, None),
    ((2, 2, 9, 37), 3, 1, 1, False, False, None),
    ((1, 3, 23, 45), (2, 3), (1, 2), (1, 1), False, True, 5),
    ((2, 3, 13, 29), 3, 3, 1, True, True, None),
    ((1, 1, 1, 1), 1, 1, 0, False, True, None),
    ((2, 17, 5, 7), 2, 1, 1, True, False, -3),
    ((1, 5, 3, 127), 3, 2, 1, True, True, None),
]


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _input(shape, dtype, layout, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, shape, generator=g).to(dtype) if ties else torch.randn(shape, generator=g, dtype=dtype)
    return x.contiguous(memory_format=_fmt(layout))


def _grad_out(y, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(y.shape, generator=g, dtype=y.dtype).contiguous(memory_format=_fmt(
        "channels_last" if y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last)
        and not y.is_contiguous() else "NCHW"))


def _assert_ran_cpu(op):
    d = backends.last_dispatch()
    assert d.op == op and d.backend == "cpu" and d.fallback is None, d


# ---- values, indices and gradients ---------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", MAX_CASES, ids=[str(i) for i in range(len(MAX_CASES))])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_max_pool2d_against_torch_and_reference(case, dtype, layout, ties):
    shape, k, s, p, d, ceil = case
    x = _input(shape, dtype, layout, ties=ties).requires_grad_()
    xt = x.detach().clone().requires_grad_()
    y, idx = PF.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    _assert_ran_cpu("max_pool2d")
    yt, idxt = F.max_pool2d(xt, k, s, p, d, ceil, return_indices=True)
    assert y.shape == yt.shape and y.dtype == dtype and idx.dtype == torch.int64
    assert y.is_contiguous(memory_format=_fmt(layout)) == yt.is_contiguous(memory_format=_fmt(layout))
    assert torch.equal(y, yt)  # a max is exact
    assert torch.equal(idx, idxt)  # torch's index and tie rules
    go = _grad_out(y)
    (gi,) = torch.autograd.grad(y, x, go)
    (git,) = torch.autograd.grad(yt, xt, go)
    assert gi.is_contiguous(memory_format=_fmt(layout))
    torch.testing.assert_close(gi, git, rtol=0, atol=0)  # the same additions in the same order
    # the float64 reference (values, indices, gradient)
    x64 = x.detach().double().requires_grad_()
    yr, idxr = max_pool2d_like_torch(x64, _pair(k), _pair(s), _pair(p), _pair(d), ceil, True)
    assert torch.equal(idx, idxr)
    assert_rel(y, yr, dtype)
    (gr,) = torch.autograd.grad(yr, x64, go.double())
    assert_rel(gi, gr, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", AVG_CASES, ids=[str(i) for i in range(len(AVG_CASES))])
def test_avg_pool2d_against_torch_and_reference(case, dtype, layout):
    shape, k, s, p, ceil, cip, div = case
    x = _input(shape, dtype, layout).requires_grad_()
    xt = x.detach().clone().requires_grad_()
    y = PF.avg_pool2d(x, k, s, p, ceil, cip, div)
    _assert_ran_cpu("avg_pool2d")
    yt = F.avg_pool2d(xt, k, s, p, ceil, cip, div)
    assert y.shape == yt.shape
    assert y.is_contiguous(memory_format=_fmt(layout)) == yt.is_contiguous(memory_format=_fmt(layout))
    torch.testing.assert_close(y, yt, rtol=2e-6 if dtype == torch.float32 else 1e-14, atol=1e-7)
    go = _grad_out(y)
    (gi,) = torch.autograd.grad(y, x, go)
    (git,) = torch.autograd.grad(yt, xt, go)
    torch.testing.assert_close(gi, git, rtol=2e-6 if dtype == torch.float32 else 1e-14, atol=1e-7)
    x64 = x.detach().double().requires_grad_()
    yr = avg_pool2d_like_torch(x64, _pair(k), _pair(s), _pair(p), ceil, cip, div)
    assert_rel(y, yr, dtype)
    (gr,) = torch.autograd.grad(yr, x64, go.double())
    assert_rel(gi, gr, dtype)


def test_notes_pool2d_matches_the_kernel():
    X = torch.arange(9.0).reshape(3, 3)
    torch.testing.assert_close(PF.max_pool2d(X[None, None], 2, 1)[0, 0], pool2d(X, (2, 2), "max"))
    torch.testing.assert_close(PF.avg_pool2d(X[None, None], 2, 1)[0, 0], pool2d(X, (2, 2), "avg"))


# ---- non-finite values, at vector lane 0, another lane, the tail and a padded position ---------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("pos", [(0, 0), (3, 5), (12, 33), (16, 40), (0, 40)], ids=lambda p: f"{p[0]}x{p[1]}")
def test_non_finite(layout, value, pos):
    x = _input((2, 3, 17, 41), torch.float32, layout)
    x[:, 1, pos[0], pos[1]] = value
    x[1, 2, pos[0], :] = value  # a whole row too
    for ceil in (False, True):
        y, idx = PF.max_pool2d(x, 3, 2, 1, 1, ceil, return_indices=True)
        yt, idxt = F.max_pool2d(x, 3, 2, 1, 1, ceil, return_indices=True)
        torch.testing.assert_close(y, yt, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(idx, idxt)
        y2 = PF.max_pool2d(x, 2, 2, 0, 1, ceil)
        torch.testing.assert_close(y2, F.max_pool2d(x, 2, 2, 0, 1, ceil), equal_nan=True, rtol=0, atol=0)
        a = PF.avg_pool2d(x, 3, 2, 1, ceil, False)
        torch.testing.assert_close(a, F.avg_pool2d(x, 3, 2, 1, ceil, False), equal_nan=True, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_all_minus_inf_and_several_nans_pick_torchs_index(layout):
    x = torch.full((1, 2, 8, 20), float("-inf")).contiguous(memory_format=_fmt(layout))
    x[0, 1, 2:4, 4:8] = float("nan")  # several NaN in one window: the last one wins
    x[0, 1, 0, 16] = 5.0
    x[0, 1, 1, 17] = 5.0  # a tie: the first in window order
    for args in [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 2)]:
        y, idx = PF.max_pool2d(x, *args, return_indices=True)
        yt, idxt = F.max_pool2d(x, *args, return_indices=True)
        torch.testing.assert_close(y, yt, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(idx, idxt), args


# ---- unbatched, empty batch, other strides ------------------------------------------------------------

def test_unbatched_and_empty_batch():
    x = torch.randn(3, 11, 12, requires_grad=True)
    y, idx = PF.max_pool2d(x, 3, 2, 1, return_indices=True)
    yt, idxt = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert y.shape == yt.shape == (3, 6, 6) and torch.equal(idx, idxt) and torch.equal(y, yt)
    y.sum().backward()
    torch.testing.assert_close(PF.avg_pool2d(x, 2), F.avg_pool2d(x, 2))
    e = torch.randn(0, 3, 8, 8, requires_grad=True)
    for fn, ft in [(PF.max_pool2d, F.max_pool2d), (PF.avg_pool2d, F.avg_pool2d)]:
        y = fn(e, 2)
        assert y.shape == ft(e, 2).shape == (0, 3, 4, 4)
        y.sum().backward()
        assert e.grad.shape == e.shape


def test_non_contiguous_input():
    x = torch.randn(2, 8, 15, 30)[:, ::2, :, 1::2]
    torch.testing.assert_close(PF.max_pool2d(x, 2), F.max_pool2d(x, 2))
    torch.testing.assert_close(PF.avg_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 3, 2, 1))


def test_threads_do_not_change_results():
    x = _input((4, 8, 33, 47), torch.float32, "NCHW").requires_grad_()
    out = []
    prev = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            y, idx = PF.max_pool2d(x, 3, 2, 1, return_indices=True)
            a = PF.avg_pool2d(x, 3, 2, 1)
            (g,) = torch.autograd.grad((y * 2).sum() + a.square().sum(), x)
            out.append((y, idx, a, g))
    finally:
        torch.set_num_threads(prev)
    for u, v in zip(*out):
        assert torch.equal(u, v)


# ---- bad input: clear errors naming the argument ----------------------------------------------------

BAD = [
    (lambda: PF.max_pool2d(torch.randn(1, 2, 5, 5), (1, 2, 3)), "kernel_size"),
    (lambda: PF.max_pool2d(torch.randn(1, 2, 5, 5), 0), "kernel_size"),
    (lambda: PF.max_pool2d(torch.randn(1, 2, 5, 5), 2, 0), "stride"),
    (lambda: PF.max_pool2d(torch.randn(1, 2, 5, 5), 2, 2, 2), "padding"),
    (lambda: PF.max_pool2d(torch.randn(1, 2, 5, 5), 3, 1, -1), "padding"),
    (lambda: PF.max_pool2d(torch.randn(1, 2, 5, 5), 2, dilation=0), "dilation"),
    (lambda: PF.max_pool2d(torch.randn(1, 2, 5, 5), 3, 1, 2, dilation=3), "padding"),
    (lambda: PF.max_pool2d(torch.randn(1, 2, 5, 5), 6), "output size is too small"),
    (lambda: PF.max_pool2d(torch.randn(2, 0, 5, 5), 2), "input"),
    (lambda: PF.max_pool2d(torch.randn(5, 5), 2), "input"),
    (lambda: PF.max_pool2d(torch.randn(1, 2, 5, 5), True), "kernel_size"),
    (lambda: PF.avg_pool2d(torch.randn(1, 2, 5, 5), 2, divisor_override=0), "divisor_override"),
    (lambda: PF.avg_pool2d(torch.randn(1, 2, 5, 5), 3, 1, 2), "padding"),
    (lambda: PF.avg_pool2d(torch.randn(1, 2, 5, 5), 2, (1, 1, 1)), "stride"),
    (lambda: PF.avg_pool2d("x", 2), "input"),
]


@pytest.mark.parametrize("fn,needle", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input(fn, needle):
    with pytest.raises((RuntimeError, TypeError, ValueError)) as e:
        fn()
    assert needle in str(e.value)


def test_bad_input_to_the_ops_writes_nothing():
    ops = torch.ops.pyfastdl
    x = torch.randn(1, 2, 6, 6)
    y, idx = ops.max_pool2d_fwd(x, [2, 2], [2, 2], [0, 0], [1, 1], False, True)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.max_pool2d_bwd(torch.randn(1, 2, 4, 3), x, idx, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="indices"):
        ops.max_pool2d_bwd(torch.randn_like(y), x, idx.int(), [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="grad_out"):
        ops.avg_pool2d_bwd(torch.randn(1, 2, 3, 3).double(), x, [2, 2], [2, 2], [0, 0], False, True, None)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.avg_pool2d_fwd(x.half(), [2, 2], [2, 2], [0, 0], False, True, None)


# ---- backends: what runs where --------------------------------------------------------------------------

def test_other_dtypes_fall_back_visibly_and_strict_refuses():
    x = torch.randn(1, 2, 6, 6, dtype=torch.bfloat16)
    with pytest.raises(backends.BackendError, match="bfloat16"):
        PF.max_pool2d(x, 2)
    with backends.set_strict(False):
        torch.testing.assert_close(PF.max_pool2d(x, 2), F.max_pool2d(x, 2))
        d = backends.last_dispatch()
        assert d.backend == "torch" and "bfloat16" in d.fallback


TRITON_CASES = [  # TINY: the interpreter runs them on the CPU
    ((2, 3, 9, 11), 3, 2, 1, 1, True),
    ((1, 2, 6, 7), 2, 2, 0, 1, False),
    ((1, 2, 7, 9), (2, 3), (1, 2), (1, 1), (2, 1), False),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=[str(i) for i in range(len(TRITON_CASES))])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.triton
@pytest.mark.skipif(not __import__("helpers").TRITON_RUNS, reason="needs triton and a GPU or TRITON_INTERPRET=1")
def test_triton_against_torch(case, dtype, layout, ties):
    device = __import__("helpers").TRITON_DEVICE
    shape, k, s, p, d, ceil = case
    x = _input(shape, dtype, layout, ties=ties).to(device)
    x[0, 0, 1, 1] = float("nan")
    x = x.requires_grad_()
    with backends.use("triton"):
        y, idx = PF.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
        assert backends.last_dispatch().backend == "triton"
        a = PF.avg_pool2d(x, k, s, p, ceil, bool(ties), 5 if ties else None)
        assert backends.last_dispatch().backend == "triton"
        go, goa = _grad_out(y).to(device), _grad_out(a, 2).to(device)
        gi = torch.autograd.grad(y, x, go)[0]
        gia = torch.autograd.grad(a, x, goa)[0]
    yt, idxt = F.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    at = F.avg_pool2d(x, k, s, p, ceil, bool(ties), 5 if ties else None)
    assert y.is_contiguous(memory_format=_fmt(layout)) and gi.is_contiguous(memory_format=_fmt(layout))
    torch.testing.assert_close(y, yt, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(idx, idxt)
    tol = dict(rtol=2e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(gi, torch.autograd.grad(yt, x, go)[0], **tol)
    torch.testing.assert_close(a, at, equal_nan=True, **tol)
    torch.testing.assert_close(gia, torch.autograd.grad(at, x, goa)[0], equal_nan=True, **tol)


@pytest.mark.triton
@pytest.mark.skipif(not __import__("helpers").TRITON_RUNS, reason="needs triton and a GPU or TRITON_INTERPRET=1")
def test_triton_opcheck_and_schemas():
    from helpers import TRITON_DEVICE, assert_schema_matches_cpp
    with backends.use("triton"):
        ops = backends.ops("triton", "pool2d")
    for name in ("max_pool2d_fwd", "max_pool2d_bwd", "avg_pool2d_fwd", "avg_pool2d_bwd"):
        assert_schema_matches_cpp(ops, name)
    utils = ("test_schema", "test_faketensor")
    x = torch.randn(1, 2, 5, 6, device=TRITON_DEVICE)
    y, idx = ops.max_pool2d_fwd(x, [3, 3], [2, 2], [1, 1], [1, 1], True, True)
    torch.library.opcheck(ops.max_pool2d_fwd, (x, [3, 3], [2, 2], [1, 1], [1, 1], True, True), test_utils=utils)
    torch.library.opcheck(ops.max_pool2d_bwd, (torch.randn_like(y), x, idx, [3, 3], [2, 2], [1, 1], [1, 1], True),
                          test_utils=utils)
    torch.library.opcheck(ops.avg_pool2d_fwd, (x, [2, 2], [1, 1], [1, 1], False, True, None), test_utils=utils)
    a = ops.avg_pool2d_fwd(x, [2, 2], [1, 1], [1, 1], False, True, None)
    torch.library.opcheck(ops.avg_pool2d_bwd, (torch.randn_like(a), x, [2, 2], [1, 1], [1, 1], False, True, None),
                          test_utils=utils)


def test_reference_backend():
    x = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    with backends.use("reference"):
        y, idx = PF.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
        assert backends.last_dispatch().backend == "reference"
        a = PF.avg_pool2d(x, 3, 2, 1, True, False)
    yt, idxt = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert torch.equal(y, yt) and torch.equal(idx, idxt)
    torch.testing.assert_close(a, F.avg_pool2d(x, 3, 2, 1, True, False))


# ---- gradcheck, double backward, opcheck -------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_and_gradgradcheck(layout):
    x = _input((2, 3, 7, 9), torch.float64, layout).requires_grad_()
    for f in (lambda t: PF.max_pool2d(t, 3, 2, 1, 1, True), lambda t: PF.max_pool2d(t, 2, 1, 0, 2),
              lambda t: PF.avg_pool2d(t, 3, 2, 1, True, False), lambda t: PF.avg_pool2d(t, 2, 1, 1, False, True, 3)):
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))


def test_double_backward_runs_our_kernels():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    y = PF.avg_pool2d(x, 2)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert g.requires_grad
    (gg,) = torch.autograd.grad(g.sum(), x)
    yt = F.avg_pool2d(x, 2)
    (gt,) = torch.autograd.grad(yt.square().sum(), x, create_graph=True)
    (ggt,) = torch.autograd.grad(gt.sum(), x)
    torch.testing.assert_close(gg, ggt)


def test_opcheck():
    ops = torch.ops.pyfastdl
    for layout in LAYOUTS:
        x = _input((2, 3, 9, 11), torch.float32, layout)
        y, idx = ops.max_pool2d_fwd(x, [3, 3], [2, 2], [1, 1], [1, 1], True, True)
        torch.library.opcheck(ops.max_pool2d_fwd, (x, [3, 3], [2, 2], [1, 1], [1, 1], True, True))
        torch.library.opcheck(ops.max_pool2d_fwd, (x, [2, 2], [2, 2], [0, 0], [1, 1], False, False))
        torch.library.opcheck(ops.max_pool2d_bwd, (torch.randn_like(y), x, idx, [3, 3], [2, 2], [1, 1], [1, 1], True))
        a = ops.avg_pool2d_fwd(x, [3, 3], [2, 2], [1, 1], True, False, None)
        torch.library.opcheck(ops.avg_pool2d_fwd, (x, [3, 3], [2, 2], [1, 1], True, False, None))
        torch.library.opcheck(ops.avg_pool2d_fwd, (x, [2, 2], [1, 1], [0, 0], False, True, 3))
        torch.library.opcheck(ops.avg_pool2d_bwd, (torch.randn_like(a), x, [3, 3], [2, 2], [1, 1], True, False, None))


# ---- modules and convert ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda m: m.MaxPool2d(3, 2, 1),
    lambda m: m.MaxPool2d((2, 3), stride=(1, 2), padding=(1, 1), dilation=(1, 1), ceil_mode=True),
    lambda m: m.MaxPool2d(2, return_indices=True),
    lambda m: m.AvgPool2d(2),
    lambda m: m.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False, divisor_override=4),
], ids=["max", "max-ceil", "max-indices", "avg", "avg-args"])
def test_modules_are_drop_ins(make):
    ours, theirs = make(pyfastdl.nn), make(torch.nn)
    assert repr(ours) == repr(theirs) and isinstance(ours, type(theirs))
    x = torch.randn(2, 3, 13, 14)
    a, b = ours(x), theirs(x)
    _assert_ran_cpu(type(ours).__name__.lower().replace("pool2d", "_pool2d"))
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(u, v)


def test_convert_swaps_pooling():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.AvgPool2d(3, 2, 1), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    ref = copy.deepcopy(net)
    _, summary = pyfastdl.convert(net, summary=True)
    assert type(net[2]) is pyfastdl.nn.MaxPool2d and type(net[3]) is pyfastdl.nn.AvgPool2d
    assert "torch.nn.MaxPool2d -> pyfastdl.nn.MaxPool2d" in summary.counts()
    x = torch.randn(5, 1, 16, 16)
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-6)


# ---- the CUDA C++ kernels (csrc/cuda/pool2d.cu) -----------------------------------------------------------
# Skipped without a GPU (helpers.MARKS["cuda"]); `make gpu-check` runs them (-m cuda). References: torch's
# CUDA ops (values and indices equal; gradients within the table's "step" bound: the same additions, in
# torch's order, as far as torch's own kernel keeps it), torch's CPU ops for float32/float64 (our CPU
# and CUDA kernels add in the same order: bit for bit), and the float64 reference (TOL[dtype]).

from helpers import MARKS, STEP_TOL, params  # noqa: E402

CUDA_DTYPES = {"cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
CUDA = params(CUDA_DTYPES, backends=("cuda",))  # (backend, dtype), with the cuda marks


def _cuda_marks(f):
    for m in MARKS["cuda"]:
        f = m(f)
    return f


def _assert_ran_cuda(op):
    d = backends.last_dispatch()
    assert d.op == op and d.backend == "cuda" and d.fallback is None, d


def _torch_tol(dtype):
    # float32/float64: the same operations in the same order as torch's kernels (2 ulp of slack for
    # an FMA contraction in torch's CUDA build); float16/bfloat16: the table's step bound
    if dtype == torch.float32:
        return dict(rtol=2e-6, atol=1e-7)
    if dtype == torch.float64:
        return dict(rtol=1e-14, atol=1e-15)
    return STEP_TOL[dtype]


def _exact_on_cpu(dtype):
    return dtype in (torch.float32, torch.float64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,dtype", CUDA)
@pytest.mark.parametrize("case", MAX_CASES, ids=[str(i) for i in range(len(MAX_CASES))])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_cuda_max_pool2d_against_torch(case, backend, dtype, layout, ties):
    shape, k, s, p, d, ceil = case
    xc = _input(shape, torch.float64, layout, ties=ties).to(dtype)  # ties: small integers, exact in every dtype
    x = xc.to("cuda").requires_grad_()
    xt = x.detach().clone().requires_grad_()
    y, idx = PF.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
    _assert_ran_cuda("max_pool2d")
    yt, idxt = F.max_pool2d(xt, k, s, p, d, ceil, return_indices=True)
    assert y.shape == yt.shape and y.dtype == dtype and idx.dtype == torch.int64 and y.device == x.device
    assert y.is_contiguous(memory_format=_fmt(layout)) == yt.is_contiguous(memory_format=_fmt(layout))
    assert idx.is_contiguous(memory_format=_fmt(layout)) == y.is_contiguous(memory_format=_fmt(layout))
    assert torch.equal(y, yt)  # a max is exact in every dtype
    assert torch.equal(idx, idxt)  # torch's index and tie rules
    # indices also without a gradient, and the value-only path
    y2, idx2 = PF.max_pool2d(x.detach(), k, s, p, d, ceil, return_indices=True)
    assert torch.equal(y2, y) and torch.equal(idx2, idx)
    assert torch.equal(PF.max_pool2d(x.detach(), k, s, p, d, ceil), y)
    go = _grad_out(y.detach().cpu().double()).to(dtype).to("cuda")
    (gi,) = torch.autograd.grad(y, x, go)
    (git,) = torch.autograd.grad(yt, xt, go)
    assert gi.is_contiguous(memory_format=_fmt(layout)) and gi.dtype == dtype
    torch.testing.assert_close(gi, git, **_torch_tol(dtype))
    if _exact_on_cpu(dtype):  # torch's CPU order, which our CPU and CUDA kernels share
        xcpu = xc.clone().requires_grad_()
        ycpu = F.max_pool2d(xcpu, k, s, p, d, ceil)
        (gcpu,) = torch.autograd.grad(ycpu, xcpu, go.cpu())
        assert torch.equal(gi.cpu(), gcpu)
    x64 = xc.double().requires_grad_()
    yr, idxr = max_pool2d_like_torch(x64, _pair(k), _pair(s), _pair(p), _pair(d), ceil, True)
    assert torch.equal(idx.cpu(), idxr)
    assert_rel(y, yr, dtype)
    (gr,) = torch.autograd.grad(yr, x64, go.cpu().double())
    assert_rel(gi, gr, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,dtype", CUDA)
@pytest.mark.parametrize("case", AVG_CASES, ids=[str(i) for i in range(len(AVG_CASES))])
def test_cuda_avg_pool2d_against_torch(case, backend, dtype, layout):
    shape, k, s, p, ceil, cip, div = case
    xc = _input(shape, torch.float64, layout).to(dtype)
    x = xc.to("cuda").requires_grad_()
    y = PF.avg_pool2d(x, k, s, p, ceil, cip, div)
    _assert_ran_cuda("avg_pool2d")
    yt = F.avg_pool2d(x.detach(), k, s, p, ceil, cip, div)
    assert y.shape == yt.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=_fmt(layout)) == yt.is_contiguous(memory_format=_fmt(layout))
    torch.testing.assert_close(y, yt, **_torch_tol(dtype))
    go = _grad_out(y.detach().cpu().double()).to(dtype).to("cuda")
    (gi,) = torch.autograd.grad(y, x, go)
    # torch's gradient through its NCHW CUDA kernel: its channels_last one ignored the padding
    # (pytorch/pytorch#188344, silently wrong gradients) in the releases before the fix
    xt = x.detach().contiguous().requires_grad_()
    (git,) = torch.autograd.grad(F.avg_pool2d(xt, k, s, p, ceil, cip, div), xt, go.contiguous())
    assert gi.is_contiguous(memory_format=_fmt(layout)) and gi.dtype == dtype
    torch.testing.assert_close(gi, git, **_torch_tol(dtype))
    if _exact_on_cpu(dtype):  # the CPU kernel's results (torch's CPU order), bit for bit
        xcpu = xc.clone().requires_grad_()
        ycpu = PF.avg_pool2d(xcpu, k, s, p, ceil, cip, div)
        (gcpu,) = torch.autograd.grad(ycpu, xcpu, go.cpu())
        assert torch.equal(y.detach().cpu(), ycpu.detach()) and torch.equal(gi.cpu(), gcpu)
    x64 = xc.double().requires_grad_()
    yr = avg_pool2d_like_torch(x64, _pair(k), _pair(s), _pair(p), ceil, cip, div)
    assert_rel(y, yr, dtype)
    (gr,) = torch.autograd.grad(yr, x64, go.cpu().double())
    assert_rel(gi, gr, dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend,dtype", CUDA)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_cuda_non_finite(backend, dtype, value, layout):
    x = _input((2, 3, 17, 41), torch.float32, layout).to(dtype)
    for pos in [(0, 0), (3, 5), (12, 33), (16, 40), (0, 40)]:
        x[:, 1, pos[0], pos[1]] = value
    x[1, 2, 5, :] = value  # a whole row too
    x = x.to("cuda")
    for ceil in (False, True):
        for args in [(3, 2, 1, 1), (2, 2, 0, 1), (3, 1, 1, 2)]:
            y, idx = PF.max_pool2d(x, *args, ceil, return_indices=True)
            _assert_ran_cuda("max_pool2d")
            yt, idxt = F.max_pool2d(x, *args, ceil, return_indices=True)
            torch.testing.assert_close(y, yt, equal_nan=True, rtol=0, atol=0)
            # torch's CPU indices (the rule of the CPU kernel); torch's CUDA channels_last kernel differs
            # on a window of -inf alone (the corner one of 2x2/2 with ceil_mode): index 0
            assert torch.equal(idx.cpu(), F.max_pool2d(x.cpu().float(), *args, ceil, return_indices=True)[1])
            if layout == "NCHW":
                assert torch.equal(idx, idxt), (args, ceil)
        a = PF.avg_pool2d(x, 3, 2, 1, ceil, False)
        torch.testing.assert_close(a, F.avg_pool2d(x, 3, 2, 1, ceil, False), equal_nan=True, **_torch_tol(dtype))


@_cuda_marks
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_all_minus_inf_and_several_nans_pick_torchs_index(layout):
    x = torch.full((1, 2, 8, 20), float("-inf")).contiguous(memory_format=_fmt(layout))
    x[0, 1, 2:4, 4:8] = float("nan")  # several NaN in one window: the last one wins
    x[0, 1, 0, 16] = 5.0
    x[0, 1, 1, 17] = 5.0  # a tie: the first in window order
    x = x.cuda()
    for args in [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 1, 2)]:
        y, idx = PF.max_pool2d(x, *args, return_indices=True)
        yt, idxt = F.max_pool2d(x.cpu(), *args, return_indices=True)  # torch's CPU: the rule the CPU kernel follows
        torch.testing.assert_close(y.cpu(), yt, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(idx.cpu(), idxt), args
        if layout == "NCHW":  # torch's CUDA channels_last kernel gives index 0 for an all -inf window
            assert torch.equal(idx, F.max_pool2d(x, *args, return_indices=True)[1]), args


@_cuda_marks
def test_cuda_unbatched_empty_batch_and_non_contiguous():
    x = torch.randn(3, 11, 12, device="cuda", requires_grad=True)
    y, idx = PF.max_pool2d(x, 3, 2, 1, return_indices=True)
    yt, idxt = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert y.shape == yt.shape == (3, 6, 6) and torch.equal(idx, idxt) and torch.equal(y, yt)
    y.sum().backward()
    torch.testing.assert_close(PF.avg_pool2d(x, 2), F.avg_pool2d(x, 2))
    e = torch.randn(0, 3, 8, 8, device="cuda", requires_grad=True)
    for fn, ft in [(PF.max_pool2d, F.max_pool2d), (PF.avg_pool2d, F.avg_pool2d)]:
        y = fn(e, 2)
        _assert_ran_cuda(fn.__name__)
        assert y.shape == ft(e, 2).shape == (0, 3, 4, 4)
        y.sum().backward()
        assert e.grad.shape == e.shape
    xs = torch.randn(2, 8, 15, 30, device="cuda")[:, ::2, :, 1::2]  # other strides: copied as on the CPU
    torch.testing.assert_close(PF.max_pool2d(xs, 2), F.max_pool2d(xs, 2), rtol=0, atol=0)
    torch.testing.assert_close(PF.avg_pool2d(xs, 3, 2, 1), F.avg_pool2d(xs, 3, 2, 1))
    torch.testing.assert_close(PF.avg_pool2d(xs, 3, 2, 1), PF.avg_pool2d(xs.cpu(), 3, 2, 1).cuda(), rtol=0, atol=0)


@_cuda_marks
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_backward_is_deterministic(layout):
    # stride 1, 3x3: every input element gathers from up to 9 outputs
    x = _input((4, 33, 29, 31), torch.float32, layout).cuda().requires_grad_()
    out = []
    for _ in range(2):
        y = PF.max_pool2d(x, 3, 1, 1)
        a = PF.avg_pool2d(x, 3, 1, 1, False, False)
        out.append(torch.autograd.grad((y * 2).sum() + a.square().sum(), x)[0])
    assert torch.equal(out[0], out[1])


@_cuda_marks
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_gradcheck_and_gradgradcheck(layout):
    x = _input((2, 3, 7, 9), torch.float64, layout).cuda().requires_grad_()
    for f in (lambda t: PF.max_pool2d(t, 3, 2, 1, 1, True), lambda t: PF.max_pool2d(t, 2, 1, 0, 2),
              lambda t: PF.avg_pool2d(t, 3, 2, 1, True, False), lambda t: PF.avg_pool2d(t, 2, 1, 1, False, True, 3)):
        assert torch.autograd.gradcheck(f, (x,))
        assert torch.autograd.gradgradcheck(f, (x,))


@_cuda_marks
def test_cuda_opcheck():
    ops = torch.ops.pyfastdl
    for layout in LAYOUTS:
        for dtype in (torch.float32, torch.float16):
            x = _input((2, 3, 9, 11), torch.float32, layout).to(device="cuda", dtype=dtype)
            y, idx = ops.max_pool2d_fwd(x, [3, 3], [2, 2], [1, 1], [1, 1], True, True)
            torch.library.opcheck(ops.max_pool2d_fwd, (x, [3, 3], [2, 2], [1, 1], [1, 1], True, True))
            torch.library.opcheck(ops.max_pool2d_fwd, (x, [2, 2], [2, 2], [0, 0], [1, 1], False, False))
            torch.library.opcheck(ops.max_pool2d_bwd,
                                  (torch.randn_like(y), x, idx, [3, 3], [2, 2], [1, 1], [1, 1], True))
            a = ops.avg_pool2d_fwd(x, [3, 3], [2, 2], [1, 1], True, False, None)
            torch.library.opcheck(ops.avg_pool2d_fwd, (x, [3, 3], [2, 2], [1, 1], True, False, None))
            torch.library.opcheck(ops.avg_pool2d_fwd, (x, [2, 2], [1, 1], [0, 0], False, True, 3))
            torch.library.opcheck(ops.avg_pool2d_bwd,
                                  (torch.randn_like(a), x, [3, 3], [2, 2], [1, 1], True, False, None))


# Bad arguments to the ops themselves (the functional checks some first): the CUDA launchers run
# csrc/common/pool2d.h's checks, so each raises the CPU launcher's message, word for word.
OP_BAD = [
    lambda o, x, g, i: o.max_pool2d_fwd(x, [2, 2, 2], [2, 2], [0, 0], [1, 1], False, True),
    lambda o, x, g, i: o.max_pool2d_fwd(x, [0, 2], [2, 2], [0, 0], [1, 1], False, True),
    lambda o, x, g, i: o.max_pool2d_fwd(x, [2, 2], [2, 0], [0, 0], [1, 1], False, False),
    lambda o, x, g, i: o.max_pool2d_fwd(x, [2, 2], [2, 2], [2, 0], [1, 1], False, True),
    lambda o, x, g, i: o.max_pool2d_fwd(x, [3, 3], [1, 1], [0, -1], [1, 1], False, True),
    lambda o, x, g, i: o.max_pool2d_fwd(x, [2, 2], [2, 2], [0, 0], [0, 1], False, True),
    lambda o, x, g, i: o.max_pool2d_fwd(x, [7, 7], [1, 1], [0, 0], [1, 1], False, True),
    lambda o, x, g, i: o.max_pool2d_fwd(x[0], [2, 2], [2, 2], [0, 0], [1, 1], False, True),
    lambda o, x, g, i: o.max_pool2d_fwd(x[:, :0], [2, 2], [2, 2], [0, 0], [1, 1], False, True),
    lambda o, x, g, i: o.max_pool2d_bwd(g[..., :2], x, i, [2, 2], [2, 2], [0, 0], [1, 1], False),
    lambda o, x, g, i: o.max_pool2d_bwd(g.double(), x, i, [2, 2], [2, 2], [0, 0], [1, 1], False),
    lambda o, x, g, i: o.max_pool2d_bwd(g, x, i.int(), [2, 2], [2, 2], [0, 0], [1, 1], False),
    lambda o, x, g, i: o.max_pool2d_bwd(g, x, i[..., :2], [2, 2], [2, 2], [0, 0], [1, 1], False),
    lambda o, x, g, i: o.avg_pool2d_fwd(x, [2, 2], [2, 2], [0, 0], False, True, 0),
    lambda o, x, g, i: o.avg_pool2d_fwd(x, [3, 3], [1, 1], [2, 2], False, True, None),
    lambda o, x, g, i: o.avg_pool2d_bwd(g, x, [2, 2], [2, 2], [0, 0], False, True, 0),
    lambda o, x, g, i: o.avg_pool2d_bwd(g[:, :1], x, [2, 2], [2, 2], [0, 0], False, True, None),
]


@_cuda_marks
@pytest.mark.parametrize("bad", OP_BAD, ids=[str(i) for i in range(len(OP_BAD))])
def test_cuda_bad_input_raises_the_cpu_launchers_error(bad):
    ops = torch.ops.pyfastdl
    x = torch.randn(1, 2, 6, 6)
    y, i = ops.max_pool2d_fwd(x, [2, 2], [2, 2], [0, 0], [1, 1], False, True)
    g = torch.randn_like(y)
    with pytest.raises(RuntimeError) as cpu:
        bad(ops, x, g, i)
    with pytest.raises(RuntimeError) as cuda:
        bad(ops, x.cuda(), g.cuda(), i.cuda())
    assert str(cuda.value).splitlines()[0] == str(cpu.value).splitlines()[0]


@_cuda_marks
def test_cuda_bad_dtype_and_device():
    ops = torch.ops.pyfastdl
    x = torch.randn(1, 2, 6, 6, device="cuda")
    with pytest.raises(RuntimeError, match="dtype"):
        ops.max_pool2d_fwd(x.int(), [2, 2], [2, 2], [0, 0], [1, 1], False, True)
    y, i = ops.max_pool2d_fwd(x, [2, 2], [2, 2], [0, 0], [1, 1], False, True)
    with pytest.raises(RuntimeError, match="grad_out"):  # grad_out on another device than input
        ops.max_pool2d_bwd(torch.randn_like(y).cpu(), x, i, [2, 2], [2, 2], [0, 0], [1, 1], False)
    with pytest.raises(RuntimeError, match="indices"):
        ops.max_pool2d_bwd(torch.randn_like(y), x, i.cpu(), [2, 2], [2, 2], [0, 0], [1, 1], False)


@_cuda_marks
@pytest.mark.parametrize("op", ["max", "avg"])
def test_cuda_default_backend_and_strict(op):
    # float16 runs our CUDA kernel (no fallback, strict mode on); so does the module
    x = torch.randn(2, 3, 12, 12, device="cuda", dtype=torch.float16)
    mod = pyfastdl.nn.MaxPool2d(2) if op == "max" else pyfastdl.nn.AvgPool2d(2)
    ref = torch.nn.MaxPool2d(2) if op == "max" else torch.nn.AvgPool2d(2)
    torch.testing.assert_close(mod(x), ref(x), **_torch_tol(torch.float16))
    _assert_ran_cuda(f"{op}_pool2d")
    assert backends.ops("cuda", "pool2d") is torch.ops.pyfastdl


@_cuda_marks
@pytest.mark.slow
@pytest.mark.skipif(__import__("os").environ.get("PYFASTDL_HUGE_TESTS") != "1",
                    reason="past 2^31 elements (about 25 GiB of GPU memory): PYFASTDL_HUGE_TESTS=1")
def test_cuda_int64_index_path_past_2_31_elements():
    # one (H, W) plane of 2^31 + 2 * 46342 elements: the kernels take their int64 index path. Checked
    # on the last rows against torch on that slice (the indices shifted by the rows cut off).
    H, W = 46342, 46342
    x = torch.randn(1, 1, H, W, device="cuda", dtype=torch.float16)
    y, idx = PF.max_pool2d(x, 2, return_indices=True)
    tail = x[..., H - 6:, :]
    yt, idxt = F.max_pool2d(tail, 2, return_indices=True)
    assert torch.equal(y[..., -3:, :], yt) and torch.equal(idx[..., -3:, :], idxt + (H - 6) * W)
    del y
    g = torch.ones(1, 1, H // 2, W // 2, device="cuda", dtype=torch.float16)
    gi = torch.ops.pyfastdl.max_pool2d_bwd(g, x, idx, [2, 2], [2, 2], [0, 0], [1, 1], False)
    assert gi[..., H - 6:, :].float().sum().item() == 3 * (W // 2)  # one 1 per output of the last 3 rows
    del gi, idx
    a = torch.ops.pyfastdl.avg_pool2d_fwd(x, [3, 3], [2, 2], [1, 1], False, True, None)
    # the slice starts on an even row, so its windows 1 and 2 are the full tensor's last two
    torch.testing.assert_close(a[..., -2:, :], F.avg_pool2d(x[..., H - 6:, :], 3, 2, 1)[..., -2:, :], rtol=0, atol=0)
