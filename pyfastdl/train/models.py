"""The models ``python -m pyfastdl train`` knows, their offline data, their loss and metric.

Every model is built from the notes' code in ``pyfastdl.reference`` with plain torch layers (the
"plain torch model": ``pyfastdl.convert`` swaps its layers, a checkpoint loads back into it):

=========== ===================================================== ====================================
name        model                                                 data (offline on every machine)
=========== ===================================================== ====================================
lenet-bn    the notes' LeNet with batch norm (torch's BatchNorm,  scikit-learn's 8x8 digits upscaled
            the book's concise version), 28x28                    to 28x28 (bilinear)
resnet18    the notes' ResNet-18, channels / 8 (8..64), 32x32     the digits at 32x32
densenet    the book's DenseNet, channels / 4 (stem 16, growth 8) the digits at 32x32
lstm-lm     the notes' concise character LM (``RNNModel``:        the shipped corpus
            one-hot -> nn.LSTM(28, 256) -> Linear), 35 steps      (``reference.corpus``), 28 chars
gru-lm      the same with nn.GRU                                  the same
transformer the notes' ``TransformerEncoder`` (2 blocks, 64       synthetic: sort the valid tokens
            hidden, 4 heads) + a per-position Linear head         (valid_lens) of random sequences
bert        the notes' ``BERTEncoder`` (2 blocks, 64 hidden, 4     the same, two segments
            heads) + a per-position Linear head
=========== ===================================================== ====================================

The digits (1797 images, 10 classes) are split 80/20 with a fixed permutation (seed 0); pixel values
0..16 are scaled to [0, 1] and normalized with the training split's mean and standard deviation.
The corpus is split 90/10 (training text first); the LM reads non-overlapping windows of 35 + 1
characters, each window starting from a zero state (the notes' random sampling). The sort task:
sequences of length 16 over 16 symbols (ids 1..16, 0 is padding), each of a valid length drawn from
4..16; the target at position i < valid_len is the i-th smallest valid token, positions past it are
ignored by the loss.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Spec", "MODELS", "build", "datasets", "SeqModel", "batch_loss", "evaluate"]


@dataclasses.dataclass
class Spec:
    name: str
    kind: str                           # "image", "lm" or "seq"
    description: str
    build: Callable[[], nn.Module]      # the plain torch model (fresh weights from torch's RNG)
    optimizer: str                      # a torch.optim / pyfastdl.optim class name
    optim_kwargs: dict
    batch_size: int                     # the training batch (and the benchmark's)
    metric: str                         # "accuracy" (higher is better) or "perplexity" (lower)
    target: float                       # the validation metric whose time-to is reported
    clip: float | None = None           # global-norm gradient clipping (the notes' LM: 1)
    img_size: int | None = None
    channels_last: bool = False         # torch's CPU path is faster with channels_last (benchmarked)


# ---- the sequence models ------------------------------------------------------------------------------

SEQ_LEN, SEQ_VOCAB = 16, 16             # the sort task: 16 positions, symbols 1..16, 0 = padding


class SeqModel(nn.Module):
    """The notes' TransformerEncoder or BERTEncoder followed by a per-position linear head:
    forward(tokens (B, L) int64, valid_lens (B,)) -> logits (B, L, num_classes). For the BERT
    encoder the segments are 0 on the first half of each sequence's valid part and 1 after it."""

    def __init__(self, encoder: nn.Module, num_hiddens: int, num_classes: int, bert: bool = False):
        super().__init__()
        self.encoder, self.bert = encoder, bert
        self.head = nn.Linear(num_hiddens, num_classes)

    def forward(self, tokens, valid_lens):
        if self.bert:
            pos = torch.arange(tokens.shape[1], device=tokens.device)
            segments = (pos[None, :] >= (valid_lens[:, None] + 1) // 2).long()
            h = self.encoder(tokens, segments, valid_lens)
        else:
            h = self.encoder(tokens, valid_lens)
        return self.head(h)


def _transformer(hidden=64, heads=4, layers=2, ffn=128, dropout=0.0):
    from pyfastdl.reference.attention import TransformerEncoder
    enc = TransformerEncoder(SEQ_VOCAB + 1, hidden, hidden, hidden, hidden, [hidden], hidden, ffn, heads,
                             layers, dropout)
    return SeqModel(enc, hidden, SEQ_VOCAB + 1)


def _bert(hidden=64, heads=4, layers=2, ffn=128, dropout=0.0):
    from pyfastdl.reference.attention import BERTEncoder
    enc = BERTEncoder(SEQ_VOCAB + 1, hidden, [hidden], hidden, ffn, heads, layers, dropout, max_len=64,
                      key_size=hidden, query_size=hidden, value_size=hidden)
    return SeqModel(enc, hidden, SEQ_VOCAB + 1, bert=True)


def _lm(cell: str, hidden=256):
    from pyfastdl.reference.corpus import load_corpus
    from pyfastdl.reference.rnn import RNNModel
    vocab = len(load_corpus(max_tokens=1)[1])
    return RNNModel(getattr(nn, cell)(vocab, hidden), vocab)


def _lenet():
    from pyfastdl.reference.models import lenet_batch_norm
    return lenet_batch_norm(scratch=False)


def _resnet():
    from pyfastdl.reference.models import resnet18
    return resnet18(ratio=8)


def _densenet():
    from pyfastdl.reference.models import densenet
    return densenet(ratio=4)


_SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
MODELS: dict[str, Spec] = {s.name: s for s in [
    Spec("lenet-bn", "image", "the notes' LeNet with batch norm (torch's BatchNorm2d/1d), digits 28x28",
         _lenet, "SGD", dict(_SGD, lr=0.01), 64, "accuracy", 0.95, img_size=28),
    Spec("resnet18", "image", "the notes' ResNet-18, channels / 8, digits 32x32",
         _resnet, "SGD", _SGD, 64, "accuracy", 0.95, img_size=32, channels_last=True),
    Spec("densenet", "image", "the book's DenseNet (4 blocks of 4), channels / 4, digits 32x32",
         _densenet, "SGD", _SGD, 64, "accuracy", 0.95, img_size=32, channels_last=True),
    Spec("lstm-lm", "lm", "the notes' character LM: one-hot -> nn.LSTM(28, 256) -> Linear, 35 steps",
         lambda: _lm("LSTM"), "Adam", dict(lr=0.005), 32, "perplexity", 8.0, clip=1.0),
    Spec("gru-lm", "lm", "the notes' character LM with nn.GRU(28, 256), 35 steps",
         lambda: _lm("GRU"), "Adam", dict(lr=0.005), 32, "perplexity", 8.0, clip=1.0),
    Spec("transformer", "seq", "the notes' TransformerEncoder (2 blocks, 64 hidden, 4 heads), sort task",
         _transformer, "AdamW", dict(lr=2e-3, weight_decay=0.01), 64, "accuracy", 0.8),
    Spec("bert", "seq", "the notes' BERTEncoder (2 blocks, 64 hidden, 4 heads), sort task, 2 segments",
         _bert, "AdamW", dict(lr=2e-3, weight_decay=0.01), 64, "accuracy", 0.8),
]}


def build(name: str, seed: int | None = None) -> nn.Module:
    """The plain torch model ``name`` (weights from torch's RNG, seeded first when ``seed`` is given)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name].build()


# ---- data -------------------------------------------------------------------------------------------

def _digits(img_size: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - requirements-dev.txt installs it
        raise SystemExit("pyfastdl train: the CNNs train on scikit-learn's bundled digits: "
                         "pip install scikit-learn") from e
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    X = F.interpolate(X, size=(img_size, img_size), mode="bilinear", align_corners=False)
    y = torch.tensor(y, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(y))
    tr, va = perm[:n_train], perm[n_train:]
    mean, std = X[tr].mean(), X[tr].std()
    X = (X - mean) / std
    return (X[tr], y[tr]), (X[va], y[va])


def _corpus_windows(num_steps=35):
    from pyfastdl.reference.corpus import load_corpus
    corpus, _ = load_corpus()
    data = torch.tensor(corpus, dtype=torch.int64)
    n_train = int(0.9 * len(data))

    def windows(d):
        n = (len(d) - 1) // num_steps
        X = d[:n * num_steps].reshape(n, num_steps)
        Y = d[1:n * num_steps + 1].reshape(n, num_steps)
        return X, Y
    return windows(data[:n_train]), windows(data[n_train:])


def sort_task(n: int, seed: int):
    """n sequences of the sort task: (tokens (n, L), valid_lens (n,), targets (n, L) with -100 past
    the valid length)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, SEQ_VOCAB + 1, (n, SEQ_LEN), generator=g)
    lens = torch.randint(4, SEQ_LEN + 1, (n,), generator=g)
    pad = torch.arange(SEQ_LEN)[None, :] >= lens[:, None]
    tokens = tokens.masked_fill(pad, 0)
    # sorting with the padding as +inf puts the valid tokens first, in order
    targets = tokens.masked_fill(pad, SEQ_VOCAB + 1).sort(dim=1).values
    targets = targets.masked_fill(pad, -100)
    return tokens, lens, targets


