"""The functional API: drop-in for ``torch.nn.functional`` (thin: validate, pick a backend, call the
autograd Function). Data flows module -> functional -> backend choice -> Function -> op -> kernel."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _C, backends
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
# activation -> the ops' code (pyfastdl.autograd.batch_norm.ACTIVATIONS: None 0, "relu" 1, "sigmoid" 2)
_ACTIVATIONS = {"relu": 1, "sigmoid": 2}
# batch_norm_fwd with its autograd formula in C++ (csrc/cpu/batch_norm_autograd.cpp); the overload
# resolved once
_BATCH_NORM_OP = torch.ops.pyfastdl.batch_norm.default
_BN_TENSOR_ARGS = ("weight", "bias", "running_mean", "running_var")
_is_compiling = torch.compiler.is_compiling


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

    input: (N, C, *) of any rank >= 2 ((N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W), ...),
    float32/float64 (CPU kernels; CUDA and Triton also float16/bfloat16); contiguous or
    channels_last (read without a copy). A 1-D empty input gives an empty result, as torch.
    eps > 0 when training, eps >= 0 in eval (ValueError otherwise, as torch).
    running_mean, running_var: (C,) or None, updated in place when training (torch's rule: unbiased
    variance, ``momentum`` weights the new statistic). weight, bias: (C,) or None.
    activation: None, "relu" or "sigmoid": fused into the kernel's epilogue, forward and backward
    (pyfastdl's own argument; the notes put a sigmoid or a ReLU after every batch norm).
    Returns y of input's shape, dtype and memory format. Ioffe & Szegedy 2015; notes section 28.
    Differentiable twice: backward(create_graph=True) recomputes the forward with the reference
    math to give gradients with a graph (recorded as batch_norm_double_backward -> reference).
    Deliberate differences from torch (pinned in tests/test_batch_norm_hardening.py): a NaN or Inf
    momentum raises ValueError (torch accepts it and writes NaN running statistics); C = 0 with a
    weight gives an empty result (torch raises IndexError).
    """
    # The common case, kept lean (per-call cost): the cpu/cuda op with its C++ derivative through its
    # direct entry (csrc/cpu/percall.cpp), which returns None for what it does not take (another
    # device, a non-floating or 1-D input, a non-Tensor argument): the full path below then runs.
    act = 0 if activation is None else _ACTIVATIONS.get(activation, -1) if type(activation) is str else -1
    if (act >= 0 and type(input) is torch.Tensor and not _is_compiling()
            and backends.picked("batch_norm", input.device, input.dtype) is not None):
        out = _C.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, act)
        if out is not None:
            return out
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"batch_norm: expected input to be a Tensor, got {type(input).__name__}")
    if act < 0:
        raise ValueError(f"batch_norm: expected activation in (None, 'relu', 'sigmoid'), got {activation!r}")
    _check_same_device("batch_norm", input, _BN_TENSOR_ARGS, (weight, bias, running_mean, running_var))
    if not input.is_floating_point():
        raise RuntimeError(f"batch_norm: expected a floating-point input, got input of dtype {input.dtype}")
    if input.dim() == 1 and input.numel() == 0:
        # torch returns an empty result for a 1-D empty input (an OpInfo sample); there is nothing
        # for a kernel to do. Its running statistics must be empty too, as torch checks.
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.numel() != 0:
                raise RuntimeError(f"batch_norm: expected {name} of 0 elements for a 1-D empty input, "
                                   f"got {t.numel()}")
        return input.clone()

    backend = backends.pick("batch_norm", input.device, input.dtype, _BATCH_NORM_DTYPES)
    if backend == "torch":
        y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
        return F.relu(y) if act == 1 else torch.sigmoid(y) if act == 2 else y
    if backend == "reference":
        if training and math.prod(input.shape[:1] + input.shape[2:]) == 1:  # torch's rule
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")
        return batch_norm_like_torch(input, running_mean, running_var, weight, bias, training,
                                     momentum, eps, activation)
    if backend != "triton":  # cpu, cuda: the op's derivative is registered in C++, no Python per backward
        return _BATCH_NORM_OP(input, weight, bias, running_mean, running_var, bool(training), float(momentum),
                              float(eps), act)
    ops = backends.ops(backend, "batch_norm")
    if not (torch.is_grad_enabled() and (input.requires_grad or (weight is not None and weight.requires_grad)
                                         or (bias is not None and bias.requires_grad))):
        # Nothing to differentiate: the op alone, without the autograd Function's bookkeeping.
        return ops.batch_norm_fwd(input, weight, bias, running_mean, running_var, bool(training),
                                  float(momentum), float(eps), act)[0]
    return BatchNormFunction.apply(input, weight, bias, running_mean, running_var, bool(training),
                                   float(momentum), float(eps), act, ops)


