"""Recurrent kernels: whole-window LSTM and GRU recurrences with hand-written gradients.

    outputs, h_T, c_T = lstm_sequence(x_proj, h0, c0, w_h, compute_dtype=tf.float32)
    outputs, h_T = gru_sequence(x_proj, h0, w_h, b_h, compute_dtype=tf.float32)

`x_proj` is the input projection for the whole window ([B, T, 4H] gates i, f, g, o, or
[B, T, 3H] gates z, r, n; input bias folded in), computed by the caller in one matmul.
`compute_dtype=tf.bfloat16` runs the recurrent matmuls in bfloat16; state, gates and the
weight-gradient accumulation stay float32. The `*_reference` functions are the plain autodiff
definitions the fast ones are tested against (tests/test_kernels.py).
"""

from trainer.kernels.gru import gru_sequence_fast
from trainer.kernels.lstm import lstm_sequence_fast
from trainer.kernels.reference import gru_sequence_reference, lstm_sequence_reference

# The default path is whichever measured fastest in bench/train.py (see bench/README.md).
lstm_sequence = lstm_sequence_fast
gru_sequence = gru_sequence_fast

__all__ = [
    "gru_sequence", "gru_sequence_fast", "gru_sequence_reference",
    "lstm_sequence", "lstm_sequence_fast", "lstm_sequence_reference",
]
