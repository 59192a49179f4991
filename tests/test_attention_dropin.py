"""The attention drop-ins against torch, as a user calls them: scaled_dot_product_attention's
broadcasting of leading dimensions, edge sizes (0 heads / queries / keys / head dim), dropout_p=1,
the attn_mask dtype rule; PyTorch's own OpInfo samples; nn.MultiheadAttention with torch's defaults
(need_weights=True, add_bias_kv, add_zero_attn, unbatched input) and PyTorch's ModuleInfo samples;
convert() on torch's TransformerEncoder, trained and evaluated. Strict mode throughout: a passing
test ran pyfastdl's kernel."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import pyfastdl
import pyfastdl.functional as PF
from pyfastdl import backends
from pyfastdl.reference.attention import dropout_keep_mask

from helpers import DEVICE, MARKS

F64 = torch.float64


def torch_sdpa(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def rand(*shape, seed=0, dtype=F64, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype).requires_grad_(grad)


def compare(ours_fn, theirs_fn, inputs, rtol=1e-9, atol=1e-10, backend="cpu"):
    """Output and gradients of every input that requires grad, pyfastdl's (on ``backend``) against
    torch's."""
    ours_in = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
               for t in inputs]
    with backends.use(backend):
        out = ours_fn(*ours_in)
    assert backends.last_dispatch().backend == backend, backends.last_dispatch()
    ref = theirs_fn(*inputs)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=True)
    grads = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not grads:
        return
    d = torch.randn_like(ref)
    theirs = torch.autograd.grad(ref, grads, d, allow_unused=True)
    ours = torch.autograd.grad(out, [t for t in ours_in if isinstance(t, torch.Tensor) and t.requires_grad], d,
                               allow_unused=True)
    for a, b in zip(ours, theirs):
        if b is None:
            b = torch.zeros(())
        if a is None:
            a = torch.zeros(())
        torch.testing.assert_close(a, b.to(a.dtype).expand_as(a) if b.dim() == 0 else b, rtol=rtol, atol=atol)


# ---- leading dimensions broadcast as torch's -----------------------------------------------------------

BROADCAST = [  # (q, k, v) shapes, kwargs
    ((3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {}),          # 3-D query, 4-D key/value
    ((5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {}),             # 2-D query
    ((1, 3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {}),       # batch 1 against 2
    ((2, 1, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {}),       # one query head against 3
    ((2, 3, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8), {}),       # key/value shared by the heads
    ((2, 3, 5, 8), (6, 8), (6, 8), {}),                   # 2-D key/value
    ((2, 3, 5, 8), (1, 3, 6, 8), (2, 3, 6, 8), {}),       # key and value of different batch
    ((2, 2, 3, 5, 8), (2, 3, 6, 8), (1, 3, 6, 8), {}),    # 5-D
    ((3, 5, 8), (1, 6, 8), (3, 6, 8), {}),
    ((2, 4, 5, 8), (1, 2, 6, 8), (2, 2, 6, 8), {"enable_gqa": True}),
    ((2, 12, 5, 8), (2, 4, 6, 8), (2, 3, 6, 8), {"enable_gqa": True}),  # key 4 heads, value 3
    ((2, 4, 5, 8), (2, 2, 6, 8), (2, 1, 6, 8), {"enable_gqa": True}),
    ((4, 5, 8), (2, 6, 8), (2, 6, 8), {"enable_gqa": True}),            # 3-D GQA
    ((4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8), {"enable_gqa": True}),      # OpInfo's shape
    ((3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {"is_causal": True}),
    ((3, 5, 8), (2, 3, 6, 8), (2, 3, 6, 8), {"mask": (2, 1, 5, 6)}),
    ((2, 3, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8), {"mask": (6,)}),
]


@pytest.mark.parametrize("qs,ks,vs,kw", BROADCAST, ids=[f"{q}-{k}-{v}-{sorted(kw)}" for q, k, v, kw in BROADCAST])
def test_sdpa_broadcasts_leading_dimensions_as_torch(qs, ks, vs, kw):
    kw = dict(kw)
    mask = kw.pop("mask", None)
    m = None if mask is None else rand(*mask, seed=4, grad=False)
    compare(lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw),
            lambda q, k, v: torch_sdpa(q, k, v, attn_mask=m, **kw),
            (rand(*qs, seed=1), rand(*ks, seed=2), rand(*vs, seed=3)))


TRITON_CASES = [BROADCAST[i] for i in (0, 4, 9, 14)]


@pytest.mark.parametrize("qs,ks,vs,kw", TRITON_CASES, ids=[f"{q}-{k}-{v}-{sorted(kw)}" for q, k, v, kw in TRITON_CASES])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=MARKS["triton"])])
def test_sdpa_broadcasting_on_triton(backend, qs, ks, vs, kw):
    """The same (B, H, L, E) views reach the Triton kernel (float32, stride-0 broadcast dims)."""
    f32 = torch.float32
    compare(lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, **kw),
            lambda q, k, v: torch_sdpa(q, k, v, **kw),
            tuple(rand(*sh, seed=i, dtype=f32).to(DEVICE[backend]).detach().requires_grad_()
                  for i, sh in enumerate((qs, ks, vs))),
            rtol=1e-4, atol=1e-5, backend=backend)  # float32 against float32: sums in another order


