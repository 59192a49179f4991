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
from .conv2d import (Conv2D, comp_conv2d, conv2d_like_torch, conv2d_out_size, conv2d_padding, corr2d,
                     corr2d_multi_in, corr2d_multi_in_out, corr2d_multi_in_out_1x1, pool2d)
from .corpus import CORPUS_MODULES, Vocab, count_corpus, load_corpus, read_corpus, tokenize
from .models import (DenseBlock, Inception, Residual, alexnet, conv_block, densenet, googlenet, lenet,
                     lenet_batch_norm, nin, nin_block, resnet18, resnet_block, transition_block, vgg,
                     vgg11, vgg_block)
from .rnn import (RNNModel, RNNModelScratch, SeqDataLoader, get_gru_params, get_lstm_params,
                  get_rnn_params, grad_clipping, gru, gru_cell_like_torch, gru_like_torch,
                  init_gru_state, init_lstm_state, init_rnn_state, load_data_corpus, lstm,
                  lstm_cell_like_torch, lstm_like_torch, lstm_params_from_torch, predict, rnn,
                  lstm_seq_like_op, gru_seq_like_op,
                  seq_data_iter_random, seq_data_iter_sequential, torch_rnn_weights, train, train_epoch)

__all__ += ["corr2d", "Conv2D", "comp_conv2d", "corr2d_multi_in", "corr2d_multi_in_out",
            "corr2d_multi_in_out_1x1", "pool2d", "conv2d_padding", "conv2d_out_size",
            "conv2d_like_torch"]
__all__ += ["lenet", "lenet_batch_norm", "alexnet", "vgg_block", "vgg", "vgg11", "nin_block", "nin",
            "Inception", "googlenet", "Residual", "resnet_block", "resnet18", "conv_block",
            "DenseBlock", "transition_block", "densenet"]
__all__ += ["CORPUS_MODULES", "read_corpus", "tokenize", "count_corpus", "Vocab", "load_corpus"]
__all__ += ["seq_data_iter_random", "seq_data_iter_sequential", "SeqDataLoader", "load_data_corpus",
            "get_rnn_params", "init_rnn_state", "rnn", "get_gru_params", "init_gru_state", "gru",
            "get_lstm_params", "init_lstm_state", "lstm", "RNNModelScratch", "RNNModel", "predict",
            "grad_clipping", "train_epoch", "train", "lstm_cell_like_torch", "gru_cell_like_torch",
            "lstm_like_torch", "gru_like_torch", "torch_rnn_weights", "lstm_params_from_torch",
            "lstm_seq_like_op", "gru_seq_like_op"]
