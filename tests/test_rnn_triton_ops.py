"""The Triton LSTM / GRU ops (pyfastdl_triton::{lstm,gru}_{cell,seq}_{fwd,bwd}, triton_kernels/rnn.py)
called directly, against a plain-torch float64 implementation of the ops' contract (csrc/ops.cpp,
section "LSTM and GRU") written here: a loop over the steps of the packed layout, slicing by
batch_sizes, the cells by their formulas; its gradients by torch.autograd. Checked: every output
and saved tensor of the forward ops, every gradient of the backward ops (fed the Triton forward's
saved tensors), output_mask honoured, packed with uneven lengths, reverse, B = 1, H = 1, odd sizes,
NaN propagation, argument checks, opcheck and the schemas against the C++ ops.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set in conftest.py) or on a
GPU. Shapes are tiny: the interpreter runs every program in Python."""
import itertools

import pytest
import torch

from helpers import DEVICE, MARKS, assert_rel, assert_schema_matches_cpp

DEV = DEVICE["triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# float64 runs under the interpreter (tl.dot in float64); on a GPU the ops are meant for the three above.
F64 = [pytest.param(torch.float64, marks=pytest.mark.skipif(DEV != "cpu", reason="float64: interpreter only"))]


class Ops:
    """An op namespace and the device its tensors live on."""

    def __init__(self, ns, dev):
        self.ns, self.dev = ns, dev

    def __getattr__(self, name):
        return getattr(self.ns, name)


def _triton_ops():
    import pyfastdl.triton_kernels.rnn  # noqa: F401  (registers torch.ops.pyfastdl_triton)
    return Ops(torch.ops.pyfastdl_triton, DEV)


# The Triton ops (interpreter or GPU) and, on a GPU, the CUDA C++ ops (csrc/cuda/rnn.cu) of the same
# contract against the same reference.
@pytest.fixture(scope="module", params=[pytest.param("triton", marks=MARKS["triton"]),
                                        pytest.param("cuda", marks=MARKS["cuda"])])
def ops(request):
    if request.param == "triton":
        return _triton_ops()
    import pyfastdl  # noqa: F401  (registers torch.ops.pyfastdl)
    return Ops(torch.ops.pyfastdl, "cuda")


# ---- the float64 reference of the contract -------------------------------------------------------
def _lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    gi = x @ w_ih.t() + h @ w_hh.t()
    if b_ih is not None:
        gi = gi + b_ih
    if b_hh is not None:
        gi = gi + b_hh
    i, f, g, o = gi.chunk(4, 1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    c2 = f * c + i * g
    return o * c2.tanh(), c2, torch.cat([i, f, g, o], 1)


def _gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    gx = x @ w_ih.t() + (b_ih if b_ih is not None else 0)
    gh = h @ w_hh.t() + (b_hh if b_hh is not None else 0)
    xr, xz, xn = gx.chunk(3, 1)
    hr, hz, hn = gh.chunk(3, 1)
    r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
    n = (xn + r * hn).tanh()
    return (1 - z) * n + z * h, torch.cat([r, z, n, hn], 1)


def ref_seq(kind, x, sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    """(output, hy, [cy,] saved...) of one layer over a packed sequence. The state of every row lives
    in one (B, H) tensor: step t updates its first batch_sizes[t] rows (in both directions a row
    starts from h0 and continues from the step processed before)."""
    offs = [0]
    for b in sizes:
        offs.append(offs[-1] + b)
    h, c = h0, c0
    outs, saved, cs = [None] * len(sizes), [None] * len(sizes), [None] * len(sizes)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in order:
        bt, xt = sizes[t], x[offs[t]:offs[t + 1]]
        if kind == "lstm":
            hn_, cn_, g = _lstm_cell(xt, h[:bt], c[:bt], w_ih, w_hh, b_ih, b_hh)
            c = torch.cat([cn_, c[bt:]], 0)
            cs[t] = cn_
        else:
            hn_, g = _gru_cell(xt, h[:bt], w_ih, w_hh, b_ih, b_hh)
        h = torch.cat([hn_, h[bt:]], 0)
        outs[t], saved[t] = hn_, g
    N, H = x.size(0), h0.size(1)
    cat = lambda ts, w: torch.cat(ts, 0) if ts else x.new_zeros((0, w))  # noqa: E731
    if kind == "lstm":
        return cat(outs, H), h, c, cat(saved, 4 * H), cat(cs, H)
    return cat(outs, H), h, cat(saved, 4 * H)


def make(kind, sizes, I, H, dtype, bias=True, seed=0, dev=DEV):
    g = torch.Generator().manual_seed(seed)
    G = 4 if kind == "lstm" else 3
    N, B = sum(sizes), (sizes[0] if sizes else 2)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = dict(x=r(N, I), h0=r(B, H) * 0.5, c0=r(B, H) * 0.5, w_ih=r(G * H, I) * 0.4, w_hh=r(G * H, H) * 0.4,
             b_ih=r(G * H) * 0.2 if bias else None, b_hh=r(G * H) * 0.2 if bias else None)
    if kind == "gru":
        del t["c0"]
    low = {k: (v.to(dtype).to(dev) if v is not None else None) for k, v in t.items()}
    ref = {k: (low[k].double().cpu() if v is not None else None) for k, v in t.items()}  # the rounded values
    return low, ref


def bs(sizes):
    return torch.tensor(sizes, dtype=torch.int64)


SEQ_CASES = [  # (batch_sizes, I, H)
    ([3, 3, 3], 5, 7),
    ([4, 3, 3, 1], 3, 17),  # packed, uneven lengths
    ([1, 1], 2, 1),  # B = 1, H = 1
    ([2], 1, 3),  # one step, I = 1
    ([5, 2, 2, 1, 1], 4, 33),  # H spans several unit and K blocks (with a ragged edge)
    ([40, 20], 3, 5),  # rows span two row blocks (32 rows a block)
    ([2, 1], 3, 70),  # the forward's recurrent product loops over two K blocks (64)
]
TOL_FACTOR = {torch.float64: 1.0, torch.float32: 1.0, torch.float16: 1.0, torch.bfloat16: 1.0}


def _grads(kind, ref, sizes, reverse, gout, ghy, gcy):
    """Gradients of the reference w.r.t. (x, h0, [c0,] w_ih, w_hh, b_ih, b_hh)."""
    leaves = {k: v.clone().requires_grad_(True) if v is not None else None for k, v in ref.items()}
    args = [leaves["x"], sizes, leaves["h0"], leaves.get("c0"), leaves["w_ih"], leaves["w_hh"], leaves["b_ih"], leaves["b_hh"], reverse]
    res = ref_seq(kind, *args)
    loss = (res[0] * gout).sum() + (res[1] * ghy).sum()
    if kind == "lstm":
        loss = loss + (res[2] * gcy).sum()
    names = ["x", "h0"] + (["c0"] if kind == "lstm" else []) + ["w_ih", "w_hh", "b_ih", "b_hh"]
    need = [leaves[n] for n in names if leaves[n] is not None]
    gs = torch.autograd.grad(loss, need, allow_unused=True)
    out = dict(zip([n for n in names if leaves[n] is not None], gs))
    return {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in out.items()}, res


def _check_seq(ops, kind, sizes, I, H, dtype, reverse, bias=True, mask=(True,) * 6, with_grads=(True, True, True)):
    low, ref = make(kind, sizes, I, H, dtype, bias, dev=ops.dev)
    B = low["h0"].size(0)
    fwd = ops.lstm_seq_fwd if kind == "lstm" else ops.gru_seq_fwd
    if kind == "lstm":
        res = fwd(low["x"], bs(sizes), low["h0"], low["c0"], low["w_ih"], low["w_hh"], low["b_ih"], low["b_hh"],
                  reverse)
    else:
        res = fwd(low["x"], bs(sizes), low["h0"], low["w_ih"], low["w_hh"], low["b_ih"], low["b_hh"], reverse)
    N = low["x"].size(0)
    g = torch.Generator().manual_seed(1)
    gout = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype).double()
    ghy = torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype).double()
    gcy = torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype).double()
    gout = gout if with_grads[0] else torch.zeros_like(gout)
    ghy = ghy if with_grads[1] else torch.zeros_like(ghy)
    gcy = gcy if with_grads[2] else torch.zeros_like(gcy)
    grads, want = _grads(kind, ref, sizes, reverse, gout, ghy, gcy)
    for got, exp in zip(res, want):
        assert got.dtype == dtype and got.shape == exp.shape
        assert_rel(got, exp, dtype, "gemm", TOL_FACTOR[dtype])
    opt = lambda t, w: t.to(dtype).to(ops.dev) if w else None  # noqa: E731
    if kind == "lstm":
        output, hy, cy, gates, cs = res
        out = ops.lstm_seq_bwd(opt(gout, with_grads[0]), opt(ghy, with_grads[1]), opt(gcy, with_grads[2]),
                               low["x"], bs(sizes), low["h0"], low["c0"], low["w_ih"], low["w_hh"], output, gates,
                               cs, reverse, list(mask))
        names = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih"]
    else:
        output, hy, ws = res
        out = ops.gru_seq_bwd(opt(gout, with_grads[0]), opt(ghy, with_grads[1]), low["x"], bs(sizes), low["h0"],
                              low["w_ih"], low["w_hh"], output, ws, reverse, list(mask))
        names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
    for name, m, got in zip(names, mask, out):
        if not m:
            assert got is None, name
            continue
        exp = grads.get(name)
        if exp is None:  # no bias in the reference: the gradient a bias would get
            exp = _bias_grad(kind, ref, sizes, reverse, gout, ghy, gcy, name)
        assert got.dtype == dtype and got.shape == exp.shape, name
        assert_rel(got, exp, dtype, "gemm", TOL_FACTOR[dtype])


