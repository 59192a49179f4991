"""Attention from scratch, as the notes build it (d2l style, sections 65-70 of
the notes), runnable without the d2l package.

Where the code comes from:

* The notes' own code: ``masked_softmax``, ``AdditiveAttention``, ``DotProductAttention``
  (section 65, "注意力分数") and ``BERTEncoder`` (section 70, "BERT预训练", 3.2 "BERT实现").
* The notes' section 68 ("Transformer") keeps only prose (architecture, multi-head attention,
  position-wise FFN, layer norm), and section 70 calls ``d2l.EncoderBlock`` and
  ``d2l.sequence_mask`` without defining them. Those come from the d2l book the notes follow
  (Dive into Deep Learning, zh-v2, PyTorch code): ``sequence_mask`` (9.7 "序列到序列学习"),
  ``transpose_qkv``, ``transpose_output``, ``MultiHeadAttention`` (10.5 "多头注意力"),
  ``PositionalEncoding`` (10.6 "自注意力和位置编码"), ``PositionWiseFFN``, ``AddNorm``,
  ``EncoderBlock``, ``TransformerEncoder`` (10.7 "Transformer"; its base ``d2l.Encoder`` of 9.6 is
  a plain ``nn.Module`` here).

The math is the notes' and the book's, unchanged: masked scores are *replaced* by -1e6 (not -inf),
dropout acts on the attention weights (``self.attention_weights`` keeps them before dropout), heads
are flattened into the batch axis (``(batch_size * num_heads, n, d)``, batch-major) and
``valid_lens`` is ``repeat_interleave``-d over the heads.

Beside them, the like-torch oracle of ``torch.nn.functional.scaled_dot_product_attention``:

* ``sdpa_like_torch``: torch's documented reference implementation written out (float math,
  materialized scores), except that a fully masked row returns zeros, as torch 2.14 does.
* ``valid_lens_mask``: the notes' 1-D/2-D ``valid_lens`` as a boolean ``attn_mask``.

Conventions that differ between the notes and torch (a fused kernel must pick one, knowingly):

* Fill value. The notes fill masked scores with -1e6. For a row with at least one valid key this
  equals torch's -inf (exp(-1e6 - max) is exactly 0 in float32/float64 for ordinary scores). For a
  row whose valid length is 0 every score becomes -1e6, so the softmax is *uniform* and the output
  is the mean of ALL values (padding included); torch returns zeros for a fully masked row, and no
  boolean or additive mask reproduces the notes' uniform row. In float16 -1e6 overflows to -inf, so
  the notes' code gives NaN for such a row (bfloat16 rounds it to -999424 and stays uniform).
* Layout. The notes' ``DotProductAttention`` takes 3-D ``(batch, n, d)`` tensors (``torch.bmm``);
  torch's SDPA takes ``(..., heads, n, d)``.
* Dropout. The notes' ``nn.Dropout`` on the weights is active only in training mode; torch's
  functional SDPA applies ``dropout_p`` whenever it is > 0.
* Masking is by key only: positions past ``valid_len`` are masked as keys, padded queries still
  produce outputs (an average over the valid keys).

Bahdanau et al. 2015 (additive attention); Vaswani et al. 2017 (scaled dot-product, multi-head,
Transformer); Devlin et al. 2019 (BERT); Ainslie et al. 2023 (grouped-query attention).
"""
import math

import torch
from torch import nn

__all__ = [
    "sequence_mask", "masked_softmax", "AdditiveAttention", "DotProductAttention",
    "transpose_qkv", "transpose_output", "MultiHeadAttention", "PositionWiseFFN", "AddNorm",
    "PositionalEncoding", "EncoderBlock", "TransformerEncoder", "BERTEncoder",
    "sdpa_like_torch", "valid_lens_mask", "philox_first_word", "dropout_keep_mask",
]


# ---- the notes' and the book's code -----------------------------------------------------------------

def sequence_mask(X, valid_len, value=0):
    """The book's ``d2l.sequence_mask`` (zh-v2 9.7; the notes call it in ``masked_softmax``).
    X: (n, maxlen); valid_len: (n,). Entries X[i, j] with j >= valid_len[i] are set to ``value``
    *in place* (X is modified and returned)."""
    maxlen = X.size(1)
    mask = torch.arange((maxlen), dtype=torch.float32,
                        device=X.device)[None, :] < valid_len[:, None]
    X[~mask] = value
    return X


