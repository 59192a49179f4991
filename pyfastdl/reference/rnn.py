"""Recurrent networks from scratch, as the notes build them (d2l style, sections 53-58 of the
notes: "语言模型", "循环神经网络", "门控循环单元(GRU)", "长短期记忆网络", "深层循环神经网络"),
runnable without the d2l package, on the offline corpus of ``pyfastdl.reference.corpus``.

Where the code comes from:

* The notes' own code: ``seq_data_iter_random``, ``seq_data_iter_sequential``, ``SeqDataLoader``,
  ``load_data_corpus`` (section 53; the notes' ``load_data_time_machine``, here on the offline
  corpus), ``get_lstm_params``, ``init_lstm_state``, ``lstm`` (section 57).
* The notes call ``d2l.RNNModelScratch``, ``d2l.train_ch8`` and, for the GRU and the plain RNN,
  keep only prose and formulas (sections 54, 56). Those come from the d2l book the notes follow
  (Dive into Deep Learning, zh-v2, PyTorch code, 8.5 "循环神经网络的从零开始实现", 8.6, 9.1):
  ``get_rnn_params`` / ``init_rnn_state`` / ``rnn``, ``get_gru_params`` / ``init_gru_state`` /
  ``gru`` (the book calls both parameter functions ``get_params``), ``RNNModelScratch``,
  ``predict`` (``predict_ch8``), ``grad_clipping``, ``train_epoch`` (``train_epoch_ch8``),
  ``train`` (``train_ch8``, without the plot), ``RNNModel`` (the concise model of 8.6 around an
  ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` layer; section 58 makes it deep with ``num_layers``).
* The data helpers take an optional ``rng`` (a ``random.Random``) so a test can fix the batches; the
  notes use the global ``random`` module, which stays the default.

Beside them, the like-torch oracles of ``torch.nn.LSTM`` / ``torch.nn.GRU``: the same step math,
with torch's weight layout (``weight_ih (G*H, I)``, ``weight_hh (G*H, H)``, ``b_ih``, ``b_hh``; gate
order i, f, g, o for the LSTM and r, z, n for the GRU), multi-layer, bidirectional, batch_first,
unbatched input, and per-sequence ``lengths`` (what a PackedSequence carries): ``lstm_cell_like_torch``,
``gru_cell_like_torch``, ``lstm_like_torch``, ``gru_like_torch``, ``torch_rnn_weights``,
``lstm_params_from_torch``; and ``lstm_seq_like_op`` / ``gru_seq_like_op``: one layer, one direction
in the ``lstm_seq_fwd`` / ``gru_seq_fwd`` ops' packed layout (input (N, I) and batch_sizes (T,)),
returning what those ops return (the saved activated gates, cell states, ``(r, z, n, hn)``).

Conventions that differ between the notes and torch (a kernel must pick one, knowingly):

* GRU candidate state. The book: ``H~ = tanh(X W_xh + (R * H) W_hh + b_h)`` (reset *before* the
  recurrent product). torch (and cuDNN): ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`` (reset
  *after* it, on the biased product). They differ unless ``W_hn = 0``; the kernels follow torch.
* GRU update. Both weight the old state by the update gate: ``H = Z * H + (1 - Z) * H~``.
* Biases. The notes' cells have one bias per gate; torch has two (``b_ih + b_hh``), equal in sum
  for the LSTM. Weights. The notes right-multiply (``X @ W_xi``, W (I, H)); torch stores
  ``weight_ih`` (4H, I) and computes ``x @ weight_ih.T``.
* The notes' ``lstm`` / ``gru`` / ``rnn`` also apply the output layer (``W_hq``, ``b_q``) at each step
  and return the outputs of all steps concatenated on the batch axis, (T * B, vocab).

Hochreiter & Schmidhuber 1997 (LSTM); Cho et al. 2014 (GRU).
"""
import math
import random
import time

import torch
from torch import nn
from torch.nn import functional as F

from .corpus import Vocab, count_corpus, load_corpus, read_corpus, tokenize

