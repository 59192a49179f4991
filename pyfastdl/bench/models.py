"""Model-level cases of the benchmark report (``python -m pyfastdl bench --families models``; issue 13,
item 5): one training step -- forward, loss, backward, optimizer step -- of each model of
``python -m pyfastdl train`` (pyfastdl/train/models.py) at a realistic batch (``BATCH``), in ms per step.

Providers, each with its own copy of the model built from the same seed, on the same batch:

* ``torch``: the plain torch model with torch's fastest CPU path: the ``torch.optim`` optimizer with
  ``fused=True`` (torch has a fused CPU kernel for SGD, Adam and AdamW), channels_last for the CNNs
  where it is faster for torch (ResNet-18, DenseNet: measured; the LeNet stays NCHW);
* ``torch.compile``: ``torch.compile`` of the same plain model (forward and, through AOTAutograd, its
  backward), the same fused optimizer; its compile time is the row's ``first_call_s``. For the
  recurrent LMs dynamo leaves the nn.LSTM / nn.GRU to eager (its default; with ``allow_rnn`` inductor
  fails on ``mkldnn_rnn_layer`` in torch 2.14) and compiles the rest;
* ``pyfastdl-<backend>``: ``pyfastdl.convert(model)`` + the ``pyfastdl.optim`` optimizer of the same
  class, ``opt.step()`` after backward (the Triton backend is left out on the CPU: it would time the
  interpreter);
* ``pyfastdl-<backend> in-backward``: the same with ``pyfastdl.optim.step_in_backward(opt)`` (each
  parameter updated inside backward, no separate step);
* ``notes``: the notes' scratch implementation where the notes have one: the LeNet with the notes'
  from-scratch ``BatchNorm`` and the notes' ``sgd_momentum``; the character LM as
  ``RNNModelScratch`` with the notes' ``lstm`` / ``gru`` (the book's 9.1 for the GRU) and the notes'
  ``adam``. ResNet-18 and DenseNet are built from torch layers in the notes (no scratch version); the
  Transformer and BERT encoders are the notes' own classes, so their ``torch`` row *is* the notes' code.

No gradient clipping in the step (the notes' LM clips; global-norm clipping cannot follow a step
inside backward, and it is the same torch code for every provider). Targets (issue 13, float32, the
CPU): pyfastdl >= 1.5x torch for LeNet-BN, the LSTM LM and the Transformer encoder, >= 1.2x for
ResNet-18 and DenseNet, >= 1.0x torch.compile of the same model for every model, >= 4x the notes'
scratch implementations.
"""
from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

from .core import Case, Target, pyfastdl_providers

__all__ = ["cases", "BATCH"]

FAMILY = "models"
# model -> batch of the step: the notes' training batches (LeNet 256 as the notes' Fashion-MNIST runs,
# ResNet-18 / DenseNet 128, the LM 32 x 35 steps), the encoders 64 sequences of 16; tests shrink it
BATCH = {"lenet-bn": 256, "resnet18": 128, "densenet": 128, "lstm-lm": 32, "gru-lm": 32,
         "transformer": 64, "bert": 64}
# the step's optimizer: the training configuration without weight decay (the notes' SGD has none)
OPTIM = {"image": ("SGD", dict(lr=0.05, momentum=0.9)), "lm": ("Adam", dict(lr=0.005)),
         "seq": ("AdamW", dict(lr=2e-3, weight_decay=0.01))}
_TARGET_TORCH = {"lenet-bn": 1.5, "lstm-lm": 1.5, "transformer": 1.5, "resnet18": 1.2, "densenet": 1.2}
_NOTES = {"lenet-bn": "the notes' scratch BatchNorm LeNet + the notes' sgd_momentum",
          "lstm-lm": "the notes' RNNModelScratch(lstm) + the notes' adam",
          "gru-lm": "the book's RNNModelScratch(gru) (9.1) + the notes' adam",
          "resnet18": "none: the notes build ResNet-18 from torch layers only",
          "densenet": "none: the notes build DenseNet from torch layers only",
          "transformer": "none beyond the notes' classes themselves, which the torch row runs",
          "bert": "none beyond the notes' classes themselves, which the torch row runs"}


