"""pyfastdl.nn.SyncBatchNorm (issue 13, item 3): the two ops it adds (sync_batch_norm_stats,
sync_batch_norm_bwd_elemt) against float64 references and opcheck, the module without a process group
against torch's SyncBatchNorm (which is batch norm there), bad input, and two gloo processes on this CPU.

The 2-process oracle: torch's own SyncBatchNorm refuses CPU tensors inside a process group (ValueError,
it needs a GPU; pinned below), so the reference is what SyncBatchNorm is defined to compute -- torch's
BatchNorm over the whole group's batch (the ranks' batches concatenated) in one process, with the loss
averaged over the ranks as DDP averages the gradients. One spawn runs every scenario in both ranks
(uneven per-rank batch sizes, channels_last, momentum=None, float32 and float64, an empty batch on one
rank, eval mode without collectives, the model converted from torch.nn.SyncBatchNorm), saves what each
rank ends with, and the tests compare.
"""
import functools

import pytest
import torch
import torch.distributed as dist

import pyfastdl
from pyfastdl import backends
from pyfastdl.autograd.sync_batch_norm import sync_batch_norm
from helpers import DEVICE, MARKS, TRITON_DEVICE, assert_no_exception, assert_rel, params, run_in_ranks

WORLD = 2
STEPS = 3
# per-rank batch sizes of each step: uneven on purpose (and a rank with 1 sample at the last step)
SIZES = [(5, 3), (2, 6), (4, 1)]


# ---- the ops ---------------------------------------------------------------------------------------

def _layouts():
    torch.manual_seed(0)
    yield "2d", torch.randn(17, 5)
    yield "ncl", torch.randn(3, 4, 7)
    yield "nchw", torch.randn(2, 3, 5, 4)
    yield "channels_last", torch.randn(3, 6, 4, 5).to(memory_format=torch.channels_last)
    yield "strided", torch.randn(4, 5, 6)[:, :, ::2]
    yield "5d", torch.randn(2, 3, 2, 3, 2)


def _stats64(x):
    dims = [0] + list(range(2, x.dim()))
    x = x.double()
    mean = x.mean(dims)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return mean, ((x - mean.view(shape)) ** 2).sum(dims)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,x", list(_layouts()), ids=[n for n, _ in _layouts()])
def test_stats_op_matches_float64(name, x, dtype):
    x = x.to(dtype)
    mean, m2 = torch.ops.pyfastdl.sync_batch_norm_stats(x)
    assert mean.dtype == m2.dtype == torch.float64 and mean.shape == (x.shape[1],)
    ref_mean, ref_m2 = _stats64(x)
    assert_rel(mean, ref_mean, torch.float64)
    assert_rel(m2, ref_m2, torch.float64)


def test_stats_op_keeps_a_small_spread_under_a_large_mean():
    """mean 1e4, std 1e-2 in float32: M2 from the two-pass float64 sums is exact to float64 rounding
    of the float32 data (torch's float32 var loses it to cancellation at this ratio in E[x^2]-E[x]^2)."""
    torch.manual_seed(1)
    x = (1e4 + 1e-2 * torch.randn(64, 3, 33)).float()
    mean, m2 = torch.ops.pyfastdl.sync_batch_norm_stats(x)
    ref_mean, ref_m2 = _stats64(x)
    assert_rel(m2, ref_m2, torch.float64)
    assert_rel(mean, ref_mean, torch.float64)


def test_stats_op_does_not_depend_on_threads():
    x = torch.randn(300, 7, 3).to(memory_format=torch.contiguous_format)
    xc = torch.randn(8, 5, 9, 9).to(memory_format=torch.channels_last)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = [torch.ops.pyfastdl.sync_batch_norm_stats(t) for t in (x, xc)]
        torch.set_num_threads(2)
        b = [torch.ops.pyfastdl.sync_batch_norm_stats(t) for t in (x, xc)]
    finally:
        torch.set_num_threads(n)
    for (m1, q1), (m2, q2) in zip(a, b):
        assert torch.equal(m1, m2) and torch.equal(q1, q2)


