"""The notes' optimizer comparison (the notes' ``train_ch7``; Dive-into-DL-PyTorch
chapter 7): linear regression with the squared loss, minibatches of 10, the training loss recorded
every 100 examples, run once with each from-scratch optimizer of ``pyfastdl.reference`` and once
with each optimizer class (``train_concise_ch7``, the notes' ``train_pytorch_ch7`` /
``train_concise_ch11``) from ``pyfastdl.optim``.

The notes use NASA's airfoil self-noise data (the first 1500 rows, 5 features, standardized); to
need no download this script synthesizes a problem of the same shape: 5 correlated features of
different scales, a linear target plus noise, both standardized, seeded.

    .venv/bin/python examples/train_ch7.py [--epochs 2] [--plot]
"""
import argparse
import time

import numpy as np
import torch
from torch import nn

from pyfastdl import reference as R


def get_data_ch7(num_examples=1500, num_features=5, noise=0.4, seed=0):
    """features: (num_examples, num_features) float32, labels: (num_examples,) float32, each column
    standardized as the notes' get_data_ch7 does with the airfoil data."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(num_examples, num_features, generator=g, dtype=torch.float64)
    mix = torch.eye(num_features, dtype=torch.float64) + 0.5 * torch.randn(
        num_features, num_features, generator=g, dtype=torch.float64)
    scales = torch.logspace(-1, 2, num_features, dtype=torch.float64)  # 0.1 .. 100
    X = (Z @ mix) * scales
    true_w = torch.tensor([2.0, -3.4, 1.5, 0.5, -1.0], dtype=torch.float64)[:num_features]
    y = (X / scales) @ true_w + 4.2
    y = y + noise * y.std() * torch.randn(num_examples, generator=g, dtype=torch.float64)
    data = torch.cat([X, y[:, None]], dim=1)
    data = (data - data.mean(dim=0)) / data.std(dim=0)
    return data[:, :-1].float(), data[:, -1].float()


def linreg(X, w, b):
    """The notes' model (d2l.linreg). X: (n, d), w: (d, 1), b: (1,) -> (n, 1)."""
    return torch.mm(X, w) + b


def squared_loss(y_hat, y):
    """The notes' loss (d2l.squared_loss), per example: (y_hat - y)^2 / 2."""
    return (y_hat - y.view(y_hat.size())) ** 2 / 2


def train_ch7(optimizer_fn, states, hyperparams, features, labels, batch_size=10, num_epochs=2):
    """The notes' train_ch7: returns (losses recorded every 100 examples, seconds of the last epoch).
    Modernized: d2l.linreg / d2l.squared_loss are the local functions above, and the plot is left to
    the caller (--plot)."""
    # Initialize the model
    net, loss = linreg, squared_loss

    w = torch.nn.Parameter(torch.tensor(np.random.normal(0, 0.01, size=(features.shape[1], 1)),
                                        dtype=torch.float32), requires_grad=True)
    b = torch.nn.Parameter(torch.zeros(1, dtype=torch.float32), requires_grad=True)

    def eval_loss():
        return loss(net(features, w, b), labels).mean().item()

    ls = [eval_loss()]
    data_iter = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(features, labels), batch_size, shuffle=True)

    for _ in range(num_epochs):
        start = time.time()
        for batch_i, (X, y) in enumerate(data_iter):
            l = loss(net(X, w, b), y).mean()  # mean loss over the minibatch

            # Zero the gradients
            if w.grad is not None:
                w.grad.data.zero_()
                b.grad.data.zero_()

            l.backward()
            optimizer_fn([w, b], states, hyperparams)  # update the parameters
            if (batch_i + 1) * batch_size % 100 == 0:
                ls.append(eval_loss())  # record the training loss every 100 examples
    return ls, time.time() - start


def resolve_optimizer(name, optim_module=None):
    """The class `name` (torch.optim's spelling) from optim_module, by default pyfastdl.optim.
    Returns (class, where)."""
    if optim_module is None:
        import pyfastdl.optim as optim_module
    return getattr(optim_module, name), optim_module.__name__


