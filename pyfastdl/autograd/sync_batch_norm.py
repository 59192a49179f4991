"""SyncBatchNormFunction: batch norm whose statistics are those of the whole process group's batch
(torch.distributed), over pyfastdl's ops, plus the fake implementations of the two ops it adds
(csrc/ops.cpp: ``sync_batch_norm_stats``, ``sync_batch_norm_bwd_elemt``).

Per channel, with n_r elements on rank r and N = sum_r n_r (Ioffe & Szegedy 2015; torch's
SyncBatchNorm, whose semantics this follows)::

    forward   each rank: (mean_r, M2_r) = sync_batch_norm_stats(x_r)          float64, exact two-pass
              all_gather (n_r, mean_r, M2_r)
              mean = sum n_r mean_r / N;  M2 = sum M2_r + n_r (mean_r - mean)^2  (Chan et al. 1979)
              var = M2 / N;  running_* = (1 - momentum) running_* + momentum (mean, M2 / (N - 1))
              y = batch_norm_fwd(x_r, eval, running stats := (mean, var))     pyfastdl's kernel
    backward  (sum_dy_r, sum_dy_xhat_r) = batch_norm_bwd(eval, output_mask [F, T, T])
              grad_bias_r = sum_dy_r, grad_weight_r = sum_dy_xhat_r     (local: DDP averages them)
              all_reduce (sum_dy, sum_dy_xhat) in float64
              grad_input_r = sync_batch_norm_bwd_elemt(..., sum_dy, sum_dy_xhat, N)

Nothing recovers a variance from an invstd: the ranks exchange counts, means and M2 in float64.
A rank with an empty batch takes part in every collective with n_r = 0.
"""
from __future__ import annotations

import torch

from .. import backends
from .batch_norm import _acc_dtype, _like_kernel_layout

__all__ = ["SyncBatchNormFunction", "sync_batch_norm"]

# Input dtypes each backend's kernels cover (the two ops above plus batch_norm_fwd/bwd).
_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


@torch.library.register_fake("pyfastdl::sync_batch_norm_stats")
def _stats_fake(input):
    return sync_batch_norm_stats_shapes(input)


def sync_batch_norm_stats_shapes(input):
    """(mean, m2): (C,) float64 each."""
    C = input.shape[1]
    return input.new_empty((C,), dtype=torch.float64), input.new_empty((C,), dtype=torch.float64)


@torch.library.register_fake("pyfastdl::sync_batch_norm_bwd_elemt")
def _bwd_elemt_fake(grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xhat, count):
    return _like_kernel_layout(input)


class _ReferenceOps:
    """The ``reference`` backend: the same four steps as plain torch ops (float64 statistics)."""

    @staticmethod
    def sync_batch_norm_stats(input):
        dims = [0] + list(range(2, input.dim()))
        x = input.double()
        if input.numel() == 0:
            return sync_batch_norm_stats_shapes(input)[0].zero_(), sync_batch_norm_stats_shapes(input)[1].zero_()
        mean = x.mean(dim=dims)
        shape = [1, -1] + [1] * (input.dim() - 2)
        return mean, ((x - mean.view(shape)) ** 2).sum(dim=dims)

    @staticmethod
    def batch_norm_fwd(input, weight, bias, mean, var, training, momentum, eps, activation):
        assert not training and not activation
        shape = [1, -1] + [1] * (input.dim() - 2)
        acc = _acc_dtype(input.dtype)
        invstd = torch.rsqrt(var.to(torch.float64) + eps).to(acc)
        y = (input.to(acc) - mean.to(acc).view(shape)) * invstd.view(shape)
        if weight is not None:
            y = y * weight.to(acc).view(shape)
        if bias is not None:
            y = y + bias.to(acc).view(shape)
        return y.to(input.dtype), mean.to(acc), invstd

    @staticmethod
    def batch_norm_bwd(grad_out, input, weight, bias, mean, invstd, training, activation, output_mask):
        dims = [0] + list(range(2, input.dim()))
        shape = [1, -1] + [1] * (input.dim() - 2)
        acc = mean.dtype
        g = grad_out.to(acc)
        xhat = (input.to(acc) - mean.view(shape)) * invstd.view(shape)
        return None, (g * xhat).sum(dim=dims), g.sum(dim=dims)

    @staticmethod
    def sync_batch_norm_bwd_elemt(grad_out, input, weight, mean, invstd, sum_dy, sum_dy_xhat, count):
        shape = [1, -1] + [1] * (input.dim() - 2)
        acc = mean.dtype
        w = weight.to(acc) if weight is not None else torch.ones_like(mean)
        a = (w * invstd).view(shape)
        xhat = (input.to(acc) - mean.view(shape)) * invstd.view(shape)
        gi = a * (grad_out.to(acc) - (sum_dy / count).view(shape) - xhat * (sum_dy_xhat / count).view(shape))
        return gi.to(input.dtype)


