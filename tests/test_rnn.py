"""LSTM and GRU (family rnn): pyfastdl.nn.LSTM/GRU/LSTMCell/GRUCell and pyfastdl.functional.lstm_cell/gru_cell
against torch's modules with copied weights (outputs, final states, every gradient), against torch in
float64 as the reference; PackedSequence (enforce_sorted True and False), reverse directions, odd sizes;
gradcheck and opcheck on the ops; output masks; bad input; NaN propagation; PyTorch's ModuleInfo samples
(op_db has no OpInfo for the cells). Schemas: csrc/ops.cpp."""
import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import pyfastdl
from pyfastdl import backends
from pyfastdl.autograd.rnn import GRUCellFunction, GRUSeqFunction, LSTMCellFunction, LSTMSeqFunction
from helpers import GEMM_TOL, MARKS, TOL, assert_rel, params  # noqa: F401

F64 = torch.float64
DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32,), "triton": (torch.float32,)}
BACKENDS = ("cpu", "cuda", "triton")
# float32: errors against the float64 reference grow with the number of steps the gradient flows
# through (products of gate derivatives); 10x the GEMM bound covers T <= 12 here.
RNN_FACTOR = {torch.float32: 10.0, torch.float64: 1.0}


def _device(backend):
    return {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if torch.cuda.is_available() else "cpu"}[backend]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair(kind, I, H, dtype, device, **kw):
    """(torch module in float64 on the CPU, pyfastdl module in dtype on device) with the same weights."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(I, H, **kw).to(F64)
    ours = getattr(pyfastdl.nn, kind)(I, H, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours.to(dtype=dtype, device=device)


def _run(module, x, hx, lengths, batch_first, enforce_sorted, seed=1):
    """Forward, then the gradient of a random linear function of output and states; returns
    (output (padded), states..., grad_x, grad_states..., grad_params...)."""
    x = x.detach().clone().requires_grad_()
    hs = [h.detach().clone().requires_grad_() for h in hx] if hx is not None else []
    inp = x if lengths is None else pack_padded_sequence(x, lengths, batch_first=batch_first,
                                                         enforce_sorted=enforce_sorted)
    state = None if hx is None else (tuple(hs) if len(hs) == 2 else hs[0])
    out, st = module(inp, state)
    if lengths is not None:
        assert isinstance(out, PackedSequence)
        out = pad_packed_sequence(out, batch_first=batch_first)[0]
    sts = list(st) if isinstance(st, tuple) else [st]
    g = _gen(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64).to(out)).sum()
    for s in sts:
        loss = loss + (s * torch.randn(s.shape, generator=g, dtype=F64).to(s)).sum()
    wanted = [x] + hs + list(module.parameters())
    grads = torch.autograd.grad(loss, wanted)
    return [out] + sts + list(grads)


def _compare(kind, backend, dtype, T, B, I, H, lengths=None, hx=True, enforce_sorted=True, **kw):
    device = _device(backend)
    ref, ours = _pair(kind, I, H, dtype, device, **kw)
    bf = kw.get("batch_first", False)
    D = 2 if kw.get("bidirectional") else 1
    L = kw.get("num_layers", 1)
    g = _gen(2)
    x = torch.randn((B, T, I) if bf else (T, B, I), generator=g, dtype=F64)
    states = None
    if hx:
        states = [torch.randn(L * D, B, H, generator=g, dtype=F64) for _ in range(2 if kind == "LSTM" else 1)]
    want = _run(ref, x, states, lengths, bf, enforce_sorted)
    with backends.use(backend):
        got = _run(ours, x.to(dtype=dtype, device=device),
                   None if states is None else [s.to(dtype=dtype, device=device) for s in states],
                   lengths, bf, enforce_sorted)
        assert backends.last_dispatch().backend == backend
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape, i
        assert_rel(a, b, dtype, "gemm", RNN_FACTOR[dtype])


CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, bidirectional=True, batch_first=True),
    dict(num_layers=2, bias=False),
    dict(num_layers=2, dropout=0.0, batch_first=True),
]


@pytest.mark.parametrize("backend,dtype", params(DTYPES, BACKENDS))
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_layers_match_torch(kind, cfg, backend, dtype):
    _compare(kind, backend, dtype, T=7, B=3, I=5, H=6, **cfg)


@pytest.mark.parametrize("backend,dtype", params(DTYPES, BACKENDS))
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("T,B,I,H", [(1, 3, 4, 5), (6, 1, 3, 4), (5, 3, 4, 1), (11, 17, 13, 17), (3, 2, 1, 3)],
                         ids=["seq1", "batch1", "hidden1", "odd", "input1"])
def test_layers_odd_sizes(kind, T, B, I, H, backend, dtype):
    _compare(kind, backend, dtype, T, B, I, H, num_layers=2, bidirectional=True)


# The CPU time loop's recurrent GEMM (rnn_kernel.cpp, gemm_packed): rows in blocks of 6 (B = 1, 5, 13
# leave row tails of 1, 5, 1), columns in panels of 2 vectors (H = 1, 7, 17, 33 leave column tails in
# both vectors of a panel, forward (G*H columns) and backward (H columns)); packed uneven lengths and the
# reverse direction change the rows of each step; H = 160 splits the panels over threads.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("B,H", [(1, 1), (5, 7), (13, 17), (5, 33), (13, 160)])
def test_cpu_recurrent_gemm_tails(kind, B, H, dtype):
    lengths = [4 - (b * 3) // max(B, 2) for b in range(B)]
    _compare(kind, "cpu", dtype, 4, B, 3, H, lengths=lengths, bidirectional=True)


@pytest.mark.parametrize("backend,dtype", params(DTYPES, BACKENDS))
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
def test_packed_uneven_lengths(kind, enforce_sorted, batch_first, backend, dtype):
    lengths = torch.tensor([9, 7, 7, 4, 1]) if enforce_sorted else torch.tensor([4, 9, 1, 7, 7])
    _compare(kind, backend, dtype, T=9, B=5, I=4, H=6, lengths=lengths, enforce_sorted=enforce_sorted,
             num_layers=2, bidirectional=True, batch_first=batch_first)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_packed_without_initial_state(kind):
    _compare(kind, "cpu", F64, T=5, B=4, I=3, H=4, lengths=torch.tensor([5, 2, 4, 3]), hx=False,
             enforce_sorted=False, bidirectional=True)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_packed_equals_padded_per_sequence(kind):
    """Steps past a sequence's length are not computed: each packed sequence gives what it gives alone."""
    ref, ours = _pair(kind, 3, 4, F64, "cpu", bidirectional=True)
    lengths = [6, 4, 1]
    x = torch.randn(6, 3, 3, dtype=F64, generator=_gen(3))
    out, st = ours(pack_padded_sequence(x, torch.tensor(lengths)))
    out, _ = pad_packed_sequence(out)
    h = st[0] if kind == "LSTM" else st
    for b, n in enumerate(lengths):
        o1, s1 = ours(x[:n, b:b + 1])
        torch.testing.assert_close(out[:n, b:b + 1], o1, rtol=1e-12, atol=1e-12)
        assert (out[n:, b] == 0).all()
        torch.testing.assert_close(h[:, b:b + 1], s1[0] if kind == "LSTM" else s1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_unbatched_input(kind):
    ref, ours = _pair(kind, 3, 4, F64, "cpu", num_layers=2)
    x = torch.randn(5, 3, dtype=F64, generator=_gen(4))
    h = torch.randn(2, 4, dtype=F64, generator=_gen(5))
    hx = (h, h * 0.5) if kind == "LSTM" else h
    for args in ((x,), (x, hx)):
        a, sa = ours(*args)
        b, sb = ref(*args)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for p, q in zip(sa if kind == "LSTM" else (sa,), sb if kind == "LSTM" else (sb,)):
            assert p.shape == q.shape == (2, 4)
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dropout_between_layers(kind):
    """dropout > 0 in training: torch draws one mask per layer output (all but the last) with the same
    generator calls, so the same seed gives the same result; eval ignores dropout; the masks differ
    from call to call."""
    ref, ours = _pair(kind, 4, 5, F64, "cpu", num_layers=3, dropout=0.5)
    x = torch.randn(6, 3, 4, dtype=F64, generator=_gen(6))
    torch.manual_seed(7)
    a = ours(x)[0]
    torch.manual_seed(7)
    b = ref(x)[0]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not torch.equal(ours(x)[0], a)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-12, atol=1e-12)
    # statistics: the second layer sees half its inputs zeroed; with p -> 0 the output tends to eval's
    ours.train()
    ours.dropout = 1e-9
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-6, atol=1e-6)


