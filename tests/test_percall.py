"""The per-call path of batch norm (issue 8, item 1): ``pyfastdl::batch_norm``, batch_norm_fwd with its
derivative registered in C++ under the Autograd key (csrc/cpu/batch_norm_autograd.cpp), which
``pyfastdl.functional.batch_norm`` and ``pyfastdl.nn.BatchNorm*d`` run for the cpu and cuda backends.

Proves: the C++ node (not the Python Function) is what backward runs; outputs, running statistics and
gradients equal torch's; only the gradients asked for are returned; create_graph gives gradients that
refuse a second differentiation (never silently graph-less); fp64 gradcheck; opcheck (schema,
fake tensor, autograd registration, AOT dispatch); torch.compile(fullgraph=True) equal to eager."""
import pytest
import torch
import torch.nn.functional as F

import pyfastdl
import pyfastdl.functional as PF
from pyfastdl import backends

from helpers import HAS_CUDA, TOL, rel_err

OP = torch.ops.pyfastdl.batch_norm.default
NODE = "pyfastdl::BatchNormBackward"
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])]
# (shape, channels_last): the per-call shape, BatchNorm1d's, an odd 4-D one in both layouts, 3-D
SHAPES = [((2, 1), False), ((256, 120), False), ((5, 3, 7, 11), False), ((5, 3, 7, 11), True),
          ((4, 6, 13), False)]


def _inputs(shape, channels_last, dtype, device, affine=True):
    gen = torch.Generator().manual_seed(sum(shape))
    C = shape[1]
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(device=device, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype) if affine else None
    b = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.2).to(device=device, dtype=dtype) if affine else None
    rm = (torch.randn(C, generator=gen, dtype=torch.float64) * 0.1).to(device=device, dtype=dtype)
    rv = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype)
    dy = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, w, b, rm, rv, dy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,channels_last", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_functional_runs_the_cpp_node_and_matches_torch(device, dtype, shape, channels_last, training, affine):
    x, w, b, rm, rv, dy = _inputs(shape, channels_last, dtype, device, affine)
    params = [t for t in (x, w, b) if t is not None]
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    rm_t, rv_t = rm.clone(), rv.clone()
    for t in params:
        t.requires_grad_(True)
    y = PF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    assert backends.last_dispatch().backend == device
    assert y.grad_fn is not None and y.grad_fn.name() == NODE  # C++ autograd, no Python Function
    y_t = F.batch_norm(leaves[0], rm_t, rv_t, leaves[1], leaves[2], training, 0.1, 1e-5)
    got = torch.autograd.grad(y, params, dy)
    want = torch.autograd.grad(y_t, [t for t in leaves if t is not None], dy)
    # against torch's own kernel in the same dtype; absolute part: (2, 1)'s grad_input is a
    # cancellation (exactly 0 in real arithmetic), so both sides carry only rounding there
    tol = dict(rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    for a, e in ((y, y_t), (rm, rm_t), (rv, rv_t)) + tuple(zip(got, want)):
        torch.testing.assert_close(a.detach(), e.detach(), **tol)
    for g, t in zip(got, params):
        assert g.dtype == t.dtype and g.shape == t.shape


def test_module_runs_the_cpp_node_and_matches_torch():
    torch.manual_seed(0)
    ours, theirs = pyfastdl.nn.BatchNorm1d(120), torch.nn.BatchNorm1d(120)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(256, 120)
    for step in range(3):
        y, y_t = ours(x), theirs(x)
        assert y.grad_fn.name() == NODE
        y.square().sum().backward()
        y_t.square().sum().backward()
    assert rel_err(y, y_t) < 1e-5
    assert rel_err(ours.weight.grad, theirs.weight.grad) < 1e-5 and rel_err(ours.bias.grad, theirs.bias.grad) < 1e-5
    for name, buf in ours.named_buffers():
        assert torch.allclose(buf.double(), theirs.get_buffer(name).double(), rtol=1e-5, atol=1e-6), name


def test_only_the_asked_gradients():
    x, w, b, rm, rv, dy = _inputs((6, 4), False, torch.float64, "cpu")
    x.requires_grad_(True)
    w.requires_grad_(True)  # bias is a constant
    y = PF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    (gx,) = torch.autograd.grad(y, (x,), dy, retain_graph=True)
    (gw,) = torch.autograd.grad(y, (w,), dy)
    x_t, w_t = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    y_t = F.batch_norm(x_t, None, None, w_t, b, True, 0.1, 1e-5)
    gx_t, gw_t = torch.autograd.grad(y_t, (x_t, w_t), dy)
    assert rel_err(gx, gx_t) < 1e-10 and rel_err(gw, gw_t) < 1e-10
    # weight-only graph: input needs no gradient
    y = PF.batch_norm(x.detach(), rm, rv, w, b, True, 0.1, 1e-5)
    y.backward(dy)
    assert w.grad is not None and x.grad is None


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_activation_epilogue_gradient(activation):
    x, w, b, rm, rv, dy = _inputs((9, 5, 3), False, torch.float64, "cpu")
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    y = PF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, activation=activation)
    assert y.grad_fn.name() == NODE
    got = torch.autograd.grad(y, leaves, dy)
    ref = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y_t = getattr(torch, activation)(F.batch_norm(ref[0], None, None, ref[1], ref[2], True, 0.1, 1e-5))
    want = torch.autograd.grad(y_t, ref, dy)
    assert rel_err(y, y_t) < 1e-10
    for g, g_t in zip(got, want):
        assert rel_err(g, g_t) < 1e-10


