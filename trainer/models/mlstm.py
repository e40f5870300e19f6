"""Multiplicative LSTM (Krause et al. 2016) as in Radford et al. 2017 / Tensorflow_mLSTM.

    m_t = (x_t W_mx) * (h_{t-1} W_mh)
    i, f, o, u = split(x_t W_x + m_t W_h + b)
    c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(u);   h_t = sigmoid(o) tanh(c_t)

The gate order follows the seed (i, f, o, u) so its weights map one to one. With weight
normalisation each matrix is `g * v / ||v||` column-wise (Salimans & Kingma 2016), the seed's
`tf.nn.l2_normalize(w, 0) * g`, with the gains starting at 1 (unit-norm columns). Both
x-projections are computed for the whole window in one matmul each; only the two h/m matmuls
run per step. Weight drop (AWD) applies to
both recurrent matrices W_mh and W_h.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.hparams import HParams
from trainer.models import awd
from trainer.models.recurrent import RecurrentLM

RECURRENT_MATRICES = ("wmh", "wh")


def weight_normalize(v: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """Column-wise weight normalisation: g * v / ||v||_column."""
    return tf.nn.l2_normalize(v, axis=0) * g


class MLSTMLayer(keras.layers.Layer):
    """One mLSTM layer over a window: (x [B, T, D], (h, c)) -> (outputs [B, T, H], (h, c))."""

    def __init__(self, units: int, weight_norm: bool = True, weight_drop: float = 0.0,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.weight_norm = weight_norm
        self.weight_drop = weight_drop

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        d, h = int(input_shape[-1]), self.units
        shapes = {"wx": (d, 4 * h), "wh": (h, 4 * h), "wmx": (d, h), "wmh": (h, h)}
        init = keras.initializers.GlorotUniform(seed=None)
        self.matrices = {name: self.add_weight(name=name, shape=shape, initializer=init)
                         for name, shape in shapes.items()}
        # Unit gains: every effective column starts with norm 1 whatever the fan-in.
        self.gains = {name: self.add_weight(name="g" + name[1:], shape=(var.shape[-1],),
                                            initializer="ones")
                      for name, var in self.matrices.items()} if self.weight_norm else {}
        # tf.train.Checkpoint follows attributes, not dicts: name every variable.
        for name, var in [*self.matrices.items(), *((f"g{n[1:]}", g) for n, g in self.gains.items())]:
            setattr(self, name, var)
        # Forget-gate bias 1, a common choice that keeps early gradients flowing through c.
        bias = [0.0] * h + [1.0] * h + [0.0] * (2 * h)
        self.bias = self.add_weight(name="b", shape=(4 * h,),
                                    initializer=keras.initializers.Constant(bias))
        super().build(input_shape)

    def effective_weights(self) -> dict[str, tf.Tensor]:
        """The matrices the recurrence uses (weight-normalised if configured)."""
        if not self.weight_norm:
            return {name: tf.convert_to_tensor(v) for name, v in self.matrices.items()}
        return {name: weight_normalize(v, self.gains[name]) for name, v in self.matrices.items()}

    def initial_state(self, batch_size: int | tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        zeros = tf.zeros(tf.stack([batch_size, self.units]), tf.float32)
        return zeros, zeros

    def call(self, x: tf.Tensor, state: tuple[tf.Tensor, tf.Tensor], training: bool = False,
             dropout_seed: awd.Seed | None = None) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
        w = self.effective_weights()
        wmh = awd.drop_connect(w["wmh"], self.weight_drop, training, awd.site_seed(dropout_seed, 0))
        wh = awd.drop_connect(w["wh"], self.weight_drop, training, awd.site_seed(dropout_seed, 1))
        x_gates = tf.einsum("btd,dg->tbg", x, w["wx"]) + self.bias
        x_mult = tf.einsum("btd,dh->tbh", x, w["wmx"])
        units = self.units

        def step(carry: tuple[tf.Tensor, tf.Tensor], inputs: tuple[tf.Tensor, tf.Tensor],
                 ) -> tuple[tf.Tensor, tf.Tensor]:
            h, c = carry
            xg, xm = inputs
            m = xm * tf.matmul(h, wmh)
            z = xg + tf.matmul(m, wh)
            sig = tf.sigmoid(z[:, :3 * units])
            i, f, o = sig[:, :units], sig[:, units:2 * units], sig[:, 2 * units:]
            c = f * c + i * tf.tanh(z[:, 3 * units:])
            return o * tf.tanh(c), c

        hs, cs = tf.scan(step, (x_gates, x_mult), initializer=state)
        return tf.transpose(hs, [1, 0, 2]), (hs[-1], cs[-1])


class MLSTMLM(RecurrentLM):
    """`--cell=mlstm`: the shared recurrent LM with mLSTM layers.

    Weight normalisation is the mLSTM seed's default; flags resolve `--weight_norm` to true for
    this cell unless the user gave it, so hparams.json and %JOB% say what the model does.
    """

    def _make_layer(self, hparams: HParams, index: int) -> keras.layers.Layer:
        return MLSTMLayer(hparams.lstm_state_size, weight_norm=hparams.weight_norm,
                          weight_drop=hparams.weight_drop, name=f"mlstm_{index}")
