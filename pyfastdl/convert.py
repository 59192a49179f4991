"""pyfastdl.convert(model): swap every supported layer for its pyfastdl drop-in, weights kept.

    model = pyfastdl.convert(model)                          # in place, returns the model
    model, summary = pyfastdl.convert(model, summary=True)   # ... and what was swapped, left, why
    print(summary)
    copy = pyfastdl.convert(model, inplace=False)            # a converted deep copy; model untouched
"""
from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from . import nn as pnn
from .nn.batch_norm import fusable_pairs as _fusable_pairs
from .reference.attention import DotProductAttention as _NotesDotProductAttention
from .reference.batch_norm import BatchNorm as _NotesBatchNorm

__all__ = ["convert", "ConvertSummary"]

_log = logging.getLogger("pyfastdl.convert")

# torch class -> pyfastdl class. Exact-type matches only: a user's subclass of a torch layer may
# override forward, and replacing it would change behaviour.
_SWAPS = {
    torch.nn.BatchNorm1d: pnn.BatchNorm1d,
    torch.nn.BatchNorm2d: pnn.BatchNorm2d,
    torch.nn.BatchNorm3d: pnn.BatchNorm3d,
    torch.nn.MultiheadAttention: pnn.MultiheadAttention,
    torch.nn.TransformerEncoderLayer: pnn.TransformerEncoderLayer,
}


@dataclasses.dataclass(frozen=True)
class ConvertEntry:
    """One module ``convert`` looked at: its qualified name in the model ('' for the model itself),
    its class before, its class after (None when left), and why (for ``already`` and ``left``)."""
    name: str
    before: type
    after: type | None = None
    reason: str = ""


@dataclasses.dataclass
class ConvertSummary:
    """What ``pyfastdl.convert(model, summary=True)`` did.

    swapped: the modules now running pyfastdl's kernels (``before`` -> ``after``);
    already: modules that were pyfastdl's already (a second convert changes nothing);
    left: modules kept as they were, with the reason: a user subclass of a layer pyfastdl has a twin
    for (its forward may differ), a configuration the twin refuses (an LSTM with ``proj_size``), or a
    leaf layer pyfastdl has no kernel for (``nn.Linear``, activations, adaptive pooling: torch's own op runs).
    Containers (``Sequential``, user blocks) are walked, not listed.
    ``str(summary)`` is a short table; ``summary.counts()`` counts the swaps per class."""
    swapped: list = dataclasses.field(default_factory=list)
    already: list = dataclasses.field(default_factory=list)
    left: list = dataclasses.field(default_factory=list)

    def counts(self) -> dict:
        """{'torch.nn.BatchNorm2d -> pyfastdl.nn.BatchNorm2d': 3, ...}"""
        out: dict = {}
        for e in self.swapped:
            key = f"{_qual(e.before)} -> {_qual(e.after)}"
            out[key] = out.get(key, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"pyfastdl.convert: {len(self.swapped)} swapped, {len(self.already)} already converted, "
                 f"{len(self.left)} left"]
        for e in self.swapped:
            lines.append(f"  swapped  {e.name or '(model)'}: {_qual(e.before)} -> {_qual(e.after)}"
                         + (f" ({e.reason})" if e.reason else ""))
        for e in self.already:
            lines.append(f"  already  {e.name or '(model)'}: {_qual(e.before)} ({e.reason})")
        # leaves without a twin, grouped by class (a ResNet has dozens of ReLUs)
        grouped: dict = {}
        for e in self.left:
            grouped.setdefault((e.before, e.reason), []).append(e.name or "(model)")
        for (cls, reason), names in grouped.items():
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            lines.append(f"  left     {_qual(cls)}: {reason} [{shown}]")
        return "\n".join(lines)


def _qual(cls) -> str:
    mod = cls.__module__
    for long, short in (("torch.nn.modules.", "torch.nn."), ("pyfastdl.nn.", "pyfastdl.nn.")):
        if mod.startswith(long):
            return f"{short.rstrip('.')}.{cls.__qualname__}"
    return f"{mod}.{cls.__qualname__}"


