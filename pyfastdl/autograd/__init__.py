"""torch.autograd.Function subclasses whose forward and backward call the registered ops."""
from .attention import AttentionFunction
from .batch_norm import BatchNormFunction

__all__ = ["AttentionFunction", "BatchNormFunction"]
