"""``python -m pyfastdl info`` -- the build and the machine;
``python -m pyfastdl bench [--quick] [--device cpu|cuda] [--families batch_norm,...] [--out DIR]
[--no-compile] [--tuned-malloc] [--rounds N]`` -- the benchmark report (pyfastdl/bench);
``python -m pyfastdl train <model> [--device cpu|cuda] [--backend B] [--epochs N] [--batch-size B]
[--compare torch] [--nproc N] [--out DIR] [--seed S] [--steps-per-epoch K] [--quick]`` -- train one of
the notes' models (pyfastdl/train, docs/training.md)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from pyfastdl.bench import core


def info() -> None:
    m = core.machine_info("cpu")
    b, v = m["build"], m["versions"]
    built = ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in m["backends_built"].items())
    print(f"pyfastdl {v['pyfastdl']}, commit {m['commit']}")
    print(f"backends built:  {built}")
    for dev, names in m["backends_available"].items():
        print(f"available on {dev}: {', '.join(names)}")
    if "cuda" not in m["backends_available"]:
        print("available on cuda: (no CUDA device)")
    print(f"CPU SIMD:        {b.get('cpu_capability', '?')} (best the CPU supports: {b.get('cpu_best', '?')}; "
          f"AVX512_BF16: {'yes' if b.get('cpu_avx512_bf16') == '1' else 'no'})")
    print(f"CUDA build:      {'yes' if b.get('cuda') == '1' else 'no'}, archs: {b.get('cuda_archs') or '-'}")
    print(f"CPU:             {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
          f"torch threads {m['torch_threads']} (interop {m['interop_threads']})")
    print(f"GPU:             {m['gpu'] or 'none'}")
    print(f"versions:        torch {v['torch']} (CUDA {v['torch_cuda'] or '-'}), triton {v['triton'] or '-'}, "
          f"python {v['python']}")
    alloc = core.allocator_info()
    env = ", ".join(f"{k}={val}" for k, val in alloc["env"].items()) or "no MALLOC_*/GLIBC_TUNABLES/LD_PRELOAD"
    print(f"allocator:       {alloc['setting']} ({env}); {alloc['probe']}")
    chosen = {k: os.environ[k] for k in ("PYFASTDL_BACKEND", "PYFASTDL_STRICT", "PYFASTDL_CPU_ARCH",
                                         "TRITON_INTERPRET") if k in os.environ}
    if chosen:
        print("environment:     " + ", ".join(f"{k}={val}" for k, val in chosen.items()))


def bench(args) -> None:
    if args.tuned_malloc and os.environ.get("PYFASTDL_BENCH_TUNED_MALLOC") != "1":
        # glibc reads its tunables at process start: re-execute this command with them set.
        env = dict(os.environ, PYFASTDL_BENCH_TUNED_MALLOC="1")
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), core.TUNED_MALLOC]))
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "pyfastdl", *sys.argv[1:]], env)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
    unknown = set(families or ()) - set(core.families())
    if unknown:
        raise SystemExit(f"pyfastdl bench: unknown families {sorted(unknown)}; known: {core.families()}")
    cfg = core.Config.make(device, quick=args.quick, compile=not args.no_compile, rounds=args.rounds)
    for path in core.run(families, cfg, args.out):
        print(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pyfastdl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends built and available, SIMD capability, CUDA archs, versions, threads")
    p = sub.add_parser("bench", help="run the benchmark report (Markdown + JSON + PNG)")
    p.add_argument("--quick", action="store_true", help="few rounds, the target shapes only (a few minutes)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--families", help=f"comma-separated, default all ({', '.join(core.families())})")
    p.add_argument("--out", default="bench/results", help="output folder (default bench/results)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--tuned-malloc", action="store_true",
                   help=f"re-run with GLIBC_TUNABLES={core.TUNED_MALLOC} (freed big blocks are reused, "
                        "not unmapped)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5 quick, 15 full)")
    from pyfastdl import train as _train
    p = sub.add_parser("train", help="train one of the notes' models (PNG, summary, checkpoint); docs/training.md")
    _train.add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
    elif args.command == "train":
        _train.run(args, argv[argv.index("train") + 1:])
    else:
        bench(args)


if __name__ == "__main__":
    main()
