"""The Triton fused-optimizer ops (pyfastdl_triton::*_step_, triton_kernels/optim.py) called
directly: N steps against torch.optim.<X>(foreach=False) on copies, for every option, on one list
of params of sizes 1, 3, 1000, 4097 and a 0-dim one (one multi-tensor launch per step); found_inf
and grad_scale; float16/bfloat16 params with float32 state and master weights; strided tensors;
several chunks and launches; checks raised before anything is written; schemas and opcheck.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set in conftest.py) or on a
GPU. Sizes and step counts are small: the interpreter runs every program in Python."""
import pytest
import torch

from helpers import DEVICE, MARKS, STEP_TOL as TOL, assert_schema_matches_cpp

pytestmark = MARKS["triton"]

DEV = DEVICE["triton"]
SIZES = [(1,), (3,), (1000,), (4097,), ()]
STEPS = 5
# Named tolerances (assert_close's rtol, atol) against torch.optim in the same dtype: the kernels
# follow torch's order of operations, so the gap is a few roundings (fma contraction, torch's
# vectorized CPU kernels), compounded over STEPS steps.


@pytest.fixture(scope="module")
def ops():
    import pyfastdl  # noqa: F401  (registers torch.ops.pyfastdl: the schemas to compare with)
    import pyfastdl.triton_kernels.optim  # noqa: F401  (registers torch.ops.pyfastdl_triton)
    return torch.ops.pyfastdl_triton


@pytest.fixture
def kernels_module(ops):
    import pyfastdl.triton_kernels.optim as module
    return module


# ---- how each op maps onto torch.optim -----------------------------------------------------------
# name -> (torch class, our state lists in schema order as (torch state key, needed(opts)), steps?)
SPECS = {
    "sgd": (torch.optim.SGD, [("momentum_buffer", lambda o: o.get("momentum", 0) != 0)], False),
    "adam": (torch.optim.Adam, [("exp_avg", lambda o: True), ("exp_avg_sq", lambda o: True),
                                ("max_exp_avg_sq", lambda o: o.get("amsgrad", False))], True),
    "adamw": (torch.optim.AdamW, [("exp_avg", lambda o: True), ("exp_avg_sq", lambda o: True),
                                  ("max_exp_avg_sq", lambda o: o.get("amsgrad", False))], True),
    "adagrad": (torch.optim.Adagrad, [("sum", lambda o: True)], True),
    "rmsprop": (torch.optim.RMSprop, [("square_avg", lambda o: True),
                                      ("grad_avg", lambda o: o.get("centered", False)),
                                      ("momentum_buffer", lambda o: o.get("momentum", 0) > 0)],
                True),
    "adadelta": (torch.optim.Adadelta, [("square_avg", lambda o: True),
                                        ("acc_delta", lambda o: True)], True),
}

# Hyper-parameters of every run unless a case overrides them: torch's defaults, except lr (1e-2
# for SGD and Adam, whose 1e-3 barely moves the params in STEPS steps). Passed to torch too.
DEFAULTS = {
    "sgd": dict(lr=1e-2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                maximize=False),
    "adam": dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, amsgrad=False,
                 maximize=False),
    "adamw": dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, amsgrad=False,
                  maximize=False),
    "adagrad": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False),
    "rmsprop": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
                    maximize=False),
    "adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
}


class Ours:
    """Our side of a comparison: params, state lists (zeros, as torch initializes them), steps."""

    def __init__(self, name, params, opts, state_dtype=None, master=False,
                 step_dtype=torch.float32):
        self.name, self.params = name, params
        self.opts = {**DEFAULTS[name], **opts}
        _, keys, has_steps = SPECS[name]
        sd = state_dtype or params[0].dtype
        self.state = {k: [torch.zeros_like(p, dtype=sd) for p in params] if need(self.opts) else []
                      for k, need in keys}
        self.steps = ([torch.tensor(0.0, dtype=step_dtype, device=p.device) for p in params]
                      if has_steps else [])
        self.master = [p.float() for p in params] if master else []
        self.k = 0

    def tensors(self):
        """Every tensor the op may write, for the nothing-written checks."""
        state = [t for ts in self.state.values() for t in ts]
        return list(self.params) + state + self.steps + self.master

    def step(self, ops, grads, grad_scale=None, found_inf=None):
        o, s, n, P = self.opts, self.state, self.name, self.params
        amp = (grad_scale, found_inf)
        if n == "sgd":
            ops.sgd_step_(P, grads, s["momentum_buffer"], o["lr"], o["momentum"], o["dampening"],
                          o["weight_decay"], o["nesterov"], o["maximize"], self.k == 0, *amp)
        elif n in ("adam", "adamw"):
            b1, b2 = o["betas"]
            ops.adam_step_(P, grads, s["exp_avg"], s["exp_avg_sq"], s["max_exp_avg_sq"], self.steps,
                           self.master, o["lr"], b1, b2, o["weight_decay"], o["eps"], o["amsgrad"],
                           o["maximize"], n == "adamw", *amp)
        elif n == "adagrad":
            ops.adagrad_step_(P, grads, s["sum"], self.steps, o["lr"], o["lr_decay"],
                              o["weight_decay"], o["eps"], o["maximize"], *amp)
        elif n == "rmsprop":
            ops.rmsprop_step_(P, grads, s["square_avg"], s["grad_avg"], s["momentum_buffer"],
                              self.steps, o["lr"], o["alpha"], o["eps"], o["weight_decay"],
                              o["momentum"], o["centered"], o["maximize"], *amp)
        else:
            ops.adadelta_step_(P, grads, s["square_avg"], s["acc_delta"], self.steps, o["lr"],
                               o["rho"], o["eps"], o["weight_decay"], o["maximize"], *amp)
        self.k += 1