def _bias_grad(kind, ref, sizes, reverse, gout, ghy, gcy, name):
    G = 4 if kind == "lstm" else 3
    H = ref["h0"].size(1)
    zero = {"b_ih": torch.zeros(G * H, dtype=torch.float64), "b_hh": torch.zeros(G * H, dtype=torch.float64)}
    grads, _ = _grads(kind, {**ref, **zero}, sizes, reverse, gout, ghy, gcy)
    return grads[name]


# ---- sequences -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("sizes,I,H", SEQ_CASES, ids=[f"bs{c[0]}-I{c[1]}-H{c[2]}" for c in SEQ_CASES])
def test_seq_float32(ops, kind, reverse, sizes, I, H):
    _check_seq(ops, kind, sizes, I, H, torch.float32, reverse)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] + F64)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_seq_dtypes(ops, kind, dtype, reverse):
    _check_seq(ops, kind, [4, 3, 1], 3, 17, dtype, reverse)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_seq_no_bias(ops, kind):
    _check_seq(ops, kind, [3, 2], 4, 5, torch.float32, False, bias=False)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("mask", [(True, False, False, False, False, False), (False, True, True, False, False, False),
                                  (False, False, False, True, True, True), (False,) * 6],
                         ids=["input", "states", "weights", "none"])
