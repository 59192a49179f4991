"""The benchmark report machinery (docs/benchmarks.md). Knows nothing of any
op family: a family module ``pyfastdl/bench/<family>.py`` exposes ``cases(device, quick)`` returning
``Case`` objects, and this module times them, measures the machine's limit in the same run and
writes the report (Markdown + JSON + PNG) under ``bench/results/``.

Timing protocol, the same for every family:
  * one process, one run, the same inputs for every provider of a case;
  * warm-up first (``torch.compile`` compiles on its first call, which happens here and is reported
    as ``first_call_s``), which also sizes each provider's batch of iterations;
  * then R rounds; each round times one batch of every provider, round-robin (A B C, B C A, ...),
    so that the machine's drift (memory bandwidth moves by up to 2x over minutes) hits every provider
    alike. CPU: ``time.perf_counter`` around a batch; CUDA: ``triton.testing.do_bench`` (median of
    a batch, L2 flushed between iterations) or CUDA events;
  * per provider: the median per-iteration time over the rounds and its spread (p25-p75, min, max);
    speedups are ratios of the medians of the same run;
  * the limit: streaming bandwidth (in-place read+write of a large buffer) measured at the start and
    at the end of the run, and the matmul peak when a compute-bound case is present.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import pkgutil
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["Case", "Target", "Config", "pyfastdl_providers", "torch_compile", "measure", "stream_bandwidth",
           "matmul_peak", "fma_peak", "machine_info", "allocator_info", "families", "run", "write_report", "TUNED_MALLOC"]

# --tuned-malloc: glibc keeps freed big blocks instead of unmapping them (see allocator_info; glibc
# 2.36 honours a 64 MB mmap threshold through the tunable -- checked by the probe, not assumed).
TUNED_MALLOC = "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=67108864"

Provider = Callable[[], object]


@dataclasses.dataclass
class Target:
    """``provider`` must be at least ``min_speedup`` times faster than ``baseline`` (ratio of medians)."""
    provider: str
    baseline: str
    min_speedup: float

    def __str__(self):
        return f"vs {self.baseline} >= {self.min_speedup:g}x"


@dataclasses.dataclass
class Case:
    """One benchmark case: one op, one shape, one dtype, one mode, several providers.

    ``make_providers()`` creates the inputs once and returns {provider name: zero-argument callable
    running one iteration}; it is called right before the case is timed, so only one case's inputs
    live at a time. ``bytes`` (memory-bound) or ``flops`` (compute-bound) is the work of one
    iteration, from the formula written next to the case and quoted in ``formula``."""
    family: str
    name: str
    mode: str                       # "train fwd", "train fwd+bwd", "eval fwd", "step", ...
    dtype: torch.dtype
    params: dict                    # shape and any other parameter, as shown in the report
    make_providers: Callable[[], dict[str, Provider]]
    bytes: int | None = None
    flops: int | None = None
    bound: str = "memory"           # "memory" or "compute"
    formula: str = ""
    targets: list[Target] = dataclasses.field(default_factory=list)
    # called once per provider after the timing, (name, provider) -> {label: value}: numbers beside
    # the time, e.g. peak memory of one iteration; shown in the report's "other" column
    extra: Callable[[str, Provider], dict] | None = None


@dataclasses.dataclass
class Config:
    device: str = "cpu"
    quick: bool = False
    compile: bool = True
    rounds: int = 15
    batch_s: float = 0.05           # time of one provider's batch in a round
    warmup_s: float = 0.3           # warm-up per provider (after its first call)

    @classmethod
    def make(cls, device="cpu", quick=False, compile=True, rounds=None):
        cfg = cls(device, quick, compile, *((5, 0.02, 0.1) if quick else (15, 0.05, 0.3)))
        if rounds:
            cfg.rounds = rounds
        return cfg


# --- providers helpers shared by the families ---------------------------------------------------

def pyfastdl_providers(device: str, call: Provider) -> dict[str, Provider]:
    """{"pyfastdl-<backend>": fn} for each kernel backend that runs on ``device`` ("reference", the
    notes' code, is a provider of its own). ``call()`` runs the pyfastdl op once. The default backend
    is called as a user calls it; the others inside ``backends.use``. The first call checks
    ``last_dispatch()``: a provider whose kernel did not run (a fallback) fails instead of timing
    another implementation under its name."""
    from pyfastdl import backends

    names = [b for b in backends.available(device) if b != "reference"]
    out = {}
    for i, name in enumerate(names):
        default = i == 0 and backends.current() is None
        checked = []

        def run(name=name, default=default, checked=checked):
            if default:
                result = call()
            else:
                with backends.use(name):
                    result = call()
            if not checked:
                d = backends.last_dispatch()
                if d is None or d.backend != name:
                    raise RuntimeError(f"pyfastdl ran {d.backend if d else 'nothing'} instead of {name}"
                                       + (f" ({d.fallback})" if d and d.fallback else ""))
                checked.append(True)
            return result
        out[f"pyfastdl-{name}"] = run
    return out


def torch_compile(fn):
    """``torch.compile`` of the PyTorch code, specialized to the case's shapes (a fresh compile cache
    per case, see run); compile errors surface on the first call and are reported in the row."""
    return torch.compile(fn, dynamic=False)


# --- the machine --------------------------------------------------------------------------------

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best_time(fn, device: str, reps: int) -> float:
    """Best single-call time in seconds (CUDA events on a GPU)."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(reps):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            t = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        best = min(best, t)
    return best


