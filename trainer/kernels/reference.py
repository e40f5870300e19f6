"""Plain recurrences under TensorFlow autodiff: the definition the fast kernels are tested against.

Both functions take the input projection for the whole window already computed (one big matmul
outside the time loop, bias folded in), so only `h @ w_h` runs per step. The layout is
batch-major at the interface and time-major inside, because `tf.scan` iterates the first axis.
"""

from __future__ import annotations

import tensorflow as tf


def _recurrent_matmul(h: tf.Tensor, w_h: tf.Tensor, compute_dtype: tf.DType) -> tf.Tensor:
    """h @ w_h in `compute_dtype`, result in float32 (the state always stays float32)."""
    if compute_dtype == tf.float32:
        return tf.matmul(h, w_h)
    return tf.cast(tf.matmul(tf.cast(h, compute_dtype), tf.cast(w_h, compute_dtype)), tf.float32)


def lstm_cell(z: tf.Tensor, c: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """One LSTM step from pre-activations z [B, 4H] (gate order i, f, g, o); returns (h, c)."""
    i, f, g, o = tf.split(z, 4, axis=-1)
    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
    return tf.sigmoid(o) * tf.tanh(c), c


def gru_cell(x: tf.Tensor, hz: tf.Tensor, h: tf.Tensor) -> tf.Tensor:
    """One GRU step, Keras `reset_after=True`: x, hz [B, 3H] (gates z, r, n); returns new h."""
    x_z, x_r, x_n = tf.split(x, 3, axis=-1)
    h_z, h_r, h_n = tf.split(hz, 3, axis=-1)
    z = tf.sigmoid(x_z + h_z)
    r = tf.sigmoid(x_r + h_r)
    n = tf.tanh(x_n + r * h_n)
    return z * h + (1.0 - z) * n


def lstm_sequence_reference(
    x_proj: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_h: tf.Tensor, *,
    compute_dtype: tf.DType = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """LSTM over x_proj [B, T, 4H]; returns (outputs [B, T, H], h_T, c_T)."""
    x_tm = tf.transpose(x_proj, [1, 0, 2])

    def step(carry: tuple[tf.Tensor, tf.Tensor], x_t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        h, c = carry
        return lstm_cell(x_t + _recurrent_matmul(h, w_h, compute_dtype), c)

    hs, cs = tf.scan(step, x_tm, initializer=(h0, c0))
    return tf.transpose(hs, [1, 0, 2]), hs[-1], cs[-1]


def gru_sequence_reference(
    x_proj: tf.Tensor, h0: tf.Tensor, w_h: tf.Tensor, b_h: tf.Tensor, *,
    compute_dtype: tf.DType = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor]:
    """GRU over x_proj [B, T, 3H]; returns (outputs [B, T, H], h_T)."""
    x_tm = tf.transpose(x_proj, [1, 0, 2])

    def step(h: tf.Tensor, x_t: tf.Tensor) -> tf.Tensor:
        return gru_cell(x_t, _recurrent_matmul(h, w_h, compute_dtype) + b_h, h)

    hs = tf.scan(step, x_tm, initializer=h0)
    return tf.transpose(hs, [1, 0, 2]), hs[-1]
