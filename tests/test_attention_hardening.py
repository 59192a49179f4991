"""Attention hardening (issue 9): NaN / Inf as torch, the float attn_mask's gradient, double
backward, thread-count determinism, empty sizes, concurrent Python threads, property tests and
opcheck of the backward op's output_mask (issue 8).

The reference is torch's math SDPA (torch.nn.functional.scaled_dot_product_attention under
SDPBackend.MATH). The kernels run through pyfastdl.functional (strict mode: a fallback raises) or
through AttentionFunction / the ops directly where functional's own argument handling is not the
point (E = 0, H = 0, non-contiguous 4-D inputs)."""
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyfastdl
import pyfastdl.functional as PF
from pyfastdl import backends
from pyfastdl.autograd.attention import AttentionFunction

from helpers import MARKS

BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("triton", id="triton", marks=MARKS["triton"])]


def torch_math(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def ops_of(backend):
    return backends.ops(backend, "attention")


def assert_same(out, ref, what, rtol, atol):
    """Same NaN positions, same infinities, finite values close."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (
        f"{what}: NaN at {torch.isnan(out).nonzero().tolist()[:8]} vs torch "
        f"{torch.isnan(ref).nonzero().tolist()[:8]} ({torch.isnan(out).sum()} vs {torch.isnan(ref).sum()})")
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=True, msg=what)


# ---- 1. NaN and Inf as torch (forward and backward) -----------------------------------------------
# Sizes: CPU S = 300 spans two key blocks (256 + 44: SIMD lanes of 8 / 16 and a tail), L = 130 two
# query blocks; the interpreter's Triton blocks are 32 x 64, so L = 40, S = 70 span two of each.
SIZES = {"cpu": (2, 130, 300, 19), "triton": (2, 40, 70, 16)}
VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}


def _positions(S):
    # key (or mask column) index: vector lane 0, another lane, the tail, a key the mask hides
    return {"lane0": 0, "lane3": 3, "tail": S - 1, "masked": S - 1}


def _nan_cases():
    cases = []
    for t in ("q", "k", "v", "mask"):
        for val in VALUES:
            for pos in ("lane0", "lane3", "tail", "masked"):
                masks = ("float",) if t == "mask" else ("none", "causal", "bool") if pos == "masked" else ("none",)
                if t == "mask" and pos == "masked":
                    continue
                for m in masks:
                    if pos == "masked" and m == "none":
                        continue
                    cases.append((t, val, pos, m))
    return cases


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t,val,pos,mask", _nan_cases(), ids=lambda x: str(x))
def test_nan_inf_as_torch(backend, t, val, pos, mask):
    """A NaN / +inf / -inf in q, k, v or a float mask, at SIMD lane 0, another lane, the tail or a
    masked key: out and the gradients of q, k, v (and of the float mask) have torch's NaN pattern
    and values. Before the fix a NaN score in lane 0 of a block marked the block fully masked
    (max(-inf, NaN) = -inf): a row of zeros, or at S = 300 a row computed from keys 256..299."""
    torch.manual_seed(0)
    H, L, S, E = SIZES[backend]
    q, k, v = torch.randn(1, H, L, E), torch.randn(1, H, S, E), torch.randn(1, H, S, E)
    j = _positions(S)[pos]
    kw = {}
    if mask == "causal":
        kw["is_causal"] = True  # top-left: key S - 1 > L - 1 is hidden from every row
    elif mask == "bool":
        m = torch.ones(L, S, dtype=torch.bool)
        m[:, j] = False
        kw["attn_mask"] = m
    elif mask == "float":
        kw["attn_mask"] = torch.randn(L, S)
    x = {"q": q, "k": k, "v": v}.get(t)
    if t == "q":
        x[0, 1, (L - 1) if pos == "masked" else 5, j % E] = VALUES[val]
    elif t in ("k", "v"):
        x[0, 1, j, (j * 7) % E] = VALUES[val]
    else:
        kw["attn_mask"][7, j] = VALUES[val]
    leaves = [q, k, v] + ([kw["attn_mask"]] if mask == "float" else [])
    for x in leaves:
        x.requires_grad_()
    grad_out = torch.randn(1, H, L, E)
    ref = torch_math(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    with backends.use(backend):
        out = PF.scaled_dot_product_attention(q, k, v, **kw)
        grads = torch.autograd.grad(out, leaves, grad_out)
    assert backends.last_dispatch().backend == backend
    assert_same(out, ref, "out", 1e-4, 1e-5)
    for name, g, r in zip(("grad_q", "grad_k", "grad_v", "grad_mask"), grads, ref_grads):
        assert_same(g, r, name, 1e-3, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_row_sees_inf_value(backend):
    """A fully masked row is 0 V: 0 where V is finite, NaN under an inf in V, as torch."""
    q, k, v = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16)
    v[0, 0, 2, 1] = float("inf")
    m = torch.tensor([[False, False, False], [True, True, False]])
    with backends.use(backend):
        out = PF.scaled_dot_product_attention(q, k, v, attn_mask=m)
    assert_same(out, torch_math(q, k, v, attn_mask=m), "out", 1e-5, 1e-6)


# ---- 2. the float attn_mask's gradient ----------------------------------------------------------------
MASK_SHAPES = [(5, 7), (1, 3, 5, 7), (2, 1, 1, 7)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
@pytest.mark.parametrize("others_need_grad", [True, False], ids=["qkv_grad", "mask_only"])
def test_mask_gradient_matches_torch(backend, shape, others_need_grad):
    """A learnable float mask (a position bias) gets torch's gradient, summed over the dimensions
    it broadcast; also when nothing else needs a gradient (before: b.grad stayed None)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 7, 16), torch.randn(2, 3, 7, 16)
    b = torch.randn(shape, requires_grad=True)
    for x in (q, k, v):
        x.requires_grad_(others_need_grad)
    grad_out = torch.randn(2, 3, 5, 16)
    leaves = [b] + ([q, k, v] if others_need_grad else [])
    ref = torch.autograd.grad(torch_math(q, k, v, attn_mask=b), leaves, grad_out)
    with backends.use(backend):
        got = torch.autograd.grad(PF.scaled_dot_product_attention(q, k, v, attn_mask=b), leaves, grad_out)
    assert backends.last_dispatch().backend == backend
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_mask_gradcheck_float64(shape):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    b = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: PF.scaled_dot_product_attention(*a), (q, k, v, b))
    assert torch.autograd.gradcheck(lambda b: PF.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), b),
                                    (b,))


