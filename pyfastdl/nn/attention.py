"""The notes' attention interface on pyfastdl's fused kernel."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as PF

__all__ = ["DotProductAttention"]


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
