"""conv2d 1x1 on NCHW input, the pixel-GEMM path of csrc/cpu/conv2d_1x1_kernel.cpp (conv2d.cpp:
use_nchw_1x1: every one-group 1x1 convolution on NCHW input, forward, grad_input, grad_weight and
grad_bias; use_nhwc_1x1_bwd_input: grad_input on channels_last input): against torch.nn.functional.conv2d and a float64 reference, every output_mask, gradcheck,
thread-count independence, non-finite values. Channels_last input (the NHWC gather GEMM forward and
grad_weight, this file's grad_input) alongside."""
import pytest
import torch
import torch.nn.functional as F

from pyfastdl import functional as PF
from helpers import assert_rel, rel_err
from test_conv2d import _assert_same_bits_with_1_2_3_threads, _check_against_torch, _id, make

# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups); odd sizes 1, 7, 13, 17, 56; channel
# counts not multiples of the register tile (6 rows) nor of the pixel tile (2 vectors); batch 1
CASES_1X1 = [
    (2, 20, 56, 56, 36, 1, 2, 0, 1, 1),         # a downsample at 56 (pixel tails: 28 x 28 = 784)
    (1, 13, 17, 17, 7, 1, 2, 0, 1, 1),          # odd plane, stride 2
    (2, 9, 13, 7, 10, 1, 2, 1, 1, 1),           # stride 2, padding 1: output pixels on the padding
    (1, 5, 7, 13, 3, 1, 1, 0, 1, 1),            # stride 1: the plain (no gather, no scatter) path
    (3, 6, 17, 56, 14, 1, 1, 1, 1, 1),          # stride 1, padding 1
    (2, 17, 1, 1, 19, 1, 1, 0, 1, 1),           # a 1 x 1 plane
    (1, 33, 1, 13, 25, 1, 2, 1, 1, 1),          # a single row, padding
    (1, 64, 14, 14, 130, 1, 2, 0, 1, 1),        # C_out past two tiles of 64, C_in 64
    (2, 3, 13, 13, 8, 1, (2, 1), 0, 1, 1),      # stride along H only
    (1, 8, 7, 7, 6, 1, 3, (1, 2), 1, 1),        # stride 3, padding (1, 2)
    (2, 1, 9, 9, 4, 1, 2, 0, 1, 1),             # one input channel
    (1, 40, 28, 28, 1, 1, 1, 0, 1, 1),          # one output channel, a plane of 784
    (2, 7, 13, 13, 9, 1, 2, (1, 0), 1, 1),      # stride 2, top padding only: grad_input row by row
    (1, 5, 9, 40, 7, 1, (3, 2), 0, 1, 1),       # stride (3, 2): rows no output row hits, a row of 20
]
LAYOUTS = ["contiguous", "channels_last", "strided"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", CASES_1X1, ids=_id)
def test_1x1_matches_torch_and_float64(c, layout, dtype):
    if layout == "channels_last" and dtype == torch.float32:
        # the NHWC gather GEMM (not this file's path): its grad_weight sums a pixel at a time, at most the
        # table's gemm bound from float64 (3x6x17x56: 1.06e-6, torch 4e-7)
        x, w, b, kw = make(c, dtype, "cpu", layout)
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y = PF.conv2d(*leaves, **kw)
        ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
        ref = F.conv2d(*ref_leaves, **kw)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        y.backward(gy.to(dtype))
        ref.backward(gy)
        assert_rel(y, ref, dtype, "gemm")
        for a, r in zip(leaves, ref_leaves):
            assert_rel(a.grad, r.grad, dtype, "gemm")
        return
    _check_against_torch("cpu", dtype, layout, c)


@pytest.mark.parametrize("c", [CASES_1X1[2], CASES_1X1[4], CASES_1X1[7]], ids=_id)
def test_1x1_within_gemm_tolerance_of_float64(c):
    """Forward and gradients in float32 within the table's gemm bound of the float64 result."""
    x, w, b, kw = make(c, torch.float32, "cpu")
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = PF.conv2d(*leaves, **kw)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.conv2d(*ref_leaves, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y.backward(gy.float())
    ref.backward(gy)
    assert_rel(y, ref, torch.float32, "gemm")
    for a, r in zip(leaves, ref_leaves):
        assert_rel(a.grad, r.grad, torch.float32, "gemm")


MASKS = [[a, b, c] for a in (False, True) for b in (False, True) for c in (False, True)]


@pytest.mark.parametrize("c", [CASES_1X1[1], CASES_1X1[2], CASES_1X1[3]], ids=_id)
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if v else "0" for v in m))
def test_1x1_output_mask(c, mask):
    """Each gradient computed on its own equals the one of the full call, bitwise; the rest are None."""
    x, w, _, kw = make(c, torch.float32, "cpu")
    s = kw["stride"] if isinstance(kw["stride"], tuple) else (kw["stride"],) * 2
    pd = kw["padding"] if isinstance(kw["padding"], tuple) else (kw["padding"],) * 2
    pad4 = [pd[0], pd[0], pd[1], pd[1]]
    y = F.conv2d(x, w, None, **kw)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    ops = torch.ops.pyfastdl
    full = ops.conv2d_bwd(g, x, w, list(s), pad4, [1, 1], 1, [True, True, True])
    out = ops.conv2d_bwd(g, x, w, list(s), pad4, [1, 1], 1, mask)
    for m, o, f in zip(mask, out, full):
        if m:
            torch.testing.assert_close(o, f, rtol=0, atol=0)
        else:
            assert o is None
    # the full call against torch's gradients
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    br = torch.zeros(w.shape[0], requires_grad=True)
    F.conv2d(xr, wr, br, **kw).backward(g)
    for ours, theirs in zip(full, (xr.grad, wr.grad, br.grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("c", [(1, 3, 5, 7, 4, 1, 2, 1, 1, 1), (2, 7, 6, 5, 8, 1, 1, 0, 1, 1),
                               (1, 2, 7, 3, 3, 1, (1, 2), (2, 0), 1, 1),
                               (1, 3, 7, 5, 2, 1, 2, (1, 0), 1, 1)], ids=_id)
def test_1x1_gradcheck(c, layout):
    x, w, b, kw = make(c, torch.float64, "cpu", layout)
    args = tuple(t.detach().clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: PF.conv2d(x, w, b, **kw), args)


@pytest.mark.parametrize("layout", ["contiguous", "strided", "channels_last"])
@pytest.mark.parametrize("c", [CASES_1X1[0], CASES_1X1[2], CASES_1X1[4], CASES_1X1[7], CASES_1X1[13]], ids=_id)
def test_1x1_does_not_depend_on_thread_count(c, layout):
    _assert_same_bits_with_1_2_3_threads(c, layout)


def _pattern(t):
    return torch.stack([torch.isnan(t), torch.isposinf(t), torch.isneginf(t)])


# inf/NaN in the input, the weight or grad_out reach the output and the three gradients as in torch.
# Where a weight element meets the zero padding (padding 1), float32 torch (oneDNN) skips the padding and
# float64 torch multiplies the zeros: each element follows one of the two; finite elements match.
@pytest.mark.parametrize("c", [CASES_1X1[1], CASES_1X1[2], CASES_1X1[4]], ids=_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("where", ["input_read", "input_skipped", "weight", "grad_out"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_1x1_nonfinite_like_torch(c, layout, where, value):
    x, w, b, kw = make(c, torch.float32, "cpu", layout)
    x, w = x.clone(), w.clone()
    N, C, H, W = x.shape
    y0 = F.conv2d(x, w, b, **kw)
    gy = torch.randn(y0.shape, generator=torch.Generator().manual_seed(3))
    if where == "input_read":
        x[N - 1, C // 2, H - 1 - (H - 1) % 2, 0] = value   # an even row and column: read by every stride here
        x[0, 0, 0, W // 2 * 0] = value
    elif where == "input_skipped":
        x[0, C - 1, H // 2 | 1, W // 2 | 1] = value       # an odd row and column: skipped by stride 2
    elif where == "weight":
        w[0, 0, 0, 0] = value
        w[-1, -1, 0, 0] = value
    else:
        gy[0, 0, 0, 0] = value
        gy[-1, -1, -1, -1] = value
    outs = {}
    for name, dt, fn in (("ours", torch.float32, PF.conv2d), ("f32", torch.float32, F.conv2d),
                         ("f64", torch.float64, F.conv2d)):
        leaves = [t.detach().to(dt).clone().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves, **kw)
        y.backward(gy.to(dt).contiguous(memory_format=torch.channels_last) if layout == "channels_last"
                   else gy.to(dt))
        outs[name] = [y.detach()] + [t.grad for t in leaves]
    padded = c[7] != 0
    for i, label in enumerate(("output", "grad_input", "grad_weight", "grad_bias")):
        if label == "grad_weight" and layout == "channels_last" and where == "grad_out" and padded:
            continue  # a known difference of the NHWC grad_weight: test_1x1_nhwc_grad_weight_skips_padding
        ours, t32, t64 = (outs[k][i] for k in ("ours", "f32", "f64"))
        po, p32, p64 = _pattern(ours), _pattern(t32), _pattern(t64)
        assert ((po == p32).all(0) | (po == p64).all(0)).all(), (label, c, where, value)
        fin = torch.isfinite(ours) & torch.isfinite(t32)
        torch.testing.assert_close(ours[fin], t32[fin], rtol=1e-4, atol=1e-4)


# grad_out NaN at an output pixel that reads only the padding: torch on channels_last (float32 and
# float64) multiplies the padding's zeros (NaN * 0 = NaN in grad_weight); the NHWC gather GEMM's
# grad_weight (conv2d_kernel.cpp, not this file's kernels) skips the padding and stays finite. Kept strict
# so that the xfail turns into a failure the day it changes.
@pytest.mark.xfail(strict=True, reason="NHWC grad_weight skips the padding: NaN * 0 not formed")
def test_1x1_nhwc_grad_weight_skips_padding():
    x, w, b, kw = make(CASES_1X1[2], torch.float32, "cpu", "channels_last")
    gy = torch.randn(F.conv2d(x, w, b, **kw).shape).contiguous(memory_format=torch.channels_last)
    gy[0, 0, 0, 0] = float("nan")
    grads = []
    for fn in (PF.conv2d, F.conv2d):
        wr = w.clone().requires_grad_()
        fn(x, wr, b, **kw).backward(gy)
        grads.append(wr.grad)
    assert torch.isnan(grads[1]).any()
    assert torch.equal(torch.isnan(grads[0]), torch.isnan(grads[1]))


def test_1x1_resnet_downsample_shape():
    """The bench's layer (8, 64, 56, 56) -> 128, stride 2, batch cut to 2: forward and gradients."""
    c = (2, 64, 56, 56, 128, 1, 2, 0, 1, 1)
    x, w, b, kw = make(c, torch.float32, "cpu")
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = PF.conv2d(*leaves, **kw)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.conv2d(*ref_leaves, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y.backward(gy.float())
    ref.backward(gy)
    assert y.is_contiguous() and leaves[0].grad.is_contiguous()
    assert rel_err(y, ref) < 2e-6
    for a, r in zip(leaves, ref_leaves):
        assert_rel(a.grad, r.grad, torch.float32, "gemm")