def masked_softmax(X, valid_lens):
    """The notes' masked softmax (section 65, "掩蔽softmax操作"): softmax over the last axis with the
    positions past the valid length replaced by -1e6 (so their weight is ~0).
    X: (batch_size, num_queries, num_keys); valid_lens: None, (batch_size,) (one length per
    sequence) or (batch_size, num_queries) (one per query). Returns X's shape.

    As in the notes, ``sequence_mask`` writes into ``X.reshape(...)``, a view of X when X is
    contiguous: the caller's X is overwritten with the -1e6 fill (pass a clone to keep it; a leaf
    that requires grad cannot be passed). A valid length of 0 gives a uniform row (all -1e6), not
    zeros; in float16 -1e6 is -inf and that row is NaN."""
    # X: 3-D tensor; valid_lens: 1-D or 2-D tensor
    if valid_lens is None:
        return nn.functional.softmax(X, dim=-1)
    else:
        shape = X.shape
        if valid_lens.dim() == 1:
            valid_lens = torch.repeat_interleave(valid_lens, shape[1])
        else:
            valid_lens = valid_lens.reshape(-1)
        # Masked elements of the last axis get a very large negative value: their softmax is 0.
        X = sequence_mask(X.reshape(-1, shape[-1]), valid_lens,
                          value=-1e6)
        return nn.functional.softmax(X.reshape(shape), dim=-1)


class AdditiveAttention(nn.Module):
    """The notes' additive attention (section 65, "加性注意力"): score(q, k) = w_v^T tanh(W_q q + W_k k),
    for queries and keys of different sizes. queries: (batch_size, num_queries, query_size);
    keys: (batch_size, num_kv, key_size); values: (batch_size, num_kv, value_dim); valid_lens: as
    ``masked_softmax``. Returns (batch_size, num_queries, value_dim); ``self.attention_weights``
    (batch_size, num_queries, num_kv) holds the weights before dropout."""

    def __init__(self, key_size, query_size, num_hiddens, dropout, **kwargs):
        super(AdditiveAttention, self).__init__(**kwargs)
        self.W_k = nn.Linear(key_size, num_hiddens, bias=False)
        self.W_q = nn.Linear(query_size, num_hiddens, bias=False)
        self.w_v = nn.Linear(num_hiddens, 1, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, keys, values, valid_lens):
        queries, keys = self.W_q(queries), self.W_k(keys)
        # After unsqueezing: queries (batch_size, num_queries, 1, num_hiddens),
        # keys (batch_size, 1, num_kv, num_hiddens); summed by broadcasting.
        features = queries.unsqueeze(2) + keys.unsqueeze(1)
        features = torch.tanh(features)
        # w_v has a single output: drop that last axis.
        # scores: (batch_size, num_queries, num_kv)
        scores = self.w_v(features).squeeze(-1)
        self.attention_weights = masked_softmax(scores, valid_lens)
        # values: (batch_size, num_kv, value_dim)
        return torch.bmm(self.dropout(self.attention_weights), values)


class DotProductAttention(nn.Module):
    """The notes' scaled dot-product attention (section 65, "缩放点积注意力"):
    softmax(Q K^T / sqrt(d)) V with the notes' ``masked_softmax`` and dropout on the weights.
    queries: (batch_size, num_queries, d); keys: (batch_size, num_kv, d); values: (batch_size,
    num_kv, value_dim); valid_lens: None, (batch_size,) or (batch_size, num_queries).
    Returns (batch_size, num_queries, value_dim); ``self.attention_weights`` (batch_size,
    num_queries, num_kv) holds the weights before dropout.

    For valid lengths >= 1 and no dropout this is ``sdpa_like_torch(queries, keys, values,
    attn_mask=valid_lens_mask(valid_lens, num_queries, num_kv))``; see the module docstring for a
    valid length of 0."""

    def __init__(self, dropout, **kwargs):
        super(DotProductAttention, self).__init__(**kwargs)
        self.dropout = nn.Dropout(dropout)

    # queries: (batch_size, num_queries, d)
    # keys: (batch_size, num_kv, d)
    # values: (batch_size, num_kv, value_dim)
    # valid_lens: (batch_size,) or (batch_size, num_queries)
    def forward(self, queries, keys, values, valid_lens=None):
        d = queries.shape[-1]
        # keys.transpose(1, 2): the book's transpose_b=True
        scores = torch.bmm(queries, keys.transpose(1, 2)) / math.sqrt(d)
        self.attention_weights = masked_softmax(scores, valid_lens)
        return torch.bmm(self.dropout(self.attention_weights), values)


