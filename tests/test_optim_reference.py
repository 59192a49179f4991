"""The optimizers of pyfastdl.reference: the notes' from-scratch functions (they train, and they equal
torch.optim where their math is torch's), and the like-torch ``*_step_`` functions (the reference
backend and oracle of pyfastdl.optim) against torch.optim.<X>(foreach=False), step by step, in
float64; grad_scale / found_inf; float16/bfloat16 params with float32 state and master weights;
bad input raising before any write."""
import pytest
import torch

from pyfastdl import reference as R

from helpers import EXACT_TOL


pytestmark = pytest.mark.usefixtures("one_thread")

# ---- the notes' train_ch7 problem (linear regression, squared loss, minibatches of 10) -------------


def make_problem(dtype, num_examples=1500, num_features=5, noise=0.1, seed=0):
    """Synthetic stand-in for the notes' airfoil data: (1500, 5) correlated features and a linear
    target with small noise, both standardized. Returns (features, labels (n,))."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(num_examples, num_features, generator=g, dtype=torch.float64)
    X = X @ (torch.eye(num_features, dtype=torch.float64)
             + 0.5 * torch.randn(num_features, num_features, generator=g, dtype=torch.float64))
    y = X @ torch.tensor([2.0, -3.4, 1.5, 0.5, -1.0], dtype=torch.float64) + 4.2
    y = y + noise * y.std() * torch.randn(num_examples, generator=g, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    y = (y - y.mean()) / y.std()
    return X.to(dtype), y.to(dtype)


def linreg(X, w, b):
    return torch.mm(X, w) + b


def squared_loss(y_hat, y):
    return (y_hat - y.view(y_hat.size())) ** 2 / 2


def batches(n, batch_size, num_epochs, seed=0):
    """The minibatch index lists of num_epochs shuffled epochs (fixed, so two runs see the same)."""
    g = torch.Generator().manual_seed(seed)
    return [idx for _ in range(num_epochs) for idx in torch.randperm(n, generator=g).split(batch_size)]


def init_wb(num_features, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter((0.01 * torch.randn(num_features, 1, generator=g, dtype=torch.float64)).to(dtype))
    b = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    return w, b


def full_loss(X, y, w, b):
    with torch.no_grad():
        return squared_loss(linreg(X, w, b), y).mean().item()


def train_notes(fn, states, hyperparams, X, y, w, b, idx_list):
    """The inner loop of the notes' train_ch7 over fixed minibatches: mean loss, zeroed grads, step."""
    for idx in idx_list:
        l = squared_loss(linreg(X[idx], w, b), y[idx]).mean()
        if w.grad is not None:
            w.grad.data.zero_()
            b.grad.data.zero_()
        l.backward()
        fn([w, b], states, hyperparams)


def train_torch(optimizer, X, y, w, b, idx_list):
    for idx in idx_list:
        l = squared_loss(linreg(X[idx], w, b), y[idx]).mean()
        optimizer.zero_grad()
        l.backward()
        optimizer.step()


# (notes' function, init_states, the notes' hyper-parameters)
NOTES = {
    "sgd": (R.sgd, None, {"lr": 0.05}),
    "sgd_momentum": (R.sgd_momentum, R.init_momentum_states, {"lr": 0.004, "momentum": 0.9}),
    "adagrad": (R.adagrad, R.init_adagrad_states, {"lr": 0.1}),
    "rmsprop": (R.rmsprop, R.init_rmsprop_states, {"lr": 0.01, "gamma": 0.9}),
    "adadelta": (R.adadelta, R.init_adadelta_states, {"rho": 0.9}),
    "adam": (R.adam, R.init_adam_states, {"lr": 0.01, "t": 1}),
}


@pytest.mark.parametrize("name", list(NOTES))
def test_notes_optimizer_trains_the_notes_model(name):
    """Each notes' function, as the notes call it (float32 states from init_*_states, the notes'
    hyper-parameters), brings the loss of the train_ch7 problem down by more than 10x in 3 epochs."""
    fn, init, hp = NOTES[name]
    X, y = make_problem(torch.float32)
    w, b = init_wb(X.shape[1], torch.float32)
    states = init(X.shape[1]) if init is not None else None
    hp = dict(hp)
    before = full_loss(X, y, w, b)
    train_notes(fn, states, hp, X, y, w, b, batches(len(X), 10, 3))
    after = full_loss(X, y, w, b)
    assert after < before / 10, (name, before, after)
    if name == "adam":
        assert hp["t"] == 1 + 3 * 150  # the notes' time step, advanced once per call


