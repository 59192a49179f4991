"""The CPU attention's bfloat16 kernels (issue 12): on a CPU with AVX512_BF16 (and the AVX-512 kernel
table in use), bfloat16 attention with even head dims runs its block products with vdpbf16ps on bf16
pair panels -- Q K^T, dO V^T from the inputs as they are; P and dS rounded to bf16 as operands, as
torch's own bf16 flash attention does -- with float32 sums, masks, softmax and gradients, rounded once
(csrc/cpu/attention_kernel.cpp, fwd<float, true> / bwd<float, true>). Checked against the float64
kernel on the same (bf16) inputs, torch, and the float32 kernel on the same inputs; NaN / Inf as the
float32 kernel; the same dropout mask; bits independent of the thread count. Elsewhere (no
AVX512_BF16, an odd head dim, gemm mode own / blas) bf16 is the float32 kernel's, rounded
(tests/test_attention.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

import pyfastdl.functional as PF
from pyfastdl import backends

from helpers import rel_err
from test_attention_ukernel import CASES, IDS, SEED, gemm_mode, make, mode, torch_reference

INFO = dict(item.partition("=")[::2] for item in torch.ops.pyfastdl.build_info().split(";"))


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


# Read from the CPU itself, not from the kernel under test: where this is true the bf16 kernel must run.
HAS_BF16 = INFO["cpu_capability"] == "AVX512" and " avx512_bf16" in _cpu_flags()
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason=f"the bf16 kernel needs AVX512_BF16 and the AVX-512 table "
                                                     f"(capability {INFO['cpu_capability']}, AVX512_BF16 "
                                                     f"{'yes' if ' avx512_bf16' in _cpu_flags() else 'no'})")
fwd = torch.ops.pyfastdl.attention_fwd


def test_build_info_reports_the_flag():
    assert INFO["cpu_avx512_bf16"] == ("1" if " avx512_bf16" in _cpu_flags() else "0")


def run_fwd(q, k, v, mask, lens, causal, scale, p):
    with mode("auto"):
        out, lse = fwd(q, k, v, mask, lens, causal, scale, p, SEED, 0)
        return out, lse, gemm_mode("last").split(";")[0]


def run_bwd(dout, q, k, v, out, lse, mask, lens, causal, scale, p, mode_name="auto"):
    need = [True, True, True, mask is not None and mask.is_floating_point()]
    with mode(mode_name):
        grads = torch.ops.pyfastdl.attention_bwd(dout, q, k, v, out, lse, mask, lens, causal, scale, p, SEED, 0, need)
        return grads[:3] + (grads[3:] if need[3] else ()), gemm_mode("last").split(";")[1]


@needs_bf16
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_kernel_matches_float64_and_float32(case):
    q, k, v, mask, lens, dout = make(case)
    causal, p, E, Ev = case[7], case[10], case[5], case[6]
    scale = 1 / math.sqrt(E)
    qb, kb, vb, db = (t.bfloat16() for t in (q, k, v, dout))
    mb = mask.bfloat16() if mask is not None and mask.is_floating_point() else mask
    out, lse, last = run_fwd(qb, kb, vb, mb, lens, causal, scale, p)
    assert last == ("fwd=bf16" if E % 2 == 0 else "fwd=own"), last  # odd head dims: the float32 kernel
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and out.shape == (*q.shape[:3], v.shape[3])
    # the same inputs (the bf16 values, exactly) through the float64 kernel and the float32 kernel
    m64 = mb.double() if mb is not None and mb.is_floating_point() else mb
    ref, lse64 = fwd(qb.double(), kb.double(), vb.double(), m64, lens, causal, scale, p, SEED, 0)
    with mode("own"):
        out32, lse32 = fwd(qb.float(), kb.float(), vb.float(), None if mb is None else mb.float() if mb.is_floating_point()
                           else mb, lens, causal, scale, p, SEED, 0)
    # the scores are the exact bf16 products summed in float32: the log-sum-exp as the float32 kernel's
    fin = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin].double(), lse64[fin], rtol=1e-5, atol=1e-5)
    # the output: the float32 kernel's, rounded once, is the floor; rounding P to bf16 costs at most about
    # as much again (measured: 1.2-1.6x the floor)
    floor = rel_err(out32.bfloat16(), ref)
    assert rel_err(out, ref) <= 2 * floor + 1e-4, (rel_err(out, ref), floor)
    if p == 0 and lens is None and (mask is None or mask.dtype == torch.bool):
        # and within torch's own bf16 class against float64 (torch: math or flash SDPA in bf16)
        theirs = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=causal, scale=scale,
                                                enable_gqa=case[1] != case[2])
        ok = torch.isfinite(ref)
        assert rel_err(out[ok], ref[ok]) <= 1.5 * rel_err(theirs[ok], ref[ok]) + 2e-3
    # the backward (on our forward's out and lse): every gradient against the float64 kernel's, and the
    # float32 kernel's rounded once as the floor -- dS and P rounded to bf16 cost about as much again
    # (measured: 1.3-1.5x the floor)
    grads, last = run_bwd(db, qb, kb, vb, out, lse, mb, lens, causal, scale, p)
    assert last == ("bwd=bf16" if E % 2 == 0 and Ev % 2 == 0 else "bwd=own"), last
    refs, _ = run_bwd(db.double(), qb.double(), kb.double(), vb.double(), out.double(), lse.double(), m64, lens, causal,
                      scale, p)
    m32 = None if mb is None else mb.float() if mb.is_floating_point() else mb
    g32, _ = run_bwd(db.float(), qb.float(), kb.float(), vb.float(), out.float(), lse, m32, lens, causal, scale, p, "own")
    for name, ours, r, f32 in zip(["grad_q", "grad_k", "grad_v", "grad_mask"], grads, refs, g32):
        assert ours.dtype == torch.bfloat16 and ours.shape == r.shape, name
        floor = rel_err(f32.bfloat16(), r)
        assert rel_err(ours, r) <= 2 * floor + 1e-4, (name, rel_err(ours, r), floor)


@needs_bf16
def test_bf16_kernel_against_torch_math_float64():
    """A few cases end to end against torch's math SDPA in float64 (the ukernel tests' reference)."""
    for case in (CASES[5], CASES[6], CASES[10], CASES[15]):
        q, k, v, mask, lens, _ = make(case)
        out, _, last = run_fwd(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, lens, case[7], 1 / math.sqrt(case[5]), 0.0)
        assert last == "fwd=bf16"
        ref = torch_reference(case)["out"].detach()
        assert rel_err(out, ref) <= 1e-2, rel_err(out, ref)  # bf16 inputs: ~4e-3 of input rounding


@needs_bf16
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_kernel_nan_and_inf_as_the_float32_kernel(causal):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 140, 32, generator=g).bfloat16() for _ in range(3))
    q[0, 0, 3, 5] = float("nan")
    k[0, 1, 200 % 140, 1] = float("inf")
    v[1, 0, 7, 2] = float("inf")   # 0 * inf at masked keys: NaN as torch's math SDPA
    v[1, 1, 130, 0] = float("-inf")
    lens = torch.tensor([140, 60])
    out, lse, last = run_fwd(q, k, v, None, lens, causal, 0.2, 0.0)
    assert last == "fwd=bf16"
    with mode("own"):
        out32, lse32 = fwd(q.float(), k.float(), v.float(), None, lens, causal, 0.2, 0.0, 0, 0)
    assert torch.equal(torch.isnan(out), torch.isnan(out32)) and torch.isnan(out).any()
    assert torch.equal(torch.isinf(out), torch.isinf(out32.bfloat16()))
    assert torch.equal(torch.isnan(lse), torch.isnan(lse32))
    fin = torch.isfinite(out32)
    assert rel_err(out[fin], out32[fin]) < 1e-2
    dout = torch.randn(out.shape, generator=g).bfloat16()
    grads, last = run_bwd(dout, q, k, v, out, lse, None, lens, causal, 0.2, 0.0)
    assert last == "bwd=bf16"
    g32, _ = run_bwd(dout.float(), q.float(), k.float(), v.float(), out.float(), lse, None, lens, causal, 0.2, 0.0, "own")
    for ours, theirs in zip(grads, g32):
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs)) and torch.isnan(ours).any()
        fin = torch.isfinite(theirs)
        assert rel_err(ours[fin], theirs[fin]) < 2e-2


@needs_bf16
def test_bf16_kernel_bits_do_not_depend_on_the_thread_count():
    case = (1, 2, 2, 300, 600, 64, 80, True, "float", None, 0.1)
    q, k, v, mask, lens, _ = make(case)
    args = [t.bfloat16() for t in (q, k, v, mask)] + [lens, True, 0.125, 0.1]
    dout = torch.randn(1, 2, 300, 80).bfloat16()
    old = torch.get_num_threads()
    res = []
    try:
        for n in (1, max(2, old)):
            torch.set_num_threads(n)
            out, lse, last = run_fwd(*args)
            grads, last_bwd = run_bwd(dout, *args[:3], out, lse, *args[3:])
            assert (last, last_bwd) == ("fwd=bf16", "bwd=bf16")
            res.append((out, lse) + tuple(grads))
    finally:
        torch.set_num_threads(old)
    for one, many in zip(*res):
        assert torch.equal(one, many)


@needs_bf16
def test_bf16_kernel_through_the_drop_in_function():
    """Strict mode, through pyfastdl.functional: the bf16 kernels run, non-contiguous inputs are laid out,
    and every input gets a gradient."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 70, 4, 64, generator=g).bfloat16()
    q = x.transpose(1, 2).requires_grad_()  # (B, H, L, E) view of a (B, L, H, E) tensor: not contiguous
    k, v = (torch.randn(2, 4, 70, 64, generator=g).bfloat16().requires_grad_() for _ in range(2))
    out = PF.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert backends.last_dispatch().backend == "cpu" and backends.last_dispatch().fallback is None
    assert gemm_mode("last").startswith("fwd=bf16")
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert rel_err(out, ref) < 1e-2
    gq, gk, gv = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    assert gemm_mode("last") == "fwd=bf16;bwd=bf16"
    rq, rk, rv = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for ours, theirs in ((gq, rq), (gk, rk), (gv, rv)):
        assert ours.dtype == torch.bfloat16 and rel_err(ours, theirs) < 3e-2


def test_elsewhere_the_bf16_forward_is_the_float32_kernel():
    """Without the bf16 kernel (no AVX512_BF16, an odd head dim, or gemm mode own): fwd=own / blas."""
    q = torch.randn(1, 2, 9, 7).bfloat16()
    out, _, last = run_fwd(q, q, q, None, None, False, 0.3, 0.0)
    assert last in ("fwd=own", "fwd=blas")  # odd head dim
    q = torch.randn(1, 2, 9, 8).bfloat16()
    with mode("own"):
        fwd(q, q, q, None, None, False, 0.3, 0.0, 0, 0)
        assert gemm_mode("last").startswith("fwd=own")
    out, _, last = run_fwd(q, q, q, None, None, False, 0.3, 0.0)
    assert last == ("fwd=bf16" if HAS_BF16 else "fwd=own" if INFO["cpu_capability"] != "DEFAULT" else "fwd=blas")