def test_sdpa_broadcast_errors_like_torch():
    with pytest.raises(RuntimeError):
        torch_sdpa(rand(2, 3, 5, 8), rand(3, 3, 6, 8), rand(3, 3, 6, 8))
    with pytest.raises(RuntimeError, match="broadcast"):
        PF.scaled_dot_product_attention(rand(2, 3, 5, 8), rand(3, 3, 6, 8), rand(3, 3, 6, 8))
    with pytest.raises(RuntimeError, match="must divide"):
        PF.scaled_dot_product_attention(rand(2, 1, 5, 8), rand(2, 4, 6, 8), rand(2, 4, 6, 8), enable_gqa=True)
    with pytest.raises(IndexError):  # torch: dim -3 out of range
        PF.scaled_dot_product_attention(rand(5, 8), rand(6, 8), rand(6, 8), enable_gqa=True)


# ---- edge sizes, dropout_p = 1, mask dtypes ------------------------------------------------------------

EDGES = {
    "heads0": ((2, 0, 5, 4), (2, 0, 6, 4), (2, 0, 6, 4)),
    "L0": ((2, 3, 0, 4), (2, 3, 6, 4), (2, 3, 6, 4)),
    "S0": ((2, 3, 5, 4), (2, 3, 0, 4), (2, 3, 0, 4)),
    "B0": ((0, 3, 5, 4), (0, 3, 6, 4), (0, 3, 6, 4)),
    "E0": ((2, 3, 5, 0), (2, 3, 6, 0), (2, 3, 6, 4)),
    "Ev0": ((2, 3, 5, 4), (2, 3, 6, 4), (2, 3, 6, 0)),
}


@pytest.mark.parametrize("scale", [None, 0.5])
@pytest.mark.parametrize("name", list(EDGES))
def test_sdpa_edge_sizes_as_torch(name, scale):
    qs, ks, vs = EDGES[name]
    compare(lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, scale=scale),
            lambda q, k, v: torch_sdpa(q, k, v, scale=scale),
            (rand(*qs, seed=1), rand(*ks, seed=2), rand(*vs, seed=3)))


def test_sdpa_dropout_one_gives_zeros_and_zero_gradients():
    q, k, v = rand(2, 3, 5, 4, seed=1), rand(2, 3, 6, 4, seed=2), rand(2, 3, 6, 4, seed=3)
    out = PF.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert backends.last_dispatch().backend == "cpu"
    assert out.shape == (2, 3, 5, 4) and (out == 0).all()
    for g in torch.autograd.grad(out, (q, k, v), torch.randn_like(out)):
        assert (g == 0).all()
    with pytest.raises(ValueError, match="dropout_p"):
        PF.scaled_dot_product_attention(q, k, v, dropout_p=1.5)


@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float16, torch.int64, torch.bfloat16])
def test_sdpa_refuses_mask_dtypes_torch_refuses(mask_dtype):
    q, k, v = (rand(1, 2, 5, 4, dtype=torch.float32, grad=False) for _ in range(3))
    m = torch.zeros(5, 5, dtype=mask_dtype)
    with pytest.raises(RuntimeError, match="attn_mask dtype"):
        F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    with pytest.raises(RuntimeError, match="attn_mask dtype to be bool or float or to match query dtype"):
        PF.scaled_dot_product_attention(q, k, v, attn_mask=m)


def test_sdpa_float32_mask_with_float64_query_as_torch():
    m = rand(5, 6, seed=5, dtype=torch.float32, grad=False)
    compare(lambda q, k, v: PF.scaled_dot_product_attention(q, k, v, attn_mask=m),
            lambda q, k, v: torch_sdpa(q, k, v, attn_mask=m),
            (rand(2, 3, 5, 4, seed=1), rand(2, 3, 6, 4, seed=2), rand(2, 3, 6, 4, seed=3)))


