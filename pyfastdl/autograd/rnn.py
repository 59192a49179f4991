"""LSTM and GRU (family ``rnn``): the ops' shape rules and fake (meta) implementations, shared by the
C++ ops (``torch.ops.pyfastdl.{lstm,gru}_{cell,seq}_*``) and the Triton ops
(``torch.ops.pyfastdl_triton.*``); the autograd Functions over them. Schemas: csrc/ops.cpp."""
import torch

__all__ = ["lstm_cell_fwd_shapes", "lstm_cell_bwd_shapes", "gru_cell_fwd_shapes", "gru_cell_bwd_shapes",
           "lstm_seq_fwd_shapes", "lstm_seq_bwd_shapes", "gru_seq_fwd_shapes", "gru_seq_bwd_shapes"]


def _masked(mask, *tensors):
    return tuple(t if m else None for t, m in zip(tensors, mask))


def _bias_like(w):
    return w.new_empty((w.shape[0],))


def lstm_cell_fwd_shapes(input, hx, w_ih):
    """(hy, cy, gates): (B, H), (B, H), (B, 4H)."""
    B, H = hx.shape
    return hx.new_empty((B, H)), hx.new_empty((B, H)), hx.new_empty((B, 4 * H))


def lstm_cell_bwd_shapes(input, hx, cx, w_ih, w_hh, output_mask):
    """(grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias), None where not asked for."""
    return _masked(output_mask, input.new_empty(input.shape), hx.new_empty(hx.shape), cx.new_empty(cx.shape),
                   w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape), _bias_like(w_ih))


def gru_cell_fwd_shapes(input, hx, w_ih):
    """(hy, ws): (B, H), (B, 4H)."""
    B, H = hx.shape
    return hx.new_empty((B, H)), hx.new_empty((B, 4 * H))


def gru_cell_bwd_shapes(input, hx, w_ih, w_hh, output_mask):
    """(grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh), None where not asked for."""
    return _masked(output_mask, input.new_empty(input.shape), hx.new_empty(hx.shape), w_ih.new_empty(w_ih.shape),
                   w_hh.new_empty(w_hh.shape), _bias_like(w_ih), _bias_like(w_hh))


def lstm_seq_fwd_shapes(input, h0):
    """(output, hy, cy, gates, cs): (N, H), (B, H), (B, H), (N, 4H), (N, H)."""
    N, (B, H) = input.shape[0], h0.shape
    return (input.new_empty((N, H)), h0.new_empty((B, H)), h0.new_empty((B, H)), input.new_empty((N, 4 * H)),
            input.new_empty((N, H)))


def lstm_seq_bwd_shapes(input, h0, c0, w_ih, w_hh, output_mask):
    """(grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias), None where not asked for."""
    return _masked(output_mask, input.new_empty(input.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
                   w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape), _bias_like(w_ih))


def gru_seq_fwd_shapes(input, h0):
    """(output, hy, ws): (N, H), (B, H), (N, 4H)."""
    N, (B, H) = input.shape[0], h0.shape
    return input.new_empty((N, H)), h0.new_empty((B, H)), input.new_empty((N, 4 * H))


def gru_seq_bwd_shapes(input, h0, w_ih, w_hh, output_mask):
    """(grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh), None where not asked for."""
    return _masked(output_mask, input.new_empty(input.shape), h0.new_empty(h0.shape), w_ih.new_empty(w_ih.shape),
                   w_hh.new_empty(w_hh.shape), _bias_like(w_ih), _bias_like(w_hh))


