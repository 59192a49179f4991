"""conv2d on the CPU by Winograd F(4x4, 3x3) (csrc/cpu/conv2d_winograd_kernel.cpp): forced on, against
torch and a float64 reference, forward and grad_input (grad_weight stays on the direct kernel), odd
sizes, paddings 0/1/2, channel tails, both layouts, bias or not, non-finite values; the error against
float64 at the ResNet-18 3x3 sizes (bound 1e-4 normwise, the issue's; measured beside torch's own);
the automatic selection; the switch (torch.ops.pyfastdl.conv2d_cpu_algo, PYFASTDL_CONV2D_ALGO)."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pyfastdl import backends
from pyfastdl import functional as PF
from helpers import rel_err

algo = torch.ops.pyfastdl.conv2d_cpu_algo

# The bound for Winograd in float32: normwise relative error against float64 at most 1e-4.
WINOGRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


@contextlib.contextmanager
def mode(m):
    previous = algo(m)
    try:
        yield
    finally:
        algo(previous)


def last():
    return dict(kv.split("=") for kv in algo("last").split(";"))


def make(N, C, H, W, O, dtype, layout, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(O, C, 3, 3, generator=gen, dtype=torch.float64) / (9 * C) ** 0.5
    b = torch.randn(O, generator=gen, dtype=torch.float64) if bias else None
    x, w = x.to(dtype), w.to(dtype)
    b = b.to(dtype) if bias else None
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b


def run_both(x, w, b, padding, algorithm):
    """Forward and backward through pyfastdl on the CPU backend with `algorithm` forced; returns
    (y, grad_input, grad_weight, grad_bias, gy) and checks which algorithm ran."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    with mode(algorithm), backends.use("cpu"):
        y = PF.conv2d(leaves[0], leaves[1], leaves[2], padding=padding)
        assert backends.last_dispatch().backend == "cpu" and backends.last_dispatch().fallback is None
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
        y.backward(gy)
        assert last() == {"fwd": algorithm, "bwd_input": algorithm}
    return y, leaves[0].grad, leaves[1].grad, None if b is None else leaves[2].grad, gy


def references(x, w, b, padding, gy):
    """float64 and torch (same dtype) forward and gradients."""
    out = []
    for dt in (torch.float64, x.dtype):
        leaves = [t.detach().to(dt).requires_grad_() if t is not None else None for t in (x, w, b)]
        y = F.conv2d(leaves[0], leaves[1], leaves[2], padding=padding)
        y.backward(gy.to(dt))
        out.append((y, leaves[0].grad, leaves[1].grad, None if b is None else leaves[2].grad))
    return out


# (N, C_in, H, W, C_out, padding): spatial sizes 1, 2, 5, 7, 13, 14, 17 (edge tiles, a tile larger than
# the image), batch 1, paddings 0/1/2 (and asymmetric), channels that are no multiple of the vector
# width (8 floats / 4 doubles) on either side, one channel.
SHAPES = [
    (1, 3, 1, 1, 4, 1),
    (2, 5, 2, 2, 3, 1),
    (1, 7, 5, 5, 9, 0),
    (2, 9, 7, 7, 11, 1),
    (1, 13, 13, 13, 6, 2),
    (1, 16, 14, 14, 16, 1),
    (2, 17, 17, 13, 19, 0),
    (1, 1, 17, 5, 1, 2),
    (1, 37, 13, 14, 70, 1),
    (1, 11, 7, 13, 5, (1, 2)),
    (1, 20, 5, 17, 12, (2, 0)),
]


def _id(c):
    return "x".join(str(v) for v in c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_forced_winograd_matches_float64_and_torch(shape, layout, dtype):
    N, C, H, W, O, padding = shape
    for bias in (True, False):
        x, w, b = make(N, C, H, W, O, dtype, layout, bias)
        ours = run_both(x, w, b, padding, "winograd")
        ref, theirs = references(x, w, b, padding, ours[-1])
        y = ours[0]
        assert y.shape == ref[0].shape and y.dtype == dtype
        if layout == "channels_last" and C > 1 and H * W > 1 and O > 1:
            assert y.is_contiguous(memory_format=torch.channels_last)
        else:
            assert y.is_contiguous()
        assert ours[1].shape == x.shape and ours[1].is_contiguous(
            memory_format=torch.channels_last if layout == "channels_last" and C > 1 and H * W > 1 else
            torch.contiguous_format)
        for name, o, t, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), ours[:4], theirs, ref):
            if r is None:
                continue
            err, err_torch = rel_err(o, r), rel_err(t, r)
            # Winograd (output, grad_input): the bound; grad_weight/grad_bias run the direct
            # kernel: 2x torch's own error, as tests/test_conv2d.py
            bound = (WINOGRAD_TOL[dtype] if name in ("output", "grad_input")
                     else max(2 * err_torch, 1e-12 if dtype == torch.float64 else 1e-6))
            assert err <= bound, (shape, layout, bias, name, err, err_torch)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forced_winograd_equals_direct_closely(layout):
    """Forced Winograd and the direct kernel agree on the same problem (both near float64)."""
    x, w, b = make(2, 24, 13, 11, 40, torch.float32, layout)
    with mode("winograd"):
        yw = PF.conv2d(x, w, b, padding=1)
    with mode("direct"):
        yd = PF.conv2d(x, w, b, padding=1)
    assert torch.equal(torch.isfinite(yw), torch.isfinite(yd))
    assert rel_err(yw, yd) <= 2e-5


