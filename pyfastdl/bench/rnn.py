"""LSTM and GRU cases of the benchmark report (``python -m pyfastdl bench --families rnn``).

Providers: ``pyfastdl-<backend>`` (``pyfastdl.nn.LSTM`` / ``GRU`` / ``LSTMCell`` / ``GRUCell``) and
``torch`` (``torch.nn``'s module with the same weights; on the CPU its LSTM reaches oneDNN when unpacked,
its GRU and every packed input run ATen's generic loop). torch.compile is not a provider: dynamo refuses
``torch.nn.RNNBase`` modules unless ``allow_rnn`` is set.
Modes: "fwd" and "fwd+bwd" (forward, then ``autograd.grad`` of the input and every parameter with a
random output gradient; nothing accumulates into ``.grad``).

Work counted (compute-bound; only the gate GEMMs): a layer-direction over N rows (N = T * B padded,
sum of the lengths packed) does 2 * N * G * H * (I + H) flops forward (G = 4 LSTM, 3 GRU; I = the
layer's input size), and twice that again backward (grad input/state and grad weights), so fwd+bwd
is 3x the forward. A cell step is the same with N = B.

Sizes (issue 10): cells B64 I256 H512; layers T35 B32 I256 H256 with 1 and 2 layers (the notes' LM
sizes) and T100 B64 I512 H512; packed versions with lengths uniform in [T/2, T] (unsorted, as a
data loader gives them). The per-call row, LSTMCell B1 I1 H1 (the smallest valid input), measures the
cost of a call itself (Python, dispatch, autograd, allocations): a cell step is called T times per
sequence.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from .core import Case, Target, pyfastdl_providers

__all__ = ["cases", "gate_flops"]

FAMILY = "rnn"
FORMULA = ("flops = sum over layers and directions of 2 x N x G x H x (I_layer + H) (G = 4 LSTM, 3 GRU; N "
           "rows = T x B, or the sum of lengths when packed); fwd+bwd = 3 x fwd")
GATES = {"LSTM": 4, "GRU": 3, "LSTMCell": 4, "GRUCell": 3}

# (kind, T, B, I, H, layers, packed); T = None for a cell step
PER_CALL = ("LSTMCell", None, 1, 1, 1, 1, False)
CELLS = [("LSTMCell", None, 64, 256, 512, 1, False), ("GRUCell", None, 64, 256, 512, 1, False)]
LAYERS = [(kind, T, B, I, H, L, packed)
          for kind in ("LSTM", "GRU")
          for (T, B, I, H, L) in ((35, 32, 256, 256, 1), (35, 32, 256, 256, 2), (100, 64, 512, 512, 1))
          for packed in (False, True)]
_TARGET = {"LSTM": 1.5, "GRU": 2.0, "packed": 3.0, "LSTMCell": 1.5, "GRUCell": 1.5}


def gate_flops(kind, T, B, I, H, layers, lengths=None, mode="fwd"):
    """The gate GEMMs' flops of one iteration (see FORMULA)."""
    G = GATES[kind]
    N = B if T is None else (int(sum(lengths)) if lengths is not None else T * B)
    f = sum(2 * N * G * H * ((I if layer == 0 else H) + H) for layer in range(layers))
    return f * (3 if mode == "fwd+bwd" else 1)


