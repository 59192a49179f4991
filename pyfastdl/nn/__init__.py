"""Drop-in modules for torch.nn (same constructor arguments, parameter and buffer names) and for the
notes' modules."""
from .attention import DotProductAttention, MultiheadAttention, TransformerEncoderLayer
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormActivationSequential

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormActivationSequential", "DotProductAttention", "MultiheadAttention",
           "TransformerEncoderLayer"]
from .rnn import GRU, LSTM, GRUCell, LSTMCell  # noqa: E402

__all__ += ["LSTM", "GRU", "LSTMCell", "GRUCell"]

from .conv2d import Conv2d  # noqa: E402

__all__ += ["Conv2d"]

from .sync_batch_norm import SyncBatchNorm  # noqa: E402
from .batch_norm_notes import BatchNorm  # noqa: E402  (the notes' from-scratch BatchNorm, on the kernel)

__all__ += ["SyncBatchNorm", "BatchNorm"]

from .pool import AvgPool2d, MaxPool2d  # noqa: E402

__all__ += ["MaxPool2d", "AvgPool2d"]