def test_mask_gradient_with_dropout_and_valid_lens():
    """dS is the mask's gradient with dropout too (the backward regenerates the mask), and in a row
    that valid_lens makes constant (q, k get nothing there, the mask still does): the mask's gradient
    is the score gradient the kernel uses for q, checked through d(scores)/d(mask) = identity by
    comparing with the reference path through autograd."""
    torch.manual_seed(0)
    ops = ops_of("cpu")
    q, k, v = torch.randn(2, 2, 9, 8, dtype=torch.float64), torch.randn(2, 2, 11, 8, dtype=torch.float64), \
        torch.randn(2, 2, 11, 8, dtype=torch.float64)
    b = torch.randn(2, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    vl = torch.tensor([0, 6])
    out = AttentionFunction.apply(q, k, v, b, vl, False, 0.3, 0.0, 0, ops)
    g = torch.randn_like(out)
    got, = torch.autograd.grad(out, b, g)
    ref, = torch.autograd.grad(pyfastdl.reference.sdpa_like_torch(q, k, v, b, scale=0.3, valid_lens=vl), b, g)
    torch.testing.assert_close(got, ref)
    # dropout: gradcheck of the mask alone with a fixed seed (the same mask in every call)
    bd = torch.randn(1, 2, 9, 11, dtype=torch.float64, requires_grad=True)
    fn = lambda bd: AttentionFunction.apply(q[:1], k[:1], v[:1], bd, None, False, 0.3, 0.3, 1234, ops)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (bd,))


# ---- 3. double backward ---------------------------------------------------------------------------------
def test_double_backward_gradgradcheck():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64, requires_grad=True) for n in (3, 5, 5))
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda *a: PF.scaled_dot_product_attention(*a), (q, k, v, b))
    assert torch.autograd.gradgradcheck(lambda *a: PF.scaled_dot_product_attention(*a, is_causal=True), (q, k, v))