__all__ = [
    "Vocab", "tokenize", "count_corpus", "read_corpus", "load_corpus",
    "seq_data_iter_random", "seq_data_iter_sequential", "SeqDataLoader", "load_data_corpus",
    "get_rnn_params", "init_rnn_state", "rnn", "get_gru_params", "init_gru_state", "gru",
    "get_lstm_params", "init_lstm_state", "lstm", "RNNModelScratch", "RNNModel", "predict",
    "grad_clipping", "train_epoch", "train",
    "lstm_cell_like_torch", "gru_cell_like_torch", "lstm_like_torch", "gru_like_torch",
    "torch_rnn_weights", "lstm_params_from_torch", "lstm_seq_like_op", "gru_seq_like_op",
]


# ---- reading long sequences (section 53) -------------------------------------------------------------

def seq_data_iter_random(corpus, batch_size, num_steps, rng=None):
    """Random sampling: minibatches (X, Y) of shape (batch_size, num_steps), Y = X shifted by one;
    subsequences start at a random offset and adjacent minibatches are not adjacent in the text."""
    rng = random if rng is None else rng
    corpus = corpus[rng.randint(0, num_steps - 1):]
    num_subseqs = (len(corpus) - 1) // num_steps
    initial_indices = list(range(0, num_subseqs * num_steps, num_steps))
    rng.shuffle(initial_indices)

    def data(pos):
        return corpus[pos: pos + num_steps]

    num_batches = num_subseqs // batch_size
    for i in range(0, batch_size * num_batches, batch_size):
        initial_indices_per_batch = initial_indices[i: i + batch_size]
        X = [data(j) for j in initial_indices_per_batch]
        Y = [data(j + 1) for j in initial_indices_per_batch]
        yield torch.tensor(X), torch.tensor(Y)


