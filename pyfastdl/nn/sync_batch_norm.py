"""Drop-in for ``torch.nn.SyncBatchNorm`` on pyfastdl's kernels (same constructor, parameters,
buffers, state_dict, ``convert_sync_batchnorm``)."""
from __future__ import annotations

import torch

from .. import functional as PF
from ..autograd.sync_batch_norm import sync_batch_norm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm``: batch norm whose training statistics are those of the
    whole process group's batch. In training, inside an initialized ``torch.distributed`` process group
    of more than one rank, each rank computes its per-channel (count, mean, M2) with pyfastdl's kernel
    (``sync_batch_norm_stats``, float64), the ranks all-gather and combine them exactly (uneven batch
    sizes and empty batches included), normalize with pyfastdl's batch-norm kernel and update the
    running statistics with the group's unbiased variance; the backward all-reduces sum(dy) and
    sum(dy * xhat) and runs ``sync_batch_norm_bwd_elemt`` (pyfastdl/autograd/sync_batch_norm.py).
    Otherwise (eval mode, no process group, or a world of one) it is batch norm on pyfastdl's kernel,
    as torch's falls back to ``F.batch_norm``.

    Differences from torch: CPU tensors are synchronized too (torch raises ValueError: its
    SyncBatchNorm needs a GPU; with gloo on CPU this one runs). For that reason it subclasses torch's
    ``_BatchNorm`` (as torch's SyncBatchNorm does) and *not* ``torch.nn.SyncBatchNorm``: DDP refuses any
    ``torch.nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers only work with GPU modules"), so
    ``isinstance(m, torch.nn.SyncBatchNorm)`` is False (``isinstance(m, _BatchNorm)`` is True); a group whose total count per channel
    is 1 raises ValueError (torch divides by zero in the unbiased running variance); double backward
    through the synchronized path raises. Kernels: cpu (float32/float64), cuda and triton (also
    float16/bfloat16)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.process_group = process_group

    # torch.nn.SyncBatchNorm's checks, same words
    _check_input_dim = torch.nn.SyncBatchNorm._check_input_dim
    _check_non_zero_input_channels = torch.nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        factor = 0.0 if self.momentum is None else self.momentum
        count = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if count and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked.item() + 1)  # cumulative average, this batch included
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running else None
        running_var = self.running_var if use_running else None
        group, world_size = None, 1
        if bn_training and self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = self.process_group if self.process_group else torch.distributed.group.WORLD
            world_size = torch.distributed.get_world_size(group)
        if world_size > 1:
            out = sync_batch_norm(input, running_mean, running_var, self.weight, self.bias, factor, self.eps, group,
                                  world_size)
        else:
            out = PF.batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training, factor,
                                self.eps)
        if count:  # after the kernels accepted the input: bad input leaves every buffer untouched
            self.num_batches_tracked.add_(1)
        return out

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: every ``BatchNorm*D`` (any
        ``_BatchNorm``) of ``module`` becomes a ``pyfastdl.nn.SyncBatchNorm`` sharing its parameters and
        buffers, mode and qconfig; returns the module (a new one when ``module`` itself is a batch norm)."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
