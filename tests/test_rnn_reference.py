"""pyfastdl.reference.rnn and .corpus: the offline corpus (deterministic, 28 characters), the notes'
data iterators, the notes' scratch lstm / gru / rnn against torch.nn.LSTM / GRU / RNN with copied
weights (the GRU where the two conventions meet), lstm_like_torch / gru_like_torch (the oracles of
pyfastdl's LSTM/GRU kernels) against torch in float64 to 1e-10 (outputs, final states, gradients;
multi-layer, bidirectional, batch_first, no bias, unbatched, packed lengths), and the character
language model: shapes, gradient clipping, prediction, and training lowering the loss."""
import math
import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pyfastdl import reference as R

TOL64 = dict(rtol=1e-10, atol=1e-10)   # float64, same math in another operation order


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the corpus and the text helpers -----------------------------------------------------------------

def test_corpus_is_deterministic_and_nontrivial():
    corpus, vocab = R.load_corpus()
    assert len(vocab) == 28
    assert vocab.idx_to_token[0] == "<unk>" and vocab.idx_to_token[1] == " "   # space most frequent
    assert sorted(vocab.idx_to_token[1:]) == [" "] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    assert len(corpus) > 10_000 and min(corpus) >= 1 and max(corpus) == 27
    R.corpus._raw_lines.cache_clear()       # read the docstrings again: the same text
    corpus2, vocab2 = R.load_corpus()
    assert corpus2 == corpus and vocab2.idx_to_token == vocab.idx_to_token
    lines = R.read_corpus()
    assert all(line == line.strip() and set(line) <= set(vocab.idx_to_token[1:]) for line in lines)
    assert R.load_corpus(max_tokens=1000)[0] == corpus[:1000]
    # Word statistics look like English: "the" is among the most frequent words.
    words = R.Vocab(R.tokenize(lines, "word"))
    assert "the" in [t for t, _ in words.token_freqs[:3]]


def test_vocab_and_tokenize():
    tokens = R.tokenize(["a b a", "c a"], "word")
    assert tokens == [["a", "b", "a"], ["c", "a"]]
    assert R.tokenize(["ab"], "char") == [["a", "b"]]
    vocab = R.Vocab(tokens, reserved_tokens=["<pad>"])
    assert vocab.idx_to_token == ["<unk>", "<pad>", "a", "b", "c"]
    assert vocab["a"] == 2 and vocab[["c", "zzz"]] == [4, 0] and vocab.unk == 0
    assert vocab.to_tokens([2, 3]) == ["a", "b"] and len(vocab) == 5
    assert R.Vocab(tokens, min_freq=2).idx_to_token == ["<unk>", "a"]
    assert R.count_corpus(tokens)["a"] == 3
    with pytest.raises(ValueError, match="token"):
        R.tokenize(["a"], "byte")


def test_seq_data_iter_random_notes_example():
    my_seq = list(range(35))
    batches = list(R.seq_data_iter_random(my_seq, batch_size=2, num_steps=5, rng=random.Random(0)))
    assert len(batches) == 3                       # floor((35 - 1) / 5) = 6 subsequences, 3 batches
    starts = []
    for X, Y in batches:
        assert X.shape == Y.shape == (2, 5)
        assert torch.equal(Y, X + 1)
        assert torch.equal(X[:, 1:] - X[:, :-1], torch.ones(2, 4, dtype=X.dtype))
        starts += X[:, 0].tolist()
    assert len(set(s % 5 for s in starts)) == 1    # one random offset for the epoch
    assert len(set(starts)) == 6


def test_seq_data_iter_sequential_notes_example():
    my_seq = list(range(35))
    batches = list(R.seq_data_iter_sequential(my_seq, batch_size=2, num_steps=5, rng=random.Random(1)))
    assert len(batches) >= 2
    for (X1, Y1), (X2, _) in zip(batches, batches[1:]):
        assert torch.equal(Y1, X1 + 1)
        assert torch.equal(X2[:, 0], X1[:, -1] + 1)   # adjacent minibatches continue each row


