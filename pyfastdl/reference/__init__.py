"""The notes' pure-Python implementations (d2l style), runnable without the d2l package. Every
pyfastdl kernel is checked against them (in float64) and benchmarked against them."""
from .batch_norm import BatchNorm, batch_norm, batch_norm_like_torch

__all__ = ["BatchNorm", "batch_norm", "batch_norm_like_torch"]