def _elemt_args(x, weight=True, count_factor=3):
    C = x.shape[1]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = torch.randn_like(x)
    w = torch.randn(C, dtype=x.dtype) if weight else None
    mean = torch.randn(C, dtype=acc)
    invstd = torch.rand(C, dtype=acc) + 0.5
    sum_dy, sum_dy_xhat = torch.randn(C, dtype=acc), torch.randn(C, dtype=acc)
    count = count_factor * (x.numel() // C)
    return g, x, w, mean, invstd, sum_dy, sum_dy_xhat, count


def _elemt64(g, x, w, mean, invstd, sum_dy, sum_dy_xhat, count):
    shape = [1, -1] + [1] * (x.dim() - 2)
    d = lambda t: t.double().view(shape)  # noqa: E731
    a = (d(w) if w is not None else 1.0) * d(invstd)
    xhat = (x.double() - d(mean)) * d(invstd)
    return a * (g.double() - d(sum_dy) / count - xhat * d(sum_dy_xhat) / count)


@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,x", list(_layouts()), ids=[n for n, _ in _layouts()])
def test_bwd_elemt_op_matches_float64(name, x, dtype, weight):
    args = _elemt_args(x.to(dtype), weight)
    out = torch.ops.pyfastdl.sync_batch_norm_bwd_elemt(*args)
    assert out.shape == x.shape and out.dtype == dtype
    if name == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_rel(out, _elemt64(*args), dtype)


def test_opcheck():
    for _, x in _layouts():
        torch.library.opcheck(torch.ops.pyfastdl.sync_batch_norm_stats.default, (x,))
        torch.library.opcheck(torch.ops.pyfastdl.sync_batch_norm_bwd_elemt.default, _elemt_args(x))
        torch.library.opcheck(torch.ops.pyfastdl.sync_batch_norm_bwd_elemt.default, _elemt_args(x, weight=False))


def test_ops_on_empty_input():
    x = torch.randn(0, 3, 4)
    mean, m2 = torch.ops.pyfastdl.sync_batch_norm_stats(x)
    assert torch.equal(mean, torch.zeros(3, dtype=torch.float64)) and torch.equal(m2, mean)
    args = list(_elemt_args(x))
    args[-1] = 5
    assert torch.ops.pyfastdl.sync_batch_norm_bwd_elemt(*args).shape == x.shape


@pytest.mark.parametrize("case,match", [
    ("rank1", "rank >= 2"),
    ("int", "dtype"),
    ("grad_shape", "grad_out of shape"),
    ("grad_dtype", "grad_out of dtype"),
    ("weight", "weight of shape"),
    ("mean", "mean of shape"),
    ("invstd_dtype", "invstd of dtype"),
    ("sum_dy", "sum_dy of shape"),
    ("count", "count"),
])
def test_ops_bad_input_names_the_argument(case, match):
    x = torch.randn(4, 3, 5)
    args = list(_elemt_args(x))
    if case == "rank1":
        with pytest.raises(RuntimeError, match=match):
            torch.ops.pyfastdl.sync_batch_norm_stats(torch.randn(5))
        args[1], args[0] = torch.randn(5), torch.randn(5)
    elif case == "int":
        with pytest.raises(RuntimeError, match=match):
            torch.ops.pyfastdl.sync_batch_norm_stats(torch.ones(4, 3, dtype=torch.int32))
        args[1] = args[0] = torch.ones(4, 3, 5, dtype=torch.int32)
    elif case == "grad_shape":
        args[0] = torch.randn(4, 3, 6)
    elif case == "grad_dtype":
        args[0] = args[0].double()
    elif case == "weight":
        args[2] = torch.randn(4)
    elif case == "mean":
        args[3] = torch.randn(4)
    elif case == "invstd_dtype":
        args[4] = args[4].double()
    elif case == "sum_dy":
        args[5] = torch.randn(2)
    elif case == "count":
        args[7] = 19  # fewer than this rank's 20 elements per channel
    exc = ValueError if case == "count" else RuntimeError
    with pytest.raises(exc, match=match):
        torch.ops.pyfastdl.sync_batch_norm_bwd_elemt(*args)


# ---- the module without a process group: batch norm, as torch's ----------------------------------

@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 7), (3, 5, 4, 4), (2, 5, 2, 3, 3)])
def test_module_without_process_group_is_torch_batch_norm(shape, momentum):
    assert not (dist.is_available() and dist.is_initialized())
    torch.manual_seed(0)
    theirs = torch.nn.SyncBatchNorm(5, momentum=momentum)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours = pyfastdl.nn.SyncBatchNorm(5, momentum=momentum)
    ours.load_state_dict(theirs.state_dict())
    for step in range(2):
        x = torch.randn(*shape) * 3 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert backends.last_dispatch().backend == "cpu"
        g = torch.randn_like(ya)
        ya.backward(g), yb.backward(g)
        assert_rel(ya, yb, torch.float32)
        assert_rel(xa.grad, xb.grad, torch.float32)
        assert_rel(ours.weight.grad, theirs.weight.grad, torch.float32)
    for k, v in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    ours.eval(), theirs.eval()
    x = torch.randn(*shape)
    assert_rel(ours(x), theirs(x), torch.float32)