def make_params(dtype, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(DEV) for s in sizes]


def make_grads(params, k, dtype=None):
    g = torch.Generator().manual_seed(100 + k)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype or p.dtype).to(DEV)
            for p in params]


def reference(name, params, opts):
    """torch.optim.<X>(foreach=False) on copies of params, with our ops' hyper-parameters."""
    ref = [p.detach().clone().requires_grad_() for p in params]
    return ref, SPECS[name][0](ref, foreach=False, **{**DEFAULTS[name], **opts})


def ref_step(ref, opt, grads):
    for r, g in zip(ref, grads):
        r.grad = g.to(r.dtype)
    opt.step()


def assert_matches(ours, ref, opt, **tol):
    for i, (p, r) in enumerate(zip(ours.params, ref)):
        torch.testing.assert_close(p, r.detach(), **tol,
                                   msg=lambda m: f"params[{i}] ({list(p.shape)}): {m}")
        st = opt.state[r]
        for key, ts in ours.state.items():
            if ts:
                torch.testing.assert_close(ts[i], st[key], **tol,
                                           msg=lambda m: f"{key}[{i}]: {m}")
        if ours.steps:
            assert ours.steps[i].item() == st["step"].item()


# ---- N steps against torch.optim, every option ---------------------------------------------------
CASES = [
    ("sgd", {}),
    ("sgd", dict(momentum=0.9)),
    ("sgd", dict(momentum=0.9, nesterov=True)),
    ("sgd", dict(momentum=0.9, dampening=0.3, weight_decay=0.1)),
    ("sgd", dict(momentum=0.5, nesterov=True, weight_decay=0.1, maximize=True)),
    ("sgd", dict(weight_decay=0.1, maximize=True)),
    ("adam", {}),
    ("adam", dict(amsgrad=True)),
    ("adam", dict(weight_decay=0.1, maximize=True)),
    ("adam", dict(betas=(0.3, 0.9), amsgrad=True, weight_decay=0.05)),  # lerp, weight >= 0.5
    ("adamw", {}),
    ("adamw", dict(weight_decay=0.1, amsgrad=True, maximize=True)),
    ("adagrad", {}),
    ("adagrad", dict(lr_decay=0.1)),
    ("adagrad", dict(lr_decay=0.05, weight_decay=0.1, eps=1e-6, maximize=True)),
    ("rmsprop", {}),
    ("rmsprop", dict(centered=True)),
    ("rmsprop", dict(momentum=0.9)),
    ("rmsprop", dict(centered=True, momentum=0.5, weight_decay=0.1, maximize=True)),
    ("rmsprop", dict(alpha=0.3, centered=True)),  # lerp's weight >= 0.5 branch
    ("adadelta", {}),
    ("adadelta", dict(rho=0.5, weight_decay=0.1)),
    ("adadelta", dict(lr=0.5, maximize=True)),
]
CASE_IDS = [n + ("-" + "-".join(f"{k}={v}" for k, v in o.items()) if o else "") for n, o in CASES]
FP64_CASES = [CASES[i] for i in (3, 7, 11, 14, 18, 21)]


def run_against_torch(ops, name, opts, dtype, steps=STEPS, **ours_kw):
    params = make_params(dtype)
    ours = Ours(name, [p.clone() for p in params], opts, **ours_kw)
    ref, opt = reference(name, params, opts)
    for k in range(steps):
        grads = make_grads(params, k)
        ref_step(ref, opt, grads)
        ours.step(ops, grads)
    return ours, ref, opt