def test_sdpa_one_d_mask_on_4d_input_is_a_deliberate_difference():
    """torch's CPU flash path raises IndexError for a 1-D mask on 4-D input (its math path, taken
    for 3-D input, broadcasts it); pyfastdl broadcasts it always (documented in the docstring)."""
    q, k, v = rand(1, 2, 5, 4, seed=1), rand(1, 2, 6, 4, seed=2), rand(1, 2, 6, 4, seed=3)
    m = rand(6, seed=4, grad=False)
    with pytest.raises(IndexError):
        F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    torch.testing.assert_close(PF.scaled_dot_product_attention(q, k, v, attn_mask=m),
                               torch_sdpa(q, k, v, attn_mask=m.expand(5, 6)))


# ---- PyTorch's OpInfo samples ---------------------------------------------------------------------------

def _opinfo_samples(dtype):
    pytest.importorskip("expecttest")  # torch.testing._internal imports it
    from torch.testing._internal.common_methods_invocations import op_db
    op = next(o for o in op_db if o.name == "nn.functional.scaled_dot_product_attention")
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


def _out_and_grads(fn, inputs, d):
    ins = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*ins)
    return [out] + list(torch.autograd.grad(out, [t for t in ins if t.requires_grad], d.to(out.dtype)))


def _err(a, b):
    """Largest error relative to the tensor's largest entry (a gradient may be exactly 0 in exact
    arithmetic, where a relative error means nothing)."""
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1.0)).item() if b.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opinfo_samples_match_torch(dtype):
    """Every OpInfo sample of torch's SDPA through pyfastdl's (strict): the same output and
    gradients -- float64 to 1e-9; float32 by FlashAttention's rule, the error against torch in
    float64 at most 2x torch's own float32 error (plus 2e-5, relative to the largest entry).
    Samples with dropout run twice: with dropout_p=0 (compared), and with their dropout_p
    (different random numbers than torch's: shape, finiteness and a backward)."""
    samples = _opinfo_samples(dtype)
    assert len(samples) >= 20
    for s in samples:
        kw = dict(s.kwargs)
        p = kw.pop("dropout_p", 0.0)
        inputs = (s.input,) + tuple(s.args)
        ours_fn = lambda *a: PF.scaled_dot_product_attention(*a, dropout_p=0.0, **kw)  # noqa: E731
        torch_fn = lambda *a: F.scaled_dot_product_attention(*a, dropout_p=0.0, **kw)  # noqa: E731
        if dtype == F64:
            compare(ours_fn, torch_fn, inputs)
        else:
            d = torch.randn(ours_fn(*inputs).shape, dtype=F64)
            ours = _out_and_grads(ours_fn, inputs, d)
            assert backends.last_dispatch().backend == "cpu"
            theirs = _out_and_grads(torch_fn, inputs, d)
            exact = _out_and_grads(torch_fn, [t.double() for t in inputs], d)
            for o, t, e in zip(ours, theirs, exact):
                # + 2e-5: OpInfo entries reach 9, scores ~100; a gradient that is exactly 0 in exact
                # arithmetic (one-hot rows) comes out ~1e-5 from the online softmax in float32
                assert _err(o, e) <= 2 * _err(t, e) + 2e-5, (_err(o, e), _err(t, e))
        if p > 0:
            out = PF.scaled_dot_product_attention(s.input, *s.args, dropout_p=p, **kw)
            ref = F.scaled_dot_product_attention(s.input, *s.args, dropout_p=p, **kw)
            assert out.shape == ref.shape and torch.isfinite(out).all()
            out.sum().backward()


# ---- nn.MultiheadAttention with torch's defaults ----------------------------------------------------------