def test_gradient_penalty_matches_torch():
    """WGAN-GP style: a penalty on d out / d x trains through create_graph=True (before: the
    gradient lacked its graph and the penalty was silently dropped). Without create_graph the
    kernel computes the gradients; with it the reference does, visibly."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)
    grads = {}
    for name, fn in (("torch", torch_math), ("pyfastdl", PF.scaled_dot_product_attention)):
        w.grad = None
        q = x @ w
        y = fn(q, x, x, is_causal=True)
        gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        assert gx.requires_grad
        ((gx.norm() - 1) ** 2).backward()
        grads[name] = w.grad.clone()
        if name == "pyfastdl":
            assert backends.last_dispatch().op == "scaled_dot_product_attention_double_backward"
    torch.testing.assert_close(grads["pyfastdl"], grads["torch"])
    # first order without create_graph: the kernel, the same values
    y = PF.scaled_dot_product_attention(x @ w, x, x, is_causal=True)
    g1, = torch.autograd.grad(y.square().sum(), x)
    assert backends.last_dispatch().op == "scaled_dot_product_attention" and not g1.requires_grad
    g2, = torch.autograd.grad(torch_math(x @ w, x, x, is_causal=True).square().sum(), x)
    torch.testing.assert_close(g1, g2)


def test_double_backward_with_dropout_refuses():
    q = torch.randn(1, 1, 4, 8, requires_grad=True)
    out = PF.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    with pytest.raises(RuntimeError, match="double backward.*dropout_p"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


# ---- 4. thread-count determinism, empty sizes -------------------------------------------------------------
DET_SHAPES = [(1, 1, 300, 300, 64, False), (1, 2, 300, 300, 64, True), (2, 3, 129, 257, 32, False),
              (1, 1, 1000, 700, 16, True), (1, 1, 128, 1100, 64, False)]


@pytest.mark.parametrize("B,H,L,S,E,causal", DET_SHAPES, ids=str)
def test_same_bits_with_1_and_2_threads(B, H, L, S, E, causal):
    """torch.set_num_threads(1) and (2) give the same bits, forward and backward (every task's BLAS
    runs single-threaded on 64-byte aligned scratch; the backward's dQ partitions depend on the
    shapes only and are summed in a fixed order)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, E)
    mask = None if causal else torch.randn(L, S)
    g = torch.randn(B, H, L, E)
    ops = ops_of("cpu")
    results = []
    before = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            m4 = None if mask is None else mask.expand(B, H, L, S)
            out, lse = ops.attention_fwd(q, k, v, m4, None, causal, 0.125, 0.0, 0, 0)
            grads = ops.attention_bwd(g, q, k, v, out, lse, m4, None, causal, 0.125, 0.0, 0, 0,
                                      [True, True, True, mask is not None])
            results.append((out, lse) + tuple(grads))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[0], results[1]):
        assert torch.equal(a, b)


EMPTY = {"E=0": ((2, 3, 4, 0), (2, 3, 5, 0), (2, 3, 5, 6)), "H=0": ((2, 0, 4, 8), (2, 0, 5, 8), (2, 0, 5, 6)),
         "L=0": ((2, 3, 0, 8), (2, 3, 5, 8), (2, 3, 5, 6)), "S=0": ((2, 3, 4, 8), (2, 3, 0, 8), (2, 3, 0, 6)),
         "Ev=0": ((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 5, 0)), "B=0": ((0, 3, 4, 8), (0, 3, 5, 8), (0, 3, 5, 6))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(EMPTY), ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_empty_sizes_as_torch(backend, case, causal):
    """E = 0 (scores 0: out is the mean of v; before: an ill-formed BLAS call on the CPU, and
    functional divided by zero), H = 0 (before: refused), L, S, Ev, B = 0: torch's outputs and
    gradients."""
    dtype = torch.float64 if backend == "cpu" else torch.float32
    q, k, v = (torch.randn(s, dtype=dtype, requires_grad=True) for s in EMPTY[case])
    ref = torch_math(q, k, v, is_causal=causal, scale=0.5)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g, allow_unused=True)
    out = AttentionFunction.apply(q, k, v, None, None, causal, 0.5, 0.0, 0, ops_of(backend))
    grads = torch.autograd.grad(out, (q, k, v), g, allow_unused=True)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, torch.zeros_like(a) if r is None else r)