# ---- cells ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", params(DTYPES, BACKENDS))
@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("B,I,H,bias", [(4, 5, 6, True), (1, 1, 1, True), (17, 13, 3, False), (3, 8, 16, True)])
def test_cells_match_torch(kind, B, I, H, bias, backend, dtype):
    device = _device(backend)
    ref, ours = _pair(kind, I, H, dtype, device, bias=bias)
    g = _gen(8)
    x = torch.randn(B, I, generator=g, dtype=F64)
    hs = [torch.randn(B, H, generator=g, dtype=F64) for _ in range(2 if kind == "LSTMCell" else 1)]

    def run(m, cast):
        xi = cast(x).requires_grad_()
        hi = [cast(h).requires_grad_() for h in hs]
        out = m(xi, tuple(hi) if len(hi) == 2 else hi[0])
        outs = list(out) if isinstance(out, tuple) else [out]
        gg = _gen(9)
        loss = sum((o * torch.randn(o.shape, generator=gg, dtype=F64).to(o)).sum() for o in outs)
        return outs + list(torch.autograd.grad(loss, [xi] + hi + list(m.parameters())))

    want = run(ref, lambda t: t.clone())
    with backends.use(backend):
        got = run(ours, lambda t: t.to(dtype=dtype, device=device))
        assert backends.last_dispatch().op in ("lstm_cell", "gru_cell")
    for a, b in zip(got, want):
        assert_rel(a, b, dtype, "gemm")


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell"])
def test_cells_unbatched_and_default_state(kind):
    ref, ours = _pair(kind, 3, 4, F64, "cpu")
    x = torch.randn(3, dtype=F64, generator=_gen(10))
    for args in ((x,), (x.unsqueeze(0),)):
        a, b = ours(*args), ref(*args)
        for p, q in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert p.shape == q.shape
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_functional_cells_match_vf():
    g = _gen(11)
    x, h, c = (torch.randn(3, n, dtype=F64, generator=g) for n in (5, 4, 4))
    w_ih, w_hh, b_ih, b_hh = (torch.randn(*s, dtype=F64, generator=g) for s in ((16, 5), (16, 4), (16,), (16,)))
    for got, want in zip(pyfastdl.functional.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh),
                         torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pyfastdl.functional.gru_cell(x, h, w_ih[:12], w_hh[:12]),
                               torch._VF.gru_cell(x, h, w_ih[:12], w_hh[:12], None, None), rtol=1e-12, atol=1e-12)


