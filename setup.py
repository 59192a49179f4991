"""Build of pyfastdl and its extension pyfastdl._C.

    pip install --no-build-isolation -e .

Environment:
    PYFASTDL_CUDA=auto|0|1   build the CUDA sources (auto: when torch has CUDA and nvcc is found)
    TORCH_CUDA_ARCH_LIST     GPU archs (default "8.0;9.0")
    MAX_JOBS                 parallel compile jobs (ninja, and the SIMD objects)
    PYFASTDL_SANITIZE=1      CPU-only build with -fsanitize=address,undefined (-O1, line tables), for
                             `make test-sanitize` (scripts/sanitize.sh builds it in a copy of the tree,
                             so the normal build is not touched; the runtime must be preloaded)

CPU kernels with SIMD (csrc/cpu/*_kernel.cpp) are compiled once per capability (DEFAULT, AVX2,
AVX512), each with its own flags and `CPU_CAPABILITY` namespace, and chosen at run time from what the
CPU supports (csrc/cpu/capability.h), the way ATen's own dispatch works.
"""
import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """nvcc may sit on PATH as a symlink or a wrapper script (/usr/local/bin/nvcc); torch would then
    guess CUDA_HOME=/usr/local, where libcudart is not. Ask nvcc itself where its toolkit is."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # `nvcc -v` on a dummy input prints "#$ TOP=<toolkit root>"
            out = subprocess.run([nvcc, "-v", "--version"], capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    candidates.insert(0, line.split("=", 1)[1].strip())
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and (
                glob.glob(os.path.join(home, "lib64", "libcudart.so*")) or
                glob.glob(os.path.join(home, "lib", "libcudart.so*"))):
            os.environ["CUDA_HOME"] = home
            return


_find_cuda_home()

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

CAPABILITIES = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mavx2", "-mf16c"],
}


SANITIZE = os.environ.get("PYFASTDL_SANITIZE", "0").lower() in ("1", "on", "true", "yes")


def _want_cuda():
    mode = os.environ.get("PYFASTDL_CUDA", "auto").lower()
    if SANITIZE:  # host sanitizers do not see device code; the sanitized build is the CPU one
        if mode in ("1", "on", "true", "yes"):
            sys.exit("PYFASTDL_SANITIZE=1 builds the CPU extension only; set PYFASTDL_CUDA=0")
        return False
    found = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") or os.path.exists(os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")))
    if mode in ("0", "off", "false", "no"):
        return False
    if mode in ("1", "on", "true", "yes"):
        if not found:
            sys.exit("PYFASTDL_CUDA=1 but torch has no CUDA or nvcc was not found")
        return True
    return bool(found)


def _nvidia_include_dirs():
    """Headers that torch's own nvidia wheels ship (cusparse.h & co) for the CUDA build."""
    dirs = []
    for sp in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            p = os.path.join(sp, sub)
            if os.path.isdir(p) and p not in dirs:
                dirs.append(p)
        dirs += [d for d in glob.glob(os.path.join(sp, "nvidia", "*", "include")) if d not in dirs]
    return dirs


WITH_CUDA = _want_cuda()
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

# -fopenmp: at::parallel_for is a header template whose OpenMP pragma is compiled into *our* code;
# without the flag it silently runs on one thread.
CXX_FLAGS = ["-O3", "-std=c++20", "-fno-math-errno", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
if SANITIZE:
    # -O1 keeps the reports' stacks exact and compiles faster; -g1: file:line in the stacks.
    SAN = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    CXX_FLAGS = ["-O1", "-g1"] + CXX_FLAGS[1:] + SAN
    LINK_FLAGS += SAN
NVCC_FLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]

simd_sources = sorted(glob.glob("csrc/cpu/*_kernel.cpp"))
plain_sources = ["csrc/ops.cpp"] + sorted(s for s in glob.glob("csrc/cpu/*.cpp") if s not in simd_sources)
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) if WITH_CUDA else []

