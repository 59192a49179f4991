"""pyfastdl under torch.distributed (issue 9, item 3): two gloo processes on this CPU.

One spawn runs every scenario in both ranks, side by side with torch's own run on a twin model, and
saves what each rank ends with; the tests then compare:
- DistributedDataParallel with each pyfastdl optimizer's plain step: parameters equal across ranks
  (bitwise) and equal to torch's optimizer under DDP;
- ``step_in_backward(opt, ddp=model)`` steps each DDP bucket after its all-reduce: ranks equal and
  equal to torch's DDP run; without ``ddp=`` it is refused (it would step before the all-reduce);
- a model with pyfastdl.nn.BatchNorm1d/2d and MultiheadAttention(need_weights=False) under DDP
  against the same torch model under DDP: forward outputs, parameters and running statistics;
- FSDP2 (``fully_shard``): a pyfastdl optimizer on the sharded (DTensor) params against torch's.
"""

import pytest
import torch
import torch.distributed as dist

from helpers import assert_no_exception, run_in_ranks

WORLD = 2
OPTIMS = [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=0.01, weight_decay=0.1)),
          ("AdamW", dict(lr=0.01, amsgrad=True)), ("Adagrad", dict(lr=0.1)),
          ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)), ("Adadelta", dict(lr=1.0))]
STEPS = 3

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


class _Net(torch.nn.Module):
    """conv -> BatchNorm2d -> ReLU -> tokens -> MultiheadAttention -> mean -> Linear -> BatchNorm1d
    -> Linear, with the batch-norm and attention layers from ``lib`` (torch.nn or pyfastdl.nn). The
    layers before a batch norm have no bias (its gradient would be rounding noise)."""

    def __init__(self, lib):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn2 = lib.BatchNorm2d(8)
        self.attn = lib.MultiheadAttention(8, 2, batch_first=True)
        self.fc1 = torch.nn.Linear(8, 12, bias=False)
        self.bn1 = lib.BatchNorm1d(12)
        self.fc2 = torch.nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.bn2(self.conv(x)))          # (N, 8, 5, 5)
        t = h.flatten(2).transpose(1, 2)                 # (N, 25, 8)
        t = self.attn(t, t, t, need_weights=False)[0]
        return self.fc2(torch.relu(self.bn1(self.fc1(t.mean(1)))))


def _data(rank, step, *shape):
    g = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(*shape, generator=g)


def _ddp_optimizers(rank, out):
    import pyfastdl.optim as po
    from torch.nn.parallel import DistributedDataParallel as DDP
    for name, kw in OPTIMS:
        ours, theirs = DDP(_mlp(0)), DDP(_mlp(0))
        opt = getattr(po, name)(ours.parameters(), **kw)
        ref = getattr(torch.optim, name)(theirs.parameters(), foreach=False, **kw)
        for s in range(STEPS):
            x, y = _data(rank, s, 6, 8), _data(rank, s + 50, 6, 4)
            for model, o in ((ours, opt), (theirs, ref)):
                torch.nn.functional.mse_loss(model(x), y).backward()
                o.step()
                o.zero_grad()
        out[f"ddp/{name}/ours"] = [p.detach().clone() for p in ours.parameters()]
        out[f"ddp/{name}/torch"] = [p.detach().clone() for p in theirs.parameters()]


def _ddp_step_in_backward(rank, out):
    import pyfastdl.optim as po
    from torch.nn.parallel import DistributedDataParallel as DDP
    try:  # without the DDP module: refused
        po.step_in_backward(po.Adam(DDP(_mlp(0)).parameters()))
        out["sib/error"] = ""
    except RuntimeError as e:
        out["sib/error"] = str(e)
    for name, kw in OPTIMS:
        # small DDP buckets (several hooks, several steps per backward) and the default ones
        for cap in (0.0005, 25):
            ours, theirs = DDP(_mlp(0), bucket_cap_mb=cap), DDP(_mlp(0), bucket_cap_mb=cap)
            opt = getattr(po, name)(ours.parameters(), **kw)
            ref = getattr(torch.optim, name)(theirs.parameters(), foreach=False, **kw)
            grads_left = []
            with po.step_in_backward(opt, ddp=ours):
                for s in range(STEPS):
                    x, y = _data(rank, s, 6, 8), _data(rank, s + 50, 6, 4)
                    torch.nn.functional.mse_loss(ours(x), y).backward()
                    grads_left.append(any(p.grad is not None for p in ours.parameters()))
                    torch.nn.functional.mse_loss(theirs(x), y).backward()
                    ref.step()
                    ref.zero_grad()
            out[f"sib/{name}/{cap}/ours"] = [p.detach().clone() for p in ours.parameters()]
            out[f"sib/{name}/{cap}/torch"] = [p.detach().clone() for p in theirs.parameters()]
            out[f"sib/{name}/{cap}/grads_left"] = any(grads_left)


