"""Batch normalization from scratch, as the notes build it (d2l, "批量归一化";
section 28 of the notes), runnable without the d2l package.

Two versions live here:

* ``batch_norm`` / ``BatchNorm``: the notes' code as the notes wrote it: 2-D (fully connected) or
  4-D (convolutional) input, ``momentum=0.9`` weighting the *old* moving statistic, and the biased
  batch variance in the moving variance.
* ``batch_norm_like_torch``: the same math following torch's conventions (``momentum`` weights the
  new statistic, ``momentum=None`` means a cumulative average is done by the caller, the running
  variance takes the unbiased variance, any rank 2..5). The ``reference`` backend of
  ``pyfastdl.functional.batch_norm`` runs it, and the tests compare every kernel with it in float64.

Ioffe & Szegedy, "Batch Normalization", 2015.
"""
import torch
from torch import nn

__all__ = ["batch_norm", "BatchNorm", "batch_norm_like_torch"]


def batch_norm(is_training, X, gamma, beta, moving_mean, moving_var, eps, momentum):
    """The notes' function. X: (N, C) or (N, C, H, W); gamma, beta, moving_*: (1, C) or (1, C, 1, 1).
    Returns (Y, new moving_mean, new moving_var)."""
    if not is_training:
        # Prediction: normalize with the moving statistics.
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        assert len(X.shape) in (2, 4)
        if len(X.shape) == 2:
            # Fully connected layer: statistics over the feature dimension.
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:
            # 2-D convolution: statistics per channel (axis=1), keeping X's shape for broadcasting.
            mean = X.mean(dim=0, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
            var = ((X - mean) ** 2).mean(dim=0, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
        # Training: normalize with the batch statistics.
        X_hat = (X - mean) / torch.sqrt(var + eps)
        # Update the moving statistics.
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    Y = gamma * X_hat + beta  # scale and shift
    return Y, moving_mean, moving_var


class BatchNorm(nn.Module):
    """The notes' module. num_dims: 2 for a fully connected layer, 4 for a convolutional one."""

    def __init__(self, num_features, num_dims):
        super().__init__()
        if num_dims == 2:
            shape = (1, num_features)
        else:
            shape = (1, num_features, 1, 1)
        # Learnable scale and shift, initialized to 1 and 0.
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        # Not parameters: the moving statistics, initialized to 0 and 1.
        self.moving_mean = torch.zeros(shape)
        self.moving_var = torch.ones(shape)

    def forward(self, X):
        # Keep the moving statistics on X's device.
        if self.moving_mean.device != X.device:
            self.moving_mean = self.moving_mean.to(X.device)
            self.moving_var = self.moving_var.to(X.device)
        Y, self.moving_mean, self.moving_var = batch_norm(
            self.training, X, self.gamma, self.beta, self.moving_mean, self.moving_var,
            eps=1e-5, momentum=0.9)
        return Y


def batch_norm_like_torch(input, running_mean, running_var, weight=None, bias=None, training=False,
                          momentum=0.1, eps=1e-5, activation=None):
    """The notes' math with torch.nn.functional.batch_norm's signature and conventions.
    input: (N, C, *); running_*, weight, bias: (C,) or None. Running statistics are updated in place
    (unbiased variance). activation: None, "relu" or "sigmoid"."""
    C = input.shape[1]
    dims = [0] + list(range(2, input.dim()))
    shape = [1, C] + [1] * (input.dim() - 2)
    if training:
        mean = input.mean(dim=dims)
        var = ((input - mean.view(shape)) ** 2).mean(dim=dims)
        if running_mean is not None:
            n = input.numel() // C
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                running_var.mul_(1 - momentum).add_(momentum * var.detach() * n / (n - 1))
    else:
        mean, var = running_mean, running_var
    y = (input - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "sigmoid":
        y = torch.sigmoid(y)
    return y