def _pair(*args, **kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(*args, **kwargs)
    ours = pyfastdl.nn.MultiheadAttention(*args, **kwargs)
    if theirs.bias_k is not None:
        with torch.no_grad():
            theirs.bias_k.normal_()
            theirs.bias_v.normal_()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _check_module(ours, theirs, inputs, kwargs, rtol=1e-9, atol=1e-10):
    """Outputs (out, weights) and the gradients of the inputs and every parameter."""
    ins_o = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    ref, ref_w = theirs(*inputs, **kwargs)
    out, w = ours(*ins_o, **kwargs)
    assert backends.last_dispatch().op == "scaled_dot_product_attention"
    assert backends.last_dispatch().backend == "cpu"
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=True)
    if ref_w is None:
        assert w is None
    else:
        torch.testing.assert_close(w, ref_w, rtol=rtol, atol=atol, equal_nan=True)
    loss_t = (ref * torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype).view_as(ref)).sum()
    loss_o = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    if ref_w is not None:  # the weights take part in the loss too
        loss_t = loss_t + (ref_w * ref_w).sum()
        loss_o = loss_o + (w * w).sum()
    p_t = [p for p in theirs.parameters() if p.requires_grad]
    p_o = [p for p in ours.parameters() if p.requires_grad]
    g_t = torch.autograd.grad(loss_t, [x for x in inputs if x.requires_grad] + p_t, allow_unused=True)
    g_o = torch.autograd.grad(loss_o, [x for x in ins_o if x.requires_grad] + p_o, allow_unused=True)
    for a, b in zip(g_o, g_t):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("average", [True, False], ids=["averaged", "per_head"])
@pytest.mark.parametrize("masks", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("extra", ["plain", "bias_kv", "zero_attn", "both", "kdim"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_attention_with_weights_matches_torch(batch_first, extra, masks, average):
    E, H, N, L, S = 12, 3, 2, 5, 7
    if masks == "causal":
        S = L
    kw = dict(batch_first=batch_first, dtype=F64, add_bias_kv=extra in ("bias_kv", "both"),
              add_zero_attn=extra in ("zero_attn", "both"))
    if extra == "kdim":
        kw.update(kdim=6, vdim=10)
    ours, theirs = _pair(E, H, **kw)
    kd, vd = (6, 10) if extra == "kdim" else (E, E)
    shape = (lambda n, d: (N, n, d)) if batch_first else (lambda n, d: (n, N, d))
    inputs = (rand(*shape(L, E), seed=1), rand(*shape(S, kd), seed=2), rand(*shape(S, vd), seed=3))
    args = {"average_attn_weights": average}
    if masks == "bool":
        kpm = torch.zeros(N, S, dtype=torch.bool)
        kpm[1, -2:] = True
        am = torch.rand(L, S, generator=torch.Generator().manual_seed(5)) > 0.7
        am[:, 0] = False
        args.update(key_padding_mask=kpm, attn_mask=am)
    elif masks == "float":
        args.update(key_padding_mask=rand(N, S, seed=6, grad=False), attn_mask=rand(N * H, L, S, seed=7, grad=False))
    elif masks == "causal":
        args.update(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=F64), is_causal=True)
    _check_module(ours, theirs, inputs, args)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_unbatched_self_attention(need_weights):
    ours, theirs = _pair(8, 2, dtype=F64, add_bias_kv=True)
    x = rand(5, 8, seed=1)
    ref, ref_w = theirs(x, x, x, need_weights=need_weights)
    xo = x.detach().clone().requires_grad_()
    out, w = ours(xo, xo, xo, need_weights=need_weights)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert (w is None) == (ref_w is None)
    if w is not None:
        torch.testing.assert_close(w, ref_w, rtol=1e-9, atol=1e-10)
    d = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, xo, d)[0], torch.autograd.grad(ref, x, d)[0],
                               rtol=1e-9, atol=1e-10)


def test_multihead_attention_weights_under_dropout_are_the_kernels():
    """Training with dropout: torch returns the weights after dropout. pyfastdl's are the weights the
    kernel applied (its Philox mask, regenerated): per-head weights times v, projected, give out."""
    m = pyfastdl.nn.MultiheadAttention(8, 2, dropout=0.4, batch_first=True, dtype=F64).train()
    x = rand(3, 16, 8, seed=1, grad=False)
    out, w = m(x, x, x, average_attn_weights=False)
    assert backends.last_dispatch().backend == "cpu"
    v = F.linear(x, *(t.chunk(3)[2] for t in (m.in_proj_weight, m.in_proj_bias))).view(3, 16, 2, 4).transpose(1, 2)
    again = F.linear((w @ v).transpose(1, 2).reshape(3, 16, 8), m.out_proj.weight, m.out_proj.bias)
    torch.testing.assert_close(out, again, rtol=1e-9, atol=1e-10)
    kept = (w != 0).double().mean().item()
    assert abs(kept - 0.6) < 0.1, kept