def _ops(input):
    """The op namespace for ``input``: pyfastdl's kernels (cpu, cuda), the reference, or a clear error."""
    name = "nn.SyncBatchNorm"
    backend, fallback = backends.resolve(name, input.device, backends.dtype_covers(_DTYPES, input.dtype))
    if fallback is not None:
        # no kernel for this call and no torch op to fall back to that runs it on this device:
        # the reference math runs, visibly (strict mode raises here)
        backends.record(name, "reference", fallback)
        return _ReferenceOps
    backends.record(name, backend)
    if backend == "reference":
        return _ReferenceOps
    if backend == "triton":  # batch norm's Triton ops and this family's (triton_kernels/sync_batch_norm.py)
        backends.ops(backend, "batch_norm")
        return backends.ops(backend, "sync_batch_norm")
    return backends.ops(backend, "batch_norm")


def _all_gather(t, group, world_size):
    parts = [torch.empty_like(t) for _ in range(world_size)]
    torch.distributed.all_gather(parts, t, group=group)
    return torch.stack(parts)


class SyncBatchNormFunction(torch.autograd.Function):
    """forward(input (N, C, *), weight (C,)|None, bias (C,)|None, running_mean (C,)|None,
    running_var (C,)|None, eps, momentum, process_group, world_size, ops) -> output like input,
    normalized with the process group's batch statistics (see the module docstring)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, group, world_size, ops):
        C = input.shape[1]
        n_local = input.numel() // C if C else 0
        if input.numel() > 0:
            mean, m2 = ops.sync_batch_norm_stats(input)
        else:
            mean = input.new_zeros((C,), dtype=torch.float64)
            m2 = torch.zeros_like(mean)
        local = torch.cat([mean, m2, mean.new_full((1,), float(n_local))])
        every = _all_gather(local, group, world_size)               # (world, 2C + 1) float64
        counts = every[:, 2 * C:]                                    # (world, 1)
        total = float(counts.sum())
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} over the "
                             f"process group (input size {tuple(input.shape)} on this rank)")
        means, m2s = every[:, :C], every[:, C:2 * C]
        g_mean = (counts * means).sum(0) / total
        g_m2 = (m2s + counts * (means - g_mean) ** 2).sum(0)
        g_var = g_m2 / total
        if running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(running_mean.double() * (1 - momentum) + momentum * g_mean)
                running_var.copy_(running_var.double() * (1 - momentum) + momentum * g_m2 / (total - 1))
        acc = _acc_dtype(input.dtype)
        y, save_mean, save_invstd = ops.batch_norm_fwd(input, weight, bias, g_mean.to(acc), g_var.to(acc), False,
                                                       0.0, eps, 0)
        ctx.save_for_backward(input, weight, save_mean, save_invstd)
        ctx.group, ctx.world_size, ctx.count, ctx.ops = group, world_size, int(total), ops
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("pyfastdl.nn.SyncBatchNorm: double backward (create_graph=True) is not supported")
        input, weight, save_mean, save_invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        C = input.shape[1]
        if input.numel() > 0:
            _, sum_dy_xhat, sum_dy = ctx.ops.batch_norm_bwd(grad_out, input, weight, None, save_mean, save_invstd,
                                                            False, 0, [False, True, True])
        else:
            sum_dy_xhat = sum_dy = save_mean.new_zeros((C,))
        grad_input = None
        if need[0]:
            both = torch.cat([sum_dy, sum_dy_xhat]).double()
            torch.distributed.all_reduce(both, group=ctx.group)
            g_dy, g_dy_xhat = both.to(save_mean.dtype).split(C)
            if input.numel() > 0:
                grad_input = ctx.ops.sync_batch_norm_bwd_elemt(grad_out, input, weight, save_mean, save_invstd,
                                                               g_dy, g_dy_xhat, ctx.count)
            else:
                grad_input = torch.zeros_like(input)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and need[1] else None
        grad_bias = sum_dy.to(input.dtype if weight is None else weight.dtype) if ctx.has_bias and need[2] else None
        return (grad_input, grad_weight, grad_bias) + (None,) * 7


def sync_batch_norm(input, running_mean, running_var, weight, bias, momentum, eps, process_group, world_size):
    """Training-mode batch norm over the process group's batch (``torch.nn.SyncBatchNorm``'s
    ``sync_batch_norm.apply``). input (N, C, *), the other tensors (C,) or None; running statistics
    updated in place (torch's rule: momentum weights the new value, unbiased variance over the group's
    count). Collective: every rank of ``process_group`` must call it."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"sync_batch_norm: expected input to be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise RuntimeError(f"sync_batch_norm: expected a floating-point input, got input of dtype {input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
    C = input.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sync_batch_norm: expected {name} to be a Tensor or None, got {type(t).__name__}")
        if t.shape != (C,):
            raise RuntimeError(f"sync_batch_norm: expected {name} of shape ({C},) to match input channels, got "
                               f"{tuple(t.shape)}")
        if t.device != input.device:
            raise RuntimeError(f"sync_batch_norm: expected {name} on {input.device} like input, got {t.device}")
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("sync_batch_norm: running_mean and running_var must be given together or both be None")
    if not (eps > 0 and eps < float("inf")):
        raise ValueError(f"sync_batch_norm: expected eps > 0 when training, got eps = {eps}")
    if not (abs(momentum) < float("inf")):
        raise ValueError(f"sync_batch_norm: expected a finite momentum, got momentum = {momentum}")
    ops = _ops(input)
    return SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, float(eps), float(momentum),
                                       process_group, world_size, ops)
