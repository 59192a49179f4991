"""pyfastdl.optim against torch.optim: the update rules (every optimizer x option x backend, 20
steps on odd sizes), state_dict both ways, GradScaler, bad input, step inside backward."""
import copy

import pytest
import torch

import pyfastdl
import pyfastdl.optim as po
from pyfastdl import backends

from helpers import DEVICE, MARKS, HAS_CUDA, STEP_TOL as TOL

SIZES = [(1,), (3,), (1000,), (4097,), (), (7, 5)]

# (name, kwargs) -- the option combinations of each optimizer
CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.05, momentum=0.8, dampening=0.3, maximize=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)),
    ("Adam", dict(lr=0.01, maximize=True, eps=1e-6)),
    ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    ("AdamW", dict(lr=0.01, weight_decay=0.05, amsgrad=True, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1, maximize=True)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, centered=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, weight_decay=0.1, maximize=True)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5, alpha=0.9)),
    ("Adadelta", dict()),
    ("Adadelta", dict(lr=0.5, rho=0.8, weight_decay=0.1, maximize=True)),
]
CONFIG_IDS = [n + "-" + "-".join(f"{k}={v}" for k, v in kw.items()) for n, kw in CONFIGS]

# float32 after 20 steps: the kernels follow torch's operation order, so only FMA contraction and
# sqrt/division rounding differ; RMSprop centered divides by sqrt(sq - ga^2), a cancellation
# that amplifies ulps, hence its looser bound.


def backend_params(dtypes_by_backend):
    out = []
    for b, dts in dtypes_by_backend.items():
        for dt in dts:
            out.append(pytest.param(b, dt, marks=MARKS[b], id=f"{b}-{str(dt).replace('torch.', '')}"))
    return out


BACKENDS = backend_params({"cpu": [torch.float32, torch.float64], "cuda": [torch.float32, torch.float64],
                           "triton": [torch.float32], "reference": [torch.float64]})


def make_params(dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device) for s in SIZES]


def grads_for(step, params, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype).to(p.device) for p in params]


def run_steps(opt, params, steps, start=0):
    for s in range(start, start + steps):
        for p, g in zip(params, grads_for(s, params)):
            p.grad = g
        opt.step()


def assert_same(ours, theirs, dtype):
    tol = TOL[dtype]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach().cpu().double(), b.detach().cpu().double(), **tol)


def assert_same_state(opt_a, opt_b, dtype):
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), (sa[k].keys(), sb[k].keys())
        for key in sa[k]:
            va, vb = sa[k][key], sb[k][key]
            if isinstance(va, torch.Tensor) and key != "step":
                assert va.dtype == vb.dtype
                torch.testing.assert_close(va.cpu().double(), vb.cpu().double(), **TOL[dtype])
            elif key == "step":
                assert float(va) == float(vb)


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("name,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_for_20_steps(backend, dtype, name, kwargs):
    device = DEVICE[backend]
    ours = [p.clone().requires_grad_() for p in make_params(dtype, device)]
    theirs = [p.clone().requires_grad_() for p in make_params(dtype, device)]
    opt = getattr(po, name)(ours, **kwargs)
    ref = getattr(torch.optim, name)(theirs, foreach=False, **kwargs)
    with backends.use(backend):
        run_steps(opt, ours, 20)
        assert backends.last_dispatch().backend == backend
    run_steps(ref, theirs, 20)
    assert_same(ours, theirs, dtype)
    assert_same_state(opt, ref, dtype)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "cuda", "triton")])
@pytest.mark.parametrize("name,kwargs", [c for c in CONFIGS if c[0] in ("Adam", "SGD")][:5])
def test_float32_and_float64_params_in_one_group(backend, name, kwargs):
    """Two buckets (float32 and float64) in one group: each runs its own kernel call."""
    device = DEVICE[backend]
    dtypes = [torch.float32, torch.float64] if backend != "triton" else [torch.float32, torch.float32]
    mk = lambda: [torch.randn(s, dtype=dt, generator=torch.Generator().manual_seed(i)).to(device).requires_grad_()
                  for i, (s, dt) in enumerate(zip([(5,), (300,), (17, 3)], dtypes + dtypes[:1]))]
    ours, theirs = mk(), mk()
    opt = getattr(po, name)(ours, **kwargs)
    ref = getattr(torch.optim, name)(theirs, foreach=False, **kwargs)
    with backends.use(backend):
        run_steps(opt, ours, 5)
    run_steps(ref, theirs, 5)
    assert_same(ours, theirs, torch.float32)


