"""The functional API: drop-in for ``torch.nn.functional`` (thin: validate, pick a backend, call the
autograd Function). Data flows module -> functional -> backend choice -> Function -> op -> kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from .autograd import AttentionFunction, BatchNormFunction
from .reference import batch_norm_like_torch, sdpa_like_torch
from .reference import masked_softmax as masked_softmax_notes

__all__ = ["batch_norm", "scaled_dot_product_attention", "masked_softmax"]

# Input dtypes each kernel backend covers; anything else falls back (visibly, never when strict).
_BATCH_NORM_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
_ACTIVATIONS = (None, "relu")
# batch_norm_fwd with its autograd formula in C++ (csrc/cpu/batch_norm_autograd.cpp); the overload
# resolved once
_BATCH_NORM_OP = torch.ops.pyfastdl.batch_norm.default
_BN_TENSOR_ARGS = ("weight", "bias", "running_mean", "running_var")


def _check_same_device(op: str, input: torch.Tensor, names: tuple, tensors: tuple) -> None:
    """Optional tensor arguments must be Tensors on input's device (checked here: the dispatcher
    would otherwise route a mixed call to another device's kernel)."""
    device = input.device
    for name, t in zip(names, tensors):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: expected {name} to be a Tensor or None, got {type(t).__name__}")
        if t.device != device:
            raise RuntimeError(f"{op}: expected {name} on {device} like input, got {name} on {t.device}")


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
               activation: str | None = None) -> torch.Tensor:
    """Batch normalization over dim 1, drop-in for ``torch.nn.functional.batch_norm``.

    input: (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), float32/float64 (CPU kernels; CUDA and
    Triton also float16/bfloat16); contiguous or channels_last (read without a copy).
    running_mean, running_var: (C,) or None, updated in place when training (torch's rule: unbiased
    variance, ``momentum`` weights the new statistic). weight, bias: (C,) or None.
    activation: None, or "relu" to fuse max(y, 0) into the kernel (pyfastdl's own argument).
    Returns y of input's shape, dtype and memory format. Ioffe & Szegedy 2015; notes section 28.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: expected input to be a Tensor, got {type(input).__name__}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"batch_norm: expected activation in {_ACTIVATIONS}, got {activation!r}")
    _check_same_device("batch_norm", input, _BN_TENSOR_ARGS, (weight, bias, running_mean, running_var))
    if not input.is_floating_point():
        raise RuntimeError(f"batch_norm: expected a floating-point input, got input of dtype {input.dtype}")
    relu = activation == "relu"

    backend = backends.pick("batch_norm", input.device, input.dtype, _BATCH_NORM_DTYPES)
    if backend == "torch":
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(y) if relu else y
    if backend == "reference":
        if training and input.numel() // max(input.shape[1], 1) <= 1 and input.numel() > 0:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        return batch_norm_like_torch(input, running_mean, running_var, weight, bias, training,
                                     momentum, eps, activation)
    if backend != "triton":  # cpu, cuda: the op's derivative is registered in C++, no Python per backward
        return _BATCH_NORM_OP(input, weight, bias, running_mean, running_var, bool(training), float(momentum),
                              float(eps), relu)
    ops = backends.ops(backend, "batch_norm")
    if not (torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                         or (bias is not None and bias.requires_grad))):
        # Nothing to differentiate: the op alone, without the autograd Function's bookkeeping.
        return ops.batch_norm_fwd(input, weight, bias, running_mean, running_var, bool(training),
                                  float(momentum), float(eps), relu)[0]
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, bool(training),
                                   float(momentum), float(eps), relu, ops)


# ---- attention ---------------------------------------------------------------------------------------

_ATTENTION_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


def masked_softmax(X: torch.Tensor, valid_lens: torch.Tensor | None) -> torch.Tensor:
    """The notes' masked softmax (section 65, ``pyfastdl.reference.masked_softmax``): X (batch,
    queries, keys); positions at or beyond the valid length ((batch,) or (batch, queries)) get -1e6
    before the softmax, so a row whose valid length is 0 weighs every position equally. Unlike the
    notes' code, X is not overwritten."""
    return masked_softmax_notes(X if valid_lens is None else X.clone(), valid_lens)


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                                 *, valid_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: one fused, tiled kernel
    (FlashAttention-2: online softmax, the (L, S) score matrix never exists), forward and backward.

    query (..., L, E), key (..., S, E), value (..., S, Ev) with the same leading dimensions, except
    that with ``enable_gqa`` key and value may have fewer heads (dim -3) than query. attn_mask: bool
    (True = takes part) or float (added), broadcastable to (..., L, S). is_causal: key j <= query i.
    A query with no key left gets 0, as torch. Dropout inside the kernel (Philox keyed by a seed drawn
    from torch's generator), the same mask in the backward.
    valid_lens (pyfastdl's own, the notes' masking): (N,) or (N, L) lengths, N = the first dimension
    of query; keys at or beyond the length are left out; a length <= 0 weighs every key equally (the
    notes' -1e6 fill). Kernels: cpu float32/float64; cuda, triton float16/bfloat16/float32.
    Vaswani et al. 2017; Dao 2023 (FlashAttention-2); notes sections 65-67."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention: expected {name} to be a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise RuntimeError(f"scaled_dot_product_attention: expected {name} of at least 2 dimensions (..., L, E), "
                               f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise RuntimeError(f"scaled_dot_product_attention: expected a floating-point {name}, got {t.dtype}")
    if not (key.dtype == query.dtype == value.dtype):
        raise RuntimeError(f"scaled_dot_product_attention: expected query, key, value of one dtype, got "
                           f"{query.dtype}, {key.dtype}, {value.dtype}")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"scaled_dot_product_attention: query and key must have the same head dim, got "
                           f"{query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"scaled_dot_product_attention: key and value must have the same sequence length, got "
                           f"{key.shape[-2]} and {value.shape[-2]}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise RuntimeError("scaled_dot_product_attention: explicit attn_mask should not be set when is_causal=True")
    _check_same_device("scaled_dot_product_attention", query, ("key", "value", "attn_mask", "valid_lens"),
                       (key, value, attn_mask, valid_lens))
    batch, L, E = query.shape[:-2], query.shape[-2], query.shape[-1]
    S, Ev = key.shape[-2], value.shape[-1]
    # (B, heads, L, E): dims before the head dim (-3) form B; 3-D input (N, L, E) is N x 1 head
    heads_dim = query.dim() >= 4
    heads = batch[-1] if heads_dim else 1
    lead = batch[:-1] if heads_dim else batch
    kv_heads = key.shape[-3] if heads_dim else 1
    if key.dim() != query.dim() or value.dim() != query.dim() or key.shape[:len(lead)] != lead or \
            value.shape[:len(lead)] != lead or (heads_dim and value.shape[-3] != kv_heads):
        raise RuntimeError(f"scaled_dot_product_attention: query {tuple(query.shape)}, key {tuple(key.shape)} and "
                           f"value {tuple(value.shape)} must have the same leading dimensions")
    if kv_heads != heads:
        if not enable_gqa:
            raise RuntimeError(f"scaled_dot_product_attention: query has {heads} heads but key/value {kv_heads}; "
                               "pass enable_gqa=True for grouped-query attention")
        if heads % kv_heads:
            raise RuntimeError(f"scaled_dot_product_attention: the query heads ({heads}) must be a multiple of the "
                               f"key/value heads ({kv_heads})")
    scale = 1.0 / E ** 0.5 if scale is None else float(scale)
    B = 1
    for d in lead:
        B *= d
    q4 = query.reshape(B, heads, L, E)
    k4 = key.reshape(B, kv_heads, S, E)
    v4 = value.reshape(B, kv_heads, S, Ev)
    mask4 = None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask must be bool or floating point, got "
                               f"{attn_mask.dtype}")
        try:
            mask4 = attn_mask.expand(tuple(batch) + (L, S)).reshape(B, heads, L, S)
        except RuntimeError as e:
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} is not "
                               f"broadcastable to {tuple(batch) + (L, S)}") from e
    vl = None
    if valid_lens is not None:
        n = query.shape[0] if query.dim() >= 3 else 1
        if valid_lens.dim() not in (1, 2) or valid_lens.shape[0] != n or \
                (valid_lens.dim() == 2 and valid_lens.shape[1] != L):
            raise RuntimeError(f"scaled_dot_product_attention: expected valid_lens of shape ({n},) or ({n}, {L}), "
                               f"got {tuple(valid_lens.shape)}")
        if valid_lens.is_floating_point() or valid_lens.dtype == torch.bool:
            raise RuntimeError(f"scaled_dot_product_attention: valid_lens must be integer, got {valid_lens.dtype}")
        vl = valid_lens.to(torch.int64)
        per_b = B // n  # the first dimension's entries own B / n consecutive (batch) rows
        if per_b != 1:
            vl = vl.repeat_interleave(per_b, dim=0)
    out_shape = tuple(batch) + (L, Ev)

    backend, fallback = backends.resolve("scaled_dot_product_attention", query.device,
                                         backends.dtype_covers(_ATTENTION_DTYPES, query.dtype))
    backends.record("scaled_dot_product_attention", backend, fallback)
    if backend in ("torch", "reference"):
        if backend == "torch" and vl is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return sdpa_like_torch(q4, k4, v4, mask4, dropout_p, is_causal, scale, enable_gqa=heads != kv_heads,
                               valid_lens=vl).reshape(out_shape)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
    ops = backends.ops(backend, "attention")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        out = AttentionFunction.apply(q4, k4, v4, mask4, vl, bool(is_causal), scale, float(dropout_p), seed, ops)
    else:
        out = ops.attention_fwd(q4, k4, v4, mask4, vl, bool(is_causal), scale, float(dropout_p), seed, 0)[0]
    return out.reshape(out_shape)
