"""pyfastdl.convert and pyfastdl.optim.from_torch (issue 13, items 1 and 4).

- what convert swaps, what it leaves and why (the summary), idempotence, ``inplace=False``, modes and
  hooks kept, the notes' classes (from-scratch BatchNorm, DotProductAttention) on pyfastdl's kernels
  with the notes' results;
- from_torch: each optimizer's twin continues a torch run exactly (state carried over), errors;
- equivalence: the notes' LeNet-BN, a small ResNet-18, an LSTM language model and a small torch
  TransformerEncoder trained a few steps with torch layers + torch.optim and with convert +
  pyfastdl.optim (and from_torch) reach the same losses, on the cpu backend and (tiny models) on
  triton under the interpreter; state_dicts load both ways; torch.compile of a converted model gives
  eager's outputs and gradients.
Strict mode throughout: a passing test proves pyfastdl's kernels ran.
"""
import copy
import importlib
import logging

import pytest
import torch

import pyfastdl
from pyfastdl import backends
from pyfastdl.convert import ConvertSummary
ref_attention = importlib.import_module("pyfastdl.reference.attention")
ref_bn = importlib.import_module("pyfastdl.reference.batch_norm")
models = importlib.import_module("pyfastdl.reference.models")
from pyfastdl.reference.rnn import RNNModel
from helpers import GEMM_TOL, MARKS, STEP_TOL, TOL, assert_rel, rel_err


# ---- what convert swaps, leaves, and says ---------------------------------------------------------

class MyBatchNorm(torch.nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def _zoo():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({
        "conv": torch.nn.Conv2d(3, 4, 3),
        "bn": torch.nn.BatchNorm2d(4),
        "mine": MyBatchNorm(4),
        "sync": torch.nn.SyncBatchNorm(4),
        "lstm": torch.nn.LSTM(4, 5),
        "proj": torch.nn.LSTM(4, 5, proj_size=3),
        "cell": torch.nn.GRUCell(4, 5),
        "mha": torch.nn.MultiheadAttention(8, 2),
        "notes_bn": ref_bn.BatchNorm(4, num_dims=4),
        "notes_att": ref_attention.DotProductAttention(0.1),
        "block": torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.BatchNorm1d(4)),
    })


def test_convert_swaps_leaves_and_summarizes():
    model = _zoo()
    params = {n: p for n, p in model.named_parameters()}
    out, summary = pyfastdl.convert(model, summary=True)
    assert out is model and isinstance(summary, ConvertSummary)
    swapped = {e.name: (e.before, e.after) for e in summary.swapped}
    assert swapped == {
        "conv": (torch.nn.Conv2d, pyfastdl.nn.Conv2d),
        "bn": (torch.nn.BatchNorm2d, pyfastdl.nn.BatchNorm2d),
        "sync": (torch.nn.SyncBatchNorm, pyfastdl.nn.SyncBatchNorm),
        "lstm": (torch.nn.LSTM, pyfastdl.nn.LSTM),
        "cell": (torch.nn.GRUCell, pyfastdl.nn.GRUCell),
        "mha": (torch.nn.MultiheadAttention, pyfastdl.nn.MultiheadAttention),
        "notes_bn": (ref_bn.BatchNorm, pyfastdl.nn.BatchNorm),
        "notes_att": (ref_attention.DotProductAttention, pyfastdl.nn.DotProductAttention),
        "block.2": (torch.nn.BatchNorm1d, pyfastdl.nn.BatchNorm1d),
    }
    left = {e.name: e.reason for e in summary.left}
    assert "subclass of torch.nn.BatchNorm2d" in left["mine"]
    assert "proj_size" in left["proj"]
    assert "no pyfastdl twin" in left["block.0"] and "no pyfastdl twin" in left["block.1"]
    assert "no pyfastdl twin" in left["mha.out_proj"]
    assert type(model["mine"]) is MyBatchNorm and type(model["proj"]) is torch.nn.LSTM
    # re-classed in place: the very same parameter objects (an optimizer built before keeps working)
    assert all(p is params[n] for n, p in model.named_parameters())
    text = str(summary)
    assert text.startswith("pyfastdl.convert: 9 swapped, 0 already converted,")
    assert "swapped  bn: torch.nn.BatchNorm2d -> pyfastdl.nn.BatchNorm2d" in text
    assert "left     torch.nn.Linear: no pyfastdl twin" in text
    assert summary.counts()["torch.nn.BatchNorm2d -> pyfastdl.nn.BatchNorm2d"] == 1
    assert "no attention_weights" in text  # the notes' DotProductAttention's note
    assert model["notes_att"].dropout == 0.1