def _lengths(T, B):
    g = torch.Generator().manual_seed(0)
    return torch.randint(T // 2, T + 1, (B,), generator=g)


def _providers(kind, T, B, I, H, layers, packed, dtype, device, mode):
    g = torch.Generator().manual_seed(0)
    import pyfastdl
    torch.manual_seed(0)
    theirs = getattr(torch.nn, kind)(I, H, **({} if T is None else {"num_layers": layers})).to(device, dtype)
    ours = getattr(pyfastdl.nn, kind)(I, H, **({} if T is None else {"num_layers": layers})).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    grad = mode == "fwd+bwd"
    if T is None:
        x = torch.randn(B, I, generator=g).to(device, dtype)
    else:
        x = torch.randn(T, B, I, generator=g).to(device, dtype)
    inp = x
    if packed:
        p = pack_padded_sequence(x, _lengths(T, B), enforce_sorted=False)
        inp = PackedSequence(p.data.requires_grad_(grad), p.batch_sizes, p.sorted_indices, p.unsorted_indices)
        leaf = inp.data
    else:
        leaf = x.requires_grad_(grad)

    def step(module):
        params = list(module.parameters())
        if not grad:
            return lambda: module(inp)

        def run():
            out = module(inp)
            y = out[0] if isinstance(out, tuple) else out
            y = y.data if isinstance(y, PackedSequence) else y
            return torch.autograd.grad(y, [leaf] + params, dy)
        return run

    with torch.no_grad():
        y = theirs(inp)
        y = y[0] if isinstance(y, tuple) else y
        dy = torch.randn((y.data if isinstance(y, PackedSequence) else y).shape, generator=g).to(device, dtype)
    out = pyfastdl_providers(device, step(ours))
    out["torch"] = step(theirs)
    return out


def cases(device: str, quick: bool) -> list[Case]:
    """The rnn cases for ``device`` (float32): every size x mode; quick drops the forward-only rows of
    the T100 layers (the slowest)."""
    on_cpu = not str(device).startswith("cuda")
    dtype = torch.float32
    out = []
    for spec in [PER_CALL] + CELLS + LAYERS:
        kind, T, B, I, H, L, packed = spec
        for mode in ("fwd", "fwd+bwd"):
            if quick and T == 100 and mode == "fwd":
                continue
            lengths = _lengths(T, B) if packed else None
            if spec == PER_CALL:
                name, k = "LSTMCell per-call B1 I1 H1", 1.0
            elif T is None:
                name, k = f"{kind} step B{B} I{I} H{H}", _TARGET[kind]
            else:
                name = f"{kind} {L} layer{'s' if L > 1 else ''} T{T} B{B} I{I} H{H}" + (" packed" if packed else "")
                k = _TARGET["packed" if packed else kind]
            targets = [Target("pyfastdl-cpu", "torch", k)] if on_cpu and mode == "fwd+bwd" else []
            out.append(Case(
                family=FAMILY, name=name, mode=mode, dtype=dtype,
                params={"kind": kind, "T": T, "B": B, "I": I, "H": H, "layers": L, "packed": packed},
                make_providers=functools.partial(_providers, kind, T, B, I, H, L, packed, dtype, device, mode),
                flops=gate_flops(kind, T, B, I, H, L, lengths, mode), bound="compute", formula=FORMULA,
                targets=targets))
    for mode in ("fwd", "fwd+bwd"):  # the notes' character LM: LSTM + output layer, one-hot input
        T, B, V, H = NOTES_LM
        flops = gate_flops("LSTM", T, B, V, H, 1, None, mode) + 2 * T * B * H * V * (3 if mode == "fwd+bwd" else 1)
        out.append(Case(
            family=FAMILY, name=f"notes' LSTM LM T{T} B{B} V{V} H{H}", mode=mode, dtype=dtype,
            params={"kind": "LSTM", "T": T, "B": B, "I": V, "H": H, "layers": 1, "packed": False},
            make_providers=functools.partial(_notes_providers, T, B, V, H, dtype, device, mode),
            flops=flops, bound="compute", formula=FORMULA + "; + 2 T B H V for the output layer",
            targets=[Target("pyfastdl-cpu", "notes", 4.0)] if on_cpu and mode == "fwd+bwd" else []))
    return out


# the notes' LM sizes (section 57: vocabulary 28, 256 hidden units, 35 steps, batch 32)
NOTES_LM = (35, 32, 28, 256)


def _notes_providers(T, B, V, H, dtype, device, mode):
    """pyfastdl.nn.LSTM + nn.Linear and torch's, against the notes' scratch ``lstm`` (section 57: a Python
    loop of per-gate matmuls) holding the same weights (reference.rnn.lstm_params_from_torch)."""
    import pyfastdl
    from pyfastdl.reference.rnn import lstm as notes_lstm, lstm_params_from_torch
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(V, H).to(device, dtype)
    linear = torch.nn.Linear(H, V).to(device, dtype)
    ours = pyfastdl.nn.LSTM(V, H).to(device, dtype)
    ours.load_state_dict(theirs.state_dict())
    params = [p.to(device, dtype).detach().requires_grad_(True) for p in lstm_params_from_torch(theirs, linear)]
    x = torch.nn.functional.one_hot(torch.randint(0, V, (T, B), generator=g), V).to(device, dtype)
    state = (torch.zeros(B, H, device=device, dtype=dtype), torch.zeros(B, H, device=device, dtype=dtype))
    dy = torch.randn(T * B, V, generator=g).to(device, dtype)
    grad = mode == "fwd+bwd"

    def layer(module):
        mparams = list(module.parameters()) + list(linear.parameters())

        def run():
            y = linear(module(x)[0]).reshape(T * B, V)
            return torch.autograd.grad(y, mparams, dy) if grad else y
        return run

    def notes():
        y = notes_lstm(x, state, params)[0]
        return torch.autograd.grad(y, params, dy) if grad else y

    out = pyfastdl_providers(device, layer(ours))
    out["torch"] = layer(theirs)
    out["notes"] = notes if grad else (lambda: torch.no_grad()(notes)())
    return out
