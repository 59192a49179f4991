"""The notes' attention interface on pyfastdl's fused kernel."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as PF
from ..reference.attention import dropout_keep_mask

__all__ = ["DotProductAttention", "MultiheadAttention", "TransformerEncoderLayer"]


class DotProductAttention(nn.Module):
    """Drop-in for the notes' ``DotProductAttention(dropout)`` (section 65, pyfastdl.reference):
    ``forward(queries (N, L, d), keys (N, S, d), values (N, S, dv), valid_lens=None)`` with the notes'
    valid_lens rule, computed by ``pyfastdl.functional.scaled_dot_product_attention`` (one fused
    kernel; dropout on the weights inside it while training). The fused kernel never forms the
    weights, so unlike the notes' module this one keeps no ``attention_weights`` (it is None)."""

    def __init__(self, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.dropout = float(dropout.p if isinstance(dropout, nn.Dropout) else dropout)
        self.attention_weights = None

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                valid_lens: torch.Tensor | None = None) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return PF.scaled_dot_product_attention(queries, keys, values, dropout_p=p, valid_lens=valid_lens)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` (a subclass: same constructor, parameters,
    state_dict), every call on pyfastdl's fused kernel, following ``F.multi_head_attention_forward``
    step by step: projections by F.linear, ``add_bias_kv`` (a bias key/value appended to the
    sequence), ``add_zero_attn`` (a zero key/value appended), unbatched (L, E) input, key_padding_mask
    and attn_mask (bool True = may NOT attend, or float added) merged into one kernel mask, dropout
    inside the kernel, the ``is_causal`` hint used as torch uses it. torch's eval-mode fast path
    (``torch._native_multi_head_attention``) is never taken: the kernel runs in both modes.

    need_weights=True (torch's default): the output still comes from the fused kernel; the weights
    are then formed in a second pass from q, k and the masks, (N, H, L, S) materialized (they were
    asked for): softmax(scale q k^T + mask), then, while training with dropout, the kernel's own
    dropout mask (Philox, regenerated from the same seed) applied, as torch returns the weights
    after dropout. Averaged over the heads when ``average_attn_weights`` (torch's default), else
    per head. They are differentiable like torch's.
    Deliberate differences: a query row with every key masked gives output 0 (torch: NaN with
    need_weights=True, 0 with need_weights=False); its weights are NaN as torch's. Dropout draws
    different random numbers than torch."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is not None and m.dtype != torch.bool and not torch.is_floating_point(m):
                raise AssertionError(f"only bool and floating types of {name} are supported")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        # torch: the hint replaces attn_mask only without key_padding_mask and weights
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        if not is_batched:
            query, key, value = _same_way(lambda x: x.unsqueeze(0), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = _same_way(lambda x: x.transpose(0, 1), query, key, value)
        N, L, E = query.shape
        H, hd = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {E}")
        if self._qkv_same_embed_dim and key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if not self._qkv_same_embed_dim and key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        q, k, v = self._project(query, key, value)
        if self.bias_k is not None:  # a learned key/value appended to every sequence
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
        S = k.shape[1]
        q = q.view(N, L, H, hd).transpose(1, 2)
        k = k.view(N, S, H, hd).transpose(1, 2)
        v = v.view(N, S, H, hd).transpose(1, 2)
        if self.add_zero_attn:  # a zero key/value appended (after the heads split, as torch)
            k = torch.cat([k, k.new_zeros(N, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, hd)], dim=2)
            attn_mask, key_padding_mask = _pad_masks(attn_mask, key_padding_mask)
            S += 1
        if attn_mask is not None and attn_mask.shape[-1] != S:
            raise RuntimeError(f"The shape of the attn_mask is {tuple(attn_mask.shape)}, but its last dimension "
                               f"should be {S}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (N, S):
            raise AssertionError(f"expecting key_padding_mask shape of {(N, S)}, but got "
                                 f"{tuple(key_padding_mask.shape)}")
        mask = _merge_masks(attn_mask, key_padding_mask, N, H, L, S, q.dtype)
        p = self.dropout if self.training else 0.0
        seed = None
        if need_weights and p > 0:
            # the seed pyfastdl.functional draws next, peeked without consuming it (the weights
            # below repeat the kernel's dropout mask)
            state = torch.get_rng_state()
            seed = int(torch.randint(0, 2**62, (1,)).item())
            torch.set_rng_state(state)
        out = PF.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = F.linear(out.transpose(1, 2).reshape(N, L, E), self.out_proj.weight, self.out_proj.bias)
        out = out if not is_batched else (out if self.batch_first else out.transpose(0, 1))
        if not is_batched:
            out = out.squeeze(0)
        if not need_weights:
            return out, None
        weights = _attention_weights(q, k, mask, p, seed)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, (weights if is_batched else weights.squeeze(0))

    def _project(self, query, key, value):
        """The input projections as torch's ``_in_projection_packed`` / ``_in_projection``: one GEMM for
        self-attention (query is key is value), two when key is value."""
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            return (F.linear(query, self.q_proj_weight, b_q), F.linear(key, self.k_proj_weight, b_k),
                    F.linear(value, self.v_proj_weight, b_v))
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            return F.linear(query, w, b).chunk(3, dim=-1)
        w_q, w_kv = w.split([self.embed_dim, 2 * self.embed_dim])
        b_q, b_kv = b.split([self.embed_dim, 2 * self.embed_dim]) if b is not None else (None, None)
        if key is value:
            return (F.linear(query, w_q, b_q),) + tuple(F.linear(key, w_kv, b_kv).chunk(2, dim=-1))
        w_k, w_v = w_kv.chunk(2)
        b_k, b_v = b_kv.chunk(2) if b is not None else (None, None)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _same_way(f, query, key, value):
    """f applied to each, keeping ``query is key`` / ``key is value`` (self-attention projects with
    one GEMM; torch keeps the identities the same way)."""
    q = f(query)
    k = q if key is query else f(key)
    v = k if value is key else (q if value is query else f(value))
    return q, k, v


def _pad_masks(attn_mask, key_padding_mask):
    """One more key position that every query may attend (torch pads the masks with a 0 column)."""
    return tuple(None if m is None else F.pad(m, (0, 1)) for m in (attn_mask, key_padding_mask))


def _attention_weights(q, k, mask, dropout_p, seed):
    """The weights the kernel applied, (N, H, L, S): softmax(q k^T / sqrt(d) + mask) over the
    materialized scores, times the kernel's dropout keep mask / (1 - p) when dropout ran."""
    scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, 0, tuple(weights.shape), dropout_p, device=weights.device)
        weights = weights * keep / (1.0 - dropout_p)
    return weights


def _merge_masks(attn_mask, key_padding_mask, N, H, L, S, dtype):
    """nn.MultiheadAttention's masks (bool True = may NOT attend, or float added; attn_mask (L, S)
    or (N * H, L, S), key_padding_mask (N, S)) as one SDPA mask (bool True = may attend, or float)
    broadcastable to (N, H, L, S)."""
    parts = []
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(N, H, L, S)
        parts.append(m)
    if key_padding_mask is not None:
        parts.append(key_padding_mask.view(N, 1, 1, S))
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        blocked = parts[0]
        for p in parts[1:]:
            blocked = blocked | p
        return ~blocked
    total = None
    for p in parts:
        f = torch.zeros(p.shape, dtype=dtype, device=p.device).masked_fill(p, float("-inf")) \
            if p.dtype == torch.bool else p.to(dtype)
        total = f if total is None else total + f
    return total


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` whose self-attention always runs (pyfastdl's
    MultiheadAttention after ``convert``): torch's eval-mode fast path
    (``torch._transformer_encoder_layer_fwd``) would compute the whole layer in one ATen op and
    bypass ``self.self_attn``; this forward is torch's standard path, step by step."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        src_key_padding_mask = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask",
                                                 other_type=F._none_or_dtype(src_mask), other_name="src_mask",
                                                 target_type=src.dtype)
        src_mask = F._canonical_mask(mask=src_mask, mask_name="src_mask", other_type=None, other_name="",
                                     target_type=src.dtype, check_other=False)
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x