def test_load_data_corpus():
    it, vocab = R.load_data_corpus(4, 7, use_random_iter=True, max_tokens=500, rng=random.Random(0))
    batches = list(it)
    assert len(vocab) == 28
    assert len(batches) == 17          # floor((500 - offset - 1) / 7) = 70 or 71 subsequences, 4 a batch
    for X, Y in batches:
        assert X.shape == (4, 7) and torch.equal(X[:, 1:], Y[:, :-1])


# ---- cells against torch ----------------------------------------------------------------------------

def _f64(module):
    return module.double()


def test_lstm_cell_like_torch_vs_torch():
    torch.manual_seed(0)
    cell = _f64(nn.LSTMCell(5, 7))
    x, h, c = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64), \
        torch.randn(3, 7, dtype=torch.float64)
    h_ref, c_ref = cell(x, (h, c))
    h1, c1 = R.lstm_cell_like_torch(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    torch.testing.assert_close(h1, h_ref, **TOL64)
    torch.testing.assert_close(c1, c_ref, **TOL64)


def test_gru_cell_like_torch_vs_torch():
    torch.manual_seed(1)
    cell = _f64(nn.GRUCell(5, 7))
    x, h = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    h1 = R.gru_cell_like_torch(x, h, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    torch.testing.assert_close(h1, cell(x, h), **TOL64)
    cell_nb = _f64(nn.GRUCell(5, 7, bias=False))
    torch.testing.assert_close(R.gru_cell_like_torch(x, h, cell_nb.weight_ih, cell_nb.weight_hh),
                               cell_nb(x, h), **TOL64)


# ---- whole layers against torch ---------------------------------------------------------------------

LAYER_CASES = [
    # (T, B, I, H, num_layers, bidirectional, batch_first, bias)
    (5, 3, 4, 6, 1, False, False, True),
    (4, 2, 3, 5, 2, False, True, True),
    (3, 2, 4, 3, 2, True, False, True),
    (1, 1, 1, 1, 1, False, False, False),        # seq len 1, batch 1, hidden 1, no bias
    (6, 4, 5, 7, 3, True, True, False),
]


def _inputs(T, B, I, H, L, D, batch_first, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*((B, T, I) if batch_first else (T, B, I)), generator=g, dtype=torch.float64)
    h0 = torch.randn(L * D, B, H, generator=g, dtype=torch.float64)
    c0 = torch.randn(L * D, B, H, generator=g, dtype=torch.float64)
    return x, h0, c0


def _grads_close(outs, refs, inputs):
    go = [torch.randn_like(o) for o in refs]
    g1 = torch.autograd.grad(outs, inputs, go)
    g2 = torch.autograd.grad(refs, inputs, go)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.parametrize("T,B,I,H,L,bidir,batch_first,bias", LAYER_CASES)
def test_lstm_like_torch_vs_torch(T, B, I, H, L, bidir, batch_first, bias):
    torch.manual_seed(2)
    layer = _f64(nn.LSTM(I, H, L, bias=bias, batch_first=batch_first, bidirectional=bidir))
    x, h0, c0 = _inputs(T, B, I, H, L, 2 if bidir else 1, batch_first, seed=3)
    x.requires_grad_(True)
    out_ref, (h_ref, c_ref) = layer(x, (h0, c0))
    out, (h, c) = R.lstm_like_torch(x, (h0, c0), R.torch_rnn_weights(layer), batch_first=batch_first)
    torch.testing.assert_close(out, out_ref, **TOL64)
    torch.testing.assert_close(h, h_ref, **TOL64)
    torch.testing.assert_close(c, c_ref, **TOL64)
    _grads_close((out, h, c), (out_ref, h_ref, c_ref), [x, *layer.parameters()])


@pytest.mark.parametrize("T,B,I,H,L,bidir,batch_first,bias", LAYER_CASES)
def test_gru_like_torch_vs_torch(T, B, I, H, L, bidir, batch_first, bias):
    torch.manual_seed(4)
    layer = _f64(nn.GRU(I, H, L, bias=bias, batch_first=batch_first, bidirectional=bidir))
    x, h0, _ = _inputs(T, B, I, H, L, 2 if bidir else 1, batch_first, seed=5)
    x.requires_grad_(True)
    out_ref, h_ref = layer(x, h0)
    out, h = R.gru_like_torch(x, h0, R.torch_rnn_weights(layer), batch_first=batch_first)
    torch.testing.assert_close(out, out_ref, **TOL64)
    torch.testing.assert_close(h, h_ref, **TOL64)
    _grads_close((out, h), (out_ref, h_ref), [x, *layer.parameters()])


def test_like_torch_zero_state_and_unbatched():
    torch.manual_seed(6)
    lstm_layer, gru_layer = _f64(nn.LSTM(3, 4, 2)), _f64(nn.GRU(3, 4, 2, bidirectional=True))
    x = torch.randn(5, 3, dtype=torch.float64)       # unbatched (T, I)
    out_ref, (h_ref, c_ref) = lstm_layer(x)
    out, (h, c) = R.lstm_like_torch(x, None, R.torch_rnn_weights(lstm_layer))
    assert out.shape == (5, 4) and h.shape == (2, 4)
    for a, b in ((out, out_ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, **TOL64)
    out_ref, h_ref = gru_layer(x)
    out, h = R.gru_like_torch(x, None, R.torch_rnn_weights(gru_layer))
    assert out.shape == (5, 8) and h.shape == (4, 4)
    torch.testing.assert_close(out, out_ref, **TOL64)
    torch.testing.assert_close(h, h_ref, **TOL64)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidir", [False, True])
def test_like_torch_lengths_vs_packed_sequence(kind, bidir):
    """lengths = what a PackedSequence carries (unsorted here): outputs past a length are zero, the
    final states are each sequence's own, the reverse direction starts at each sequence's end."""
    torch.manual_seed(7)
    T, B, I, H, L = 6, 4, 3, 5, 2
    layer = _f64((nn.LSTM if kind == "lstm" else nn.GRU)(I, H, L, bidirectional=bidir))
    D = 2 if bidir else 1
    x, h0, c0 = _inputs(T, B, I, H, L, D, False, seed=8)
    lengths = torch.tensor([3, 6, 1, 4])
    hx = (h0, c0) if kind == "lstm" else h0
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_p, st_ref = layer(packed, hx)
    out_ref, _ = pad_packed_sequence(out_p, total_length=T)
    fn = R.lstm_like_torch if kind == "lstm" else R.gru_like_torch
    out, st = fn(x, hx, R.torch_rnn_weights(layer), lengths=lengths)
    torch.testing.assert_close(out, out_ref, **TOL64)
    for a, b in zip(st if kind == "lstm" else (st,), st_ref if kind == "lstm" else (st_ref,)):
        torch.testing.assert_close(a, b, **TOL64)


def test_like_torch_dropout_between_layers():
    """Dropout acts on every layer's output but the last, in training only: with p = 1 the second
    layer sees zeros, so its output equals a one-layer run on zero input."""
    torch.manual_seed(9)
    layer = _f64(nn.GRU(3, 4, 2))
    x, h0, _ = _inputs(5, 2, 3, 4, 2, 1, False, seed=10)
    w = R.torch_rnn_weights(layer)
    out_eval, _ = R.gru_like_torch(x, h0, w, dropout=1.0, training=False)
    torch.testing.assert_close(out_eval, layer(x, h0)[0], **TOL64)
    out_drop, _ = R.gru_like_torch(x, h0, w, dropout=1.0, training=True)
    out_zero, _ = R.gru_like_torch(torch.zeros(5, 2, 4, dtype=torch.float64), h0[1:], w[1:])
    torch.testing.assert_close(out_drop, out_zero, **TOL64)


def test_like_torch_bad_weights():
    layer = nn.LSTM(3, 4)
    with pytest.raises(ValueError, match="weight_ih must be"):
        R.lstm_like_torch(torch.randn(2, 1, 5), None, R.torch_rnn_weights(layer))
    with pytest.raises(ValueError, match="weight_ih must be"):
        R.gru_like_torch(torch.randn(2, 1, 3), None, R.torch_rnn_weights(layer))   # 4H rows, not 3H
    with pytest.raises(ValueError, match="proj_size"):
        R.torch_rnn_weights(nn.LSTM(3, 4, proj_size=2))


# ---- the notes' scratch cells against torch ---------------------------------------------------------

def _one_hot_batch(V, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def test_notes_lstm_equals_torch_lstm():
    """The notes' lstm (section 57) with a torch LSTM's weights (gates i, f, g, o -> the notes' I, F,
    O, C~) and a linear output layer: the concise RNNModel's outputs and states, to 1e-10."""
    torch.manual_seed(11)
    V, H, B, T = 28, 16, 3, 7
    concise = R.RNNModel(nn.LSTM(V, H), V).double()
    scratch = R.RNNModelScratch(V, H, "cpu", R.get_lstm_params, R.init_lstm_state, R.lstm,
                                dtype=torch.float64)
    scratch.params = R.lstm_params_from_torch(concise.rnn, concise.linear)
    X = _one_hot_batch(V, B, T, seed=12)
    g = torch.Generator().manual_seed(13)
    state = (torch.randn(1, B, H, generator=g, dtype=torch.float64),
             torch.randn(1, B, H, generator=g, dtype=torch.float64))
    Y_ref, (h_ref, c_ref) = concise(X, state)
    Y, (h, c) = scratch(X, (state[0][0], state[1][0]))
    assert Y.shape == (T * B, V)
    torch.testing.assert_close(Y, Y_ref, **TOL64)
    torch.testing.assert_close(h, h_ref[0], **TOL64)
    torch.testing.assert_close(c, c_ref[0], **TOL64)


def _notes_gru_params_from_torch(layer, linear):
    H = layer.hidden_size
    w_ih, w_hh = layer.weight_ih_l0.detach(), layer.weight_hh_l0.detach()
    b_ih, b_hh = layer.bias_ih_l0.detach(), layer.bias_hh_l0.detach()
    blk = lambda t, k: t[k * H:(k + 1) * H]  # noqa: E731 -- torch's order r (0), z (1), n (2)
    return [blk(w_ih, 1).T, blk(w_hh, 1).T, blk(b_ih, 1) + blk(b_hh, 1),      # update gate Z
            blk(w_ih, 0).T, blk(w_hh, 0).T, blk(b_ih, 0) + blk(b_hh, 0),      # reset gate R
            blk(w_ih, 2).T, blk(w_hh, 2).T, blk(b_ih, 2),                     # candidate (b_hn = 0)
            linear.weight.detach().T, linear.bias.detach()]


def test_notes_gru_equals_torch_gru_where_the_conventions_meet():
    """The book's GRU resets H before the recurrent product, torch after it (on W_hn h + b_hn): the
    two agree when W_hn = 0 and b_hn = 0 (gate order, update rule and biases are then checked), and
    differ otherwise."""
    torch.manual_seed(14)
    V, H, B, T = 28, 8, 2, 6
    concise = R.RNNModel(nn.GRU(V, H), V).double()
    with torch.no_grad():
        concise.rnn.weight_hh_l0[2 * H:] = 0
        concise.rnn.bias_hh_l0[2 * H:] = 0
    scratch = R.RNNModelScratch(V, H, "cpu", R.get_gru_params, R.init_gru_state, R.gru,
                                dtype=torch.float64)
    scratch.params = _notes_gru_params_from_torch(concise.rnn, concise.linear)
    X = _one_hot_batch(V, B, T, seed=15)
    h0 = torch.randn(1, B, H, dtype=torch.float64)
    Y_ref, h_ref = concise(X, h0)
    Y, (h,) = scratch(X, (h0[0],))
    torch.testing.assert_close(Y, Y_ref, **TOL64)
    torch.testing.assert_close(h, h_ref[0], **TOL64)
    # With a recurrent candidate weight, the two conventions part.
    with torch.no_grad():
        concise.rnn.weight_hh_l0[2 * H:].normal_()
    scratch.params = _notes_gru_params_from_torch(concise.rnn, concise.linear)
    Y_ref, _ = concise(X, h0)
    Y, _ = scratch(X, (h0[0],))
    assert (Y - Y_ref).abs().max() > 1e-4


def test_notes_rnn_equals_torch_rnn():
    torch.manual_seed(16)
    V, H, B, T = 28, 8, 2, 5
    concise = R.RNNModel(nn.RNN(V, H), V).double()
    scratch = R.RNNModelScratch(V, H, "cpu", R.get_rnn_params, R.init_rnn_state, R.rnn,
                                dtype=torch.float64)
    r = concise.rnn
    scratch.params = [r.weight_ih_l0.detach().T, r.weight_hh_l0.detach().T,
                      (r.bias_ih_l0 + r.bias_hh_l0).detach(), concise.linear.weight.detach().T,
                      concise.linear.bias.detach()]
    X = _one_hot_batch(V, B, T, seed=17)
    Y_ref, h_ref = concise(X, concise.begin_state("cpu", B))
    Y, (h,) = scratch(X, scratch.begin_state(B, "cpu"))
    torch.testing.assert_close(Y, Y_ref, **TOL64)
    torch.testing.assert_close(h, h_ref[0], **TOL64)


# ---- the character language model -------------------------------------------------------------------

@pytest.mark.parametrize("params,init,fn,n_state", [
    (R.get_rnn_params, R.init_rnn_state, R.rnn, 1),
    (R.get_gru_params, R.init_gru_state, R.gru, 1),
    (R.get_lstm_params, R.init_lstm_state, R.lstm, 2),
])
def test_rnn_model_scratch_shapes(params, init, fn, n_state):
    torch.manual_seed(18)
    net = R.RNNModelScratch(28, 32, "cpu", params, init, fn)
    X = torch.arange(10).reshape((2, 5))
    state = net.begin_state(X.shape[0], "cpu")
    assert len(state) == n_state and state[0].shape == (2, 32)
    Y, new_state = net(X, state)
    assert Y.shape == (10, 28) and Y.dtype == torch.float32
    assert len(new_state) == n_state and new_state[0].shape == (2, 32)


@pytest.mark.parametrize("layer", [nn.RNN(28, 16), nn.GRU(28, 16, 2), nn.LSTM(28, 16, bidirectional=True)])
def test_rnn_model_concise_shapes(layer):
    net = R.RNNModel(layer, 28)
    X = torch.arange(12).reshape((3, 4))
    Y, state = net(X, net.begin_state("cpu", 3))
    assert Y.shape == (12, 28)
    h = state[0] if isinstance(layer, nn.LSTM) else state
    assert h.shape == (layer.num_layers * (2 if layer.bidirectional else 1), 3, 16)


def test_grad_clipping():
    torch.manual_seed(19)
    net = R.RNNModelScratch(28, 8, "cpu", R.get_rnn_params, R.init_rnn_state, R.rnn)
    for p in net.params:
        p.grad = torch.randn_like(p) * 10
    R.grad_clipping(net, 1.0)
    norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in net.params))
    assert norm == pytest.approx(1.0, rel=1e-5)
    before = [p.grad.clone() for p in net.params]
    R.grad_clipping(net, 5.0)                      # below theta: unchanged
    assert all(torch.equal(a, p.grad) for a, p in zip(before, net.params))
    module = nn.Linear(3, 3)
    module.weight.grad, module.bias.grad = torch.full((3, 3), 10.0), torch.full((3,), 10.0)
    R.grad_clipping(module, 2.0)
    assert math.sqrt(float((module.weight.grad ** 2).sum() + (module.bias.grad ** 2).sum())) == \
        pytest.approx(2.0, rel=1e-5)


def test_predict_format():
    torch.manual_seed(20)
    _, vocab = R.load_corpus(max_tokens=100)
    net = R.RNNModelScratch(len(vocab), 16, "cpu", R.get_gru_params, R.init_gru_state, R.gru)
    out = R.predict("time traveller ", 10, net, vocab, "cpu")
    assert out.startswith("time traveller ")
    generated = out[len("time traveller "):].replace("<unk>", "?")   # an untrained net may say <unk>
    assert len(generated) == 10 and set(generated) <= set(vocab.idx_to_token[1:]) | {"?"}


def _eval_loss(net, batches):
    with torch.no_grad():
        total = 0.0
        for X, Y in batches:
            y_hat, _ = net(X, net.begin_state(batch_size=X.shape[0], device="cpu"))
            total += float(F.cross_entropy(y_hat, Y.T.reshape(-1)))
        return total / len(batches)


@pytest.mark.parametrize("params,init,fn", [
    (R.get_lstm_params, R.init_lstm_state, R.lstm),
    (R.get_gru_params, R.init_gru_state, R.gru),
])
def test_train_epoch_lowers_the_loss_on_the_offline_corpus(params, init, fn):
    """One epoch of the notes' training (SGD lr 1, clipping at 1, random sampling) on the first 3000
    characters: the loss on a fixed set of batches falls from log(28) (uniform) well below it."""
    torch.manual_seed(21)
    it, vocab = R.load_data_corpus(16, 20, use_random_iter=True, max_tokens=3000, rng=random.Random(0))
    fixed = list(R.seq_data_iter_random(it.corpus, 16, 20, rng=random.Random(1)))[:3]
    net = R.RNNModelScratch(len(vocab), 32, "cpu", params, init, fn)
    before = _eval_loss(net, fixed)
    assert before == pytest.approx(math.log(28), abs=0.01)
    ppls = R.train(net, it, vocab, lr=4.0, num_epochs=3, device="cpu", use_random_iter=True)
    after = _eval_loss(net, fixed)
    assert len(ppls) == 3 and ppls[-1] < ppls[0]
    assert after < before - 0.3, (before, after)   # measured: 3.33 -> 2.89-2.91


def test_train_concise_model_sequential_partitioning():
    """The concise RNNModel through the same train loop (torch.optim.SGD, state carried and detached
    across minibatches with sequential partitioning)."""
    torch.manual_seed(22)
    it, vocab = R.load_data_corpus(16, 20, use_random_iter=False, max_tokens=3000, rng=random.Random(0))
    net = R.RNNModel(nn.LSTM(len(vocab), 32), len(vocab))
    ppls = R.train(net, it, vocab, lr=4.0, num_epochs=3, device="cpu")
    assert ppls[-1] < ppls[0] and ppls[-1] < 20


# ---- the seq ops' packed layout ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("lengths", [[5, 3, 3, 1], [4, 4, 4], [1]])
def test_seq_like_op_vs_torch_packed(kind, lengths):
    """lstm_seq_like_op / gru_seq_like_op (one layer, one direction, the ops' packed layout) against
    a bidirectional torch layer on the same PackedSequence: forward half with reverse=False and the
    *_reverse weights with reverse=True; outputs (N, H) row for row, final states; and the saved
    tensors consistent with the outputs (LSTM: h = o * tanh(c); GRU: h from (r, z, n))."""
    torch.manual_seed(23)
    T, B, I, H = max(lengths), len(lengths), 3, 4
    layer = _f64((nn.LSTM if kind == "lstm" else nn.GRU)(I, H, bidirectional=True))
    x, h0, c0 = _inputs(T, B, I, H, 1, 2, False, seed=24)
    packed = pack_padded_sequence(x, torch.tensor(lengths))      # sorted: enforce_sorted
    out_ref, st_ref = layer(packed, (h0, c0) if kind == "lstm" else h0)
    (fwd, rev), = R.torch_rnn_weights(layer)
    for d, w in enumerate((fwd, rev)):
        if kind == "lstm":
            out, hy, cy, gates, cs = R.lstm_seq_like_op(packed.data, packed.batch_sizes, h0[d], c0[d], *w,
                                                        reverse=d == 1)
            torch.testing.assert_close(cy, st_ref[1][d], **TOL64)
            torch.testing.assert_close(out, gates[:, 3 * H:] * torch.tanh(cs), **TOL64)
            h_ref = st_ref[0][d]
        else:
            out, hy, ws = R.gru_seq_like_op(packed.data, packed.batch_sizes, h0[d], *w, reverse=d == 1)
            assert ws.shape == (packed.data.shape[0], 4 * H)
            if d == 0:   # the first step's hn = h0 W_hn^T + b_hn, and hy = (1 - z) * n + z * h0 there
                b0 = int(packed.batch_sizes[0])
                r, z, n, hn = ws[:b0].split(H, dim=1)
                torch.testing.assert_close(hn, h0[0, :b0] @ w[1][2 * H:].T + w[3][2 * H:], **TOL64)
                torch.testing.assert_close(out[:b0], (1 - z) * n + z * h0[0, :b0], **TOL64)
            h_ref = st_ref[d]
        torch.testing.assert_close(out, out_ref.data[:, d * H:(d + 1) * H], **TOL64)
        torch.testing.assert_close(hy, h_ref, **TOL64)


def test_seq_like_op_bad_batch_sizes():
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    with pytest.raises(ValueError, match="non-increasing"):
        R.lstm_seq_like_op(torch.randn(5, 3), torch.tensor([2, 3]), torch.zeros(3, 4), torch.zeros(3, 4),
                           w_ih, w_hh)
    with pytest.raises(ValueError, match="rows"):
        R.gru_seq_like_op(torch.randn(4, 3), torch.tensor([3, 2]), torch.zeros(3, 4), w_ih[:12], w_hh[:12])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reference_backend_of_the_cell_functionals_is_the_notes_math(cell, monkeypatch):
    """pyfastdl.functional.lstm_cell / gru_cell under backends.use("reference") run
    lstm_cell_like_torch / gru_cell_like_torch (not torch's _VF op), equal to torch's cell in float64."""
    import pyfastdl.functional as PF
    from pyfastdl import backends
    calls = []
    name = f"{cell}_cell_like_torch"
    original = getattr(PF, name)
    monkeypatch.setattr(PF, name, lambda *a: calls.append(name) or original(*a))
    g = torch.Generator().manual_seed(7)
    G = 4 if cell == "lstm" else 3
    x, h, c = (torch.randn(3, n, generator=g, dtype=torch.float64) for n in (4, 5, 5))
    w_ih, w_hh = torch.randn(G * 5, 4, generator=g, dtype=torch.float64), torch.randn(G * 5, 5, generator=g, dtype=torch.float64)
    b_ih, b_hh = torch.randn(G * 5, generator=g, dtype=torch.float64), torch.randn(G * 5, generator=g, dtype=torch.float64)
    with backends.use("reference"):
        out = (PF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh) if cell == "lstm"
               else (PF.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh),))
        assert backends.last_dispatch().backend == "reference"
    assert calls == [name]
    ref = (torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh) if cell == "lstm"
           else (torch._VF.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh),))
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