def test_create_graph_runs_the_differentiable_formula():
    """create_graph=True through the C++ node: first-order gradients equal torch's and carry their
    graph (the node calls pyfastdl::batch_norm_bwd_graph), so a gradient penalty's second-order
    gradients equal torch's too; never a silently graph-less gradient."""
    x, w, b, rm, rv, dy = _inputs((6, 4), False, torch.float64, "cpu")
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    y = PF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    assert y.grad_fn.name() == "pyfastdl::BatchNormBackward"
    gx, gw, gb = torch.autograd.grad(y, leaves, dy, create_graph=True)
    assert gx.requires_grad and backends.last_dispatch().op == "batch_norm_double_backward"
    ref = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    want = torch.autograd.grad(F.batch_norm(ref[0], None, None, ref[1], ref[2], True, 0.1, 1e-5), ref, dy,
                               create_graph=True)
    assert rel_err(gx, want[0]) < 1e-10 and rel_err(gw, want[1]) < 1e-10
    second = torch.autograd.grad(gx.square().sum(), leaves, allow_unused=True)
    second_t = torch.autograd.grad(want[0].square().sum(), ref, allow_unused=True)
    for g, g_t in zip(second, second_t):  # bias does not enter grad_input: None for both
        assert (g is None) == (g_t is None) and (g is None or rel_err(g, g_t) < 1e-9)
    assert torch.autograd.gradgradcheck(lambda *a: PF.batch_norm(a[0], None, None, a[1], a[2], True, 0.1, 1e-5),
                                        tuple(leaves))


def test_saved_input_modified_in_place_is_detected():
    x, w, b, rm, rv, dy = _inputs((6, 4), False, torch.float64, "cpu")
    w.requires_grad_(True)
    y = PF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
    x.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(dy)