def transpose_qkv(X, num_heads):
    """The book's head split (zh-v2 10.5): (batch_size, n, num_hiddens) ->
    (batch_size * num_heads, n, num_hiddens / num_heads), row b * num_heads + h holding head h of
    sequence b."""
    # (batch_size, n, num_heads, num_hiddens / num_heads)
    X = X.reshape(X.shape[0], X.shape[1], num_heads, -1)
    # (batch_size, num_heads, n, num_hiddens / num_heads)
    X = X.permute(0, 2, 1, 3)
    # (batch_size * num_heads, n, num_hiddens / num_heads)
    return X.reshape(-1, X.shape[2], X.shape[3])


def transpose_output(X, num_heads):
    """The book's inverse of ``transpose_qkv`` (zh-v2 10.5): (batch_size * num_heads, n, d_head) ->
    (batch_size, n, num_heads * d_head), heads concatenated along the last axis."""
    X = X.reshape(-1, num_heads, X.shape[1], X.shape[2])
    X = X.permute(0, 2, 1, 3)
    return X.reshape(X.shape[0], X.shape[1], -1)


class MultiHeadAttention(nn.Module):
    """The book's multi-head attention (zh-v2 10.5; prose in the notes' section 68, "多头注意力"):
    W_o concat_h(DotProductAttention(W_q^h q, W_k^h k, W_v^h v)). num_hiddens must be divisible
    by num_heads. queries: (batch_size, num_queries, query_size); keys: (batch_size, num_kv,
    key_size); values: (batch_size, num_kv, value_size); valid_lens: None, (batch_size,) or
    (batch_size, num_queries), ``repeat_interleave``-d num_heads times along axis 0 to match
    ``transpose_qkv``'s batch-major order. Returns (batch_size, num_queries, num_hiddens);
    ``self.attention.attention_weights``: (batch_size * num_heads, num_queries, num_kv)."""

    def __init__(self, key_size, query_size, value_size, num_hiddens,
                 num_heads, dropout, bias=False, **kwargs):
        super(MultiHeadAttention, self).__init__(**kwargs)
        self.num_heads = num_heads
        self.attention = DotProductAttention(dropout)
        self.W_q = nn.Linear(query_size, num_hiddens, bias=bias)
        self.W_k = nn.Linear(key_size, num_hiddens, bias=bias)
        self.W_v = nn.Linear(value_size, num_hiddens, bias=bias)
        self.W_o = nn.Linear(num_hiddens, num_hiddens, bias=bias)

    def forward(self, queries, keys, values, valid_lens):
        # queries, keys, values: (batch_size, num_queries or num_kv, num_hiddens) after W_*;
        # after transpose_qkv: (batch_size * num_heads, num_queries or num_kv,
        # num_hiddens / num_heads)
        queries = transpose_qkv(self.W_q(queries), self.num_heads)
        keys = transpose_qkv(self.W_k(keys), self.num_heads)
        values = transpose_qkv(self.W_v(values), self.num_heads)

        if valid_lens is not None:
            # On axis 0, copy the first item (scalar or vector) num_heads times, then the second
            # item, and so on.
            valid_lens = torch.repeat_interleave(
                valid_lens, repeats=self.num_heads, dim=0)

        # output: (batch_size * num_heads, num_queries, num_hiddens / num_heads)
        output = self.attention(queries, keys, values, valid_lens)

        # output_concat: (batch_size, num_queries, num_hiddens)
        output_concat = transpose_output(output, self.num_heads)
        return self.W_o(output_concat)


class PositionWiseFFN(nn.Module):
    """The book's position-wise feed-forward network (zh-v2 10.7; notes section 68, "基于位置的前馈
    网络"): dense2(relu(dense1(X))) on the last axis. X: (..., ffn_num_input) ->
    (..., ffn_num_outputs)."""

    def __init__(self, ffn_num_input, ffn_num_hiddens, ffn_num_outputs,
                 **kwargs):
        super(PositionWiseFFN, self).__init__(**kwargs)
        self.dense1 = nn.Linear(ffn_num_input, ffn_num_hiddens)
        self.relu = nn.ReLU()
        self.dense2 = nn.Linear(ffn_num_hiddens, ffn_num_outputs)

    def forward(self, X):
        return self.dense2(self.relu(self.dense1(X)))


