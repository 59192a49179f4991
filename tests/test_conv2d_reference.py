"""pyfastdl.reference.conv2d and .models: the notes' corr2d family and pool2d against their printed
examples and torch.nn.functional; conv2d_like_torch (the oracle of pyfastdl's conv2d kernels)
against F.conv2d in float64 over kernel sizes, stride, padding (int, pair, 4-tuple, 'same',
'valid'), dilation, groups (depthwise included), odd sizes, unbatched input and bad input; and the
notes' CNNs: each builds and gives the shapes the notes print, layer by layer."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pyfastdl import reference as R

from helpers import assert_rel


pytestmark = pytest.mark.usefixtures("one_thread")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- the notes' worked examples (sections 19-22) -----------------------------------------------------

def test_corr2d_notes_example():
    X = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    K = torch.tensor([[0, 1], [2, 3]])
    assert torch.equal(R.corr2d(X, K), torch.tensor([[19., 25.], [37., 43.]]))


def test_corr2d_edge_detection_notes_example():
    X = torch.ones((6, 8))
    X[:, 2:6] = 0
    K = torch.tensor([[-1, 1]])
    row = torch.tensor([0., -1., 0., 0., 0., 1., 0.])
    assert torch.equal(R.corr2d(X, K), row.expand(6, 7))
    # The kernel detects vertical edges only: the transposed image gives zeros (8, 5).
    assert torch.equal(R.corr2d(X.t(), K), torch.zeros(8, 5))


def test_conv2d_layer_learns_the_edge_kernel():
    """Section 19: learn K = [[-1, 1]] from (X, Y) by gradient descent, here with the notes' own
    Conv2D layer (the notes use nn.Conv2d); the loss falls and the kernel approaches [-1, 1]."""
    torch.manual_seed(0)
    X = torch.ones((6, 8))
    X[:, 2:6] = 0
    Y = R.corr2d(X, torch.tensor([[-1., 1.]]))
    conv = R.Conv2D(kernel_size=(1, 2))
    conv.bias.requires_grad_(False)   # the notes train the kernel alone (bias=False)
    losses = []
    for _ in range(10):
        l = ((conv(X) - Y) ** 2).sum()  # noqa: E741
        conv.zero_grad()
        l.backward()
        with torch.no_grad():
            conv.weight -= 3e-2 * conv.weight.grad
        losses.append(l.item())
    assert losses[-1] < 0.05 * losses[0]
    assert torch.allclose(conv.weight.detach(), torch.tensor([[-1., 1.]]), atol=0.15)


def test_comp_conv2d_notes_shapes():
    torch.manual_seed(0)
    X = torch.rand(size=(8, 8))
    assert R.comp_conv2d(nn.Conv2d(1, 1, kernel_size=3, padding=1), X).shape == (8, 8)
    assert R.comp_conv2d(nn.Conv2d(1, 1, kernel_size=(5, 3), padding=(2, 1)), X).shape == (8, 8)
    assert R.comp_conv2d(nn.Conv2d(1, 1, kernel_size=3, padding=1, stride=2), X).shape == (4, 4)
    assert R.comp_conv2d(nn.Conv2d(1, 1, kernel_size=(3, 5), padding=(0, 1), stride=(3, 4)),
                         X).shape == (2, 2)


def test_corr2d_multi_in_book_example():
    """The book's 6.4 example: two input channels, (2, 3, 3) with (2, 2, 2) -> [[56, 72], [104, 120]]."""
    X = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]],
                      [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]])
    K = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 2.0], [3.0, 4.0]]])
    assert torch.equal(R.corr2d_multi_in(X, K), torch.tensor([[56., 72.], [104., 120.]]))
    K3 = torch.stack((K, K + 1, K + 2), 0)
    Y = R.corr2d_multi_in_out(X, K3)
    assert Y.shape == (3, 2, 2)
    assert torch.equal(Y[1], torch.tensor([[76., 100.], [148., 172.]]))


@pytest.mark.parametrize("c_i,c_o,k,h,w", [(1, 1, 1, 3, 3), (3, 2, 2, 5, 4), (4, 3, 3, 7, 6)])
def test_corr2d_multi_in_out_vs_torch(c_i, c_o, k, h, w):
    torch.set_default_dtype(torch.float64)  # corr2d allocates its output in the default dtype
    try:
        g = _g()
        X = torch.randn(c_i, h, w, generator=g)
        K = torch.randn(c_o, c_i, k, k, generator=g)
        ref = F.conv2d(X.unsqueeze(0), K)[0]
        assert_rel(R.corr2d_multi_in_out(X, K), ref, torch.float64, "gemm")
    finally:
        torch.set_default_dtype(torch.float32)


