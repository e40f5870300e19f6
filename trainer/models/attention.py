"""One attention head over the recurrent stack's recent outputs (`--attention_window N`).

A recurrence carries the past in a fixed-size state and copies poorly: a name or a rare word
seen a paragraph ago must be squeezed through it to be predicted again. The continuous cache
pointer (trainer.cache_pointer) shows how much such copying is worth without any training:
0.035 nats/char on held-out books for a 10-minute LSTM 2x512 (docs/models.md).
This head learns it instead, in the spirit of Merity's SHA-RNN (2019): the top layer's output h
at every position queries the keys and values of the last N positions of the same stream, and
what it reads is added back to h before the softmax:

    q, k, v = h Wq, h Wk, h Wv            (one head, `width` wide)
    out     = h + softmax(q k^T / sqrt(width) + mask) v Wo

Like the transformer's cache, the keys and values of the last N positions are state: carried
from window to window in training and evaluation (the recurrence's state is carried there too)
and from token to token in sampling. A query attends the N most recent positions, itself
included (distances 0..N-1), whether they lie in this window or in the carried buffer, so one
token at a time gives exactly the windowed result and sampling sees only distances training saw.
No positional encoding: the recurrent outputs already know where they are. Wo starts at zero,
so a new model starts as the plain recurrent stack.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from trainer.models.base import State
from trainer.models.precision import matmul

_MASKED = -1e9
# The head's width. Its cost grows with it (four width x units matrices a position); at 128 the
# head is ~12% of a 2x512 LSTM's FLOPs a token by count, 4% of its tokens/s as measured.
WIDTH = 128


# The two pieces below are the sliding window both attentions share (this head and the
# transformer's, trainer.models.transformer).
def key_distances(cached: int, steps: tf.Tensor) -> tf.Tensor:
    """[T, C + T] distance from query t to key k of [cache (C) ; window (T)]: C + t - k."""
    t = tf.range(steps)[:, None]
    k = tf.range(cached + steps)[None, :]
    return cached + t - k


def window_mask(distance: tf.Tensor, window: int, key_valid: tf.Tensor | None = None) -> tf.Tensor:
    """[B or 1, T, keys] to add to attention logits: 0 where a query may look (0 <= distance <
    window, and the key valid: bool [B, keys]), -1e9 elsewhere."""
    allowed = tf.logical_and(distance >= 0, distance < window)[None]
    if key_valid is not None:
        allowed = tf.logical_and(allowed, key_valid[:, None, :])
    return tf.where(allowed, 0.0, _MASKED)


class WindowAttention(keras.layers.Layer):
    """h [B, T, units], state (valid [B, N], keys [B, N, W], values [B, N, W]) -> (h + read, state)."""

    def __init__(self, units: int, window: int, compute_dtype: tf.DType, width: int = WIDTH,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.units, self.window, self.width = units, window, width
        self.compute_dtype_ = compute_dtype

    def build(self, input_shape: tf.TensorShape) -> None:
        self.query_key_value = self.add_weight(shape=(self.units, 3 * self.width),
                                               initializer="glorot_uniform", name="query_key_value")
        self.output_kernel = self.add_weight(shape=(self.width, self.units), initializer="zeros",
                                             name="output_kernel")

    def initial_state(self, batch_size: int | tf.Tensor) -> State:
        memory = tf.zeros(tf.stack([batch_size, self.window, self.width]), tf.float32)
        return tf.zeros(tf.stack([batch_size, self.window]), tf.float32), memory, memory

    def call(self, h: tf.Tensor, state: State) -> tuple[tf.Tensor, State]:
        valid, cached_keys, cached_values = state
        q, k, v = tf.split(matmul(h, self.query_key_value, self.compute_dtype_), 3, axis=-1)
        keys = tf.concat([cached_keys, k], axis=1)
        values = tf.concat([cached_values, v], axis=1)
        key_valid = tf.concat([valid, tf.ones(tf.shape(h)[:2], tf.float32)], axis=1)
        mask = window_mask(key_distances(self.window, tf.shape(h)[1]), self.window, key_valid > 0.5)
        logits = tf.einsum("btd,bkd->btk", self._cast(q * (1.0 / math.sqrt(self.width))), self._cast(keys))
        weights = tf.nn.softmax(tf.cast(logits, tf.float32) + mask, axis=-1)
        read = tf.cast(tf.einsum("btk,bkd->btd", self._cast(weights), self._cast(values)), tf.float32)
        out = h + matmul(read, self.output_kernel, self.compute_dtype_)
        new_state = (key_valid[:, -self.window:], keys[:, -self.window:], values[:, -self.window:])
        return out, new_state

    def _cast(self, x: tf.Tensor) -> tf.Tensor:
        return tf.cast(x, self.compute_dtype_)
