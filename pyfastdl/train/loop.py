"""``python -m pyfastdl train``: the training loop, DistributedDataParallel, the outputs.

One run trains the chosen model with pyfastdl (``pyfastdl.convert`` + the ``pyfastdl.optim``
optimizer of the same class) and, with ``--compare torch``, the same model from the same seed (same
initial weights, same batches in the same order) with torch's layers and ``torch.optim`` (``fused=True``
where torch has a fused kernel for the device). Each step is timed (``time.perf_counter``, CUDA
synchronized); the validation set is evaluated a few times per epoch, outside the timed steps, so the
time to a validation accuracy (perplexity) counts training time only.

With ``--nproc N`` (N > 1) the command re-executes itself under torchrun
(``python -m torch.distributed.run --standalone --nproc-per-node N -m pyfastdl train ...``); launched by
torchrun (``RANK``/``WORLD_SIZE`` set, e.g. across machines with torchrun's own rendezvous options),
it joins the process group (gloo on the CPU, nccl on a GPU), wraps the model in
DistributedDataParallel and gives each rank a shard of every epoch (``DistributedSampler``; the
global batch ``--batch-size`` is split over the ranks). Models with batch norm get torch's
``convert_sync_batchnorm`` before ``pyfastdl.convert`` (which maps it to pyfastdl's SyncBatchNorm
where it has one); torch's own SyncBatchNorm runs on GPUs only, so on the CPU a model that would
be left with it keeps per-rank batch statistics instead, and the summary says so. Rank 0 evaluates
and writes the outputs.

Outputs in ``--out`` (default ``train-out/<model>``): ``curves.png`` (training loss per step,
validation metric against training time; both implementations in one figure with ``--compare``),
``summary.md``, ``metrics.json``, ``checkpoint.pt`` (the pyfastdl run's state_dict, which loads into
the plain torch model: ``pyfastdl.train.load_checkpoint``) and, with ``--compare torch``,
``checkpoint-torch.pt``.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .models import MODELS, batch_loss, build, datasets, evaluate

__all__ = ["add_arguments", "run", "load_checkpoint"]


def add_arguments(p) -> None:
    p.add_argument("model", choices=list(MODELS), help="the model to train")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    from pyfastdl.backends import NAMES
    p.add_argument("--backend", choices=list(NAMES), help="pyfastdl backend; default: the device's (on the CPU "
                   "the Triton backend runs under the interpreter: TRITON_INTERPRET=1, slow)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 5; --quick: 1)")
    p.add_argument("--batch-size", type=int, help="global batch (split over --nproc ranks); default per model")
    p.add_argument("--lr", type=float, help="learning rate; default per model")
    p.add_argument("--compare", choices=["torch"], help="also train with torch's layers and torch.optim")
    p.add_argument("--nproc", type=int, default=1, help="processes (DistributedDataParallel through torchrun)")
    p.add_argument("--out", help="output folder (default train-out/<model>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps-per-epoch", type=int, help="stop each epoch after this many steps")
    p.add_argument("--evals-per-epoch", type=int, default=4, help="validation passes per epoch (default 4)")
    p.add_argument("--target", type=float, help="the validation accuracy (perplexity) whose time-to is "
                   "reported; default per model")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 epoch of 4 steps, 256 validation samples, 2 evaluations")


# ---- distributed --------------------------------------------------------------------------------

def _in_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def _launch(args, argv) -> dict:
    """Re-executes this command under torchrun with args.nproc processes; returns rank 0's metrics."""
    # the workers know they run under torchrun; --nproc is left out (torchrun's argparse would take it
    # for an abbreviation of its own --nproc-per-node)
    worker_argv, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            worker_argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "pyfastdl", "train", *worker_argv]
    print("pyfastdl train: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    env = dict(os.environ, PYFASTDL_TRAIN_COMMAND="python -m pyfastdl train " + " ".join(argv))
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        raise SystemExit(f"pyfastdl train: the {args.nproc} processes failed (exit status {rc})")
    return json.loads((Path(args.out) / "metrics.json").read_text())


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---- one training run ---------------------------------------------------------------------------

def _make_optimizer(impl, spec, params, lr, device):
    kw = dict(spec.optim_kwargs)
    if lr is not None:
        kw["lr"] = lr
    if impl == "pyfastdl":
        import pyfastdl
        return getattr(pyfastdl.optim, spec.optimizer)(params, **kw), kw
    cls = getattr(torch.optim, spec.optimizer)
    try:  # torch's fastest path: its fused kernel where it has one for this device
        opt = cls(params, fused=True, **kw)
        kw["fused"] = True
        return opt, kw
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kw), kw


