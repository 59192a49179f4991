"""pyfastdl.functional.scaled_dot_product_attention against torch's (math backend, float64): masks,
causal with L != S, GQA, odd lengths, head dims, gradients; the notes' valid_lens and modules;
dropout statistics and forward/backward agreement; bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyfastdl
import pyfastdl.functional as PF
from pyfastdl import backends, reference as R

from helpers import DEVICE, GEMM_TOL as TOL, MARKS

# (B, Hq, Hk, L, S, E, Ev, causal, mask kind)
CASES = [
    (2, 2, 2, 7, 129, 16, 16, False, None),
    (1, 2, 2, 129, 7, 64, 64, True, None),
    (2, 4, 2, 33, 65, 64, 80, True, None),          # GQA, causal, L != S, E != Ev
    (2, 2, 2, 65, 40, 80, 80, False, "bool"),      # bool mask broadcast from (B, 1, 1, S)
    (1, 2, 1, 20, 150, 32, 32, False, "float"),    # additive mask (1, H, L, S), GQA
    (1, 1, 1, 1, 1, 16, 16, False, None),
    (2, 2, 2, 17, 17, 128, 128, False, "fullrow"),  # fully masked rows
]
CASE_IDS = [f"B{c[0]}H{c[1]}/{c[2]}-L{c[3]}S{c[4]}-E{c[5]}/{c[6]}" + ("-causal" if c[7] else "") + (f"-{c[8]}" if c[8] else "")
            for c in CASES]


def backend_params(dtypes):
    return [pytest.param(b, dt, marks=MARKS[b], id=f"{b}-{str(dt).replace('torch.', '')}")
            for b, dts in dtypes.items() for dt in dts]


BACKENDS = backend_params({"cpu": [torch.float32, torch.float64, torch.bfloat16, torch.float16], "cuda": [torch.float32, torch.bfloat16],
                           "triton": [torch.float32], "reference": [torch.float64]})


def make_case(case, device, dtype, seed=0):
    B, Hq, Hk, L, S, E, Ev, causal, kind = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, Hq, L, E), (B, Hk, S, E), (B, Hk, S, Ev)))
    mask = None
    if kind == "bool":
        mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    elif kind == "float":
        mask = torch.randn(1, Hq, L, S, generator=g, dtype=torch.float64)
    elif kind == "fullrow":
        mask = torch.ones(B, 1, L, S, dtype=torch.bool)
        mask[:, :, 3] = False
    mk = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    dmask = None if mask is None else mask.to(device=device, dtype=mask.dtype if kind != "float" else dtype)
    return (q, k, v, mask), (mk(q), mk(k), mk(v), dmask)


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert not torch.isnan(a).any()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item() if b.norm() > 0 else a.norm().item()


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_and_gradients_match_torch(backend, dtype, case):
    (q, k, v, mask), (qd, kd, vd, dmask) = make_case(case, DEVICE[backend], dtype)
    causal, gqa = case[7], case[1] != case[2]
    for t in (q, k, v):
        t.requires_grad_()
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    dout = torch.randn_like(ref)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), dout)
    with backends.use(backend):
        out = PF.scaled_dot_product_attention(qd, kd, vd, attn_mask=dmask, is_causal=causal, enable_gqa=gqa)
        assert backends.last_dispatch().backend == backend
        gq, gk, gv = torch.autograd.grad(out, (qd, kd, vd), dout.to(out))
    tol = TOL[dtype]
    assert rel(out, ref) < tol
    for ours, theirs in ((gq, rq), (gk, rk), (gv, rv)):
        assert rel(ours, theirs) < 10 * tol
    if case[8] == "fullrow":  # a query with no key: 0 out, 0 gradient (torch 2.14)
        assert out[:, :, 3].abs().max() == 0 and gq[:, :, 3].abs().max() == 0


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "cuda", "triton", "reference")])
@pytest.mark.parametrize("two_d", [False, True], ids=["valid_lens-1d", "valid_lens-2d"])
def test_notes_valid_lens_match_the_notes_dot_product_attention(backend, two_d):
    """The notes' DotProductAttention (masked_softmax with the -1e6 fill) on 3-D (N, L, d) inputs,
    including a valid length of 0 (every key weighs the same) and lengths beyond S."""
    device = DEVICE[backend]
    dtype = torch.float64 if backend in ("cpu", "reference") else torch.float32
    g = torch.Generator().manual_seed(1)
    N, L, S, d = 4, 9, 13, 16
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((N, L, d), (N, S, d), (N, S, 24)))
    lens = torch.tensor([3, 0, 13, 20]) if not two_d else torch.randint(0, 15, (N, L), generator=g)
    notes = R.DotProductAttention(0.0).eval()
    ref = notes(q, k, v, lens)
    qd, kd, vd = (t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v))
    with backends.use(backend):
        out = PF.scaled_dot_product_attention(qd, kd, vd, valid_lens=lens.to(device))
        assert backends.last_dispatch().backend == backend
    assert rel(out, ref) < TOL[dtype]
    # the gradients of the notes' code through autograd
    for t in (q, k, v):
        t.requires_grad_()
    ref = R.DotProductAttention(0.0).eval()(q, k, v, lens)
    dout = torch.randn_like(ref)
    with backends.use(backend):
        got = torch.autograd.grad(PF.scaled_dot_product_attention(qd, kd, vd, valid_lens=lens.to(device)),
                                  (qd, kd, vd), dout.to(device=device, dtype=dtype))
    for ours, theirs in zip(got, torch.autograd.grad(ref, (q, k, v), dout)):
        assert rel(ours, theirs) < 10 * TOL[dtype]


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "cuda", "triton")])
def test_dropout_keep_rate_and_backward_uses_the_forward_mask(backend):
    device, p = DEVICE[backend], 0.3
    dtype = torch.float64 if backend == "cpu" else torch.float32
    B, H, L, S, E = 1, 2, 64, 96, 16
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(B, H, n, E, generator=g, dtype=dtype).to(device) for n in (L, S))
    eye = torch.eye(S, dtype=dtype, device=device).expand(B, H, S, S)
    with backends.use(backend):
        P = PF.scaled_dot_product_attention(q, k, eye)  # v = I: out is the weight matrix itself
        torch.manual_seed(7)
        Pd = PF.scaled_dot_product_attention(q, k, eye, dropout_p=p)
    keep = Pd != 0
    rate = keep.double().mean().item()
    n = keep.numel()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), rate
    torch.testing.assert_close(Pd, torch.where(keep, P / (1 - p), torch.zeros_like(P)))
    # the same seed, real values: forward and backward follow that mask
    v = torch.randn(B, H, S, 8, generator=g, dtype=dtype).to(device)
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    with backends.use(backend):
        torch.manual_seed(7)
        out = PF.scaled_dot_product_attention(qd, kd, vd, dropout_p=p)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (qd, kd, vd), dout)
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    w = torch.softmax(qr @ kr.transpose(-1, -2) / math.sqrt(E), -1) * keep / (1 - p)
    ref = w @ vr
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel(out, ref) < tol
    for ours, theirs in zip(got, torch.autograd.grad(ref, (qr, kr, vr), dout)):
        assert rel(ours, theirs) < tol


def test_notes_transformer_encoder_with_pyfastdl_attention():
    """The notes' TransformerEncoder with pyfastdl.nn.DotProductAttention in every block gives the
    notes' output (eval mode) and its gradients."""
    torch.manual_seed(0)
    enc = R.TransformerEncoder(vocab_size=50, key_size=32, query_size=32, value_size=32, num_hiddens=32,
                               norm_shape=[32], ffn_num_input=32, ffn_num_hiddens=64, num_heads=4,
                               num_layers=2, dropout=0.1).double().eval()
    X = torch.randint(0, 50, (3, 11))
    lens = torch.tensor([11, 4, 0])
    ref = enc(X, lens)
    for blk in enc.blks:
        blk.attention.attention = pyfastdl.nn.DotProductAttention(0.1)
    out = enc.eval()(X, lens)
    assert backends.last_dispatch().backend == "cpu"
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_bad_input_raises_clearly():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 4)
    with pytest.raises(RuntimeError, match="head dim"):
        PF.scaled_dot_product_attention(q, torch.randn(1, 2, 6, 7), v)
    with pytest.raises(RuntimeError, match="sequence length"):
        PF.scaled_dot_product_attention(q, k, torch.randn(1, 2, 5, 4))
    with pytest.raises(RuntimeError, match="broadcastable"):
        PF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        PF.scaled_dot_product_attention(q, k, v, dropout_p=1.01)
    with pytest.raises(ValueError, match="dropout_p"):
        PF.scaled_dot_product_attention(q, k, v, dropout_p=-0.1)
    with pytest.raises(RuntimeError, match="is_causal"):
        PF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool), is_causal=True)
    with pytest.raises(RuntimeError, match="enable_gqa"):
        PF.scaled_dot_product_attention(torch.randn(1, 4, 5, 8), k, v)
    with pytest.raises(RuntimeError, match="valid_lens"):
        PF.scaled_dot_product_attention(q, k, v, valid_lens=torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match="q and k must have the same head dim"):  # the op's own check
        torch.ops.pyfastdl.attention_fwd(q, torch.randn(1, 2, 6, 7), v, None, None, False, 1.0, 0.0, 0, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["plain", "causal", "float-mask", "gqa-valid-lens", "dropout"])