def test_cell_loop_trains_like_torch():
    """An LSTMCell language-model-like loop (state carried across steps) gives torch's gradients."""
    ref, ours = _pair("LSTMCell", 4, 6, F64, "cpu")
    xs = torch.randn(8, 2, 4, dtype=F64, generator=_gen(12))
    grads = []
    for m in (ref, ours):
        h = c = torch.zeros(2, 6, dtype=F64)
        loss = 0
        for x in xs:
            h, c = m(x, (h, c))
            loss = loss + h.square().sum()
        grads.append(torch.autograd.grad(loss, list(m.parameters())))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---- the ops: gradcheck, opcheck, output masks ---------------------------------------------------------

def _seq_args(kind, reverse, lengths=(4, 3, 3, 1), I=3, H=2, dtype=F64, grad=True, bias=True):
    g = _gen(13)
    G = 4 if kind == "lstm" else 3
    bs = torch.tensor([sum(1 for n in lengths if n > t) for t in range(max(lengths))], dtype=torch.int64)
    N, B = int(bs.sum()), len(lengths)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64).to(dtype).requires_grad_(grad)
    x, h0 = r(N, I), r(B, H)
    w_ih, w_hh = r(G * H, I), r(G * H, H)
    b_ih, b_hh = (r(G * H), r(G * H)) if bias else (None, None)
    if kind == "lstm":
        return (x, bs, h0, r(B, H), w_ih, w_hh, b_ih, b_hh, reverse)
    return (x, bs, h0, w_ih, w_hh, b_ih, b_hh, reverse)


