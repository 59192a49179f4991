"""Drop-in batch-norm modules: subclasses of torch's, so constructor arguments, parameters and
buffers (weight, bias, running_mean, running_var, num_batches_tracked), ``load_state_dict`` both ways,
``isinstance`` checks and reprs are torch's; only the forward runs pyfastdl's kernels."""
import torch

from .. import functional as PF

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormActivationSequential"]


class _PyfastdlBatchNormMixin:
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._forward(input, None)

    def _forward(self, input: torch.Tensor, activation) -> torch.Tensor:
        """The forward with pyfastdl's ``activation`` fused in (None, "relu" or "sigmoid": what
        BatchNormActivationSequential calls for a BatchNorm followed by a ReLU or a Sigmoid)."""
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
                            bn_training, factor, self.eps, activation=activation)
        if count:  # only after the kernel accepted the input: bad input leaves every buffer untouched
            self.num_batches_tracked.add_(1)
        return out


class BatchNorm1d(_PyfastdlBatchNormMixin, torch.nn.BatchNorm1d):
    """Drop-in for torch.nn.BatchNorm1d: input (N, C) or (N, C, L)."""


class BatchNorm2d(_PyfastdlBatchNormMixin, torch.nn.BatchNorm2d):
    """Drop-in for torch.nn.BatchNorm2d: input (N, C, H, W), contiguous or channels_last."""


class BatchNorm3d(_PyfastdlBatchNormMixin, torch.nn.BatchNorm3d):
    """Drop-in for torch.nn.BatchNorm3d: input (N, C, D, H, W)."""


_FUSABLE = (BatchNorm1d, BatchNorm2d, BatchNorm3d)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(module) -> bool:
    return any(getattr(module, h, None) for h in _HOOKS)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m
    return any(getattr(m, h, None) for h in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                             "_global_backward_hooks", "_global_backward_pre_hooks"))


# The activation modules fused into the batch norm before them: their exact classes (a subclass may
# change the forward) and the kernel's activation. ReLU(inplace=True) too: the fused kernel writes a
# new tensor, and nothing else held the batch norm's output.
_ACTIVATION_OF = {torch.nn.ReLU: "relu", torch.nn.Sigmoid: "sigmoid"}


class BatchNormActivationSequential(torch.nn.Sequential):
    """A ``torch.nn.Sequential`` that runs each pyfastdl BatchNorm1d/2d/3d directly followed by a
    ``torch.nn.ReLU`` or a ``torch.nn.Sigmoid`` as one kernel (batch norm with max(y, 0) or
    1 / (1 + exp(-y)) in its epilogue, forward and backward: one pass over the activations less each
    way). What ``pyfastdl.convert`` makes of such a Sequential (the notes' LeNet with batch norm, whose
    every batch norm feeds a sigmoid; DenseNet's ``conv_block`` and ``transition_block``; ResNet stems).
    Same children, names, parameters, buffers and state_dict as the Sequential; each child called alone
    behaves as before. A pair runs unfused while either module (or the process) has hooks, so hooks
    see what they saw."""

    def forward(self, input):
        mods = list(self._modules.values())
        fuse = not _global_hooks()
        i, n = 0, len(mods)
        while i < n:
            m = mods[i]
            act = _ACTIVATION_OF.get(type(mods[i + 1])) if fuse and i + 1 < n and type(m) in _FUSABLE else None
            if act is not None and not _hooked(m) and not _hooked(mods[i + 1]):
                input = m._forward(input, act)
                i += 2
            else:
                input = m(input)
                i += 1
        return input


def fusable_pairs(seq: torch.nn.Sequential) -> int:
    """How many (pyfastdl BatchNorm, torch.nn.ReLU or torch.nn.Sigmoid) adjacent pairs ``seq`` holds."""
    mods = list(seq._modules.values())
    return sum(1 for a, b in zip(mods, mods[1:]) if type(a) in _FUSABLE and type(b) in _ACTIVATION_OF)