def test_dropout_keep_mask_is_the_kernels():
    """The Python Philox (pyfastdl.reference) reproduces the kernel's mask bit for bit: v = I makes
    the kernel's output the dropped weight matrix."""
    B, H, L, S, p, seed = 2, 2, 9, 33, 0.3, 123456789012345
    q, k = rand(B, H, L, 8, seed=1, grad=False), rand(B, H, S, 8, seed=2, grad=False)
    eye = torch.eye(S, dtype=F64).expand(B, H, S, S)
    out, _ = torch.ops.pyfastdl.attention_fwd(q, k, eye, None, None, False, 0.5, p, seed, 0)
    assert torch.equal(out != 0, dropout_keep_mask(seed, 0, (B, H, L, S), p))


def test_multihead_attention_module_info_samples():
    """PyTorch's ModuleInfo samples for nn.MultiheadAttention (torch's defaults: need_weights=True),
    on pyfastdl's module with torch's weights, in training and eval mode (strict)."""
    pytest.importorskip("expecttest")
    from torch.testing._internal.common_modules import module_db
    info = next(m for m in module_db if m.module_cls is torch.nn.MultiheadAttention)
    n = 0
    for training in (True, False):
        for mi in info.module_inputs_func(info, device="cpu", dtype=F64, requires_grad=True, training=training):
            ci, fi = mi.constructor_input, mi.forward_input
            torch.manual_seed(0)
            theirs = torch.nn.MultiheadAttention(*ci.args, **ci.kwargs).to(F64).train(training)
            ours = pyfastdl.nn.MultiheadAttention(*ci.args, **ci.kwargs).to(F64).train(training)
            ours.load_state_dict(theirs.state_dict())
            _check_module(ours, theirs, fi.args, fi.kwargs)
            n += 1
    assert n >= 64


# ---- convert() on torch's TransformerEncoder ------------------------------------------------------------

def _encoder(batch_first):
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=batch_first,
                                             dtype=F64)
    return torch.nn.TransformerEncoder(layer, num_layers=2)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_converted_transformer_encoder_trains_like_torch(batch_first):
    theirs = _encoder(batch_first)
    ours = pyfastdl.convert(copy.deepcopy(theirs))
    assert all(type(layer.self_attn) is pyfastdl.nn.MultiheadAttention for layer in ours.layers)
    N, T = 3, 7
    x = rand(*((N, T, 16) if batch_first else (T, N, 16)), seed=1, grad=False)
    kpm = torch.zeros(N, T, dtype=torch.bool)
    kpm[1, 5:] = True
    kpm[2, 3:] = True
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    for _ in range(3):
        ref = theirs(x, src_key_padding_mask=kpm)
        out = ours(x, src_key_padding_mask=kpm)
        assert backends.last_dispatch().op == "scaled_dot_product_attention"
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
        for opt, y in ((opt_t, ref), (opt_o, out)):
            opt.zero_grad()
            (y * y).sum().backward()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            assert _err(a.grad, b.grad) < 1e-8  # relative to the largest entry: sums reordered
        opt_t.step()
        opt_o.step()
    # eval: torch's fast paths (fused encoder layer op, nested tensors) must not bypass our attention
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        ref = theirs(x, src_key_padding_mask=kpm)
        backends.record("nothing", "cpu")
        out = ours(x, src_key_padding_mask=kpm)
        assert backends.last_dispatch().op == "scaled_dot_product_attention"
    keep = ~kpm if batch_first else ~kpm.T  # torch's nested-tensor path zeroes padded positions
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-9, atol=1e-9)


def test_converted_decoder_layer_runs_pyfastdl_attention():
    torch.manual_seed(0)
    theirs = torch.nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True, dtype=F64)
    ours = pyfastdl.convert(copy.deepcopy(theirs))
    assert type(ours.self_attn) is pyfastdl.nn.MultiheadAttention
    assert type(ours.multihead_attn) is pyfastdl.nn.MultiheadAttention
    tgt, mem = rand(2, 5, 16, seed=1, grad=False), rand(2, 7, 16, seed=2, grad=False)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5, dtype=F64)
    ref = theirs(tgt, mem, tgt_mask=causal, tgt_is_causal=True)
    out = ours(tgt, mem, tgt_mask=causal, tgt_is_causal=True)
    assert backends.last_dispatch().op == "scaled_dot_product_attention"
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)