def test_module_bad_input_as_torch():
    bn = pyfastdl.nn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        bn(torch.randn(3))
    with pytest.raises(ValueError, match="non-zero"):
        pyfastdl.nn.SyncBatchNorm(0)(torch.randn(2, 0))
    with pytest.raises(RuntimeError, match="weight of shape"):
        bn(torch.randn(4, 5))
    assert bn.num_batches_tracked.item() == 0  # bad input leaves the buffers untouched


def test_sync_function_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="running_mean of shape"):
        sync_batch_norm(x, torch.zeros(4), torch.ones(4), None, None, 0.1, 1e-5, None, 2)
    with pytest.raises(ValueError, match="eps"):
        sync_batch_norm(x, None, None, None, None, 0.1, 0.0, None, 2)
    with pytest.raises(RuntimeError, match="floating-point"):
        sync_batch_norm(x.long(), None, None, None, None, 0.1, 1e-5, None, 2)
    with pytest.raises(backends.BackendError, match="STRICT"):  # no bfloat16 kernel on the CPU: no fallback
        sync_batch_norm(x.bfloat16(), None, None, None, None, 0.1, 1e-5, None, 2)


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one rank in this process (the synchronized path with world_size 1)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("backend,dtype", params({"cpu": [torch.float32, torch.float64], "cuda": [torch.float32],
                                                  "triton": [torch.float32], "reference": [torch.float64]}))