# ---- 5. concurrent Python threads ---------------------------------------------------------------------------
def test_four_python_threads_match_single_thread():
    torch.manual_seed(0)
    inputs = [tuple(torch.randn(1, 2, n, 32) for n in (97, 130, 130)) + (torch.randn(97, 130),) for _ in range(4)]
    ops = ops_of("cpu")

    def run(q, k, v, m):
        m4 = m.expand(1, 2, 97, 130)
        out, lse = ops.attention_fwd(q, k, v, m4, None, False, 0.2, 0.0, 0, 0)
        return (out,) + tuple(ops.attention_bwd(out, q, k, v, out, lse, m4, None, False, 0.2, 0.0, 0, 0,
                                                [True, True, True, True]))

    single = [run(*x) for x in inputs]
    got = [None] * 4

    def worker(i):
        for _ in range(3):
            got[i] = run(*inputs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s, g in zip(single, got):
        for a, b in zip(s, g):
            assert torch.equal(a, b)


# ---- 6. property tests against torch's math SDPA (float64, CPU kernel) ----------------------------------------
def _layout(draw, shape, kind):
    """A tensor of `shape` laid out as kind: contiguous, transposed (heads and rows swapped),
    sliced (every other element of a wider last dim, storage offset 1), or expanded over B."""
    B, H, N, D = shape
    if kind == "transposed":
        return torch.randn(B, N, H, D, dtype=torch.float64).transpose(1, 2)
    if kind == "sliced":
        return torch.randn(B, H, N, 2 * D + 1, dtype=torch.float64)[..., 1::2]
    if kind == "expanded":
        return torch.randn(1, H, N, D, dtype=torch.float64).expand(B, H, N, D)
    return torch.randn(shape, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_property_matches_torch_math(data):
    B = data.draw(st.integers(0, 3), "B")
    Hk = data.draw(st.integers(0, 3), "Hk")
    G = data.draw(st.integers(1, 2), "group")
    L = data.draw(st.sampled_from([0, 1, 2, 7, 33, 129, 260]), "L")
    S = data.draw(st.sampled_from([0, 1, 3, 16, 64, 257, 300]), "S")
    E = data.draw(st.sampled_from([0, 1, 5, 16]), "E")
    Ev = data.draw(st.sampled_from([0, 1, 8]), "Ev")
    kinds = ["contiguous", "transposed", "sliced", "expanded"]
    Hq = Hk * G
    q = _layout(data, (B, Hq, L, E), data.draw(st.sampled_from(kinds), "q layout"))
    k = _layout(data, (B, Hk, S, E), data.draw(st.sampled_from(kinds), "k layout"))
    v = _layout(data, (B, Hk, S, Ev), data.draw(st.sampled_from(kinds), "v layout"))
    mask_kind = data.draw(st.sampled_from(["none", "causal", "bool", "float"]), "mask")
    scale = data.draw(st.sampled_from([None, 0.3]), "scale")
    sc = scale if scale is not None else (1.0 if E == 0 else 1 / math.sqrt(E))
    m4 = mask = None
    if mask_kind == "bool":
        mask = torch.rand(L, S) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(1, Hq, L, S, dtype=torch.float64)
    leaves = [q, k, v] + ([mask] if mask_kind == "float" else [])
    for x in leaves:
        x.requires_grad_()
    if mask is not None:
        m4 = mask.expand(B, Hq, L, S)
    causal = mask_kind == "causal"
    ref = torch_math(q, k, v, attn_mask=mask, is_causal=causal, scale=sc, enable_gqa=G > 1)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, g, allow_unused=True)
    out = AttentionFunction.apply(q, k, v, m4, None, causal, sc, 0.0, 0, ops_of("cpu"))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    for x, a, r in zip(leaves, grads, ref_grads):
        a = torch.zeros_like(x) if a is None else a
        r = torch.zeros_like(x) if r is None else r
        torch.testing.assert_close(a, r)


# ---- 7. opcheck and output_mask ---------------------------------------------------------------------------
MASKS4 = [[True, True, True, False], [True, False, False, False], [False, True, False, False],
          [False, False, True, False], [False, False, False, True], [True, True, True, True],
          [False, False, False, False]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output_mask", MASKS4, ids=str)
def test_output_mask_computes_what_is_asked(backend, output_mask):
    """Each gradient asked for equals the full backward's; the others are empty (0,) tensors;
    opcheck (schema, fake tensors) passes for every mask."""
    torch.manual_seed(0)
    ops = ops_of(backend)
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 8)
    m = torch.randn(1, 2, 5, 6)
    out, lse = ops.attention_fwd(q, k, v, m, None, False, 0.3, 0.0, 0, 0)
    args = (torch.randn_like(out), q, k, v, out, lse, m, None, False, 0.3, 0.0, 0, 0)
    full = ops.attention_bwd(*args, [True, True, True, True])
    part = ops.attention_bwd(*args, output_mask)
    for f, p, need in zip(full, part, output_mask):
        if need:
            assert torch.equal(f, p)
        else:
            assert p.shape == (0,)
    utils = ("test_schema", "test_faketensor") if backend == "triton" else \
        ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.attention_bwd, args + (output_mask,), test_utils=utils)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_gradient_needs_a_float_mask(backend):
    ops = ops_of(backend)
    q = torch.randn(1, 1, 4, 16)
    out, lse = ops.attention_fwd(q, q, q, None, None, False, 0.3, 0.0, 0, 0)
    for m in (None, torch.ones(1, 1, 4, 4, dtype=torch.bool)):
        with pytest.raises(RuntimeError, match=r"output_mask\[3\].*floating-point attn_mask"):
            ops.attention_bwd(out, q, q, q, out, lse, m, None, False, 0.3, 0.0, 0, 0, [True, True, True, True])