def test_seq_output_mask(ops, kind, mask):
    _check_seq(ops, kind, [3, 2, 1], 2, 5, torch.float32, True, mask=mask)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("with_grads", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["grad_output", "grad_hy", "grad_cy"])
def test_seq_optional_grads(ops, kind, with_grads):
    """grad_output / grad_hy / grad_cy None = zero."""
    _check_seq(ops, kind, [3, 2, 1], 2, 5, torch.float32, False, with_grads=with_grads)


# float64: the Triton ops under the interpreter (tl.dot in float64 is not a GPU target of theirs) and
# the CUDA ops on a GPU.
@pytest.fixture(scope="module", params=[
    pytest.param("triton", marks=MARKS["triton"] + [pytest.mark.skipif(DEV != "cpu", reason="float64: interpreter only")]),
    pytest.param("cuda", marks=MARKS["cuda"])])
def f64_ops(request):
    if request.param == "triton":
        return _triton_ops()
    import pyfastdl  # noqa: F401  (registers torch.ops.pyfastdl)
    return Ops(torch.ops.pyfastdl, "cuda")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_seq_gradcheck_float64(f64_ops, kind):
    """torch.autograd.gradcheck of the forward op, its backward through the backward op."""
    ops = f64_ops
    low, _ = make(kind, [3, 2, 1], 2, 3, torch.float64, dev=ops.dev)
    sizes = bs([3, 2, 1])
    rev = True

    class F(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
            if kind == "lstm":
                res = ops.lstm_seq_fwd(x, sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, rev)
            else:
                res = ops.gru_seq_fwd(x, sizes, h0, w_ih, w_hh, b_ih, b_hh, rev)
            ctx.save_for_backward(x, h0, c0, w_ih, w_hh, *res)
            return res[0], res[1]

        @staticmethod
        def backward(ctx, go, ghy):
            x, h0, c0, w_ih, w_hh, *res = ctx.saved_tensors
            if kind == "lstm":
                g = ops.lstm_seq_bwd(go, ghy, None, x, sizes, h0, c0, w_ih, w_hh, res[0], res[3], res[4], rev,
                                     [True] * 6)
                return g[0], g[1], g[2], g[3], g[4], g[5], g[5]
            g = ops.gru_seq_bwd(go, ghy, x, sizes, h0, w_ih, w_hh, res[0], res[2], rev, [True] * 6)
            return g[0], g[1], None, g[2], g[3], g[4], g[5]

    c0 = low.get("c0", torch.zeros_like(low["h0"]))
    args = [t.clone().requires_grad_(True) for t in (low["x"], low["h0"], c0, low["w_ih"], low["w_hh"],
                                                      low["b_ih"], low["b_hh"])]
    if kind == "gru":
        args[2].requires_grad_(False)
    assert torch.autograd.gradcheck(F.apply, args, eps=1e-6, atol=1e-7, fast_mode=True)


# ---- cells ---------------------------------------------------------------------------------------
CELL_CASES = [(3, 5, 7), (1, 1, 1), (17, 4, 33)]


@pytest.mark.parametrize("B,I,H", CELL_CASES, ids=[f"B{c[0]}-I{c[1]}-H{c[2]}" for c in CELL_CASES])
@pytest.mark.parametrize("dtype", DTYPES + F64)
def test_lstm_cell(ops, B, I, H, dtype):
    low, ref = make("lstm", [B], I, H, dtype, dev=ops.dev)
    hy, cy, gates = ops.lstm_cell_fwd(low["x"], low["h0"], low["c0"], low["w_ih"], low["w_hh"], low["b_ih"],
                                      low["b_hh"])
    leaves = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
    ehy, ecy, egates = _lstm_cell(leaves["x"], leaves["h0"], leaves["c0"], leaves["w_ih"], leaves["w_hh"],
                                  leaves["b_ih"], leaves["b_hh"])
    for got, exp in ((hy, ehy), (cy, ecy), (gates, egates)):
        assert got.dtype == dtype
        assert_rel(got, exp, dtype, "gemm")
    g = torch.Generator().manual_seed(2)
    ghy = torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype)
    gcy = torch.randn(B, H, generator=g, dtype=torch.float64).to(dtype)
    names = ["x", "h0", "c0", "w_ih", "w_hh", "b_ih"]
    exp = torch.autograd.grad((ehy * ghy.double()).sum() + (ecy * gcy.double()).sum(), [leaves[n] for n in names],
                              retain_graph=True)
    got = ops.lstm_cell_bwd(ghy.to(ops.dev), gcy.to(ops.dev), low["x"], low["h0"], low["c0"], low["w_ih"], low["w_hh"], cy,
                            gates, [True] * 6)
    for name, a, e in zip(names, got, exp):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_rel(a, e, dtype, "gemm")
    # output_mask honoured; grad_cy None = zero
    part = ops.lstm_cell_bwd(ghy.to(ops.dev), None, low["x"], low["h0"], low["c0"], low["w_ih"], low["w_hh"], cy,
                             gates, [False, True, False, False, True, False])
    exp = torch.autograd.grad((ehy * ghy.double()).sum(), [leaves["h0"], leaves["w_hh"]])
    assert [p is None for p in part] == [True, False, True, True, False, True]
    assert_rel(part[1], exp[0], dtype, "gemm")
    assert_rel(part[4], exp[1], dtype, "gemm")