@torch.library.register_fake("pyfastdl::lstm_cell_fwd")
def _lstm_cell_fwd_fake(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return lstm_cell_fwd_shapes(input, hx, w_ih)


@torch.library.register_fake("pyfastdl::lstm_cell_bwd")
def _lstm_cell_bwd_fake(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates, output_mask):
    return lstm_cell_bwd_shapes(input, hx, cx, w_ih, w_hh, output_mask)


@torch.library.register_fake("pyfastdl::gru_cell_fwd")
def _gru_cell_fwd_fake(input, hx, w_ih, w_hh, b_ih, b_hh):
    return gru_cell_fwd_shapes(input, hx, w_ih)


@torch.library.register_fake("pyfastdl::gru_cell_bwd")
def _gru_cell_bwd_fake(grad_hy, input, hx, w_ih, w_hh, ws, output_mask):
    return gru_cell_bwd_shapes(input, hx, w_ih, w_hh, output_mask)


@torch.library.register_fake("pyfastdl::lstm_seq_fwd")
def _lstm_seq_fwd_fake(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse):
    return lstm_seq_fwd_shapes(input, h0)


@torch.library.register_fake("pyfastdl::lstm_seq_bwd")
def _lstm_seq_bwd_fake(grad_output, grad_hy, grad_cy, input, batch_sizes, h0, c0, w_ih, w_hh, output, gates, cs,
                       reverse, output_mask):
    return lstm_seq_bwd_shapes(input, h0, c0, w_ih, w_hh, output_mask)


@torch.library.register_fake("pyfastdl::gru_seq_fwd")
def _gru_seq_fwd_fake(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    return gru_seq_fwd_shapes(input, h0)


@torch.library.register_fake("pyfastdl::gru_seq_bwd")
def _gru_seq_bwd_fake(grad_output, grad_hy, input, batch_sizes, h0, w_ih, w_hh, output, ws, reverse, output_mask):
    return gru_seq_bwd_shapes(input, h0, w_ih, w_hh, output_mask)


# ---- autograd Functions ------------------------------------------------------------------------------
# ``ops`` is the op namespace of the backend (pyfastdl.backends.ops). Each Function calls its forward
# op once and its backward op once, with ctx.needs_input_grad as the output mask; None gradients
# arrive as None (set_materialize_grads(False)) and are passed to the ops as None (= zero).
# Double backward (backward(create_graph=True)) is not supported: it raises.

def _no_double_backward(name):
    if torch.is_grad_enabled():
        raise RuntimeError(f"pyfastdl.{name}: double backward (backward(create_graph=True) through an LSTM/GRU) "
                           "is not supported; use torch.nn's LSTM/GRU for higher-order gradients")


def _two_bias_grads(gb, need_ih, need_hh):
    """The LSTM's b_ih and b_hh have the same gradient: one tensor each (AccumulateGrad may keep the
    tensor it is given as .grad)."""
    return (gb if need_ih else None), ((gb.clone() if need_ih else gb) if need_hh else None)


class LSTMCellFunction(torch.autograd.Function):
    """One LSTM step. forward(input (B, I), hx (B, H), cx (B, H), w_ih (4H, I), w_hh (4H, H),
    b_ih (4H,)|None, b_hh (4H,)|None, ops) -> (hy, cy), each (B, H)."""

    @staticmethod
    def forward(ctx, input, hx, cx, w_ih, w_hh, b_ih, b_hh, ops):
        ctx.set_materialize_grads(False)
        hy, cy, gates = ops.lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        ctx.save_for_backward(input, hx, cx, w_ih, w_hh, cy, gates)
        ctx.ops = ops
        return hy, cy

    @staticmethod
    def backward(ctx, grad_hy, grad_cy):
        _no_double_backward("lstm_cell")
        need = ctx.needs_input_grad
        if grad_hy is None and grad_cy is None:
            return (None,) * 8
        input, hx, cx, w_ih, w_hh, cy, gates = ctx.saved_tensors
        mask = [bool(need[0]), bool(need[1]), bool(need[2]), bool(need[3]), bool(need[4]), bool(need[5] or need[6])]
        gi, ghx, gcx, gwi, gwh, gb = ctx.ops.lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates,
                                                           mask)
        gb_ih, gb_hh = _two_bias_grads(gb, need[5], need[6])
        return (gi if need[0] else None, ghx if need[1] else None, gcx if need[2] else None,
                gwi if need[3] else None, gwh if need[4] else None, gb_ih, gb_hh, None)


class GRUCellFunction(torch.autograd.Function):
    """One GRU step. forward(input (B, I), hx (B, H), w_ih (3H, I), w_hh (3H, H), b_ih (3H,)|None,
    b_hh (3H,)|None, ops) -> hy (B, H)."""

    @staticmethod
    def forward(ctx, input, hx, w_ih, w_hh, b_ih, b_hh, ops):
        ctx.set_materialize_grads(False)
        hy, ws = ops.gru_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh)
        ctx.save_for_backward(input, hx, w_ih, w_hh, ws)
        ctx.ops = ops
        return hy

    @staticmethod
    def backward(ctx, grad_hy):
        _no_double_backward("gru_cell")
        need = ctx.needs_input_grad
        if grad_hy is None:
            return (None,) * 7
        input, hx, w_ih, w_hh, ws = ctx.saved_tensors
        mask = [bool(n) for n in need[:6]]
        grads = ctx.ops.gru_cell_bwd(grad_hy, input, hx, w_ih, w_hh, ws, mask)
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None,)


