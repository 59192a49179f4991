"""The Triton conv2d ops (pyfastdl_triton::conv2d_fwd / conv2d_bwd, triton_kernels/conv2d.py)
called directly, against torch.nn.functional.conv2d in float64 (asymmetric padding applied with
F.pad first in the reference): forward, grad_input, grad_weight, grad_bias; output_mask; memory
formats; NaN propagation; argument checks; schema and fake-tensor registration (opcheck) and
schema equality with the C++ ops.

Runs under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set in conftest.py) or on a
GPU. Shapes are tiny: the interpreter runs every program in Python."""
import pytest
import torch
import torch.nn.functional as F

from helpers import DEVICE, GEMM_TOL as TOL, MARKS, assert_schema_matches_cpp, rel_err

pytestmark = MARKS["triton"]

DEV = DEVICE["triton"]


@pytest.fixture(scope="module")
def ops():
    import pyfastdl.triton_kernels.conv2d  # noqa: F401  (registers torch.ops.pyfastdl_triton)
    return torch.ops.pyfastdl_triton


@pytest.fixture(scope="module")
def module(ops):
    import pyfastdl.triton_kernels.conv2d as m
    return m


# ---- reference -----------------------------------------------------------------------------------
def reference(x, w, b, stride, padding, dilation, groups, grad_out=None):
    """float64 forward (and, given grad_out, the three gradients) through torch's conv2d on the
    zero-padded input."""
    xd = x.detach().cpu().double().requires_grad_()
    wd = w.detach().cpu().double().requires_grad_()
    bd = None if b is None else b.detach().cpu().double().requires_grad_()
    top, bottom, left, right = padding
    out = F.conv2d(F.pad(xd, (left, right, top, bottom)), wd, bd, stride=stride,
                   dilation=dilation, groups=groups)
    if grad_out is None:
        return out, None
    out.backward(grad_out.detach().cpu().double())
    return out, (xd.grad, wd.grad, None if bd is None else bd.grad)


