"""torch.autograd.Function subclasses whose forward and backward call the registered ops."""
from . import conv2d, rnn  # noqa: F401  (the fake implementations of the conv2d and rnn ops)
from .attention import AttentionFunction
from .batch_norm import BatchNormFunction

__all__ = ["AttentionFunction", "BatchNormFunction"]