@pytest.mark.parametrize("B,I,H", CELL_CASES, ids=[f"B{c[0]}-I{c[1]}-H{c[2]}" for c in CELL_CASES])
@pytest.mark.parametrize("dtype", DTYPES + F64)
def test_gru_cell(ops, B, I, H, dtype):
    low, ref = make("gru", [B], I, H, dtype, dev=ops.dev)
    hy, ws = ops.gru_cell_fwd(low["x"], low["h0"], low["w_ih"], low["w_hh"], low["b_ih"], low["b_hh"])
    leaves = {k: v.clone().requires_grad_(True) for k, v in ref.items()}
    ehy, ews = _gru_cell(leaves["x"], leaves["h0"], leaves["w_ih"], leaves["w_hh"], leaves["b_ih"], leaves["b_hh"])
    assert_rel(hy, ehy, dtype, "gemm")
    assert_rel(ws, ews, dtype, "gemm")
    ghy = torch.randn(B, H, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    names = ["x", "h0", "w_ih", "w_hh", "b_ih", "b_hh"]
    exp = torch.autograd.grad((ehy * ghy.double()).sum(), [leaves[n] for n in names])
    got = ops.gru_cell_bwd(ghy.to(ops.dev), low["x"], low["h0"], low["w_ih"], low["w_hh"], ws, [True] * 6)
    for name, a, e in zip(names, got, exp):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_rel(a, e, dtype, "gemm")
    part = ops.gru_cell_bwd(ghy.to(ops.dev), low["x"], low["h0"], low["w_ih"], low["w_hh"], ws,
                            [True, False, False, False, False, True])
    assert [p is None for p in part] == [False, True, True, True, True, False]
    assert_rel(part[0], exp[0], dtype, "gemm")
    assert_rel(part[5], exp[5], dtype, "gemm")


def test_gru_cell_no_bias(ops):
    low, ref = make("gru", [3], 2, 5, torch.float32, bias=False, dev=ops.dev)
    hy, ws = ops.gru_cell_fwd(low["x"], low["h0"], low["w_ih"], low["w_hh"], None, None)
    ehy, _ = _gru_cell(ref["x"], ref["h0"], ref["w_ih"], ref["w_hh"], None, None)
    assert_rel(hy, ehy, torch.float32, "gemm")


# ---- special values, checks, registration --------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_nan_propagates(ops, kind):
    """A NaN in one input row reaches that row's output and, through h, its later steps -- and
    no other row; +-inf saturates the gates as torch's."""
    low, _ = make(kind, [3, 3, 3], 2, 5, torch.float32, dev=ops.dev)
    x = low["x"].clone()
    x[3 + 1, 0] = float("nan")  # row 1 of step 1
    x[0, 1] = float("inf")  # row 0 of step 0
    args = (x, bs([3, 3, 3]), low["h0"]) + ((low["c0"],) if kind == "lstm" else ()) + (
        low["w_ih"], low["w_hh"], low["b_ih"], low["b_hh"], False)
    res = (ops.lstm_seq_fwd if kind == "lstm" else ops.gru_seq_fwd)(*args)
    out = res[0].view(3, 3, -1)
    assert torch.isnan(out[1:, 1]).all() and not torch.isnan(out[0, 1]).any()
    assert not torch.isnan(out[:, 0]).any() and not torch.isnan(out[:, 2]).any()
    assert torch.isnan(res[1][1]).all() and not torch.isnan(res[1][[0, 2]]).any()
    ref = torch.nn.LSTM(2, 5) if kind == "lstm" else torch.nn.GRU(2, 5)
    low = {k: v.cpu() for k, v in low.items()}
    out = out.cpu()
    with torch.no_grad():
        ref.weight_ih_l0.copy_(low["w_ih"]), ref.weight_hh_l0.copy_(low["w_hh"])
        ref.bias_ih_l0.copy_(low["b_ih"]), ref.bias_hh_l0.copy_(low["b_hh"])
        hx = (low["h0"][None], low["c0"][None]) if kind == "lstm" else low["h0"][None]
        exp = ref(x.cpu().view(3, 3, 2), hx)[0]
    assert torch.equal(torch.isnan(out), torch.isnan(exp))
    assert torch.allclose(out.nan_to_num(), exp.nan_to_num(), atol=1e-5)


def test_tanh_small_and_large(ops):
    """The kernels' tanh: the series near 0, the exp formula beyond, huge values, NaN (through the
    GRU cell with w_hh = 0: n = tanh(x W_in^T) exactly, r's term vanishing)."""
    x = torch.tensor([[1e-30], [1e-4], [-0.2], [0.3], [-3.0], [30.0], [1e30], [-1e30], [float("nan")]],
                     dtype=torch.float32, device=ops.dev)
    B = x.size(0)
    w_ih = torch.zeros(3, 1, device=ops.dev)
    w_ih[2, 0] = 1.0
    hy, ws = ops.gru_cell_fwd(x, torch.zeros(B, 1, device=ops.dev), w_ih, torch.zeros(3, 1, device=ops.dev), None,
                              None)
    n = ws[:, 2].double().cpu()
    exp = x[:, 0].double().cpu().tanh()
    # a few float32 ulps: on a GPU, exp and tanhf are not correctly rounded
    assert torch.allclose(n, exp, rtol=1e-6, atol=0, equal_nan=True), (n, exp)


def _seq_args(ops, kind, dtype=torch.float32, sizes=(3, 2)):
    low, _ = make(kind, list(sizes), 2, 5, dtype, dev=ops.dev)
    if kind == "lstm":
        return [low["x"], bs(list(sizes)), low["h0"], low["c0"], low["w_ih"], low["w_hh"], low["b_ih"], low["b_hh"],
                False]
    return [low["x"], bs(list(sizes)), low["h0"], low["w_ih"], low["w_hh"], low["b_ih"], low["b_hh"], False]


BAD = [  # (kind, argument index, replacement, message fragment)
    ("lstm", 0, lambda a: a[:4], "sum(batch_sizes)"),
    ("lstm", 1, lambda a: torch.tensor([2, 3]), "non-increasing"),
    ("lstm", 1, lambda a: a.to(torch.int32), "batch_sizes"),
    ("lstm", 2, lambda a: a[:, :4], "h0"),
    ("lstm", 3, lambda a: a[:2], "c0"),
    ("lstm", 4, lambda a: a[:, :1], "w_ih"),
    ("lstm", 5, lambda a: a[:-1], "w_hh"),
    ("lstm", 6, lambda a: a.double(), "b_ih"),
    ("lstm", 7, lambda a: a[:3], "b_hh"),
    ("gru", 2, lambda a: a.half(), "h0"),
    ("gru", 0, lambda a: a.int(), "input"),
    ("gru", 3, lambda a: torch.cat([a, a]), "w_ih"),
]


@pytest.mark.parametrize("kind,i,bad,msg", BAD, ids=[f"{b[0]}-{b[3]}-{n}" for n, b in enumerate(BAD)])
def test_bad_input(ops, kind, i, bad, msg):
    args = _seq_args(ops, kind)
    args[i] = bad(args[i])
    with pytest.raises(RuntimeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        (ops.lstm_seq_fwd if kind == "lstm" else ops.gru_seq_fwd)(*args)


def test_bad_output_mask(ops):
    args = _seq_args(ops, "gru")
    out, hy, ws = ops.gru_seq_fwd(*args)
    with pytest.raises(RuntimeError, match="ws"):
        ops.gru_seq_bwd(out, hy, args[0], args[1], args[2], args[3], args[4], out, ws[:, :5], False, [True] * 6)


def test_empty_sequence(ops):
    """T = 0: no step; hy, cy are h0, c0; grad_h0, grad_c0 are grad_hy, grad_cy."""
    x = torch.zeros(0, 3, device=ops.dev)
    h0, c0 = torch.randn(2, 4, device=ops.dev), torch.randn(2, 4, device=ops.dev)
    w_ih, w_hh = torch.randn(16, 3, device=ops.dev), torch.randn(16, 4, device=ops.dev)
    out, hy, cy, gates, cs = ops.lstm_seq_fwd(x, bs([]), h0, c0, w_ih, w_hh, None, None, False)
    assert out.shape == (0, 4) and torch.equal(hy, h0) and torch.equal(cy, c0)
    g = ops.lstm_seq_bwd(None, h0, c0, x, bs([]), h0, c0, w_ih, w_hh, out, gates, cs, False, [True] * 6)
    assert torch.equal(g[1], h0) and torch.equal(g[2], c0)
    assert g[0].shape == (0, 3) and not g[3].any() and not g[4].any() and not g[5].any()


def _opcheck_cases(ops):
    lstm, gru = _seq_args(ops, "lstm"), _seq_args(ops, "gru")
    lo = ops.lstm_seq_fwd(*lstm)
    go = ops.gru_seq_fwd(*gru)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh = lstm[0], lstm[2], lstm[3], lstm[4], lstm[5], lstm[6], lstm[7]
    gx, gh0, gw_ih, gw_hh, gb_ih, gb_hh = gru[0], gru[2], gru[3], gru[4], gru[5], gru[6]
    cell = ops.lstm_cell_fwd(x[:3], h0, c0, w_ih, w_hh, b_ih, b_hh)
    gcell = ops.gru_cell_fwd(gx[:3], gh0, gw_ih, gw_hh, gb_ih, gb_hh)
    m = [True, False, True, True, False, True]
    return [
        (ops.lstm_seq_fwd, tuple(lstm)),
        (ops.lstm_seq_fwd, tuple(lstm[:-1]) + (True,)),
        (ops.lstm_seq_bwd, (torch.randn_like(lo[0]), None, torch.randn_like(lo[2]), x, lstm[1], h0, c0, w_ih, w_hh,
                            lo[0], lo[3], lo[4], False, m)),
        (ops.gru_seq_fwd, tuple(gru)),
        (ops.gru_seq_bwd, (torch.randn_like(go[0]), torch.randn_like(go[1]), gx, gru[1], gh0, gw_ih, gw_hh, go[0],
                           go[2], True, [True] * 6)),
        (ops.lstm_cell_fwd, (x[:3], h0, c0, w_ih, w_hh, b_ih, None)),
        (ops.lstm_cell_bwd, (torch.randn_like(cell[0]), None, x[:3], h0, c0, w_ih, w_hh, cell[1], cell[2], m)),
        (ops.gru_cell_fwd, (gx[:3], gh0, gw_ih, gw_hh, None, gb_hh)),
        (ops.gru_cell_bwd, (torch.randn_like(gcell[0]), gx[:3], gh0, gw_ih, gw_hh, gcell[1], [True] * 6)),
    ]


def test_opcheck(ops):
    """Schema and fake-tensor registrations of all eight ops, through torch.library.opcheck."""
    for op, args in _opcheck_cases(ops):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


OPS = ["lstm_cell_fwd", "lstm_cell_bwd", "gru_cell_fwd", "gru_cell_bwd", "lstm_seq_fwd", "lstm_seq_bwd",
       "gru_seq_fwd", "gru_seq_bwd"]


@pytest.fixture(scope="module")
def triton_ops():
    return _triton_ops()


@pytest.fixture(scope="module")
def cpp_ops():
    import pyfastdl  # noqa: F401  (registers torch.ops.pyfastdl)
    return torch.ops.pyfastdl


@pytest.mark.parametrize("op", OPS)
@MARKS["triton"][0]
@MARKS["triton"][1]
def test_schema_matches_cpp(triton_ops, op):
    assert_schema_matches_cpp(triton_ops, op)


@MARKS["triton"][0]
@MARKS["triton"][1]
def test_int32_limit_raises(triton_ops, monkeypatch):
    """The Triton kernels index with int32 (rows * 4 * hidden_size < 2**31): beyond, a clear error
    before anything runs (the limit lowered here so that a tiny input passes it)."""
    import pyfastdl.triton_kernels.rnn as m
    monkeypatch.setattr(m, "_INT32_MAX", 50)
    args = _seq_args(triton_ops, "lstm")
    with pytest.raises(RuntimeError, match="int32"):
        triton_ops.lstm_seq_fwd(*args)


@pytest.fixture(scope="module")
def cpu_ops(cpp_ops):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("pyfastdl::lstm_seq_fwd", "CPU"):
        pytest.skip("the built pyfastdl._C has no CPU kernels of the rnn ops")
    return cpp_ops


@MARKS["triton"][0]
@MARKS["triton"][1]
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_agrees_with_cpu_ops(triton_ops, cpu_ops, kind, reverse):
    """The Triton ops and the C++ CPU ops of the same contract: every output, saved tensor and
    gradient (the backward fed each implementation's own saved tensors), packed and uneven."""
    low, _ = make(kind, [4, 3, 3, 1], 3, 6, torch.float32, dev=triton_ops.dev)
    sizes = bs([4, 3, 3, 1])
    cpu = {k: v.cpu() if v is not None else None for k, v in low.items()}
    g = torch.Generator().manual_seed(5)
    go, ghy, gcy = (torch.randn(*s, generator=g) for s in ((11, 6), (4, 6), (4, 6)))
    res = []
    for ops, t in ((triton_ops, low), (cpu_ops, cpu)):
        dev = t["x"].device
        if kind == "lstm":
            f = ops.lstm_seq_fwd(t["x"], sizes, t["h0"], t["c0"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], reverse)
            b = ops.lstm_seq_bwd(go.to(dev), ghy.to(dev), gcy.to(dev), t["x"], sizes, t["h0"], t["c0"], t["w_ih"],
                                 t["w_hh"], f[0], f[3], f[4], reverse, [True] * 6)
        else:
            f = ops.gru_seq_fwd(t["x"], sizes, t["h0"], t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"], reverse)
            b = ops.gru_seq_bwd(go.to(dev), ghy.to(dev), t["x"], sizes, t["h0"], t["w_ih"], t["w_hh"], f[0], f[2],
                                reverse, [True] * 6)
        res.append(list(f) + list(b))
    for got, exp in zip(*res):
        assert_rel(got, exp, torch.float32, "gemm")