def train_concise_ch7(name, hyperparams, features, labels, batch_size=10, num_epochs=2,
                      optim_module=None):
    """The notes' train_pytorch_ch7 (d2l's train_concise_ch11) with the optimizer class looked up by
    name (see resolve_optimizer). Returns (losses, seconds of the last epoch, where the class came
    from)."""
    # Initialize the model
    net = nn.Sequential(nn.Linear(features.shape[-1], 1))
    loss = nn.MSELoss()
    optimizer_cls, where = resolve_optimizer(name, optim_module)
    optimizer = optimizer_cls(net.parameters(), **hyperparams)

    def eval_loss():
        return loss(net(features).view(-1), labels).item() / 2

    ls = [eval_loss()]
    data_iter = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(features, labels), batch_size, shuffle=True)

    for _ in range(num_epochs):
        start = time.time()
        for batch_i, (X, y) in enumerate(data_iter):
            # Divided by 2 to match train_ch7, whose squared_loss halves the square
            l = loss(net(X).view(-1), y) / 2

            optimizer.zero_grad()
            l.backward()
            optimizer.step()
            if (batch_i + 1) * batch_size % 100 == 0:
                ls.append(eval_loss())
    return ls, time.time() - start, where


# (label, notes' function, init_states or None, hyperparams) with the notes' hyper-parameters.
SCRATCH = [
    ("sgd", R.sgd, None, {"lr": 0.05}),
    ("sgd_momentum", R.sgd_momentum, R.init_momentum_states, {"lr": 0.004, "momentum": 0.9}),
    ("adagrad", R.adagrad, R.init_adagrad_states, {"lr": 0.1}),
    ("rmsprop", R.rmsprop, R.init_rmsprop_states, {"lr": 0.01, "gamma": 0.9}),
    ("adadelta", R.adadelta, R.init_adadelta_states, {"rho": 0.9}),
    ("adam", R.adam, R.init_adam_states, {"lr": 0.01, "t": 1}),
]
# (label, class name, hyperparams): the notes' concise runs, torch's names for the same settings.
CONCISE = [
    ("SGD", "SGD", {"lr": 0.05}),
    ("SGD momentum", "SGD", {"lr": 0.004, "momentum": 0.9}),
    ("Adagrad", "Adagrad", {"lr": 0.1}),
    ("RMSprop", "RMSprop", {"lr": 0.01, "alpha": 0.9}),
    ("Adadelta", "Adadelta", {"rho": 0.9}),
    ("Adam", "Adam", {"lr": 0.01}),
    ("AdamW", "AdamW", {"lr": 0.01, "weight_decay": 0.01}),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", action="store_true", help="plot the loss curves (needs matplotlib)")
    args = ap.parse_args()

    features, labels = get_data_ch7(seed=args.seed)
    print("data: features %s, labels %s (synthetic, standardized); loss of w=0, b=0: %f" % (
        tuple(features.shape), tuple(labels.shape), (labels ** 2 / 2).mean().item()))
    curves = {}
    print("\nfrom scratch (pyfastdl.reference, the notes' functions):")
    for label, fn, init, hp in SCRATCH:
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        states = init(features.shape[1]) if init is not None else None
        ls, sec = train_ch7(fn, states, dict(hp), features, labels, args.batch_size, args.epochs)
        curves["notes " + label] = ls
        print("  %-14s loss: %f, %f sec per epoch" % (label, ls[-1], sec))

    print("\nconcise (optimizer classes):")
    for label, name, hp in CONCISE:
        torch.manual_seed(args.seed)
        ls, sec, where = train_concise_ch7(name, hp, features, labels, args.batch_size, args.epochs)
        curves[label] = ls
        print("  %-14s loss: %f, %f sec per epoch  [%s]" % (label, ls[-1], sec, where))

    if args.plot:
        import matplotlib.pyplot as plt
        for label, ls in curves.items():
            plt.plot(np.linspace(0, args.epochs, len(ls)), ls, label=label)
        plt.xlabel("epoch")
        plt.ylabel("loss")
        plt.legend()
        plt.show()


if __name__ == "__main__":
    main()