def seq_data_iter_sequential(corpus, batch_size, num_steps, rng=None):
    """Sequential partitioning: minibatches (X, Y) of shape (batch_size, num_steps); row b of one
    minibatch continues row b of the previous one in the text (so the state can be carried)."""
    rng = random if rng is None else rng
    offset = rng.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = torch.tensor(corpus[offset: offset + num_tokens])
    Ys = torch.tensor(corpus[offset + 1: offset + 1 + num_tokens])
    Xs, Ys = Xs.reshape(batch_size, -1), Ys.reshape(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        X = Xs[:, i: i + num_steps]
        Y = Ys[:, i: i + num_steps]
        yield X, Y


class SeqDataLoader:
    """The notes' iterator over the corpus minibatches (random or sequential), on the offline corpus."""

    def __init__(self, batch_size, num_steps, use_random_iter, max_tokens, rng=None):
        if use_random_iter:
            self.data_iter_fn = seq_data_iter_random
        else:
            self.data_iter_fn = seq_data_iter_sequential
        self.corpus, self.vocab = load_corpus(max_tokens)
        self.batch_size, self.num_steps = batch_size, num_steps
        self.rng = rng

    def __iter__(self):
        return self.data_iter_fn(self.corpus, self.batch_size, self.num_steps, rng=self.rng)


def load_data_corpus(batch_size, num_steps, use_random_iter=False, max_tokens=10000, rng=None):
    """The notes' load_data_time_machine on the offline corpus: (data_iter, vocab)."""
    data_iter = SeqDataLoader(batch_size, num_steps, use_random_iter, max_tokens, rng=rng)
    return data_iter, data_iter.vocab


# ---- the scratch cells: RNN (book 8.5), GRU (book 9.1), LSTM (section 57) ---------------------------

def _normal(shape, device):
    return torch.randn(size=shape, device=device) * 0.01


def get_rnn_params(vocab_size, num_hiddens, device):
    """[W_xh (V, H), W_hh (H, H), b_h (H,), W_hq (H, V), b_q (V,)], N(0, 0.01) weights, zero biases."""
    num_inputs = num_outputs = vocab_size
    W_xh = _normal((num_inputs, num_hiddens), device)
    W_hh = _normal((num_hiddens, num_hiddens), device)
    b_h = torch.zeros(num_hiddens, device=device)
    W_hq = _normal((num_hiddens, num_outputs), device)
    b_q = torch.zeros(num_outputs, device=device)
    params = [W_xh, W_hh, b_h, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_rnn_state(batch_size, num_hiddens, device):
    """(H,) with H zeros (batch_size, num_hiddens)."""
    return (torch.zeros((batch_size, num_hiddens), device=device),)


def rnn(inputs, state, params):
    """inputs (T, B, V) -> (outputs (T * B, V), (H,)): H = tanh(X W_xh + H W_hh + b_h), Y = H W_hq + b_q."""
    W_xh, W_hh, b_h, W_hq, b_q = params
    H, = state
    outputs = []
    for X in inputs:
        H = torch.tanh(torch.mm(X, W_xh) + torch.mm(H, W_hh) + b_h)
        Y = torch.mm(H, W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H,)


def get_gru_params(vocab_size, num_hiddens, device):
    """[W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q]: update gate, reset gate,
    candidate state, output layer (the book's ``get_params`` of 9.1)."""
    num_inputs = num_outputs = vocab_size

    def three():
        return (_normal((num_inputs, num_hiddens), device),
                _normal((num_hiddens, num_hiddens), device),
                torch.zeros(num_hiddens, device=device))

    W_xz, W_hz, b_z = three()  # update gate
    W_xr, W_hr, b_r = three()  # reset gate
    W_xh, W_hh, b_h = three()  # candidate hidden state
    W_hq = _normal((num_hiddens, num_outputs), device)
    b_q = torch.zeros(num_outputs, device=device)
    params = [W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_gru_state(batch_size, num_hiddens, device):
    """(H,) with H zeros (batch_size, num_hiddens)."""
    return (torch.zeros((batch_size, num_hiddens), device=device),)


def gru(inputs, state, params):
    """inputs (T, B, V) -> (outputs (T * B, V), (H,)). Per step:
    Z = sigmoid(X W_xz + H W_hz + b_z), R = sigmoid(X W_xr + H W_hr + b_r),
    H~ = tanh(X W_xh + (R * H) W_hh + b_h), H = Z * H + (1 - Z) * H~, Y = H W_hq + b_q."""
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h, W_hq, b_q = params
    H, = state
    outputs = []
    for X in inputs:
        Z = torch.sigmoid((X @ W_xz) + (H @ W_hz) + b_z)
        R = torch.sigmoid((X @ W_xr) + (H @ W_hr) + b_r)
        H_tilda = torch.tanh((X @ W_xh) + ((R * H) @ W_hh) + b_h)
        H = Z * H + (1 - Z) * H_tilda
        Y = H @ W_hq + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H,)


def get_lstm_params(vocab_size, num_hiddens, device):
    """Section 57: [W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o, W_xc, W_hc, b_c, W_hq, b_q]:
    input, forget, output gates, candidate memory cell, output layer. W_x* (V, H), W_h* (H, H)."""
    num_inputs = num_outputs = vocab_size

    def normal(shape):
        return torch.randn(size=shape, device=device) * 0.01

    def three():
        return (normal((num_inputs, num_hiddens)),
                normal((num_hiddens, num_hiddens)),
                torch.zeros(num_hiddens, device=device))

    W_xi, W_hi, b_i = three()  # input gate
    W_xf, W_hf, b_f = three()  # forget gate
    W_xo, W_ho, b_o = three()  # output gate
    W_xc, W_hc, b_c = three()  # candidate memory cell
    W_hq = normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs, device=device)
    params = [W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o, W_xc, W_hc, b_c, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_lstm_state(batch_size, num_hiddens, device):
    """Section 57: (H, C), both zeros (batch_size, num_hiddens)."""
    return (torch.zeros((batch_size, num_hiddens), device=device),
            torch.zeros((batch_size, num_hiddens), device=device))


def lstm(inputs, state, params):
    """Section 57: inputs (T, B, V) -> (outputs (T * B, V), (H, C)). Per step: I, F, O = sigmoid gates,
    C~ = tanh(...), C = F * C + I * C~, H = O * tanh(C), Y = H W_hq + b_q."""
    [W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o, W_xc, W_hc, b_c, W_hq, b_q] = params
    (H, C) = state
    outputs = []
    for X in inputs:
        I = torch.sigmoid((X @ W_xi) + (H @ W_hi) + b_i)  # noqa: E741
        F_ = torch.sigmoid((X @ W_xf) + (H @ W_hf) + b_f)
        O = torch.sigmoid((X @ W_xo) + (H @ W_ho) + b_o)
        C_tilda = torch.tanh((X @ W_xc) + (H @ W_hc) + b_c)
        C = F_ * C + I * C_tilda
        H = O * torch.tanh(C)
        Y = (H @ W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H, C)


# ---- the character language model (book 8.5, 8.6) ---------------------------------------------------

class RNNModelScratch:
    """A recurrent language model from scratch: X (B, T) token indices -> one-hot (T, B, V) ->
    forward_fn -> (outputs (T * B, V), state). dtype (an addition to the book's, default float32):
    the one-hot inputs' dtype and, when not float32, the parameters are cast to it."""

    def __init__(self, vocab_size, num_hiddens, device, get_params, init_state, forward_fn,
                 dtype=torch.float32):
        self.vocab_size, self.num_hiddens = vocab_size, num_hiddens
        self.params = get_params(vocab_size, num_hiddens, device)
        if dtype != torch.float32:
            self.params = [p.detach().to(dtype).requires_grad_(True) for p in self.params]
        self.dtype = dtype
        self.init_state, self.forward_fn = init_state, forward_fn

    def __call__(self, X, state):
        X = F.one_hot(X.T, self.vocab_size).type(self.dtype)
        return self.forward_fn(X, state, self.params)

    def begin_state(self, batch_size, device):
        return tuple(s.to(self.dtype) for s in self.init_state(batch_size, self.num_hiddens, device))


class RNNModel(nn.Module):
    """The concise language model (book 8.6): an nn.RNN / nn.GRU / nn.LSTM layer on one-hot input,
    then a linear layer (both directions' hidden states when bidirectional). X (B, T) -> ((T * B, V),
    state)."""

    def __init__(self, rnn_layer, vocab_size, **kwargs):
        super().__init__(**kwargs)
        self.rnn = rnn_layer
        self.vocab_size = vocab_size
        self.num_hiddens = self.rnn.hidden_size
        if not self.rnn.bidirectional:
            self.num_directions = 1
            self.linear = nn.Linear(self.num_hiddens, self.vocab_size)
        else:
            self.num_directions = 2
            self.linear = nn.Linear(self.num_hiddens * 2, self.vocab_size)

    def forward(self, inputs, state):
        X = F.one_hot(inputs.T.long(), self.vocab_size)
        X = X.to(self.linear.weight.dtype)
        Y, state = self.rnn(X, state)
        output = self.linear(Y.reshape((-1, Y.shape[-1])))
        return output, state

    def begin_state(self, device, batch_size=1):
        shape = (self.num_directions * self.rnn.num_layers, batch_size, self.num_hiddens)
        dtype = self.linear.weight.dtype
        if not isinstance(self.rnn, nn.LSTM):
            return torch.zeros(shape, device=device, dtype=dtype)
        return (torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype))


def predict(prefix, num_preds, net, vocab, device):
    """Greedy generation of num_preds characters after prefix (the book's predict_ch8): warm the
    state up on the prefix, then feed back each argmax."""
    state = net.begin_state(batch_size=1, device=device)
    outputs = [vocab[prefix[0]]]

    def get_input():
        return torch.tensor([outputs[-1]], device=device).reshape((1, 1))

    for y in prefix[1:]:  # warm-up
        _, state = net(get_input(), state)
        outputs.append(vocab[y])
    for _ in range(num_preds):  # predict num_preds steps
        y, state = net(get_input(), state)
        outputs.append(int(y.argmax(dim=1).reshape(1)))
    return ''.join([vocab.idx_to_token[i] for i in outputs])


def grad_clipping(net, theta):
    """Scale all gradients by theta / ||g|| when the global norm ||g|| over all parameters > theta."""
    if isinstance(net, nn.Module):
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        params = net.params
    norm = torch.sqrt(sum(torch.sum((p.grad ** 2)) for p in params))
    if norm > theta:
        for param in params:
            param.grad[:] *= theta / norm


def _sgd(params, lr, batch_size):
    """The book's minibatch SGD (3.2): param -= lr * grad / batch_size, grads zeroed."""
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


def train_epoch(net, train_iter, loss, updater, device, use_random_iter):
    """One epoch (the book's train_epoch_ch8): returns (perplexity, tokens per second). The state is
    reset for every minibatch with random sampling, carried (and detached) with sequential
    partitioning. updater: a torch.optim optimizer or a function updater(batch_size)."""
    state, start = None, time.perf_counter()
    loss_sum, num_tokens = 0.0, 0
    for X, Y in train_iter:
        if state is None or use_random_iter:
            state = net.begin_state(batch_size=X.shape[0], device=device)
        else:
            if isinstance(net, nn.Module) and not isinstance(state, tuple):
                state.detach_()
            else:
                for s in state:
                    s.detach_()
        y = Y.T.reshape(-1)
        X, y = X.to(device), y.to(device)
        y_hat, state = net(X, state)
        l = loss(y_hat, y.long()).mean()  # noqa: E741
        if isinstance(updater, torch.optim.Optimizer):
            updater.zero_grad()
            l.backward()
            grad_clipping(net, 1)
            updater.step()
        else:
            l.backward()
            grad_clipping(net, 1)
            updater(batch_size=1)  # the loss is already a mean
        loss_sum += l.item() * y.numel()
        num_tokens += y.numel()
    elapsed = time.perf_counter() - start
    return math.exp(loss_sum / num_tokens), num_tokens / max(elapsed, 1e-12)


def train(net, train_iter, vocab, lr, num_epochs, device, use_random_iter=False, log=None):
    """The book's train_ch8 without the plot: cross-entropy, SGD with gradient clipping at 1.
    Returns the list of per-epoch perplexities; log (e.g. print) gets a line every 10 epochs."""
    loss = nn.CrossEntropyLoss()
    if isinstance(net, nn.Module):
        updater = torch.optim.SGD(net.parameters(), lr)
    else:
        def updater(batch_size):
            return _sgd(net.params, lr, batch_size)
    ppls = []
    for epoch in range(num_epochs):
        ppl, speed = train_epoch(net, train_iter, loss, updater, device, use_random_iter)
        ppls.append(ppl)
        if log is not None and (epoch + 1) % 10 == 0:
            log(f"epoch {epoch + 1}: perplexity {ppl:.1f}, {speed:.1f} tokens/sec; "
                f"{predict('time traveller', 50, net, vocab, device)!r}")
    return ppls


# ---- like torch --------------------------------------------------------------------------------------

def lstm_cell_like_torch(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One LSTM step with torch's layout: gates = x W_ih^T + b_ih + h W_hh^T + b_hh (B, 4H) in the
    order i, f, g, o; c' = sigmoid(f) * c + sigmoid(i) * tanh(g); h' = sigmoid(o) * tanh(c').
    input (B, I), hx, cx (B, H), w_ih (4H, I), w_hh (4H, H), b_* (4H,) or None -> (h', c')."""
    gates = input @ w_ih.T + hx @ w_hh.T
    if b_ih is not None:
        gates = gates + b_ih
    if b_hh is not None:
        gates = gates + b_hh
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def gru_cell_like_torch(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    """One GRU step with torch's layout and math (gate order r, z, n):
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.
    input (B, I), hx (B, H), w_ih (3H, I), w_hh (3H, H), b_* (3H,) or None -> h'."""
    gi = input @ w_ih.T
    gh = hx @ w_hh.T
    if b_ih is not None:
        gi = gi + b_ih
    if b_hh is not None:
        gh = gh + b_hh
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * hx


def torch_rnn_weights(module):
    """A torch.nn.LSTM/GRU's weights as lstm_like_torch/gru_like_torch take them: a list over
    layers of lists over directions of (w_ih, w_hh, b_ih, b_hh) (biases None when bias=False)."""
    if getattr(module, "proj_size", 0):
        raise ValueError("torch_rnn_weights: proj_size > 0 is not supported by the reference")
    out = []
    for layer in range(module.num_layers):
        dirs = []
        for suffix in ([""] + (["_reverse"] if module.bidirectional else [])):
            name = f"l{layer}{suffix}"
            w_ih, w_hh = getattr(module, "weight_ih_" + name), getattr(module, "weight_hh_" + name)
            b_ih = getattr(module, "bias_ih_" + name) if module.bias else None
            b_hh = getattr(module, "bias_hh_" + name) if module.bias else None
            dirs.append((w_ih, w_hh, b_ih, b_hh))
        out.append(dirs)
    return out


def _run_layers(cell, input, states, weights, batch_first, lengths, dropout, training):
    """The shared multi-layer, bidirectional time loop. states: a tuple of (L * D, B, H) tensors
    (h0 or h0, c0); cell(x, state_tuple, *w) -> state_tuple. lengths (B,) or None: step t of
    sequence b runs only when t < lengths[b] (its state is carried, its output is zero otherwise)."""
    unbatched = input.dim() == 2
    if unbatched:
        input = input.unsqueeze(1)
        states = tuple(s.unsqueeze(1) for s in states)
    elif batch_first:
        input = input.transpose(0, 1)
    T, B, _ = input.shape
    D = len(weights[0])
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=input.device).reshape(B)
    finals = [[] for _ in states]
    x = input
    for layer, dirs in enumerate(weights):
        outs = []
        for d, w in enumerate(dirs):
            state = tuple(s[layer * D + d] for s in states)
            ys = [None] * T
            for t in (range(T) if d == 0 else range(T - 1, -1, -1)):
                new = cell(x[t], state, *w)
                if lengths is not None:
                    valid = (t < lengths).reshape(B, 1)
                    new = tuple(torch.where(valid, n, s) for n, s in zip(new, state))
                    ys[t] = torch.where(valid, new[0], torch.zeros_like(new[0]))
                else:
                    ys[t] = new[0]
                state = new
            outs.append(torch.stack(ys))
            for f, s in zip(finals, state):
                f.append(s)
        x = torch.cat(outs, dim=-1) if D == 2 else outs[0]
        if dropout > 0 and training and layer < len(weights) - 1:
            x = F.dropout(x, dropout, training=True)
    finals = tuple(torch.stack(f) for f in finals)
    if unbatched:
        x = x.squeeze(1)
        finals = tuple(f.squeeze(1) for f in finals)
    elif batch_first:
        x = x.transpose(0, 1)
    return x, finals


def _check_weights(weights, gates, input_size, name):
    if not weights or any(len(dirs) not in (1, 2) or len(dirs) != len(weights[0]) for dirs in weights):
        raise ValueError(f"{name}: weights must be a list over layers of lists of 1 or 2 directions")
    H = weights[0][0][1].shape[1]
    for layer, dirs in enumerate(weights):
        for w_ih, w_hh, _, _ in dirs:
            I = input_size if layer == 0 else H * len(dirs)  # noqa: E741
            if tuple(w_ih.shape) != (gates * H, I) or tuple(w_hh.shape) != (gates * H, H):
                raise ValueError(f"{name}: layer {layer}: weight_ih must be ({gates * H}, {I}) and "
                                 f"weight_hh ({gates * H}, {H}), got {tuple(w_ih.shape)} and "
                                 f"{tuple(w_hh.shape)}")
    return H


def lstm_like_torch(input, hx, weights, batch_first=False, lengths=None, dropout=0.0, training=False):
    """``torch.nn.LSTM`` written out with lstm_cell_like_torch (no proj_size).

    input: (T, B, I) (batch_first: (B, T, I)) or unbatched (T, I); hx: (h0, c0), each (L * D, B, H)
    ((L * D, H) unbatched), or None for zeros; weights: torch_rnn_weights(module) (L layers of D
    directions of (w_ih, w_hh, b_ih, b_hh)); lengths: (B,) sequence lengths or None (what
    pack_padded_sequence(..., enforce_sorted=False) and pad_packed_sequence compute: outputs past a
    length are 0 and (h_n, c_n) are each sequence's state at its own last step; the reverse direction
    starts at each sequence's last step); dropout on each layer's output but the last, in training.
    Returns (output (T, B, D * H), (h_n, c_n) (L * D, B, H))."""
    H = _check_weights(weights, 4, input.shape[-1], "lstm_like_torch")
    if hx is None:
        B = () if input.dim() == 2 else (input.shape[0 if batch_first else 1],)
        z = input.new_zeros((len(weights) * len(weights[0]),) + B + (H,))
        hx = (z, z)

    def cell(x, state, *w):
        return lstm_cell_like_torch(x, state[0], state[1], *w)

    out, (h, c) = _run_layers(cell, input, tuple(hx), weights, batch_first, lengths, dropout, training)
    return out, (h, c)


def gru_like_torch(input, hx, weights, batch_first=False, lengths=None, dropout=0.0, training=False):
    """``torch.nn.GRU`` written out with gru_cell_like_torch; arguments as lstm_like_torch with hx
    = h0 (L * D, B, H) or None. Returns (output (T, B, D * H), h_n (L * D, B, H))."""
    H = _check_weights(weights, 3, input.shape[-1], "gru_like_torch")
    if hx is None:
        B = () if input.dim() == 2 else (input.shape[0 if batch_first else 1],)
        hx = input.new_zeros((len(weights) * len(weights[0]),) + B + (H,))

    def cell(x, state, *w):
        return (gru_cell_like_torch(x, state[0], *w),)

    out, (h,) = _run_layers(cell, input, (hx,), weights, batch_first, lengths, dropout, training)
    return out, h


def lstm_params_from_torch(lstm_layer, linear):
    """The notes' lstm params (section 57 order) holding a 1-layer unidirectional torch.nn.LSTM's
    weights and an nn.Linear output layer (the concise RNNModel's): W_x* = weight_ih block^T,
    W_h* = weight_hh block^T, b_* = b_ih block + b_hh block, W_hq = linear.weight^T, b_q = linear.bias.
    Detached copies (leaves with requires_grad)."""
    if lstm_layer.num_layers != 1 or lstm_layer.bidirectional or getattr(lstm_layer, "proj_size", 0):
        raise ValueError("lstm_params_from_torch: the notes' lstm is one layer, one direction, no proj_size")
    H = lstm_layer.hidden_size
    w_ih, w_hh = lstm_layer.weight_ih_l0.detach(), lstm_layer.weight_hh_l0.detach()
    if lstm_layer.bias:
        b = lstm_layer.bias_ih_l0.detach() + lstm_layer.bias_hh_l0.detach()
    else:
        b = w_ih.new_zeros(4 * H)
    blocks = {}
    for k, gate in enumerate("ifco"):   # torch's order i, f, g (the notes' candidate c), o
        sl = slice(k * H, (k + 1) * H)
        blocks[gate] = (w_ih[sl].T.clone(), w_hh[sl].T.clone(), b[sl].clone())
    params = [*blocks["i"], *blocks["f"], *blocks["o"], *blocks["c"],
              linear.weight.detach().T.clone(), linear.bias.detach().clone()]
    return [p.requires_grad_(True) for p in params]


# ---- the seq ops' packed layout (csrc/ops.cpp: lstm_seq_fwd, gru_seq_fwd) ---------------------------

def _packed_steps(batch_sizes, reverse):
    """(t, offset, rows) for each step of a packed sequence, in processing order."""
    sizes = [int(b) for b in batch_sizes]
    if any(b < 0 for b in sizes) or any(a < b for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"batch_sizes must be non-increasing and >= 0, got {sizes}")
    offsets, off = [], 0
    for b in sizes:
        offsets.append(off)
        off += b
    steps = [(t, offsets[t], sizes[t]) for t in range(len(sizes))]
    return (steps[::-1] if reverse else steps), off


def lstm_seq_like_op(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False):
    """One LSTM layer in one direction over a packed sequence, as the lstm_seq_fwd op: input (N, I)
    holds step t's batch_sizes[t] rows after those of the steps before; h0, c0 (B, H); rows active
    at step t are b < batch_sizes[t]; reverse runs t = T-1 .. 0 (each row from its own last step).
    Returns (output (N, H), hy (B, H), cy (B, H), gates (N, 4H) activated (i, f, g, o), cs (N, H) the
    cell state after each step)."""
    steps, N = _packed_steps(batch_sizes, reverse)
    if input.shape[0] != N:
        raise ValueError(f"lstm_seq_like_op: input has {input.shape[0]} rows, batch_sizes sum to {N}")
    H = h0.shape[1]
    h, c = h0, c0
    out, gates, cs = [None] * len(steps), [None] * len(steps), [None] * len(steps)
    for t, off, bs in steps:
        x = input[off:off + bs]
        g = x @ w_ih.T + h[:bs] @ w_hh.T
        if b_ih is not None:
            g = g + b_ih
        if b_hh is not None:
            g = g + b_hh
        i, f, gg, o = torch.sigmoid(g[:, :H]), torch.sigmoid(g[:, H:2 * H]), \
            torch.tanh(g[:, 2 * H:3 * H]), torch.sigmoid(g[:, 3 * H:])
        c_new = f * c[:bs] + i * gg
        h_new = o * torch.tanh(c_new)
        h = torch.cat([h_new, h[bs:]])
        c = torch.cat([c_new, c[bs:]])
        out[t], cs[t], gates[t] = h_new, c_new, torch.cat([i, f, gg, o], dim=1)
    cat = lambda xs, w: torch.cat(xs) if xs else input.new_zeros((0, w))  # noqa: E731
    return cat(out, H), h, c, cat(gates, 4 * H), cat(cs, H)


def gru_seq_like_op(input, batch_sizes, h0, w_ih, w_hh, b_ih=None, b_hh=None, reverse=False):
    """One GRU layer in one direction over a packed sequence, as the gru_seq_fwd op (layout as
    lstm_seq_like_op; torch's GRU math). Returns (output (N, H), hy (B, H), ws (N, 4H) = (r, z, n, hn)
    of each step, hn = h W_hn^T + b_hn)."""
    steps, N = _packed_steps(batch_sizes, reverse)
    if input.shape[0] != N:
        raise ValueError(f"gru_seq_like_op: input has {input.shape[0]} rows, batch_sizes sum to {N}")
    H = h0.shape[1]
    h = h0
    out, ws = [None] * len(steps), [None] * len(steps)
    for t, off, bs in steps:
        gi = input[off:off + bs] @ w_ih.T
        gh = h[:bs] @ w_hh.T
        if b_ih is not None:
            gi = gi + b_ih
        if b_hh is not None:
            gh = gh + b_hh
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        hn = gh[:, 2 * H:]
        n = torch.tanh(gi[:, 2 * H:] + r * hn)
        h_new = (1 - z) * n + z * h[:bs]
        h = torch.cat([h_new, h[bs:]])
        out[t], ws[t] = h_new, torch.cat([r, z, n, hn], dim=1)
    cat = lambda xs, w: torch.cat(xs) if xs else input.new_zeros((0, w))  # noqa: E731
    return cat(out, H), h, cat(ws, 4 * H)