@pytest.mark.parametrize("name,kwargs", CONFIGS[1:3] + CONFIGS[5:6] + CONFIGS[8:9] + CONFIGS[10:11] + CONFIGS[14:15]
                         + CONFIGS[16:17], ids=lambda x: x if isinstance(x, str) else "")
def test_state_dict_round_trip_both_ways(name, kwargs):
    """5 steps in one library, the checkpoint loaded into the other, 5 more steps: the same as 10
    steps of torch alone."""
    dtype = torch.float64
    base = make_params(dtype, "cpu")
    alone = [p.clone().requires_grad_() for p in base]
    opt_alone = getattr(torch.optim, name)(alone, foreach=False, **kwargs)
    run_steps(opt_alone, alone, 10)
    for first, second in ((torch.optim, po), (po, torch.optim)):
        params = [p.clone().requires_grad_() for p in base]
        a = getattr(first, name)(params, **kwargs)
        run_steps(a, params, 5)
        ckpt = copy.deepcopy(a.state_dict())
        b = getattr(second, name)(params, **kwargs)
        b.load_state_dict(ckpt)
        run_steps(b, params, 5, start=5)
        assert_same(params, alone, dtype)
        assert_same_state(b, opt_alone, dtype)


GRADSCALER = [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01, weight_decay=0.1)),
              ("AdamW", dict(lr=0.01, amsgrad=True)), ("Adagrad", dict(lr=0.1)),
              ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)), ("Adadelta", dict(weight_decay=0.1))]


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "cuda", "triton", "reference")])
@pytest.mark.parametrize("name,kwargs", GRADSCALER, ids=[n for n, _ in GRADSCALER])
def test_grad_scaler_unscales_in_kernel_and_skips_inf_steps(backend, name, kwargs):
    device = DEVICE[backend]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 1)).to(device)
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 7, device=device), torch.randn(32, 1, device=device)
    opt = getattr(po, name)(model.parameters(), **kwargs)
    ref = getattr(torch.optim, name)(twin.parameters(), foreach=False, **kwargs)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0, growth_interval=1)
    with backends.use(backend):
        for it in range(4):
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            if it == 2:  # an overflow: the step must be skipped, nothing written
                next(model.parameters()).grad[0, 0] = float("inf")
                before = copy.deepcopy((list(model.parameters()), opt.state_dict()))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            if it == 2:
                for a, b in zip(model.parameters(), before[0]):
                    assert torch.equal(a, b)
                after = opt.state_dict()["state"]
                for k, st in before[1]["state"].items():
                    for key, v in st.items():
                        assert torch.equal(after[k][key], v), key
                continue
            ref_loss = torch.nn.functional.mse_loss(twin(x), y)
            ref_loss.backward()
            ref.step()
            ref.zero_grad()
        assert backends.last_dispatch().backend == backend
    # the scale is a power of two, so unscaling is exact: the same trajectory as without a scaler
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_bad_hyper_parameters_raise_as_torch_does():
    p = [torch.zeros(3, requires_grad=True)]
    cases = [("SGD", dict(lr=-0.1)), ("SGD", dict(lr=0.1, momentum=-1)), ("SGD", dict(lr=0.1, nesterov=True)),
             ("Adam", dict(lr=-1)), ("Adam", dict(betas=(1.0, 0.9))), ("Adam", dict(betas=(0.9, -0.1))),
             ("Adam", dict(eps=-1e-8)), ("AdamW", dict(weight_decay=-1)), ("Adagrad", dict(lr_decay=-1)),
             ("Adagrad", dict(initial_accumulator_value=-1)), ("RMSprop", dict(alpha=-1)),
             ("RMSprop", dict(momentum=-1)), ("Adadelta", dict(rho=1.5)), ("Adadelta", dict(eps=-1))]
    for name, kw in cases:
        with pytest.raises(ValueError) as theirs:
            getattr(torch.optim, name)(p, **kw)
        with pytest.raises(ValueError) as ours:
            getattr(po, name)(p, **kw)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="differentiable"):
        po.Adam(p, differentiable=True)