def _cell_args(kind, B=3, I=4, H=3, dtype=F64, grad=True):
    g = _gen(14)
    G = 4 if kind == "lstm" else 3

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64).to(dtype).requires_grad_(grad)
    if kind == "lstm":
        return (r(B, I), r(B, H), r(B, H), r(G * H, I), r(G * H, H), r(G * H), r(G * H))
    return (r(B, I), r(B, H), r(G * H, I), r(G * H, H), r(G * H), r(G * H))


OPS = torch.ops.pyfastdl


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", [(4, 3, 3, 1), (3, 3)], ids=["packed", "padded"])
def test_gradcheck_seq(reverse, lengths):
    torch.autograd.gradcheck(lambda *a: LSTMSeqFunction.apply(*a, OPS), _seq_args("lstm", reverse, lengths))
    torch.autograd.gradcheck(lambda *a: GRUSeqFunction.apply(*a, OPS), _seq_args("gru", reverse, lengths))


def test_gradcheck_cells():
    torch.autograd.gradcheck(lambda *a: LSTMCellFunction.apply(*a, OPS), _cell_args("lstm"))
    torch.autograd.gradcheck(lambda *a: GRUCellFunction.apply(*a, OPS), _cell_args("gru"))


def test_gradcheck_without_bias():
    torch.autograd.gradcheck(lambda *a: LSTMSeqFunction.apply(*a, OPS), _seq_args("lstm", True, bias=False))
    torch.autograd.gradcheck(lambda *a: GRUSeqFunction.apply(*a, OPS), _seq_args("gru", False, bias=False))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_double_backward_raises(kind):
    m = (pyfastdl.nn.LSTM if kind == "lstm" else pyfastdl.nn.GRU)(3, 4).double()
    x = torch.randn(2, 2, 3, dtype=F64, requires_grad=True)
    y = m(x)[0].square().sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, x, create_graph=True)
    cell = (pyfastdl.nn.LSTMCell if kind == "lstm" else pyfastdl.nn.GRUCell)(3, 4).double()
    out = cell(x[0])
    y = (out[0] if kind == "lstm" else out).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, x, create_graph=True)


def _opcheck_cases():
    for kind in ("lstm", "gru"):
        for rev in (False, True):
            yield f"{kind}_seq_fwd", _seq_args(kind, rev, grad=False)
        yield f"{kind}_cell_fwd", _cell_args(kind, grad=False)