def test_convert_is_idempotent():
    model = _zoo()
    pyfastdl.convert(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    out, summary = pyfastdl.convert(model, summary=True)
    assert out is model and summary.swapped == []
    assert [type(m) for m in model.modules()] == types
    assert {e.name for e in summary.already} == {"conv", "bn", "sync", "lstm", "cell", "mha", "notes_bn",
                                                 "notes_att", "block.2"}
    assert all(e.reason == "already a pyfastdl module" for e in summary.already)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert "already  bn: pyfastdl.nn.BatchNorm2d (already a pyfastdl module)" in str(summary)


def test_convert_not_inplace_leaves_the_original_untouched():
    model = _zoo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    new = pyfastdl.convert(model, inplace=False)
    assert new is not model
    assert [type(m) for m in model.modules()] == types
    assert type(new["bn"]) is pyfastdl.nn.BatchNorm2d and type(model["bn"]) is torch.nn.BatchNorm2d
    assert not any(a is b for a, b in zip(new.parameters(), model.parameters()))
    for k, v in new.state_dict().items():
        assert torch.equal(v, before[k])
    new["bn"].weight.data.add_(1)
    assert torch.equal(model["bn"].weight, before["bn.weight"])


def test_convert_keeps_modes_and_hooks_and_logs(caplog):
    model = _zoo()
    model["bn"].eval()
    model["notes_att"].eval()
    calls = []
    model["notes_att"].register_forward_hook(lambda m, i, o: calls.append(type(m)))
    model["bn"].register_forward_hook(lambda m, i, o: calls.append(type(m)))
    with caplog.at_level(logging.INFO, logger="pyfastdl.convert"):
        pyfastdl.convert(model, verbose=True)
    assert "9 swapped" in caplog.text
    assert not model["bn"].training and not model["notes_att"].training and model["conv"].training
    model["bn"](torch.randn(2, 4, 3, 3))
    q = torch.randn(2, 3, 4)
    model["notes_att"](q, q, q)
    assert calls == [pyfastdl.nn.BatchNorm2d, pyfastdl.nn.DotProductAttention]


def test_convert_a_bare_layer_and_errors():
    assert type(pyfastdl.convert(torch.nn.BatchNorm1d(3))) is pyfastdl.nn.BatchNorm1d
    att = pyfastdl.convert(ref_attention.DotProductAttention(0.0))
    assert type(att) is pyfastdl.nn.DotProductAttention
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pyfastdl.convert(torch.randn(3))


def test_shared_module_is_converted_once():
    att = ref_attention.DotProductAttention(0.0)
    model = torch.nn.ModuleList([att, att])
    pyfastdl.convert(model)
    assert model[0] is model[1] and type(model[0]) is pyfastdl.nn.DotProductAttention


# ---- the notes' classes ------------------------------------------------------------------------------

def test_notes_batch_norm_twin_reproduces_the_notes():
    """The notes' from-scratch BatchNorm (momentum 0.9 on the old value, biased moving variance) and
    its twin on pyfastdl's kernel: the same outputs, gradients and moving statistics, training and eval."""
    torch.manual_seed(0)
    for num_dims, shape in [(4, (6, 5, 4, 3)), (2, (9, 5))]:
        notes = ref_bn.BatchNorm(5, num_dims=num_dims)
        with torch.no_grad():
            notes.gamma.uniform_(0.5, 1.5)
            notes.beta.uniform_(-1, 1)
        ours = pyfastdl.convert(copy.deepcopy(notes))
        assert type(ours) is pyfastdl.nn.BatchNorm
        for _ in range(3):
            x = torch.randn(*shape) * 2 + 1
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ours(xa), notes(xb)
            assert backends.last_dispatch().op == "batch_norm" and backends.last_dispatch().backend == "cpu"
            g = torch.randn_like(ya)
            ya.backward(g), yb.backward(g)
            assert_rel(ya, yb, torch.float32)
            assert_rel(xa.grad, xb.grad, torch.float32)
            assert_rel(ours.gamma.grad, notes.gamma.grad, torch.float32)
            assert_rel(ours.beta.grad, notes.beta.grad, torch.float32)
        assert ours.moving_mean.shape == notes.moving_mean.shape
        assert_rel(ours.moving_mean, notes.moving_mean, torch.float32)
        assert_rel(ours.moving_var, notes.moving_var, torch.float32)  # biased, as the notes
        assert not ours.moving_mean.requires_grad
        ours.eval(), notes.eval()
        x = torch.randn(*shape)
        assert_rel(ours(x), notes(x).detach(), torch.float32)
        assert ours.state_dict().keys() == notes.state_dict().keys() == {"gamma", "beta"}


def test_notes_batch_norm_twin_differs_from_torch_convention():
    """Pins that the twin follows the notes, not torch: torch's BatchNorm (momentum 0.1 on the new
    value, unbiased running variance) ends with another running variance on the same data."""
    torch.manual_seed(0)
    ours = pyfastdl.nn.BatchNorm(3, num_dims=2)
    theirs = torch.nn.BatchNorm1d(3)
    x = torch.randn(4, 3)
    ours(x), theirs(x)
    assert_rel(ours.moving_mean.view(3), theirs.running_mean, torch.float32)
    n = 4
    assert_rel(ours.moving_var.view(3) - 0.9, (theirs.running_var - 0.9) * (n - 1) / n, torch.float32)
    with pytest.raises(ValueError, match="2-D"):
        ours(torch.randn(2, 3, 4))


@pytest.mark.parametrize("valid_lens", [None, "1d", "1d-zero", "2d"])
def test_notes_multihead_attention_with_converted_dot_product_attention(valid_lens):
    """The notes' MultiHeadAttention (heads flattened into the batch, valid_lens repeated per head)
    with its DotProductAttention converted: the notes' outputs and gradients, a valid length of 0
    (uniform weights over every key) included."""
    torch.manual_seed(0)
    notes = ref_attention.MultiHeadAttention(8, 8, 8, 16, 4, dropout=0.0)
    ours = pyfastdl.convert(copy.deepcopy(notes))
    assert type(ours.attention) is pyfastdl.nn.DotProductAttention
    q, kv = torch.randn(3, 5, 8), torch.randn(3, 7, 8)
    lens = {None: None, "1d": torch.tensor([7, 3, 5]), "1d-zero": torch.tensor([0, 3, 7]),
            "2d": torch.randint(1, 8, (3, 5))}[valid_lens]
    qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
    ya, yb = ours(qa, kv, kv, lens), notes(qb, kv, kv, lens)
    assert backends.last_dispatch().op == "scaled_dot_product_attention"
    ya.sum().backward(), yb.sum().backward()
    assert_rel(ya, yb, torch.float32, "gemm")
    assert_rel(qa.grad, qb.grad, torch.float32, "gemm")
    assert_rel(ours.W_q.weight.grad, notes.W_q.weight.grad, torch.float32, "gemm")


def test_notes_lenet_batch_norm_runs_on_pyfastdl_after_convert():
    """The notes' LeNet-BN with its from-scratch BatchNorm: after convert every batch norm and conv
    runs pyfastdl's kernels, and a few SGD steps give the notes' losses and moving statistics."""
    torch.manual_seed(0)
    notes = models.lenet_batch_norm(ratio=2, scratch=True)
    ours, summary = pyfastdl.convert(copy.deepcopy(notes), summary=True)
    kinds = summary.counts()
    assert kinds["pyfastdl.reference.batch_norm.BatchNorm -> pyfastdl.nn.BatchNorm"] == 4
    assert kinds["torch.nn.Conv2d -> pyfastdl.nn.Conv2d"] == 2
    la, lb = _train(ours, torch.optim.SGD(ours.parameters(), lr=0.1), _digits_batches(3, 8)), \
        _train(notes, torch.optim.SGD(notes.parameters(), lr=0.1), _digits_batches(3, 8))
    assert_rel(torch.tensor(la), torch.tensor(lb), torch.float32, "gemm", factor=5)  # 3 steps of conv GEMMs
    for m_ours, m_notes in zip(ours.modules(), notes.modules()):
        if isinstance(m_notes, ref_bn.BatchNorm):
            assert_rel(m_ours.moving_var, m_notes.moving_var, torch.float32, "gemm", factor=5)


# ---- from_torch --------------------------------------------------------------------------------------

OPTIMS = [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
          ("Adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
          ("AdamW", dict(lr=0.01, betas=(0.8, 0.9))),
          ("Adagrad", dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
          ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)),
          ("Adadelta", dict(lr=1.0, rho=0.8))]


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _steps(model, opt, steps, start=0):
    for s in range(start, start + steps):
        g = torch.Generator().manual_seed(s)
        x, y = torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("name,kwargs", OPTIMS, ids=[n for n, _ in OPTIMS])
def test_from_torch_continues_a_torch_run(name, kwargs):
    """Two steps with torch's optimizer, then from_torch and two more: equal to four torch steps
    (state carried: step counts, moments, momentum buffers); groups, hyper-parameters and state are the
    same objects."""
    ref_model, model = _mlp(), _mlp()
    ref = getattr(torch.optim, name)([{"params": ref_model[0].parameters()},
                                      {"params": ref_model[2].parameters(), "lr": kwargs["lr"] / 2}],
                                     **kwargs, foreach=False)
    opt = getattr(torch.optim, name)([{"params": model[0].parameters()},
                                      {"params": model[2].parameters(), "lr": kwargs["lr"] / 2}],
                                     **kwargs, foreach=False)
    _steps(ref_model, ref, 4)
    _steps(model, opt, 2)
    groups, state = opt.param_groups, {p: s for p, s in opt.state.items()}
    fused = pyfastdl.optim.from_torch(opt)
    assert type(fused) is getattr(pyfastdl.optim, name)
    assert all(a is b for a, b in zip(fused.param_groups, groups))
    assert fused.defaults == opt.defaults
    assert all(fused.state[p] is s for p, s in state.items())
    _steps(model, fused, 2, start=2)
    assert backends.last_dispatch().backend == "cpu"
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, **STEP_TOL[torch.float32])
    assert pyfastdl.optim.from_torch(fused) is fused


