"""Drop-in LSTM, GRU, LSTMCell and GRUCell: subclasses of torch's modules overriding ``forward`` only, so
constructor arguments, parameter names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...) and state_dict are
torch's. A layer runs one op call per layer and direction (the whole time loop in C++ / CUDA / Triton:
csrc/ops.cpp, family rnn); PackedSequence input goes to the ops as it is (steps past a sequence's end
are skipped, not computed and masked). Notes sections 56-58."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence

from .. import backends
from .. import functional as pf
from ..autograd.rnn import GRUSeqFunction, LSTMSeqFunction

__all__ = ["LSTM", "GRU", "LSTMCell", "GRUCell"]


def _refuse_proj(module):
    if module.proj_size:
        raise NotImplementedError(f"pyfastdl.nn.LSTM: proj_size = {module.proj_size} is not supported (only "
                                  "proj_size = 0); use torch.nn.LSTM for LSTMs with projections")


def _run_layers(module, lstm: bool, ops, data, batch_sizes, h0, c0):
    """The stacked layers over packed data (N, I): returns (output (N, D*H), h_n, c_n or None), h_n and
    c_n (L*D, B, H). h0, c0: (L*D, B, H) in sorted batch order."""
    D = 2 if module.bidirectional else 1
    grad = torch.is_grad_enabled()
    layer_input = data
    hs, cs = [], []
    for layer in range(module.num_layers):
        if layer > 0 and module.dropout > 0 and module.training:
            layer_input = F.dropout(layer_input, module.dropout, training=True)
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(module, "weight_ih" + sfx), getattr(module, "weight_hh" + sfx)
            b_ih = getattr(module, "bias_ih" + sfx) if module.bias else None
            b_hh = getattr(module, "bias_hh" + sfx) if module.bias else None
            idx = layer * D + d
            need = grad and (layer_input.requires_grad or h0.requires_grad or w_ih.requires_grad or
                             w_hh.requires_grad or (b_ih is not None and (b_ih.requires_grad or b_hh.requires_grad))
                             or (c0 is not None and c0.requires_grad))
            if lstm:
                if need:
                    out, hy, cy = LSTMSeqFunction.apply(layer_input, batch_sizes, h0[idx], c0[idx], w_ih, w_hh,
                                                        b_ih, b_hh, bool(d), ops)
                else:
                    out, hy, cy = ops.lstm_seq_fwd(layer_input, batch_sizes, h0[idx], c0[idx], w_ih, w_hh, b_ih,
                                                   b_hh, bool(d))[:3]
                cs.append(cy)
            else:
                if need:
                    out, hy = GRUSeqFunction.apply(layer_input, batch_sizes, h0[idx], w_ih, w_hh, b_ih, b_hh,
                                                   bool(d), ops)
                else:
                    out, hy = ops.gru_seq_fwd(layer_input, batch_sizes, h0[idx], w_ih, w_hh, b_ih, b_hh,
                                              bool(d))[:2]
            outs.append(out)
            hs.append(hy)
        layer_input = outs[0] if D == 1 else torch.cat(outs, dim=1)
    return layer_input, torch.stack(hs), (torch.stack(cs) if lstm else None)


def _forward(module, lstm: bool, input, hx):
    """torch.nn.LSTM / GRU's forward with the layers run by _run_layers; torch's own argument checks."""
    name = "LSTM" if lstm else "GRU"
    if lstm:
        _refuse_proj(module)
    packed = isinstance(input, PackedSequence)
    probe = input.data if packed else input
    backend = backends.pick("lstm" if lstm else "gru", probe.device, probe.dtype, pf._RNN_DTYPES)
    if backend in ("torch", "reference"):  # torch's own module
        return (torch.nn.LSTM if lstm else torch.nn.GRU).forward(module, input, hx)
    ops = backends.ops(backend, "rnn")
    module._update_flat_weights()
    D = 2 if module.bidirectional else 1
    H = module.hidden_size
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        B = int(batch_sizes[0]) if batch_sizes.numel() else 0
        is_batched = True
    else:
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        is_batched = input.dim() == 3
        if not is_batched:
            input = input.unsqueeze(0 if module.batch_first else 1)
        x = input.transpose(0, 1) if module.batch_first else input  # (T, B, I)
        T, B = x.shape[0], x.shape[1]
        data = x.reshape(T * B, x.shape[2])
        batch_sizes = torch.full((T,), B, dtype=torch.int64)
        sorted_indices = unsorted_indices = None
    check_input = data if packed else input
    if hx is None:
        zeros = torch.zeros(module.num_layers * D, B, H, dtype=data.dtype, device=data.device)
        hx = (zeros, zeros) if lstm else zeros
        module.check_forward_args(check_input, hx, batch_sizes if packed else None)
    else:
        if not packed:
            hs = hx if lstm else (hx,)
            want = 3 if is_batched else 2
            if any(h.dim() != want for h in hs):
                dims = ", ".join(f"{h.dim()}-D" for h in hs)
                raise RuntimeError(f"For {'batched 3-D' if is_batched else 'unbatched 2-D'} input, "
                                   f"{'hx and cx' if lstm else 'hx'} should also be {want}-D but got ({dims}) tensors")
            if not is_batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if lstm else hx.unsqueeze(1)
        module.check_forward_args(check_input, hx, batch_sizes if packed else None)
        hx = module.permute_hidden(hx, sorted_indices)
    h0, c0 = hx if lstm else (hx, None)
    for nm, t in (("hx", h0), ("cx", c0)):
        if t is not None and (t.dtype != data.dtype or t.device != data.device):
            raise RuntimeError(f"{name}: expected {nm} of dtype {data.dtype} on {data.device} like input, got "
                               f"{nm} of dtype {t.dtype} on {t.device}")
    out, h_n, c_n = _run_layers(module, lstm, ops, data, batch_sizes, h0, c0)
    if packed:
        output = PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = c_n.index_select(1, unsorted_indices) if lstm else None
    else:
        output = out.view(T, B, D * H)
        if module.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output = output.squeeze(1 if not module.batch_first else 0)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if lstm else None
    return (output, (h_n, c_n)) if lstm else (output, h_n)


class LSTM(torch.nn.LSTM):
    """Drop-in ``torch.nn.LSTM`` (num_layers, bias, batch_first, dropout, bidirectional; proj_size must
    be 0). Input (T, B, I) / (B, T, I) with batch_first / (T, I) unbatched / PackedSequence; returns
    (output, (h_n, c_n)) as torch. float32/float64 on the CPU. Double backward raises."""

    def forward(self, input, hx=None):
        return _forward(self, True, input, hx)


class GRU(torch.nn.GRU):
    """Drop-in ``torch.nn.GRU`` (num_layers, bias, batch_first, dropout, bidirectional). Input and
    output as torch's. float32/float64 on the CPU. Double backward raises."""

    def forward(self, input, hx=None):
        return _forward(self, False, input, hx)


class LSTMCell(torch.nn.LSTMCell):
    """Drop-in ``torch.nn.LSTMCell``: input (B, I) or (I,), hx = (h, c) each (B, H) or (H,), or None
    (zeros). Returns (h', c'). One fused op forward and backward (pyfastdl.functional.lstm_cell)."""

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:  # two tensors (torch.compile refuses one tensor passed twice to a Function)
            zeros = torch.zeros(2, input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            hx = (zeros[0], zeros[1])
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        hy, cy = pf.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (hy, cy) if batched else (hy.squeeze(0), cy.squeeze(0))


class GRUCell(torch.nn.GRUCell):
    """Drop-in ``torch.nn.GRUCell``: input (B, I) or (I,), hx (B, H) or (H,) or None (zeros). Returns h'.
    One fused op forward and backward (pyfastdl.functional.gru_cell)."""

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            hx = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        elif not batched:
            hx = hx.unsqueeze(0)
        hy = pf.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return hy if batched else hy.squeeze(0)