@pytest.mark.parametrize("case", list(_opcheck_cases()), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_opcheck_fwd(case):
    name, args = case
    torch.library.opcheck(getattr(OPS, name), args)


def _bwd_calls(kind, mask):
    """(op name, args) of the backward ops on saved forward results."""
    with torch.no_grad():
        sargs = _seq_args(kind, True, grad=False)
        cargs = _cell_args(kind, grad=False)
        g = _gen(15)
        if kind == "lstm":
            x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, rev = sargs
            out, hy, cy, gates, cs = OPS.lstm_seq_fwd(*sargs)
            go, ghy, gcy = (torch.randn(t.shape, generator=g, dtype=F64) for t in (out, hy, cy))
            seq = ("lstm_seq_bwd", (go, ghy, gcy, x, bs, h0, c0, w_ih, w_hh, out, gates, cs, rev, mask))
            hy1, cy1, gates1 = OPS.lstm_cell_fwd(*cargs)
            cell = ("lstm_cell_bwd", (torch.randn(hy1.shape, generator=g, dtype=F64), None, *cargs[:5], cy1, gates1,
                                      mask))
        else:
            x, bs, h0, w_ih, w_hh, b_ih, b_hh, rev = sargs
            out, hy, ws = OPS.gru_seq_fwd(*sargs)
            seq = ("gru_seq_bwd", (torch.randn(out.shape, generator=g, dtype=F64), None, x, bs, h0, w_ih, w_hh,
                                   out, ws, rev, mask))
            hy1, ws1 = OPS.gru_cell_fwd(*cargs)
            cell = ("gru_cell_bwd", (torch.randn(hy1.shape, generator=g, dtype=F64), *cargs[:4], ws1, mask))
    return [seq, cell]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_opcheck_bwd(kind):
    for name, args in _bwd_calls(kind, [True] * 6) + _bwd_calls(kind, [True, False, True, False, True, False]):
        torch.library.opcheck(getattr(OPS, name), args)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("mask", [[True, False, False, False, False, False], [False, True, False, False, False, True],
                                  [False, False, False, True, True, False], [False] * 6])
def test_output_mask_honoured(kind, mask):
    full = [getattr(OPS, n)(*a) for n, a in _bwd_calls(kind, [True] * 6)]
    part = [getattr(OPS, n)(*a) for n, a in _bwd_calls(kind, mask)]
    for f, p in zip(full, part):
        for m, a, b in zip(mask, f, p):
            if m:
                torch.testing.assert_close(b, a, rtol=0, atol=0)
            else:
                assert b is None


# ---- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_module_bad_input(kind):
    m = getattr(pyfastdl.nn, kind)(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError, match="input.size\\(-1\\) must be equal to input_size"):
        m(torch.randn(5, 2, 4))
    h = torch.zeros(2, 3, 4)
    with pytest.raises(RuntimeError, match="Expected hidden.* size"):
        m(x, (h, torch.zeros(2, 2, 4)) if kind == "LSTM" else h)
    with pytest.raises(ValueError, match="dtype|type"):
        m(x.double())
    h = torch.zeros(2, 2, 4, dtype=F64)
    with pytest.raises(RuntimeError, match="hx.*dtype"):
        m(x, (h, h) if kind == "LSTM" else h)
    with pytest.raises(ValueError, match="2D or 3D"):
        m(torch.randn(5, 2, 3, 1))
    with pytest.raises(RuntimeError, match="sorted"):  # torch's own check, before our op runs
        m(pack_padded_sequence(x, torch.tensor([3, 5]), enforce_sorted=True))


def test_lstm_proj_size_refused():
    m = pyfastdl.nn.LSTM(3, 4, proj_size=2)
    with pytest.raises(NotImplementedError, match="proj_size"):
        m(torch.randn(2, 1, 3))


def _raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_ops_bad_input_name_the_argument():
    x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, rev = _seq_args("lstm", False, grad=False)
    f = OPS.lstm_seq_fwd
    _raises("lstm_seq_fwd: expected input of shape \\(sum\\(batch_sizes\\)", f, x[:-1], bs, h0, c0, w_ih, w_hh,
            b_ih, b_hh, rev)
    _raises("lstm_seq_fwd: expected input of shape \\(rows, 3\\)", f, x[:, :2], bs, h0, c0, w_ih, w_hh, b_ih,
            b_hh, rev)
    _raises("lstm_seq_fwd: expected h0 of shape \\(batch_sizes\\[0\\]", f, x, bs, h0[:3], c0[:3], w_ih, w_hh, b_ih,
            b_hh, rev)
    _raises("expected c0 of shape", f, x, bs, h0, c0[:, :1], w_ih, w_hh, b_ih, b_hh, rev)
    _raises("expected w_hh of dtype", f, x, bs, h0, c0, w_ih, w_hh.float(), b_ih, b_hh, rev)
    _raises("expected b_hh of shape", f, x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh[:-1], rev)
    _raises("expected w_ih of shape", f, x, bs, h0, c0, w_ih[:-1], w_hh, b_ih, b_hh, rev)
    _raises("non-increasing batch_sizes", f, x, bs.flip(0), h0, c0, w_ih, w_hh, b_ih, b_hh, rev)
    _raises("batch_sizes of dtype int64", f, x, bs.int(), h0, c0, w_ih, w_hh, b_ih, b_hh, rev)
    _raises("batch_sizes >= 0", f, x, torch.tensor([4, 3, 3, -1]), h0, c0, w_ih, w_hh, b_ih, b_hh, rev)
    _raises("not supported", f, x.int(), bs, h0, c0, w_ih, w_hh, b_ih, b_hh, rev)
    cx, ch, cc, cwi, cwh, cbi, cbh = _cell_args("lstm", grad=False)
    _raises("lstm_cell_fwd: expected cx of shape", OPS.lstm_cell_fwd, cx, ch, cc[:1], cwi, cwh, cbi, cbh)
    _raises("lstm_cell_fwd: expected input of shape \\(batch, input_size\\)", OPS.lstm_cell_fwd, cx[:1], ch, cc,
            cwi, cwh, cbi, cbh)
    gx, gh, gwi, gwh, gbi, gbh = _cell_args("gru", grad=False)
    _raises("gru_cell_fwd: expected hx of dtype", OPS.gru_cell_fwd, gx, gh.float(), gwi, gwh, gbi, gbh)
    _raises("gru_cell_fwd: expected w_ih of shape \\(3 \\* hidden_size", OPS.gru_cell_fwd, gx, gh, cwi, gwh,
            gbi, gbh)


def test_functional_cell_bad_input():
    cell = pyfastdl.nn.LSTMCell(3, 4)
    with pytest.raises(RuntimeError, match="input_size|w_ih"):
        cell(torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="hx"):
        cell(torch.randn(2, 3), (torch.zeros(3, 4), torch.zeros(3, 4)))


# ---- NaN -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("where", [(0, 0, 0), (2, 1, 3), (4, 2, 4)], ids=["lane0", "middle", "last"])
def test_nan_propagates_like_torch(kind, where):
    ref, ours = _pair(kind, 5, 11, torch.float32, "cpu")
    ref = ref.float()
    x = torch.randn(5, 3, 5, generator=_gen(16))
    x[where] = float("nan")
    a, sa = ours(x)
    b, sb = ref(x)
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.isnan(a).any()
    for p, q in zip(sa if kind == "LSTM" else (sa,), sb if kind == "LSTM" else (sb,)):
        assert torch.equal(torch.isnan(p), torch.isnan(q))


@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_infinite_input_like_torch(value):
    ref, ours = _pair("LSTM", 3, 9, torch.float32, "cpu")
    ref = ref.float()
    x = torch.randn(3, 2, 3, generator=_gen(17))
    x[1, 0, 2] = value
    torch.testing.assert_close(ours(x)[0], ref(x)[0], equal_nan=True, rtol=1e-5, atol=1e-6)


# ---- threads, convert, state_dict, ModuleInfo ------------------------------------------------------------

def test_one_and_two_threads_agree():
    ref, ours = _pair("LSTM", 16, 64, torch.float32, "cpu", num_layers=2)
    x = torch.randn(6, 64, 16, generator=_gen(18))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ours(x)[0]
        torch.set_num_threads(2)
        b = ours(x)[0]
    finally:
        torch.set_num_threads(n)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)  # the BLAS may block differently