# ---- the notes' functions against torch.optim, where the math is the same -------------------------

def _run_both(name, torch_opt, hp, steps_epochs=2, dtype=torch.float64):
    fn, init, _ = NOTES[name]
    X, y = make_problem(dtype)
    w, b = init_wb(X.shape[1], dtype)
    w2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
    idx = batches(len(X), 10, steps_epochs)
    states = init(X.shape[1], dtype=dtype) if init is not None else None
    train_notes(fn, states, dict(hp), X, y, w, b, idx)
    train_torch(torch_opt([w2, b2]), X, y, w2, b2, idx)
    return (w, b), (w2, b2)


def _assert_params_close(a, b, rtol, atol):
    for p, q in zip(a, b):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol)


EQUAL_TO_TORCH = {
    # notes' sgd: p -= lr * grad, the loss a minibatch *mean* (the notes' chapter-3 sgd(params, lr,
    # batch_size) that divides a summed loss by the batch size does not appear in these notes).
    "sgd": ({"lr": 0.05}, lambda ps: torch.optim.SGD(ps, lr=0.05, foreach=False)),
    # notes' momentum: v = m * v + lr * g, p -= v; torch: buf = m * buf + (1 - dampening) * g,
    # p -= lr * buf (first buf = g). Equal (v = lr * buf) for a constant lr and dampening=0; they
    # part under an lr schedule (the notes' velocity keeps the old lr) or dampening != 0.
    "sgd_momentum": ({"lr": 0.004, "momentum": 0.9},
                     lambda ps: torch.optim.SGD(ps, lr=0.004, momentum=0.9, foreach=False)),
    # notes' AdaGrad: lr * g / sqrt(s + 1e-6); torch: lr * g / (sqrt(s) + eps), s starting at
    # initial_accumulator_value. With initial_accumulator_value=1e-6, eps=0 torch's s is the notes'
    # s + 1e-6: equal. (torch's defaults, eps=1e-10 outside the root, are not.)
    "adagrad": ({"lr": 0.1}, lambda ps: torch.optim.Adagrad(
        ps, lr=0.1, initial_accumulator_value=1e-6, eps=0.0, foreach=False)),
    # notes' AdaDelta: g' = g * sqrt((delta + eps) / (s + eps)), p -= g', eps=1e-5, no lr; torch:
    # sqrt(acc + eps) / sqrt(sq + eps) * g, p -= lr * delta. Equal with lr=1.0 (torch's default)
    # and eps=1e-5 (torch's default is 1e-6).
    "adadelta": ({"rho": 0.9}, lambda ps: torch.optim.Adadelta(ps, lr=1.0, rho=0.9, eps=1e-5, foreach=False)),
    # notes' Adam: lr * v_hat / (sqrt(s_hat) + eps) with the bias-corrected moments, betas
    # (0.9, 0.999), eps=1e-6 outside the root, t from hyperparams['t'] (starting at 1, advanced
    # once per call): torch.optim.Adam's math with eps=1e-6 (torch's default eps is 1e-8).
    "adam": ({"lr": 0.01, "t": 1}, lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-6, foreach=False)),
}


@pytest.mark.parametrize("name", list(EQUAL_TO_TORCH))
def test_notes_optimizer_equals_torch(name):
    """float64, 2 epochs (300 steps) of the notes' function vs the torch.optim settings with the
    same math (the comment above each entry of EQUAL_TO_TORCH says what differs otherwise)."""
    hp, make_opt = EQUAL_TO_TORCH[name]
    ours, theirs = _run_both(name, make_opt, hp)
    _assert_params_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_notes_rmsprop_differs_from_torch_by_its_eps_placement():
    """The notes' RMSProp divides by sqrt(s + 1e-6); torch.optim.RMSprop by sqrt(s) + eps, and no
    torch setting puts eps inside the root (s decays, so no initial value can stand in for it).
    With eps=0 in torch the two agree to O(1e-6 / s), not to rounding: assert both."""
    hp = {"lr": 0.01, "gamma": 0.9}
    ours, theirs = _run_both("rmsprop", lambda ps: torch.optim.RMSprop(
        ps, lr=0.01, alpha=0.9, eps=0.0, foreach=False), hp)
    # Loose on purpose: the eps placement shifts each step by a relative O(1e-6 / s).
    _assert_params_close(ours, theirs, rtol=1e-3, atol=1e-5)
    assert max((p - q).abs().max().item() for p, q in zip(ours, theirs)) > 1e-12


