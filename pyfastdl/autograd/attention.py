"""AttentionFunction: autograd over the registered ops ``attention_fwd`` / ``attention_bwd``
(``torch.ops.pyfastdl`` for the C++ and CUDA kernels, ``torch.ops.pyfastdl_triton`` for Triton), plus
the C++ ops' fake (meta) implementations. Contract: csrc/common/attention.h."""
import torch
from torch.autograd.function import once_differentiable

__all__ = ["AttentionFunction"]


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pyfastdl::attention_fwd")
def _attention_fwd_fake(q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed, offset):
    B, Hq, L, _ = q.shape
    return q.new_empty((B, Hq, L, v.shape[-1])), q.new_empty((B, Hq, L), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("pyfastdl::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, attn_mask, valid_lens, is_causal, scale, dropout_p, seed,
                        offset):
    # the kernels return contiguous gradients, whatever q, k, v's strides (torch.compile relies on it)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class AttentionFunction(torch.autograd.Function):
    """out = softmax(scale * q k^T + masks) (dropout) v on (B, Hq, L, E) / (B, Hk, S, E) / (B, Hk, S, Ev)
    tensors; ``ops`` is the backend's op namespace (pyfastdl.backends.ops)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed, ops):
        out, lse = ops.attention_fwd(q, k, v, attn_mask, valid_lens, is_causal, scale, dropout_p, seed, 0)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, valid_lens)
        ctx.args = (is_causal, scale, dropout_p, seed)
        ctx.ops = ops
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, attn_mask, valid_lens = ctx.saved_tensors
        is_causal, scale, dropout_p, seed = ctx.args
        gq, gk, gv = ctx.ops.attention_bwd(grad_out.contiguous(), q, k, v, out, lse, attn_mask, valid_lens, is_causal,
                                           scale, dropout_p, seed, 0)
        need = ctx.needs_input_grad
        return (gq if need[0] else None, gk if need[1] else None, gv if need[2] else None) + (None,) * 7