def _batch(name, spec, B, device, g):
    """A batch of the model's input shape (random: the step's time does not depend on the values)."""
    from pyfastdl.train.models import SEQ_LEN, SEQ_VOCAB, sort_task
    if spec.kind == "image":
        x = torch.randn(B, 1, spec.img_size, spec.img_size, generator=g)
        return [x.to(device), torch.randint(0, 10, (B,), generator=g).to(device)]
    if spec.kind == "lm":
        X = torch.randint(0, 28, (B, 35), generator=g)
        return [X.to(device), torch.randint(0, 28, (B, 35), generator=g).to(device)]
    tokens, lens, targets = sort_task(B, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    assert tokens.shape[1] == SEQ_LEN and int(tokens.max()) <= SEQ_VOCAB
    return [tokens.to(device), lens.to(device), targets.to(device)]


def _notes_step(name, spec, batch, device):
    """The notes' scratch model and optimizer for one step, or None where the notes have none."""
    import importlib
    # (pyfastdl.reference re-exports the notes' functions, whose names shadow its submodules)
    notes_optim = importlib.import_module("pyfastdl.reference.optim")
    if name == "lenet-bn":
        from pyfastdl.reference.models import lenet_batch_norm
        torch.manual_seed(0)
        net = lenet_batch_norm(scratch=True).to(device)
        params = list(net.parameters())
        states = [torch.zeros_like(p) for p in params]
        hp = {"lr": OPTIM["image"][1]["lr"], "momentum": OPTIM["image"][1]["momentum"]}
        x, y = batch

        def step():
            for p in params:
                p.grad = None
            F.cross_entropy(net(x), y).backward()
            notes_optim.sgd_momentum(params, states, hp)
        return step
    if name in ("lstm-lm", "gru-lm"):
        R = importlib.import_module("pyfastdl.reference.rnn")
        fns = {"lstm-lm": (R.get_lstm_params, R.init_lstm_state, R.lstm),
               "gru-lm": (R.get_gru_params, R.init_gru_state, R.gru)}[name]
        torch.manual_seed(0)
        net = R.RNNModelScratch(28, 256, device, *fns)
        states = [(torch.zeros_like(p), torch.zeros_like(p)) for p in net.params]
        hp = {"lr": OPTIM["lm"][1]["lr"], "t": 1}
        X, Y = batch
        y = Y.T.reshape(-1)

        def step():
            for p in net.params:
                p.grad = None
            out, _ = net(X, net.begin_state(X.shape[0], device))
            F.cross_entropy(out, y).backward()
            notes_optim.adam(net.params, states, hp)
        return step
    return None


def _providers(name, B, device):
    import pyfastdl
    from pyfastdl.train.models import MODELS, batch_loss, build

    spec = MODELS[name]
    g = torch.Generator().manual_seed(0)
    batch = _batch(name, spec, B, device, g)
    opt_name, opt_kw = OPTIM[spec.kind]
    cl = spec.channels_last

    def model(impl):
        m = build(name, seed=0)
        if impl == "pyfastdl":
            m = pyfastdl.convert(m)
        m = m.to(device)
        return m.to(memory_format=torch.channels_last) if cl else m

    def torch_opt(params):
        try:
            return getattr(torch.optim, opt_name)(params, fused=True, **opt_kw)
        except (RuntimeError, TypeError, ValueError):
            return getattr(torch.optim, opt_name)(params, **opt_kw)

    def plain_step(net, params, opt, forward=None):
        forward = net if forward is None else forward

        def step():
            opt.zero_grad(set_to_none=True)
            loss, _, _ = batch_loss(spec.kind, forward, batch, cl)
            loss.backward()
            opt.step()
        return step

    out = {}
    m_t = model("torch")
    out["torch"] = plain_step(m_t, None, torch_opt(m_t.parameters()))

    m_c = model("torch")
    compiled = torch.compile(m_c, dynamic=False)
    if spec.kind == "lm":
        compiled.begin_state = m_c.begin_state
    out["torch.compile"] = plain_step(m_c, None, torch_opt(m_c.parameters()), forward=compiled)

    on_cpu = torch.device(device).type == "cpu"
    m_p = model("pyfastdl")
    ours = pyfastdl_providers(device, plain_step(m_p, None, getattr(pyfastdl.optim, opt_name)(m_p.parameters(), **opt_kw)))
    m_i = model("pyfastdl")
    opt_i = getattr(pyfastdl.optim, opt_name)(m_i.parameters(), **opt_kw)
    pyfastdl.optim.step_in_backward(opt_i)

    def in_backward():
        loss, _, _ = batch_loss(spec.kind, m_i, batch, cl)
        loss.backward()
    ib = pyfastdl_providers(device, in_backward)
    for k, fn in ours.items():
        if on_cpu and k == "pyfastdl-triton":
            continue  # the Triton interpreter: not a speed
        out[k] = fn
        out[f"{k} in-backward"] = ib[k]

    notes = _notes_step(name, spec, batch, device)
    if notes is not None:
        out["notes"] = notes
    return out


def cases(device: str, quick: bool) -> list[Case]:
    """One "train step" case per model (float32); quick and full differ only in the rounds."""
    from pyfastdl.train.models import MODELS
    on_cpu = not str(device).startswith("cuda")
    ours = "pyfastdl-cpu" if on_cpu else "pyfastdl-cuda"
    out = []
    for name, spec in MODELS.items():
        B = BATCH[name]
        if spec.kind == "image":
            shape = f"B{B} 1x{spec.img_size}x{spec.img_size}"
        elif spec.kind == "lm":
            shape = f"B{B} T35 V28 H256"
        else:
            shape = f"B{B} L16 d64"
        targets = []
        if on_cpu:
            if name in _TARGET_TORCH:
                targets.append(Target(ours, "torch", _TARGET_TORCH[name]))
            targets.append(Target(ours, "torch.compile", 1.0))
            if name in ("lenet-bn", "lstm-lm"):
                targets.append(Target(ours, "notes", 4.0))
        out.append(Case(
            family=FAMILY, name=name, mode="train step", dtype=torch.float32,
            params={"shape": shape, "batch": B, "model": spec.description},
            make_providers=functools.partial(_providers, name, B, device),
            bound="step",
            formula=f"{name}: {spec.description}; optimizer {OPTIM[spec.kind][0]}{OPTIM[spec.kind][1]}; "
                    f"notes' version: {_NOTES[name]}",
            targets=targets))
    return out