def _prepare(impl, spec, name, seed, device, world, notes):
    """The model of one implementation: built from ``seed``, SyncBatchNorm under DDP, converted."""
    import pyfastdl
    model = build(name, seed)
    if world > 1 and _has_batch_norm(model):
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
        if impl == "pyfastdl":
            synced = pyfastdl.convert(synced)
        left = any(type(m) is nn.SyncBatchNorm for m in synced.modules())
        if left and torch.device(device).type == "cpu":
            notes.append(f"{impl}: batch-norm statistics per rank (torch's SyncBatchNorm runs on GPUs only"
                         + (", and pyfastdl.convert left it in place" if impl == "pyfastdl" else "") + ")")
        else:
            model = synced
            kinds = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()
                            if "SyncBatchNorm" in type(m).__name__})
            notes.append(f"{impl}: batch-norm statistics combined over the ranks ({', '.join(kinds)})")
    if impl == "pyfastdl":
        model = pyfastdl.convert(model)
    model = model.to(device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _is_pyfastdl_layer(m: nn.Module) -> bool:
    """A module pyfastdl.convert put in (not the notes' reference classes the models are built from)."""
    mod = type(m).__module__
    return mod.startswith("pyfastdl.") and not mod.startswith(("pyfastdl.reference", "pyfastdl.train"))


def _swapped(model: nn.Module) -> dict:
    """{pyfastdl class name: count} of the modules pyfastdl.convert put in."""
    out = {}
    for m in model.modules():
        if _is_pyfastdl_layer(m):
            out[type(m).__name__] = out.get(type(m).__name__, 0) + 1
    return out


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _train_one(impl, args, spec, rank, world, device, notes):
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
    from tqdm import tqdm

    import pyfastdl

    name = args.model
    model = _prepare(impl, spec, name, args.seed, device, world, notes)
    opt, opt_kw = _make_optimizer(impl, spec, model.parameters(), args.lr, device)
    swapped = _swapped(model)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev_ids = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else None
        # the notes' BERT adds its position embedding through .data: that parameter gets no gradient
        net = DDP(model, device_ids=dev_ids, find_unused_parameters=(name == "bert"))

    train_set, val_set = datasets(name)
    if args.quick:
        val_set = Subset(val_set, range(min(256, len(val_set))))
    batch = args.batch_size or spec.batch_size
    per_rank = max(1, batch // world)
    if world > 1:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                     drop_last=True)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(args.seed))
    # drop_last: batch norm cannot train on a batch of one
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=256)
    steps_per_epoch = len(loader) if args.steps_per_epoch is None else min(len(loader), args.steps_per_epoch)
    if steps_per_epoch < 1:
        raise SystemExit(f"pyfastdl train: batch {per_rank} per rank leaves no full batch in {len(train_set)} "
                         "samples")
    eval_every = max(1, steps_per_epoch // max(1, args.evals_per_epoch))
    backend = pyfastdl.backends.use(args.backend) if (impl == "pyfastdl" and args.backend) else contextlib.nullcontext()
    better = (lambda v, t: v >= t) if spec.metric == "accuracy" else (lambda v, t: v <= t)
    target = args.target if args.target is not None else spec.target

    losses, step_times, evals = [], [], []
    train_time, step, reached = 0.0, 0, None

    def do_eval():
        nonlocal reached
        if rank != 0:
            return
        m = evaluate(spec.kind, model, val_loader, device, spec.channels_last)
        evals.append({"step": step, "time_s": train_time, **m})
        if reached is None and better(m[spec.metric], target):
            reached = {"step": step, "time_s": train_time, spec.metric: m[spec.metric]}

    model.train()
    with backend:
        for epoch in range(args.epochs):
            if world > 1:
                sampler.set_epoch(epoch)
            bar = tqdm(total=steps_per_epoch, desc=f"{name} {impl} epoch {epoch + 1}/{args.epochs}",
                       unit="step", disable=rank != 0, file=sys.stderr, dynamic_ncols=True, leave=True)
            for i, b in enumerate(loader):
                if i >= steps_per_epoch:
                    break
                b = [t.to(device, non_blocking=True) for t in b]
                _sync(device)
                t0 = time.perf_counter()
                loss, count, _ = batch_loss(spec.kind, net, b, spec.channels_last)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if spec.clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
                opt.step()
                value = float(loss.detach())   # synchronizes a GPU
                dt = time.perf_counter() - t0
                step += 1
                train_time += dt
                step_times.append(dt)
                losses.append(value)
                unit = "tok" if spec.kind == "lm" else "seq" if spec.kind == "seq" else "img"
                n = b[0].numel() if spec.kind == "lm" else b[0].shape[0]
                bar.set_postfix_str(f"loss {value:.3f}, {n * world / dt:,.0f} {unit}/s")
                bar.update(1)
                if not math.isfinite(value):
                    bar.close()
                    raise SystemExit(f"pyfastdl train: {impl} loss is {value} at step {step}")
                if step % eval_every == 0 and (i + 1) != steps_per_epoch:
                    do_eval()
            do_eval()
            bar.close()
            if rank == 0 and evals:
                e = evals[-1]
                print(f"{name} {impl} epoch {epoch + 1}: validation loss {e['loss']:.4f}, "
                      f"{spec.metric} {e[spec.metric]:.4f} ({train_time:.1f} s of training)", file=sys.stderr,
                      flush=True)
    warm = step_times[min(2, len(step_times) - 1):]  # the first steps allocate and warm caches
    return {
        "impl": impl, "optimizer": f"{'pyfastdl' if impl == 'pyfastdl' else 'torch'}.optim.{spec.optimizer}",
        "optimizer_kwargs": opt_kw, "swapped": swapped, "losses": losses, "evals": evals,
        "steps": step, "train_time_s": train_time, "step_ms_median": 1e3 * statistics.median(warm),
        "step_ms_p25_p75": [1e3 * _q(warm, 0.25), 1e3 * _q(warm, 0.75)],
        "samples_per_step": per_rank * world, "target": target, "reached": reached,
        "final": evals[-1] if evals else None,
    }, model


def _q(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---- outputs ------------------------------------------------------------------------------------

def _plot(results, spec, name, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {"pyfastdl": "tab:blue", "torch": "tab:orange"}
    for impl, r in results.items():
        ls = r["losses"]
        a1.plot(range(1, len(ls) + 1), ls, color=colors[impl], alpha=0.3, lw=0.8)
        k = max(1, len(ls) // 20)  # moving average over ~5% of the run
        if len(ls) >= k:
            smooth = [sum(ls[max(0, i - k + 1):i + 1]) / len(ls[max(0, i - k + 1):i + 1]) for i in range(len(ls))]
            a1.plot(range(1, len(ls) + 1), smooth, color=colors[impl], label=f"{impl} ({r['optimizer']})")
        xs = [e["time_s"] for e in r["evals"]]
        ys = [e[spec.metric] for e in r["evals"]]
        a2.plot(xs, ys, "o-", color=colors[impl], ms=3,
                label=f"{impl}: {r['step_ms_median']:.1f} ms/step")
    a1.set_xlabel("step")
    a1.set_ylabel("training loss")
    a1.set_yscale("log")
    a1.legend(fontsize=8)
    a2.axhline(next(iter(results.values()))["target"], color="gray", ls="--", lw=1, label="target")
    a2.set_xlabel("training time (s, evaluation excluded)")
    a2.set_ylabel(f"validation {spec.metric}")
    if spec.metric == "perplexity":
        a2.set_yscale("log")
    a2.legend(fontsize=8)
    fig.suptitle(f"pyfastdl train {name}: {spec.description}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(meta, results, spec) -> str:
    m = spec.metric
    lines = [f"# pyfastdl train {meta['model']}", "", spec.description + ".", "",
             "| | |", "|---|---|"]
    for k in ("date", "device", "backend", "nproc", "epochs", "steps_per_epoch", "batch_size", "seed",
              "torch_threads", "load_average", "versions", "commit", "command"):
        lines.append(f"| {k.replace('_', ' ')} | {meta[k]} |")
    lines += ["", f"| run | optimizer | ms / step (median, p25-p75) | steps | training time | final validation "
              f"loss | final {m} | time to {m} {'>=' if m == 'accuracy' else '<='} {results[next(iter(results))]['target']:g} |",
              "|---|---|---|---|---|---|---|---|"]
    for impl, r in results.items():
        f = r["final"] or {}
        reach = (f"{r['reached']['time_s']:.2f} s (step {r['reached']['step']})" if r["reached"]
                 else "not reached")
        lines.append(f"| {impl} | {r['optimizer']} {r['optimizer_kwargs']} | {r['step_ms_median']:.2f} "
                     f"({r['step_ms_p25_p75'][0]:.2f}-{r['step_ms_p25_p75'][1]:.2f}) | {r['steps']} | "
                     f"{r['train_time_s']:.2f} s | {f.get('loss', float('nan')):.4f} | "
                     f"{f.get(m, float('nan')):.4f} | {reach} |")
    if "torch" in results and "pyfastdl" in results:
        p, t = results["pyfastdl"], results["torch"]
        lines += ["", f"Time per step, torch / pyfastdl: **{t['step_ms_median'] / p['step_ms_median']:.2f}x**."]
        if p["reached"] and t["reached"]:
            lines.append(f"Time to the target, torch / pyfastdl: "
                         f"**{t['reached']['time_s'] / p['reached']['time_s']:.2f}x**.")
    sw = results["pyfastdl"]["swapped"]
    lines += ["", "pyfastdl.convert put in: " + (", ".join(f"{n} x{c}" for n, c in sw.items()) or
                                                  "nothing (no layer of this model has a pyfastdl twin yet)") + "."]
    lines += [f"- {n}" for n in meta["notes"]]
    lines += ["", "Outputs: `curves.png` (training loss per step; validation " + m + " against training time), "
              "`metrics.json`, `checkpoint.pt` (the pyfastdl run's weights; "
              "`pyfastdl.train.load_checkpoint('checkpoint.pt')` returns the plain torch model)"
              + (", `checkpoint-torch.pt`" if "torch" in results else "") + "."]
    return "\n".join(lines) + "\n"


def load_checkpoint(path, map_location="cpu") -> nn.Module:
    """The plain torch model (``pyfastdl.train.models.build``) with a checkpoint's weights loaded
    (strictly); the checkpoint of a pyfastdl run loads as well as a torch run's."""
    ck = torch.load(path, map_location=map_location, weights_only=True)
    model = build(ck["model"])
    model.load_state_dict(ck["state_dict"])
    return model


# ---- the command --------------------------------------------------------------------------------

def run(args, argv=None) -> dict:
    """Runs ``python -m pyfastdl train`` with parsed ``args`` (``argv``: the arguments after ``train``,
    needed to re-execute under torchrun). Returns the metrics written to metrics.json."""
    spec = MODELS[args.model]
    if args.epochs is None:
        args.epochs = 1 if args.quick else 5
    if args.quick and args.steps_per_epoch is None:
        args.steps_per_epoch = 4
    if args.quick:
        args.evals_per_epoch = min(args.evals_per_epoch, 2)
    args.out = args.out or os.path.join("train-out", args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pyfastdl train: --device cuda asked for, but torch sees no CUDA device")
    if args.nproc < 1:
        raise SystemExit(f"pyfastdl train: --nproc must be >= 1, got {args.nproc}")
    if args.epochs < 1:
        raise SystemExit(f"pyfastdl train: --epochs must be >= 1, got {args.epochs}")
    if args.nproc > 1 and not _in_torchrun():
        return _launch(args, argv if argv is not None else sys.argv[2:])

    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1")) if _in_torchrun() else 1
    rank = int(os.environ.get("RANK", "0")) if world > 1 else 0
    if world > 1:
        if device == "cuda":
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    try:
        notes, results, models = [], {}, {}
        for impl in ["pyfastdl"] + (["torch"] if args.compare == "torch" else []):
            results[impl], models[impl] = _train_one(impl, args, spec, rank, world, device, notes)
        metrics = None
        if rank == 0:
            metrics = _write(args, spec, device, world, results, models, notes, argv)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return metrics


def _write(args, spec, device, world, results, models, notes, argv) -> dict:
    from pyfastdl.bench.core import _git_commit, _version
    import pyfastdl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for impl, model in models.items():
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"model": args.model, "impl": impl, "state_dict": state, "seed": args.seed,
                    "epochs": args.epochs, "final": results[impl]["final"]},
                   out / ("checkpoint.pt" if impl == "pyfastdl" else f"checkpoint-{impl}.pt"))
    load = os.getloadavg()
    meta = {
        "model": args.model, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device, "backend": args.backend or "default", "nproc": world, "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch or "all", "batch_size": results["pyfastdl"]["samples_per_step"],
        "seed": args.seed, "torch_threads": torch.get_num_threads(),
        "load_average": " ".join(f"{x:.2f}" for x in load),
        "versions": f"torch {torch.__version__}, pyfastdl {pyfastdl.__version__}, python {sys.version.split()[0]}"
                    + (f", triton {_version('triton')}" if _version("triton") else ""),
        "commit": _git_commit(Path(pyfastdl.__file__).resolve().parent.parent),
        "command": "`" + os.environ.get("PYFASTDL_TRAIN_COMMAND", "python -m pyfastdl train " + " ".join(
            argv if argv is not None else sys.argv[2:])) + "`",
        "notes": notes,
    }
    _plot(results, spec, args.model, out / "curves.png")
    (out / "summary.md").write_text(_summary(meta, results, spec))
    metrics = {"meta": meta, "results": results}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str) + "\n")
    print(f"pyfastdl train: wrote {out}/summary.md, curves.png, metrics.json, checkpoint.pt", file=sys.stderr)
    return metrics