def make(N, C_in, H, W, C_out, k, groups, dtype=torch.float64, bias=True):
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(N, C_in, H, W, dtype=dtype, device=DEV)
    w = torch.randn(C_out, C_in // groups, kh, kw, dtype=dtype, device=DEV)
    b = torch.randn(C_out, dtype=dtype, device=DEV) if bias else None
    return x, w, b


def run_case(ops, x, w, b, stride, padding, dilation, groups, tol=None, mask=(True, True, True)):
    tol = TOL[x.dtype] if tol is None else tol
    out = ops.conv2d_fwd(x, w, b, stride, padding, dilation, groups)
    go = torch.randn_like(out)
    ref, grads = reference(x, w, b, stride, padding, dilation, groups, go)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_err(out, ref) <= tol, ("out", rel_err(out, ref))
    got = ops.conv2d_bwd(go, x, w, stride, padding, dilation, groups, list(mask))
    for name, g, t, r, want in zip(("grad_input", "grad_weight", "grad_bias"), got, (x, w, b),
                                   grads, mask):
        if not want:
            assert g is None, name
            continue
        if t is None:  # grad_bias of a bias-free forward: sum of grad_out
            r = go.detach().cpu().double().sum((0, 2, 3))
        assert g.shape == (t.shape if t is not None else (w.shape[0],)) and g.dtype == x.dtype, name
        assert rel_err(g, r) <= tol, (name, rel_err(g, r))
    return out, got


# (N, C_in, H, W, C_out, kernel, stride, padding (top, bottom, left, right), dilation, groups)
CASES = {
    "k1": (2, 4, 5, 7, 6, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "k1-s2": (1, 3, 7, 6, 5, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1),
    "k3-p1": (2, 3, 7, 5, 4, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "k3-s2-asym": (1, 4, 9, 8, 3, 3, (2, 2), (0, 1, 1, 0), (1, 1), 1),
    "k3-s21-asym": (2, 2, 6, 7, 3, 3, (2, 1), (2, 0, 0, 1), (1, 1), 1),
    "k5-p2-g2": (1, 4, 7, 9, 6, 5, (1, 1), (2, 2, 2, 2), (1, 1), 2),
    "k5-s2-nopad": (1, 3, 13, 11, 2, 5, (2, 2), (0, 0, 0, 0), (1, 1), 1),
    "k3-d2": (1, 3, 9, 8, 4, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1),
    "k3-d2-s2-g2": (2, 4, 9, 7, 4, 3, (2, 2), (1, 2, 2, 1), (2, 1), 2),
    "depthwise": (2, 4, 7, 5, 4, 3, (1, 1), (1, 1, 1, 1), (1, 1), 4),
    "depthwise-mult2-s2": (1, 3, 7, 7, 6, 3, (2, 2), (1, 1, 1, 1), (1, 1), 3),
    "k31-rect": (1, 3, 5, 4, 4, (3, 1), (1, 1), (1, 1, 0, 0), (1, 1), 1),
    "odd-13x1": (1, 2, 13, 1, 3, (3, 1), (1, 1), (1, 1, 0, 0), (1, 1), 1),
    "1x1-spatial": (1, 5, 1, 1, 3, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "kernel-eq-input": (2, 3, 5, 5, 2, 5, (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "same-even-k4": (1, 2, 7, 6, 3, 4, (1, 1), (1, 2, 1, 2), (1, 1), 1),  # padding='same', k even
    "cin1-k5": (2, 1, 12, 11, 6, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1),  # LeNet's first layer: Cg = 1
    "depthwise-d2-asym": (1, 5, 9, 8, 5, 3, (2, 1), (2, 1, 0, 2), (2, 2), 5),
}
DEPTHWISE = ["depthwise", "depthwise-mult2-s2", "cin1-k5", "depthwise-d2-asym"]  # Cg = 1


@pytest.mark.parametrize("case", list(CASES))
def test_float64(ops, case):
    torch.manual_seed(0)
    N, Ci, H, W, Co, k, s, p, d, g = CASES[case]
    x, w, b = make(N, Ci, H, W, Co, k, g)
    run_case(ops, x, w, b, s, p, d, g)


def _conv_fp32_precision(value):
    conv = torch.backends.cudnn.conv
    old = conv.fp32_precision
    conv.fp32_precision = value
    yield
    conv.fp32_precision = old


@pytest.mark.parametrize("seed", range(6))
def test_random_shapes(ops, seed):
    """Random small problems (fixed seeds): any kernel size, stride, dilation, asymmetric padding and
    group count that gives an output."""
    import random
    rng = random.Random(seed)
    while True:
        g = rng.choice([1, 1, 2, 3])
        Ci, Co = g * rng.randint(1, 3), g * rng.randint(1, 3)
        kh, kw = rng.randint(1, 4), rng.randint(1, 4)
        s, d = (rng.randint(1, 3), rng.randint(1, 3)), (rng.randint(1, 2), rng.randint(1, 2))
        p = tuple(rng.randint(0, 2) for _ in range(4))
        N, H, W = rng.randint(1, 2), rng.randint(1, 9), rng.randint(1, 9)
        if d[0] * (kh - 1) < H + p[0] + p[1] and d[1] * (kw - 1) < W + p[2] + p[3]:
            break
    torch.manual_seed(seed)
    x, w, b = make(N, Ci, H, W, Co, (kh, kw), g, bias=rng.random() < 0.5)
    run_case(ops, x, w, b, s, p, d, g)


@pytest.fixture
def no_tf32():
    """IEEE float32 products (on a GPU, TF32 is torch's default for float32 convolutions)."""
    yield from _conv_fp32_precision("ieee")


@pytest.fixture
def tf32():
    yield from _conv_fp32_precision("tf32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["k3-s2-asym", "k5-p2-g2", "depthwise"])
def test_low_precision(ops, no_tf32, case, dtype):
    """float32 (IEEE dots) and float16 / bfloat16 (float32 accumulation) against float64."""
    torch.manual_seed(1)
    N, Ci, H, W, Co, k, s, p, d, g = CASES[case]
    x, w, b = make(N, Ci, H, W, Co, k, g, dtype)
    run_case(ops, x, w, b, s, p, d, g)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 needs a CUDA GPU")
def test_tf32(ops, tf32):
    """float32 with TF32 allowed (torch's default for convolutions): tensor-core products of
    10-bit-mantissa operands, float16's bound."""
    torch.manual_seed(11)
    x, w, b = make(2, 32, 9, 9, 48, 3, 1, torch.float32)
    run_case(ops, x, w, b, (1, 1), (1, 1, 1, 1), (1, 1), 1, tol=TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_error_ratio_vs_torch(ops, no_tf32, dtype):
    """The GEMM error rule (docs/testing.md): against float64, our error at most twice torch's own
    conv2d in the same dtype (plus one unit roundoff), forward and the three gradients."""
    torch.manual_seed(12)
    x, w, b = make(2, 16, 9, 8, 24, 3, 1, dtype)
    args = ((1, 2), (1, 1, 0, 2), (1, 1), 1)
    out = ops.conv2d_fwd(x, w, b, *args)
    go = torch.randn_like(out)
    ref, grads = reference(x, w, b, *args, grad_out=go)
    mine = (out,) + tuple(ops.conv2d_bwd(go, x, w, *args, [True, True, True]))
    xt, wt, bt = (t.detach().cpu().requires_grad_() for t in (x, w, b))
    o = F.conv2d(F.pad(xt, (0, 2, 1, 1)), wt, bt, stride=(1, 2))
    o.backward(go.cpu())
    theirs = (o, xt.grad, wt.grad, bt.grad)
    u = torch.finfo(dtype).eps / 2
    for name, m, t, r in zip(("out", "grad_input", "grad_weight", "grad_bias"), mine, theirs,
                             (ref,) + grads):
        assert rel_err(m, r) <= 2 * rel_err(t, r) + u, (name, rel_err(m, r), rel_err(t, r))


def test_no_bias(ops):
    torch.manual_seed(2)
    x, w, _ = make(1, 3, 6, 5, 4, 3, 1)
    run_case(ops, x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)


def test_channel_loops_and_split_reduction(ops, module, monkeypatch):
    """Small blocks: several channel blocks per tl.dot loop (Cg, Cog = 20 > 16), several M tiles,
    and a wgrad reduction split into several partial buffers."""
    monkeypatch.setattr(module, "_MAX_BLOCK_M", 16)
    monkeypatch.setattr(module, "_MAX_BLOCK_N", 16)
    monkeypatch.setattr(module, "_MAX_BLOCK_K", 16)
    monkeypatch.setattr(module, "_WGRAD_BLOCK_R", 16)
    torch.manual_seed(3)
    x, w, b = make(2, 20, 5, 4, 20, 3, 1)
    s, p, d = (1, 1), (1, 0, 0, 1), (1, 1)
    M = 2 * 4 * 3
    assert module._wgrad_splits(M, 4)[0] > 1  # the split path runs
    run_case(ops, x, w, b, s, p, d, 1)


@pytest.mark.parametrize("case", DEPTHWISE)
def test_depthwise_through_gemm(ops, module, monkeypatch, case):
    """The Cg = 1 cases through the implicit-GEMM kernels too (the depthwise kernels off)."""
    monkeypatch.setattr(module, "_USE_DEPTHWISE", False)
    torch.manual_seed(0)
    N, Ci, H, W, Co, k, s, p, d, g = CASES[case]
    x, w, b = make(N, Ci, H, W, Co, k, g)
    run_case(ops, x, w, b, s, p, d, g)


def test_depthwise_small_blocks(ops, module, monkeypatch):
    """Depthwise kernels with several channel blocks, a ragged channel edge and a split wgrad
    reduction."""
    monkeypatch.setattr(module, "_DW_BLOCK_M", 8)
    monkeypatch.setattr(module, "_DW_BLOCK_C", 4)
    monkeypatch.setattr(module, "_WGRAD_BLOCK_R", 16)
    torch.manual_seed(10)
    x, w, b = make(2, 6, 7, 5, 12, 3, 6)
    assert module._wgrad_splits(2 * 4 * 5, 3)[0] > 1
    run_case(ops, x, w, b, (1, 1), (1, 0, 1, 0), (1, 1), 6)


def test_wgrad_splits_deterministic(module):
    """The split of the wgrad reduction is a function of the shape: every chunk but the last is
    full, the chunks cover M."""
    for M in (1, 15, 64, 65, 1000, 100000, 10**7):
        for tiles in (1, 7, 4096):
            for elems in (0, 100, 1 << 22, 1 << 27):
                splits, chunk = module._wgrad_splits(M, tiles, elems)
                assert chunk % module._WGRAD_BLOCK_R == 0
                assert (splits - 1) * chunk < M <= splits * chunk
                assert splits == 1 or splits * elems <= module._MAX_PARTIAL_ELEMS


def test_bitwise_deterministic(ops):
    torch.manual_seed(4)
    x, w, b = make(2, 3, 9, 9, 4, 3, 1, torch.float32)
    go = torch.randn(2, 4, 9, 9)
    args = ((1, 1), (1, 1, 1, 1), (1, 1), 1, [True, True, True])
    r1 = ops.conv2d_bwd(go, x, w, *args)
    r2 = ops.conv2d_bwd(go, x, w, *args)
    for a, c in zip(r1, r2):
        assert torch.equal(a, c)


# ---- memory formats ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["channels_last", "noncontiguous"])
def test_memory_format(ops, fmt):
    """channels_last in -> channels_last out and grad_input; a non-contiguous (sliced) input gives
    contiguous results. Values as in the contiguous case."""
    torch.manual_seed(5)
    x, w, b = make(2, 4, 7, 6, 6, 3, 2)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, 4, 7, 12, dtype=torch.float64, device=DEV)[..., ::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    out, (gi, gw, gb) = run_case(ops, x, w, b, (2, 1), (1, 0, 1, 1), (1, 1), 2)
    cl = fmt == "channels_last"
    for t in (out, gi):
        assert t.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        if cl:
            assert not t.is_contiguous()
    assert gw.is_contiguous()


def test_grad_out_channels_last(ops):
    """grad_out in either format gives the same gradients."""
    torch.manual_seed(6)
    x, w, _ = make(1, 3, 6, 6, 4, 3, 1)
    go = torch.randn(1, 4, 4, 4, dtype=torch.float64, device=DEV)
    args = ((1, 1), (0, 0, 0, 0), (1, 1), 1, [True, True, True])
    a = ops.conv2d_bwd(go, x, w, *args)
    c = ops.conv2d_bwd(go.contiguous(memory_format=torch.channels_last), x, w, *args)
    for u, v in zip(a, c):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-12)


# ---- output_mask ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (False, False, False)])
def test_output_mask(ops, mask):
    torch.manual_seed(7)
    N, Ci, H, W, Co, k, s, p, d, g = CASES["k3-d2-s2-g2"]
    x, w, b = make(N, Ci, H, W, Co, k, g)
    run_case(ops, x, w, b, s, p, d, g, mask=mask)


# ---- empty and NaN -------------------------------------------------------------------------------
def test_empty_batch(ops):
    x = torch.randn(0, 4, 5, 5, dtype=torch.float64, device=DEV)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, device=DEV)
    out = ops.conv2d_fwd(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 2)
    assert out.shape == (0, 6, 5, 5)
    gi, gw, gb = ops.conv2d_bwd(out, x, w, (1, 1), (1, 1, 1, 1), (1, 1), 2, [True, True, True])
    assert gi.shape == x.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros(6, dtype=gb.dtype))


def test_nan_propagates(ops):
    """A NaN in the input reaches exactly the outputs whose window holds it (as in torch), and the
    grad_weight entries that read it; a NaN in grad_out reaches grad_bias and the input gradients
    under its window."""
    torch.manual_seed(8)
    x, w, b = make(1, 2, 7, 7, 3, 3, 1, torch.float32)
    x[0, 1, 3, 2] = float("nan")
    args = ((2, 1), (1, 0, 1, 1), (1, 1), 1)
    out = ops.conv2d_fwd(x, w, b, *args)
    ref, _ = reference(x, w, b, *args)
    assert out.isnan().any()
    assert torch.equal(out.isnan().cpu(), ref.isnan())
    go = torch.randn_like(out)
    go[0, 0, 1, 1] = float("nan")
    x2 = torch.randn_like(x)
    gi, gw, gb = ops.conv2d_bwd(go, x2, w, *args, [True, True, True])
    xd = x2.detach().cpu().double().requires_grad_()
    wd = w.detach().cpu().double().requires_grad_()
    o = F.conv2d(F.pad(xd, (1, 1, 1, 0)), wd, None, stride=(2, 1))
    o.backward(go.cpu().double())
    assert torch.equal(gi.isnan().cpu(), xd.grad.isnan())
    assert torch.equal(gw.isnan().cpu(), wd.grad.isnan())
    assert gb.isnan()[0] and not gb.isnan()[1:].any()


# ---- argument checks -----------------------------------------------------------------------------
def _bad(ops, x, w, b=None, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1):
    return ops.conv2d_fwd(x, w, b, stride, padding, dilation, groups)


def test_bad_input(ops):
    x = torch.randn(1, 4, 5, 5, device=DEV)
    w = torch.randn(6, 2, 3, 3, device=DEV)
    with pytest.raises(RuntimeError, match="divisible by groups"):
        _bad(ops, x, torch.randn(6, 4, 3, 3, device=DEV), groups=3)
    with pytest.raises(RuntimeError, match=r"expected weight.size\(1\) = input channels / groups"):
        _bad(ops, x, w, groups=1)
    with pytest.raises(RuntimeError, match="expected weight of rank 4"):
        _bad(ops, x, torch.randn(6, 4, 3, device=DEV))
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        _bad(ops, x, torch.randn(2, 4, 7, 7, device=DEV))
    with pytest.raises(RuntimeError, match="expected input of rank 4"):
        _bad(ops, x[0], w, groups=2)
    with pytest.raises(RuntimeError, match="expected weight of dtype"):
        _bad(ops, x, w.double(), groups=2)
    with pytest.raises(RuntimeError, match="expected bias of shape"):
        _bad(ops, x, w, torch.randn(5, device=DEV), groups=2)
    with pytest.raises(RuntimeError, match="expected stride >= 1"):
        _bad(ops, x, w, stride=(0, 1), groups=2)
    with pytest.raises(RuntimeError, match="expected padding >= 0"):
        _bad(ops, x, w, padding=(0, -1, 0, 0), groups=2)
    with pytest.raises(RuntimeError, match="input dtype torch.int32 is not supported"):
        _bad(ops, x.int(), w.int(), groups=2)
    go = torch.randn(1, 6, 4, 3, device=DEV)
    with pytest.raises(RuntimeError, match="expected grad_out of shape"):
        ops.conv2d_bwd(go, x, w, (1, 1), (0, 0, 0, 0), (1, 1), 2, [True, True, True])


# ---- registration --------------------------------------------------------------------------------
def test_opcheck(ops):
    """Schema and fake-tensor registrations, through torch.library.opcheck, in both formats."""
    torch.manual_seed(9)
    x, w, b = make(1, 4, 5, 4, 4, 3, 2, torch.float32)
    utils = ("test_schema", "test_faketensor")
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        args = ((2, 1), (1, 0, 0, 1), (1, 1), 2)
        out = ops.conv2d_fwd(xx, w, b, *args)
        torch.library.opcheck(ops.conv2d_fwd, (xx, w, b, *args), test_utils=utils)
        torch.library.opcheck(ops.conv2d_bwd, (torch.randn_like(out), xx, w, *args,
                                               [True, False, True]), test_utils=utils)


@pytest.mark.parametrize("op", ["conv2d_fwd", "conv2d_bwd"])
def test_schema_matches_cpp(ops, op):
    assert_schema_matches_cpp(ops, op)
