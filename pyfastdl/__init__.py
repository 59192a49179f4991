"""pyfastdl: hand-written C++ (CPU), CUDA and Triton kernels for classic deep-learning layers, as
drop-in replacements for ``torch.nn.functional``, ``torch.nn`` and ``torch.optim``.

    import pyfastdl
    from pyfastdl.nn import BatchNorm2d          # same arguments and state_dict as torch.nn.BatchNorm2d
    model = pyfastdl.convert(model)               # swap every supported layer, weights kept
    pyfastdl.backends.use("triton")               # choose a backend (also a context manager)

Importing pyfastdl loads the extension ``pyfastdl._C`` (which registers ``torch.ops.pyfastdl.*``) and
touches no GPU; Triton is imported only when its backend is used.
"""
import torch  # noqa: F401  (loads libtorch, which pyfastdl._C links against)

from . import _C  # noqa: F401,E402  (registers torch.ops.pyfastdl.*)
from . import backends, functional, nn, optim, reference  # noqa: F401
from .convert import convert

__version__ = "0.1.0"
__all__ = ["backends", "functional", "nn", "optim", "reference", "convert"]