def test_forced_winograd_same_result_for_any_thread_count():
    x, w, b = make(2, 64, 14, 14, 64, torch.float32, "channels_last")
    threads = torch.get_num_threads()
    with mode("winograd"):
        out = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            try:
                out.append(PF.conv2d(x, w, b, padding=1))
            finally:
                torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nonfinite_input_propagates(value, layout):
    """A NaN or inf input pixel: every output torch makes non-finite is non-finite here too (Winograd
    mixes the 6x6 input tile, so the tiles that read the pixel may go NaN beyond torch's 3x3
    footprint); outputs of tiles that do not read it stay finite and correct."""
    x, w, b = make(1, 10, 13, 13, 12, torch.float32, layout)
    x0, x = x, x.clone()
    x[0, 3, 6, 9] = value
    with mode("winograd"):
        y = PF.conv2d(x, w, b, padding=1)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    bad_ref = ~torch.isfinite(ref)
    assert bad_ref.any() and (~torch.isfinite(y))[bad_ref].all()
    # the output tiles (4x4, from (0, 0)) whose 6x6 input window (rows 4ty - 1 .. 4ty + 4) misses the pixel
    far = torch.ones_like(ref, dtype=torch.bool)
    far[..., 4:8, 8:12] = False  # the tile reading input rows 3..8, columns 7..12
    assert torch.isfinite(y[far]).all()
    assert rel_err(y[far], ref[far]) <= WINOGRAD_TOL[torch.float32]
    # a NaN weight: its output channel is NaN everywhere (as torch's)
    w2 = w.clone()
    w2[5, 2, 1, 1] = float("nan")
    with mode("winograd"):
        y2 = PF.conv2d(x0, w2, b, padding=1)
    assert torch.isnan(y2[:, 5]).all() and torch.isfinite(y2[:, :5]).all()


# The ResNet-18 3x3 stride-1 layers (batch 2 here: the error is per output pixel; the benchmark runs
# batch 8): C, H = W.
RESNET = [(64, 56), (128, 28), (256, 14), (512, 7)]


@pytest.mark.parametrize("C,S", RESNET, ids=lambda v: str(v))
def test_error_bound_at_resnet_sizes(C, S, record_property):
    """Normwise error against float64 at most 1e-4 (the issue's bound), forward and grad_input,
    measured and recorded beside torch's own float32 error and the direct kernel's."""
    x, w, b = make(2, C, S, S, C, torch.float32, "channels_last")
    ours = run_both(x, w, b, 1, "winograd")
    direct = run_both(x, w, b, 1, "direct")
    ref, theirs = references(x, w, b, 1, ours[-1])
    for i, name in ((0, "output"), (1, "grad_input")):
        err, err_direct, err_torch = rel_err(ours[i], ref[i]), rel_err(direct[i], ref[i]), rel_err(theirs[i], ref[i])
        record_property(f"{name}_error", f"winograd {err:.2e}, direct {err_direct:.2e}, torch {err_torch:.2e}")
        assert err <= WINOGRAD_TOL[torch.float32], (name, err, err_torch)
        # and it is a Winograd error, not a broken kernel: within 30x of the direct kernel's (measured ~3-4x)
        assert err <= 30 * max(err_direct, 1e-8), (name, err, err_direct)


AUTO_WINOGRAD = [  # (N, C_in, H, W, C_out, padding): Winograd in auto mode, forward and grad_input
    (1, 64, 56, 56, 64, 1), (1, 128, 28, 28, 128, 1), (1, 256, 14, 14, 256, 1), (1, 512, 7, 7, 512, 1),
    (2, 64, 9, 11, 96, 1),
]
AUTO_DIRECT = [  # ... the direct kernel: few channels, small images, other kernels/strides
    ((1, 32, 28, 28, 64, 1), {}), ((1, 64, 28, 28, 32, 1), {}), ((1, 64, 5, 5, 64, 1), {}),
    ((1, 64, 14, 14, 64, 1), {"stride": 2}), ((1, 64, 14, 14, 64, 2), {"dilation": 2}),
    ((1, 64, 14, 14, 64, 1), {"groups": 2}), ((1, 6, 14, 14, 16, 0), {}), ((1, 3, 32, 32, 64, 1), {}),
]