def test_state_of_wrong_dtype_or_shape_raises_before_anything_is_written():
    params = [torch.randn(5, requires_grad=True), torch.randn(3, 2, requires_grad=True)]
    opt = po.Adam(params, lr=0.1)
    run_steps(opt, params, 2)
    for corrupt in (lambda s: s.double(), lambda s: s[:-1].clone() if s.dim() == 1 else s.t().clone().view(2, 3)):
        snapshot = copy.deepcopy((params, opt.state_dict()))
        opt.state[params[1]]["exp_avg_sq"] = corrupt(opt.state[params[1]]["exp_avg_sq"])
        for p, g in zip(params, grads_for(7, params)):
            p.grad = g
        with pytest.raises(RuntimeError, match="exp_avg_sqs\\[1\\]"):
            opt.step()
        for a, b in zip(params, snapshot[0]):
            assert torch.equal(a, b)
        assert float(opt.state[params[0]]["step"]) == 2
        assert torch.equal(opt.state[params[0]]["exp_avg"], snapshot[1]["state"][0]["exp_avg"])
        opt.state[params[1]]["exp_avg_sq"] = snapshot[1]["state"][1]["exp_avg_sq"]


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = po.Adam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_params_without_grad_are_skipped_and_zero_grad_sets_none():
    a, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    opt = po.Adam([a, b], lr=0.1)
    b0 = b.detach().clone()
    a.grad = torch.ones(4)
    opt.step()
    assert torch.equal(b, b0) and b not in opt.state and float(opt.state[a]["step"]) == 1
    opt.zero_grad(set_to_none=True)
    assert a.grad is None


def test_param_groups_add_param_group_tensor_lr_and_schedulers():
    """Per-group hyper-parameters, a group added later, a 0-dim tensor lr, an LR scheduler."""
    def build(lib):
        torch.manual_seed(0)
        w1, w2, w3 = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in [(6,), (4, 4), (9,)])
        opt = lib.AdamW([{"params": [w1]}, {"params": [w2], "lr": 0.05, "weight_decay": 0.0}],
                        lr=torch.tensor(0.01), weight_decay=0.1)
        opt.add_param_group({"params": [w3], "betas": (0.5, 0.9)})
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return [w1, w2, w3], opt, sched
    (ours, opt, sched), (theirs, ref, ref_sched) = build(po), build(torch.optim)
    assert isinstance(opt, torch.optim.AdamW)
    for s in range(6):
        for params, o, sc in ((ours, opt, sched), (theirs, ref, ref_sched)):
            for p, g in zip(params, grads_for(s, params)):
                p.grad = g
            o.step()
            sc.step()
    # torch computes lr / bias_correction in the lr tensor's float32; pyfastdl in float64
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_strided_params_and_state():
    """A transposed (non-contiguous) param and channels_last conv weights: state follows the
    param's strides (zeros_like preserve_format); a gradient with other strides is read as is."""
    def build():
        g = torch.Generator().manual_seed(3)
        w = torch.randn(6, 4, dtype=torch.float64, generator=g).t().requires_grad_()
        c = torch.randn(8, 3, 5, 5, dtype=torch.float64, generator=g).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        v = torch.randn(20, dtype=torch.float64, generator=g)[::2].requires_grad_()  # not dense
        return [w, c, v]
    ours, theirs = build(), build()
    opt, ref = po.RMSprop(ours, lr=0.01, momentum=0.9, centered=True), torch.optim.RMSprop(theirs, lr=0.01, momentum=0.9,
                                                                                            centered=True, foreach=False)
    for s in range(4):
        for params in (ours, theirs):
            for p, g in zip(params, grads_for(s, params)):
                p.grad = g.contiguous()  # contiguous grads: other strides than w's and c's
        opt.step()
        ref.step()
    assert_same(ours, theirs, torch.float64)
    assert ours[1].is_contiguous(memory_format=torch.channels_last)


