"""pyfastdl.convert(model): swap every supported torch.nn layer for its pyfastdl drop-in, weights kept."""
import torch

from . import nn as pnn

__all__ = ["convert"]

# torch class -> pyfastdl class. Exact-type matches only: a user's subclass of a torch layer may
# override forward, and replacing it would change behaviour.
_SWAPS = {
    torch.nn.BatchNorm1d: pnn.BatchNorm1d,
    torch.nn.BatchNorm2d: pnn.BatchNorm2d,
    torch.nn.BatchNorm3d: pnn.BatchNorm3d,
}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Returns ``model`` with each supported layer replaced in place (parameters, buffers, training
    mode and hooks-free state carried over). The model itself is returned for chaining; a bare
    supported layer is returned converted."""
    target = _SWAPS.get(type(model))
    if target is not None:
        return _swap(model, target)
    for name, child in model.named_children():
        setattr(model, name, convert(child))
    return model


def _swap(module: torch.nn.Module, target: type) -> torch.nn.Module:
    # The drop-ins subclass torch's layers and add no state: re-class the module itself, so the
    # parameters stay the same objects (an optimizer built before convert keeps working).
    module.__class__ = target
    return module