def test_inference_mode_and_no_grad():
    x, w, b, rm, rv, _ = _inputs((8, 3, 5), False, torch.float32, "cpu")
    ref = F.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)
    with torch.inference_mode():
        y = PF.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)
    assert rel_err(y, ref) < 1e-5
    w.requires_grad_(True)
    with torch.no_grad():
        y = PF.batch_norm(x, rm.clone(), rv.clone(), w, b, True, 0.1, 1e-5)
    assert y.grad_fn is None and rel_err(y, ref) < 1e-5


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [0, 1, 2], ids=["plain", "relu", "sigmoid"])
def test_gradcheck(training, activation):
    x, w, b, rm, rv, _ = _inputs((5, 3, 4), False, torch.float64, "cpu")
    # away from the ReLU kink, where the finite difference is not the derivative
    x = x + 0.0
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    torch.autograd.gradcheck(lambda x, w, b: OP(x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, activation),
                             leaves, atol=1e-6 if activation == 1 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for shape, cl in (((6, 4), False), ((3, 5, 4, 2), True)):
        x, w, b, rm, rv, _ = _inputs(shape, cl, torch.float64, device)
        for training in (True, False):
            for t in (x, w, b):
                t.requires_grad_(True)
            torch.library.opcheck(OP, (x, w, b, rm, rv, training, 0.1, 1e-5, 0))
            torch.library.opcheck(OP, (x.detach(), None, None, None if training else rm,
                                       None if training else rv, training, 0.1, 1e-5, 1))
            torch.library.opcheck(OP, (x, w, b, rm, rv, training, 0.1, 1e-5, 2))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_equals_eager(backend):
    """torch.compile(fullgraph=True) of the functional and of the module: outputs, running
    statistics and gradients equal to eager (the op's fake implementation and C++ autograd trace)."""
    torch._dynamo.reset()
    x, w, b, rm, rv, dy = _inputs((16, 6, 5), False, torch.float32, "cpu")
    leaves = [t.requires_grad_(True) for t in (x, w, b)]

    def f(x, w, b, rm, rv):
        return PF.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5, activation="relu") * 2

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    rm_c, rv_c = rm.clone(), rv.clone()
    y_c = compiled(*leaves, rm_c, rv_c)
    g_c = torch.autograd.grad(y_c, leaves, dy)
    y_e = f(*leaves, rm, rv)
    g_e = torch.autograd.grad(y_e, leaves, dy)
    assert rel_err(y_c, y_e) < 1e-6
    assert rel_err(rm_c, rm) < 1e-6 and rel_err(rv_c, rv) < 1e-6
    for a, e in zip(g_c, g_e):
        assert rel_err(a, e) < 1e-6

    torch.manual_seed(0)
    module = pyfastdl.nn.BatchNorm2d(6)
    eager = pyfastdl.nn.BatchNorm2d(6)
    eager.load_state_dict(module.state_dict())
    cm = torch.compile(module, fullgraph=True, backend=backend)
    x4 = torch.randn(4, 6, 3, 3)
    cm(x4).sum().backward()
    eager(x4).sum().backward()
    assert rel_err(module.weight.grad, eager.weight.grad) < 1e-6
    assert rel_err(module.running_var, eager.running_var) < 1e-6
    assert module.num_batches_tracked.item() == eager.num_batches_tracked.item() == 1