@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 2, 3)])
def test_synchronized_path_on_one_rank_is_batch_norm(group_of_one, backend, dtype, shape):
    """The whole synchronized path (stats op, all_gather, combine, batch_norm_fwd in eval, its sums, the
    all_reduce, bwd_elemt) with one rank: torch's batch norm, on every backend."""
    device = DEVICE[backend]
    torch.manual_seed(0)
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 2).to(device, dtype)
    w = torch.rand(3, dtype=dtype, device=device) + 0.5
    b = torch.randn(3, dtype=dtype, device=device)
    rm, rv = torch.zeros(3, dtype=dtype, device=device), torch.ones(3, dtype=dtype, device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    xa, wa, ba = (t.clone().requires_grad_() for t in (x, w, b))
    xb, wb, bb = (t.clone().requires_grad_() for t in (x, w, b))
    with backends.use(backend):
        ya = sync_batch_norm(xa, rm, rv, wa, ba, 0.1, 1e-5, group_of_one, 1)
        assert backends.last_dispatch().op == "nn.SyncBatchNorm" and backends.last_dispatch().backend == backend
        g = torch.randn_like(ya)
        ya.backward(g)
    yb = torch.nn.functional.batch_norm(xb, rm2, rv2, wb, bb, True, 0.1, 1e-5)
    yb.backward(g)
    for ours, theirs in ((ya, yb), (xa.grad, xb.grad), (wa.grad, wb.grad), (ba.grad, bb.grad), (rm, rm2), (rv, rv2)):
        assert_rel(ours, theirs, dtype)


@pytest.mark.parametrize("name,x", [pytest.param(n, x, marks=MARKS["triton"]) for n, x in _layouts()],
                         ids=[n for n, _ in _layouts()])
def test_triton_ops_match_float64(name, x, monkeypatch):
    from pyfastdl.triton_kernels import sync_batch_norm as tk
    monkeypatch.setattr(tk, "_BLOCK", 16)  # several tiles per channel on these tiny inputs
    x = x.to(TRITON_DEVICE)
    mean, m2 = torch.ops.pyfastdl_triton.sync_batch_norm_stats(x)
    ref_mean, ref_m2 = _stats64(x.cpu())
    assert_rel(mean, ref_mean, torch.float64)
    assert_rel(m2, ref_m2, torch.float64)
    for weight in (True, False):
        args = _elemt_args(x.cpu(), weight)
        dev_args = [a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
        out = torch.ops.pyfastdl_triton.sync_batch_norm_bwd_elemt(*dev_args)
        assert out.shape == x.shape
        assert_rel(out, _elemt64(*args), torch.float32)
    torch.library.opcheck(torch.ops.pyfastdl_triton.sync_batch_norm_stats.default, (x,))
    torch.library.opcheck(torch.ops.pyfastdl_triton.sync_batch_norm_bwd_elemt.default, dev_args)


@pytest.mark.parametrize("case", [pytest.param("count", marks=MARKS["triton"]),
                                  pytest.param("mean", marks=MARKS["triton"])])
def test_triton_ops_bad_input(case):
    import pyfastdl.triton_kernels.sync_batch_norm  # noqa: F401  (registers the ops)
    args = [a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a for a in _elemt_args(torch.randn(4, 3, 5))]
    if case == "count":
        args[7] = 3
        with pytest.raises(ValueError, match="count"):
            torch.ops.pyfastdl_triton.sync_batch_norm_bwd_elemt(*args)
    else:
        args[3] = args[3][:2]
        with pytest.raises(RuntimeError, match="mean of shape"):
            torch.ops.pyfastdl_triton.sync_batch_norm_bwd_elemt(*args)


def test_convert_sync_batchnorm_classmethod():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.BatchNorm1d(4 * 4 * 4))
    model[1].eval()
    weight = model[1].weight
    out = pyfastdl.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(out[1]) is pyfastdl.nn.SyncBatchNorm and type(out[4]) is pyfastdl.nn.SyncBatchNorm
    assert out[1].weight is weight and out[1].running_mean is model[1].running_mean
    assert not out[1].training and out[4].training
    bare = pyfastdl.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3))
    assert type(bare) is pyfastdl.nn.SyncBatchNorm


# ---- two gloo processes -------------------------------------------------------------------------------

class _Net(torch.nn.Module):
    """conv -> BN2d -> ReLU -> flatten -> linear -> BN1d (momentum=None) -> ReLU -> linear, the batch
    norms from ``bn`` (a class: torch.nn.SyncBatchNorm, pyfastdl.nn.SyncBatchNorm, or torch's
    BatchNorm2d/1d for the single-process reference). No bias before a batch norm."""

    def __init__(self, bn2, bn1):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn2 = bn2(6)
        self.fc1 = torch.nn.Linear(6 * 4 * 4, 10, bias=False)
        self.bn1 = bn1(10, momentum=None)
        self.fc2 = torch.nn.Linear(10, 3)

    def forward(self, x):
        h = torch.relu(self.bn2(self.conv(x)))
        return self.fc2(torch.relu(self.bn1(self.fc1(h.flatten(1)))))


def _net(kind, dtype):
    torch.manual_seed(0)
    if kind == "reference":
        net = _Net(torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)
    else:
        net = _Net(torch.nn.SyncBatchNorm, torch.nn.SyncBatchNorm)
    with torch.no_grad():
        for bn in (net.bn2, net.bn1):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.to(dtype)