def stream_bandwidth(device: str = "cpu", mb: int | None = None, reps: int = 10) -> float:
    """Streaming memory bandwidth in GB/s: in-place ``buf.mul_(1.0)`` on a float32 buffer (256 MB on
    CPU, 1 GB on a GPU) with all threads; bytes = 2 * size (read + write); best of ``reps``."""
    mb = mb or (1024 if device.startswith("cuda") else 256)
    buf = torch.ones(mb * 2**20 // 4, dtype=torch.float32, device=device)
    t = _best_time(lambda: buf.mul_(1.0), device, reps)
    return 2 * buf.numel() * 4 / t / 1e9


def matmul_peak(device: str = "cpu", n: int | None = None, dtype=torch.float32, reps: int = 5) -> float:
    """Matmul throughput in GFLOP/s: ``torch.mm(a, b, out=c)`` of n x n matrices (2048 on CPU,
    8192 on a GPU), flops = 2 n^3, best of ``reps``. The limit of compute-bound families."""
    n = n or (8192 if device.startswith("cuda") else 2048)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    c = torch.empty(n, n, dtype=dtype, device=device)
    t = _best_time(lambda: torch.mm(a, b, out=c), device, reps)
    return 2 * n**3 / t / 1e9


def fma_peak() -> float:
    """The CPU's float32 FMA throughput in GFLOP/s: a register-only loop of 12 vector FMA chains with
    the SIMD capability in use, on every torch thread at once, best of 3 (torch.ops.pyfastdl.cpu_fma_peak).
    The hardware's limit, beside the matmul peak (which MKL does not reach on AMD CPUs: its AVX2 code)."""
    import pyfastdl  # noqa: F401  (registers torch.ops.pyfastdl)
    return float(torch.ops.pyfastdl.cpu_fma_peak())


def _mmap_probe_mb(mb: int = 48) -> str:
    """Does glibc serve a fresh malloc(mb MB) with mmap (so freeing it unmaps it and the next one
    page-faults) or from the heap (reused)? glibc's default threshold adapts but stops at 32 MB."""
    try:
        class MallInfo2(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        before = libc.mallinfo2().hblkhd
        p = libc.malloc(mb << 20)
        mapped = libc.mallinfo2().hblkhd - before >= mb << 20
        libc.free(p)
    except (OSError, AttributeError):
        return "probe unavailable (not glibc)"
    return f"malloc({mb} MB) is {'mmapped (unmapped on free)' if mapped else 'served from the heap (kept on free)'}"


def allocator_info() -> dict:
    """The allocator setting every provider of the run shares: the environment that changes it and a
    probe of what actually took effect."""
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    try:
        maps = Path("/proc/self/maps").read_text()
        preloaded = sorted({m for m in ("jemalloc", "tcmalloc", "mimalloc") if m in maps})
    except OSError:
        preloaded = []
    libc = " ".join(platform.libc_ver()).strip() or "unknown libc"
    tuned = os.environ.get("PYFASTDL_BENCH_TUNED_MALLOC") == "1"
    setting = ("tuned (--tuned-malloc)" if tuned else "default") + f", {libc}"
    if preloaded:
        setting += ", " + "+".join(preloaded) + " loaded"
    return {"setting": setting, "env": env, "preloaded": preloaded, "tuned": tuned,
            "probe": _mmap_probe_mb()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit(repo: Path) -> str:
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(package)
    except Exception:
        return None


def machine_info(device: str = "cpu") -> dict:
    """Everything a row needs to be compared only with rows of the same machine and build."""
    import pyfastdl
    from pyfastdl import backends

    build = dict(item.partition("=")[::2] for item in torch.ops.pyfastdl.build_info().split(";"))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    name = gpu if device.startswith("cuda") else _cpu_name()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "device": device, "device_name": name, "slug": re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
        "cpu": _cpu_name(), "gpu": gpu, "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "versions": {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                     "triton": _version("triton"), "python": platform.python_version(),
                     "pyfastdl": pyfastdl.__version__},
        "commit": _git_commit(Path(pyfastdl.__file__).resolve().parent.parent),
        "build": build, "backends_built": backends.built(),
        "backends_available": {d: backends.available(d) for d in devices},
    }


# --- timing -------------------------------------------------------------------------------------

def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _batch_cpu(fn: Provider, n: int) -> tuple[float, float]:
    """Seconds per iteration and minor page faults per iteration over a batch of n iterations."""
    f0, t0 = _minflt(), time.perf_counter()
    for _ in range(n):
        fn()
    t = time.perf_counter() - t0
    return t / n, (_minflt() - f0) / n


def _batch_cuda(fn: Provider, n: int, batch_s: float) -> tuple[float, None]:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:  # median of one batch, L2 flushed before every iteration
        return do_bench(fn, warmup=1, rep=batch_s * 1e3, return_mode="median") / 1e3, None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / n, None


def _error(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}"[:160]


def measure(providers: dict[str, Provider], cfg: Config) -> dict[str, dict]:
    """Times the providers of one case: warm-up, then ``cfg.rounds`` interleaved rounds (see the
    module docstring). Returns {name: {"times": [s/iter per round], "faults": [...], "iters": n,
    "first_call_s": s, "error": str | None}}; a provider that raises is reported, not timed."""
    res = {name: {"times": [], "faults": [], "iters": 0, "first_call_s": None, "error": None}
           for name in providers}
    live = {}
    for name, fn in providers.items():
        try:
            t0 = time.perf_counter()
            fn()
            _sync(cfg.device)
            res[name]["first_call_s"] = time.perf_counter() - t0
            calls, start = [], time.perf_counter()
            while len(calls) < 3 or time.perf_counter() - start < cfg.warmup_s:
                t0 = time.perf_counter()
                fn()
                _sync(cfg.device)
                calls.append(time.perf_counter() - t0)
            calls.sort()
            live[name] = max(1, round(cfg.batch_s / calls[len(calls) // 2]))
            res[name]["iters"] = live[name]
        except Exception as e:  # noqa: BLE001 -- a failing provider is a result (compile errors...)
            res[name]["error"] = _error(e)

    names = list(live)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(cfg.rounds):
            k = r % max(len(names), 1)
            for name in names[k:] + names[:k]:
                if res[name]["error"]:
                    continue
                try:
                    if cfg.device.startswith("cuda"):
                        t, f = _batch_cuda(providers[name], live[name], cfg.batch_s)
                    else:
                        t, f = _batch_cpu(providers[name], live[name])
                except Exception as e:  # noqa: BLE001
                    res[name]["error"] = _error(e)
                    continue
                res[name]["times"].append(t)
                res[name]["faults"].append(f)
    finally:
        if gc_was_enabled:
            gc.enable()
    return res


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _rows(case: Case, res: dict[str, dict], info: dict, limit: dict) -> list[dict]:
    """One row per provider of a case, with the case's ratios, rate and targets."""
    med = {n: _quantile(r["times"], 0.5) for n, r in res.items() if r["times"] and not r["error"]}
    rows = []
    for name, r in res.items():
        row = {"family": case.family, "case": case.name, "mode": case.mode,
               "dtype": str(case.dtype).replace("torch.", ""), "params": case.params,
               "shape": case.params.get("shape"), "provider": name,
               "device": info["device"], "device_name": info["device_name"],
               "versions": info["versions"], "commit": info["commit"],
               "bound": case.bound, "bytes": case.bytes, "flops": case.flops, "formula": case.formula,
               "error": r["error"], "first_call_s": r["first_call_s"], "iters_per_round": r["iters"],
               "rounds": len(r["times"]), "extra": r.get("extra")}
        if name in med:
            t = r["times"]
            row.update({"median_ms": med[name] * 1e3, "p25_ms": _quantile(t, 0.25) * 1e3,
                        "p75_ms": _quantile(t, 0.75) * 1e3, "min_ms": min(t) * 1e3, "max_ms": max(t) * 1e3,
                        "faults_per_iter": (None if r["faults"][0] is None
                                            else _quantile(r["faults"], 0.5))})
            for base in dict.fromkeys(["torch", "torch.compile"] + [tg.baseline for tg in case.targets]):
                if base in med:
                    row[f"speedup_vs_{base}"] = med[base] / med[name]
                    # paired by round (same moment of the run): a drift-free view of the spread
                    paired = [b / a for a, b in zip(r["times"], res[base]["times"])]
                    row[f"speedup_vs_{base}_p25_p75"] = [_quantile(paired, 0.25), _quantile(paired, 0.75)]
            if case.bound == "memory" and case.bytes:
                row["achieved"], row["unit"] = case.bytes / med[name] / 1e9, "GB/s"
                row["pct_of_limit"] = 100 * row["achieved"] / limit["bandwidth_gbs"]
            elif case.bound == "compute" and case.flops and limit.get("matmul_gflops"):
                row["achieved"], row["unit"] = case.flops / med[name] / 1e9, "GFLOP/s"
                row["pct_of_limit"] = 100 * row["achieved"] / limit["matmul_gflops"]
        row["targets"] = []
        for tg in case.targets:
            if tg.provider != name:
                continue
            got = row.get(f"speedup_vs_{tg.baseline}")
            row["targets"].append({"target": str(tg), "baseline": tg.baseline, "min_speedup": tg.min_speedup,
                                   "speedup": got,
                                   "status": ("NOT MEASURED" if got is None
                                              else "MET" if got >= tg.min_speedup else "MISSED")})
        rows.append(row)
    return rows


# --- the run ------------------------------------------------------------------------------------

def families() -> list[str]:
    """Every family module of pyfastdl.bench (each exposes ``cases(device, quick)``)."""
    import pyfastdl.bench as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name != "core")


def run(family_names: list[str] | None, cfg: Config, out_dir: str | Path) -> list[Path]:
    """Runs the report: machine limit, every case of every family, machine limit again; writes
    ``<out>/<device-slug>-<date>[-quick].{md,json}`` and one ``...-<family>.png`` per family."""
    from tqdm import tqdm

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("pyfastdl bench: --device cuda asked for, but torch sees no CUDA device")
    info = machine_info(cfg.device)
    info["allocator"] = allocator_info()
    cases = []
    # the model-level family (issue 13) opens the report: its table is the top section
    for fam in sorted(family_names or families(), key=lambda f: f != "models"):
        module = importlib.import_module(f"pyfastdl.bench.{fam}")
        cases += module.cases(cfg.device, cfg.quick)
    started = datetime.datetime.now().astimezone()

    load = {"start": os.getloadavg()[0]}  # other processes on the machine: the noise floor of the run
    limit = {"bandwidth_start_gbs": stream_bandwidth(cfg.device)}
    if any(c.bound == "compute" for c in cases):
        limit["matmul_gflops"] = matmul_peak(cfg.device)
        if not str(cfg.device).startswith("cuda"):
            limit["fma_gflops"] = fma_peak()
    rows = []
    bar = tqdm(cases, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(f"{case.family} {case.mode} {case.params.get('shape', '')}")
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()  # each case compiles its own graphs; no recompile limit across cases
        providers = case.make_providers()
        if not cfg.compile:
            providers = {n: p for n, p in providers.items() if n != "torch.compile"}
        res = measure(providers, cfg)
        if case.extra is not None:
            for name, fn in providers.items():
                if not res[name]["error"]:
                    try:
                        res[name]["extra"] = case.extra(name, fn)
                    except Exception as e:  # noqa: BLE001
                        res[name]["extra"] = {"error": _error(e)}
        del providers
        gc.collect()
        rows.append((case, res))
    bar.close()
    limit["bandwidth_end_gbs"] = stream_bandwidth(cfg.device)
    load["end"] = os.getloadavg()[0]
    # rates are quoted against the higher of the two bandwidth measurements (the conservative fraction)
    limit["bandwidth_gbs"] = max(limit["bandwidth_start_gbs"], limit["bandwidth_end_gbs"])
    elapsed = (datetime.datetime.now().astimezone() - started).total_seconds()

    all_rows = [row for case, res in rows for row in _rows(case, res, info, limit)]
    chosen = list(family_names or families())
    meta = {**info, "date": started.isoformat(timespec="seconds"), "elapsed_s": round(elapsed, 1),
            "families": chosen, "all_families": sorted(chosen) == families(),
            "quick": cfg.quick, "compile": cfg.compile, "rounds": cfg.rounds, "batch_s": cfg.batch_s,
            "limit": limit, "load_average_1min": load}
    return write_report(meta, all_rows, Path(out_dir))


# --- the report ---------------------------------------------------------------------------------

def _fmt_shape(shape) -> str:
    return "x".join(map(str, shape)) if isinstance(shape, (tuple, list)) else str(shape or "")


def _fmt_ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def _markdown(meta: dict, rows: list[dict]) -> str:
    lim, alloc, v = meta["limit"], meta["allocator"], meta["versions"]
    build = ", ".join(f"{k}={val or '-'}" for k, val in meta["build"].items())
    env = ", ".join(f"{k}={val}" for k, val in alloc["env"].items()) or "no MALLOC_*, GLIBC_TUNABLES or LD_PRELOAD"
    where = "GPU" if meta["device"].startswith("cuda") else "CPU"
    lines = [
        f"# pyfastdl benchmark report: {meta['device_name']} ({meta['device']})", "",
        "| | |", "|---|---|",
        f"| device | {meta['device_name']} ({where}); {meta['cores']} cores ({meta['usable_cores']} usable), "
        f"torch threads {meta['torch_threads']} (interop {meta['interop_threads']}) |",
        f"| versions | torch {v['torch']} (CUDA {v['torch_cuda'] or '-'}), triton {v['triton'] or '-'}, "
        f"python {v['python']}, pyfastdl {v['pyfastdl']} |",
        f"| commit | {meta['commit']} |",
        f"| build | {build} |",
        f"| date | {meta['date']} (the run took {meta['elapsed_s']:.0f} s) |",
        f"| load average (1 min) | start {meta['load_average_1min']['start']:.2f}, end "
        f"{meta['load_average_1min']['end']:.2f} (above the core count: other processes shared the machine) |",
        f"| run | {'quick' if meta['quick'] else 'full'}: {meta['rounds']} interleaved rounds, "
        f"~{meta['batch_s'] * 1e3:.0f} ms per provider per round; torch.compile "
        f"{'on' if meta['compile'] else 'off (--no-compile)'} |",
        f"| allocator | {alloc['setting']} ({env}); probe: {alloc['probe']} |",
        f"| memory bandwidth | start {lim['bandwidth_start_gbs']:.1f} GB/s, end {lim['bandwidth_end_gbs']:.1f} GB/s "
        "(in-place `mul_` of a float32 buffer, bytes = 2 x size, best of 10) |",
    ]
    if "matmul_gflops" in lim:
        lines.append(f"| matmul peak | {lim['matmul_gflops']:.0f} GFLOP/s (float32 square matmul, best of 5) |")
    if "fma_gflops" in lim:
        lines.append(f"| FMA peak | {lim['fma_gflops']:.0f} GFLOP/s (float32 FMA loop with the kernels' SIMD capability, "
                     "all threads, best of 3; % limit stays against the matmul peak) |")
    lines += [
        "", "How to read: every provider of a case ran in this process on the same inputs, in interleaved "
        "rounds (A B C, B C A, ...). *median ms* is the median per-iteration time over the rounds "
        "(p25-p75 in brackets); *vs torch* / *vs compile* = that baseline's median / this provider's "
        "median (> 1 is faster); *rate* = the case's bytes (or flops) / median; *% limit* = rate / the "
        "higher of the two bandwidth measurements (or the matmul peak) -- cases that fit in cache can "
        "exceed 100%. *pf/it* = minor page faults per iteration (allocator cost). Compare only rows "
        "of this report.",
    ]
    missed, met, unmeasured, errors = [], 0, [], []
    for fam in dict.fromkeys(r["family"] for r in rows):
        fam_rows = [r for r in rows if r["family"] == fam]
        lines += ["", f"## {fam}", ""]
        lines += [f"- {f}" for f in dict.fromkeys(r["formula"] for r in fam_rows if r["formula"])]
        other = any(r.get("extra") for r in fam_rows)
        lines += ["", "| case | mode | dtype | shape | provider | median ms (p25-p75) | vs torch | vs compile "
                  "| rate | % limit | pf/it | " + ("other | " if other else "") + "target |",
                  "|" + "---|" * (13 if other else 12)]
        previous = None
        for r in fam_rows:
            key = (r["case"], r["mode"], r["dtype"], str(r["shape"]))
            head = ["", "", "", ""] if key == previous else [r["case"], r["mode"], r["dtype"], _fmt_shape(r["shape"])]
            previous = key
            if r["error"]:
                timing = f"error: {r['error']}".replace("|", "/")
                errors.append(f"{fam} {r['case']} {r['mode']} {_fmt_shape(r['shape'])} {r['dtype']}: "
                              f"{r['provider']}: {r['error']}")
                cells = [timing, "", "", "", "", ""] + ([""] if other else [])
            else:
                pf = r.get("faults_per_iter")
                cells = [f"{r['median_ms']:.3f} ({r['p25_ms']:.3f}-{r['p75_ms']:.3f})",
                         _fmt_ratio(r.get("speedup_vs_torch")), _fmt_ratio(r.get("speedup_vs_torch.compile")),
                         f"{r['achieved']:.1f} {r['unit']}" if "achieved" in r else "",
                         f"{r['pct_of_limit']:.0f}%" if "pct_of_limit" in r else "",
                         "" if pf is None else f"{pf:.0f}"]
                if other:
                    cells.append(", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in (r.get("extra") or {}).items()))
            tgt = []
            for t in r["targets"]:
                got = "n/a" if t["speedup"] is None else f"{t['speedup']:.2f}x"
                tgt.append(f"{t['target']}: **{t['status']}** ({got})")
                where = f"{fam} {r['case']} {r['mode']} {_fmt_shape(r['shape'])} {r['dtype']}: {r['provider']}"
                if t["status"] == "MET":
                    met += 1
                elif t["status"] == "MISSED":
                    missed.append(f"{where} {t['target']}, measured {got}")
                else:
                    unmeasured.append(f"{where} {t['target']} (baseline or provider not timed)")
            lines.append("| " + " | ".join(head + [r["provider"]] + cells + ["; ".join(tgt)]) + " |")
    lines += ["", "## Targets", "",
              f"{met + len(missed) + len(unmeasured)} targets: {met} met, {len(missed)} missed, "
              f"{len(unmeasured)} not measured." + (" Missed:" if missed else ""), ""]
    lines += [f"- {m}" for m in missed]
    if unmeasured:
        lines += ["", "Not measured:", ""] + [f"- {m}" for m in unmeasured]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


def _chart(meta: dict, fam: str, rows: list[dict], path: Path) -> None:
    """Horizontal grouped bars: speedup vs torch (log scale) per case and provider, a line at 1.0 and
    a tick at each target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    keys = list(dict.fromkeys((r["case"], r["mode"], r["dtype"], _fmt_shape(r["shape"])) for r in rows))
    provs = [p for p in dict.fromkeys(r["provider"] for r in rows) if p != "torch"]
    by = {((r["case"], r["mode"], r["dtype"], _fmt_shape(r["shape"])), r["provider"]): r for r in rows}
    h = 0.8 / max(len(provs), 1)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.28 * len(keys) * max(len(provs), 1)))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fixed = {"pyfastdl-cpu": 0, "pyfastdl-cuda": 0, "pyfastdl-triton": 3, "torch.compile": 1, "reference": 2}
    for j, p in enumerate(provs):  # the same provider has the same colour in every chart
        ys, xs = [], []
        for i, k in enumerate(keys):
            r = by.get((k, p))
            if r and r.get("speedup_vs_torch"):
                ys.append(i - 0.4 + h * (j + 0.5))
                xs.append(r["speedup_vs_torch"])
            for t in (r or {}).get("targets", []):
                if t["baseline"] == "torch":
                    ax.plot([t["min_speedup"]] * 2, [i - 0.4 + h * j, i - 0.4 + h * (j + 1)], color="black", lw=2)
        ax.barh(ys, xs, height=h, label=p, color=palette[fixed.get(p, 4 + j) % len(palette)])
        for y, x in zip(ys, xs):
            ax.annotate(f"{x:.2f}", (x, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=7)
    ax.axvline(1.0, color="gray", ls="--", lw=1)
    ax.set_xscale("log")
    ratios = [r["speedup_vs_torch"] for r in rows if r.get("speedup_vs_torch")] + [1.0]
    ax.set_xlim(min(ratios) / 1.5, max(ratios) * 2.5)  # room for the labels; bars below 1 stay visible
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_yticks(range(len(keys)), [f"{c} {m} {s} {d}" for c, m, d, s in keys], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup vs torch (median time ratio, log scale; black tick = target)")
    ax.set_title(f"{fam}: {meta['device_name']} ({meta['device']}), {meta['date'][:10]}, commit {meta['commit']}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(meta: dict, rows: list[dict], out_dir: Path) -> list[Path]:
    """``<out>/<slug>-<date>[-quick].md`` / ``.json`` and ``...-<family>.png``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # a report of some families only is named after them, so it never replaces a whole report
    prefix = (f"{meta['slug']}-{meta['date'][:10]}" + ("-quick" if meta["quick"] else "")
              + ("" if meta.get("all_families", True) else "-" + "-".join(f.replace("_", "-") for f in meta["families"])))
    md, js = out_dir / f"{prefix}.md", out_dir / f"{prefix}.json"
    md.write_text(_markdown(meta, rows))
    js.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    paths = [md, js]
    for fam in dict.fromkeys(r["family"] for r in rows):
        png = out_dir / f"{prefix}-{fam.replace('_', '-')}.png"
        _chart(meta, fam, [r for r in rows if r["family"] == fam], png)
        paths.append(png)
    return paths
