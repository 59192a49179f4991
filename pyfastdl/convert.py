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
    torch.nn.MultiheadAttention: pnn.MultiheadAttention,
    torch.nn.TransformerEncoderLayer: pnn.TransformerEncoderLayer,
}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Returns ``model`` with each supported layer replaced in place: batch norm, MultiheadAttention
    (also inside torch's Transformer layers, which call ``self.self_attn(...)``), and
    TransformerEncoderLayer (whose eval-mode fast path would bypass its attention; a
    TransformerEncoder's nested-tensor path is switched off for the same reason). Parameters,
    buffers, training mode and hooks-free state are carried over. The model itself is returned for chaining; a bare
    supported layer is returned converted."""
    target = _SWAPS.get(type(model))
    if target is not None:
        model = _swap(model, target)  # then its children too (a Transformer layer's self_attn)
    for name, child in model.named_children():
        setattr(model, name, convert(child))
    if type(model) is torch.nn.TransformerEncoder:
        # its eval-mode nested-tensor path packs the batch and hands it to torch's fused layer op;
        # switched off, every layer runs its own forward (and pyfastdl's attention)
        model.use_nested_tensor = False
    return model


def _swap(module: torch.nn.Module, target: type) -> torch.nn.Module:
    # The drop-ins subclass torch's layers and add no state: re-class the module itself, so the
    # parameters stay the same objects (an optimizer built before convert keeps working).
    module.__class__ = target
    return module


# LSTM and GRU (family rnn). An LSTM with proj_size != 0 is swapped too and then refuses to run with a
# clear error (pyfastdl.nn.LSTM supports proj_size = 0 only).
_SWAPS.update({
    torch.nn.LSTM: pnn.LSTM,
    torch.nn.GRU: pnn.GRU,
    torch.nn.LSTMCell: pnn.LSTMCell,
    torch.nn.GRUCell: pnn.GRUCell,
})
_SWAPS[torch.nn.Conv2d] = pnn.Conv2d