def test_corr2d_multi_in_out_1x1_equals_the_loops():
    g = _g(1)
    X = torch.randn(3, 3, 3, generator=g)
    K = torch.randn(2, 3, 1, 1, generator=g)
    Y1 = R.corr2d_multi_in_out_1x1(X, K)
    Y2 = R.corr2d_multi_in_out(X, K)
    assert float((Y1 - Y2).abs().sum()) < 1e-5
    assert_rel(Y1.double(), F.conv2d(X.double().unsqueeze(0), K.double())[0], torch.float32, "gemm")


def test_pool2d_notes_examples():
    X = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]])
    assert torch.equal(R.pool2d(X, (2, 2)), torch.tensor([[4., 5.], [7., 8.]]))
    assert torch.equal(R.pool2d(X, (2, 2), 'avg'), torch.tensor([[2., 3.], [5., 6.]]))


@pytest.mark.parametrize("mode,torch_pool", [("max", F.max_pool2d), ("avg", F.avg_pool2d)])
def test_pool2d_vs_torch(mode, torch_pool):
    X = torch.randn(7, 6, generator=_g(2))
    ref = torch_pool(X.reshape(1, 1, 7, 6), (3, 2), stride=1)[0, 0]
    torch.testing.assert_close(R.pool2d(X, (3, 2), mode), ref)


# ---- conv2d_like_torch against F.conv2d (float64) ----------------------------------------------------

CASES = [
    # (N, C, H, W, O, k, stride, padding, dilation, groups)
    (2, 3, 7, 7, 4, 1, 1, 0, 1, 1),
    (2, 3, 13, 11, 5, 3, 1, 1, 1, 1),
    (1, 4, 17, 17, 6, 5, 2, 2, 1, 2),
    (2, 3, 13, 13, 2, 7, 2, 3, 1, 1),
    (1, 4, 9, 9, 4, 3, 1, 2, 2, 4),            # depthwise, dilation 2
    (2, 6, 8, 10, 6, 3, (2, 1), (1, 0), (1, 2), 3),
    (1, 2, 1, 1, 3, 1, 1, 0, 1, 1),            # 1x1 spatial
    (1, 2, 1, 1, 3, 3, 1, 1, 1, 1),            # 1x1 spatial, padded 3x3
    (2, 4, 7, 7, 8, 3, 1, "same", 1, 2),
    (2, 3, 8, 8, 4, 4, 1, "same", 1, 1),       # even kernel: the odd padding goes bottom/right
    (1, 3, 9, 9, 2, 3, 1, "same", 2, 1),
    (2, 3, 9, 8, 4, 3, 1, "valid", 1, 1),
    (1, 2, 5, 6, 3, (2, 3), 1, (1, 2), 1, 1),  # rectangular kernel
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("N,C,H,W,O,k,stride,padding,dilation,groups", CASES)
def test_conv2d_like_torch_vs_torch(N, C, H, W, O, k, stride, padding, dilation, groups):
    g = _g(3)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(O, C // groups, kh, kw, generator=g, dtype=torch.float64)
    b = torch.randn(O, generator=g, dtype=torch.float64)
    out = R.conv2d_like_torch(x, w, b, stride, padding, dilation, groups)
    ref = F.conv2d(x, w, b, stride, padding, dilation, groups)
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert_rel(out, ref, torch.float64, "gemm")


def test_conv2d_like_torch_four_padding_and_the_op_convention():
    """A 4-tuple padding is (top, bottom, left, right), the conv2d_fwd op's convention; it equals
    F.pad (left, right, top, bottom) then an unpadded conv."""
    g = _g(4)
    x = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 2, generator=g, dtype=torch.float64)
    out = R.conv2d_like_torch(x, w, None, 1, (0, 2, 1, 0))
    ref = F.conv2d(F.pad(x, (1, 0, 0, 2)), w)
    assert_rel(out, ref, torch.float64, "gemm")
    assert R.conv2d_padding("same", (4, 4)) == (1, 2, 1, 2)
    assert R.conv2d_padding("same", (3, 3), dilation=2) == (2, 2, 2, 2)
    assert R.conv2d_padding((1, 2), (3, 3)) == (1, 1, 2, 2)
    assert R.conv2d_out_size((7, 7), (3, 3), 2, (1, 1, 1, 1)) == (4, 4)


def test_conv2d_like_torch_unbatched_noncontiguous_float32_and_grads():
    g = _g(5)
    x = torch.randn(3, 11, 9, generator=g, dtype=torch.float64).transpose(1, 2)   # non-contiguous
    w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)
    out = R.conv2d_like_torch(x, w, b, 2, 1)
    ref = F.conv2d(x, w, b, 2, 1)
    assert out.shape == ref.shape == (5, 5, 6)
    assert_rel(out, ref, torch.float64, "gemm")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w, b), go)
    grads_ref = torch.autograd.grad(ref, (x, w, b), go)
    for a, r in zip(grads, grads_ref):
        assert_rel(a, r, torch.float64, "gemm")
    # float32 in, float32 out, within the gemm tolerance of the float64 result.
    out32 = R.conv2d_like_torch(x.detach().float(), w.detach().float(), b.detach().float(), 2, 1)
    assert out32.dtype == torch.float32
    assert_rel(out32, ref, torch.float32, "gemm")


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=2), "groups"),                                           # 3 channels, groups 2
    (dict(w_shape=(4, 3, 9, 9)), "larger than the padded input"),
    (dict(w_shape=(4, 3, 3)), "weight must be 4-D"),
    (dict(w_shape=(4, 2, 3, 3)), "input channels"),
    (dict(padding="same", stride=2), "'same'"),
    (dict(padding="full"), "padding must be"),
    (dict(padding=-1), ">= 0"),
    (dict(stride=0), ">= 1"),
])
def test_conv2d_like_torch_bad_input(kwargs, match):
    x = torch.randn(1, 3, 5, 5)
    w = torch.randn(*kwargs.pop("w_shape", (4, 3, 3, 3)))
    with pytest.raises(ValueError, match=match):
        R.conv2d_like_torch(x, w, **kwargs)


