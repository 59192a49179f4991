"""The Triton attention ops (pyfastdl_triton::attention_fwd / attention_bwd,
triton_kernels/attention.py) called directly, against float64 references: torch's
scaled_dot_product_attention (math backend) for attn_mask / is_causal / GQA, and a dense
implementation of the contract in csrc/common/attention.h for valid_lens (the notes' -1e6 fill, a
row with valid length <= 0 weighs every key equally) and Philox dropout (the same keep mask, rebuilt with torch
integer ops). Forward out and lse, and grad_q, grad_k, grad_v of the backward op against
torch.autograd on the reference. Also: Philox-4x32-10 known-answer vectors, the kernel's dropout
mask bit for bit and its keep rate, argument checks, schema and fake-tensor registration.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set in conftest.py) or on a
GPU. Shapes are tiny (the interpreter runs every program in Python); L, S = 129 spans several
tiles with a ragged edge."""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from helpers import DEVICE, GEMM_TOL as TOL, MARKS, assert_schema_matches_cpp, rel_err

pytestmark = MARKS["triton"]

DEV = DEVICE["triton"]
# Relative error bounds ||x - ref|| / ||ref|| against float64. float32: float32 accumulation and
# IEEE float32 dots, measured ~2e-7. float16 / bfloat16: P and dS are rounded to the input dtype
# before their matmuls (as FlashAttention does), so the error is a few units of that dtype's
# rounding (2^-11, 2^-8; measured 4e-4, 7e-3: the interpreter truncates to bfloat16).


@pytest.fixture(scope="module")
def ops():
    import pyfastdl.triton_kernels.attention  # noqa: F401  (registers torch.ops.pyfastdl_triton)
    return torch.ops.pyfastdl_triton


@pytest.fixture(scope="module")
def module(ops):
    import pyfastdl.triton_kernels.attention as m
    return m


