"""Test session set-up: strict dispatch (a passing test proves a pyfastdl kernel ran) and, on a
machine without a GPU, the Triton interpreter -- set before triton is first imported."""
import os

os.environ.setdefault("PYFASTDL_STRICT", "1")
# torch.compile tests compile afresh: inductor's on-disk caches (shared by every checkout on the
# machine, under /tmp) were seen serving a graph compiled against an older schema of our ops.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (a CI result is reproducible); a failing
# example found while developing becomes a regular test. HYPOTHESIS_PROFILE=explore searches anew.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """For modules of small ops (``pytestmark = pytest.mark.usefixtures("one_thread")``): they gain
    nothing from intra-op threads, and on a loaded 2-core machine an OpenMP fork/join costs
    milliseconds per op (sqrt of 4097 elements: 12 ms vs 12 us)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