@pytest.mark.parametrize("name,opts", CASES, ids=CASE_IDS)
def test_matches_torch_float32(ops, name, opts):
    ours, ref, opt = run_against_torch(ops, name, opts, torch.float32)
    tol = dict(TOL[torch.float32])
    if name == "rmsprop" and opts.get("momentum"):
        tol["atol"] = 1e-5  # buf reaches ~30: torch float32 itself is 5e-6 off float64 there
    assert_matches(ours, ref, opt, **tol)


@pytest.mark.parametrize("name,opts", FP64_CASES, ids=[n for n, _ in FP64_CASES])
def test_matches_torch_float64(ops, name, opts):
    ours, ref, opt = run_against_torch(ops, name, opts, torch.float64, steps=3)
    assert_matches(ours, ref, opt, **TOL[torch.float64])


def test_float64_steps_and_grads_untouched(ops):
    """float64 state_steps work like float32 ones; grads are read-only."""
    params = make_params(torch.float32)
    ours = Ours("adagrad", [p.clone() for p in params], dict(lr_decay=0.1),
                step_dtype=torch.float64)
    ref, opt = reference("adagrad", params, dict(lr_decay=0.1))
    for k in range(3):
        grads = make_grads(params, k)
        before = [g.clone() for g in grads]
        ref_step(ref, opt, grads)
        ours.step(ops, grads)
        assert all(torch.equal(g, b) for g, b in zip(grads, before))
    assert all(s.dtype == torch.float64 for s in ours.steps)
    assert_matches(ours, ref, opt, **TOL[torch.float32])


# ---- found_inf and grad_scale --------------------------------------------------------------------
ONE_PER_OP = [("sgd", dict(momentum=0.9, weight_decay=0.1)), ("adam", dict(amsgrad=True)),
              ("adamw", {}), ("adagrad", dict(lr_decay=0.1)),
              ("rmsprop", dict(centered=True, momentum=0.5)), ("adadelta", {})]
SMALL = [(3,), (1000,), ()]


@pytest.mark.parametrize("name,opts", ONE_PER_OP, ids=[n for n, _ in ONE_PER_OP])
def test_found_inf_writes_nothing(ops, name, opts):
    params = make_params(torch.float32, SMALL)
    ours = Ours(name, params, opts)
    ours.step(ops, make_grads(params, 0))  # non-trivial state
    before = [t.clone() for t in ours.tensors()]
    grads = make_grads(params, 1)
    ours.step(ops, grads, grad_scale=torch.ones(1, device=DEV),
              found_inf=torch.ones(1, device=DEV))
    for t, b in zip(ours.tensors(), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("name,opts", ONE_PER_OP, ids=[n for n, _ in ONE_PER_OP])
def test_grad_scale_unscales(ops, name, opts):
    """grads * 4 with grad_scale = 4 (and found_inf = 0) is the unscaled step, bit for bit."""
    params = make_params(torch.float32, SMALL)
    plain = Ours(name, [p.clone() for p in params], opts)
    scaled = Ours(name, [p.clone() for p in params], opts)
    for k in range(3):
        grads = make_grads(params, k)
        plain.step(ops, grads)
        scaled.step(ops, [g * 4 for g in grads], grad_scale=torch.full((1,), 4.0, device=DEV),
                    found_inf=torch.zeros(1, device=DEV))
    for a, b in zip(plain.tensors(), scaled.tensors()):
        assert torch.equal(a, b)


# ---- float16 / bfloat16 params with float32 state ------------------------------------------------
LOW = [torch.bfloat16, torch.float16]
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,opts", [("adam", {}), ("sgd", dict(momentum=0.9)), ("rmsprop", {})],
                         ids=["adam", "sgd", "rmsprop"])