@pytest.mark.parametrize("name,kwargs", [("Adam", dict(fused=True)), ("SGD", dict(momentum=0.9, fused=True)),
                                         ("RMSprop", dict(foreach=True, momentum=0.5))])
def test_from_torch_after_torch_fused_or_foreach_steps(name, kwargs):
    """torch's fused / foreach state layouts (a float32 step tensor) carry over too."""
    ref_model, model = _mlp(), _mlp()
    ref = getattr(torch.optim, name)(ref_model.parameters(), lr=0.01, **kwargs)
    opt = getattr(torch.optim, name)(model.parameters(), lr=0.01, **kwargs)
    _steps(ref_model, ref, 4)
    _steps(model, opt, 2)
    _steps(model, pyfastdl.optim.from_torch(opt), 2, start=2)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, **STEP_TOL[torch.float32])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_from_torch_keeps_a_scheduler_driving_the_lr():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    fused = pyfastdl.optim.from_torch(opt)
    _steps(model, fused, 1)
    sched.step()
    assert fused.param_groups[0]["lr"] == 0.05


def test_from_torch_errors():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(TypeError, match="no fused twin for torch.optim.nadam.NAdam"):
        pyfastdl.optim.from_torch(torch.optim.NAdam(p))

    class MySGD(torch.optim.SGD):
        pass

    with pytest.raises(TypeError, match="exact classes only"):
        pyfastdl.optim.from_torch(MySGD(p, lr=0.1))
    with pytest.raises(ValueError, match="differentiable=True"):
        pyfastdl.optim.from_torch(torch.optim.Adam(p, differentiable=True))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        pyfastdl.optim.from_torch(p)


