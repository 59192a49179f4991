"""The notes' convolutional networks (d2l style, sections 23-29 of the notes and the ResNet/DenseNet
notes of ``002_c8639e4a56736703.txt``), built with torch.nn layers as the notes build them and
runnable without the d2l package.

Where the code comes from:

* The notes' own code: ``lenet`` (section 23), ``alexnet`` (section 24), ``nin_block`` / ``nin``
  (section 26), ``Residual`` / ``resnet_block`` / ``resnet18`` (section 29), ``lenet_batch_norm``
  (the LeNet with the notes' from-scratch ``BatchNorm``, 002 "批量归一化"; its
  ``d2l.FlattenLayer`` is ``nn.Flatten``), ``conv_block`` / ``DenseBlock`` / ``transition_block``
  (002 "DenseNet").
* Sections 25 (VGG) and 27 (GoogLeNet) keep only prose, and 002 stops DenseNet at its blocks; those
  come from the d2l book the notes follow (Dive into Deep Learning, zh-v2, PyTorch code): ``vgg_block``
  / ``vgg`` (7.2), ``Inception`` / ``googlenet`` (7.4), the DenseNet model ``densenet`` (7.7).

Every model function returns an ``nn.Sequential`` (as the notes do) and takes, beyond the notes'
fixed architecture, ``in_channels`` (the notes: 1, Fashion-MNIST), ``num_classes`` (10) and
``ratio``: every hidden channel count and hidden fully connected width is divided by ``ratio`` (at
least 1), as the book's small VGG (``small_conv_arch``) does, so tests can build small versions.
Models whose classifier size depends on the input (AlexNet, VGG) also take ``img_size``.

Input sizes in the notes: LeNet 28x28; AlexNet, VGG, NiN 224x224; GoogLeNet and ResNet 96x96 (the
book's training size; the notes print ResNet shapes at 224), DenseNet 96x96.

One deliberate difference from the notes: ``Residual.forward`` adds the shortcut out of place
(``Y = Y + X``, the notes write ``Y += X``), so a fused normalization layer whose backward saves its
output can be swapped in; the value is the same.
"""
import torch
from torch import nn
from torch.nn import functional as F

from .batch_norm import BatchNorm

__all__ = ["lenet", "lenet_batch_norm", "alexnet", "vgg_block", "vgg", "vgg11", "nin_block", "nin",
           "Inception", "googlenet", "Residual", "resnet_block", "resnet18", "conv_block",
           "DenseBlock", "transition_block", "densenet"]


def _c(n, ratio):
    """A channel count divided by ratio, at least 1."""
    return max(1, n // ratio)


def _out(n, k, s=1, p=0):
    return (n + 2 * p - k) // s + 1


# ---- LeNet (section 23; with batch norm: 002) --------------------------------------------------------

def lenet(in_channels=1, num_classes=10, ratio=1):
    """LeNet-5 as section 23 builds it: 28x28 input (padding 2 on the first conv), sigmoid, average
    pooling. (N, in_channels, 28, 28) -> (N, num_classes)."""
    c1, c2 = _c(6, ratio), _c(16, ratio)
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, kernel_size=5, padding=2), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(c1, c2, kernel_size=5), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(c2 * 5 * 5, _c(120, ratio)), nn.Sigmoid(),
        nn.Linear(_c(120, ratio), _c(84, ratio)), nn.Sigmoid(),
        nn.Linear(_c(84, ratio), num_classes))


def lenet_batch_norm(in_channels=1, num_classes=10, ratio=1, scratch=True):
    """The notes' LeNet with batch normalization (002): no padding, max pooling, a BatchNorm after
    every conv and hidden linear layer. scratch=True uses the notes' from-scratch ``BatchNorm``
    (pyfastdl.reference.batch_norm), False torch's nn.BatchNorm2d/1d (the book's concise version).
    (N, in_channels, 28, 28) -> (N, num_classes)."""
    c1, c2, f1, f2 = _c(6, ratio), _c(16, ratio), _c(120, ratio), _c(84, ratio)
    bn4 = (lambda n: BatchNorm(n, num_dims=4)) if scratch else nn.BatchNorm2d
    bn2 = (lambda n: BatchNorm(n, num_dims=2)) if scratch else nn.BatchNorm1d
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5), bn4(c1), nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(c1, c2, 5), bn4(c2), nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(c2 * 4 * 4, f1), bn2(f1), nn.Sigmoid(),
        nn.Linear(f1, f2), bn2(f2), nn.Sigmoid(),
        nn.Linear(f2, num_classes))


