"""cuDNN's fused LSTM and GRU on a GPU, through the backend function `keras.layers.LSTM`/`GRU` call.

Keras exposes no public function for its cuDNN path, so this calls the one its layers call
(`keras.src.backend.lstm` / `gru`, pinned with keras in constraints.txt), with the arguments
its layers pass. verne's weights are already in Keras' layout (gates i, f, g, o and z, r, n;
GRU reset_after with a separate recurrent bias), so no conversion happens here and
tests/test_cudnn.py checks the layout against `keras.layers.LSTM`/`GRU` on the CPU.

Unlike the other kernels, cuDNN computes the input projection itself, so these take the layer
input `x` and `kernel` rather than `x_proj`. They return None where Keras declines (no cuDNN
build, no GPU kernel), and the caller falls back to the portable kernels.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras.src import backend as keras_backend


def _cast(x: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    return x if x.dtype == dtype else tf.cast(x, dtype)


def lstm_sequence_cudnn(x: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, kernel: tf.Tensor, w_h: tf.Tensor,
                        bias: tf.Tensor, *, compute_dtype: tf.DType = tf.float32,
                        ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor] | None:
    """(outputs [B, T, H], h_T, c_T) in float32, computed in compute_dtype; None if unavailable."""
    args = [_cast(t, compute_dtype) for t in (x, h0, c0, kernel, w_h, bias)]
    try:
        _, outputs, (h, c) = keras_backend.lstm(
            args[0], args[1], args[2], None, kernel=args[3], recurrent_kernel=args[4], bias=args[5],
            activation=keras.activations.tanh, recurrent_activation=keras.activations.sigmoid,
            return_sequences=True)
    except NotImplementedError:
        return None
    return tuple(_cast(t, tf.float32) for t in (outputs, h, c))


def gru_sequence_cudnn(x: tf.Tensor, h0: tf.Tensor, kernel: tf.Tensor, w_h: tf.Tensor, bias: tf.Tensor,
                       recurrent_bias: tf.Tensor, *, compute_dtype: tf.DType = tf.float32,
                       ) -> tuple[tf.Tensor, tf.Tensor] | None:
    """(outputs [B, T, H], h_T) in float32, computed in compute_dtype; None if unavailable."""
    # Keras' reset_after GRU keeps both biases in one [2, 3H] weight: input bias first.
    both_biases = tf.stack([bias, recurrent_bias])
    args = [_cast(t, compute_dtype) for t in (x, h0, kernel, w_h, both_biases)]
    try:
        _, outputs, (h,) = keras_backend.gru(
            args[0], args[1], None, kernel=args[2], recurrent_kernel=args[3], bias=args[4],
            activation=keras.activations.tanh, recurrent_activation=keras.activations.sigmoid,
            return_sequences=True, reset_after=True)
    except NotImplementedError:
        return None
    return tuple(_cast(t, tf.float32) for t in (outputs, h))