# ---- equivalence: torch layers + torch.optim vs convert + pyfastdl.optim --------------------------

def _digits_batches(steps, batch, size=28, channels=1, classes=10):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(batch, channels, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(steps)]


def _train(model, opt, batches, loss_fn=torch.nn.functional.cross_entropy):
    losses = []
    for x, y in batches:
        out = model(x)
        loss = loss_fn(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


class _LM(torch.nn.Module):
    """The notes' concise LSTM language model (reference RNNModel) with a fixed zero state."""

    def __init__(self, vocab, hidden, cell=torch.nn.LSTM):
        super().__init__()
        self.net = RNNModel(cell(vocab, hidden), vocab)

    def forward(self, x):
        return self.net(x, self.net.begin_state(x.device, x.shape[0]))[0]


def _lm_batches(steps, batch, T, vocab):
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        x = torch.randint(0, vocab, (batch, T + 1), generator=g)
        out.append((x[:, :-1], x[:, 1:].T.reshape(-1)))  # RNNModel's outputs are (T * B, V)
    return out


class _Encoder(torch.nn.Module):
    def __init__(self, d, heads, layers, classes=4):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def _seq_batches(steps, batch, T, d, classes=4):
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(batch, T, d, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(steps)]


# (model factory, optimizer, optimizer kwargs, batches, bound on the loss curve's relative error,
#  the pyfastdl ops that must have run). Bounds: GEMM_TOL float32 times the number of steps' drift
CASES = {
    "lenet_bn": (lambda: models.lenet_batch_norm(ratio=2, scratch=False), "SGD", dict(lr=0.1, momentum=0.9),
                 lambda: _digits_batches(3, 8), 5),
    # 2 steps: at the third, a ReLU after a residual add flips for an element near 0 between the float32
    # runs and the float64 one (a discrete event: ours and torch's float32 runs are each on one side)
    "resnet18": (lambda: models.resnet18(ratio=16), "SGD", dict(lr=0.05, momentum=0.9),
                 lambda: _digits_batches(2, 8, size=32), 5),
    "lstm_lm": (lambda: _LM(12, 16), "Adam", dict(lr=0.01), lambda: _lm_batches(3, 4, 6, 12), 5),
    "transformer": (lambda: _Encoder(16, 2, 2), "AdamW", dict(lr=0.01, weight_decay=0.01),
                    lambda: _seq_batches(3, 4, 6, 16), 5),
}
TINY = {  # for triton under the interpreter
    "lenet_bn": (lambda: models.lenet_batch_norm(ratio=6, scratch=False), "SGD", dict(lr=0.1, momentum=0.9),
                 lambda: _digits_batches(2, 2), 5),
    "lstm_lm": (lambda: _LM(5, 4), "Adam", dict(lr=0.01), lambda: _lm_batches(2, 2, 3, 5), 5),
    "transformer": (lambda: _Encoder(8, 2, 1), "AdamW", dict(lr=0.01), lambda: _seq_batches(2, 2, 3, 8), 5),
}


def _double(batches):
    return [tuple(t.double() if t.is_floating_point() else t for t in b) for b in batches]


def _equivalence(case, backend, via_from_torch):
    """Losses and final parameters of ours against a float64 run of the torch model: within twice
    torch's own float32 error against that run (FlashAttention's rule; docs/testing.md), or within the
    float32 GEMM tolerance when torch's error is smaller than that."""
    make, opt_name, kwargs, batches, _ = case
    torch.manual_seed(0)
    theirs = make()
    ours = pyfastdl.convert(theirs, inplace=False)
    ref64 = copy.deepcopy(theirs).double()
    assert any(type(m).__module__.startswith("pyfastdl.nn") for m in ours.modules())
    ref_opt = getattr(torch.optim, opt_name)(theirs.parameters(), **kwargs, foreach=False)
    opt64 = getattr(torch.optim, opt_name)(ref64.parameters(), **kwargs, foreach=False)
    if via_from_torch:
        opt = pyfastdl.optim.from_torch(getattr(torch.optim, opt_name)(ours.parameters(), **kwargs))
    else:
        opt = getattr(pyfastdl.optim, opt_name)(ours.parameters(), **kwargs)
    with backends.use(backend):
        ran = []
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: ran.append(backends.last_dispatch()) if type(m).__module__.startswith("pyfastdl.nn")
            else None)
        try:
            la = _train(ours, opt, batches())
        finally:
            handle.remove()
    lb = _train(theirs, ref_opt, batches())
    lc = _train(ref64, opt64, _double(batches()))
    assert ran and all(d.backend == backend for d in ran), {(d.op, d.backend) for d in ran}
    floor = GEMM_TOL[torch.float32]
    la, lb, lc = torch.tensor(la), torch.tensor(lb), torch.tensor(lc, dtype=torch.float64)
    assert rel_err(la, lc) <= max(2 * rel_err(lb, lc), floor), (la, lb, lc)
    # the parameters as one vector (a few steps of a small-batch CNN are ill-conditioned: per tensor,
    # torch's own float32 error reaches 5e-4 on ResNet-18's convs)
    flat = [torch.cat([p.detach().reshape(-1).double() for p in m.parameters()]) for m in (ours, theirs, ref64)]
    assert rel_err(flat[0], flat[2]) <= max(2 * rel_err(flat[1], flat[2]), floor), \
        (rel_err(flat[0], flat[2]), rel_err(flat[1], flat[2]))


