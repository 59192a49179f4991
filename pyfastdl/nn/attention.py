"""The notes' attention interface on pyfastdl's fused kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from .. import functional as PF

__all__ = ["DotProductAttention", "MultiheadAttention"]


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
    state_dict). With ``need_weights=False`` the attention runs in pyfastdl's fused kernel
    (projections by F.linear, key_padding_mask and attn_mask merged into one mask, dropout inside the
    kernel). ``need_weights=True`` (torch's default), ``add_bias_kv``, ``add_zero_attn`` and unbatched
    input take torch's own path, and say so (``pyfastdl.backends.last_dispatch()``; under
    PYFASTDL_STRICT=1 they raise)."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        why = None
        if need_weights:
            why = "need_weights=True needs the attention weights, which the fused kernel never forms"
        elif self.bias_k is not None or self.add_zero_attn:
            why = "add_bias_kv / add_zero_attn"
        elif query.dim() != 3:
            why = "unbatched input"
        if why is not None:
            backends.record("MultiheadAttention", "torch", why)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        N, L, _ = query.shape
        S, H, hd = key.shape[1], self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q).view(N, L, H, hd).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(N, S, H, hd).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(N, S, H, hd).transpose(1, 2)
        mask = _merge_masks(attn_mask, key_padding_mask, N, H, L, S, q.dtype)
        causal = bool(is_causal) and mask is None  # torch: is_causal is a hint that attn_mask is causal
        out = PF.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                              is_causal=causal)
        out = F.linear(out.transpose(1, 2).reshape(N, L, self.embed_dim), self.out_proj.weight, self.out_proj.bias)
        return (out if self.batch_first else out.transpose(0, 1)), None


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
