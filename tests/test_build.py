"""The build: every op registered for CPU and (when built) CUDA, the CUDA build present where CI
requires it, `import pyfastdl` touching no GPU, `python -m pyfastdl info`, the GPU check failing
clearly without a GPU."""
import os
import subprocess
import sys

import pytest
import torch

import pyfastdl
from pyfastdl import backends
from helpers import HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_OPS = sorted(n for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("pyfastdl::") and n != "pyfastdl::build_info")


def test_ops_are_registered():
    assert "pyfastdl::batch_norm_fwd" in KERNEL_OPS and "pyfastdl::batch_norm_bwd" in KERNEL_OPS


@pytest.mark.parametrize("op", KERNEL_OPS)
def test_every_op_has_cpu_and_cuda_kernels(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
    if backends.built()["cuda"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"


@pytest.mark.skipif(os.environ.get("PYFASTDL_REQUIRE_CUDA_BUILD") != "1",
                    reason="PYFASTDL_REQUIRE_CUDA_BUILD=1 (CI) requires the CUDA sources built")
def test_cuda_sources_were_built():
    info = torch.ops.pyfastdl.build_info()
    assert "cuda=1" in info, info


def test_import_touches_no_gpu_and_info_runs():
    code = "import torch, pyfastdl; assert not torch.cuda.is_initialized(); print('ok')"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip() == "ok"
    out = subprocess.run([sys.executable, "-m", "pyfastdl", "info"], check=True, capture_output=True, text=True).stdout
    assert "cpu" in out and torch.__version__ in out


def test_triton_kernels_live_inside_the_pyfastdl_namespace():
    import importlib.util
    assert importlib.util.find_spec("pyfastdl.triton_kernels") is not None
    assert pyfastdl.__name__ == "pyfastdl"


@pytest.mark.skipif(HAS_CUDA, reason="checks the failure without a GPU")
def test_gpu_check_fails_clearly_without_gpu(tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path)],
                       capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 2
    assert "no NVIDIA GPU" in r.stderr