class AddNorm(nn.Module):
    """The book's residual connection followed by layer norm (zh-v2 10.7; notes section 68,
    "层归一化"): LayerNorm(dropout(Y) + X) (post-norm). X, Y: (..., *normalized_shape)."""

    def __init__(self, normalized_shape, dropout, **kwargs):
        super(AddNorm, self).__init__(**kwargs)
        self.dropout = nn.Dropout(dropout)
        self.ln = nn.LayerNorm(normalized_shape)

    def forward(self, X, Y):
        return self.ln(self.dropout(Y) + X)


class PositionalEncoding(nn.Module):
    """The book's sinusoidal positional encoding (zh-v2 10.6): P[i, 2j] = sin(i / 10000^(2j/d)),
    P[i, 2j+1] = cos(i / 10000^(2j/d)); forward returns dropout(X + P[:n]). X: (batch_size, n,
    num_hiddens), n <= max_len, num_hiddens even (the book's code needs it). ``self.P``
    (1, max_len, num_hiddens) is a float32 plain attribute (not a buffer), moved to X's device on
    each call."""

    def __init__(self, num_hiddens, dropout, max_len=1000):
        super(PositionalEncoding, self).__init__()
        self.dropout = nn.Dropout(dropout)
        # A long enough P
        self.P = torch.zeros((1, max_len, num_hiddens))
        X = torch.arange(max_len, dtype=torch.float32).reshape(
            -1, 1) / torch.pow(10000, torch.arange(
                0, num_hiddens, 2, dtype=torch.float32) / num_hiddens)
        self.P[:, :, 0::2] = torch.sin(X)
        self.P[:, :, 1::2] = torch.cos(X)

    def forward(self, X):
        X = X + self.P[:, :X.shape[1], :].to(X.device)
        return self.dropout(X)


class EncoderBlock(nn.Module):
    """The book's Transformer encoder block (zh-v2 10.7; the ``d2l.EncoderBlock`` of the notes'
    ``BERTEncoder``): Y = AddNorm(X, MultiHeadAttention(X, X, X, valid_lens)); returns
    AddNorm(Y, PositionWiseFFN(Y)). X: (batch_size, n, num_hiddens) -> same shape; the book's
    callers pass key_size = query_size = value_size = ffn_num_input = num_hiddens and
    norm_shape = [num_hiddens]."""

    def __init__(self, key_size, query_size, value_size, num_hiddens,
                 norm_shape, ffn_num_input, ffn_num_hiddens, num_heads,
                 dropout, use_bias=False, **kwargs):
        super(EncoderBlock, self).__init__(**kwargs)
        self.attention = MultiHeadAttention(
            key_size, query_size, value_size, num_hiddens, num_heads, dropout,
            use_bias)
        self.addnorm1 = AddNorm(norm_shape, dropout)
        self.ffn = PositionWiseFFN(
            ffn_num_input, ffn_num_hiddens, num_hiddens)
        self.addnorm2 = AddNorm(norm_shape, dropout)

    def forward(self, X, valid_lens):
        Y = self.addnorm1(X, self.attention(X, X, X, valid_lens))
        return self.addnorm2(Y, self.ffn(Y))


class TransformerEncoder(nn.Module):
    """The book's Transformer encoder (zh-v2 10.7; its base ``d2l.Encoder`` is ``nn.Module`` here):
    embedding * sqrt(num_hiddens) + sinusoidal positions, then num_layers ``EncoderBlock``-s.
    X: (batch_size, n) token ids; valid_lens: None, (batch_size,) or (batch_size, n).
    Returns (batch_size, n, num_hiddens); ``self.attention_weights`` lists each block's
    (batch_size * num_heads, n, n) weights."""

    def __init__(self, vocab_size, key_size, query_size, value_size,
                 num_hiddens, norm_shape, ffn_num_input, ffn_num_hiddens,
                 num_heads, num_layers, dropout, use_bias=False, **kwargs):
        super(TransformerEncoder, self).__init__(**kwargs)
        self.num_hiddens = num_hiddens
        self.embedding = nn.Embedding(vocab_size, num_hiddens)
        self.pos_encoding = PositionalEncoding(num_hiddens, dropout)
        self.blks = nn.Sequential()
        for i in range(num_layers):
            self.blks.add_module("block" + str(i),
                                 EncoderBlock(key_size, query_size, value_size, num_hiddens,
                                              norm_shape, ffn_num_input, ffn_num_hiddens,
                                              num_heads, dropout, use_bias))

    def forward(self, X, valid_lens, *args):
        # The positional encoding lies in [-1, 1], so the embedding is scaled by
        # sqrt(num_hiddens) before the two are added.
        X = self.pos_encoding(self.embedding(X) * math.sqrt(self.num_hiddens))
        self.attention_weights = [None] * len(self.blks)
        for i, blk in enumerate(self.blks):
            X = blk(X, valid_lens)
            self.attention_weights[
                i] = blk.attention.attention.attention_weights
        return X


