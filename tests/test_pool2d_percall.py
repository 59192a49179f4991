"""The pooling per-call path: pyfastdl::max_pool2d / avg_pool2d (C++ autograd nodes,
csrc/cpu/pool2d_autograd.cpp) through their direct entries (csrc/cpu/percall.cpp), against the full
path (the Python autograd Functions over the same kernels) and torch: values, layouts, gradients,
double backward, what the entries leave to the full path, opcheck. Runs strict."""
import pytest
import torch
import torch.nn.functional as F

import pyfastdl
import pyfastdl.functional as PF
from pyfastdl import backends

LAYOUTS = ["NCHW", "channels_last"]


def _x(shape, layout="NCHW", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def _fast(fn, op, x, *args, **kw):
    """fn with no backend chosen, after a first call has picked the cpu kernels: the direct entry."""
    with torch.no_grad():
        fn(x.detach(), *args, **kw)
    assert backends.picked(op, x.device, x.dtype) is not None
    return fn(x, *args, **kw)


# (shape, args, kwargs) in the forms the entries take: ints, pairs as tuples or lists, stride None
MAX_FORMS = [
    ((2, 3, 28, 28), (2,), {}),
    ((2, 3, 17, 41), (3, 2, 1), dict(ceil_mode=True)),
    ((1, 2, 16, 40), ((3, 2), [2, 2], (1, 0)), dict(dilation=(2, 3), ceil_mode=True)),
    ((2, 17, 5, 7), ([2, 2], None, 1), {}),
    ((1, 1, 1, 1), (1,), {}),
]
AVG_FORMS = [
    ((2, 3, 28, 28), (2,), {}),
    ((2, 3, 17, 41), (3, 2, 1), dict(ceil_mode=True, count_include_pad=False)),
    ((1, 3, 23, 45), ((2, 3), (1, 2), [1, 1]), dict(divisor_override=5)),
    ((2, 17, 5, 7), (2, None, 1), dict(ceil_mode=True, count_include_pad=False, divisor_override=-3)),
]


CASES = ([("max", *f) for f in MAX_FORMS] + [("avg", *f) for f in AVG_FORMS])
KINDS = {  # kind -> (ours, torch's, its C++ node, the full path's Function)
    "max": (PF.max_pool2d, F.max_pool2d, "pyfastdl::MaxPool2dBackward", "MaxPool2dFunction"),
    "avg": (PF.avg_pool2d, F.avg_pool2d, "pyfastdl::AvgPool2dBackward", "AvgPool2dFunction"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_percall_matches_full_path_and_torch(case, layout):
    kind, shape, args, kw = case
    fn, tfn, node, function = KINDS[kind]
    x = _x(shape, layout).requires_grad_()
    y = _fast(fn, fn.__name__, x, *args, **kw)
    assert y.grad_fn.name() == node
    xf = x.detach().clone().requires_grad_()
    with backends.use("cpu"):  # the full path: the Python Function over the same kernels
        yf = fn(xf, *args, **kw)
    assert function in type(yf.grad_fn).__name__
    xt = x.detach().clone().requires_grad_()
    yt = tfn(xt, *args, **kw)
    assert torch.equal(y, yf) and y.stride() == yt.stride()
    # a max is exact; an average is torch's sum in torch's order (bit for bit here, tolerance kept)
    torch.testing.assert_close(y, yt, rtol=0 if kind == "max" else 2e-6, atol=0 if kind == "max" else 1e-7)
    go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    for t in (y, yf, yt):
        t.backward(go)
    assert torch.equal(x.grad, xf.grad) and x.grad.stride() == xt.grad.stride()
    torch.testing.assert_close(x.grad, xt.grad, rtol=0 if kind == "max" else 2e-6, atol=0 if kind == "max" else 1e-7)


def test_no_grad_inference_and_not_taken():
    x = _x((2, 3, 9, 11))
    # nothing to differentiate, no_grad, inference_mode: no node, torch's values
    assert _fast(PF.max_pool2d, "max_pool2d", x, 3, 2, 1).grad_fn is None
    xr = x.clone().requires_grad_()
    with torch.no_grad():
        assert PF.max_pool2d(xr, 3, 2, 1).grad_fn is None
        assert PF.avg_pool2d(xr, 3, 2, 1).grad_fn is None
    with torch.inference_mode():
        yi = PF.max_pool2d(xr, 3, 2, 1)
        ai = PF.avg_pool2d(xr, 3, 2, 1, count_include_pad=False)
    assert torch.equal(yi, F.max_pool2d(x, 3, 2, 1))
    torch.testing.assert_close(ai, F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))
    # what the entries do not take runs the full path, with the same results: unbatched input,
    # return_indices, a 1-tuple, a torch.Size, an empty stride
    cases = [
        (PF.max_pool2d, F.max_pool2d, (xr[0], 2), {}, "MaxPool2dFunction"),
        (PF.max_pool2d, F.max_pool2d, (xr, (2,)), {}, "MaxPool2dFunction"),
        (PF.max_pool2d, F.max_pool2d, (xr, torch.Size([2, 2])), {}, "MaxPool2dFunction"),
        (PF.avg_pool2d, F.avg_pool2d, (xr, 2, ()), {}, "AvgPool2dFunction"),
        (PF.avg_pool2d, F.avg_pool2d, (xr[0], 3, 2, 1), {}, "AvgPool2dFunction"),
    ]
    for fn, tfn, args, kw, name in cases:
        y = fn(*args, **kw)
        g = y.grad_fn.next_functions[0][0] if y.dim() == 3 else y.grad_fn  # unbatched: squeeze(0) last
        assert name in type(g).__name__, args[1:]
        torch.testing.assert_close(y, tfn(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args), **kw))
    y, idx = PF.max_pool2d(xr, 3, 2, 1, return_indices=True)
    assert "MaxPool2dFunction" in type(y.grad_fn).__name__
    assert torch.equal(idx, F.max_pool2d(x, 3, 2, 1, return_indices=True)[1])


def test_bad_input_through_the_entries():
    x = _x((1, 2, 5, 5))
    _fast(PF.max_pool2d, "max_pool2d", x, 2)
    _fast(PF.avg_pool2d, "avg_pool2d", x, 2)
    for fn, args, kw, needle in [
        (PF.max_pool2d, (x, 0), {}, "kernel_size"),
        (PF.max_pool2d, (x, 2, 0), {}, "stride"),
        (PF.max_pool2d, (x, 2, 2, 2), {}, "padding"),
        (PF.max_pool2d, (x, 2), dict(dilation=0), "dilation"),
        (PF.max_pool2d, (x, 6), {}, "output size is too small"),
        (PF.max_pool2d, (torch.randn(2, 0, 5, 5), 2), {}, "input"),
        (PF.avg_pool2d, (x, 2), dict(divisor_override=0), "divisor_override"),
        (PF.avg_pool2d, (x, 3, 1, 2), {}, "padding"),
    ]:
        with pytest.raises((RuntimeError, TypeError, ValueError)) as e:
            fn(*args, **kw)
        assert needle in str(e.value), (args[1:], kw)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_gradgradcheck_through_the_nodes(layout):
    x = _x((2, 3, 7, 9), layout, torch.float64).requires_grad_()
    for fn, op, args in [(PF.max_pool2d, "max_pool2d", (3, 2, 1, 1, True)), (PF.max_pool2d, "max_pool2d", (2, 1, 0, 2)),
                         (PF.avg_pool2d, "avg_pool2d", (3, 2, 1, True, False)),
                         (PF.avg_pool2d, "avg_pool2d", (2, 1, 1, False, True, 3))]:
        y = _fast(fn, op, x, *args)
        assert y.grad_fn.name().startswith("pyfastdl::")
        assert torch.autograd.gradcheck(lambda t: fn(t, *args), (x,))
        assert torch.autograd.gradgradcheck(lambda t: fn(t, *args), (x,))


def test_double_backward_through_the_nodes_matches_torch():
    x = _x((2, 3, 8, 8), dtype=torch.float64).requires_grad_()
    for fn, tfn in ((PF.max_pool2d, F.max_pool2d), (PF.avg_pool2d, F.avg_pool2d)):
        y = _fast(fn, fn.__name__, x, 2)
        assert y.grad_fn.name().startswith("pyfastdl::")
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        assert g.requires_grad
        (gg,) = torch.autograd.grad(g.sum(), x)
        yt = tfn(x, 2)
        (gt,) = torch.autograd.grad(yt.square().sum(), x, create_graph=True)
        (ggt,) = torch.autograd.grad(gt.sum(), x)
        torch.testing.assert_close(g, gt)
        torch.testing.assert_close(gg, ggt)


def test_modules_take_the_per_call_path():
    x = _x((4, 6, 12, 12)).requires_grad_()
    for m, name in ((pyfastdl.nn.MaxPool2d(2), "MaxPool2dBackward"), (pyfastdl.nn.AvgPool2d(3, 1, 1), "AvgPool2dBackward")):
        m(x.detach())  # the first call picks
        y = m(x)
        assert y.grad_fn.name() == "pyfastdl::" + name


def test_percall_ops_opcheck():
    ops = torch.ops.pyfastdl
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    for layout in LAYOUTS:
        x = _x((2, 3, 9, 11), layout)
        torch.library.opcheck(ops.max_pool2d, (x, [3, 3], [2, 2], [1, 1], [1, 1], True), test_utils=utils)
        torch.library.opcheck(ops.avg_pool2d, (x, [3, 3], [2, 2], [1, 1], True, False, None), test_utils=utils)
        torch.library.opcheck(ops.avg_pool2d, (x, [2, 2], [1, 1], [0, 0], False, True, 3), test_utils=utils)


def test_saved_input_modified_in_place_is_detected():
    x = _x((1, 2, 6, 6)).requires_grad_()
    for fn in (PF.max_pool2d, PF.avg_pool2d):
        h = x * 1
        y = _fast(fn, fn.__name__, h, 2)
        assert y.grad_fn.name().startswith("pyfastdl::")
        h.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