# ---- attention ---------------------------------------------------------------------------------------

_ATTENTION_DTYPES = {
    # CPU float16 / bfloat16: the float32 kernel on inputs converted once per call (csrc/cpu/attention.cpp)
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


# attention_fwd with its autograd formula in C++ (csrc/cpu/attention_autograd.cpp); the overload
# resolved once
_ATTENTION_OP = torch.ops.pyfastdl.attention.default


def _sdpa_error(msg: str) -> RuntimeError:
    return RuntimeError(f"scaled_dot_product_attention: {msg}")


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _gqa_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[int, int, int]:
    """torch's enable_gqa rule (dim -3 holds the heads): key and value heads both divide the query
    heads, each repeated (repeat_interleave) up to them; all equal means plain attention."""
    if min(query.dim(), key.dim(), value.dim()) < 3:
        raise IndexError("scaled_dot_product_attention: enable_gqa reads the heads at dim -3; expected query, key "
                         f"and value of at least 3 dimensions, got {query.dim()}, {key.dim()} and {value.dim()}")
    hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if not (hq == hk == hv) and (hk == 0 or hv == 0 or hq % hk or hq % hv):
        raise _sdpa_error(f"the number of heads in key ({hk}) and value ({hv}) must divide the number of heads in "
                          f"query ({hq}) with enable_gqa=True")
    return hq, hk, hv


def _as_4d(t: torch.Tensor, batch: tuple, B: int, H: int, n: int, d: int) -> torch.Tensor:
    """t (..., n, d), broadcastable to batch + (n, d), as the kernel's (B, H, n, d): a view when the
    strides allow (stride 0 where broadcast), a copy otherwise."""
    if t.dim() == 4 and t.shape == (B, H, n, d):
        return t
    return t.expand(batch + (n, d)).reshape(B, H, n, d)


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

    query (..., L, E), key (..., S, E), value (..., S, Ev); the leading dimensions broadcast as
    torch's (matmul's rule: a 3-D query against 4-D key/value, size-1 batch or head dims). With
    ``enable_gqa`` dim -3 holds the heads: key and value heads must each divide the query heads
    (grouped-query attention, run natively by the kernel, no copy of key/value). attn_mask: bool
    (True = takes part) or float (added; float32 or query's dtype, as torch), broadcastable to
    (..., L, S). is_causal: key j <= query i. A query with no key left gets 0, as torch. Dropout
    inside the kernel (Philox keyed by a seed drawn from torch's generator), the same mask in the
    backward; dropout_p = 1 gives zeros (and zero gradients), as torch.
    Edge sizes as torch: L, heads or batch 0 give an empty result; S = 0 gives zeros; head dim
    E = 0 gives the mean of the values (every score is 0).
    Deliberate differences from torch: a 1-D or 0-D attn_mask is broadcast for 4-D inputs too
    (torch's CPU flash path raises IndexError there, its math path broadcasts); dropout draws
    different random numbers (Philox, csrc/common/attention.h) from torch's.
    valid_lens (pyfastdl's own, the notes' masking): (N,) or (N, L) lengths, N = the first dimension
    of the (broadcast) batch; keys at or beyond the length are left out; a length <= 0 weighs every
    key equally (the notes' -1e6 fill). Kernels: cpu float32/float64; cuda, triton
    float16/bfloat16/float32.
    Vaswani et al. 2017; Dao 2023 (FlashAttention-2); notes sections 65-67."""
    # The common case, kept lean (per-call cost): the cpu/cuda op with its C++ derivative through its
    # direct entry (csrc/cpu/percall.cpp), which takes plain 4-D tensors of one (B, H), dtype and device,
    # nothing empty, and returns None for anything else -- as does everything else here -- so that the
    # full path below (its checks, its errors) runs. Under torch.compile, always the full path.
    if (attn_mask is None and valid_lens is None and not dropout_p and not enable_gqa and type(query) is torch.Tensor
            and not _is_compiling()
            and backends.picked("scaled_dot_product_attention", query.device, query.dtype) is not None):
        out = _C.attention(query, key, value, is_causal, scale)
        if out is not None:
            return out
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention: expected {name} to be a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise _sdpa_error(f"expected {name} of at least 2 dimensions (..., L, E), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise _sdpa_error(f"expected a floating-point {name}, got {t.dtype}")
    if not (key.dtype == query.dtype == value.dtype):
        raise _sdpa_error(f"expected query, key, value of one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    qs, ks, vs = query.shape, key.shape, value.shape
    if qs[-1] != ks[-1]:
        raise _sdpa_error(f"query and key must have the same head dim, got {qs[-1]} and {ks[-1]}")
    if ks[-2] != vs[-2]:
        raise _sdpa_error(f"key and value must have the same sequence length, got {ks[-2]} and {vs[-2]}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1], got {dropout_p}")
    if is_causal and attn_mask is not None:
        raise _sdpa_error("explicit attn_mask should not be set when is_causal=True")
    _check_same_device("scaled_dot_product_attention", query, ("key", "value", "attn_mask", "valid_lens"),
                       (key, value, attn_mask, valid_lens))
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        # torch's rule and words (validate_sdpa_input)
        raise _sdpa_error(f"expected attn_mask dtype to be bool or float or to match query dtype, but got "
                          f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead")
    if dropout_p == 1.0:
        # torch: dropout(p=1) multiplies the weights by 0 -- zeros, zero gradients, NaN kept
        return scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa,
                                            valid_lens=valid_lens) * 0
    L, E, S, Ev = qs[-2], qs[-1], ks[-2], vs[-1]
    # Batch dims: broadcast as torch (k, v repeated over the query heads first under enable_gqa).
    # The kernel takes (B, heads, L, E) q and (B, kv_heads, S, E) k, v with heads % kv_heads == 0.
    if enable_gqa:
        hq, hk, hv = _gqa_heads(query, key, value)
        gqa = not hq == hk == hv
    else:
        gqa = False
    qb, kb, vb = qs[:-2], ks[:-2], vs[:-2]
    if qb == kb == vb:
        batch = qb  # the common case: no broadcasting
    else:
        try:
            batch = torch.broadcast_shapes(qb, kb[:-1] + (hq,) if gqa else kb, vb[:-1] + (hq,) if gqa else vb)
        except RuntimeError as e:
            hint = ""
            if not enable_gqa and min(query.dim(), key.dim()) >= 3 and key.shape[-3] > 0 and \
                    query.shape[-3] % key.shape[-3] == 0:
                hint = "; for grouped-query attention (fewer key/value heads) pass enable_gqa=True"
            raise _sdpa_error(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)}: "
                              f"the leading dimensions do not broadcast ({e}){hint}") from None
    # (B, heads): the last batch dim is the heads when there are two or more (or under GQA)
    split = len(batch) >= 2 or gqa
    heads = batch[-1] if split else 1
    lead = batch[:-1] if split else batch
    B = _prod(lead)
    batch = tuple(batch)
    out_shape = batch + (L, Ev)
    if attn_mask is not None:
        try:
            attn_mask_b = attn_mask if attn_mask.shape == batch + (L, S) else attn_mask.expand(batch + (L, S))
        except RuntimeError as e:
            raise _sdpa_error(f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to "
                              f"{tuple(batch) + (L, S)}") from e
    if valid_lens is not None:
        n = batch[0] if batch else 1
        if valid_lens.dim() not in (1, 2) or valid_lens.shape[0] != n or \
                (valid_lens.dim() == 2 and valid_lens.shape[1] != L):
            raise _sdpa_error(f"expected valid_lens of shape ({n},) or ({n}, {L}), got {tuple(valid_lens.shape)}")
        if valid_lens.is_floating_point() or valid_lens.dtype == torch.bool:
            raise _sdpa_error(f"valid_lens must be integer, got {valid_lens.dtype}")
        if not lead and n > 1:
            raise _sdpa_error("valid_lens indexes the first dimension, which holds the heads here (enable_gqa "
                              "on 3-D input); pass 4-D (N, heads, L, E) input")
    if B * heads * L * Ev == 0:
        # nothing to compute (L, heads, batch or Ev is 0): zeros tied to the inputs, zero gradients
        backend, fallback = backends.resolve("scaled_dot_product_attention", query.device,
                                             backends.dtype_covers(_ATTENTION_DTYPES, query.dtype))
        backends.record("scaled_dot_product_attention", backend, fallback)
        return query.new_zeros(out_shape) + (query.sum() + key.sum() + value.sum()) * 0
    if E == 0:
        # every score is 0 (an empty dot product), whatever the scale: torch gives the mean of the
        # values. The kernel sees a head dim of 1 holding zeros; q and k keep their (empty) gradient.
        zq, zk = query.new_zeros(query.shape[:-1] + (1,)), key.new_zeros(key.shape[:-1] + (1,))
        if query.requires_grad or key.requires_grad:
            zq = zq + (query.sum() + key.sum()) * 0
        query, key, E, scale = zq, zk, 1, 1.0
    q4 = _as_4d(query, batch, B, heads, L, E)
    kv_heads = heads
    if gqa:
        # the kernel's grouped heads: query head h reads key/value head h // (heads / kv_heads); key and
        # value with different head counts meet at the larger one when it is a multiple of the other
        kv_heads = max(hk, hv) if max(hk, hv) % min(hk, hv) == 0 else hq
        key, value = (t if t.shape[-3] == kv_heads else t.repeat_interleave(kv_heads // t.shape[-3], dim=-3)
                      for t in (key, value))
    elif split and heads > 1 and (key.dim() < 3 or key.shape[-3] == 1) and (value.dim() < 3 or value.shape[-3] == 1):
        kv_heads = 1  # key and value broadcast over the heads: one shared head (multi-query), no copy
    k_batch = lead + (kv_heads,) if split else batch
    k4 = _as_4d(key, k_batch, B, kv_heads, S, E)
    v4 = _as_4d(value, k_batch, B, kv_heads, S, Ev)
    scale = 1.0 / E ** 0.5 if scale is None else float(scale)
    mask4 = None if attn_mask is None else _as_4d(attn_mask_b, batch, B, heads, L, S)
    vl = None
    if valid_lens is not None:
        vl = valid_lens.to(torch.int64)
        per_b = B // n  # the first dimension's entries own B / n consecutive (batch) rows
        if per_b != 1:
            vl = vl.repeat_interleave(per_b, dim=0)

    backend = backends.pick("scaled_dot_product_attention", query.device, query.dtype, _ATTENTION_DTYPES)
    if backend in ("torch", "reference"):
        if backend == "torch" and vl is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return sdpa_like_torch(q4, k4, v4, mask4, dropout_p, is_causal, scale, enable_gqa=heads != kv_heads,
                               valid_lens=vl).reshape(out_shape)
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
    if backend != "triton":  # cpu, cuda: the op's derivative is registered in C++, no Python per backward
        out = _ATTENTION_OP(q4, k4, v4, mask4, vl, bool(is_causal), scale, float(dropout_p), seed)
        return out if out.shape == out_shape else out.reshape(out_shape)  # no view node for 4-D input
    ops = backends.ops(backend, "attention")
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad or
                                    (attn_mask is not None and attn_mask.requires_grad)):
        out = AttentionFunction.apply(q4, k4, v4, mask4, vl, bool(is_causal), scale, float(dropout_p), seed, ops)
    else:
        out = ops.attention_fwd(q4, k4, v4, mask4, vl, bool(is_causal), scale, float(dropout_p), seed, 0)[0]
    return out.reshape(out_shape)


# ---- LSTM and GRU cells (family rnn) -------------------------------------------------------------------

from .autograd.rnn import GRUCellFunction, LSTMCellFunction  # noqa: E402
from .reference.rnn import gru_cell_like_torch, lstm_cell_like_torch  # noqa: E402

_RNN_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}
__all__ += ["lstm_cell", "gru_cell"]


def _rnn_needs_grad(*tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def lstm_cell(input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor], w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step, drop-in for ``torch._VF.lstm_cell`` (what ``torch.nn.LSTMCell`` calls).

    input (B, I); hx = (h, c), each (B, H); w_ih (4H, I), w_hh (4H, H); b_ih, b_hh (4H,) or None.
    Gates in torch's order (i, f, g, o): i, f, o = sigmoid, g = tanh of x W_ih^T + b_ih + h W_hh^T + b_hh;
    c' = f c + i g, h' = o tanh(c'). Returns (h', c'), each (B, H). float32/float64 on the CPU.
    Both GEMMs and one fused pointwise kernel in one op, forward and backward (notes section 57).
    Double backward raises."""
    h, c = hx
    backend = backends.pick("lstm_cell", input.device, input.dtype, _RNN_DTYPES)
    if backend == "reference":  # the notes' math in torch's layout
        return lstm_cell_like_torch(input, h, c, w_ih, w_hh, b_ih, b_hh)
    if backend == "torch":
        return torch._VF.lstm_cell(input, (h, c), w_ih, w_hh, b_ih, b_hh)
    ops = backends.ops(backend, "rnn")
    if _rnn_needs_grad(input, h, c, w_ih, w_hh, b_ih, b_hh):
        return LSTMCellFunction.apply(input, h, c, w_ih, w_hh, b_ih, b_hh, ops)
    hy, cy, _ = ops.lstm_cell_fwd(input, h, c, w_ih, w_hh, b_ih, b_hh)
    return hy, cy


def gru_cell(input: torch.Tensor, hx: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
             b_ih: torch.Tensor | None = None, b_hh: torch.Tensor | None = None) -> torch.Tensor:
    """One GRU step, drop-in for ``torch._VF.gru_cell`` (what ``torch.nn.GRUCell`` calls).

    input (B, I); hx (B, H); w_ih (3H, I), w_hh (3H, H); b_ih, b_hh (3H,) or None. Gates in torch's
    order (r, z, n): r, z = sigmoid(x W^T + b_i + h W^T + b_h), n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)),
    h' = (1 - z) n + z h. Returns h' (B, H). float32/float64 on the CPU (notes section 56).
    Double backward raises."""
    backend = backends.pick("gru_cell", input.device, input.dtype, _RNN_DTYPES)
    if backend == "reference":  # the notes' math in torch's layout
        return gru_cell_like_torch(input, hx, w_ih, w_hh, b_ih, b_hh)
    if backend == "torch":
        return torch._VF.gru_cell(input, hx, w_ih, w_hh, b_ih, b_hh)
    ops = backends.ops(backend, "rnn")
    if _rnn_needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh):
        return GRUCellFunction.apply(input, hx, w_ih, w_hh, b_ih, b_hh, ops)
    return ops.gru_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh)[0]
# ---- conv2d --------------------------------------------------------------------------------------

from .autograd.conv2d import Conv2dFunction, conv2d_reference  # noqa: E402

# Input dtypes each kernel backend covers; anything else falls back (visibly, never when strict).
_CONV2D_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}
__all__ += ["conv2d"]


def _conv2d_pair(name: str, v) -> tuple:
    """int or 1/2-sequence of ints -> (a, b), as torch's IntArrayRef[2] takes it."""
    if isinstance(v, bool):
        raise TypeError(f"conv2d: expected {name} to be an int or a tuple of 2 ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    try:
        t = tuple(int(e) for e in v)
    except TypeError:
        raise TypeError(f"conv2d: expected {name} to be an int or a tuple of 2 ints, got {v!r}") from None
    if len(t) == 1:
        return (t[0], t[0])
    if len(t) != 2:
        raise RuntimeError(f"conv2d: expected {name} of 2 values, got {name} = {v!r}")
    return t


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
           padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """2-D cross-correlation, drop-in for ``torch.nn.functional.conv2d`` (notes sections 19-22:
    corr2d, padding and stride, multiple input and output channels, 1x1 convolution).

    input: (N, C_in, H, W) or unbatched (C_in, H, W); float32/float64 on the CPU (CUDA and Triton
    also float16/bfloat16); NCHW or channels_last (others are copied). weight: (C_out, C_in / groups,
    kH, kW); bias: (C_out,) or None. stride, dilation: int or (h, w); padding: int, (h, w), 'valid'
    or 'same' (stride 1 only; an odd total padding puts the extra row/column at the bottom/right,
    as torch, without a copy). Returns (N, C_out, H_out, W_out) ((C_out, H_out, W_out) unbatched)
    channels_last when input's or weight's strides suggest channels_last (torch's rule: a model
    converted with .to(memory_format=torch.channels_last) runs channels_last from its first layer
    on), contiguous otherwise; H_out = (H + 2 ph - dh (kH - 1) - 1) // sh + 1.
    Differentiable (grad_input, grad_weight, grad_bias, each only when needed) and twice
    differentiable (create_graph=True recomputes the forward with torch's math: recorded as
    conv2d_double_backward -> reference)."""
    # The common case, kept lean (per-call cost): the cpu/cuda op with its C++ derivative
    # (pyfastdl::conv2d) through its direct entry (csrc/cpu/percall.cpp), which returns None for what it
    # does not take (unbatched input, a string padding, a tensor on another device, a non-int
    # argument): the full path below then runs.
    if (type(input) is torch.Tensor and not _is_compiling()
            and backends.picked("conv2d", input.device, input.dtype) is not None):
        out = _C.conv2d(input, weight, bias, stride, padding, dilation, groups)
        if out is not None:
            return out
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"conv2d: expected input to be a Tensor, got {type(input).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"conv2d: expected weight to be a Tensor, got {type(weight).__name__}")
    _check_same_device("conv2d", input, ("weight", "bias"), (weight, bias))
    if input.dim() not in (3, 4):
        raise RuntimeError(f"conv2d: expected input of rank 3 (C_in, H, W) or 4 (N, C_in, H, W), got input of "
                           f"shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(f"conv2d: expected weight of rank 4 (C_out, C_in / groups, kH, kW), got weight of "
                           f"shape {tuple(weight.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"conv2d: expected groups to be an int, got {groups!r}")
    stride = _conv2d_pair("stride", stride)
    dilation = _conv2d_pair("dilation", dilation)
    if isinstance(padding, str):
        if padding == "valid":
            pad4 = [0, 0, 0, 0]
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"conv2d: padding='same' is not supported for strided convolutions, got "
                                 f"stride = {stride}")
            pad4 = []
            for d, k in zip(dilation, weight.shape[2:]):
                total = d * (k - 1)
                pad4 += [total // 2, total - total // 2]
        else:
            raise ValueError(f"conv2d: expected padding to be an int, a tuple, 'valid' or 'same', got {padding!r}")
    else:
        ph, pw = _conv2d_pair("padding", padding)
        pad4 = [ph, ph, pw, pw]
    stride, dilation = list(stride), list(dilation)
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    backend = backends.pick("conv2d", x.device, x.dtype, _CONV2D_DTYPES)
    if backend == "torch":
        out = conv2d_reference(x, weight, bias, stride, pad4, dilation, groups)
    elif backend == "reference":
        out = conv2d_reference(x, weight, bias, stride, pad4, dilation, groups)
    else:
        ops = backends.ops(backend, "conv2d")
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            out = Conv2dFunction.apply(x, weight, bias, stride, pad4, dilation, groups, ops)
        else:  # nothing to differentiate: the op alone
            out = ops.conv2d_fwd(x, weight, bias, stride, pad4, dilation, groups)
    return out.squeeze(0) if unbatched else out


# ---- 2-D pooling (family pool2d) ------------------------------------------------------------------

from .autograd.pool2d import AvgPool2dFunction, MaxPool2dFunction  # noqa: E402
from .reference.pooling import avg_pool2d_like_torch, max_pool2d_like_torch  # noqa: E402

# Input dtypes each kernel backend covers: cpu (csrc/cpu/pool2d.cpp), cuda (csrc/cuda/pool2d.cu) and
# triton (pyfastdl/triton_kernels/pool2d.py). Other dtypes fall back to torch's op visibly
# (last_dispatch() says so), and raise when strict.
_POOL2D_DTYPES = {"cpu": (torch.float32, torch.float64),
                  "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                  "triton": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
__all__ += ["max_pool2d", "avg_pool2d"]


def _pool2d_covers(dtype):
    def covers(backend):
        if backend == "reference":
            return None
        if backend not in _POOL2D_DTYPES:
            return f"pyfastdl has no {backend} pool2d kernel yet"
        return None if dtype in _POOL2D_DTYPES[backend] else f"dtype {dtype}"
    return covers


def _pool2d_backend(op: str, x: torch.Tensor) -> str:
    if x.device.type == "cpu" and backends.current() is None:  # the common case: one dict lookup
        return backends.pick(op, x.device, x.dtype, _POOL2D_DTYPES)
    backend, fallback = backends.resolve(op, x.device, _pool2d_covers(x.dtype))
    backends.record(op, backend, fallback)
    return backend


def _pool2d_pair(op: str, name: str, v, default=None) -> list:
    """int or 1/2-sequence of ints -> [a, b] (torch's rule); None or () -> default (stride)."""
    if (v is None or (isinstance(v, (tuple, list)) and len(v) == 0)) and default is not None:
        return list(default)
    if isinstance(v, bool):
        raise TypeError(f"{op}: expected {name} to be an int or a tuple of 2 ints, got {v!r}")
    if isinstance(v, int):
        return [v, v]
    try:
        t = [int(e) for e in v]
    except TypeError:
        raise TypeError(f"{op}: expected {name} to be an int or a tuple of 2 ints, got {v!r}") from None
    if len(t) == 1:
        return [t[0], t[0]]
    if len(t) != 2:
        raise RuntimeError(f"{op}: expected {name} to be an int or a tuple of 2 ints, got {name} = {v!r}")
    return t


def _pool2d_input(op: str, input) -> torch.Tensor:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: expected input to be a Tensor, got {type(input).__name__}")
    if input.dim() not in (3, 4) or any(s == 0 for s in input.shape[-3:]):
        raise RuntimeError(f"{op}: expected input of rank 3 (C, H, W) or 4 (N, C, H, W) with C, H, W > 0 "
                           f"(N may be 0), got input of shape {tuple(input.shape)}")
    return input.unsqueeze(0) if input.dim() == 3 else input


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """2-D max pooling, drop-in for ``torch.nn.functional.max_pool2d`` (notes section 7.5, "Pooling").

    input: (N, C, H, W) or unbatched (C, H, W), N may be 0; float32/float64 on the CPU, also
    float16/bfloat16 on CUDA (other dtypes fall back to torch's op visibly; strict mode raises); NCHW
    or channels_last (the output
    keeps input's memory format, as torch). kernel_size, stride (default kernel_size), padding
    (<= kernel_size / 2), dilation: int or (h, w). Returns (N, C, H_out, W_out), and with
    return_indices the int64 flat indices ih * W + iw of each maximum in its (H, W) plane (torch's
    convention: the first maximum in window order; a NaN in a window wins). Differentiable (the
    gradient goes to the index) and twice differentiable (the backward is linear in grad_out)."""
    # The common case, kept lean (per-call cost): pyfastdl::max_pool2d with its C++ derivative through
    # its direct entry (csrc/cpu/percall.cpp), which returns None for what it does not take (unbatched
    # input, other argument forms): the full path below then runs.
    if (not return_indices and type(input) is torch.Tensor and not _is_compiling()
            and backends.picked("max_pool2d", input.device, input.dtype) is not None):
        out = _C.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
        if out is not None:
            return out
    op = "max_pool2d"
    x = _pool2d_input(op, input)
    k = _pool2d_pair(op, "kernel_size", kernel_size)
    s = _pool2d_pair(op, "stride", stride, default=k)
    p = _pool2d_pair(op, "padding", padding)
    d = _pool2d_pair(op, "dilation", dilation)
    backend = _pool2d_backend(op, x)
    if backend == "torch":
        res = F.max_pool2d(x, k, s, p, d, ceil_mode, True)
    elif backend == "reference":
        res = max_pool2d_like_torch(x, k, s, p, d, ceil_mode, True)
    else:
        ops = backends.ops(backend, "pool2d")
        if torch.is_grad_enabled() and x.requires_grad:
            res = MaxPool2dFunction.apply(x, k, s, p, d, bool(ceil_mode), ops)
        else:
            res = ops.max_pool2d_fwd(x, k, s, p, d, bool(ceil_mode), bool(return_indices))
    out, idx = res
    if input.dim() == 3:
        out = out.squeeze(0)
        idx = idx.squeeze(0) if idx is not None else None
    return (out, idx) if return_indices else out


def avg_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> torch.Tensor:
    """2-D average pooling, drop-in for ``torch.nn.functional.avg_pool2d`` (notes section 7.5).

    input: (N, C, H, W) or unbatched (C, H, W), N may be 0; float32/float64 on the CPU, also
    float16/bfloat16 on CUDA (others fall back visibly); NCHW or channels_last (kept). kernel_size, stride (default kernel_size), padding
    (<= kernel_size / 2): int or (h, w). Each output is the sum of its window's elements inside the
    input divided by divisor_override (!= 0) when given, else by the window's size clipped to the
    padded input (count_include_pad=True) or to the input. Differentiable, twice too."""
    if (type(input) is torch.Tensor and not _is_compiling()  # the per-call path, as max_pool2d's
            and backends.picked("avg_pool2d", input.device, input.dtype) is not None):
        out = _C.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        if out is not None:
            return out
    op = "avg_pool2d"
    x = _pool2d_input(op, input)
    k = _pool2d_pair(op, "kernel_size", kernel_size)
    s = _pool2d_pair(op, "stride", stride, default=k)
    p = _pool2d_pair(op, "padding", padding)
    if divisor_override is not None:
        if isinstance(divisor_override, bool) or not isinstance(divisor_override, int):
            raise TypeError(f"{op}: expected divisor_override to be an int or None, got {divisor_override!r}")
        if divisor_override == 0:
            raise RuntimeError(f"{op}: expected divisor_override != 0 (or None), got 0")
    backend = _pool2d_backend(op, x)
    if backend == "torch":
        out = F.avg_pool2d(x, k, s, p, ceil_mode, count_include_pad, divisor_override)
    elif backend == "reference":
        out = avg_pool2d_like_torch(x, k, s, p, ceil_mode, count_include_pad, divisor_override)
    else:
        ops = backends.ops(backend, "pool2d")
        args = (k, s, p, bool(ceil_mode), bool(count_include_pad), divisor_override)
        if torch.is_grad_enabled() and x.requires_grad:
            out = AvgPool2dFunction.apply(x, *args, ops)
        else:
            out = ops.avg_pool2d_fwd(x, *args)
    return out.squeeze(0) if input.dim() == 3 else out