class BERTEncoder(nn.Module):
    """The notes' BERT encoder (section 70, 3.2 "BERT实现"; book zh-v2 14.8): token + segment
    embeddings + a learnable position embedding, then num_layers ``EncoderBlock``-s (with bias).
    tokens, segments: (batch_size, n) (segments in {0, 1}), n <= max_len; valid_lens: None,
    (batch_size,) or (batch_size, n). key_size, query_size and value_size default to 768 as in the
    notes: they must equal num_hiddens. Returns (batch_size, n, num_hiddens).

    As in the notes, the position embedding is added through ``.data``: it gets no gradient."""

    def __init__(self, vocab_size, num_hiddens, norm_shape, ffn_num_input,
                 ffn_num_hiddens, num_heads, num_layers, dropout,
                 max_len=1000, key_size=768, query_size=768, value_size=768,
                 **kwargs):
        super(BERTEncoder, self).__init__(**kwargs)
        self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
        self.segment_embedding = nn.Embedding(2, num_hiddens)
        self.blks = nn.Sequential()
        for i in range(num_layers):
            self.blks.add_module(f"{i}", EncoderBlock(
                key_size, query_size, value_size, num_hiddens, norm_shape,
                ffn_num_input, ffn_num_hiddens, num_heads, dropout, True))
        # In BERT the position embedding is learnable: a long enough parameter.
        self.pos_embedding = nn.Parameter(torch.randn(1, max_len,
                                                      num_hiddens))

    def forward(self, tokens, segments, valid_lens):
        # X keeps its shape below: (batch_size, n, num_hiddens)
        X = self.token_embedding(tokens) + self.segment_embedding(segments)
        X = X + self.pos_embedding.data[:, :X.shape[1], :]
        for blk in self.blks:
            X = blk(X, valid_lens)
        return X


# ---- like torch: torch.nn.functional.scaled_dot_product_attention ------------------------------------

def valid_lens_mask(valid_lens, L, S):
    """The notes' ``valid_lens`` as a boolean ``attn_mask`` (True = the key takes part).
    valid_lens: (B,) (one length per sequence) or (B, L) (one per query), integer or float;
    returns (B, L, S) bool with mask[b, i, j] = j < valid_lens[b] (resp. valid_lens[b, i]), on
    valid_lens' device. For (B, H, L, S) scores use ``.unsqueeze(1)``; this equals the notes'
    ``repeat_interleave`` over heads.

    Equivalent to the notes' -1e6 fill for every valid length >= 1. A valid length of 0 gives a
    fully masked row: ``sdpa_like_torch`` and torch return zeros there, whereas the notes'
    ``masked_softmax`` gives a uniform row (every score is -1e6), i.e. the mean of ALL S values."""
    if valid_lens.dim() not in (1, 2):
        raise ValueError(f"valid_lens_mask: valid_lens must be 1-D (B,) or 2-D (B, L), got shape "
                         f"{tuple(valid_lens.shape)}")
    if valid_lens.dim() == 2 and valid_lens.shape[1] != L:
        raise ValueError(f"valid_lens_mask: 2-D valid_lens must be (B, L={L}), got shape "
                         f"{tuple(valid_lens.shape)}")
    j = torch.arange(S, device=valid_lens.device)
    if valid_lens.dim() == 1:
        return (j[None, None, :] < valid_lens[:, None, None]).expand(valid_lens.shape[0], L, S)
    return j[None, None, :] < valid_lens[:, :, None]


