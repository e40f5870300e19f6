"""Quasi-recurrent network layer (Bradbury et al. 2016) as awd-lstm-lm uses it (torchqrnn).

    [z, f, o] = [x_{t-1}, x_t] W + b      (window 2; window 1 uses x_t alone)
    z = tanh(z), f = sigmoid(f), o = sigmoid(o)
    c_t = f_t * z_t + (1 - f_t) * c_{t-1}          fo-pooling, torchqrnn's ForgetMult
    h_t = o_t * c_t

All matrix work is one matmul for the whole window; only the element-wise pooling is a loop,
which is why the QRNN is fast. The state is (c, last input) with window 2 (torchqrnn's
`save_prev_x`, so the convolution sees across window boundaries) and (c,) with window 1.
awd-lstm-lm applies weight drop to the QRNN's whole linear map (it has no hidden-to-hidden
matrix); so does this layer.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.hparams import HParams
from trainer.models import awd
from trainer.models.recurrent import RecurrentLM


def qrnn_gates(x: tf.Tensor, prev_x: tf.Tensor | None, kernel: tf.Tensor, bias: tf.Tensor,
               ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """z, f, o [B, T, H] for x [B, T, D]; `prev_x` [B, D] is x_{-1} for window 2, None for 1."""
    if prev_x is not None:
        shifted = tf.concat([prev_x[:, None, :], x[:, :-1, :]], axis=1)
        x = tf.concat([shifted, x], axis=-1)
    z, f, o = tf.split(tf.einsum("btd,dg->btg", x, kernel) + bias, 3, axis=-1)
    return tf.tanh(z), tf.sigmoid(f), tf.sigmoid(o)


def fo_pool(z: tf.Tensor, f: tf.Tensor, c0: tf.Tensor) -> tf.Tensor:
    """c_t = f_t z_t + (1 - f_t) c_{t-1} over the time axis of [B, T, H]; returns all c_t."""
    def step(c: tf.Tensor, inputs: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        z_t, f_t = inputs
        return f_t * z_t + (1.0 - f_t) * c

    cs = tf.scan(step, (tf.transpose(z, [1, 0, 2]), tf.transpose(f, [1, 0, 2])), initializer=c0)
    return tf.transpose(cs, [1, 0, 2])


class QRNNLayer(keras.layers.Layer):
    """One QRNN layer: (x [B, T, D], state) -> (outputs [B, T, H], state)."""

    def __init__(self, units: int, input_size: int, window: int = 1, weight_drop: float = 0.0,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        if window not in (1, 2):
            raise ValueError(f"QRNN window must be 1 or 2, got {window}")
        # The input size is needed before build: window 2 carries the last input in the state.
        self.units, self.input_size, self.window, self.weight_drop = units, input_size, window, weight_drop

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        self.kernel = self.add_weight(name="kernel", shape=(self.window * self.input_size, 3 * self.units),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(3 * self.units,), initializer="zeros")
        super().build(input_shape)

    def initial_state(self, batch_size: int | tf.Tensor) -> tuple[tf.Tensor, ...]:
        c = tf.zeros(tf.stack([batch_size, self.units]), tf.float32)
        if self.window == 1:
            return (c,)
        return c, tf.zeros(tf.stack([batch_size, self.input_size]), tf.float32)

    def call(self, x: tf.Tensor, state: tuple[tf.Tensor, ...], training: bool = False,
             dropout_seed: awd.Seed | None = None) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
        kernel = awd.drop_connect(tf.convert_to_tensor(self.kernel), self.weight_drop, training,
                                  dropout_seed)
        prev_x = state[1] if self.window == 2 else None
        z, f, o = qrnn_gates(x, prev_x, kernel, self.bias)
        cs = fo_pool(z, f, state[0])
        new_state = (cs[:, -1],) if self.window == 1 else (cs[:, -1], x[:, -1])
        return o * cs, new_state


class QRNNLM(RecurrentLM):
    """`--cell=qrnn`: the shared recurrent LM with QRNN layers, window 2 first and 1 after."""

    def _make_layer(self, hparams: HParams, index: int) -> keras.layers.Layer:
        input_size = hparams.embedding_size if index == 0 else hparams.lstm_state_size
        return QRNNLayer(hparams.lstm_state_size, input_size, window=2 if index == 0 else 1,
                         weight_drop=hparams.weight_drop, name=f"qrnn_{index}")
