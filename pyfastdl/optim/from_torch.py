"""pyfastdl.optim.from_torch(optimizer): the fused twin of a torch.optim optimizer, state carried over."""
from __future__ import annotations

import inspect

import torch

from . import _fused

__all__ = ["from_torch"]

# torch class -> pyfastdl twin (exact classes: a user's subclass may override step)
_TWINS = {
    torch.optim.SGD: _fused.SGD,
    torch.optim.Adam: _fused.Adam,
    torch.optim.AdamW: _fused.AdamW,
    torch.optim.Adagrad: _fused.Adagrad,
    torch.optim.RMSprop: _fused.RMSprop,
    torch.optim.Adadelta: _fused.Adadelta,
}

_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
          "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
          "_optimizer_load_state_dict_post_hooks")


def from_torch(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The pyfastdl twin (fused multi-tensor step) of a ``torch.optim`` SGD, Adam, AdamW, Adagrad,
    RMSprop or Adadelta, taking over its param groups and state, so training continues exactly where
    it stands:

        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ...                                   # some steps with torch's
        opt = pyfastdl.optim.from_torch(opt)  # the same groups, hyper-parameters, step counts, moments

    The twin's ``param_groups`` are the very same dicts (an LR scheduler built on ``optimizer`` still
    sets the learning rate the twin reads; build new schedulers on the twin) and its ``state`` holds the
    very same tensors (step counts, momentum buffers, exp_avg/exp_avg_sq, ...); step hooks and
    state_dict hooks are carried over. Step the returned optimizer only: ``optimizer`` shares its state.
    A pyfastdl optimizer is returned as it is.

    Raises TypeError for an optimizer class without a twin (NAdam, LBFGS, a user subclass, ...) and
    ValueError for an option the fused step does not support (``differentiable=True``)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"pyfastdl.optim.from_torch: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if type(optimizer) in _TWINS.values():
        return optimizer
    twin = _TWINS.get(type(optimizer))
    if twin is None:
        names = ", ".join(f"torch.optim.{c.__name__}" for c in _TWINS)
        raise TypeError(f"pyfastdl.optim.from_torch: no fused twin for {type(optimizer).__module__}."
                        f"{type(optimizer).__qualname__} (exact classes only; twins exist for {names})")
    for i, group in enumerate(optimizer.param_groups):
        if group.get("differentiable", False):
            raise ValueError(f"pyfastdl.optim.from_torch: param group {i} has differentiable=True, which the fused "
                             f"{twin.__name__} does not support; keep torch.optim.{twin.__name__}")
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}
    state = {p: s for p, s in optimizer.state.items()}
    new = twin(optimizer.param_groups, **defaults)  # the same group dicts (add_param_group keeps them)
    new.state.clear()  # Adagrad's constructor fills its sums: torch's (possibly stepped) ones replace them
    for p, s in state.items():
        new.state[p] = s
    for name in _HOOKS:
        if hasattr(optimizer, name) and hasattr(new, name):
            getattr(new, name).update(getattr(optimizer, name))
    return new