def sdpa_like_torch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, valid_lens=None):
    """torch.nn.functional.scaled_dot_product_attention's documented reference implementation,
    written out: softmax(Q K^T * scale + bias) V with materialized (..., L, S) scores.
    query: (..., Hq, L, E); key: (..., Hkv, S, E); value: (..., Hkv, S, Ev) (Hkv = Hq unless
    enable_gqa, which needs Hq % Hkv == 0 and repeats each key/value head Hq // Hkv times,
    ``repeat_interleave`` on dim -3); 3-D (N, L, E) inputs work too. attn_mask: None, bool
    (True = take part) or float (added to the scores), broadcastable to (..., L, S); not together
    with is_causal. is_causal: the top-left aligned lower triangle (key j <= query i), also when
    L != S. scale: default 1 / sqrt(E). dropout_p: applied to the weights whenever > 0, in any mode,
    as the functional op does. Returns (..., Hq, L, Ev) in query's dtype.

    Float math: float64 for float64 inputs, float32 otherwise. One difference from the
    documentation's code, which returns NaN there: a row whose scores are all -inf (fully masked)
    returns zeros, as torch 2.14 does, and passes a zero gradient.

    valid_lens (pyfastdl's kernels' extra, csrc/common/attention.h): None, or (N,) / (N, L) lengths
    over query's first dimension (3-D or more inputs); the notes' rule on the scaled scores -- -1e6
    at and beyond the length, so a row whose length is <= 0 weighs every key equally -- before
    attn_mask / is_causal apply."""
    if is_causal and attn_mask is not None:
        raise ValueError("sdpa_like_torch: attn_mask must be None when is_causal=True")
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = query.to(compute), key.to(compute), value.to(compute)
    L, S, E = q.size(-2), k.size(-2), q.size(-1)
    scale_factor = 1 / math.sqrt(E) if scale is None else scale

    attn_bias = torch.zeros(L, S, dtype=compute, device=q.device)
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=0)
        attn_bias = attn_bias.masked_fill(keep.logical_not(), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_bias = attn_bias.masked_fill(attn_mask.logical_not(), float("-inf"))
        else:
            attn_bias = attn_mask.to(compute) + attn_bias

    if enable_gqa:
        hq, hkv = q.size(-3), k.size(-3)
        if hq % hkv != 0 or v.size(-3) != hkv:
            raise ValueError(f"sdpa_like_torch: enable_gqa needs query heads ({hq}) divisible by "
                             f"key/value heads ({hkv}, {v.size(-3)})")
        k = k.repeat_interleave(hq // hkv, -3)
        v = v.repeat_interleave(hq // hkv, -3)

    scores = q @ k.transpose(-2, -1) * scale_factor   # (..., L, S)
    if valid_lens is not None:
        if scores.dim() < 3:
            raise ValueError("sdpa_like_torch: valid_lens needs inputs of 3 or more dimensions")
        lens = valid_lens.reshape((scores.shape[0],) + (1,) * (scores.dim() - 3)
                                  + ((L,) if valid_lens.dim() == 2 else (1,)) + (1,))
        scores = scores.masked_fill(torch.arange(S, device=scores.device) >= lens, -1e6)
    scores = scores + attn_bias
    # A fully masked row: softmax of all -inf is NaN in the documentation's code; torch returns 0.
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    attn_weight = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        attn_weight = torch.dropout(attn_weight, dropout_p, train=True)
    return (attn_weight @ v).to(query.dtype)


def philox_first_word(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """Philox-4x32-10 (Salmon et al. 2011, Random123), the first output word, written with int64
    tensor ops: key = (seed & 0xffffffff, seed >> 32), counter = (counter lo, counter hi, 0, 0)
    (``counter``: int64 tensor of non-negative 64-bit counters). Returns the words as int64 in
    [0, 2^32). The kernels' generator (csrc/common/attention.h), one counter per element."""
    m32 = 0xFFFFFFFF
    c0, c1 = counter & m32, (counter >> 32) & m32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & m32, (seed >> 32) & m32
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + 0x9E3779B9) & m32, (k1 + 0xBB67AE85) & m32
        # 32 x 32 -> 64-bit products; int64 wraps modulo 2^64, so the bits are exact
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        hi0, lo0 = (p0 >> 32) & m32, p0 & m32
        hi1, lo1 = (p1 >> 32) & m32, p1 & m32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0


def dropout_keep_mask(seed: int, offset: int, shape: tuple, dropout_p: float, device=None) -> torch.Tensor:
    """The attention kernels' dropout keep mask (csrc/common/attention.h) for weights of ``shape``
    (B, H, L, S): element (b, h, i, j) is kept when philox(seed, offset + linear index) * 2^-32 >=
    dropout_p. Bool tensor of ``shape``; forms the weights the kernel applied to its output."""
    n = 1
    for d in shape:
        n *= d
    counter = torch.arange(offset, offset + n, dtype=torch.int64, device=device).reshape(shape)
    return philox_first_word(seed, counter).to(torch.float64) * 2.0 ** -32 >= dropout_p
