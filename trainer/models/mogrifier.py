"""Mogrifier LSTM (Melis, Kočiský & Blunsom 2020).

Before each LSTM step, x and h gate each other for `rounds` rounds:

    round i odd:   x <- 2 sigmoid(h Q_i) * x        Q_i: [H, D]
    round i even:  h <- 2 sigmoid(x R_i) * h        R_i: [D, H]

and the ordinary LSTM step (gate order i, f, g, o, the layout of `trainer.kernels`) runs on the
mogrified pair. With `rank` > 0 each Q_i / R_i is a product of two thin matrices ([H, k] [k, D]),
the paper's low-rank factorisation. With 0 rounds nothing is mogrified, and the layer runs the
plain LSTM kernel on the same variables, so its output is exactly an LSTM's.

The LSTM variables have the plain LSTM layer's names (kernel, recurrent_kernel, bias), so a
Mogrifier checkpoint with 0 rounds holds the same matrices a `--cell=lstm` one does.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.hparams import HParams
from trainer.kernels import lstm_sequence
from trainer.kernels.reference import lstm_cell
from trainer.models import awd
from trainer.models.recurrent import RecurrentLM


class MogrifierLayer(keras.layers.Layer):
    """One Mogrifier LSTM layer: (x [B, T, D], (h, c)) -> (outputs [B, T, H], (h, c))."""

    def __init__(self, units: int, rounds: int = 5, rank: int = 0, weight_drop: float = 0.0,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        if rounds < 0:
            raise ValueError(f"mogrify rounds must be >= 0, got {rounds}")
        self.units, self.rounds, self.rank, self.weight_drop = units, rounds, rank, weight_drop

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        d, h = int(input_shape[-1]), self.units
        self.kernel = self.add_weight(name="kernel", shape=(d, 4 * h), initializer="glorot_uniform")
        self.recurrent_kernel = self.add_weight(name="recurrent_kernel", shape=(h, 4 * h),
                                                initializer="orthogonal")
        bias = [0.0] * h + [1.0] * h + [0.0] * (2 * h)  # forget-gate bias 1, as the LSTM layer
        self.bias = self.add_weight(name="bias", shape=(4 * h,),
                                    initializer=keras.initializers.Constant(bias))
        # A tuple, not a list: tf.train.Checkpoint tracks tuples but not Keras 3's tracked lists.
        self.mogrifiers = tuple(self._mogrifier(i, h if i % 2 == 0 else d, d if i % 2 == 0 else h)
                                for i in range(self.rounds))
        super().build(input_shape)

    def _mogrifier(self, index: int, rows: int, cols: int) -> tuple[keras.Variable, ...]:
        """Round `index + 1`'s matrix: one full [rows, cols] or two low-rank factors."""
        if self.rank <= 0:
            return (self.add_weight(name=f"mogrify_{index}", shape=(rows, cols),
                                    initializer="glorot_uniform"),)
        return (self.add_weight(name=f"mogrify_{index}_left", shape=(rows, self.rank),
                                initializer="glorot_uniform"),
                self.add_weight(name=f"mogrify_{index}_right", shape=(self.rank, cols),
                                initializer="glorot_uniform"))

    def initial_state(self, batch_size: int | tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        zeros = tf.zeros(tf.stack([batch_size, self.units]), tf.float32)
        return zeros, zeros

    def mogrify(self, x: tf.Tensor, h: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The `rounds` alternating gatings of x [B, D] and h [B, H]."""
        for i, factors in enumerate(self.mogrifiers):
            source = h if i % 2 == 0 else x
            for matrix in factors:
                source = tf.matmul(source, matrix)
            if i % 2 == 0:
                x = 2.0 * tf.sigmoid(source) * x
            else:
                h = 2.0 * tf.sigmoid(source) * h
        return x, h

    def call(self, x: tf.Tensor, state: tuple[tf.Tensor, tf.Tensor], training: bool = False,
             dropout_seed: awd.Seed | None = None) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
        w_h = awd.drop_connect(tf.convert_to_tensor(self.recurrent_kernel), self.weight_drop, training,
                               dropout_seed)
        if self.rounds == 0:
            x_proj = tf.einsum("btd,dg->btg", x, self.kernel) + self.bias
            outputs, h, c = lstm_sequence(x_proj, state[0], state[1], w_h)
            return outputs, (h, c)
        # Mogrification needs x and h together, so the input projection cannot be hoisted out
        # of the loop; one matmul of [x, h] with the stacked weights keeps it to one per step.
        w = tf.concat([tf.convert_to_tensor(self.kernel), w_h], axis=0)
        bias = tf.convert_to_tensor(self.bias)

        def step(carry: tuple[tf.Tensor, tf.Tensor], x_t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            h, c = carry
            x_m, h_m = self.mogrify(x_t, h)
            return lstm_cell(tf.matmul(tf.concat([x_m, h_m], axis=-1), w) + bias, c)

        hs, cs = tf.scan(step, tf.transpose(x, [1, 0, 2]), initializer=tuple(state))
        return tf.transpose(hs, [1, 0, 2]), (hs[-1], cs[-1])



class MogrifierLM(RecurrentLM):
    """`--cell=mogrifier`: the shared recurrent LM with Mogrifier LSTM layers."""

    def _make_layer(self, hparams: HParams, index: int) -> keras.layers.Layer:
        return MogrifierLayer(hparams.lstm_state_size, rounds=hparams.mogrify_rounds,
                              rank=hparams.mogrify_rank, weight_drop=hparams.weight_drop,
                              name=f"mogrifier_{index}")
