"""Test session set-up: strict dispatch (a passing test proves a pyfastdl kernel ran) and, on a
machine without a GPU, the Triton interpreter -- set before triton is first imported."""
import os

os.environ.setdefault("PYFASTDL_STRICT", "1")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
