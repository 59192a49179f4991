"""Drop-in replacements for torch.optim with fused multi-tensor kernels (see _fused.py), and the
optimizer step inside backward (in_backward.py)."""
from ._fused import SGD, Adam, AdamW, Adagrad, RMSprop, Adadelta
from .in_backward import StepInBackward, step_in_backward

__all__ = ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adadelta", "step_in_backward", "StepInBackward"]
from .from_torch import from_torch  # noqa: E402

__all__ += ["from_torch"]