def datasets(name: str):
    """(train, validation) ``TensorDataset``-s of model ``name``."""
    from torch.utils.data import TensorDataset
    spec = MODELS[name]
    if spec.kind == "image":
        tr, va = _digits(spec.img_size)
    elif spec.kind == "lm":
        tr, va = _corpus_windows()
    else:
        tr, va = sort_task(8192, seed=1), sort_task(1024, seed=2)
    return TensorDataset(*tr), TensorDataset(*va)


# ---- loss and metric --------------------------------------------------------------------------------

def _unwrap(model):
    return getattr(model, "module", model)


def batch_loss(kind: str, model: nn.Module, batch, channels_last=False):
    """(mean loss, number of samples or tokens counted, number of correct predictions or None)."""
    if kind == "image":
        x, y = batch
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
        return F.cross_entropy(logits, y), y.numel(), (logits.argmax(1) == y).sum()
    if kind == "lm":
        X, Y = batch
        state = _unwrap(model).begin_state(X.device, batch_size=X.shape[0])
        out, _ = model(X, state)
        y = Y.T.reshape(-1)
        return F.cross_entropy(out, y), y.numel(), None
    tokens, lens, targets = batch
    logits = model(tokens, lens)
    valid = targets != -100
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return loss, int(valid.sum()), ((logits.argmax(-1) == targets) & valid).sum()


@torch.no_grad()
def evaluate(kind: str, model: nn.Module, loader, device, channels_last=False) -> dict:
    """{"loss", "accuracy" or "perplexity"} over ``loader`` (eval mode; the model's mode is restored)."""
    was = model.training
    model.eval()
    loss_sum, count, correct = 0.0, 0, 0
    for batch in loader:
        batch = [t.to(device) for t in batch]
        loss, n, c = batch_loss(kind, model, batch, channels_last)
        loss_sum += float(loss) * n
        count += n
        correct += 0 if c is None else int(c)
    model.train(was)
    mean = loss_sum / max(count, 1)
    if kind == "lm":
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}
    return {"loss": mean, "accuracy": correct / max(count, 1)}