def test_low_precision_params(ops, dtype, name, opts):
    """State float32; the params are the float32 reference's to within one rounding per step.
    Without weight decay the update does not read p, so the state matches float32's and the
    param's error is the sum of its roundings: |p - ref| <= sum_k EPS * |ref_k|."""
    params = make_params(dtype)
    ours = Ours(name, [p.clone() for p in params], opts, state_dtype=torch.float32)
    ref, opt = reference(name, [p.float() for p in params], opts)
    bound = [torch.zeros_like(r) for r in ref]
    for k in range(3):
        grads = make_grads(params, k)  # low-precision values, exact in float32
        ref_step(ref, opt, grads)
        ours.step(ops, grads)
        for b, r in zip(bound, ref):
            b += EPS[dtype] * r.detach().abs()
    for i, (p, r, b) in enumerate(zip(ours.params, ref, bound)):
        assert p.dtype == dtype
        err = (p.float() - r.detach()).abs()
        assert (err <= 1.01 * b + 1e-6).all(), f"params[{i}]: {(err - b).max().item()} over"
        for key, ts in ours.state.items():
            if ts:
                assert ts[i].dtype == torch.float32
                torch.testing.assert_close(ts[i], opt.state[r][key], **TOL[torch.float32])


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_adam_master_params(ops, dtype):
    """With master_params the update runs on the float32 master (matching float32 Adam) and the
    param is the master rounded."""
    params = make_params(dtype)
    opts = dict(weight_decay=0.1, amsgrad=True)
    ours = Ours("adamw", [p.clone() for p in params], opts, state_dtype=torch.float32, master=True)
    ref, opt = reference("adamw", [p.float() for p in params], opts)
    for k in range(STEPS):
        grads = make_grads(params, k)
        ref_step(ref, opt, grads)
        ours.step(ops, grads)
    for p, m, r in zip(ours.params, ours.master, ref):
        torch.testing.assert_close(m, r.detach(), **TOL[torch.float32])
        assert torch.equal(p, m.to(dtype))


