"""The optimizer step inside backward: each parameter is updated from a post-accumulate-grad hook,
as soon as autograd has finished its gradient, while that gradient is still in cache, and the
gradient is freed right away. No gradient makes a round trip through DRAM after the backward pass,
and at most a few gradients are alive at any time (peak memory drops by about the gradients' size).

    opt = pyfastdl.optim.Adam(model.parameters(), lr=1e-3)
    handle = pyfastdl.optim.step_in_backward(opt)
    for x, y in data:
        loss_fn(model(x), y).backward()      # the step happens in here; no opt.step(), no zero_grad()
    handle.remove()                           # back to ordinary opt.step()

Same update, same numerics as ``opt.step()``. Parameters whose gradients are ready are updated in
buckets: a kernel call as soon as the ready gradients reach ``bucket_bytes`` (default 1 MB, about
this CPU's L2 per core, so they are still in cache) and one at the end of the backward pass for the
rest. A parameter larger than the bucket is updated alone, right away; many small ones (biases,
norms) share a call instead of paying a kernel call each (about 40 us from a hook). Refused: ``opt.step()`` while the hooks are on (raises), and so ``GradScaler.step(opt)``,
whose found_inf is only known after the whole backward. Not supported: anything that needs all
gradients after backward -- global-norm gradient clipping (``clip_grad_norm_`` would see no
gradients), gradient accumulation over several backward passes (each backward steps).
"""
from __future__ import annotations

import torch

__all__ = ["step_in_backward", "StepInBackward"]


class StepInBackward:
    """Handle returned by :func:`step_in_backward`; ``remove()`` takes the hooks off."""

    def __init__(self, optimizer: torch.optim.Optimizer, bucket_bytes: int = 1 << 20):
        if not hasattr(optimizer, "_step_params"):
            raise TypeError("step_in_backward needs a pyfastdl.optim optimizer (SGD, Adam, AdamW, Adagrad, "
                            f"RMSprop, Adadelta), got {type(optimizer).__module__}.{type(optimizer).__name__}")
        if getattr(optimizer, "_in_backward", False):
            raise RuntimeError("step_in_backward: this optimizer already steps inside backward")
        if bucket_bytes < 0:
            raise ValueError(f"step_in_backward: bucket_bytes must be >= 0, got {bucket_bytes}")
        self.optimizer = optimizer
        self.bucket_bytes = bucket_bytes
        self._pending = {}        # id(group) -> (group, [params whose gradient is ready])
        self._pending_bytes = 0
        self._end_queued = False  # the end-of-backward flush is queued for this backward pass
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
        def hook(p: torch.Tensor) -> None:
            self._pending.setdefault(id(group), (group, []))[1].append(p)
            self._pending_bytes += p.numel() * p.element_size()
            if not self._end_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self._end_queued = True
            if self._pending_bytes >= self.bucket_bytes:
                self._flush()
        return hook

    def _flush(self) -> None:
        pending, self._pending, self._pending_bytes = self._pending, {}, 0
        with torch.no_grad():
            for group, params in pending.values():
                self.optimizer._step_params(group, params)
                for p in params:
                    p.grad = None

    def _end_of_backward(self) -> None:
        self._end_queued = False
        self._flush()

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


def step_in_backward(optimizer: torch.optim.Optimizer, bucket_bytes: int = 1 << 20) -> StepInBackward:
    """Makes ``optimizer`` (a pyfastdl.optim optimizer) update its parameters inside the backward
    pass, from post-accumulate-grad hooks, as soon as ``bucket_bytes`` of gradients are ready (and
    the rest at the end of the pass), freeing each gradient right after its update. Returns a
    handle; ``handle.remove()`` (or leaving ``with step_in_backward(opt):``) restores ordinary
    ``optimizer.step()``."""
    return StepInBackward(optimizer, bucket_bytes)