def test_notes_adagrad_with_torch_defaults_is_not_equal():
    """Documents the difference EQUAL_TO_TORCH['adagrad'] works around: torch's default eps sits
    outside the root, so the trajectories are close but not equal."""
    hp = {"lr": 0.1}
    ours, theirs = _run_both("adagrad", lambda ps: torch.optim.Adagrad(ps, lr=0.1, foreach=False), hp)
    _assert_params_close(ours, theirs, rtol=1e-3, atol=1e-5)  # loose: eps 1e-6 in vs 1e-10 out of the root
    assert max((p - q).abs().max().item() for p, q in zip(ours, theirs)) > 1e-12


# ---- like torch: *_step_ against torch.optim.<X>(foreach=False) -------------------------------------

SHAPES = [(), (1,), (3,), (1000,), (4097,)]
STEPS = 10
TIGHT = EXACT_TOL[torch.float64]  # float64, same operations in the same order as torch


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]


def make_grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def _state_dtype(p):
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class RefOptimizer:
    """Holds the state lists of one *_step_ function and calls it like an optimizer would.
    states: torch's state key -> our list (empty when absent)."""

    def __init__(self, kind, params, **hp):
        self.kind, self.hp, self.params = kind, hp, params
        z = lambda: [torch.zeros(p.shape, dtype=_state_dtype(p)) for p in params]  # noqa: E731
        zs = [torch.tensor(0.0) for _ in params]
        if kind == "sgd":
            self.states = {"momentum_buffer": z() if hp.get("momentum", 0) != 0 else []}
            self.first_step = True
        elif kind == "adam":
            self.states = {"exp_avg": z(), "exp_avg_sq": z(),
                           "max_exp_avg_sq": z() if hp.get("amsgrad", False) else [], "step": zs}
            self.master = hp.pop("master", [])
        elif kind == "adagrad":
            self.states = {"sum": z(), "step": zs}
        elif kind == "rmsprop":
            self.states = {"square_avg": z(), "grad_avg": z() if hp.get("centered", False) else [],
                           "momentum_buffer": z() if hp.get("momentum", 0) > 0 else [], "step": zs}
        elif kind == "adadelta":
            self.states = {"square_avg": z(), "acc_delta": z(), "step": zs}

    def step(self, grads, grad_scale=None, found_inf=None):
        h, s, p = self.hp, self.states, self.params
        if self.kind == "sgd":
            R.sgd_step_(p, grads, s["momentum_buffer"], h.get("lr", 1e-3), h.get("momentum", 0.0),
                        h.get("dampening", 0.0), h.get("weight_decay", 0.0), h.get("nesterov", False),
                        h.get("maximize", False), self.first_step, grad_scale, found_inf)
            if found_inf is None or found_inf.item() == 0:
                self.first_step = False
        elif self.kind == "adam":
            beta1, beta2 = h.get("betas", (0.9, 0.999))
            R.adam_step_(p, grads, s["exp_avg"], s["exp_avg_sq"], s["max_exp_avg_sq"], s["step"],
                         self.master, h.get("lr", 1e-3), beta1, beta2, h.get("weight_decay", 0.0),
                         h.get("eps", 1e-8), h.get("amsgrad", False), h.get("maximize", False),
                         h.get("decoupled_weight_decay", False), grad_scale, found_inf)
        elif self.kind == "adagrad":
            R.adagrad_step_(p, grads, s["sum"], s["step"], h.get("lr", 1e-2), h.get("lr_decay", 0.0),
                            h.get("weight_decay", 0.0), h.get("eps", 1e-10), h.get("maximize", False),
                            grad_scale, found_inf)
        elif self.kind == "rmsprop":
            R.rmsprop_step_(p, grads, s["square_avg"], s["grad_avg"], s["momentum_buffer"], s["step"],
                            h.get("lr", 1e-2), h.get("alpha", 0.99), h.get("eps", 1e-8),
                            h.get("weight_decay", 0.0), h.get("momentum", 0.0), h.get("centered", False),
                            h.get("maximize", False), grad_scale, found_inf)
        elif self.kind == "adadelta":
            R.adadelta_step_(p, grads, s["square_avg"], s["acc_delta"], s["step"], h.get("lr", 1.0),
                             h.get("rho", 0.9), h.get("eps", 1e-6), h.get("weight_decay", 0.0),
                             h.get("maximize", False), grad_scale, found_inf)