class LSTMSeqFunction(torch.autograd.Function):
    """One layer and direction of an LSTM over a packed sequence (layout: csrc/ops.cpp).
    forward(input (N, I), batch_sizes (T,) int64 CPU, h0 (B, H), c0 (B, H), w_ih, w_hh, b_ih|None,
    b_hh|None, reverse, ops) -> (output (N, H), hy (B, H), cy (B, H))."""

    @staticmethod
    def forward(ctx, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, ops):
        ctx.set_materialize_grads(False)
        output, hy, cy, gates, cs = ops.lstm_seq_fwd(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse)
        ctx.save_for_backward(input, batch_sizes, h0, c0, w_ih, w_hh, output, gates, cs)
        ctx.reverse, ctx.ops = reverse, ops
        return output, hy, cy

    @staticmethod
    def backward(ctx, grad_output, grad_hy, grad_cy):
        _no_double_backward("lstm")
        need = ctx.needs_input_grad
        if grad_output is None and grad_hy is None and grad_cy is None:
            return (None,) * 10
        input, batch_sizes, h0, c0, w_ih, w_hh, output, gates, cs = ctx.saved_tensors
        mask = [bool(need[0]), bool(need[2]), bool(need[3]), bool(need[4]), bool(need[5]), bool(need[6] or need[7])]
        gi, gh0, gc0, gwi, gwh, gb = ctx.ops.lstm_seq_bwd(grad_output, grad_hy, grad_cy, input, batch_sizes, h0, c0,
                                                          w_ih, w_hh, output, gates, cs, ctx.reverse, mask)
        gb_ih, gb_hh = _two_bias_grads(gb, need[6], need[7])
        return (gi if need[0] else None, None, gh0 if need[2] else None, gc0 if need[3] else None,
                gwi if need[4] else None, gwh if need[5] else None, gb_ih, gb_hh, None, None)


class GRUSeqFunction(torch.autograd.Function):
    """One layer and direction of a GRU over a packed sequence (layout: csrc/ops.cpp).
    forward(input (N, I), batch_sizes (T,) int64 CPU, h0 (B, H), w_ih, w_hh, b_ih|None, b_hh|None,
    reverse, ops) -> (output (N, H), hy (B, H))."""

    @staticmethod
    def forward(ctx, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse, ops):
        ctx.set_materialize_grads(False)
        output, hy, ws = ops.gru_seq_fwd(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse)
        ctx.save_for_backward(input, batch_sizes, h0, w_ih, w_hh, output, ws)
        ctx.reverse, ctx.ops = reverse, ops
        return output, hy

    @staticmethod
    def backward(ctx, grad_output, grad_hy):
        _no_double_backward("gru")
        need = ctx.needs_input_grad
        if grad_output is None and grad_hy is None:
            return (None,) * 9
        input, batch_sizes, h0, w_ih, w_hh, output, ws = ctx.saved_tensors
        mask = [bool(need[0]), bool(need[2]), bool(need[3]), bool(need[4]), bool(need[5]), bool(need[6])]
        grads = ctx.ops.gru_seq_bwd(grad_output, grad_hy, input, batch_sizes, h0, w_ih, w_hh, output, ws,
                                    ctx.reverse, mask)
        gi, gh0, gwi, gwh, gbi, gbh = (g if m else None for g, m in zip(grads, mask))
        return gi, None, gh0, gwi, gwh, gbi, gbh, None, None


__all__ += ["LSTMCellFunction", "GRUCellFunction", "LSTMSeqFunction", "GRUSeqFunction"]