def test_strict_mode_refuses_a_dtype_the_kernel_does_not_cover(monkeypatch):
    p = torch.randn(8, dtype=torch.bfloat16, requires_grad=True)
    p.grad = torch.randn(8, dtype=torch.bfloat16)
    opt = po.Adam([p])
    with pytest.raises(backends.BackendError, match="bfloat16"):
        opt.step()
    monkeypatch.setitem(backends._config, "strict", False)
    opt.step()  # visible fallback to the reference rules
    d = backends.last_dispatch()
    assert d.backend == "reference" and "bfloat16" in d.fallback


# ---- step inside backward -----------------------------------------------------------------------------

def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, 3)).to(dtype)


@pytest.mark.parametrize("name,kwargs", [("Adam", dict(lr=0.01, weight_decay=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)),
                                         ("RMSprop", dict(lr=0.01, centered=True)), ("Adagrad", dict(lr=0.1))],
                         ids=["Adam", "SGD", "RMSprop", "Adagrad"])
@pytest.mark.parametrize("bucket_bytes", [0, 4096, 1 << 40], ids=["each-param", "4KB-buckets", "all-at-end"])
def test_step_in_backward_matches_the_plain_step(name, kwargs, bucket_bytes):
    a, b = _mlp(), _mlp()
    x, y = torch.randn(16, 10, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    opt_a = getattr(po, name)(a.parameters(), **kwargs)
    opt_b = getattr(po, name)(b.parameters(), **kwargs)
    with po.step_in_backward(opt_a, bucket_bytes=bucket_bytes):
        for _ in range(5):
            torch.nn.functional.mse_loss(a(x), y).backward()
            assert all(p.grad is None for p in a.parameters())  # freed right after each update
            assert backends.last_dispatch().backend == "cpu"
        with pytest.raises(RuntimeError, match="inside backward"):
            opt_a.step()
    for _ in range(5):
        torch.nn.functional.mse_loss(b(x), y).backward()
        opt_b.step()
        opt_b.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-13)
    # after remove(): the ordinary step again
    torch.nn.functional.mse_loss(a(x), y).backward()
    opt_a.step()
    assert all(p.grad is not None for p in a.parameters())


def test_step_in_backward_refuses_grad_scaler_and_torch_optimizers():
    m = _mlp(dtype=torch.float32)
    with pytest.raises(TypeError, match="pyfastdl.optim"):
        po.step_in_backward(torch.optim.Adam(m.parameters()))
    opt = po.Adam(m.parameters())
    scaler = torch.amp.GradScaler("cpu")
    with po.step_in_backward(opt):
        scaler.scale(m(torch.randn(4, 10)).sum()).backward()
        with pytest.raises(RuntimeError, match="inside backward"):
            scaler.step(opt)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cuda", "triton")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("master", [False, True], ids=["no-master", "master"])
def test_low_precision_params_keep_float32_state(backend, dtype, master):
    """float16/bfloat16 params: float32 state. With master_weights the update runs on a float32 copy
    (the same trajectory as float32 Adam fed the same rounded gradients) and the param is its
    rounding; without, the param is rounded at every step (a few roundings off after 5 steps)."""
    device = DEVICE[backend]
    low = [p.to(dtype).requires_grad_() for p in make_params(torch.float32, device)]
    full = [p.detach().float().requires_grad_() for p in low]  # the same starting values
    kwargs = dict(lr=0.01, weight_decay=0.1 if master else 0.0)
    ours = po.Adam(low, master_weights=master, **kwargs)
    ref = torch.optim.Adam(full, foreach=False, **kwargs)
    with backends.use(backend):
        for s in range(5):
            for p, q, g in zip(low, full, grads_for(s, full)):
                p.grad = g.to(dtype)
                q.grad = p.grad.float()
            ours.step()
            ref.step()
        assert backends.last_dispatch().backend == backend
    eps = torch.finfo(dtype).eps
    for p, q in zip(low, full):
        state = ours.state[p]
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
        if master:
            torch.testing.assert_close(state["master_param"], q.detach(), rtol=1e-5, atol=1e-6)
            assert torch.equal(p, state["master_param"].to(dtype))
        else:
            torch.testing.assert_close(p.float(), q.detach(), rtol=6 * eps, atol=6 * eps)