def test_bad_input_still_raises_before_writing():
    x, w, b, rm, rv, _ = _inputs((6, 4), False, torch.float32, "cpu")
    rm0, rv0 = rm.clone(), rv.clone()
    w.requires_grad_(True)
    with pytest.raises(RuntimeError, match="weight"):
        PF.batch_norm(x, rm, rv, w[:3], b, True, 0.1, 1e-5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        PF.batch_norm(x[:1], rm, rv, w, b, True, 0.1, 1e-5)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


# ---- attention: pyfastdl::attention, its C++ node (csrc/cpu/attention_autograd.cpp) and the direct
# entries of the per-call path (csrc/cpu/percall.cpp) ----------------------------------------------------

ATTN_OP = torch.ops.pyfastdl.attention.default
ATTN_NODE = "pyfastdl::AttentionBackward"


def _qkv(B, H, L, S, E, dtype=torch.float64, seed=0, grad=True):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, n, E, generator=gen, dtype=torch.float64).to(dtype)
                   for n in (L, S, S, L))
    for t in (q, k, v):
        t.requires_grad_(grad)
    return q, k, v, do


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "float_mask_grad", "broadcast_3d", "scale"])
def test_sdpa_runs_the_cpp_node_and_matches_torch(dtype, case):
    q, k, v, do = _qkv(2, 3, 5, 7, 4, dtype, seed=1)
    kw, mask = {}, None
    if case == "causal":
        kw["is_causal"] = True
    elif case == "bool_mask":
        mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(2)) > 0.3
    elif case == "float_mask_grad":
        mask = torch.randn(3, 5, 7, dtype=dtype).requires_grad_(True)  # broadcast over the batch: summed
    elif case == "broadcast_3d":
        q = q.detach()[0].requires_grad_(True)  # (H, L, E) against (B, H, S, E): torch broadcasts
        do = do[0].expand(2, 3, 5, 4)
    elif case == "scale":
        kw["scale"] = 0.37
    y = PF.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)
    assert backends.last_dispatch().backend == "cpu"
    assert y.grad_fn is not None
    if case != "broadcast_3d":
        assert y.grad_fn.name() == ATTN_NODE  # C++ autograd, no Python Function
    inputs = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    ref = [t.detach().clone().requires_grad_(True) for t in inputs]
    it = iter(ref)
    rq, rk, rv = (next(it) if t.requires_grad else t for t in (q, k, v))
    rmask = next(it) if mask is not None and mask.requires_grad else mask
    y_t = F.scaled_dot_product_attention(rq, rk, rv, attn_mask=rmask, **kw)
    got, want = torch.autograd.grad(y, inputs, do), torch.autograd.grad(y_t, ref, do)
    tol = dict(rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    torch.testing.assert_close(y.detach(), y_t.detach(), **tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_sdpa_only_the_asked_gradients_and_no_grad():
    q, k, v, do = _qkv(1, 2, 4, 6, 3)
    (gk,) = torch.autograd.grad(PF.scaled_dot_product_attention(q, k, v), (k,), do)
    q_t, k_t, v_t = (t.detach().requires_grad_(True) for t in (q, k, v))
    (gk_t,) = torch.autograd.grad(F.scaled_dot_product_attention(q_t, k_t, v_t), (k_t,), do)
    assert rel_err(gk, gk_t) < 1e-10
    with torch.no_grad():
        assert PF.scaled_dot_product_attention(q, k, v).grad_fn is None
    with torch.inference_mode():
        y = PF.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
    assert rel_err(y, F.scaled_dot_product_attention(q_t, k_t, v_t)) < 1e-10


def test_sdpa_dropout_through_the_cpp_node_equals_the_python_function():
    """Dropout (Philox, keyed by the seed the functional draws): the C++ node's forward and backward
    equal AttentionFunction's with the same seed, bit for bit, and the gradients differ from the
    dropout-free ones."""
    from pyfastdl.autograd.attention import AttentionFunction
    q, k, v, do = _qkv(1, 2, 6, 9, 4)
    y = ATTN_OP(q, k, v, None, None, False, 0.5, 0.3, 1234)
    assert y.grad_fn.name() == ATTN_NODE
    got = torch.autograd.grad(y, (q, k, v), do)
    y_f = AttentionFunction.apply(q, k, v, None, None, False, 0.5, 0.3, 1234, torch.ops.pyfastdl)
    want = torch.autograd.grad(y_f, (q, k, v), do)
    assert torch.equal(y, y_f)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    y0 = ATTN_OP(q, k, v, None, None, False, 0.5, 0.0, 0)
    assert not torch.allclose(y, y0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ATTN_OP(q, k, v, None, None, False, 0.5, 0.3, 1), (q,), do, create_graph=True)


def test_sdpa_create_graph_runs_the_differentiable_formula():
    q, k, v, do = _qkv(1, 2, 4, 5, 3)
    mask = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    leaves = (q, k, v, mask)
    y = PF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert y.grad_fn.name() == ATTN_NODE
    got = torch.autograd.grad(y, leaves, do, create_graph=True)
    assert all(g.requires_grad for g in got)
    assert backends.last_dispatch().op == "scaled_dot_product_attention_double_backward"
    ref = [t.detach().clone().requires_grad_(True) for t in leaves]
    want = torch.autograd.grad(F.scaled_dot_product_attention(*ref[:3], attn_mask=ref[3]), ref, do, create_graph=True)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10
    second = torch.autograd.grad(sum(g.square().sum() for g in got), leaves)
    second_t = torch.autograd.grad(sum(w.square().sum() for w in want), ref)
    for g, w in zip(second, second_t):
        assert rel_err(g, w) < 1e-9
    assert torch.autograd.gradgradcheck(lambda a, b, c: ATTN_OP(a, b, c, None, None, True, 0.6, 0.0, 0), (q, k, v))


def test_sdpa_gradcheck_and_opcheck():
    q, k, v, _ = _qkv(1, 2, 3, 4, 3)
    mask = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, b, c, m: ATTN_OP(a, b, c, m, None, False, 0.5, 0.0, 0), (q, k, v, mask))
    lens = torch.tensor([3])
    for args in ((q, k, v, None, None, True, 0.5, 0.0, 0), (q, k, v, mask, None, False, 0.5, 0.0, 0),
                 (q, k, v, None, lens, False, 0.5, 0.0, 0), (q.detach(), k.detach(), v.detach(), mask.detach() > 0,
                                                            None, False, 0.5, 0.0, 0)):
        torch.library.opcheck(ATTN_OP, args)


def test_sdpa_compile_fullgraph_equals_eager():
    torch._dynamo.reset()
    q, k, v, do = _qkv(2, 2, 5, 6, 4, torch.float32)

    def f(q, k, v):
        return PF.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    y_c = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    g_c = torch.autograd.grad(y_c, (q, k, v), do)
    y_e = f(q, k, v)
    g_e = torch.autograd.grad(y_e, (q, k, v), do)
    assert rel_err(y_c, y_e) < 1e-6
    for a, e in zip(g_c, g_e):
        assert rel_err(a, e) < 1e-6


class _Sub(torch.Tensor):
    """A tensor subclass: __torch_function__ must run, so the direct entries step aside."""
    seen = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_direct_entries_step_aside_where_torch_ops_would_do_more():
    from pyfastdl import _C
    q, k, v, _ = _qkv(1, 1, 3, 4, 2, grad=False)
    x, w, b, rm, rv, _ = _inputs((6, 4), False, torch.float64, "cpu")
    # what the entries take: they run the registered op
    assert torch.equal(_C.attention(q, k, v, False, None), ATTN_OP(q, k, v, None, None, False, 1.0 / 2 ** 0.5, 0.0, 0))
    assert torch.equal(_C.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, 0),
                       OP(x, w, b, None, None, True, 0.1, 1e-5, 0))
    # what they do not: None, nothing run
    assert _C.attention(q.as_subclass(_Sub), k, v, False, None) is None
    assert _C.attention(q[0], k[0], v[0], False, None) is None  # 3-D: the full path broadcasts
    assert _C.attention(q, k[:, :, :0, :1], v, False, None) is None
    assert _C.attention(q.float(), k, v, False, None) is None
    assert _C.attention(q, k, v, 1, None) is None
    assert _C.batch_norm(x.as_subclass(_Sub), w, b, None, None, True, 0.1, 1e-5, 0) is None
    assert _C.batch_norm(x, w.as_subclass(_Sub), b, None, None, True, 0.1, 1e-5, 0) is None
    assert _C.batch_norm(x, [1.0] * 4, b, None, None, True, 0.1, 1e-5, 0) is None
    assert _C.batch_norm(x[:, 0], None, None, None, None, True, 0.1, 1e-5, 0) is None
    assert _C.batch_norm(x.long(), None, None, None, None, True, 0.1, 1e-5, 0) is None
    with torch.overrides.TorchFunctionMode():
        assert _C.attention(q, k, v, False, None) is None
        assert _C.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, 0) is None
    # and the functional then runs the full path: the subclass's __torch_function__ sees the op
    _Sub.seen = 0
    y = PF.scaled_dot_product_attention(q.as_subclass(_Sub), k, v)
    assert _Sub.seen > 0 and rel_err(y, F.scaled_dot_product_attention(q, k, v)) < 1e-12
    _Sub.seen = 0
    y = PF.batch_norm(x.as_subclass(_Sub), None, None, w, b, True)
    assert _Sub.seen > 0 and rel_err(y, F.batch_norm(x, None, None, w, b, True)) < 1e-12


def test_direct_entries_errors_are_torch_ops_errors():
    """Bad input the entry does take reaches the op's launcher check: the same error as torch.ops."""
    x, w, b, rm, rv, _ = _inputs((6, 4), False, torch.float32, "cpu")
    for call in (lambda: PF.batch_norm(x, rm[:3], rv, w, b, True), lambda: OP(x, w, b, rm[:3], rv, True, 0.1, 1e-5, 0)):
        with pytest.raises(RuntimeError, match="running_mean"):
            call()
    q, k, v, _ = _qkv(1, 1, 3, 4, 2, torch.float32, grad=False)
    with pytest.raises(RuntimeError, match="head dim"):
        PF.scaled_dot_product_attention(q, k[..., :1], v)