def test_cpu_low_precision_is_the_float32_kernel_rounded_once(dtype, kind):
    """CPU bfloat16 / float16 run our float32 kernel on the inputs converted once (strict mode: no
    fallback): the output is the float32 kernel's output rounded to the dtype, bit for bit, and the
    gradients are the float32 backward's on the same (converted) tensors, rounded -- the mask's
    gradient in the mask's dtype. (A bfloat16 forward on a CPU with AVX512_BF16 runs the bf16 kernel
    in gemm mode auto -- tests/test_attention_bf16.py; mode "own" pins the float32 kernel here.)"""
    old = torch.ops.pyfastdl.attention_cpu_gemm("own")
    try:
        _low_precision_is_the_float32_kernel_rounded_once(dtype, kind)
    finally:
        torch.ops.pyfastdl.attention_cpu_gemm(old)


def _low_precision_is_the_float32_kernel_rounded_once(dtype, kind):
    g = torch.Generator().manual_seed(3)
    Hk = 1 if kind == "gqa-valid-lens" else 2
    q = torch.randn(2, 2, 19, 16, generator=g).to(dtype)
    k, v = (torch.randn(2, Hk, 23, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.randn(1, 2, 19, 23, generator=g).to(dtype).expand(2, 2, 19, 23) if kind == "float-mask" else None
    lens = torch.tensor([5, 23]) if kind == "gqa-valid-lens" else None
    causal, p, seed = kind == "causal", (0.3 if kind == "dropout" else 0.0), 11
    fwd, bwd = torch.ops.pyfastdl.attention_fwd, torch.ops.pyfastdl.attention_bwd
    out, lse = fwd(q, k, v, mask, lens, causal, 0.25, p, seed, 0)
    mask32 = None if mask is None else mask.float()
    out32, lse32 = fwd(q.float(), k.float(), v.float(), mask32, lens, causal, 0.25, p, seed, 0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(out, out32.to(dtype)) and torch.equal(lse, lse32)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    need = [True, True, True, mask is not None]
    grads = bwd(dout, q, k, v, out, lse, mask, lens, causal, 0.25, p, seed, 0, need)
    grads32 = bwd(dout.float(), q.float(), k.float(), v.float(), out.float(), lse, mask32, lens, causal, 0.25, p,
                  seed, 0, need)
    for ours, ref in zip(grads[:3], grads32[:3]):
        assert ours.dtype == dtype and torch.equal(ours, ref.to(dtype))
    if mask is not None:
        assert grads[3].dtype == dtype and torch.equal(grads[3], grads32[3].to(dtype))
    # through the drop-in function, strict: our kernel ran, and no less accurate than torch's own
    # bf16 / fp16 CPU kernel against float64
    if kind == "plain":
        qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
        res = PF.scaled_dot_product_attention(qd, kd, vd)
        assert backends.last_dispatch().backend == "cpu" and backends.last_dispatch().fallback is None
        ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        theirs = F.scaled_dot_product_attention(q, k, v)
        assert rel(res, ref64) <= 1.1 * rel(theirs, ref64) + 1e-4
        gq = torch.autograd.grad(res.sum(), qd, create_graph=True)[0]  # double backward works, in the dtype
        assert gq.dtype == dtype and gq.requires_grad
        assert torch.autograd.grad(gq.float().square().sum(), kd)[0].dtype == dtype


def test_opcheck_cpu_ops():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 4)
    out, lse = torch.ops.pyfastdl.attention_fwd(q, k, v, None, None, True, 0.3, 0.0, 0, 0)
    torch.library.opcheck(torch.ops.pyfastdl.attention_fwd, (q, k, v, None, None, True, 0.3, 0.0, 0, 0))
    torch.library.opcheck(torch.ops.pyfastdl.attention_bwd,
                          (torch.randn_like(out), q, k, v, out, lse, None, None, True, 0.3, 0.0, 0, 0))


def test_masked_softmax_is_the_notes():
    X = torch.randn(2, 3, 5, dtype=torch.float64)
    for lens in (torch.tensor([2, 0]), torch.tensor([[1, 3, 5], [0, 2, 4]])):
        torch.testing.assert_close(PF.masked_softmax(X, lens), R.masked_softmax(X.clone(), lens))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "causal"])