def convert(model: torch.nn.Module, *, inplace: bool = True, summary: bool = False,
            verbose: bool = False, fuse: bool = True):
    """Replaces every layer that has a pyfastdl twin by the twin, weights kept.

    Swapped (exact classes; a user's subclass is left alone, its forward may differ):

    - ``torch.nn`` BatchNorm1d/2d/3d, SyncBatchNorm, Conv2d, MaxPool2d, AvgPool2d, LSTM, GRU, LSTMCell, GRUCell,
      MultiheadAttention (also inside torch's Transformer layers, which call ``self.self_attn``) and
      TransformerEncoderLayer (whose eval-mode fast path would bypass its attention; a
      TransformerEncoder's nested-tensor path is switched off for the same reason): re-classed in
      place, so parameters and buffers stay the very same tensors (an optimizer built before convert
      keeps working), hooks and training/eval mode are kept. An LSTM with ``proj_size != 0`` is left
      (pyfastdl.nn.LSTM refuses it).
    - the notes' classes (``pyfastdl.reference``): ``batch_norm.BatchNorm`` -> ``pyfastdl.nn.BatchNorm``
      (re-classed: the same gamma, beta and moving statistics, the notes' semantics -- momentum 0.9
      weighting the old moving statistic, the biased variance -- on pyfastdl's batch-norm kernel);
      ``attention.DotProductAttention`` -> ``pyfastdl.nn.DotProductAttention`` (a new module with the
      same dropout, mode and hooks; the fused kernel keeps no ``attention_weights`` and its dropout
      draws other random numbers than the notes' ``nn.Dropout``).

    Args:
        model: the module to convert (a bare supported layer works too).
        inplace: True (default) converts ``model`` itself; False converts a deep copy and leaves
            ``model`` untouched.
        summary: also return a :class:`ConvertSummary` of what was swapped, left, and why.
        verbose: log the summary (logger ``pyfastdl.convert``, level INFO).
        fuse: True (default) re-classes a ``torch.nn.Sequential`` holding a BatchNorm directly
            followed by a ``torch.nn.ReLU`` or ``torch.nn.Sigmoid`` as
            :class:`pyfastdl.nn.BatchNormActivationSequential`, which runs each such pair as one kernel (same children, names and state_dict; each child alone
            behaves as before; a hooked pair runs unfused). False leaves Sequentials as they are.

    Returns:
        the converted model (``model`` itself when inplace; a new object only when ``model`` is itself a
        notes' DotProductAttention), or ``(model, summary)`` when ``summary=True``.

    Idempotent: converting a converted model changes nothing (the summary lists its layers as
    ``already``).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"pyfastdl.convert: expected a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConvertSummary()
    twins = frozenset(_SWAPS.values()) | frozenset(_TWIN_EXTRAS)
    model = _convert(model, "", report, {}, twins, fuse)
    if verbose:
        _log.info("%s", report)
    return (model, report) if summary else model


def _convert(module, name, report, memo, twins, fuse=True):
    if id(module) in memo:  # a module registered twice (shared weights): converted once
        return memo[id(module)]
    original = module
    cls = type(module)
    target = _SWAPS.get(cls)
    if target is not None:
        reason = _refusal(module)
        if reason:
            report.left.append(ConvertEntry(name, cls, None, reason))
        else:
            module = _swap(module, target)
            report.swapped.append(ConvertEntry(name, cls, target, _NOTES.get(cls, "")))
    elif cls in _REBUILDS:
        module = _REBUILDS[cls](module)
        report.swapped.append(ConvertEntry(name, cls, type(module), _NOTES.get(cls, "")))
    elif cls in twins:
        report.already.append(ConvertEntry(name, cls, None, "already a pyfastdl module"))
    else:
        base = next((b for b in _all_sources() if isinstance(module, b)), None)
        if base is not None:
            report.left.append(ConvertEntry(name, cls, None, f"a subclass of {_qual(base)} (its forward may "
                                                             "differ); only the exact class is swapped"))
        elif not any(True for _ in module.children()) and not _is_plain_container(module):
            report.left.append(ConvertEntry(name, cls, None, "no pyfastdl twin (torch's op runs)"))
    memo[id(original)] = module
    # _modules itself, not named_children(): that skips a module registered twice, whose second slot
    # must get the same replacement
    for child_name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _convert(child, f"{name}.{child_name}" if name else child_name, report, memo, twins, fuse)
        if new is not child:
            setattr(module, child_name, new)
    if type(module) is torch.nn.Sequential and fuse and _fusable_pairs(module):
        # (pyfastdl BatchNorm, ReLU or Sigmoid) pairs run as one kernel; the children stay as they are
        n = _fusable_pairs(module)
        module.__class__ = pnn.BatchNormActivationSequential
        report.swapped.append(ConvertEntry(name, torch.nn.Sequential, pnn.BatchNormActivationSequential,
                                           f"{n} BatchNorm + activation pair{'s' if n > 1 else ''} fused"))
    if type(module) is torch.nn.TransformerEncoder:
        # its eval-mode nested-tensor path packs the batch and hands it to torch's fused layer op;
        # switched off, every layer runs its own forward (and pyfastdl's attention)
        module.use_nested_tensor = False
    return module


def _is_plain_container(module) -> bool:
    return isinstance(module, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict))


def _refusal(module) -> str:
    """Why a layer of a swappable class cannot be swapped ('' when it can)."""
    if isinstance(module, torch.nn.LSTM) and getattr(module, "proj_size", 0):
        return "proj_size != 0 is not supported by pyfastdl.nn.LSTM"
    return ""


def _swap(module: torch.nn.Module, target: type) -> torch.nn.Module:
    # The drop-ins subclass torch's layers (or the notes' classes) and add no state: re-class the module
    # itself, so the parameters stay the same objects (an optimizer built before convert keeps working).
    module.__class__ = target
    return module


def _rebuild_dot_product_attention(old):
    """The notes' DotProductAttention (its dropout an nn.Dropout child) as pyfastdl's (dropout a float):
    no parameters or buffers to carry; mode and hooks are."""
    new = pnn.DotProductAttention(old.dropout.p if isinstance(old.dropout, torch.nn.Dropout) else old.dropout)
    new.train(old.training)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
                  "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
        if hasattr(old, hooks):
            setattr(new, hooks, copy.copy(getattr(old, hooks)))
    return new


# classes converted by building a new module (their state differs in kind, not only in forward)
_REBUILDS = {_NotesDotProductAttention: _rebuild_dot_product_attention}

# a note on a swap, shown in the summary
_NOTES = {
    _NotesDotProductAttention: "no attention_weights kept; dropout draws other random numbers",
    _NotesBatchNorm: "the notes' semantics: momentum 0.9 on the old value, biased moving variance",
}


def _all_sources():
    return tuple(_SWAPS) + tuple(_REBUILDS)


# pyfastdl classes that convert produces other than _SWAPS's values (recognized as converted already)
_TWIN_EXTRAS = {pnn.DotProductAttention, pnn.BatchNormActivationSequential}


# LSTM and GRU (family rnn). An LSTM with proj_size != 0 is left (pyfastdl.nn.LSTM supports
# proj_size = 0 only; the summary says so).
_SWAPS.update({
    torch.nn.LSTM: pnn.LSTM,
    torch.nn.GRU: pnn.GRU,
    torch.nn.LSTMCell: pnn.LSTMCell,
    torch.nn.GRUCell: pnn.GRUCell,
})
_SWAPS[torch.nn.Conv2d] = pnn.Conv2d

# SyncBatchNorm and the notes' from-scratch BatchNorm (issue 13)
_SWAPS[torch.nn.SyncBatchNorm] = pnn.SyncBatchNorm
_SWAPS[_NotesBatchNorm] = pnn.BatchNorm

# 2-D pooling (family pool2d): no state, re-classed like the others
_SWAPS[torch.nn.MaxPool2d] = pnn.MaxPool2d
_SWAPS[torch.nn.AvgPool2d] = pnn.AvgPool2d