def test_multihead_attention_fully_masked_row_is_a_deliberate_difference():
    """A query whose every key is masked: torch's need_weights=True path gives NaN output (its
    need_weights=False path gives 0); pyfastdl's kernel gives 0 either way (documented). The
    weights are NaN as torch's; the other rows are unaffected."""
    ours, theirs = _pair(8, 2, dtype=F64, batch_first=True)
    x = rand(2, 4, 8, seed=1, grad=False)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True  # batch 1 sees no key
    ref, ref_w = theirs(x, x, x, key_padding_mask=kpm)
    out, w = ours(x, x, x, key_padding_mask=kpm)
    assert backends.last_dispatch().backend == "cpu"
    assert torch.isnan(ref[1]).all() and torch.isnan(ref_w[1]).all() and torch.isnan(w[1]).all()
    torch.testing.assert_close(out[1], F.linear(torch.zeros(4, 8, dtype=F64), ours.out_proj.weight,
                                                ours.out_proj.bias))
    torch.testing.assert_close(out[0], ref[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(w[0], ref_w[0], rtol=1e-9, atol=1e-10)
    ref0, _ = theirs(x, x, x, key_padding_mask=kpm, need_weights=False)
    out0, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out0, ref0, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_eval_no_grad_where_torch_takes_its_fast_path(need_weights):
    """Eval mode, no grad, batched self-attention: torch runs _native_multi_head_attention; pyfastdl
    runs its kernel (never torch's fast path) and agrees."""
    ours, theirs = _pair(8, 2, dtype=F64, batch_first=True)
    ours.eval()
    theirs.eval()
    x = rand(2, 5, 8, seed=1, grad=False)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        ref, ref_w = theirs(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
        backends.record("nothing", "cpu")
        out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=need_weights)
    assert backends.last_dispatch().op == "scaled_dot_product_attention"
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    if need_weights:
        torch.testing.assert_close(w, ref_w, rtol=1e-9, atol=1e-10)


def test_multihead_attention_refuses_what_torch_refuses():
    ours, theirs = _pair(8, 2, dtype=F64, batch_first=True)
    x = rand(2, 5, 8, seed=1, grad=False)
    bad = [
        ((rand(2, 5, 6, grad=False),) * 3, {}),                                     # embed dim 6, not 8
        ((x, x, x), {"key_padding_mask": torch.zeros(2, 4, dtype=torch.bool)}),     # S is 5
        ((x, x, x), {"attn_mask": torch.zeros(5, 5, dtype=torch.int64)}),           # integer mask
        ((x, x, x), {"is_causal": True}),                                           # hint without a mask
        ((x, x, x), {"attn_mask": torch.zeros(3, 5, 5, dtype=torch.bool)}),         # (N * H, L, S) is (4, 5, 5)
        ((x, rand(2, 6, 8, grad=False), x), {}),                                    # key and value differ
    ]
    for args, kw in bad:
        with pytest.raises(Exception) as theirs_err:
            theirs(*args, **kw)
        with pytest.raises(type(theirs_err.value)):
            ours(*args, **kw)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_multihead_self_attention_projects_with_one_gemm(batch_first, monkeypatch):
    """query is key is value: one input projection (as torch's _in_projection_packed), also after
    the seq-first transpose."""
    m = pyfastdl.nn.MultiheadAttention(8, 2, batch_first=batch_first)
    calls = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(a[1].shape) or linear(*a))
    x = torch.randn(3, 4, 8)
    m(x, x, x, need_weights=False)
    assert calls == [(24, 8), (8, 8)]


@pytest.mark.parametrize("with_padding", [False, True], ids=["causal", "causal+padding"])
def test_converted_encoder_causal_hint(with_padding):
    """TransformerEncoder(mask=causal, is_causal=True): the layers pass the hint to self_attn with
    need_weights=False; pyfastdl uses it as torch does (kernel's is_causal, or the mask with padding)."""
    theirs = _encoder(True)
    ours = pyfastdl.convert(copy.deepcopy(theirs))
    x = rand(2, 6, 16, seed=1, grad=False)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)
    kpm = torch.tensor([[False] * 6, [False] * 4 + [True] * 2]) if with_padding else None
    ref = theirs(x, mask=causal, src_key_padding_mask=kpm, is_causal=True)
    out = ours(x, mask=causal, src_key_padding_mask=kpm, is_causal=True)
    assert backends.last_dispatch().backend == "cpu"
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    grads = [torch.autograd.grad((y * y).sum(), list(m.parameters())) for y, m in ((out, ours), (ref, theirs))]
    for a, b in zip(*grads):
        assert _err(a, b) < 1e-8
