"""conv2d on NCHW input through the im2col-panel kernels of csrc/cpu/conv2d_panel_kernel.cpp
(conv2d.cpp: use_nchw_panel_fwd, use_nchw_panel_bwd_input: one group, C_in <= 8, K = C_in kH kW <=
512, kH kW <= 64, output rows narrower than 16; grad_input only at stride 1 along W): forward and the
three gradients against torch.nn.functional.conv2d and a float64 reference, gradcheck, thread-count
independence, non-finite values, and PYFASTDL_CONV2D_PANEL=0 (the old paths) giving the same results.
Every case below satisfies the predicates (see _admitted)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pyfastdl import functional as PF
from helpers import assert_rel
from test_conv2d import _assert_same_bits_with_1_2_3_threads, _check_against_torch, _id, make

# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
LENET2 = (256, 6, 14, 14, 16, 5, 1, 0, 1, 1)      # the notes' LeNet second conv, the bench's shape
CASES_PANEL = [
    (4, 6, 14, 14, 16, 5, 1, 0, 1, 1),            # LeNet's second conv, batch cut
    (3, 1, 12, 12, 6, 5, 1, 2, 1, 1),             # LeNet's first conv shape family (12 wide: panel)
    (1, 6, 14, 14, 16, 5, 1, 0, 1, 1),            # N = 1
    (2, 3, 9, 11, 7, 3, 1, 1, 1, 1),              # C_out not a multiple of 4, 99 pixels (tail)
    (2, 8, 13, 13, 5, 3, 2, 1, 1, 1),             # stride 2 (grad_input on the old path only if sw != 1)
    (2, 2, 11, 13, 5, 3, (2, 1), 1, 1, 1),        # stride 2 along H only: the panel grad_input
    (1, 5, 13, 13, 7, 3, 1, "same", 2, 1),        # dilation 2, 'same'
    (2, 4, 9, 8, 9, 4, 1, "same", 1, 1),          # even kernel: asymmetric padding
    (1, 7, 6, 5, 3, 3, 1, (2, 0), 1, 1),          # padding along H only, rows of 3 (< a vector)
    (2, 1, 5, 5, 1, 5, 1, 0, 1, 1),               # one output pixel, one channel each side
    (2, 6, 7, 7, 17, 3, 1, 3, 1, 1),              # padding past the kernel's reach: zero output rows
    (3, 6, 30, 9, 13, 5, 1, 1, 1, 1),             # 28 x 7 output, 196 pixels: two panel chunks (144 + 52)
    (1, 8, 40, 12, 6, 8, 1, 0, 1, 1),             # K = 512, the largest admitted
]
LAYOUTS = ["contiguous", "strided"]


def _admitted(c):
    N, C, H, W, O, k, s, p, d, g = c
    x, w, _, kw = make(c, torch.float32, "cpu")
    Wo = F.conv2d(x, w, None, **kw).shape[3]
    return g == 1 and C <= 8 and C * k * k <= 512 and Wo < 16


def test_cases_are_admitted():
    assert all(_admitted(c) for c in CASES_PANEL + [LENET2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("c", CASES_PANEL, ids=_id)
def test_panel_matches_torch_and_float64(c, layout, dtype):
    """Output and the three gradients within 2x torch's own error against float64 (test_conv2d's rule)."""
    _check_against_torch("cpu", dtype, layout, c)


def test_panel_lenet_shape_within_gemm_tolerance():
    """The bench's layer, batch 256: forward and gradients in float32 within the gemm bound of float64."""
    x, w, b, kw = make(LENET2, torch.float32, "cpu")
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = PF.conv2d(*leaves, **kw)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.conv2d(*ref_leaves, **kw)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y.backward(gy.float())
    ref.backward(gy)
    assert y.is_contiguous() and leaves[0].grad.is_contiguous()
    assert_rel(y, ref, torch.float32, "gemm")
    for a, r in zip(leaves, ref_leaves):
        assert_rel(a.grad, r.grad, torch.float32, "gemm")


@pytest.mark.parametrize("c", [CASES_PANEL[3], CASES_PANEL[5], CASES_PANEL[6], CASES_PANEL[8], CASES_PANEL[9]],
                         ids=_id)
def test_panel_gradcheck(c):
    x, w, b, kw = make(c, torch.float64, "cpu")
    args = tuple(t.detach().clone().requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: PF.conv2d(x, w, b, **kw), args)


def test_panel_empty_batch():
    c = (0, 6, 14, 14, 16, 5, 1, 0, 1, 1)
    x, w, b, kw = make(c, torch.float32, "cpu")
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = PF.conv2d(*leaves, **kw)
    assert y.shape == (0, 16, 10, 10)
    y.sum().backward()
    assert leaves[0].grad.shape == x.shape
    assert torch.equal(leaves[1].grad, torch.zeros_like(w)) and torch.equal(leaves[2].grad, torch.zeros_like(b))


