"""The CPU attention's own block product (issue 12): the register-blocked SIMD micro-kernel on packed
K / V panels (csrc/cpu/attention_kernel.cpp, AVX2 / AVX-512, float32) against the BLAS path it
replaces (one sgemm per block, kept as fallback and oracle), the float64 kernel (BLAS, the same
semantics: masks, valid_lens, the same Philox dropout) and torch's math SDPA in float64 -- forward
and every gradient, on sizes that are not multiples of the register tile (6 x 16 / 12 x 32) or of
the 128 x 256 blocks. The switch: torch.ops.pyfastdl.attention_cpu_gemm (the op) and
PYFASTDL_ATTENTION_GEMM (read once, at the first use)."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyfastdl  # noqa: F401  (registers torch.ops.pyfastdl)
from pyfastdl.reference.attention import sdpa_like_torch

from helpers import assert_rel, rel_err

gemm_mode = torch.ops.pyfastdl.attention_cpu_gemm
CAPABILITY = dict(item.partition("=")[::2] for item in torch.ops.pyfastdl.build_info().split(";"))["cpu_capability"]
HAS_UKERNEL = CAPABILITY in ("AVX2", "AVX512")
needs_ukernel = pytest.mark.skipif(not HAS_UKERNEL, reason=f"the own micro-kernel needs AVX2 / AVX-512 ({CAPABILITY})")


class mode:
    """with mode("own"): the block product of the CPU attention, restored afterwards."""

    def __init__(self, m):
        self.m = m

    def __enter__(self):
        self.old = gemm_mode(self.m)

    def __exit__(self, *exc):
        gemm_mode(self.old)


# (B, Hq, Hk, L, S, E, Ev, causal, mask, valid_lens, dropout_p): L, S, E off the tile sizes; the last
# ones span several 128-query and 256-key blocks.
CASES = [
    (1, 1, 1, 1, 1, 1, 1, False, None, None, 0.0),
    (1, 2, 2, 5, 17, 7, 7, False, None, None, 0.0),
    (2, 2, 2, 17, 63, 64, 64, False, None, None, 0.0),
    (1, 2, 2, 63, 130, 80, 80, False, None, None, 0.0),
    (1, 1, 1, 130, 257, 128, 128, False, None, None, 0.0),
    (1, 2, 2, 257, 257, 64, 64, True, None, None, 0.0),
    (1, 4, 2, 130, 257, 64, 80, True, None, None, 0.0),      # GQA, causal, Ev != E
    (1, 2, 2, 257, 130, 128, 128, True, None, None, 0.0),    # causal, L > S
    (2, 2, 2, 63, 130, 7, 16, False, "bool", None, 0.0),
    (1, 2, 2, 130, 63, 80, 64, False, "float", None, 0.0),   # the float mask's gradient too
    (2, 2, 2, 130, 257, 64, 64, False, None, "1d", 0.0),
    (2, 2, 1, 63, 257, 1, 17, False, None, "2d", 0.0),       # GQA, head dim 1
    (1, 2, 2, 130, 257, 64, 64, False, None, None, 0.2),     # dropout, fixed seed
    (1, 4, 2, 63, 130, 80, 80, True, None, "1d", 0.3),       # GQA, causal, valid_lens and dropout
    (1, 1, 1, 300, 600, 64, 64, False, None, None, 0.0),
    (1, 1, 1, 300, 600, 128, 128, True, None, None, 0.0),
]
IDS = [f"B{c[0]}H{c[1]}/{c[2]}-L{c[3]}S{c[4]}-E{c[5]}/{c[6]}" + ("-causal" if c[7] else "")
       + (f"-{c[8]}" if c[8] else "") + (f"-lens{c[9]}" if c[9] else "") + (f"-p{c[10]}" if c[10] else "")
       for c in CASES]
SEED = 1234


def make(case, seed=0):
    B, Hq, Hk, L, S, E, Ev, causal, mk, lk, p = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, Hq, L, E), (B, Hk, S, E), (B, Hk, S, Ev)))
    mask = None
    if mk == "bool":
        mask = torch.rand(B, Hq, L, S, generator=g) > 0.3
        mask[:, :, 2] = False  # a fully masked row
    elif mk == "float":
        mask = torch.randn(B, Hq, L, S, generator=g, dtype=torch.float64)
    lens = None
    if lk == "1d":
        lens = torch.randint(1, S + 1, (B,), generator=g)
        lens[0] = S // 3 + 1
    elif lk == "2d":
        lens = torch.randint(0, S + 3, (B, L), generator=g)
    dout = torch.randn(B, Hq, L, Ev, generator=g, dtype=torch.float64)
    return q, k, v, mask, lens, dout


def run_ops(case, dtype, seed=0):
    """out, lse, grad_q, grad_k, grad_v (, grad_mask) of the CPU ops in ``dtype``."""
    q, k, v, mask, lens, dout = make(case, seed)
    causal, p = case[7], case[10]
    scale = 1 / math.sqrt(case[5])
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    out, lse = torch.ops.pyfastdl.attention_fwd(q, k, v, mask, lens, causal, scale, p, SEED, 0)
    need = [True, True, True, mask is not None and mask.is_floating_point()]
    gq, gk, gv, gm = torch.ops.pyfastdl.attention_bwd(dout, q, k, v, out, lse, mask, lens, causal, scale, p, SEED, 0,
                                                      need)
    res = {"out": out, "lse": lse, "grad_q": gq, "grad_k": gk, "grad_v": gv}
    if need[3]:
        res["grad_mask"] = gm
    return res


def torch_reference(case):
    """out and the gradients in float64 from torch's math SDPA (sdpa_like_torch, its documented
    implementation written out, where valid_lens are given)."""
    q, k, v, mask, lens, dout = make(case)
    causal, gqa = case[7], case[1] != case[2]
    leaves = [q, k, v] + ([mask] if mask is not None and mask.is_floating_point() else [])
    for t in leaves:
        t.requires_grad_()
    if lens is None:
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    else:
        ref = sdpa_like_torch(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa, valid_lens=lens)
    grads = torch.autograd.grad(ref, leaves, dout)
    names = ["grad_q", "grad_k", "grad_v", "grad_mask"]
    return {"out": ref, **{n: g for n, g in zip(names, grads)}}


def check(res, ref, what, factor=1.0):
    for name, r in ref.items():
        if name == "lse":
            continue
        # gradients: 10x the forward's bound (a longer chain of products), as tests/test_attention.py
        assert_rel(res[name], r, torch.float32, "gemm", factor * (1 if name == "out" else 10)), f"{what}: {name}"


@needs_ukernel
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_own_matches_blas_float64_and_torch(case):
    with mode("own"):
        own = run_ops(case, torch.float32)
        assert gemm_mode("last") == "fwd=own;bwd=own"
    with mode("blas"):
        blas = run_ops(case, torch.float32)
        assert gemm_mode("last") == "fwd=blas;bwd=blas"
    f64 = run_ops(case, torch.float64)  # always the BLAS path; the same dropout mask
    assert gemm_mode("last") == "fwd=blas;bwd=blas"
    for name in own:
        assert own[name].shape == blas[name].shape == f64[name].shape, name
        assert torch.isfinite(own[name]).all() or name == "lse", name
    # the log-sum-exp where finite (-inf: rows with no key)
    fin = torch.isfinite(f64["lse"])
    assert torch.equal(torch.isfinite(own["lse"]), fin)
    torch.testing.assert_close(own["lse"][fin].double(), f64["lse"][fin], rtol=1e-5, atol=1e-5)
    check(own, blas, "own vs blas")
    check(own, f64, "own vs float64")
    check(blas, f64, "blas vs float64")
    if case[10] == 0:
        ref = torch_reference(case)
        check(own, ref, "own vs torch")
        # and no worse than the BLAS path against torch (3x: both are ~1e-7, noise decides)
        for name in ref:
            assert rel_err(own[name], ref[name]) <= 3 * rel_err(blas[name], ref[name]) + 1e-7, name


@needs_ukernel
def test_auto_is_the_measured_rule_and_float64_keeps_blas():
    """auto: the own kernel for float32, except on AVX2 the backward at head dims > 64 (BLAS measured as
    fast or faster there on the EPYC Zen 4; on AVX-512 the own backward was 1.3-2x faster); float64
    always BLAS."""
    with mode("auto"):
        run_ops(CASES[2], torch.float32)  # E = Ev = 64
        assert gemm_mode("last") == "fwd=own;bwd=own"
        run_ops(CASES[4], torch.float32)  # E = Ev = 128
        assert gemm_mode("last") == ("fwd=own;bwd=own" if CAPABILITY == "AVX512" else "fwd=own;bwd=blas")
        run_ops(CASES[8], torch.float32)  # E = 7, Ev = 16
        assert gemm_mode("last") == "fwd=own;bwd=own"
        run_ops(CASES[2], torch.float64)
        assert gemm_mode("last") == "fwd=blas;bwd=blas"


@needs_ukernel
def test_own_bits_do_not_depend_on_the_thread_count():
    case = (1, 2, 2, 300, 600, 64, 80, False, "float", None, 0.1)
    old = torch.get_num_threads()
    try:
        with mode("own"):
            torch.set_num_threads(1)
            one = run_ops(case, torch.float32)
            torch.set_num_threads(max(2, old))
            many = run_ops(case, torch.float32)
    finally:
        torch.set_num_threads(old)
    for name in one:
        assert torch.equal(one[name], many[name]), name


def test_bad_mode_is_a_clear_error():
    with pytest.raises(RuntimeError, match="attention_cpu_gemm: expected mode"):
        gemm_mode("fast")
    assert gemm_mode("") in ("auto", "own", "blas")


def test_env_var_is_read_once_at_the_first_use():
    code = (
        "import torch, pyfastdl\n"
        "q = torch.randn(1, 2, 9, 16, requires_grad=True)\n"
        "assert torch.ops.pyfastdl.attention_cpu_gemm('') == 'blas'\n"
        "pyfastdl.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()\n"
        "print(torch.ops.pyfastdl.attention_cpu_gemm('last'))\n")
    env = dict(os.environ, PYFASTDL_ATTENTION_GEMM="BLAS")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "fwd=blas;bwd=blas"
    env["PYFASTDL_ATTENTION_GEMM"] = "fastest"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "PYFASTDL_ATTENTION_GEMM: expected auto, own or blas, got 'fastest'" in r.stderr