def test_several_kernel_calls_check_every_state_before_the_first_writes():
    """One group with float32 and float64 params is two kernel calls; a bad state tensor in the second
    must raise before the first call has updated anything."""
    a, b = torch.randn(6, requires_grad=True), torch.randn(4, dtype=torch.float64, requires_grad=True)
    opt = po.Adam([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(6), torch.ones(4, dtype=torch.float64)
    opt.step()
    opt.state[b]["exp_avg"] = opt.state[b]["exp_avg"].float()
    a0 = a.detach().clone()
    with pytest.raises(RuntimeError, match="does not match its param"):
        opt.step()
    assert torch.equal(a, a0) and float(opt.state[a]["step"]) == 1


# ---- opcheck: schema, mutations, fake implementations, autograd registration, AOT dispatch -----------

def _opcheck_calls(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    P = [torch.randn(s, generator=g, dtype=dtype) for s in [(3,), (), (2, 5)]]
    G = [torch.randn(p.shape, generator=g, dtype=dtype) for p in P]
    z = lambda: [torch.rand(p.shape, generator=g, dtype=dtype) for p in P]  # noqa: E731
    steps = lambda: [torch.tensor(2.0) for _ in P]  # noqa: E731
    gs, fi = torch.full((1,), 4.0), torch.zeros(1)
    return [
        ("sgd_step_", (P, G, z(), 1e-2, 0.9, 0.1, 0.01, True, False, False, gs, fi)),
        ("sgd_step_", (P, G, [], 1e-2, 0.0, 0.0, 0.0, False, True, False, None, None)),
        ("adam_step_", (P, G, z(), z(), z(), steps(), [], 1e-2, 0.9, 0.999, 0.1, 1e-8, True, False, True, gs, fi)),
        ("adam_step_", (P, G, z(), z(), [], steps(), [], 1e-2, 0.9, 0.999, 0.1, 1e-8, False, True, False, None,
                        None)),
        ("adagrad_step_", (P, G, z(), steps(), 1e-2, 0.1, 0.1, 1e-10, False, gs, None)),
        ("rmsprop_step_", (P, G, z(), z(), z(), steps(), 1e-2, 0.99, 1e-8, 0.1, 0.5, True, False, None, fi)),
        ("rmsprop_step_", (P, G, z(), [], [], steps(), 1e-2, 0.99, 1e-8, 0.0, 0.0, False, True, None, None)),
        ("adadelta_step_", (P, G, z(), z(), steps(), 1.0, 0.9, 1e-6, 0.1, True, gs, fi)),
    ]


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "triton")])
@pytest.mark.parametrize("i", range(8))
def test_opcheck_every_optimizer_op(backend, i):
    """torch.library.opcheck with all its checks (schema and declared mutations, fake tensors, autograd
    registration, AOT dispatch with dynamic shapes) on each op of the CPU library and of the Triton
    library (under the interpreter without a GPU)."""
    name, args = _opcheck_calls()[i]
    op = getattr(backends.ops(backend, "optim"), name)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=MARKS[b]) for b in ("cpu", "triton")])
def test_fake_implementations_check_the_lists(backend):
    """The ops return nothing, so torch would trace them with a trivial fake; pyfastdl's fake (one per
    op, shared by the C++ and the Triton op) runs the launchers' checks, so a bad call fails while
    tracing (torch.compile, FakeTensorMode), naming the argument, as it fails eagerly."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = backends.ops(backend, "optim")
    with FakeTensorMode() as mode:
        P = [mode.from_tensor(torch.zeros(3)), mode.from_tensor(torch.zeros(2))]
        bad = [mode.from_tensor(torch.zeros(3)), mode.from_tensor(torch.zeros(4))]
        steps = [mode.from_tensor(torch.zeros(())) for _ in P]
        with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[1\] has shape"):
            ops.adam_step_(P, P, P, bad, [], steps, [], 1e-3, 0.9, 0.999, 0.0, 1e-8, False, False, False, None,
                           None)
        with pytest.raises(RuntimeError, match="momentum_buffers"):
            ops.sgd_step_(P, P, [], 0.1, 0.9, 0.0, 0.0, False, False, False, None, None)