def test_multihead_attention_matches_torch(batch_first, masks):
    torch.manual_seed(0)
    E, H, N, L, S = 32, 4, 3, 7, 9
    kw = dict(batch_first=batch_first, dtype=torch.float64)
    theirs = torch.nn.MultiheadAttention(E, H, kdim=20, vdim=24, **kw) if masks == "none" else \
        torch.nn.MultiheadAttention(E, H, **kw)
    ours = pyfastdl.nn.MultiheadAttention(E, H, kdim=20, vdim=24, **kw) if masks == "none" else \
        pyfastdl.nn.MultiheadAttention(E, H, **kw)
    ours.load_state_dict(theirs.state_dict())
    kd, vd = (20, 24) if masks == "none" else (E, E)
    if masks == "causal":
        S = L
    shape = lambda n, d: (N, n, d) if batch_first else (n, N, d)  # noqa: E731
    q = torch.randn(*shape(L, E), dtype=torch.float64, requires_grad=True)
    k = torch.randn(*shape(S, kd), dtype=torch.float64, requires_grad=True)
    v = torch.randn(*shape(S, vd), dtype=torch.float64, requires_grad=True)
    args = {}
    if masks == "bool":
        args = dict(key_padding_mask=torch.tensor([[False] * S, [False] * (S - 2) + [True] * 2, [True] + [False] * (S - 1)]),
                    attn_mask=torch.rand(L, S) > 0.8)
        args["attn_mask"][:, 0] = False
        args["key_padding_mask"][:, 1] = False
    elif masks == "float":
        args = dict(attn_mask=torch.randn(N * H, L, S, dtype=torch.float64),
                    key_padding_mask=torch.randn(N, S, dtype=torch.float64))
    elif masks == "causal":
        args = dict(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64), is_causal=True)
    ref, _ = theirs(q, k, v, need_weights=False, **args)
    out, w = ours(q, k, v, need_weights=False, **args)
    assert w is None and backends.last_dispatch().backend == "cpu"
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    d = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v, ours.in_proj_weight if ours.in_proj_weight is not None
                                                   else ours.q_proj_weight), d),
                    torch.autograd.grad(ref, (q, k, v, theirs.in_proj_weight if theirs.in_proj_weight is not None
                                                   else theirs.q_proj_weight), d)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_multihead_attention_need_weights_runs_the_kernel():
    """torch's defaults (need_weights=True): pyfastdl's kernel, strict; weights as torch's
    (tests/test_attention_dropin.py compares them in every combination)."""
    m = pyfastdl.nn.MultiheadAttention(16, 2)
    x = torch.randn(5, 2, 16)
    out, w = m(x, x, x)
    assert w.shape == (2, 5, 5) and backends.last_dispatch().backend == "cpu"