# ---- the notes' models ------------------------------------------------------------------------------

def _full(make):
    """The full-size model, built on the meta device (no memory, no initialization time)."""
    with torch.device("meta"):
        return make()


def _layer_shapes(net, X):
    shapes = []
    for layer in net:
        X = layer(X)
        shapes.append(tuple(X.shape))
    return shapes


def test_lenet_shapes_and_the_batch_norm_lenet():
    torch.manual_seed(0)
    X = torch.rand(size=(1, 1, 28, 28))
    shapes = _layer_shapes(R.lenet(), X)
    assert shapes[0] == (1, 6, 28, 28) and shapes[2] == (1, 6, 14, 14)
    assert shapes[3] == (1, 16, 10, 10) and shapes[5] == (1, 16, 5, 5)
    assert shapes[6] == (1, 400) and shapes[-1] == (1, 10)
    net = R.lenet_batch_norm()
    assert isinstance(net[1], R.BatchNorm) and isinstance(net[10], R.BatchNorm)
    X = torch.rand(size=(4, 1, 28, 28))
    net.train()
    assert net(X).shape == (4, 10)
    assert net[1].moving_mean.shape == (1, 6, 1, 1)
    assert not torch.equal(net[1].moving_mean, torch.zeros(1, 6, 1, 1))   # the notes' update ran
    net.eval()
    assert net(X[:1]).shape == (1, 10)
    assert R.lenet_batch_norm(scratch=False)(X).shape == (4, 10)


def test_alexnet_shapes():
    net = R.alexnet(ratio=16)
    shapes = _layer_shapes(net.eval(), torch.rand(1, 1, 224, 224))
    assert shapes[0] == (1, 6, 54, 54) and shapes[2] == (1, 6, 26, 26)
    assert shapes[5] == (1, 16, 12, 12) and shapes[12] == (1, 16, 5, 5) and shapes[13] == (1, 400)
    assert shapes[-1] == (1, 10)
    assert _full(R.alexnet)[14].in_features == 6400          # the notes' Linear(6400, 4096)
    assert R.alexnet(ratio=8, img_size=96)(torch.rand(2, 1, 96, 96)).shape == (2, 10)


def test_vgg11_shapes():
    net = R.vgg11(ratio=16)
    shapes = _layer_shapes(net.eval(), torch.rand(1, 1, 224, 224))
    assert shapes[:5] == [(1, 4, 112, 112), (1, 8, 56, 56), (1, 16, 28, 28), (1, 32, 14, 14),
                          (1, 32, 7, 7)]
    assert shapes[5] == (1, 32 * 7 * 7) and shapes[-1] == (1, 10)
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 8
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 3      # 8 + 3 = 11 layers
    assert _full(R.vgg11)[-1].in_features == 4096


