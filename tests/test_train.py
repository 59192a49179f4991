"""``python -m pyfastdl train`` (pyfastdl/train) and the model-level benchmark family (pyfastdl/bench/models.py).

Each model trains a few tiny steps end to end through the CLI's ``main`` (in this process, strict:
every converted layer must run pyfastdl's kernel); the run writes the plot, the summary, the metrics
and a checkpoint, and the checkpoint, loaded into the *plain torch* model, reproduces the validation
loss the pyfastdl model reported. Then the CLI as a command with ``--compare torch`` (same seed: the
first losses agree), 2-process DDP through torchrun (gloo), and the benchmark family in a tiny mode.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyfastdl.__main__ as cli
from pyfastdl import train
from pyfastdl.train.models import MODELS, SEQ_VOCAB, evaluate, sort_task

ROOT = Path(__file__).resolve().parent.parent
TINY = {"image": ["--batch-size", "16"], "lm": ["--batch-size", "8"], "seq": ["--batch-size", "16"]}

pytest.importorskip("sklearn", reason="the CNNs train on scikit-learn's digits (requirements-dev.txt)")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny steps on a shared machine: one thread (two threads wait on each other at every op when the
    cores are busy; 4x slower seen)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check_outputs(out: Path, name: str, impls=("pyfastdl",)):
    for f in ("curves.png", "summary.md", "metrics.json", "checkpoint.pt"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["results"]) == list(impls)
    summary = (out / "summary.md").read_text()
    for impl in impls:
        assert f"| {impl} |" in summary
    return metrics


def _val_loss_with_torch_model(out: Path, name: str, ckpt="checkpoint.pt"):
    """The checkpoint in the plain torch model (strict load), evaluated on the --quick validation set."""
    from torch.utils.data import DataLoader, Subset
    model = train.load_checkpoint(out / ckpt)
    from pyfastdl.train.loop import _is_pyfastdl_layer
    assert not any(_is_pyfastdl_layer(m) for m in model.modules()), "not the plain model"
    _, val = train.datasets(name)
    loader = DataLoader(Subset(val, range(min(256, len(val)))), batch_size=256)
    return evaluate(MODELS[name].kind, model, loader, "cpu", MODELS[name].channels_last)


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_trains_and_its_checkpoint_loads_into_the_torch_model(name, tmp_path):
    out = tmp_path / name
    cli.main(["train", name, "--quick", "--steps-per-epoch", "2", "--out", str(out), *TINY[MODELS[name].kind]])
    metrics = _check_outputs(out, name)
    r = metrics["results"]["pyfastdl"]
    assert r["steps"] == 2 and len(r["losses"]) == 2 and all(l > 0 for l in r["losses"])
    if MODELS[name].kind in ("image", "lm"):   # convert swapped the model's conv/bn/rnn layers
        assert r["swapped"], r
    again = _val_loss_with_torch_model(out, name)
    final = r["final"]
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-4, abs=1e-5)
    key = MODELS[name].metric
    assert again[key] == pytest.approx(final[key], rel=1e-3)


def test_the_command_with_compare_torch(tmp_path):
    """The CLI as a command: --compare torch trains the same model from the same seed with torch's layers
    and torch.optim; the same batches in the same order, so the losses agree step by step."""
    out = tmp_path / "cmp"
    subprocess.run([sys.executable, "-m", "pyfastdl", "train", "lenet-bn", "--quick", "--compare", "torch",
                    "--batch-size", "32", "--out", str(out)], check=True, cwd=ROOT, timeout=300,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = _check_outputs(out, "lenet-bn", ("pyfastdl", "torch"))
    ours, theirs = metrics["results"]["pyfastdl"], metrics["results"]["torch"]
    assert theirs["optimizer"] == "torch.optim.SGD" and ours["optimizer"] == "pyfastdl.optim.SGD"
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-4)
    assert "Time per step, torch / pyfastdl" in (out / "summary.md").read_text()
    again = _val_loss_with_torch_model(out, "lenet-bn", "checkpoint-torch.pt")
    assert again["loss"] == pytest.approx(theirs["final"]["loss"], rel=1e-4)


def test_two_processes_ddp(tmp_path):
    """--nproc 2: torchrun, gloo, a shard per rank, rank 0 writes; the checkpoint loads into torch's model."""
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "pyfastdl", "train", "lenet-bn", "--quick", "--nproc", "2",
                    "--steps-per-epoch", "2", "--batch-size", "32", "--out", str(out)],
                   check=True, cwd=ROOT, timeout=300, env=env)
    metrics = _check_outputs(out, "lenet-bn")
    assert metrics["meta"]["nproc"] == 2
    r = metrics["results"]["pyfastdl"]
    assert r["steps"] == 2 and r["samples_per_step"] == 32
    assert any("batch-norm statistics" in n for n in metrics["meta"]["notes"])
    again = _val_loss_with_torch_model(out, "lenet-bn")
    assert again["loss"] == pytest.approx(r["final"]["loss"], rel=1e-4)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["train", "no-such-model"])
    with pytest.raises(SystemExit, match="--epochs"):
        cli.main(["train", "lenet-bn", "--epochs", "0", "--out", str(tmp_path)])


def test_the_sort_task():
    tokens, lens, targets = sort_task(64, seed=3)
    for t, n, y in zip(tokens, lens, targets):
        n = int(n)
        assert (t[n:] == 0).all() and (t[:n] >= 1).all() and (t[:n] <= SEQ_VOCAB).all()
        assert torch.equal(y[:n], t[:n].sort().values) and (y[n:] == -100).all()


def test_bench_family_models_tiny(tmp_path, monkeypatch):
    """The benchmark family through the harness at tiny batches, one round, torch.compile off: every
    model has its torch, pyfastdl (plain and in-backward) and, where the notes have one, notes rows,
    none failed, and the targets are in the rows."""
    from pyfastdl.bench import core, models
    monkeypatch.setattr(models, "BATCH", {k: 4 for k in models.BATCH})
    cfg = core.Config(device="cpu", quick=True, compile=False, rounds=1, batch_s=0.001, warmup_s=0.0)
    paths = core.run(["models"], cfg, tmp_path)
    data = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    rows = data["rows"]
    assert not [r for r in rows if r["error"]], [r["error"] for r in rows if r["error"]]
    by = {(r["case"], r["provider"]) for r in rows}
    for name in MODELS:
        for p in ("torch", "pyfastdl-cpu", "pyfastdl-cpu in-backward"):
            assert (name, p) in by, (name, p)
    assert ("lenet-bn", "notes") in by and ("lstm-lm", "notes") in by and ("resnet18", "notes") not in by
    targets = {(r["case"], t["target"]) for r in rows for t in r["targets"]}
    assert ("lenet-bn", "vs torch >= 1.5x") in targets and ("resnet18", "vs torch >= 1.2x") in targets
    assert ("lstm-lm", "vs notes >= 4x") in targets
    assert any(p.suffix == ".png" for p in paths)
