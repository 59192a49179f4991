"""The attention of pyfastdl.reference: the notes' masked softmax (-1e6 fill, 1-D/2-D valid_lens, a
valid length of 0 gives a uniform row), the notes' DotProductAttention against the like-torch oracle
``sdpa_like_torch`` and torch's SDPA, ``sdpa_like_torch`` against torch's math backend in float64
(masks, causal with L != S, GQA, fully masked rows), and the notes' / book's Transformer modules
running on small inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pyfastdl import reference as R
from pyfastdl.reference import attention as RA

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def rand(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def torch_sdpa_math(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


# ---- (i) masked_softmax -----------------------------------------------------------------------------

VALID_LENS = {
    "1d": torch.tensor([2, 5, 1]),                                    # (B,), 5 = all keys
    "2d": torch.tensor([[1, 3, 5, 2], [4, 4, 1, 3], [2, 1, 1, 5]]),  # (B, L)
}


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_masked_softmax_rows_and_masked_positions(kind):
    B, L, S = 3, 4, 5
    X = rand(B, L, S)
    vl = VALID_LENS[kind]
    out = R.masked_softmax(X.clone(), vl)   # clone: the notes' code overwrites X with the fill
    per_row = (vl[:, None].expand(B, L) if kind == "1d" else vl)
    keep = torch.arange(S)[None, None, :] < per_row[:, :, None]
    torch.testing.assert_close(out.sum(-1), torch.ones(B, L, dtype=F64))
    assert (out[~keep] < 1e-30).all()
    # On the valid prefix: the plain softmax of the valid scores.
    for b in range(B):
        for i in range(L):
            n = int(per_row[b, i])
            torch.testing.assert_close(out[b, i, :n], torch.softmax(X[b, i, :n], -1))


def test_masked_softmax_none_is_softmax():
    X = rand(2, 3, 4)
    torch.testing.assert_close(R.masked_softmax(X, None), torch.softmax(X, -1))


def test_masked_softmax_valid_length_zero_is_uniform():
    """The -1e6 fill: a row with no valid key has every score -1e6, so its softmax is uniform."""
    S = 6
    out = R.masked_softmax(rand(2, 3, S), torch.tensor([0, 2]))
    torch.testing.assert_close(out[0], torch.full((3, S), 1.0 / S, dtype=F64))
    out2 = R.masked_softmax(rand(2, 3, S), torch.tensor([[2, 0, 1], [0, 6, 3]]))
    torch.testing.assert_close(out2[0, 1], torch.full((S,), 1.0 / S, dtype=F64))
    torch.testing.assert_close(out2[1, 0], torch.full((S,), 1.0 / S, dtype=F64))


# ---- (ii) the notes' DotProductAttention = sdpa_like_torch = torch SDPA ----------------------------

@pytest.mark.parametrize("kind", ["1d", "2d", "none"])
def test_dot_product_attention_matches_sdpa(kind):
    B, L, S, E, Ev = 3, 4, 5, 3, 7
    q, k, v = rand(B, L, E, seed=1), rand(B, S, E, seed=2), rand(B, S, Ev, seed=3)
    vl = VALID_LENS.get(kind)
    attn = R.DotProductAttention(dropout=0.5).eval()
    out = attn(q, k, v, vl)
    mask = None if vl is None else R.valid_lens_mask(vl, L, S)
    ref = R.sdpa_like_torch(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, torch_sdpa_math(q, k, v, attn_mask=mask), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert attn.attention_weights.shape == (B, L, S)


def test_dot_product_attention_valid_length_zero_differs_from_sdpa():
    """The one documented difference: the notes average ALL values, torch returns zeros."""
    B, L, S = 2, 3, 5
    q, k, v = rand(B, L, 4, seed=1), rand(B, S, 4, seed=2), rand(B, S, 2, seed=3)
    vl = torch.tensor([0, 3])
    out = R.DotProductAttention(0.0).eval()(q, k, v, vl)
    torch.testing.assert_close(out[0], v[0].mean(0).expand(L, 2))
    ref = R.sdpa_like_torch(q, k, v, attn_mask=R.valid_lens_mask(vl, L, S))
    torch.testing.assert_close(ref[0], torch.zeros(L, 2, dtype=F64))
    torch.testing.assert_close(out[1], ref[1], rtol=1e-12, atol=1e-12)


def test_multi_head_attention_matches_sdpa_per_head():
    """MultiHeadAttention's repeat_interleave of valid_lens = the (B, L, S) mask broadcast over heads."""
    torch.manual_seed(0)
    B, L, S, H, D = 2, 3, 5, 2, 8
    mha = R.MultiHeadAttention(6, 4, 5, D, H, dropout=0.5).double().eval()
    q, k, v = rand(B, L, 4, seed=1), rand(B, S, 6, seed=2), rand(B, S, 5, seed=3)
    vl = torch.tensor([[1, 5, 2], [3, 4, 5]])
    out = mha(q, k, v, vl)

    def heads(x):   # (B, n, D) -> (B, H, n, D / H)
        return x.reshape(B, x.shape[1], H, -1).transpose(1, 2)
    o = R.sdpa_like_torch(heads(mha.W_q(q)), heads(mha.W_k(k)), heads(mha.W_v(v)),
                          attn_mask=R.valid_lens_mask(vl, L, S).unsqueeze(1))
    ref = mha.W_o(o.transpose(1, 2).reshape(B, L, D))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# ---- (iii) sdpa_like_torch = torch's SDPA (math backend, float64) -----------------------------------