# ---- references ----------------------------------------------------------------------------------
def _expand_kv(t, Hq):
    return t.repeat_interleave(Hq // t.size(1), dim=1)


def sdpa_reference(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """torch's SDPA (math backend) in float64; is_causal with a mask is folded into the mask."""
    L, S = q.size(2), k.size(2)
    if is_causal and attn_mask is not None:
        tril = torch.ones(L, S, dtype=torch.bool).tril()
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask & tril
        else:
            attn_mask = attn_mask.masked_fill(~tril, float("-inf"))
        is_causal = False
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.double()
    with sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(
            q, _expand_kv(k, q.size(1)), _expand_kv(v, q.size(1)), attn_mask=attn_mask,
            is_causal=is_causal, scale=scale)


def masked_scores(q, k, attn_mask=None, valid_lens=None, is_causal=False, scale=None):
    """Scaled scores in float64 with the header's masks: -inf for attn_mask (bool) / is_causal,
    added float attn_mask, and the notes' valid_lens rule: scores at j >= valid_len replaced by
    -1e6 (so a row whose valid length is <= 0 weighs every key equally)."""
    L, S = q.size(2), k.size(2)
    scale = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    s = q @ _expand_kv(k, q.size(1)).transpose(-1, -2) * scale
    if valid_lens is not None:
        vl = valid_lens.view(-1, 1, 1, 1) if valid_lens.dim() == 1 else valid_lens[:, None, :, None]
        s = s.masked_fill(torch.arange(S) >= vl, -1e6)
        s = s.masked_fill(vl <= 0, 0.0)  # vl <= 0: -1e6 on the whole row, i.e. equal (constant) scores
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else s + attn_mask.double()
    if is_causal:
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    return s


def dense_reference(q, k, v, keep=None, p=0.0, **masks):
    """Softmax (rows with no key: 0), then dropout with the given keep mask, then @ v."""
    s = masked_scores(q, k, **masks)
    P = torch.softmax(s, -1).nan_to_num(0.0)
    if keep is not None:
        P = P * keep / (1 - p)
    return P @ _expand_kv(v, q.size(1))


def run_case(ops, q, k, v, ref_fn, attn_mask=None, valid_lens=None, is_causal=False, scale=None,
             dropout_p=0.0, seed=0, offset=0, tol=None):
    """Forward and backward of the ops against ref_fn (float64 autograd); lse against the
    float64 log-sum-exp of the masked scores."""
    tol = TOL[q.dtype] if tol is None else tol
    sc = 1 / math.sqrt(q.size(-1)) if scale is None else scale
    out, lse = ops.attention_fwd(q, k, v, attn_mask, valid_lens, is_causal, sc, dropout_p, seed,
                                 offset)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    ref = ref_fn(qd, kd, vd, attn_mask=cpu(attn_mask), is_causal=is_causal, scale=sc,
                 **({} if valid_lens is None else dict(valid_lens=valid_lens.cpu())))
    assert rel_err(out, ref) <= tol, ("out", rel_err(out, ref))

    lse_ref = torch.logsumexp(masked_scores(qd.detach(), kd.detach(), cpu(attn_mask),
                                            cpu(valid_lens), is_causal, sc), -1)
    empty = torch.isinf(lse_ref)
    assert torch.equal(torch.isinf(lse.cpu()), empty) and (lse.cpu()[empty] < 0).all()
    assert rel_err(lse.cpu()[~empty], lse_ref[~empty]) <= tol, "lse"

    grad_out = torch.randn_like(out)
    ref.backward(grad_out.cpu().double())
    grads = ops.attention_bwd(grad_out, q, k, v, out, lse, attn_mask, valid_lens, is_causal, sc,
                              dropout_p, seed, offset)
    for name, g, x, r in zip(("grad_q", "grad_k", "grad_v"), grads, (q, k, v),
                             (qd.grad, kd.grad, vd.grad)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert rel_err(g, r) <= tol, (name, rel_err(g, r))
    return out, lse, grads


def qkv(B, Hq, Hk, L, S, E, Ev, dtype=torch.float32):
    return (torch.randn(B, Hq, L, E, device=DEV, dtype=dtype),
            torch.randn(B, Hk, S, E, device=DEV, dtype=dtype),
            torch.randn(B, Hk, S, Ev, device=DEV, dtype=dtype))


# ---- float32 against torch's SDPA ----------------------------------------------------------------
# (B, Hq, Hk, L, S, E, Ev, is_causal)
SHAPES = {
    "plain-129x7-e64": (2, 2, 2, 129, 7, 64, 64, False),
    "plain-1x1-e16": (1, 2, 2, 1, 1, 16, 16, False),
    "plain-7x129-e80-ev16": (1, 2, 2, 7, 129, 80, 16, False),
    "causal-7x129-e16": (2, 2, 2, 7, 129, 16, 16, True),
    "causal-129x7-e80": (1, 2, 2, 129, 7, 80, 80, True),
    "causal-1x7-e16": (1, 1, 1, 1, 7, 16, 16, True),
    "gqa-causal-129x129": (1, 4, 2, 129, 129, 16, 16, True),
    "gqa-7x129-e64": (2, 4, 2, 7, 129, 64, 16, False),
    "head-e256": (1, 1, 1, 7, 9, 256, 256, False),  # the largest head dim
    "gqa-causal-e8-ev3": (1, 2, 1, 7, 9, 8, 3, True),  # below 16: padded
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_sdpa_float32(ops, case):
    torch.manual_seed(0)
    B, Hq, Hk, L, S, E, Ev, causal = SHAPES[case]
    run_case(ops, *qkv(B, Hq, Hk, L, S, E, Ev), sdpa_reference, is_causal=causal)


def _bool_mask(kind, B, H, L, S):
    g = torch.Generator().manual_seed(1)
    if kind == "11LS":  # broadcast from (1, 1, L, S)
        m = torch.rand(1, 1, L, S, generator=g) > 0.3
    elif kind == "B11S":  # broadcast from (B, 1, 1, S): key padding
        m = torch.rand(B, 1, 1, S, generator=g) > 0.3
        m[0, ..., 0] = False  # with is_causal, row 0 of batch 0 has no key left
    else:  # full (B, H, L, S) with fully masked rows
        m = torch.rand(B, H, L, S, generator=g) > 0.3
        m[0, 1, ::2] = False
        m[1, 0, -1] = False
    return m.expand(B, H, L, S).to(DEV)


@pytest.mark.parametrize("kind,causal,L,S", [("11LS", False, 7, 129), ("B11S", True, 33, 33),
                                              ("full", False, 129, 7)])
def test_bool_mask(ops, kind, causal, L, S):
    torch.manual_seed(0)
    q, k, v = qkv(2, 2, 2, L, S, 16, 64)
    m = _bool_mask(kind, 2, 2, L, S)
    _, lse, (dq, *_) = run_case(ops, q, k, v, sdpa_reference, attn_mask=m, is_causal=causal,
                                scale=0.3)
    if kind != "11LS":  # rows with no key: lse = -inf, out and grad_q 0 (checked against torch)
        assert torch.isinf(lse).any()
        assert (dq[torch.isinf(lse)] == 0).all()


@pytest.mark.parametrize("variant", ["dense", "strided-causal"])
def test_float_mask(ops, variant):
    """An additive float mask with -inf entries and a fully -inf row (-> out 0, lse -inf)."""
    torch.manual_seed(0)
    B, H, L, S = 2, 2, 7, 129
    q, k, v = qkv(B, H, H, L, S, 16, 16)
    m = torch.randn(B, H, L, S)
    m[torch.rand(B, H, L, S) < 0.2] = float("-inf")
    m[1, 1, 3] = float("-inf")
    m = m.to(DEV, torch.float32)
    if variant == "strided-causal":  # column-major (L, S) planes, and is_causal on top
        m = m.transpose(2, 3).contiguous().transpose(2, 3)
    run_case(ops, q, k, v, sdpa_reference, attn_mask=m, is_causal=variant == "strided-causal")


def test_strided_inputs(ops):
    """(B, L, H, E) layouts seen as (B, H, L, E), a non-contiguous last dim, an expanded k."""
    torch.manual_seed(0)
    B, H, L, S, E = 2, 2, 33, 7, 16
    q = torch.randn(B, L, H, E, device=DEV).transpose(1, 2)
    k = torch.randn(B, S, 1, 2 * E, device=DEV)[..., ::2].transpose(1, 2).expand(B, H, S, E)
    v = torch.randn(B, S, H, E, device=DEV).transpose(1, 2)
    run_case(ops, q, k, v, sdpa_reference, is_causal=True)


def test_empty(ops):
    """S = 0: every row has no key (out 0, lse -inf, gradients 0); L = 0: empty outputs."""
    q, k, v = qkv(1, 2, 1, 3, 0, 16, 8)
    out, lse = ops.attention_fwd(q, k, v, None, None, False, 0.25, 0.0, 0, 0)
    assert (out == 0).all() and out.shape == (1, 2, 3, 8) and torch.isneginf(lse).all()
    grads = ops.attention_bwd(torch.randn_like(out), q, k, v, out, lse, None, None, False, 0.25,
                              0.0, 0, 0)
    assert [tuple(g.shape) for g in grads] == [(1, 2, 3, 16), (1, 1, 0, 16), (1, 1, 0, 8), (0,)]
    assert (grads[0] == 0).all()
    q, k, v = qkv(1, 2, 1, 0, 5, 16, 8)
    out, lse = ops.attention_fwd(q, k, v, None, None, True, 0.25, 0.0, 0, 0)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)


# ---- valid_lens (the notes' masked_softmax) ------------------------------------------------------
def test_valid_lens_1d(ops):
    torch.manual_seed(0)
    q, k, v = qkv(3, 2, 2, 7, 129, 16, 16)
    vl = torch.tensor([0, 5, 200], device=DEV)  # 0: row not masked; 200 > S: all keys
    run_case(ops, q, k, v, dense_reference, valid_lens=vl)


def test_valid_lens_2d_causal(ops):
    torch.manual_seed(0)
    B, L, S = 2, 33, 40
    q, k, v = qkv(B, 4, 2, L, S, 16, 16)
    vl = torch.randint(-2, S + 3, (B, L), generator=torch.Generator().manual_seed(2)).to(DEV)
    vl[0, :3] = torch.tensor([0, -1, 1])
    run_case(ops, q, k, v, dense_reference, valid_lens=vl, is_causal=True)


# ---- float16 / bfloat16 --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(ops, dtype):
    torch.manual_seed(0)
    B, L, S = 2, 33, 7
    q, k, v = qkv(B, 4, 2, L, S, 16, 64, dtype)
    m = _bool_mask("B11S", B, 4, L, S)
    run_case(ops, q, k, v, sdpa_reference, attn_mask=m, is_causal=True)


# ---- dropout -------------------------------------------------------------------------------------
def test_philox_known_answers(module):
    """Random123's known-answer vectors for Philox-4x32-10 (kat_vectors)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2,
              (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, key, expected in cases:
        words = module.philox4x32_10(*(torch.tensor([c]) for c in ctr), *key)
        assert tuple(w.item() for w in words) == expected


@pytest.mark.parametrize("seed,offset", [(1234, 0), (2**40 + 5, 2**32 - 3000), (-1, 7)])
def test_dropout_mask_and_rate(ops, module, seed, offset):
    """With q = 0 (uniform softmax) and v = identity, out = the dropped-out P itself: the kernel's
    keep mask, which must equal philox_keep_mask bit for bit (the second case's counters cross
    2^32, the third has a negative seed) and keep about 1 - p of the entries."""
    B, H, L, S, p = 1, 2, 64, 128, 0.3
    q = torch.zeros(B, H, L, 16, device=DEV)
    k = torch.randn(B, H, S, 16, device=DEV)
    v = torch.eye(S, device=DEV).expand(B, H, S, S)
    out, lse = ops.attention_fwd(q, k, v, None, None, False, 1.0, p, seed, offset)
    torch.testing.assert_close(lse, torch.full_like(lse, math.log(S)))  # lse before dropout
    scaled = out.cpu() * (S * (1 - p))
    keep = module.philox_keep_mask(seed, offset, B, H, L, S, p)
    torch.testing.assert_close(scaled, keep.float(), rtol=1e-5, atol=1e-5)
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), rate
    # the mask depends on seed and offset
    assert not torch.equal(keep, module.philox_keep_mask(seed + 1, offset, B, H, L, S, p))
    assert torch.equal(keep.flatten()[1:], module.philox_keep_mask(
        seed, offset + 1, B, H, L, S, p).flatten()[:-1])


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_backward(ops, module, causal):
    """Forward and backward with dropout against the dense reference using the same mask (GQA:
    the mask is indexed by the query head)."""
    torch.manual_seed(0)
    B, Hq, Hk, L, S, p, seed, offset = 2, 4, 2, 33, 70, 0.25, 2**33 + 17, 2**32 - 5000
    q, k, v = qkv(B, Hq, Hk, L, S, 16, 16)
    keep = module.philox_keep_mask(seed, offset, B, Hq, L, S, p)
    ref = lambda *a, **kw: dense_reference(*a, keep=keep, p=p, **kw)  # noqa: E731
    run_case(ops, q, k, v, ref, is_causal=causal, dropout_p=p, seed=seed, offset=offset)


# ---- argument checks, registration ---------------------------------------------------------------
def test_bad_arguments(ops):
    q, k, v = qkv(2, 2, 2, 5, 6, 16, 8)
    fwd = lambda *a, **kw: ops.attention_fwd(*a, **kw)  # noqa: E731
    base = dict(attn_mask=None, valid_lens=None, is_causal=False, scale=0.25, dropout_p=0.0,
                seed=0, offset=0)

    def call(q=q, k=k, v=v, **kw):
        return fwd(q, k, v, **{**base, **kw})

    with pytest.raises(RuntimeError, match="head dims differ"):
        call(k=torch.randn(2, 2, 6, 32, device=DEV))
    with pytest.raises(RuntimeError, match="head dims up to 256"):
        call(q=torch.randn(2, 2, 5, 320, device=DEV), k=torch.randn(2, 2, 6, 320, device=DEV))
    with pytest.raises(RuntimeError, match="multiple of the number of key/value heads"):
        call(q=torch.randn(2, 3, 5, 16, device=DEV))
    with pytest.raises(RuntimeError, match=r"attn_mask of shape \(B, Hq, L, S\)"):
        call(attn_mask=torch.ones(1, 1, 5, 6, dtype=torch.bool, device=DEV))
    with pytest.raises(RuntimeError, match="attn_mask of dtype"):
        call(attn_mask=torch.ones(2, 2, 5, 6, dtype=torch.int32, device=DEV))
    with pytest.raises(RuntimeError, match="valid_lens of shape"):
        call(valid_lens=torch.ones(3, dtype=torch.int64, device=DEV))
    with pytest.raises(RuntimeError, match="valid_lens of dtype int64"):
        call(valid_lens=torch.ones(2, dtype=torch.int32, device=DEV))
    for p in (-0.1, 1.0):
        with pytest.raises(RuntimeError, match=r"dropout_p in \[0, 1\)"):
            call(dropout_p=p)
    with pytest.raises(RuntimeError, match="one dtype"):
        call(v=v.half())
    out, lse = call()
    with pytest.raises(RuntimeError, match="lse of shape"):
        ops.attention_bwd(out, q, k, v, out, lse[:, :1], None, None, False, 0.25, 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="grad_out of shape"):
        ops.attention_bwd(out[..., :4], q, k, v, out, lse, None, None, False, 0.25, 0.0, 0, 0)


def test_opcheck(ops):
    """Schema and fake-tensor registrations, through torch.library.opcheck."""
    q, k, v = qkv(1, 2, 1, 3, 5, 16, 8)
    m = torch.rand(1, 1, 3, 5, device=DEV).expand(1, 2, 3, 5) > 0.2
    fwd_args = (q, k, v, m, None, True, 0.25, 0.1, 3, 4)
    out, lse = ops.attention_fwd(*fwd_args)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.attention_fwd, fwd_args, test_utils=utils)
    torch.library.opcheck(ops.attention_bwd, (torch.randn_like(out), q, k, v, out, lse, m, None,
                                              True, 0.25, 0.1, 3, 4), test_utils=utils)


@pytest.mark.parametrize("op", ["attention_fwd", "attention_bwd"])
def test_schema_matches_cpp(ops, op):
    assert_schema_matches_cpp(ops, op)