def _batch(rank, step, dtype):
    n = SIZES[step][rank]
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 0.5
    y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def _ddp_train(rank, out, dtype, channels_last):
    from torch.nn.parallel import DistributedDataParallel as DDP
    net = pyfastdl.convert(_net("sync", dtype))  # torch.nn.SyncBatchNorm -> pyfastdl.nn.SyncBatchNorm
    assert type(net.bn2) is pyfastdl.nn.SyncBatchNorm
    model = DDP(net)
    opt = pyfastdl.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    key = f"ddp/{dtype}/{channels_last}"
    outs, losses = [], []
    for s in range(STEPS):
        x, y = _batch(rank, s, dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        pred = model(x)
        loss = torch.nn.functional.mse_loss(pred, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        outs.append(pred.detach().clone())
        losses.append(loss.detach().clone())
    out[f"{key}/outs"], out[f"{key}/losses"] = outs, losses
    out[f"{key}/state"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x, _ = _batch(rank, 0, dtype)
    net.bn2(net.conv(x))
    out[f"{key}/dispatch"] = (backends.last_dispatch().op, backends.last_dispatch().backend)


def _empty_rank(rank, out):
    """rank 1 has an empty batch: it joins every collective with count 0; rank 0's result is batch norm
    of its own batch."""
    bn = pyfastdl.nn.SyncBatchNorm(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 1.0]))
    g = torch.Generator().manual_seed(7)
    x0, w0 = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    x = (x0 if rank == 0 else torch.randn(0, 3, 2, 2)).requires_grad_()
    y = bn(x)
    (y * (w0 if rank == 0 else torch.zeros(0, 3, 2, 2))).sum().backward()
    out["empty/y"], out["empty/grad"] = y.detach(), x.grad
    out["empty/wgrad"], out["empty/bgrad"] = bn.weight.grad, bn.bias.grad
    out["empty/state"] = {k: v.clone() for k, v in bn.state_dict().items()}


def _eval_without_collectives(rank, out):
    """eval mode inside the process group: no synchronization (only rank 0 calls it: a collective
    would hang), the running statistics normalize, as torch's."""
    if rank == 0:
        bn = pyfastdl.nn.SyncBatchNorm(3).eval()
        with torch.no_grad():
            bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
        x = torch.randn(5, 3, 4)
        ref = torch.nn.BatchNorm1d(3).eval()
        ref.load_state_dict(bn.state_dict())
        out["eval/ours"], out["eval/torch"] = bn(x), ref(x)


def _torch_refuses_cpu(rank, out):
    try:
        torch.nn.SyncBatchNorm(3)(torch.randn(4, 3))
        out["torch_cpu/error"] = None
    except ValueError as e:
        out["torch_cpu/error"] = str(e)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    scenarios = [("ddp32", functools.partial(_ddp_train, dtype=torch.float32, channels_last=False)),
                 ("ddp32cl", functools.partial(_ddp_train, dtype=torch.float32, channels_last=True)),
                 ("ddp64", functools.partial(_ddp_train, dtype=torch.float64, channels_last=False)),
                 ("empty", _empty_rank), ("eval", _eval_without_collectives), ("torch_cpu", _torch_refuses_cpu)]
    return run_in_ranks(str(tmp_path_factory.mktemp("syncbn")), WORLD, scenarios)


_no_exception = assert_no_exception


def _reference_run(dtype):
    """torch's BatchNorm on the concatenated batches, loss = the mean of the ranks' losses (DDP averages
    the gradients), torch's SGD: what SyncBatchNorm under DDP computes."""
    net = _net("reference", dtype)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, foreach=False)
    outs, losses = [], []
    for s in range(STEPS):
        xs, ys = zip(*(_batch(r, s, dtype) for r in range(WORLD)))
        pred = net(torch.cat(xs))
        parts = pred.split([x.shape[0] for x in xs])
        rank_losses = [torch.nn.functional.mse_loss(p, y) for p, y in zip(parts, ys)]
        (sum(rank_losses) / WORLD).backward()
        opt.step()
        opt.zero_grad()
        outs.append([p.detach() for p in parts])
        losses.append([loss.detach() for loss in rank_losses])
    return outs, losses, net.state_dict()


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                 (torch.float64, False)], ids=["float32", "float32-cl", "float64"])
def test_ddp_sync_batch_norm_matches_batch_norm_on_the_global_batch(ranks, dtype, channels_last):
    _no_exception(ranks, {(torch.float32, False): "ddp32", (torch.float32, True): "ddp32cl",
                          (torch.float64, False): "ddp64"}[(dtype, channels_last)])
    key = f"ddp/{dtype}/{channels_last}"
    ref_outs, ref_losses, ref_state = _reference_run(dtype)
    # float32: the two runs round differently (torch's BN vs ours, 3 SGD steps): a few ulps, amplified
    # by the steps; float64: the same math to float64 rounding
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for r, out in enumerate(ranks):
        assert out[f"{key}/dispatch"] == ("nn.SyncBatchNorm", "cpu")  # strict: pyfastdl's kernels ran
        for s in range(STEPS):
            torch.testing.assert_close(out[f"{key}/outs"][s], ref_outs[s][r], **tol)
            torch.testing.assert_close(out[f"{key}/losses"][s], ref_losses[s][r], **tol)
        state = out[f"{key}/state"]
        assert state.keys() == ref_state.keys()
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, **tol, msg=lambda m: f"{k}: {m}")
    # SyncBatchNorm: the running statistics agree across ranks too (the group's statistics)
    for k, v in ranks[0][f"{key}/state"].items():
        assert torch.equal(v, ranks[1][f"{key}/state"][k]), k


