"""The notes' from-scratch ``BatchNorm`` (pyfastdl.reference.batch_norm, section 28) on pyfastdl's
batch-norm kernel, with the notes' semantics kept."""
from __future__ import annotations

import torch

from .. import functional as PF
from ..reference.batch_norm import BatchNorm as _NotesBatchNorm

__all__ = ["BatchNorm"]


class BatchNorm(_NotesBatchNorm):
    """Drop-in for the notes' ``BatchNorm(num_features, num_dims)`` (a subclass: the same ``gamma``,
    ``beta`` parameters of shape (1, C) or (1, C, 1, 1), the same ``moving_mean`` / ``moving_var``
    attributes -- plain tensors, not buffers, as the notes keep them, so the state_dicts match), and the
    notes' results:

    - training: input (N, C) or (N, C, H, W) normalized with the batch mean and the *biased* batch
      variance, eps = 1e-5; then ``moving = 0.9 * moving + (1 - 0.9) * batch statistic`` (the notes'
      momentum 0.9 weights the *old* value) with the *biased* variance -- not torch's convention
      (momentum weighting the new value, unbiased variance);
    - eval: normalized with the moving statistics.

    One kernel call per forward (pyfastdl.functional.batch_norm; its statistics go to two scratch
    (C,) vectors with momentum 1, from which the notes' moving statistics are updated), and the
    kernel's backward. Unlike the notes' code, the moving statistics carry no autograd graph, and a
    batch of one value per channel raises ValueError as torch's batch norm does (the notes give 0)."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if self.moving_mean.device != X.device:
            self.moving_mean = self.moving_mean.to(X.device)
            self.moving_var = self.moving_var.to(X.device)
        C = self.gamma.numel()
        acc = torch.float64 if X.dtype == torch.float64 else torch.float32
        weight, bias = self.gamma.reshape(C), self.beta.reshape(C)
        if not self.training:
            return PF.batch_norm(X, self.moving_mean.detach().reshape(C).to(acc),
                                 self.moving_var.detach().reshape(C).to(acc), weight, bias, False, 0.0, 1e-5)
        if X.dim() not in (2, 4):
            raise ValueError(f"BatchNorm (the notes'): expected 2-D (N, C) or 4-D (N, C, H, W) input when training, "
                             f"got input of shape {tuple(X.shape)}")
        mean = torch.zeros(C, dtype=acc, device=X.device)
        var = torch.zeros(C, dtype=acc, device=X.device)  # momentum 1: the batch mean, the unbiased variance
        Y = PF.batch_norm(X, mean, var, weight, bias, True, 1.0, 1e-5)
        n = X.numel() // C
        momentum = 0.9  # the notes'
        shape = self.moving_mean.shape
        with torch.no_grad():
            biased = var * ((n - 1) / n)
            self.moving_mean = momentum * self.moving_mean.detach() + (1.0 - momentum) * mean.view(shape).to(
                self.moving_mean.dtype)
            self.moving_var = momentum * self.moving_var.detach() + (1.0 - momentum) * biased.view(shape).to(
                self.moving_var.dtype)
        return Y
