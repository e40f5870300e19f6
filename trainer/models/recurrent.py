"""Stacked LSTM / GRU / vanilla RNN language models.

Each layer computes its input projection for the whole window in one matmul (bias folded in) and
runs only the recurrence step by step: the plain LSTM and GRU through the speed-tuned kernels of
`trainer.kernels` (hand-written gradients), the layer-normalised cells and the vanilla RNN through
a straightforward `tf.scan` here (they are options, not the default). With a GPU visible the plain
LSTM and GRU instead hand the whole layer, input projection included, to cuDNN
(`trainer.kernels.cudnn`).
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from trainer import kernels
from trainer.hparams import HParams
from trainer.kernels import gru_sequence, lstm_sequence
from trainer.models import awd
from trainer.models.attention import WindowAttention
from trainer.models.base import LanguageModel, State
from trainer.models.precision import compute_dtype_of
from trainer.models.precision import matmul as _matmul

# Gates per cell: the width of the fused projection is GATES * units.
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
_EPSILON = 1e-5


def _layer_norm(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + _EPSILON) * gamma + beta


class RecurrentLayer(keras.layers.Layer):
    """One recurrent layer over a whole window: x [B, T, D], state -> outputs [B, T, H], state."""

    def __init__(self, cell: str, units: int, layer_norm: bool, compute_dtype: tf.DType,
                 weight_drop: float = 0.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.cell, self.units, self.layer_norm = cell, units, layer_norm
        self.compute_dtype_ = compute_dtype
        self.weight_drop = weight_drop

    def build(self, input_shape: tf.TensorShape) -> None:
        width = GATES[self.cell] * self.units
        self.kernel = self.add_weight(shape=(input_shape[-1], width), initializer="glorot_uniform",
                                      name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(self.units, width), initializer="orthogonal",
                                                name="recurrent_kernel")
        self.bias = self.add_weight(shape=(width,), initializer=self._bias_init, name="bias")
        if self.cell == "gru":
            # Keras' reset_after convention: a separate bias inside r * (h @ W_hn + b_hn).
            self.recurrent_bias = self.add_weight(shape=(width,), initializer="zeros",
                                                  name="recurrent_bias")
        if self.layer_norm:
            self.norm_x = self._norm_weights("norm_x", width)
            self.norm_h = self._norm_weights("norm_h", width)
            if self.cell == "lstm":
                self.norm_c = self._norm_weights("norm_c", self.units)

    def _norm_weights(self, name: str, width: int) -> tuple[keras.Variable, keras.Variable]:
        return (self.add_weight(shape=(width,), initializer="ones", name=f"{name}_gamma"),
                self.add_weight(shape=(width,), initializer="zeros", name=f"{name}_beta"))

    def _bias_init(self, shape: tuple[int, ...], dtype: str | None = None) -> tf.Tensor:
        if self.cell != "lstm":
            return tf.zeros(shape, dtype or tf.float32)
        # Forget-gate bias 1 (gate order i, f, g, o): remember by default early in training.
        units = self.units
        return tf.concat([tf.zeros([units]), tf.ones([units]), tf.zeros([2 * units])], axis=0)

    def initial_state(self, batch_size: int | tf.Tensor) -> tuple[tf.Tensor, ...]:
        zeros = tf.zeros([batch_size, self.units], tf.float32)
        return (zeros, zeros) if self.cell == "lstm" else (zeros,)

    def call(self, x: tf.Tensor, state: tuple[tf.Tensor, ...], training: bool = False,
             dropout_seed: awd.Seed | None = None) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
        # AWD weight drop: one DropConnect mask on the recurrent matrix for the whole window.
        w_h = awd.drop_connect(tf.convert_to_tensor(self.recurrent_kernel), self.weight_drop, training,
                               dropout_seed)
        if not self.layer_norm and self.cell in ("lstm", "gru") and kernels.use_cudnn():
            fused = self._cudnn(x, state, w_h)
            if fused is not None:
                return fused
        x_proj = _matmul(x, self.kernel, self.compute_dtype_)
        if self.layer_norm:
            x_proj = _layer_norm(x_proj, *self.norm_x)
        x_proj = x_proj + self.bias
        if not self.layer_norm and self.cell == "lstm":
            outputs, h, c = lstm_sequence(x_proj, state[0], state[1], w_h,
                                          compute_dtype=self.compute_dtype_)
            return outputs, (h, c)
        if not self.layer_norm and self.cell == "gru":
            outputs, h = gru_sequence(x_proj, state[0], w_h, self.recurrent_bias,
                                      compute_dtype=self.compute_dtype_)
            return outputs, (h,)
        return self._scan(x_proj, state, w_h)

    def _cudnn(self, x: tf.Tensor, state: tuple[tf.Tensor, ...], w_h: tf.Tensor,
               ) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]] | None:
        kernel, bias = tf.convert_to_tensor(self.kernel), tf.convert_to_tensor(self.bias)
        if self.cell == "lstm":
            fused = kernels.lstm_sequence_cudnn(x, state[0], state[1], kernel, w_h, bias,
                                                compute_dtype=self.compute_dtype_)
        else:
            fused = kernels.gru_sequence_cudnn(x, state[0], kernel, w_h, bias,
                                               tf.convert_to_tensor(self.recurrent_bias),
                                               compute_dtype=self.compute_dtype_)
        return None if fused is None else (fused[0], fused[1:])

    def _scan(self, x_proj: tf.Tensor, state: tuple[tf.Tensor, ...], w_h: tf.Tensor,
              ) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
        step = {"lstm": self._lstm_step, "gru": self._gru_step, "rnn": self._rnn_step}[self.cell]
        states = tf.scan(functools.partial(step, w_h=w_h), tf.transpose(x_proj, [1, 0, 2]),
                         initializer=tuple(state))
        outputs = tf.transpose(states[0], [1, 0, 2])
        return outputs, tuple(s[-1] for s in states)

    def _recurrent(self, h: tf.Tensor, w_h: tf.Tensor) -> tf.Tensor:
        hz = _matmul(h, w_h, self.compute_dtype_)
        return _layer_norm(hz, *self.norm_h) if self.layer_norm else hz

    def _lstm_step(self, carry: tuple[tf.Tensor, ...], x_t: tf.Tensor, w_h: tf.Tensor,
                   ) -> tuple[tf.Tensor, ...]:
        h, c = carry
        i, f, g, o = tf.split(x_t + self._recurrent(h, w_h), 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        c_out = _layer_norm(c, *self.norm_c) if self.layer_norm else c
        return tf.sigmoid(o) * tf.tanh(c_out), c

    def _gru_step(self, carry: tuple[tf.Tensor, ...], x_t: tf.Tensor, w_h: tf.Tensor,
                  ) -> tuple[tf.Tensor, ...]:
        (h,) = carry
        hz = self._recurrent(h, w_h) + self.recurrent_bias
        x_z, x_r, x_n = tf.split(x_t, 3, axis=-1)
        h_z, h_r, h_n = tf.split(hz, 3, axis=-1)
        z, r = tf.sigmoid(x_z + h_z), tf.sigmoid(x_r + h_r)
        n = tf.tanh(x_n + r * h_n)
        return (z * h + (1.0 - z) * n,)

    def _rnn_step(self, carry: tuple[tf.Tensor, ...], x_t: tf.Tensor, w_h: tf.Tensor,
                  ) -> tuple[tf.Tensor, ...]:
        return (tf.tanh(x_t + self._recurrent(carry[0], w_h)),)


class RecurrentLM(LanguageModel):
    """Embedding -> `layers` recurrent layers -> softmax projection, with AWD-LSTM regularisation.

    State: a tuple with one entry per layer, (h, c) for LSTM and (h,) for GRU/RNN; other cells
    (trainer.models.mlstm, mogrifier, qrnn) subclass this and override `_make_layer`, so every
    recurrent cell gets the same embedding, output and regularisation:
    `--embed_dropout` drops whole words of the embedding table, `--input_dropout` is locked
    dropout on the embedded input, `--dropout` is locked (variational) dropout between layers and
    before the output, `--weight_drop` is DropConnect on each layer's hidden-to-hidden matrix,
    `--ar_alpha` / `--tar_beta` add AR / TAR (see trainer.models.awd).
    """

    def __init__(self, hparams: HParams, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _reject_unsupported(hparams)
        self.compute_dtype_ = compute_dtype_of(hparams.precision)
        self.ar_alpha, self.tar_beta = hparams.ar_alpha, hparams.tar_beta
        self.dropout_rate, self.input_dropout = hparams.dropout, hparams.input_dropout
        self.embed_dropout = hparams.embed_dropout
        self.embedding = keras.layers.Embedding(hparams.vocab_size, hparams.embedding_size,
                                                trainable=not hparams.freeze_embedding, name="embedding")
        self.embedding.build()  # the table is read directly (embedding dropout, tied output)
        self.rnns = [self._make_layer(hparams, i) for i in range(hparams.layers)]
        for i, rnn in enumerate(self.rnns):
            # tf.train.Checkpoint follows attributes and tuples, not Keras 3's tracked lists:
            # without these names the recurrent weights would silently miss every checkpoint.
            setattr(self, f"layer_{i}", rnn)
        self.attention = (WindowAttention(hparams.lstm_state_size, hparams.attention_window,
                                          self.compute_dtype_, name="attention")
                          if hparams.attention_window else None)
        self.tied = hparams.tie_embeddings
        if self.tied:
            # Tied weights need the output in embedding space; project only when sizes differ.
            self.to_embedding = (keras.layers.Dense(hparams.embedding_size, name="to_embedding")
                                 if hparams.lstm_state_size != hparams.embedding_size else None)
            self.output_bias = self.add_weight(shape=(hparams.vocab_size,), initializer="zeros",
                                               name="output_bias")
        else:
            self.output_layer = keras.layers.Dense(hparams.vocab_size, name="output")

    def _make_layer(self, hparams: HParams, index: int) -> keras.layers.Layer:
        """Layer `index` of the stack: call(x, state, training, dropout_seed) -> (outputs, state),
        initial_state."""
        return RecurrentLayer(hparams.cell, hparams.lstm_state_size, hparams.layer_norm,
                              self.compute_dtype_, weight_drop=hparams.weight_drop,
                              name=f"{hparams.cell}_{index}")

    def initial_state(self, batch_size: int | tf.Tensor) -> State:
        stack = tuple(rnn.initial_state(batch_size) for rnn in self.rnns)
        return stack if self.attention is None else stack + (self.attention.initial_state(batch_size),)

    def call(self, tokens: tf.Tensor, state: State, training: bool = False,
             dropout_seed: awd.Seed | None = None) -> tuple[tf.Tensor, State]:
        logits, _, new_state = self.forward_with_hidden(tokens, state, training=training,
                                                        dropout_seed=dropout_seed)
        return logits, new_state

    def forward_with_hidden(self, tokens: tf.Tensor, state: State, training: bool = False,
                            dropout_seed: awd.Seed | None = None) -> tuple[tf.Tensor, tf.Tensor, State]:
        """(logits, last layer's raw outputs [B, T, H], state): the cache pointer needs the middle."""
        # Each dropout site gets its own fixed number, so masks never repeat between sites.
        site = functools.partial(awd.site_seed, dropout_seed)
        table = awd.embedding_dropout(tf.convert_to_tensor(self.embedding.embeddings),
                                      self.embed_dropout, training, site(1))
        x = awd.locked_dropout(tf.gather(table, tokens), self.input_dropout, training, site(2))
        new_state = []
        for i, (rnn, layer_state) in enumerate(zip(self.rnns, state[:len(self.rnns)], strict=True)):
            if i:
                x = awd.locked_dropout(x, self.dropout_rate, training, site(1000 + i))
            x, layer_state = rnn(x, layer_state, training=training, dropout_seed=site(2000 + i))
            new_state.append(layer_state)
        if self.attention is not None:
            x, attention_state = self.attention(x, state[-1])
            new_state.append(attention_state)
        hidden = x
        x = awd.locked_dropout(x, self.dropout_rate, training, site(3))
        if training:
            self._add_activation_regularisers(x, hidden)
        return self._logits(x), hidden, tuple(new_state)

    def _logits(self, x: tf.Tensor) -> tf.Tensor:
        if not self.tied:
            if not self.output_layer.built:
                self.output_layer.build(x.shape)
            # Its matmul in compute_dtype too (Dense would run float32): the vocabulary projection
            # is about half a word model's FLOPs. Forward + backward of [20, 35, 650] @ [650, 10,000]
            # took 83 instead of 139 ms of CPU in bfloat16 here (the char model's 65: 7 vs 10).
            return _matmul(x, self.output_layer.kernel, self.compute_dtype_) + self.output_layer.bias
        if self.to_embedding is not None:
            x = self.to_embedding(x)
        return _matmul(x, self.embedding.embeddings, self.compute_dtype_, transpose_b=True) + self.output_bias

    def _add_activation_regularisers(self, dropped: tf.Tensor, raw: tf.Tensor) -> None:
        # AWD-LSTM (Merity et al. 2017): AR penalises large (dropped-out) activations of the last
        # layer, TAR large changes between consecutive steps of its raw output.
        if self.ar_alpha:
            self.add_loss(awd.activation_regularization(dropped, self.ar_alpha))
        if self.tar_beta:
            self.add_loss(awd.temporal_activation_regularization(raw, self.tar_beta))


def _reject_unsupported(hparams: HParams) -> None:
    """Options that do not apply to the cell fail loudly rather than being ignored."""
    from trainer.errors import UsageError

    if hparams.weight_norm and hparams.cell != "mlstm":
        raise UsageError(f"--weight_norm applies to --cell=mlstm, not --cell={hparams.cell}; drop it")