def test_a_rank_with_an_empty_batch(ranks):
    _no_exception(ranks, "empty")
    g = torch.Generator().manual_seed(7)
    x0, w0 = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    ref = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.5, 0.5, 1.0]))
    x = x0.clone().requires_grad_()
    y = ref(x)
    (y * w0).sum().backward()
    out0, out1 = ranks
    assert_rel(out0["empty/y"], y, torch.float32)
    assert_rel(out0["empty/grad"], x.grad, torch.float32)
    assert_rel(out0["empty/wgrad"], ref.weight.grad, torch.float32)
    assert_rel(out0["empty/bgrad"], ref.bias.grad, torch.float32)
    assert out1["empty/y"].shape == (0, 3, 2, 2) and out1["empty/grad"].shape == (0, 3, 2, 2)
    assert torch.equal(out1["empty/wgrad"], torch.zeros(3))
    for k, v in ref.state_dict().items():
        for out in ranks:
            torch.testing.assert_close(out["empty/state"][k], v, rtol=1e-5, atol=1e-6)


def test_eval_inside_a_process_group_runs_no_collective(ranks):
    _no_exception(ranks, "eval")
    assert_rel(ranks[0]["eval/ours"], ranks[0]["eval/torch"], torch.float32)


def test_torch_sync_batch_norm_refuses_cpu_tensors_ours_runs(ranks):
    """The documented difference: torch's SyncBatchNorm needs a GPU inside a process group."""
    _no_exception(ranks, "torch_cpu")
    assert "GPU" in ranks[0]["torch_cpu/error"]


# ---- deliberate differences from torch (docs/convert.md) ----------------------------------------------

def test_not_an_instance_of_torch_sync_batch_norm():
    """DDP refuses any torch.nn.SyncBatchNorm in a CPU module; ours is a _BatchNorm, not one."""
    bn = pyfastdl.nn.SyncBatchNorm(3)
    assert not isinstance(bn, torch.nn.SyncBatchNorm)
    assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    assert bn.state_dict().keys() == torch.nn.SyncBatchNorm(3).state_dict().keys()


def test_one_value_per_channel_over_the_group_raises(group_of_one):
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        sync_batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), None, None, 0.1, 1e-5, group_of_one, 1)


def test_double_backward_through_the_synchronized_path_raises(group_of_one):
    x = torch.randn(4, 3, requires_grad=True)
    y = sync_batch_norm(x, None, None, None, None, 0.1, 1e-5, group_of_one, 1)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
