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