headers = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
macros = [("PYFASTDL_WITH_CUDA", "1" if WITH_CUDA else "0"),
          ("PYFASTDL_CUDA_ARCHS", '"%s"' % os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", ",") if WITH_CUDA else '""')]

Ext = cpp_extension.CUDAExtension if WITH_CUDA else cpp_extension.CppExtension
ext = Ext(
    name="pyfastdl._C",
    sources=plain_sources + cuda_sources,
    include_dirs=[os.path.join(ROOT, "csrc")] + (_nvidia_include_dirs() if WITH_CUDA else []),
    define_macros=macros,
    # relink when only a SIMD source or a header changed (distutils compares `sources` alone)
    depends=simd_sources + headers,
    extra_link_args=LINK_FLAGS,
    extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS + ["-Xcompiler", "-fopenmp"]} if WITH_CUDA else CXX_FLAGS,
    py_limited_api=False,
)


def _up_to_date(obj: str, source: str, newest_header: float) -> bool:
    return os.path.exists(obj) and os.path.getmtime(obj) > max(os.path.getmtime(source), newest_header)


class BuildExt(cpp_extension.BuildExtension):
    """Compiles each SIMD kernel source once per CPU capability, then links them into pyfastdl._C.

    The (capability, source) objects compile in a thread pool. With MAX_JOBS >= 4 they compile while
    ninja builds the other sources (the CUDA files are the long pole), and are waited for at the
    link; with fewer jobs they compile first, so at most MAX_JOBS compilers run at a time."""

    def build_extensions(self):
        jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        overlap = jobs >= 4
        plain_compile = self.compiler.compile  # before BuildExtension routes compile() through ninja
        # Incremental rebuilds (`python setup.py build_ext --inplace`): distutils recompiles every
        # source, so skip a capability's objects that are newer than their source and every header.
        newest_header = max((os.path.getmtime(h) for h in headers), default=0.0)
        self._simd_objects = {}
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, jobs - len(self.extensions[0].sources)) if overlap else jobs)
        try:
            for e in self.extensions:
                def compile_one(cap, source, e=e):
                    out_dir = os.path.join(self.build_temp, "cap_" + cap)
                    obj = os.path.join(out_dir, os.path.splitext(source)[0] + ".o")
                    if _up_to_date(obj, source, newest_header):
                        return obj
                    return plain_compile(
                        [source], output_dir=out_dir,
                        macros=[("CPU_CAPABILITY", cap), ("CPU_CAPABILITY_" + cap, None)] + macros,
                        include_dirs=e.include_dirs + cpp_extension.include_paths(),
                        extra_postargs=CXX_FLAGS + CAPABILITIES[cap] + ["-fPIC", "-g1" if SANITIZE else "-g0"]
                        + self._abi_flags(),
                    )[0]

                futures = [pool.submit(compile_one, cap, s) for cap in CAPABILITIES for s in simd_sources]
                if not overlap:
                    concurrent.futures.wait(futures)
                self._simd_objects[e.name] = futures
            super().build_extensions()
        finally:
            pool.shutdown(wait=True)

    def build_extension(self, ext):
        futures = self._simd_objects.get(ext.name, [])
        link = self.compiler.link_shared_object

        def link_with_simd(objects, *args, **kwargs):  # the SIMD objects join at the link
            return link(list(objects) + [f.result() for f in futures], *args, **kwargs)

        self.compiler.link_shared_object = link_with_simd
        try:
            super().build_extension(ext)
        finally:
            self.compiler.link_shared_object = link

    @staticmethod
    def _abi_flags():
        return ["-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI),
                "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]


setup(
    name="pyfastdl",
    version="0.1.0",
    description="Hand-written C++, CUDA and Triton kernels for classic deep-learning layers, "
                "as drop-in replacements for torch.nn / torch.nn.functional / torch.optim",
    packages=["pyfastdl", "pyfastdl.autograd", "pyfastdl.nn", "pyfastdl.optim", "pyfastdl.reference",
              "pyfastdl.bench", "pyfastdl.triton_kernels"],
    package_dir={"pyfastdl.triton_kernels": "triton_kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "bench": ["matplotlib", "tqdm"],
                    "triton": ["triton"]},
    zip_safe=False,
)