# ---- AlexNet (section 24) ----------------------------------------------------------------------------

def alexnet(in_channels=1, num_classes=10, ratio=1, img_size=224):
    """AlexNet as section 24 builds it (Fashion-MNIST resized to 224: the first linear layer takes
    256 * 5 * 5 = 6400). (N, in_channels, img_size, img_size) -> (N, num_classes)."""
    c1, c2, c3, fc = _c(96, ratio), _c(256, ratio), _c(384, ratio), _c(4096, ratio)
    s = _out(img_size, 11, 4, 1)          # 11x11 stride 4 padding 1
    s = _out(s, 3, 2)                     # max pool 3, stride 2
    s = _out(s, 3, 2)                     # (5x5 conv keeps the size) max pool
    s = _out(s, 3, 2)                     # (three 3x3 convs keep it) max pool
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, kernel_size=11, stride=4, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(c1, c2, kernel_size=5, padding=2), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(c2, c3, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c3, kernel_size=3, padding=1), nn.ReLU(),
        nn.Conv2d(c3, c2, kernel_size=3, padding=1), nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Flatten(),
        nn.Linear(c2 * s * s, fc), nn.ReLU(),
        nn.Dropout(p=0.5),
        nn.Linear(fc, fc), nn.ReLU(),
        nn.Dropout(p=0.5),
        nn.Linear(fc, num_classes))


# ---- VGG (section 25; code from the book, 7.2) -------------------------------------------------------

def vgg_block(num_convs, in_channels, out_channels):
    """num_convs 3x3 convs (padding 1, ReLU) then a 2x2 max pool of stride 2 (halves H and W)."""
    layers = []
    for _ in range(num_convs):
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        layers.append(nn.ReLU())
        in_channels = out_channels
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


def vgg(conv_arch, in_channels=1, num_classes=10, fc_width=4096, img_size=224):
    """VGG from conv_arch = ((num_convs, out_channels), ...), then three linear layers with dropout.
    Each block halves the size: the classifier takes out_channels * (img_size >> len(conv_arch))**2."""
    conv_blks = []
    for (num_convs, out_channels) in conv_arch:
        conv_blks.append(vgg_block(num_convs, in_channels, out_channels))
        in_channels = out_channels
    s = img_size >> len(conv_arch)
    return nn.Sequential(
        *conv_blks, nn.Flatten(),
        nn.Linear(out_channels * s * s, fc_width), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(fc_width, fc_width), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(fc_width, num_classes))


def vgg11(in_channels=1, num_classes=10, ratio=1, img_size=224):
    """VGG-11: conv_arch ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)), channels // ratio (the
    book trains ratio=4). (N, in_channels, img_size, img_size) -> (N, num_classes)."""
    conv_arch = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))
    return vgg([(n, _c(c, ratio)) for n, c in conv_arch], in_channels, num_classes,
               _c(4096, ratio), img_size)


# ---- NiN (section 26) --------------------------------------------------------------------------------