def _ddp_layers(rank, out):
    import pyfastdl
    import pyfastdl.optim as po
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    ref_net = _Net(torch.nn)
    net = _Net(pyfastdl.nn)
    net.load_state_dict(ref_net.state_dict())
    ours, theirs = DDP(net), DDP(ref_net)
    # SGD: some gradients here are rounding noise (the key bias of attention: softmax ignores a
    # constant per query), which Adam's normalized step would blow up to +-lr
    opt = po.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9, foreach=False)
    outs_a, outs_b = [], []
    for s in range(STEPS):
        x, y = _data(rank, s, 6, 3, 5, 5), _data(rank, s + 50, 6, 3)
        for model, o, outs in ((ours, opt, outs_a), (theirs, ref, outs_b)):
            pred = model(x)
            outs.append(pred.detach().clone())
            torch.nn.functional.mse_loss(pred, y).backward()
            o.step()
            o.zero_grad()
    out["layers/out/ours"], out["layers/out/torch"] = outs_a, outs_b
    out["layers/state/ours"] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    out["layers/state/torch"] = {k: v.detach().clone() for k, v in ref_net.state_dict().items()}
    out["layers/dispatch"] = pyfastdl.backends.last_dispatch().backend


def _fsdp2(rank, out):
    import pyfastdl.optim as po
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    models = []
    for _ in range(2):
        m = _mlp(0)
        for layer in (m[0], m[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        models.append(m)
    ours, theirs = models
    opt = po.Adam(ours.parameters(), lr=0.01, weight_decay=0.1)
    ref = torch.optim.Adam(theirs.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
    for s in range(STEPS):
        x, y = _data(rank, s, 6, 8), _data(rank, s + 50, 6, 4)
        for model, o in ((ours, opt), (theirs, ref)):
            torch.nn.functional.mse_loss(model(x), y).backward()
            o.step()
            o.zero_grad()
    out["fsdp/ours"] = [p.full_tensor().detach().clone() for p in ours.parameters()]
    out["fsdp/torch"] = [p.full_tensor().detach().clone() for p in theirs.parameters()]
    out["fsdp/state_is_dtensor"] = type(opt.state[next(iter(ours.parameters()))]["exp_avg"]).__name__


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_in_ranks(str(tmp_path_factory.mktemp("dist")), WORLD,
                        [(f.__name__, f) for f in (_ddp_optimizers, _ddp_step_in_backward, _ddp_layers, _fsdp2)])


_no_exception = assert_no_exception


def _equal_across_ranks(ranks, key):
    for a, b in zip(ranks[0][key], ranks[1][key]):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", [n for n, _ in OPTIMS])
def test_ddp_plain_step_matches_torch_and_ranks_agree(ranks, name):
    _no_exception(ranks, "_ddp_optimizers")
    _equal_across_ranks(ranks, f"ddp/{name}/ours")
    for a, b in zip(ranks[0][f"ddp/{name}/ours"], ranks[0][f"ddp/{name}/torch"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    # and the run did move the parameters away from the start
    assert not torch.equal(ranks[0][f"ddp/{name}/ours"][0], _mlp(0)[0].weight)


def test_step_in_backward_without_the_ddp_module_is_refused(ranks):
    _no_exception(ranks, "_ddp_step_in_backward")
    for out in ranks:
        assert "world_size=2" in out["sib/error"] and "all-reduce" in out["sib/error"]


@pytest.mark.parametrize("cap", [0.0005, 25], ids=["small-buckets", "one-bucket"])
@pytest.mark.parametrize("name", [n for n, _ in OPTIMS])
def test_step_in_backward_with_ddp_steps_after_the_all_reduce(ranks, name, cap):
    """step_in_backward(opt, ddp=model): each DDP bucket is stepped from its averaged gradient, so the
    ranks agree bitwise and match torch's DDP run; the gradients are freed after backward."""
    _no_exception(ranks, "_ddp_step_in_backward")
    _equal_across_ranks(ranks, f"sib/{name}/{cap}/ours")
    for a, b in zip(ranks[0][f"sib/{name}/{cap}/ours"], ranks[0][f"sib/{name}/{cap}/torch"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert not ranks[0][f"sib/{name}/{cap}/grads_left"]


def test_batch_norm_and_attention_layers_under_ddp_match_torch(ranks):
    _no_exception(ranks, "_ddp_layers")
    for out in ranks:
        assert out["layers/dispatch"] == "cpu"  # strict mode: pyfastdl's kernels ran
        for a, b in zip(out["layers/out/ours"], out["layers/out/torch"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        sa, sb = out["layers/state/ours"], out["layers/state/torch"]
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # parameters agree across ranks; running statistics do not, in torch either (each rank updates them
    # from its own batch; DDP broadcasts rank 0's at the next forward)
    for k in ranks[0]["layers/state/ours"]:
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(ranks[0]["layers/state/ours"][k], ranks[1]["layers/state/ours"][k]), k


def test_fsdp2_fully_shard_with_a_pyfastdl_optimizer_matches_torch(ranks):
    _no_exception(ranks, "_fsdp2")
    _equal_across_ranks(ranks, "fsdp/ours")
    for a, b in zip(ranks[0]["fsdp/ours"], ranks[0]["fsdp/torch"]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert ranks[0]["fsdp/state_is_dtensor"] == "DTensor"  # state sharded like the params, as torch's