def test_convert_and_state_dict_round_trip():
    model = torch.nn.Sequential(torch.nn.LSTM(3, 4), torch.nn.GRU(4, 4), torch.nn.LSTMCell(3, 4),
                                torch.nn.GRUCell(3, 4))
    sd = copy.deepcopy(model.state_dict())
    pyfastdl.convert(model)
    assert [type(m) for m in model] == [pyfastdl.nn.LSTM, pyfastdl.nn.GRU, pyfastdl.nn.LSTMCell, pyfastdl.nn.GRUCell]
    assert model.state_dict().keys() == sd.keys()
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    ours = pyfastdl.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert "weight_hh_l1_reverse" in ours.state_dict()


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_module_info_samples(kind):
    """PyTorch's ModuleInfo samples on pyfastdl's module with torch's weights, training and eval (strict):
    outputs, states and the gradients of the inputs and parameters."""
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_modules import module_db
    info = next(m for m in module_db if m.module_cls is getattr(torch.nn, kind))
    n = 0
    for training in (True, False):
        for mi in info.module_inputs_func(info, device="cpu", dtype=F64, requires_grad=True, training=training):
            ci, fi = mi.constructor_input, mi.forward_input
            if ci.kwargs.get("proj_size", 0):
                continue
            torch.manual_seed(0)
            theirs = getattr(torch.nn, kind)(*ci.args, **ci.kwargs).to(F64).train(training)
            ours = getattr(pyfastdl.nn, kind)(*ci.args, **ci.kwargs).to(F64).train(training)
            ours.load_state_dict(theirs.state_dict())
            outs = []
            for m in (theirs, ours):
                args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                        for a in fi.args]
                torch.manual_seed(1)
                out = m(*args, **fi.kwargs)
                flat = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
                leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad] + list(m.parameters())
                loss = sum(t.sum() for t in flat if t.is_floating_point())
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                outs.append(flat + [g for g in grads if g is not None])
            assert len(outs[0]) == len(outs[1])
            for a, b in zip(*outs):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            n += 1
    assert n >= 4


