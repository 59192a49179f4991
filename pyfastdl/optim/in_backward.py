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

Under DistributedDataParallel pass the DDP module: ``step_in_backward(opt, ddp=model)``. The step
then runs from a DDP communication hook, on each bucket of gradients as soon as DDP's all-reduce has
averaged it (DDP's own reduction: divide by the world size, sum), while backward goes on; the
gradients DDP writes back are freed at the end of the pass. ``model.no_sync()`` accumulates as DDP
does: no reduction, no step, until the next synchronized backward. DDP takes one communication hook
per module, so this one cannot be combined with another (compression hooks, ...), and after
``remove()`` it only averages. Without ``ddp=``, ``step_in_backward`` is refused when
torch.distributed is initialized with more than one process: the post-accumulate-grad hooks fire
with each rank's local gradient, before DDP's all-reduce, and the replicas would drift apart.
"""
from __future__ import annotations

import torch

__all__ = ["step_in_backward", "StepInBackward"]


def _refuse_distributed() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"step_in_backward: torch.distributed is initialized with world_size={dist.get_world_size()}; under "
            "DistributedDataParallel the step inside backward would run on each rank's local gradient before "
            "DDP's all-reduce, and the ranks' parameters would drift apart. Pass the DDP module "
            "(step_in_backward(opt, ddp=model)) to step after the all-reduce, or call optimizer.step() after "
            "backward()")


class StepInBackward:
    """Handle returned by :func:`step_in_backward`; ``remove()`` takes the hooks off."""

    def __init__(self, optimizer: torch.optim.Optimizer, bucket_bytes: int = 1 << 20, ddp=None):
        if not hasattr(optimizer, "_step_params"):
            raise TypeError("step_in_backward needs a pyfastdl.optim optimizer (SGD, Adam, AdamW, Adagrad, "
                            f"RMSprop, Adadelta), got {type(optimizer).__module__}.{type(optimizer).__name__}")
        if getattr(optimizer, "_in_backward", False):
            raise RuntimeError("step_in_backward: this optimizer already steps inside backward")
        if ddp is None:
            _refuse_distributed()
        if bucket_bytes < 0:
            raise ValueError(f"step_in_backward: bucket_bytes must be >= 0, got {bucket_bytes}")
        self.optimizer = optimizer
        self.bucket_bytes = bucket_bytes
        self._pending = {}        # id(group) -> (group, [params whose gradient is ready])
        self._pending_bytes = 0
        self._end_queued = False  # the end-of-backward flush is queued for this backward pass
        self._handles = []
        self._ddp_active = False
        if ddp is not None:
            self._attach_ddp(optimizer, ddp)
            optimizer._in_backward = True
            return
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

    # ---- under DistributedDataParallel: the step from DDP's communication hook ----------------------
    def _attach_ddp(self, optimizer, ddp) -> None:
        from torch.nn.parallel import DistributedDataParallel
        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(f"step_in_backward: ddp must be a torch.nn.parallel.DistributedDataParallel module, "
                            f"got {type(ddp).__name__}")
        in_ddp = {id(p) for p in ddp.parameters()}
        self._group_of = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in in_ddp:
                    raise ValueError("step_in_backward: with ddp=, every param of the optimizer must be a param "
                                     f"of the DDP module; one of shape {tuple(p.shape)} is not")
                self._group_of[id(p)] = group
        self._world = ddp.process_group.size() if ddp.process_group is not None else \
            torch.distributed.get_world_size()
        self._ddp_params = [p for p in ddp.parameters() if id(p) in self._group_of]
        self._ddp_active = True
        ddp.register_comm_hook(ddp.process_group, self._comm_hook)

    def _comm_hook(self, process_group, bucket):
        """DDP's reduction (divide by the world size, all-reduce the sum), then, once the bucket is
        reduced, the step of its params from the averaged gradients (a view of the reduced buffer each).
        Runs where DDP completes the future; DDP waits on the returned future before finishing backward."""
        dist = torch.distributed
        buf = bucket.buffer()
        buf.div_(self._world)
        fut = dist.all_reduce(buf, group=process_group, async_op=True).get_future()
        if not self._ddp_active:
            return fut.then(lambda f: f.value()[0])
        if not self._end_queued:  # frees the gradients DDP writes back, after DDP's own end-of-backward
            torch.autograd.Variable._execution_engine.queue_callback(self._ddp_queue_release)
            self._end_queued = True

        def step(f):
            reduced = f.value()[0]
            with torch.no_grad():
                by_group = {}
                for p, g in zip(bucket.parameters(), bucket.gradients()):
                    group = self._group_of.get(id(p))
                    if group is None or not p.requires_grad:
                        continue
                    p.grad = g
                    by_group.setdefault(id(group), (group, []))[1].append(p)
                for group, params in by_group.values():
                    self.optimizer._step_params(group, params)
            return reduced
        return fut.then(step)

    def _ddp_queue_release(self) -> None:
        # queued before DDP's finalize callback (which copies the reduced gradients into .grad);
        # a callback queued from a callback runs after those already queued, so after DDP's
        torch.autograd.Variable._execution_engine.queue_callback(self._ddp_release)

    def _ddp_release(self) -> None:
        self._end_queued = False
        for p in self._ddp_params:
            p.grad = None

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
        self._ddp_active = False  # DDP cannot unregister its hook: it only averages from now on
        self.optimizer._in_backward = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def step_in_backward(optimizer: torch.optim.Optimizer, bucket_bytes: int = 1 << 20, ddp=None) -> StepInBackward:
    """Makes ``optimizer`` (a pyfastdl.optim optimizer) update its parameters inside the backward
    pass, from post-accumulate-grad hooks, as soon as ``bucket_bytes`` of gradients are ready (and
    the rest at the end of the pass), freeing each gradient right after its update. Returns a
    handle; ``handle.remove()`` (or leaving ``with step_in_backward(opt):``) restores ordinary
    ``optimizer.step()``. Under DistributedDataParallel pass the DDP module as ``ddp``: the step
    then runs on each of DDP's buckets once its all-reduce is done (``bucket_bytes`` is not used;
    DDP's ``bucket_cap_mb`` sizes the buckets)."""
    return StepInBackward(optimizer, bucket_bytes, ddp)