@pytest.mark.parametrize("c", [CASES_PANEL[0], CASES_PANEL[3], CASES_PANEL[11]], ids=_id)
def test_panel_does_not_depend_on_thread_count(c):
    _assert_same_bits_with_1_2_3_threads(c, "contiguous")


def _pattern(t):
    return torch.stack([torch.isnan(t), torch.isposinf(t), torch.isneginf(t)])


# inf/NaN in the input, the weight or grad_out reach the output and the three gradients as in torch.
# Where a weight element meets the zero padding, float32 torch (oneDNN) skips the padding and float64
# torch multiplies the zeros: each element follows one of the two; finite elements match. The panel's
# grad_input adds only products of grad_out pixels that exist (as torch in both dtypes): an inf in the
# weight gives inf at the border, checked here too.
@pytest.mark.parametrize("c", [CASES_PANEL[0], CASES_PANEL[3], CASES_PANEL[6], CASES_PANEL[10]], ids=_id)
@pytest.mark.parametrize("where", ["input", "weight", "grad_out"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_panel_nonfinite_like_torch(c, where, value):
    x, w, b, kw = make(c, torch.float32, "cpu")
    x, w = x.clone(), w.clone()
    N, C, H, W = x.shape
    gy = torch.randn(F.conv2d(x, w, b, **kw).shape, generator=torch.Generator().manual_seed(3))
    if where == "input":
        x[N - 1, C // 2, H // 2, 0] = value     # at the left border
        x[0, 0, H - 1, W // 2] = value
    elif where == "weight":
        w[0, 0, 0, 0] = value                   # a corner tap: meets the padding
        w[-1, -1, w.shape[2] // 2, w.shape[3] // 2] = value
    else:
        gy[0, 0, 0, 0] = value
        gy[-1, -1, -1, -1] = value
    outs = {}
    for name, dt, fn in (("ours", torch.float32, PF.conv2d), ("f32", torch.float32, F.conv2d),
                         ("f64", torch.float64, F.conv2d)):
        leaves = [t.detach().to(dt).clone().requires_grad_() for t in (x, w, b)]
        y = fn(*leaves, **kw)
        y.backward(gy.to(dt))
        outs[name] = [y.detach()] + [t.grad for t in leaves]
    some = False
    padded = c[7] != 0
    for i, label in enumerate(("output", "grad_input", "grad_weight", "grad_bias")):
        if label == "grad_weight" and where == "grad_out" and padded:
            # grad_weight is not this file's kernel (conv2d_kernel.cpp's NCHW grad_weight, which skips the
            # padding: NaN * 0 not formed where torch forms it); the same with PYFASTDL_CONV2D_PANEL=0
            continue
        ours, t32, t64 = (outs[k][i] for k in ("ours", "f32", "f64"))
        po, p32, p64 = _pattern(ours), _pattern(t32), _pattern(t64)
        assert ((po == p32).all(0) | (po == p64).all(0)).all(), (label, c, where, value)
        fin = torch.isfinite(ours) & torch.isfinite(t32)
        torch.testing.assert_close(ours[fin], t32[fin], rtol=1e-4, atol=1e-4)
        some = some or bool(po.any())
    assert some


_OFF_SCRIPT = r"""
import sys, torch
import pyfastdl.functional as PF
sys.path.insert(0, sys.argv[1])
from test_conv2d_panel import CASES_PANEL
from test_conv2d import make
out = []
for dt in (torch.float32, torch.float64):
    for c in CASES_PANEL:
        x, w, b, kw = make(c, dt, "cpu")
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y = PF.conv2d(*leaves, **kw)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=dt))
        out.append([y.detach()] + [t.grad for t in leaves])
torch.save(out, sys.argv[2])
"""


def _run_with_env(value, path):
    env = dict(os.environ, PYFASTDL_CONV2D_PANEL=value)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", _OFF_SCRIPT, tests_dir, str(path)], env=env, check=True)
    return torch.load(path)


def test_off_switch_gives_the_same_results(tmp_path):
    """PYFASTDL_CONV2D_PANEL=0 (the old paths) and the default (the panel) agree on every case, float32
    and float64, forward and the three gradients (to rounding: the sums run in another order)."""
    on = _run_with_env("1", tmp_path / "on.pt")
    off = _run_with_env("0", tmp_path / "off.pt")
    assert len(on) == len(off) == 2 * len(CASES_PANEL)
    for i, (a, b) in enumerate(zip(on, off)):
        dt = a[0].dtype
        for u, v in zip(a, b):
            assert u.shape == v.shape and u.is_contiguous() and v.is_contiguous()
            torch.testing.assert_close(u, v, rtol=1e-5 if dt == torch.float32 else 1e-12,
                                       atol=1e-5 if dt == torch.float32 else 1e-12, msg=lambda m: f"{i}: {m}")