B, H, L, S, E, EV = 2, 3, 5, 7, 4, 6


def _bool_mask():
    m = rand(L, S, seed=7) > -0.3
    m[:, 0] = True   # no fully masked row here
    return m


CASES = {
    "plain": dict(),
    "scale": dict(scale=0.37),
    "bool_mask": dict(attn_mask=_bool_mask()),
    "bool_mask_batched": dict(attn_mask=rand(B, 1, L, S, seed=8) > 0.0),
    "float_mask": dict(attn_mask=rand(B, H, L, S, seed=9)),
    "causal": dict(is_causal=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_like_torch_matches_torch(case):
    q, k, v = rand(B, H, L, E, seed=1), rand(B, H, S, E, seed=2), rand(B, H, S, EV, seed=3)
    kw = CASES[case]
    torch.testing.assert_close(R.sdpa_like_torch(q, k, v, **kw), torch_sdpa_math(q, k, v, **kw),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Lq,Sk", [(5, 7), (7, 5), (1, 4)])
def test_sdpa_like_torch_causal_l_ne_s(Lq, Sk):
    """is_causal is top-left aligned (key j <= query i) whatever L and S."""
    q, k, v = rand(2, 3, Lq, E, seed=1), rand(2, 3, Sk, E, seed=2), rand(2, 3, Sk, EV, seed=3)
    torch.testing.assert_close(R.sdpa_like_torch(q, k, v, is_causal=True),
                               torch_sdpa_math(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 1), (3, 3)])
def test_sdpa_like_torch_gqa(hq, hkv):
    q, k, v = rand(2, hq, L, E, seed=1), rand(2, hkv, S, E, seed=2), rand(2, hkv, S, EV, seed=3)
    torch.testing.assert_close(R.sdpa_like_torch(q, k, v, enable_gqa=True, is_causal=True),
                               torch_sdpa_math(q, k, v, enable_gqa=True, is_causal=True),
                               rtol=1e-12, atol=1e-12)


def test_sdpa_like_torch_gqa_rejects_indivisible_heads():
    k = rand(2, 2, S, E)
    with pytest.raises(ValueError, match="divisible"):
        R.sdpa_like_torch(rand(2, 5, L, E), k, k, enable_gqa=True)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_sdpa_like_torch_fully_masked_rows_are_zero(mask_kind):
    q, k, v = rand(B, H, L, E, seed=1), rand(B, H, S, E, seed=2), rand(B, H, S, EV, seed=3)
    keep = _bool_mask().clone()
    keep[1] = False
    keep[4] = False
    mask = keep
    if mask_kind == "float":
        mask = torch.zeros(L, S, dtype=F64).masked_fill(~keep, float("-inf"))
    q.requires_grad_()
    out = R.sdpa_like_torch(q, k, v, attn_mask=mask)
    ref = torch_sdpa_math(q, k, v, attn_mask=mask)
    assert (out[:, :, [1, 4]] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g, = torch.autograd.grad(out.sum(), q)
    g_ref, = torch.autograd.grad(ref.sum(), q)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_sdpa_like_torch_3d_and_low_precision():
    q, k, v = rand(3, L, E, seed=1), rand(3, S, E, seed=2), rand(3, S, EV, seed=3)
    torch.testing.assert_close(R.sdpa_like_torch(q, k, v), torch_sdpa_math(q, k, v),
                               rtol=1e-12, atol=1e-12)
    out16 = R.sdpa_like_torch(q.half(), k.half(), v.half(), attn_mask=_bool_mask())
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16.double(), R.sdpa_like_torch(q, k, v, attn_mask=_bool_mask()),
                               rtol=1e-2, atol=1e-2)   # float16 inputs: rounding of q, k, v and out


def test_sdpa_like_torch_rejects_mask_with_causal():
    q = rand(1, 1, 2, 2)
    with pytest.raises(ValueError, match="is_causal"):
        R.sdpa_like_torch(q, q, q, attn_mask=torch.ones(2, 2, dtype=torch.bool), is_causal=True)


# ---- (iv) the Transformer modules run ----------------------------------------------------------------

NUM_HIDDENS, HEADS, FFN = 8, 2, 12


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_additive_and_multi_head_attention_shapes(kind):
    torch.manual_seed(0)
    Bq, Lq, Sk = 3, 4, 5
    vl = VALID_LENS[kind]
    add = R.AdditiveAttention(key_size=3, query_size=2, num_hiddens=6, dropout=0.1).double()
    out = add(rand(Bq, Lq, 2), rand(Bq, Sk, 3, seed=1), rand(Bq, Sk, 7, seed=2), vl)
    assert out.shape == (Bq, Lq, 7) and torch.isfinite(out).all()
    mha = R.MultiHeadAttention(3, 2, 7, NUM_HIDDENS, HEADS, dropout=0.1).double()
    out = mha(rand(Bq, Lq, 2), rand(Bq, Sk, 3, seed=1), rand(Bq, Sk, 7, seed=2), vl)
    assert out.shape == (Bq, Lq, NUM_HIDDENS) and torch.isfinite(out).all()
    assert mha.attention.attention_weights.shape == (Bq * HEADS, Lq, Sk)


def test_encoder_block_shapes():
    torch.manual_seed(0)
    X = rand(3, 5, NUM_HIDDENS)
    blk = R.EncoderBlock(NUM_HIDDENS, NUM_HIDDENS, NUM_HIDDENS, NUM_HIDDENS, [NUM_HIDDENS],
                         NUM_HIDDENS, FFN, HEADS, 0.2).double()
    for vl in (torch.tensor([2, 5, 3]), torch.tensor([[1, 2, 3, 4, 5]] * 3), None):
        out = blk(X, vl)
        assert out.shape == X.shape and torch.isfinite(out).all()


def test_transformer_encoder_shapes_and_eval_determinism():
    torch.manual_seed(0)
    enc = R.TransformerEncoder(50, NUM_HIDDENS, NUM_HIDDENS, NUM_HIDDENS, NUM_HIDDENS, [NUM_HIDDENS],
                               NUM_HIDDENS, FFN, HEADS, num_layers=2, dropout=0.3).double()
    tokens = torch.randint(0, 50, (3, 6))
    vl = torch.tensor([6, 2, 4])
    out = enc(tokens, vl)
    assert out.shape == (3, 6, NUM_HIDDENS) and torch.isfinite(out).all()
    assert len(enc.attention_weights) == 2 and enc.attention_weights[0].shape == (3 * HEADS, 6, 6)
    enc.eval()
    torch.testing.assert_close(enc(tokens, vl), enc(tokens, vl), rtol=0, atol=0)


def test_bert_encoder_shapes():
    torch.manual_seed(0)
    enc = R.BERTEncoder(40, NUM_HIDDENS, [NUM_HIDDENS], NUM_HIDDENS, FFN, HEADS, num_layers=2,
                        dropout=0.2, max_len=16, key_size=NUM_HIDDENS, query_size=NUM_HIDDENS,
                        value_size=NUM_HIDDENS)
    tokens = torch.randint(0, 40, (2, 8))
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])
    for vl in (torch.tensor([8, 5]), None):
        out = enc(tokens, segments, vl)
        assert out.shape == (2, 8, NUM_HIDDENS) and torch.isfinite(out).all()


