"""AttentionFunction: autograd over the registered ops ``attention_fwd`` / ``attention_bwd``
(``torch.ops.pyfastdl`` for the C++ and CUDA kernels, ``torch.ops.pyfastdl_triton`` for Triton), plus
the C++ ops' fake (meta) implementations. Contract: csrc/common/attention.h.

Gradients: q, k, v and a float ``attn_mask`` (its gradient is dS = P (dP - delta), (B, Hq, L, S);
autograd sums it over the dimensions ``functional`` broadcast with ``expand``). The backward op
computes only the gradients ``ctx.needs_input_grad`` asks for (its ``output_mask``).

Double backward (``create_graph=True``, e.g. a gradient penalty): the first-order gradients are then
recomputed by differentiating ``pyfastdl.reference.sdpa_like_torch`` under autograd, so they carry
their graph; ``pyfastdl.backends.last_dispatch()`` shows
``scaled_dot_product_attention_double_backward`` on ``reference``. Without ``create_graph`` the
kernel computes them. Dropout with ``create_graph=True`` raises (the reference cannot replay the
kernel's Philox mask)."""
import torch

from .. import backends

__all__ = ["AttentionFunction"]


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pyfastdl::attention_fwd")
def _attention_fwd_fake(q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed, offset):
    return attention_fwd_shapes(q, v)


def attention_fwd_shapes(q, v):
    """The forward op's outputs (shared by the fake implementations of the C++ and the Triton op):
    out (B, Hq, L, Ev) contiguous, lse (B, Hq, L) float32 (float64 for float64)."""
    B, Hq, L, _ = q.shape
    return q.new_empty((B, Hq, L, v.shape[-1])), q.new_empty((B, Hq, L), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("pyfastdl::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, attn_mask, valid_lens, is_causal, scale, dropout_p, seed,
                        offset, output_mask=(True, True, True, False)):
    return attention_bwd_shapes(q, k, v, attn_mask, output_mask)


def attention_bwd_shapes(q, k, v, attn_mask, output_mask):
    """The backward op's outputs for fake tensors: the asked gradients (contiguous, the inputs' shapes;
    the mask's (B, Hq, L, S) in its dtype), empty (0,) tensors for the others."""
    if output_mask[3] and (attn_mask is None or not attn_mask.is_floating_point()):
        raise RuntimeError("attention_bwd: output_mask[3] asks for the gradient of attn_mask, which needs a "
                           f"floating-point attn_mask, got {None if attn_mask is None else attn_mask.dtype}")
    B, Hq, L, _ = q.shape
    full = (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device),
            None if not output_mask[3] else
            torch.empty((B, Hq, L, k.shape[2]), dtype=attn_mask.dtype, device=q.device))
    return tuple(t if need else q.new_empty((0,)) for t, need in zip(full, output_mask))


class AttentionFunction(torch.autograd.Function):
    """out = softmax(scale * q k^T + masks) (dropout) v on (B, Hq, L, E) / (B, Hk, S, E) / (B, Hk, S, Ev)
    tensors; ``ops`` is the backend's op namespace (pyfastdl.backends.ops). attn_mask: None, bool or
    float (B, Hq, L, S) (any strides); a float mask that requires grad gets its gradient."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed, ops):
        out, lse = ops.attention_fwd(q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed, 0)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, valid_lens)
        ctx.args = (is_causal, scale, dropout_p, seed)
        ctx.ops = ops
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, attn_mask, valid_lens = ctx.saved_tensors
        is_causal, scale, dropout_p, seed = ctx.args
        need = list(ctx.needs_input_grad[:4])
        need[3] = need[3] and attn_mask is not None and attn_mask.is_floating_point()
        if torch.is_grad_enabled() and any(need):  # create_graph=True: gradients with their graph
            return _double_backward_grads(grad_out, q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p,
                                          need) + (None,) * 6
        gq, gk, gv, gm = ctx.ops.attention_bwd(grad_out.contiguous(), q, k, v, out, lse, attn_mask, valid_lens,
                                               is_causal, scale, dropout_p, seed, 0, need)
        return tuple(g if n else None for g, n in zip((gq, gk, gv, gm), need)) + (None,) * 6


def _double_backward_grads(grad_out, q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, need):
    """First-order gradients that are themselves differentiable (create_graph=True): autograd through
    the reference (pyfastdl.reference.sdpa_like_torch, the same math as the kernels)."""
    if dropout_p > 0:
        raise RuntimeError("scaled_dot_product_attention: double backward (create_graph=True) is not supported "
                           f"with dropout_p > 0 (got {dropout_p}): the reference cannot replay the kernel's "
                           "dropout mask; use dropout_p=0 for gradient penalties")
    from ..reference.attention import sdpa_like_torch

    backends.record("scaled_dot_product_attention_double_backward", "reference")
    with torch.enable_grad():
        # fresh views: the same tensor may be passed as key and value (self-attention), and autograd.grad
        # would then return the sum of both gradients for each
        q, k, v, attn_mask = (t.view_as(t) if t is not None and n else t for t, n in zip((q, k, v, attn_mask), need))
        inputs = [t for t, n in zip((q, k, v, attn_mask), need) if n]
        out = sdpa_like_torch(q, k, v, attn_mask, 0.0, is_causal, scale, enable_gqa=q.shape[1] != k.shape[1],
                              valid_lens=valid_lens)
        grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True, allow_unused=True))
    res = []
    for t, n in zip((q, k, v, attn_mask), need):
        g = next(grads) if n else None
        res.append(torch.zeros_like(t) if n and g is None else g)
    return tuple(res)


@torch.library.register_fake("pyfastdl::attention")
def _attention_fake(q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed):
    return attention_fwd_shapes(q, v)[0]


@torch.library.impl("pyfastdl::attention_bwd_graph", "CompositeImplicitAutograd")
def _attention_bwd_graph(grad_out, q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, output_mask):
    """The C++ node of ``pyfastdl::attention`` (csrc/cpu/attention_autograd.cpp) under
    backward(create_graph=True): the gradients asked for, with their graph; empty (0,) for the rest."""
    need = [bool(m) for m in output_mask]
    g = _double_backward_grads(grad_out, q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, need)
    return tuple(t if t is not None else q.new_empty((0,)) for t in g)