# ---- the CPU time loop split over threads by batch rows (csrc/cpu/rnn.cpp, row_parts) ---------------------
# With B >= 8 and enough work the sequence ops give each thread a contiguous block of batch rows for the
# whole time loop (no barrier per step); packed lengths move the split point (it balances the rows' step
# counts). These shapes select that path at 2 threads: H not a multiple of 8 or 16, uneven lengths, both
# directions, 2 layers, every gradient.

def _two_threads(fn):
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        return fn()
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("T,B,H,packed", [(16, 11, 67, True), (7, 8, 13, False), (5, 23, 40, True), (1, 9, 33, False)],
                         ids=["T16-B11-H67-packed", "T7-B8-H13", "T5-B23-H40-packed", "T1-B9-H33"])
def test_cpu_row_split_matches_torch(kind, T, B, H, packed, dtype):
    lengths = [max(1, T - (b * T) // B) for b in range(B)] if packed else None
    if packed:  # unsorted, as a data loader gives them
        lengths = lengths[1::2] + lengths[0::2]
    _two_threads(lambda: _compare(kind, "cpu", dtype, T, B, 5, H, lengths=None if lengths is None else
                                  torch.tensor(lengths), enforce_sorted=False, num_layers=2, bidirectional=True))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", [(9, 9, 8, 6, 6, 5, 3, 2, 2, 1, 1), (4,) * 8], ids=["packed", "padded"])
def test_cpu_row_split_equals_one_thread(kind, reverse, lengths):
    """The row split (2 threads) computes every row as the single-threaded loop does."""
    args = _seq_args(kind, reverse, lengths, I=3, H=21, grad=False)
    fwd, bwd = getattr(OPS, f"{kind}_seq_fwd"), getattr(OPS, f"{kind}_seq_bwd")
    g = _gen(21)

    def run():
        out = fwd(*args)
        go = torch.randn(out[0].shape, generator=_gen(22), dtype=F64)
        ghy = torch.randn(out[1].shape, generator=_gen(23), dtype=F64)
        if kind == "lstm":
            x, bs, h0, c0, w_ih, w_hh, _, _, rev = args
            grads = bwd(go, ghy, ghy * 0.5, x, bs, h0, c0, w_ih, w_hh, out[0], out[3], out[4], rev, [True] * 6)
        else:
            x, bs, h0, w_ih, w_hh, _, _, rev = args
            grads = bwd(go, ghy, x, bs, h0, w_ih, w_hh, out[0], out[2], rev, [True] * 6)
        return list(out) + list(grads)
    del g
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, two):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-13)  # the BLAS GEMMs may block differently


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_gradcheck_seq_row_split(reverse):
    """float64 gradcheck at a size the row split takes (B = 8, H = 16 at 2 threads)."""
    lengths = (4, 4, 4, 3, 3, 2, 2, 1)
    _two_threads(lambda: torch.autograd.gradcheck(lambda *a: LSTMSeqFunction.apply(*a, OPS),
                                                  _seq_args("lstm", reverse, lengths, I=2, H=16)))
    _two_threads(lambda: torch.autograd.gradcheck(lambda *a: GRUSeqFunction.apply(*a, OPS),
                                                  _seq_args("gru", reverse, lengths, I=2, H=16)))


