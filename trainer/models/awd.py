"""AWD-LSTM regularisation (Merity et al. 2017, salesforce/awd-lstm-lm), usable by every cell.

Pure functions on tensors, so any recurrent layer can apply them where its own code sees the
weights or activations:

- `drop_connect(w, rate, training)`: weight drop (DropConnect) on a hidden-to-hidden matrix.
  One mask per window, shared by every time step and every stream, as awd-lstm-lm's WeightDrop
  samples it once per forward pass; the recurrent kernels take `w_h` as an argument, so a layer
  just passes the dropped matrix in.
- `locked_dropout(x, rate, training)`: variational dropout, one mask per stream shared across
  the time axis of a [B, T, D] tensor.
- `embedding_dropout(table, rate, training)`: drops whole rows of the embedding table (a dropped
  word is zero everywhere in the window), scaling the kept rows.
- `activation_regularization` (AR) and `temporal_activation_regularization` (TAR): the two
  penalties the model adds with `add_loss` in training.

Masks are reproducible: the train step passes `step_seed(--seed, global step, replica)` into the
model, each call site folds in its own number (`site_seed`) and the mask is drawn with a
stateless op, so a resumed run draws the masks an uninterrupted one draws, and two runs with the
same `--seed` are identical. No random state lives in the model (none to checkpoint). Without a
seed (direct calls, tests) the masks come from TensorFlow's global generator.
"""

from __future__ import annotations

import tensorflow as tf

# A seed for tf.random.stateless_* ops: int64 [2].
Seed = tf.Tensor


def step_seed(seed: int, step: tf.Tensor | int, replica: tf.Tensor | int = 0) -> Seed:
    """The dropout seed of one training step of one replica: (--seed, global step, replica)."""
    base = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(replica, tf.int64))


def site_seed(seed: Seed | None, site: int) -> Seed | None:
    """The seed of one call site (a layer, a matrix): distinct sites draw independent masks."""
    return None if seed is None else tf.random.experimental.stateless_fold_in(seed, site)


def _keep_mask(shape: tf.Tensor | list[int], rate: float, dtype: tf.DType = tf.float32,
               seed: Seed | None = None) -> tf.Tensor:
    """Bernoulli(1 - rate) mask already scaled by 1 / (1 - rate), so expectations are unchanged."""
    noise = tf.random.uniform(shape) if seed is None else tf.random.stateless_uniform(shape, seed)
    keep = tf.cast(noise >= rate, dtype)
    return keep / (1.0 - rate)


def drop_connect(weight: tf.Tensor, rate: float, training: bool, seed: Seed | None = None) -> tf.Tensor:
    """DropConnect on a weight matrix; identity outside training or at rate 0."""
    if not training or rate <= 0.0:
        return weight
    return weight * _keep_mask(tf.shape(weight), rate, weight.dtype, seed)


def locked_dropout(x: tf.Tensor, rate: float, training: bool, seed: Seed | None = None) -> tf.Tensor:
    """Dropout on x [B, T, D] with one mask per (stream, feature) reused at every time step."""
    if not training or rate <= 0.0:
        return x
    shape = tf.shape(x)
    return x * _keep_mask(tf.stack([shape[0], 1, shape[2]]), rate, x.dtype, seed)


def embedding_dropout(table: tf.Tensor, rate: float, training: bool,
                      seed: Seed | None = None) -> tf.Tensor:
    """Drops whole rows (words) of an embedding table [V, E]."""
    if not training or rate <= 0.0:
        return table
    return table * _keep_mask(tf.stack([tf.shape(table)[0], 1]), rate, table.dtype, seed)


def activation_regularization(dropped_outputs: tf.Tensor, alpha: float) -> tf.Tensor:
    """AR: alpha * mean(h^2) over the (dropped-out) last-layer outputs, as awd-lstm-lm."""
    return alpha * tf.reduce_mean(tf.square(dropped_outputs))


def temporal_activation_regularization(raw_outputs: tf.Tensor, beta: float) -> tf.Tensor:
    """TAR: beta * mean((h_t - h_{t-1})^2) over the raw (not dropped) last-layer outputs."""
    return beta * tf.reduce_mean(tf.square(raw_outputs[:, 1:] - raw_outputs[:, :-1]))
