"""The notes' pure-Python implementations (d2l style), runnable without the d2l package. Every
pyfastdl kernel is checked against them (in float64) and benchmarked against them."""
from .attention import (AddNorm, AdditiveAttention, BERTEncoder, DotProductAttention, EncoderBlock,
                        MultiHeadAttention, PositionalEncoding, PositionWiseFFN,
                        TransformerEncoder, masked_softmax, sdpa_like_torch, sequence_mask,
                        transpose_output, transpose_qkv, valid_lens_mask)
from .batch_norm import BatchNorm, batch_norm, batch_norm_like_torch
from .optim import (adadelta, adadelta_step_, adagrad, adagrad_step_, adam, adam_step_,
                    init_adadelta_states, init_adagrad_states, init_adam_states,
                    init_momentum_states, init_rmsprop_states, rmsprop, rmsprop_step_, sgd,
                    sgd_momentum, sgd_step_)

__all__ = ["BatchNorm", "batch_norm", "batch_norm_like_torch"]
__all__ += ["sgd", "sgd_momentum", "init_momentum_states", "adagrad", "init_adagrad_states",
            "rmsprop", "init_rmsprop_states", "adadelta", "init_adadelta_states", "adam",
            "init_adam_states", "sgd_step_", "adam_step_", "adagrad_step_", "rmsprop_step_",
            "adadelta_step_"]
__all__ += ["sequence_mask", "masked_softmax", "AdditiveAttention", "DotProductAttention",
            "transpose_qkv", "transpose_output", "MultiHeadAttention", "PositionWiseFFN", "AddNorm",
            "PositionalEncoding", "EncoderBlock", "TransformerEncoder", "BERTEncoder",
            "sdpa_like_torch", "valid_lens_mask"]
