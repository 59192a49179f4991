"""Drop-in batch-norm modules: subclasses of torch's, so constructor arguments, parameters and
buffers (weight, bias, running_mean, running_var, num_batches_tracked), ``load_state_dict`` both ways,
``isinstance`` checks and reprs are torch's; only the forward runs pyfastdl's kernels."""
import torch

from .. import functional as PF

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _PyfastdlBatchNormMixin:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        count = self.training and self.track_running_stats and self.num_batches_tracked is not None
        if count and self.momentum is None:
            # Cumulative moving average over the batches seen, this one included.
            factor = 1.0 / float(self.num_batches_tracked.item() + 1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        out = PF.batch_norm(input, self.running_mean if use_running else None,
                            self.running_var if use_running else None, self.weight, self.bias,
                            bn_training, factor, self.eps)
        if count:  # only after the kernel accepted the input: bad input leaves every buffer untouched
            self.num_batches_tracked.add_(1)
        return out


class BatchNorm1d(_PyfastdlBatchNormMixin, torch.nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d: input (N, C) or (N, C, L)."""


class BatchNorm2d(_PyfastdlBatchNormMixin, torch.nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d: input (N, C, H, W), contiguous or channels_last."""


class BatchNorm3d(_PyfastdlBatchNormMixin, torch.nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d: input (N, C, D, H, W)."""