@pytest.mark.parametrize("shape", AUTO_WINOGRAD, ids=_id)
def test_auto_selects_winograd(shape):
    N, C, H, W, O, padding = shape
    x, w, b = make(N, C, H, W, O, torch.float32, "channels_last")
    x.requires_grad_()
    with mode("auto"):
        y = PF.conv2d(x, w, b, padding=padding)
        assert backends.last_dispatch().backend == "cpu"
        y.sum().backward()
        assert last() == {"fwd": "winograd", "bwd_input": "winograd"}
        # float64 stays on the direct kernel in auto mode
        PF.conv2d(x.detach().double(), w.double(), b.double(), padding=padding)
        assert last()["fwd"] == "direct"


@pytest.mark.parametrize("shape,kw", AUTO_DIRECT, ids=lambda v: _id(v) if isinstance(v, tuple) else str(v))
def test_auto_keeps_direct(shape, kw):
    N, C, H, W, O, padding = shape
    g = kw.get("groups", 1)
    x, _, b = make(N, C, H, W, O, torch.float32, "contiguous")
    w = torch.randn(O, C // g, 3, 3) / (9 * C / g) ** 0.5
    x.requires_grad_()
    with mode("auto"):
        PF.conv2d(x, w, b, padding=padding, **kw).sum().backward()
        assert last() == {"fwd": "direct", "bwd_input": "direct"}


def test_forced_direct_and_padding_above_2():
    """'direct' never runs Winograd; forced Winograd runs the forward at padding 3 (any padding) but
    not grad_input (its forward would need padding -1)."""
    x, w, b = make(1, 64, 14, 14, 64, torch.float32, "channels_last")
    x.requires_grad_()
    with mode("direct"):
        PF.conv2d(x, w, b, padding=1).sum().backward()
        assert last() == {"fwd": "direct", "bwd_input": "direct"}
    with mode("winograd"):
        y = PF.conv2d(x, w, b, padding=3)
        y.sum().backward()
        assert last() == {"fwd": "winograd", "bwd_input": "direct"}
    ref = F.conv2d(x.detach().double(), w.double(), b.double(), padding=3)
    assert rel_err(y, ref) <= WINOGRAD_TOL[torch.float32]


def test_switch_values_and_bad_mode():
    with mode("winograd"):
        assert algo("") == "winograd"
        assert algo("direct") == "winograd"
        assert algo("") == "direct"
    with pytest.raises(RuntimeError, match="conv2d_cpu_algo: expected mode"):
        algo("fast")


@pytest.mark.parametrize("arch", ["default", ""])
def test_env_switch_and_default_capability(arch):
    """PYFASTDL_CONV2D_ALGO sets the mode at start; the DEFAULT (non-SIMD) build of the kernel is correct
    too (PYFASTDL_CPU_ARCH=default)."""
    code = (
        "import torch, torch.nn.functional as F, pyfastdl\n"
        "from pyfastdl import functional as PF\n"
        "assert torch.ops.pyfastdl.conv2d_cpu_algo('') == 'winograd'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(2, 13, 11, 9, generator=g); w = torch.randn(21, 13, 3, 3, generator=g) / 10\n"
        "b = torch.randn(21, generator=g)\n"
        "for xx in (x, x.contiguous(memory_format=torch.channels_last)):\n"
        "    xr = xx.clone().requires_grad_(); y = PF.conv2d(xr, w, b, padding=1); y.sum().backward()\n"
        "    assert torch.ops.pyfastdl.conv2d_cpu_algo('last') == 'fwd=winograd;bwd_input=winograd'\n"
        "    xd = x.double().requires_grad_(); r = F.conv2d(xd, w.double(), b.double(), padding=1); r.sum().backward()\n"
        "    e = ((y.double() - r).norm() / r.norm()).item(); eg = ((xr.grad.double() - xd.grad).norm() / xd.grad.norm()).item()\n"
        "    assert e < 1e-4 and eg < 1e-4, (e, eg)\n"
        "print(torch.ops.pyfastdl.build_info())\n")
    env = dict(os.environ, PYFASTDL_CONV2D_ALGO="winograd", PYFASTDL_CPU_ARCH=arch)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if arch == "default":
        assert "cpu_capability=DEFAULT" in out.stdout