def test_opcheck_cpu_ops_with_float_mask_and_empty_heads():
    q, k, v = torch.randn(2, 2, 5, 8, dtype=torch.float64), torch.randn(2, 1, 6, 8, dtype=torch.float64), \
        torch.randn(2, 1, 6, 4, dtype=torch.float64)
    m = torch.randn(5, 6, dtype=torch.float64).expand(2, 2, 5, 6)
    ops = torch.ops.pyfastdl
    out, lse = ops.attention_fwd(q, k, v, m, None, False, 0.3, 0.0, 0, 0)
    torch.library.opcheck(ops.attention_fwd, (q, k, v, m, None, False, 0.3, 0.0, 0, 0))
    torch.library.opcheck(ops.attention_bwd, (torch.randn_like(out), q, k, v, out, lse, m, None, False, 0.3, 0.1,
                                              7, 0, [True, False, True, True]))
    e = torch.randn(2, 0, 5, 8)
    torch.library.opcheck(ops.attention_fwd, (e, e, e, None, None, True, 0.3, 0.0, 0, 0))


# ---- 5. per-key skipping (issue 12): blocks end at the last key their queries can see ------------------
@pytest.mark.parametrize("L,S,lens,causal", [
    (20, 512, [1, 255, 256, 257, 300, 511], False),  # key tails inside the first and the second block
    (300, 300, None, True), (200, 300, None, True), (300, 200, None, True),  # causal, L = S and L != S
    (260, 520, [259, 260, 519, 1], True),  # both: min of the causal edge and the length
], ids=str)
def test_skipped_keys_change_nothing(L, S, lens, causal):
    """The CPU kernels compute keys only up to the last one a query block can see (1-D valid_lens,
    causal), cut at single-key granularity inside a 256-key block: out, lse and every gradient
    against torch's math SDPA with the equivalent boolean mask in float64, and dK, dV exactly 0 on
    the keys no query sees."""
    torch.manual_seed(5)
    B, H, E = (len(lens) if lens else 2), 2, 16
    q, k, v = (torch.randn(B, H, n, E, dtype=torch.float64, requires_grad=True) for n in (L, S, S))
    keep = torch.ones(B, 1, L, S, dtype=torch.bool)
    if lens is not None:
        keep &= (torch.arange(S) < torch.tensor(lens)[:, None])[:, None, None, :]
    if causal:
        keep &= torch.ones(L, S, dtype=torch.bool).tril()
    ref = torch_math(q, k, v, attn_mask=keep)  # every row sees key 0: no fully masked row
    g = torch.randn_like(ref)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g)
    vl = None if lens is None else torch.tensor(lens)
    out = PF.scaled_dot_product_attention(q, k, v, is_causal=causal, valid_lens=vl)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), g)
    for ours, theirs in ((out, ref), (gq, rq), (gk, rk), (gv, rv)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    dead = (~keep.any(dim=2))[..., None].expand_as(gk)  # keys no query of the batch row sees
    assert torch.count_nonzero(gk[dead]) == 0 and torch.count_nonzero(gv[dead]) == 0


def test_skipped_keys_keep_the_dropout_mask():
    """With dropout, trimming the masked keys of a block leaves the Philox keep mask of the others
    unchanged: valid_lens gives the same result as the equivalent boolean mask (which skips nothing)
    for the same seed."""
    B, H, L, S, E = 3, 2, 40, 520, 16
    lens = torch.tensor([300, 257, 5])
    q, k, v = (torch.randn(B, H, n, E, dtype=torch.float64) for n in (L, S, S))
    keep = (torch.arange(S) < lens[:, None])[:, None, None, :].expand(B, H, L, S)
    torch.manual_seed(11)
    a = PF.scaled_dot_product_attention(q, k, v, dropout_p=0.3, valid_lens=lens)
    torch.manual_seed(11)
    b = PF.scaled_dot_product_attention(q, k, v, dropout_p=0.3, attn_mask=keep)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