TORCH_CLS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
             "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop,
             "adadelta": torch.optim.Adadelta}

CASES = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.5)),
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.1, maximize=True)),
    ("sgd", dict(lr=0.05, momentum=0.5, dampening=0.1, weight_decay=0.01, maximize=True)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True)),
    ("adam", dict(lr=0.01)),
    ("adam", dict(lr=0.01, amsgrad=True)),
    ("adam", dict(lr=0.01, weight_decay=0.1)),
    ("adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("adamw", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    ("adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, amsgrad=True, maximize=True)),
    ("adagrad", dict(lr=0.1)),
    ("adagrad", dict(lr=0.1, lr_decay=0.1)),
    ("adagrad", dict(lr=0.1, weight_decay=0.1)),
    ("adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, eps=1e-6, maximize=True)),
    ("rmsprop", dict(lr=0.01)),
    ("rmsprop", dict(lr=0.01, centered=True)),
    ("rmsprop", dict(lr=0.01, momentum=0.9)),
    ("rmsprop", dict(lr=0.01, centered=True, momentum=0.9)),
    ("rmsprop", dict(lr=0.01, weight_decay=0.1, maximize=True)),
    ("rmsprop", dict(lr=0.01, alpha=0.9, eps=1e-6, centered=True, momentum=0.5, weight_decay=0.01,
                     maximize=True)),
    ("adadelta", dict()),
    ("adadelta", dict(lr=0.5)),
    ("adadelta", dict(weight_decay=0.1)),
    ("adadelta", dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.01, maximize=True)),
]


def _case_id(case):
    kind, hp = case
    return kind + "-" + ("-".join(f"{k}={v}" for k, v in hp.items()) or "defaults")


def make_pair(kind, hp, dtype=torch.float64):
    """(our params, our RefOptimizer, torch's params, torch's optimizer), same starting values."""
    params = make_params(dtype)
    tparams = [p.detach().clone().requires_grad_() for p in params]
    topt = TORCH_CLS[kind](tparams, foreach=False, **hp)
    ref = RefOptimizer("adam" if kind == "adamw" else kind, params,
                       **(dict(hp, decoupled_weight_decay=True) if kind == "adamw" else hp))
    return params, ref, tparams, topt


def assert_same_as_torch(params, ref, tparams, topt, **tol):
    """Params and every state against torch's, one flat comparison (fast), per tensor on failure."""
    pairs = [(p, tp.detach()) for p, tp in zip(params, tparams)]
    pairs += [(ours[i], topt.state[tp][key].to(ours[i].dtype))
              for key, ours in ref.states.items() if ours for i, tp in enumerate(tparams)]
    flat = [torch.cat([a.reshape(-1) for a, _ in pairs]), torch.cat([b.reshape(-1) for _, b in pairs])]
    if torch.allclose(*flat, rtol=tol["rtol"], atol=tol["atol"]):
        return
    for i, (p, tp) in enumerate(zip(params, tparams)):
        torch.testing.assert_close(p, tp.detach(), **tol, msg=lambda m: f"param {i}: {m}")
        for key, ours in ref.states.items():
            if not ours:
                continue
            theirs = topt.state[tp][key]
            torch.testing.assert_close(ours[i], theirs.to(ours[i].dtype), **tol,
                                       msg=lambda m: f"state {key}[{i}]: {m}")


@pytest.mark.parametrize("amp", ["plain", "grad_scale"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_step_matches_torch_float64(case, amp):
    """10 steps of one *_step_ call over params of sizes 0-dim, 1, 3, 1000, 4097 against torch's
    single-tensor optimizer, params and every state after every step. grad_scale: our grads are
    scaled by 2^10 and unscaled by the op (exactly, a power of two); torch sees the plain grads."""
    kind, hp = case
    params, ref, tparams, topt = make_pair(kind, hp)
    scale = torch.tensor([1024.0]) if amp == "grad_scale" else None
    for step in range(STEPS):
        grads = make_grads(params, step)
        for tp, g in zip(tparams, grads):
            tp.grad = g.clone()
        ours = [g * 1024 for g in grads] if scale is not None else grads
        kept = [g.clone() for g in ours]
        ref.step(ours, grad_scale=scale, found_inf=torch.tensor([0.0]) if scale is not None else None)
        topt.step()
        assert_same_as_torch(params, ref, tparams, topt, **TIGHT)
        for g, k in zip(ours, kept):
            assert torch.equal(g, k), "grads must stay read-only"


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "sgd"][::2] + CASES[1:3],
                         ids=lambda c: _case_id(c))