@pytest.mark.parametrize("via_from_torch", [False, True], ids=["pyfastdl.optim", "from_torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_training_equivalence_cpu(name, via_from_torch):
    _equivalence(CASES[name], "cpu", via_from_torch)


@pytest.mark.parametrize("name", [pytest.param(n, marks=MARKS["triton"]) for n in TINY])
def test_training_equivalence_triton_tiny(name):
    _equivalence(TINY[name], "triton", False)


# ---- state_dict both ways ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_loads_both_ways(name):
    make = CASES[name][0]
    torch.manual_seed(0)
    theirs = make()
    ours = pyfastdl.convert(make())
    x = CASES[name][3]()[0][0]
    # train ours a step so that its state differs, then load it into the torch model
    _train(ours, torch.optim.SGD(ours.parameters(), lr=0.1), CASES[name][3]()[:1])
    theirs.load_state_dict(ours.state_dict())
    ours.eval(), theirs.eval()
    assert rel_err(ours(x), theirs(x)) <= GEMM_TOL[torch.float32] * 5
    torch.manual_seed(1)
    fresh_torch = make().train()
    _train(fresh_torch, torch.optim.SGD(fresh_torch.parameters(), lr=0.1), CASES[name][3]()[:1])
    ours.load_state_dict(fresh_torch.state_dict())
    fresh_torch.eval()
    assert rel_err(ours(x), fresh_torch(x)) <= GEMM_TOL[torch.float32] * 5


# ---- torch.compile ------------------------------------------------------------------------------------

@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["lenet_bn", "transformer", "lstm_lm"])
def test_converted_model_under_torch_compile(name, _fresh_dynamo):
    """fullgraph=True (aot_eager: dynamo and AOTAutograd over the fake implementations; see
    tests/test_compile.py): outputs, input and parameter gradients, running statistics equal to eager."""
    make, _, _, batches, _ = CASES[name]
    torch.manual_seed(0)
    eager = pyfastdl.convert(make())
    compiled_model = copy.deepcopy(eager)
    x = batches()[0][0]
    if x.is_floating_point():
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    else:
        xa, xb = x, x
    with torch._dynamo.config.patch(allow_rnn=True):
        fn = torch.compile(lambda t: compiled_model(t), fullgraph=True, backend="aot_eager")
        yb = fn(xb)
    ya = eager(xa)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    if x.is_floating_point():
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=n)
    for (n, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(b, a, msg=n)


# ---- BatchNorm + ReLU / Sigmoid pairs of a Sequential fused (convert(fuse=True)) -------------------

def _bn_relu_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                               torch.nn.Conv2d(6, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 25, 8), torch.nn.BatchNorm1d(8),
                               torch.nn.ReLU())