def test_positional_encoding_values():
    pe = R.PositionalEncoding(6, dropout=0.0)
    out = pe(torch.zeros(1, 4, 6))
    i, j = 3, 2   # P[i, 2j] = sin(i / 10000^(2j/d)), P[i, 2j+1] = cos(...)
    w = 3 / 10000 ** (2 * j / 6)
    torch.testing.assert_close(out[0, i, 2 * j], torch.tensor(w).sin().float())
    torch.testing.assert_close(out[0, i, 2 * j + 1], torch.tensor(w).cos().float())


# ---- the kernels' dropout generator, in Python --------------------------------------------------------

def test_philox_first_word_known_answer():
    """Random123's known-answer vector for Philox-4x32-10 (counter 0, key 0: first word 0x6627e8d5),
    and 64-bit counters split into two words."""
    assert int(RA.philox_first_word(0, torch.tensor([0]))[0]) == 0x6627E8D5
    words = RA.philox_first_word(2**40 + 7, torch.tensor([0, 1, 2**33 + 5]))
    assert words.dtype == torch.int64 and ((words >= 0) & (words < 2**32)).all()
    assert len(set(words.tolist())) == 3


def test_dropout_keep_mask_rate():
    keep = RA.dropout_keep_mask(12345, 0, (2, 3, 64, 64), 0.25)
    assert keep.shape == (2, 3, 64, 64) and keep.dtype == torch.bool
    assert abs(keep.double().mean().item() - 0.75) < 0.02