# ---- the whole-sequence GEMMs (csrc/cpu/rnn.cpp, seq_mm): the packed micro-kernel or ATen's BLAS ------

class _seq_gemm:
    """with _seq_gemm("own"): the CPU LSTM/GRU whole-sequence GEMM mode, restored afterwards."""

    def __init__(self, mode):
        self.mode = mode

    def __enter__(self):
        self.old = OPS.rnn_cpu_gemm(self.mode)

    def __exit__(self, *exc):
        OPS.rnn_cpu_gemm(self.old)


@pytest.mark.parametrize("mode", ["own", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("T,B,I,H,kw", [
    (4, 5, 3, 7, dict(bidirectional=True)),        # tails of the 6-row blocks and of the panels
    (9, 13, 37, 33, dict(num_layers=2, bias=False)),
    (30, 7, 50, 70, dict()),                       # more rows (T B = 210) than one 48-row task
    (3, 2, 1, 1, dict()),
], ids=["tails", "no-bias", "rows", "tiny"])
def test_seq_gemm_modes_match_torch(mode, kind, T, B, I, H, kw, dtype):
    lengths = [T - (b * (T - 1)) // max(B - 1, 1) for b in range(B)]  # packed, uneven
    with _seq_gemm(mode):
        _compare(kind, "cpu", dtype, T, B, I, H, **kw)
        assert OPS.rnn_cpu_gemm("last") == mode
        _compare(kind, "cpu", dtype, T, B, I, H, lengths=lengths, **kw)
        assert OPS.rnn_cpu_gemm("last") == mode


def test_seq_gemm_own_bits_do_not_depend_on_the_thread_count():
    old = torch.get_num_threads()
    res = []
    try:
        with _seq_gemm("own"):
            for n in (1, max(2, old)):
                torch.set_num_threads(n)
                _, ours = _pair("LSTM", 40, 50, torch.float32, "cpu", num_layers=2)
                res.append(_run(ours, torch.randn(20, 9, 40, generator=_gen(3), dtype=F64).float(), None, None, False, True))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_seq_gemm_auto_rule():
    """auto: own on the AVX-512 table of an AMD CPU (MKL runs its AVX2 code there), BLAS elsewhere."""
    info = dict(item.partition("=")[::2] for item in OPS.build_info().split(";"))
    try:
        with open("/proc/cpuinfo") as f:
            amd = "AuthenticAMD" in f.read()
    except OSError:
        amd = False
    with _seq_gemm("auto"):
        _compare("GRU", "cpu", torch.float32, 3, 2, 4, 5)
        assert OPS.rnn_cpu_gemm("last") == ("own" if amd and info["cpu_capability"] == "AVX512" else "blas")


def test_seq_gemm_bad_mode_is_a_clear_error():
    with pytest.raises(RuntimeError, match="rnn_cpu_gemm: expected mode"):
        OPS.rnn_cpu_gemm("fast")
    assert OPS.rnn_cpu_gemm("") in ("auto", "own", "blas")


def test_seq_gemm_own_accuracy_holds_at_long_sums():
    """The weight gradients sum over T * B rows (here 8192): the own GEMM sums K in chunks (each from
    zero in registers, then added), so its error against float64 stays within 2x BLAS's. One
    sequential sum gave 5-7x (1.7e-6 against 3.6e-7 at T100 B64 H512)."""
    T, B, I, H = 256, 32, 24, 40
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H).to(F64)
    x = torch.randn(T, B, I, generator=_gen(5), dtype=F64)
    want = _run(ref, x, None, None, False, True)
    errs = {}
    for mode in ("own", "blas"):
        with _seq_gemm(mode):
            _, ours = _pair("LSTM", I, H, torch.float32, "cpu")
            got = _run(ours, x.float(), None, None, False, True)
            assert OPS.rnn_cpu_gemm("last") == mode
        errs[mode] = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want)]
    for own, blas in zip(errs["own"], errs["blas"]):
        assert own <= 2 * blas + 1e-7, errs