def _relu_calls(monkeypatch):
    calls = []
    orig = torch.nn.ReLU.forward
    monkeypatch.setattr(torch.nn.ReLU, "forward", lambda self, x: calls.append(1) or orig(self, x))
    return calls


def _assert_same_training(net, ref, xs, y, yt):
    """The fused model's output, input gradient, parameter gradients (after a square-sum loss) and
    buffers are the torch model's."""
    assert_rel(y, yt, torch.float32, "gemm")
    y.square().sum().backward()
    yt.square().sum().backward()
    assert_rel(xs[0].grad, xs[1].grad, torch.float32, "gemm", factor=10)
    # (a bias in front of a training BatchNorm has a gradient of zero up to rounding: measured against
    # the largest gradient's norm, not its own)
    scale = max(pt.grad.norm().item() for pt in ref.parameters())
    for (n, p), (_, pt) in zip(net.named_parameters(), ref.named_parameters()):
        assert (p.grad - pt.grad).norm().item() <= 1e-5 * scale, n
    for (n, b), (_, bt) in zip(net.named_buffers(), ref.named_buffers()):
        assert torch.allclose(b.float(), bt.float(), rtol=1e-5, atol=1e-6), n


@pytest.mark.parametrize("train", [True, False])
def test_bn_relu_pairs_fused_match_torch(monkeypatch, train):
    """A Sequential with (BatchNorm, ReLU) pairs becomes BatchNormActivationSequential: no ReLU module runs
    (the kernel applies max(y, 0)), and outputs, every gradient and the running statistics are torch's;
    the state_dict keys and children are the Sequential's."""
    ref = _bn_relu_net().train(train)
    net, summary = pyfastdl.convert(copy.deepcopy(ref), summary=True)
    assert type(net) is pyfastdl.nn.BatchNormActivationSequential and isinstance(net, torch.nn.Sequential)
    entry = next(e for e in summary.swapped if e.before is torch.nn.Sequential)
    assert entry.name == "" and "3 BatchNorm + activation pairs fused" in entry.reason
    assert list(net.state_dict()) == list(ref.state_dict())
    assert [type(m) for m in net][2] is torch.nn.ReLU
    calls = _relu_calls(monkeypatch)
    x = torch.randn(5, 3, 5, 5)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y, yt = net(xs[0]), ref(xs[1])
    assert calls == [1, 1, 1]  # torch's three ReLUs ran; pyfastdl's model ran none
    assert (y >= 0).all()
    _assert_same_training(net, ref, xs, y, yt)
    # each child alone behaves as before: the BatchNorm gives negative values, without a ReLU
    assert (net[1](torch.randn(4, 6, 3, 3)) < 0).any()