# ---- layouts, chunks, launches -------------------------------------------------------------------
def test_strided_tensors(ops):
    """Transposed params with state of the same strides (no copy); a non-dense param view and
    state with other strides (dense working copies written back)."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(9, 14, generator=g).to(DEV)
    params = [base.t().clone().t(),  # (9, 14) with strides (1, 9): dense, permuted
              torch.randn(5, 26, generator=g).to(DEV)[:, ::2],  # (5, 13), not dense
              torch.randn(4, 3, generator=g).to(DEV)]
    opts = dict(amsgrad=True, weight_decay=0.1)
    ours = Ours("adam", params, opts)
    ours.state["exp_avg"][2] = torch.zeros(3, 4, device=DEV).t()  # strides differ from params[2]
    ours.state["exp_avg_sq"][0] = torch.zeros(9, 14, device=DEV)  # contiguous vs permuted param
    ref, opt = reference("adam", [p.contiguous() for p in params], opts)
    for k in range(3):
        grads = make_grads(params, k)
        grads[2] = grads[2].t().contiguous().t()  # strides differ from params[2] (read-only copy)
        ref_step(ref, opt, grads)
        ours.step(ops, grads)
    assert params[1].stride() == (26, 2)  # still the view it was
    assert_matches(ours, ref, opt, **TOL[torch.float32])


def test_many_chunks_and_launches(ops, kernels_module, monkeypatch):
    """Small tiles: several tiles per chunk, several chunks per tensor, several launches."""
    monkeypatch.setattr(kernels_module, "_BLOCK", 64)
    monkeypatch.setattr(kernels_module, "_ITERS", 4)
    monkeypatch.setattr(kernels_module, "_MAX_PROGRAMS", 7)
    ours, ref, opt = run_against_torch(ops, "sgd", dict(momentum=0.9, nesterov=True),
                                       torch.float32, steps=2)
    assert_matches(ours, ref, opt, **TOL[torch.float32])


def test_empty_lists_and_empty_tensors(ops):
    ops.adam_step_([], [], [], [], [], [], [], 1e-3, 0.9, 0.999, 0.0, 1e-8, False, False, False,
                   None, None)
    params = make_params(torch.float32, [(0,), (3,)])
    ours, (ref, opt) = Ours("adam", [p.clone() for p in params], {}), reference("adam", params, {})
    grads = make_grads(params, 0)
    ref_step(ref, opt, grads)
    ours.step(ops, grads)
    assert_matches(ours, ref, opt, **TOL[torch.float32])


# ---- checks raised before anything is written ----------------------------------------------------
def _bad_calls(ops, P, G, M, V, S, X):
    """(expected message, call) pairs of bad arguments; the last tensors of each list are the
    bad ones, so a launcher that wrote before checking would have touched the first."""
    def f(*lists, amsgrad=False, found_inf=None):
        return lambda: ops.adam_step_(*lists, 1e-2, 0.9, 0.999, 0.0, 1e-8, amsgrad, False, False,
                                      None, found_inf)

    bad_shape = V[:-1] + [torch.zeros(2, device=DEV)]
    bad_dtype = M[:-1] + [M[-1].double()]
    return [
        ("grads to have one tensor per param", f(P, G[:-1], M, V, [], S, [])),
        ("exp_avgs to be empty or have one tensor per param", f(P, G, M[:-1], V, [], S, [])),
        ("expected exp_avgs to have one tensor per param", f(P, G, [], V, [], S, [])),
        ("state_steps to have one tensor per param", f(P, G, M, V, [], S[:-1], [])),
        ("exp_avg_sqs\\[2\\] has shape", f(P, G, M, bad_shape, [], S, [])),
        ("exp_avgs\\[2\\] is torch.float64", f(P, G, bad_dtype, V, [], S, [])),
        ("state_steps\\[2\\] must be a 1-element",
         f(P, G, M, V, [], S[:-1] + [torch.zeros(2)], [])),
        ("grads\\[2\\] is on meta",
         f(P, G[:-1] + [torch.zeros(4, device="meta")], M, V, [], S, [])),
        ("master_params are for float16/bfloat16", f(P, G, M, V, [], S, X)),
        ("amsgrad=True", f(P, G, M, V, [], S, [], amsgrad=True)),
        ("found_inf must be a 1-element float32",
         f(P, G, M, V, [], S, [], found_inf=torch.zeros(1, dtype=torch.float64, device=DEV))),
    ]


def test_bad_arguments_raise_before_writing(ops):
    P = make_params(torch.float32, [(3,), (5,), (4,)])
    G = make_grads(P, 0)
    M = [torch.ones_like(p) for p in P]
    V = [torch.ones_like(p) for p in P]
    S = [torch.tensor(1.0) for _ in P]
    X = [p.clone() for p in P]
    everything = P + M + V + S
    before = [t.clone() for t in everything]
    for message, call in _bad_calls(ops, P, G, M, V, S, X):
        with pytest.raises(RuntimeError, match=message):
            call()
        for t, b in zip(everything, before):
            assert torch.equal(t, b), message
    with pytest.raises(RuntimeError, match="sgd_step_: expected momentum_buffers to have one"):
        ops.sgd_step_(P, G, [], 1e-2, 0.9, 0.0, 0.0, False, False, True, None, None)
    with pytest.raises(RuntimeError, match="rmsprop_step_: expected grad_avgs"):
        ops.rmsprop_step_(P, G, V, [], [], S, 1e-2, 0.99, 1e-8, 0.0, 0.0, True, False, None, None)
    low = [p.bfloat16() for p in P]
    with pytest.raises(RuntimeError, match=r"state_sums\[0\] is torch.bfloat16 .*torch.float32"):
        ops.adagrad_step_(low, [g.bfloat16() for g in G], [v.bfloat16() for v in V], S, 1e-2, 0.0,
                          0.0, 1e-10, False, None, None)
    with pytest.raises(RuntimeError, match="params\\[1\\] is torch.float64"):
        ops.adadelta_step_([P[0], P[1].double()], G[:2], V[:2], M[:2], S[:2], 1.0, 0.9, 1e-6, 0.0,
                           False, None, None)
    for t, b in zip(everything, before):
        assert torch.equal(t, b)


# ---- registration --------------------------------------------------------------------------------
OP_NAMES = ["sgd_step_", "adam_step_", "adagrad_step_", "rmsprop_step_", "adadelta_step_"]


@pytest.mark.parametrize("op", OP_NAMES)
def test_schema_matches_cpp(ops, op):
    assert_schema_matches_cpp(ops, op)


def test_opcheck(ops):
    """Schema (declared mutations) and fake-tensor registrations, through torch.library.opcheck."""
    P = make_params(torch.float32, [(3,), ()])
    G = make_grads(P, 0)
    z = lambda: [torch.zeros_like(p) for p in P]  # noqa: E731
    steps = lambda: [torch.tensor(0.0) for _ in P]  # noqa: E731
    fi = torch.zeros(1, device=DEV)
    calls = [
        (ops.sgd_step_, (P, G, z(), 1e-2, 0.9, 0.0, 0.0, False, False, True, None, fi)),
        (ops.adam_step_, (P, G, z(), z(), z(), steps(), [], 1e-2, 0.9, 0.999, 0.1, 1e-8, True,
                          False, True, None, fi)),
        (ops.adagrad_step_, (P, G, z(), steps(), 1e-2, 0.0, 0.0, 1e-10, False, None, None)),
        (ops.rmsprop_step_, (P, G, z(), z(), z(), steps(), 1e-2, 0.99, 1e-8, 0.0, 0.5, True, False,
                             None, None)),
        (ops.adadelta_step_, (P, G, z(), z(), steps(), 1.0, 0.9, 1e-6, 0.0, False, None, None)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