def nin_block(in_channels, out_channels, kernel_size, strides, padding):
    """A conv followed by two 1x1 convs, each with ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, strides, padding),
        nn.ReLU(), nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(), nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU())


def nin(in_channels=1, num_classes=10, ratio=1):
    """NiN as section 26 builds it: four NiN blocks, max pools, global average pooling; no linear
    layer. 224x224 input: (N, 96, 54, 54), (N, 96, 26, 26), ..., (N, 10, 5, 5), (N, 10)."""
    c1, c2, c3 = _c(96, ratio), _c(256, ratio), _c(384, ratio)
    return nn.Sequential(
        nin_block(in_channels, c1, kernel_size=11, strides=4, padding=0),
        nn.MaxPool2d(3, stride=2),
        nin_block(c1, c2, kernel_size=5, strides=1, padding=2),
        nn.MaxPool2d(3, stride=2),
        nin_block(c2, c3, kernel_size=3, strides=1, padding=1),
        nn.MaxPool2d(3, stride=2), nn.Dropout(0.5),
        nin_block(c3, num_classes, kernel_size=3, strides=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten())


# ---- GoogLeNet (section 27; code from the book, 7.4) -------------------------------------------------

class Inception(nn.Module):
    """Four parallel paths concatenated on channels: 1x1 conv (c1); 1x1 (c2[0]) then 3x3 (c2[1]);
    1x1 (c3[0]) then 5x5 (c3[1]); 3x3 max pool then 1x1 (c4). Output channels c1 + c2[1] + c3[1] + c4,
    H and W kept."""

    def __init__(self, in_channels, c1, c2, c3, c4, **kwargs):
        super().__init__(**kwargs)
        self.p1_1 = nn.Conv2d(in_channels, c1, kernel_size=1)
        self.p2_1 = nn.Conv2d(in_channels, c2[0], kernel_size=1)
        self.p2_2 = nn.Conv2d(c2[0], c2[1], kernel_size=3, padding=1)
        self.p3_1 = nn.Conv2d(in_channels, c3[0], kernel_size=1)
        self.p3_2 = nn.Conv2d(c3[0], c3[1], kernel_size=5, padding=2)
        self.p4_1 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.p4_2 = nn.Conv2d(in_channels, c4, kernel_size=1)
        self.out_channels = c1 + c2[1] + c3[1] + c4

    def forward(self, x):
        p1 = F.relu(self.p1_1(x))
        p2 = F.relu(self.p2_2(F.relu(self.p2_1(x))))
        p3 = F.relu(self.p3_2(F.relu(self.p3_1(x))))
        p4 = F.relu(self.p4_2(self.p4_1(x)))
        return torch.cat((p1, p2, p3, p4), dim=1)


def googlenet(in_channels=1, num_classes=10, ratio=1):
    """GoogLeNet (the book's version for Fashion-MNIST at 96x96): five stages b1..b5, nine Inception
    blocks, global average pooling, one linear layer. At 96x96: b1 (N, 64, 24, 24), b2 (N, 192, 12,
    12), b3 (N, 480, 6, 6), b4 (N, 832, 3, 3), b5 (N, 1024)."""
    c = lambda n: _c(n, ratio)  # noqa: E731

    def inception(cin, c1, c2, c3, c4):
        return Inception(cin, c(c1), (c(c2[0]), c(c2[1])), (c(c3[0]), c(c3[1])), c(c4))

    b1 = nn.Sequential(nn.Conv2d(in_channels, c(64), kernel_size=7, stride=2, padding=3),
                       nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b2 = nn.Sequential(nn.Conv2d(c(64), c(64), kernel_size=1), nn.ReLU(),
                       nn.Conv2d(c(64), c(192), kernel_size=3, padding=1), nn.ReLU(),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    # Each block's input channels are the previous block's output channels (256, 480, 512, ...).
    blocks3, cin = [], c(192)
    for args in ((64, (96, 128), (16, 32), 32), (128, (128, 192), (32, 96), 64)):
        blocks3.append(inception(cin, *args))
        cin = blocks3[-1].out_channels
    b3 = nn.Sequential(*blocks3, nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    blocks4 = []
    for args in ((192, (96, 208), (16, 48), 64), (160, (112, 224), (24, 64), 64),
                 (128, (128, 256), (24, 64), 64), (112, (144, 288), (32, 64), 64),
                 (256, (160, 320), (32, 128), 128)):
        blocks4.append(inception(cin, *args))
        cin = blocks4[-1].out_channels
    b4 = nn.Sequential(*blocks4, nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    blocks5 = []
    for args in ((256, (160, 320), (32, 128), 128), (384, (192, 384), (48, 128), 128)):
        blocks5.append(inception(cin, *args))
        cin = blocks5[-1].out_channels
    b5 = nn.Sequential(*blocks5, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
    return nn.Sequential(b1, b2, b3, b4, b5, nn.Linear(cin, num_classes))


# ---- ResNet (section 29) -----------------------------------------------------------------------------

class Residual(nn.Module):
    """The residual block: conv3x3 (stride) -> BN -> ReLU -> conv3x3 -> BN, plus the input (through a
    1x1 conv of the same stride when use_1x1conv), then ReLU."""

    def __init__(self, input_channels, num_channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y = Y + X   # the notes: Y += X (see the module docstring)
        return F.relu(Y)


def resnet_block(input_channels, num_channels, num_residuals, first_block=False):
    """A list (as section 29 returns it) of num_residuals Residual blocks; all but the first stage
    halve H and W and change the channels in their first block."""
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(input_channels, num_channels, use_1x1conv=True, strides=2))
        else:
            blk.append(Residual(num_channels, num_channels))
    return blk


def resnet18(in_channels=1, num_classes=10, ratio=1):
    """ResNet-18 as section 29 builds it: the 7x7 stem (BN, ReLU, max pool), four stages of two
    residual blocks (64, 128, 256, 512 channels), global average pooling, one linear layer.
    At 224x224: b1 (N, 64, 56, 56), b2 (N, 64, 56, 56), b3 (N, 128, 28, 28), b4 (N, 256, 14, 14),
    b5 (N, 512, 7, 7), then (N, 512, 1, 1), (N, 512), (N, num_classes)."""
    c64, c128, c256, c512 = (_c(n, ratio) for n in (64, 128, 256, 512))
    b1 = nn.Sequential(nn.Conv2d(in_channels, c64, kernel_size=7, stride=2, padding=3),
                       nn.BatchNorm2d(c64), nn.ReLU(),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b2 = nn.Sequential(*resnet_block(c64, c64, 2, first_block=True))
    b3 = nn.Sequential(*resnet_block(c64, c128, 2))
    b4 = nn.Sequential(*resnet_block(c128, c256, 2))
    b5 = nn.Sequential(*resnet_block(c256, c512, 2))
    return nn.Sequential(b1, b2, b3, b4, b5,
                         nn.AdaptiveAvgPool2d((1, 1)),
                         nn.Flatten(), nn.Linear(c512, num_classes))


# ---- DenseNet (002; the model from the book, 7.7) ----------------------------------------------------

def conv_block(in_channels, out_channels):
    """BN -> ReLU -> 3x3 conv (padding 1): the unit of a dense block."""
    return nn.Sequential(nn.BatchNorm2d(in_channels),
                         nn.ReLU(),
                         nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))


class DenseBlock(nn.Module):
    """num_convs conv_blocks, each fed the concatenation of the block's input and all previous
    outputs; output channels in_channels + num_convs * out_channels (002: DenseBlock(2, 3, 10) on
    (4, 3, 8, 8) gives (4, 23, 8, 8))."""

    def __init__(self, num_convs, in_channels, out_channels):
        super().__init__()
        net = []
        for i in range(num_convs):
            in_c = in_channels + i * out_channels
            net.append(conv_block(in_c, out_channels))
        self.net = nn.ModuleList(net)
        self.out_channels = in_channels + num_convs * out_channels

    def forward(self, X):
        for blk in self.net:
            Y = blk(X)
            X = torch.cat((X, Y), dim=1)
        return X


def transition_block(in_channels, out_channels):
    """BN -> ReLU -> 1x1 conv (fewer channels) -> 2x2 average pool of stride 2 (halves H and W);
    002: transition_block(23, 10) on (4, 23, 8, 8) gives (4, 10, 4, 4)."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, kernel_size=1),
        nn.AvgPool2d(kernel_size=2, stride=2))


def densenet(in_channels=1, num_classes=10, ratio=1, num_convs_in_dense_blocks=(4, 4, 4, 4)):
    """DenseNet (the book's, 7.7): the ResNet stem with 64 channels, four dense blocks of growth rate
    32 separated by transition blocks halving the channels, BN, ReLU, global average pooling, one
    linear layer (248 channels at the end with ratio 1)."""
    num_channels, growth_rate = _c(64, ratio), _c(32, ratio)
    b1 = nn.Sequential(nn.Conv2d(in_channels, num_channels, kernel_size=7, stride=2, padding=3),
                       nn.BatchNorm2d(num_channels), nn.ReLU(),
                       nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    blks = []
    for i, num_convs in enumerate(num_convs_in_dense_blocks):
        blks.append(DenseBlock(num_convs, num_channels, growth_rate))
        num_channels += num_convs * growth_rate
        if i != len(num_convs_in_dense_blocks) - 1:
            blks.append(transition_block(num_channels, num_channels // 2))
            num_channels = num_channels // 2
    return nn.Sequential(
        b1, *blks,
        nn.BatchNorm2d(num_channels), nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(num_channels, num_classes))
