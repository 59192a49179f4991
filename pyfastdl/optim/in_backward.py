"""The optimizer step inside backward: each parameter is updated from a post-accumulate-grad hook,
as soon as autograd has finished its gradient, while that gradient is still in cache, and the
gradient is freed right away. No gradient makes a round trip through DRAM after the backward pass,
and at most a few gradients are alive at any time (peak memory drops by about the gradients' size).

    opt = pyfastdl.optim.Adam(model.parameters(), lr=1e-3)
    handle = pyfastdl.optim.step_in_backward(opt)
    for x, y in data:
        loss_fn(model(x), y).backward()      # the step happens in here; no opt.step(), no zero_grad()
    handle.remove()                           # back to ordinary opt.step()

Same update, same numerics as ``opt.step()`` (one fused kernel call per parameter instead of one per
group). Refused: ``opt.step()`` while the hooks are on (raises), and so ``GradScaler.step(opt)``,
whose found_inf is only known after the whole backward. Not supported: anything that needs all
gradients after backward -- global-norm gradient clipping (``clip_grad_norm_`` would see no
gradients), gradient accumulation over several backward passes (each backward steps).
"""
from __future__ import annotations

import torch

__all__ = ["step_in_backward", "StepInBackward"]


class StepInBackward:
    """Handle returned by :func:`step_in_backward`; ``remove()`` takes the hooks off."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not hasattr(optimizer, "_step_params"):
            raise TypeError("step_in_backward needs a pyfastdl.optim optimizer (SGD, Adam, AdamW, Adagrad, "
                            f"RMSprop, Adadelta), got {type(optimizer).__module__}.{type(optimizer).__name__}")
        if getattr(optimizer, "_in_backward", False):
            raise RuntimeError("step_in_backward: this optimizer already steps inside backward")
        self.optimizer = optimizer
        self._handles = []
        seen = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(group)))
        optimizer._in_backward = True

    def _hook(self, group):
        optimizer = self.optimizer

        def hook(p: torch.Tensor) -> None:
            with torch.no_grad():
                optimizer._step_params(group, [p])
            p.grad = None
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.optimizer._in_backward = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def step_in_backward(optimizer: torch.optim.Optimizer) -> StepInBackward:
    """Makes ``optimizer`` (a pyfastdl.optim optimizer) update each of its parameters inside the
    backward pass, from a post-accumulate-grad hook, and free the gradient right after. Returns a
    handle; ``handle.remove()`` (or leaving ``with step_in_backward(opt):``) restores ordinary
    ``optimizer.step()``."""
    return StepInBackward(optimizer)