def test_found_inf_writes_nothing(case):
    """After 2 ordinary steps, a step with found_inf=1 changes no param, state or step count; the
    next ordinary step still matches torch (which never saw the skipped step)."""
    kind, hp = case
    params, ref, tparams, topt = make_pair(kind, hp)
    for step in range(2):
        grads = make_grads(params, step)
        for tp, g in zip(tparams, grads):
            tp.grad = g.clone()
        ref.step(grads)
        topt.step()
    before = ([p.clone() for p in params],
              {k: [t.clone() for t in v] for k, v in ref.states.items()})
    ref.step(make_grads(params, 99), grad_scale=torch.tensor([3.0]), found_inf=torch.tensor([1.0]))
    for p, q in zip(params, before[0]):
        assert torch.equal(p, q)
    for k, v in ref.states.items():
        for t, u in zip(v, before[1][k]):
            assert torch.equal(t, u), k
    grads = make_grads(params, 2)
    for tp, g in zip(tparams, grads):
        tp.grad = g.clone()
    ref.step(grads, found_inf=torch.tensor([0.0]))
    topt.step()
    assert_same_as_torch(params, ref, tparams, topt, **TIGHT)


LOW_CASES = [("sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
             ("adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
             ("adagrad", dict(lr=0.1, lr_decay=0.1)),
             ("rmsprop", dict(lr=0.01, centered=True, momentum=0.9)),
             ("adadelta", dict(weight_decay=0.1))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", LOW_CASES, ids=[_case_id(c) for c in LOW_CASES])
def test_low_precision_params_step_in_float32(case, dtype):
    """float16/bfloat16 params and grads, float32 state: one step is torch's float32 step on the
    upcast values, the new params that result rounded to the params' dtype (exactly), the state
    torch's float32 state."""
    kind, hp = case
    params = make_params(dtype)
    grads = make_grads(params, 0)
    ref = RefOptimizer(kind, params, **hp)
    tparams = [p.detach().float().requires_grad_() for p in params]
    topt = TORCH_CLS[kind](tparams, foreach=False, **hp)
    for tp, g in zip(tparams, grads):
        tp.grad = g.float()
    ref.step(grads)
    topt.step()
    for i, (p, tp) in enumerate(zip(params, tparams)):
        assert p.dtype == dtype
        assert torch.equal(p, tp.detach().to(dtype)), i
    for key, ours in ref.states.items():
        for i, t in enumerate(ours):
            assert t.dtype == torch.float32
            assert torch.equal(t, topt.state[tparams[i]][key].float()), (key, i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_adam_master_params(dtype):
    """adam_step_ with float32 master copies of bfloat16/float16 params: the masters follow torch's
    float32 Adam exactly for 10 steps and the params are the masters rounded; the params' own values
    are not read (poisoned with NaN before each step)."""
    hp = dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)
    master = make_params(torch.float32)
    params = [m.to(dtype) for m in master]
    ref = RefOptimizer("adam", params, master=master, **hp)
    tparams = [m.detach().clone().requires_grad_() for m in master]
    topt = torch.optim.Adam(tparams, foreach=False, **hp)
    for step in range(STEPS):
        grads = make_grads(params, step)
        for tp, g in zip(tparams, grads):
            tp.grad = g.float()
        for p in params:
            p.fill_(float("nan"))
        ref.step(grads)
        topt.step()
        for m, p, tp in zip(master, params, tparams):
            assert torch.equal(m, tp.detach())
            assert torch.equal(p, m.to(dtype))


def test_empty_lists_are_a_no_op():
    R.sgd_step_([], [], [], 0.1, 0.9, 0.0, 0.0, False, False, True, None, None)
    R.adam_step_([], [], [], [], [], [], [], 0.1, 0.9, 0.999, 0.0, 1e-8, False, False, False, None, None)
    R.adagrad_step_([], [], [], [], 0.1, 0.0, 0.0, 1e-10, False, None, None)
    R.rmsprop_step_([], [], [], [], [], [], 0.1, 0.99, 1e-8, 0.0, 0.0, False, False, None, None)
    R.adadelta_step_([], [], [], [], [], 1.0, 0.9, 1e-6, 0.0, False, None, None)


def _adam_args(params, grads, over):
    z = lambda: [torch.zeros_like(p) for p in params]  # noqa: E731
    args = dict(params=params, grads=grads, exp_avgs=z(), exp_avg_sqs=z(), max_exp_avg_sqs=[],
                state_steps=[torch.tensor(0.0) for _ in params], master_params=[], lr=0.1, beta1=0.9,
                beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                decoupled_weight_decay=False, grad_scale=None, found_inf=None)
    args.update(over)
    return list(args.values())


BAD = {
    "grads length": (lambda p, g: dict(grads=g[:-1]), "grads has 4 tensors, expected 5"),
    "grad shape": (lambda p, g: dict(grads=g[:-1] + [torch.zeros(4096, dtype=torch.float64)]),
                   r"grads\[4\] has shape \(4096,\)"),
    "grad dtype": (lambda p, g: dict(grads=g[:-1] + [g[-1].float()]), r"grads\[4\] is torch.float32"),
    "state missing": (lambda p, g: dict(exp_avgs=[]), "exp_avgs has 0 tensors, expected 5"),
    "state not empty": (lambda p, g: dict(max_exp_avg_sqs=[torch.zeros_like(t) for t in p]),
                        r"max_exp_avg_sqs must be empty \(amsgrad=False\)"),
    "state dtype": (lambda p, g: dict(exp_avg_sqs=[torch.zeros_like(t) for t in p[:-1]]
                                      + [torch.zeros(p[-1].shape)]), r"exp_avg_sqs\[4\] is torch.float32"),
    "step shape": (lambda p, g: dict(state_steps=[torch.tensor(0.0)] * 4 + [torch.zeros(1)]),
                   r"state_steps\[4\] must be a 0-dim"),
    "master for float64": (lambda p, g: dict(master_params=[torch.zeros(t.shape) for t in p]),
                           r"master_params\[0\] is torch.float32 .* expected torch.float64"),
    "grad_scale size": (lambda p, g: dict(grad_scale=torch.ones(2)), "grad_scale must be a 1-element"),
    "found_inf dtype": (lambda p, g: dict(found_inf=torch.zeros(1, dtype=torch.float64)),
                        "found_inf must be a 1-element float32"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input_raises_before_any_write(what):
    """The error names the argument; no param, state or step has changed (the faulty entry is the
    last one, so a write-as-you-go implementation would have touched the first four)."""
    params = make_params(torch.float64)
    grads = make_grads(params, 0)
    over, match = BAD[what]
    args = _adam_args(params, grads, over(params, grads))
    before = [t.clone() for t in params]
    with pytest.raises(RuntimeError, match=match):
        R.adam_step_(*args)
    for p, q in zip(params, before):
        assert torch.equal(p, q)
    for lst in (args[2], args[3], args[5]):
        assert all(not t.any() for t in lst)


def test_bad_input_other_ops():
    params = make_params(torch.float64)
    grads = make_grads(params, 0)
    z = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    with pytest.raises(RuntimeError, match=r"momentum_buffers must be empty \(momentum == 0\)"):
        R.sgd_step_(params, grads, z, 0.1, 0.0, 0.0, 0.0, False, False, True, None, None)
    with pytest.raises(RuntimeError, match="momentum_buffers has 0 tensors"):
        R.sgd_step_(params, grads, [], 0.1, 0.9, 0.0, 0.0, False, False, True, None, None)
    with pytest.raises(RuntimeError, match=r"grad_avgs must be empty \(centered=False\)"):
        R.rmsprop_step_(params, grads, z, z, [], steps, 0.1, 0.99, 1e-8, 0.0, 0.0, False, False, None, None)
    with pytest.raises(RuntimeError, match="state_sums has 4 tensors"):
        R.adagrad_step_(params, grads, z[:4], steps, 0.1, 0.0, 0.0, 1e-10, False, None, None)
    with pytest.raises(RuntimeError, match=r"acc_deltas\[0\] has shape \(1,\)"):
        R.adadelta_step_(params, grads, z, [torch.zeros(1, dtype=torch.float64)] + z[1:], steps,
                         1.0, 0.9, 1e-6, 0.0, False, None, None)
    with pytest.raises(RuntimeError, match="all params must share"):
        R.sgd_step_(params[:-1] + [params[-1].float()], grads, [], 0.1, 0.0, 0.0, 0.0, False, False,
                    True, None, None)
    assert all(not t.any() for t in z) and all(s.item() == 0 for s in steps)