@pytest.mark.parametrize("train", [True, False])
def test_bn_sigmoid_pairs_fused_match_torch(monkeypatch, train):
    """The notes' LeNet with batch norm (every batch norm feeds a Sigmoid): its four pairs run as one
    kernel each (no Sigmoid module runs), with torch's outputs, gradients and running statistics."""
    from pyfastdl.reference.models import lenet_batch_norm
    torch.manual_seed(0)
    ref = lenet_batch_norm(scratch=False).train(train)
    net, summary = pyfastdl.convert(copy.deepcopy(ref), summary=True)
    assert type(net) is pyfastdl.nn.BatchNormActivationSequential
    assert any("4 BatchNorm + activation pairs fused" in e.reason for e in summary.swapped)
    calls = []
    orig = torch.nn.Sigmoid.forward
    monkeypatch.setattr(torch.nn.Sigmoid, "forward", lambda self, x: calls.append(1) or orig(self, x))
    x = torch.randn(6, 1, 28, 28)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y = net(xs[0])
    assert calls == []
    yt = ref(xs[1])
    assert len(calls) == 4
    _assert_same_training(net, ref, xs, y, yt)


def test_bn_relu_fusion_hooks_idempotence_and_opt_out(monkeypatch):
    net = pyfastdl.convert(_bn_relu_net())
    again, summary = pyfastdl.convert(net, summary=True)
    assert again is net and summary.swapped == []
    assert any(e.name == "" and e.before is pyfastdl.nn.BatchNormActivationSequential for e in summary.already)
    # a hooked ReLU runs unfused, so its hook sees the batch norm's output and its own
    seen = []
    net[2].register_forward_hook(lambda m, i, o: seen.append((i[0].min().item(), o.min().item())))
    calls = _relu_calls(monkeypatch)
    y = net(torch.randn(5, 3, 5, 5))
    assert len(calls) == 1 and len(seen) == 1 and seen[0][0] < 0 and seen[0][1] >= 0 and (y >= 0).all()
    kept = pyfastdl.convert(_bn_relu_net(), fuse=False)
    assert type(kept) is torch.nn.Sequential