def test_nin_shapes():
    net = R.nin(ratio=16)
    shapes = _layer_shapes(net.eval(), torch.rand(1, 1, 224, 224))
    # The notes print (1, 96, 54, 54), (1, 96, 26, 26), (1, 256, 26, 26), (1, 256, 12, 12),
    # (1, 384, 12, 12), (1, 384, 5, 5) x2, (1, 10, 5, 5), (1, 10, 1, 1), (1, 10); channels / 16 here.
    assert shapes == [(1, 6, 54, 54), (1, 6, 26, 26), (1, 16, 26, 26), (1, 16, 12, 12),
                      (1, 24, 12, 12), (1, 24, 5, 5), (1, 24, 5, 5), (1, 10, 5, 5), (1, 10, 1, 1),
                      (1, 10)]


def test_googlenet_shapes():
    blk = R.Inception(192, 64, (96, 128), (16, 32), 32)
    assert blk(torch.rand(1, 192, 4, 4)).shape == (1, 256, 4, 4)
    net = R.googlenet(ratio=16)
    shapes = _layer_shapes(net, torch.rand(1, 1, 96, 96))
    # The book (96x96): (1, 64, 24, 24), (1, 192, 12, 12), (1, 480, 6, 6), (1, 832, 3, 3), (1, 1024),
    # (1, 10); channels // 16 per path here.
    assert shapes == [(1, 4, 24, 24), (1, 12, 12, 12), (1, 30, 6, 6), (1, 52, 3, 3), (1, 64), (1, 10)]
    assert _full(R.googlenet)[-1].in_features == 1024


def test_resnet18_shapes():
    X = torch.rand((4, 3, 6, 6))
    assert R.Residual(3, 3)(X).shape == (4, 3, 6, 6)
    assert R.Residual(3, 6, use_1x1conv=True, strides=2)(X).shape == (4, 6, 3, 3)
    net = R.resnet18(ratio=8)
    shapes = _layer_shapes(net, torch.rand(1, 1, 224, 224))
    # 002 prints (1, 64, 56, 56) after the stem, then 64/56, 128/28, 256/14, 512/7, (1, 512, 1, 1), ...
    assert shapes == [(1, 8, 56, 56), (1, 8, 56, 56), (1, 16, 28, 28), (1, 32, 14, 14), (1, 64, 7, 7),
                      (1, 64, 1, 1), (1, 64), (1, 10)]
    full = _full(R.resnet18)
    convs = [m for m in full.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert len(convs) + 1 == 18    # 17 convs (1x1 shortcuts aside) and the linear layer
    out = net(torch.rand(2, 1, 96, 96))
    out.sum().backward()           # the out-of-place shortcut is differentiable
    assert out.shape == (2, 10)


def test_densenet_blocks_and_shapes():
    blk = R.DenseBlock(2, 3, 10)
    Y = blk(torch.rand(4, 3, 8, 8))
    assert Y.shape == (4, 23, 8, 8) and blk.out_channels == 23
    assert R.transition_block(23, 10)(Y).shape == (4, 10, 4, 4)
    assert R.conv_block(3, 5)(torch.rand(2, 3, 5, 5)).shape == (2, 5, 5, 5)
    net = R.densenet(ratio=8)
    shapes = _layer_shapes(net, torch.rand(2, 1, 96, 96))
    # stem 8/24, dense 8+4*4=24 -> transition 12/12 -> 28 -> 14/6 -> 30 -> 15/3 -> 31, pool, linear
    assert shapes[:8] == [(2, 8, 24, 24), (2, 24, 24, 24), (2, 12, 12, 12), (2, 28, 12, 12),
                          (2, 14, 6, 6), (2, 30, 6, 6), (2, 15, 3, 3), (2, 31, 3, 3)]
    assert shapes[-1] == (2, 10)
    assert _full(R.densenet)[-1].in_features == 248     # the book's 248 channels


@pytest.mark.parametrize("make,size", [(R.lenet, 28), (R.alexnet, 224), (R.vgg11, 224), (R.nin, 224),
                                       (R.googlenet, 96), (R.resnet18, 96), (R.densenet, 96)])
def test_models_train_one_step(make, size):
    """Each small model runs forward and backward and its loss falls after an SGD step on a fixed
    batch (the same batch again), with 3 input channels."""
    torch.manual_seed(0)
    net = make(in_channels=3, ratio=16) if make is not R.lenet else make(in_channels=3)
    X = torch.rand(8, 3, size, size)
    y = torch.arange(8) % 10
    net.train()
    if make in (R.alexnet, R.vgg11, R.nin):
        net.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, nn.Dropout) else None)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    losses = []
    for _ in range(2):
        loss = F.cross_entropy(net(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]
