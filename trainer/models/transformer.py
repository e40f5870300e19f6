"""Causal self-attention language model whose state is a key/value cache.

Design (so the runner drives it exactly like a recurrent model):
- Every query attends to the `max_context` most recent tokens, itself included: a sliding
  window. The state carries, per layer, the keys and values of the last `max_context` tokens
  (a fixed-size buffer, right-aligned, with a validity mask), so in sampling one call per token
  costs one attention row, and its output equals the full forward pass over the same tokens
  exactly (tests/test_zoo_layers.py checks it). Training and evaluation start every window from
  an empty cache (`carries_state_between_windows`): carried across training windows, the cache
  learned far slower per step, and carried into evaluation it holds context from beyond the
  window, which training never showed. Fixed shapes keep one traced graph for every window.
- Positional encoding: `rotary` by default (RoFormer: queries and keys rotated by their slot in
  [cache ; window], so attention sees distances only, exactly, however long a sampled stream
  runs); `learned`, a learned bias per head and relative distance 0..max_context-1 added to the
  attention logits; `sinusoidal` adds the sinusoid of each token's absolute position in its
  stream (counted in the state, so it continues across windows); `none` leaves order to the
  causal mask alone. Absolute learned positions, GPT-2's, are not offered: a table of them runs
  out in a sampled stream longer than the window. Why rotary: docs/models.md.
- Training windows are drawn at random offsets in the text (trainer.data, `random_starts`),
  since nothing is carried from one to the next.
- GPT-2's initialisation (see Block).
- Pre-layer-norm blocks (attention, then a 4x GELU MLP) with a final layer norm: the transformer
  always normalises, so HParams.validate refuses `--layer_norm` for it.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from trainer.errors import UsageError
from trainer.hparams import HParams
from trainer.models import awd
from trainer.models.base import LanguageModel, State

_MASKED = -1e9


def sinusoid(positions: tf.Tensor, width: int) -> tf.Tensor:
    """Vaswani et al.'s encoding of float positions [...] -> [..., width]."""
    half = width // 2
    rates = tf.exp(-math.log(10000.0) * tf.range(half, dtype=tf.float32) / max(half, 1))
    angles = positions[..., None] * rates
    encoding = tf.concat([tf.sin(angles), tf.cos(angles)], axis=-1)
    return tf.pad(encoding, [[0, 0]] * (encoding.shape.rank - 1) + [[0, width - 2 * half]])


def rotation(slots: tf.Tensor, depth: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(cos, sin) [L, 1, depth // 2] of the rotary angles of slots 0..L-1 of [cache ; window]
    (RoFormer's rates)."""
    rates = tf.exp(-math.log(10000.0) * tf.range(0, depth, 2, dtype=tf.float32) / depth)
    angles = tf.cast(tf.range(slots), tf.float32)[:, None, None] * rates
    return tf.cos(angles), tf.sin(angles)


def rotate(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor, heads: int) -> tf.Tensor:
    """Rotary position embedding of x [B, L, H * Dh] by angles [L, 1, Dh / 2] given as cos and
    sin: each head's first and second halves are paired as the (real, imaginary) parts of Dh / 2
    complex numbers."""
    shape = tf.shape(x)
    first, second = tf.split(tf.reshape(x, [shape[0], shape[1], heads, -1]), 2, axis=-1)
    rotated = tf.concat([first * cos - second * sin, first * sin + second * cos], axis=-1)
    return tf.reshape(rotated, shape)


def window_distances(context: int, steps: tf.Tensor) -> tf.Tensor:
    """[T, C + T] distance from query t to key k of [cache (C) ; window (T)]: C + t - k."""
    t = tf.range(steps)[:, None]
    k = tf.range(context + steps)[None, :]
    return context + t - k


class Block(keras.layers.Layer):
    """Pre-LN transformer block attending over [cached keys/values ; this window]."""

    def __init__(self, d_model: int, heads: int, dropout: float, layers: int = 1, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.d_model, self.heads, self.depth = d_model, heads, d_model // heads
        self.norm_attn = keras.layers.LayerNormalization(epsilon=1e-5, name="norm_attn")
        self.norm_mlp = keras.layers.LayerNormalization(epsilon=1e-5, name="norm_mlp")
        # GPT-2's initialisation: N(0, 0.02), and the projections that add into the residual
        # stream scaled by 1/sqrt(2 * layers) so its variance does not grow with depth.
        # Keras' glorot default starts ~3x larger at d_model 128, and learned far slower per step.
        inner, residual = _normal(0.02), _normal(0.02 / math.sqrt(2 * layers))
        self.qkv = keras.layers.Dense(3 * d_model, kernel_initializer=inner, name="qkv")
        self.attn_out = keras.layers.Dense(d_model, kernel_initializer=residual, name="attn_out")
        self.mlp_in = keras.layers.Dense(4 * d_model, activation="gelu", kernel_initializer=inner,
                                         name="mlp_in")
        self.mlp_out = keras.layers.Dense(d_model, kernel_initializer=residual, name="mlp_out")
        self.drop = keras.layers.Dropout(dropout)

    def _split_heads(self, x: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(x)
        return tf.transpose(tf.reshape(x, [shape[0], shape[1], self.heads, self.depth]), [0, 2, 1, 3])

    def call(self, x: tf.Tensor, cache: tuple[tf.Tensor, tf.Tensor], bias: tf.Tensor,
             slot_rotation: tuple[tf.Tensor, tf.Tensor] | None = None, training: bool = False
             ) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
        """x [B, T, D], cache keys/values [B, C, D], bias [B, H or 1, T, C + T] -> x, new cache.

        With `slot_rotation` (`rotation(C + T, D / H)`), queries and keys are rotated by their
        slot in [cache ; window] just before the product, so the cache holds unrotated keys and
        only distances (slot differences) reach the logits: exact in float32 however long the
        stream, and the same for training windows, evaluation and one-token sampling steps."""
        q, k, v = tf.split(self.qkv(self.norm_attn(x)), 3, axis=-1)
        keys = tf.concat([cache[0], k], axis=1)
        values = tf.concat([cache[1], v], axis=1)
        attend_keys = keys
        if slot_rotation is not None:
            cos, sin = slot_rotation
            context = tf.shape(cache[0])[1]
            q = rotate(q, cos[context:], sin[context:], self.heads)
            attend_keys = rotate(keys, cos, sin, self.heads)
        logits = tf.einsum("bhtd,bhkd->bhtk", self._split_heads(q), self._split_heads(attend_keys))
        weights = tf.nn.softmax(logits / math.sqrt(self.depth) + bias, axis=-1)
        attended = tf.einsum("bhtk,bhkd->bhtd", weights, self._split_heads(values))
        shape = tf.shape(x)
        attended = tf.reshape(tf.transpose(attended, [0, 2, 1, 3]), [shape[0], shape[1], self.d_model])
        x = x + self.drop(self.attn_out(attended), training=training)
        x = x + self.drop(self.mlp_out(self.mlp_in(self.norm_mlp(x))), training=training)
        context = cache[0].shape[1]
        return x, (keys[:, -context:], values[:, -context:])


class TransformerLM(LanguageModel):
    """Embedding -> `layers` causal blocks -> layer norm -> logits; state = key/value cache.

    State: (position [B], valid [B, C], ((keys [B, C, D], values [B, C, D]) per layer)).
    """

    def __init__(self, hparams: HParams, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _reject_recurrent_options(hparams)
        self.context, self.d_model, self.heads = hparams.max_context, hparams.d_model, hparams.heads
        self.pos_encoding = hparams.pos_encoding
        self.embed_dropout = hparams.embed_dropout
        self.embedding = keras.layers.Embedding(hparams.vocab_size, hparams.embedding_size,
                                                embeddings_initializer=_normal(0.02),
                                                trainable=not hparams.freeze_embedding, name="embedding")
        self.embedding.build()  # the table is read directly (embedding dropout, tied output)
        self.embed_in = (keras.layers.Dense(hparams.d_model, use_bias=False, name="embed_in")
                         if hparams.embedding_size != hparams.d_model else None)
        self.blocks = [Block(hparams.d_model, hparams.heads, hparams.dropout, hparams.layers,
                             name=f"block_{i}") for i in range(hparams.layers)]
        for i, block in enumerate(self.blocks):
            setattr(self, f"block_{i}", block)  # checkpoints follow attributes, not Keras lists
        self.drop = keras.layers.Dropout(hparams.dropout)
        self.norm = keras.layers.LayerNormalization(epsilon=1e-5, name="norm")
        if hparams.pos_encoding == "learned":
            self.distance_bias = self.add_weight(name="distance_bias", shape=(hparams.heads, self.context),
                                                 initializer="zeros")
        self.tied = hparams.tie_embeddings
        if self.tied:
            self.embed_out = (keras.layers.Dense(hparams.embedding_size, use_bias=False, name="embed_out")
                              if hparams.embedding_size != hparams.d_model else None)
            self.output_bias = self.add_weight(name="output_bias", shape=(hparams.vocab_size,),
                                               initializer="zeros")
        else:
            self.output_layer = keras.layers.Dense(hparams.vocab_size, kernel_initializer=_normal(0.02),
                                                   name="output")

    # Every window of training and evaluation starts from an empty cache. Carried across windows
    # in training (Transformer-XL style), the cache made every query see a full window from the
    # first step, and the model learned far slower per step: 2.37 against 2.01 nats/char of
    # training loss at step 1,000 of the bench/quality.py recipe (docs/models.md). Evaluation
    # then must not carry it either: keys cached from the previous window hold context from
    # beyond it, which training never showed the model.
    carries_state_between_windows = False

    def initial_state(self, batch_size: int | tf.Tensor) -> State:
        cache = tf.zeros(tf.stack([batch_size, self.context, self.d_model]), tf.float32)
        return (tf.zeros(tf.stack([batch_size]), tf.float32),
                tf.zeros(tf.stack([batch_size, self.context]), tf.float32),
                tuple((cache, cache) for _ in self.blocks))

    def _attention_bias(self, valid: tf.Tensor, steps: tf.Tensor) -> tf.Tensor:
        """[B, H or 1, T, C + T]: 0 where a query may look, -1e9 elsewhere, plus distance bias."""
        distance = window_distances(self.context, steps)
        in_window = tf.logical_and(distance >= 0, distance < self.context)
        batch = tf.shape(valid)[0]
        key_valid = tf.concat([valid, tf.ones(tf.stack([batch, steps]), tf.float32)], axis=1) > 0.5
        allowed = tf.logical_and(in_window[None], key_valid[:, None, :])
        bias = tf.where(allowed, 0.0, _MASKED)[:, None]
        if self.pos_encoding == "learned":
            clipped = tf.clip_by_value(distance, 0, self.context - 1)
            bias = bias + tf.gather(self.distance_bias, clipped, axis=1)[None]
        return bias

    def call(self, tokens: tf.Tensor, state: State, training: bool = False,
             dropout_seed: awd.Seed | None = None) -> tuple[tf.Tensor, State]:
        logits, _, new_state = self.forward_with_hidden(tokens, state, training=training,
                                                        dropout_seed=dropout_seed)
        return logits, new_state

    def forward_with_hidden(self, tokens: tf.Tensor, state: State, training: bool = False,
                            dropout_seed: awd.Seed | None = None) -> tuple[tf.Tensor, tf.Tensor, State]:
        """(logits, final-layer-norm outputs [B, T, D], state): the cache pointer's hidden states.

        `--dropout` here is Keras' Dropout, whose SeedGenerator state (one per layer) is a model
        variable, so checkpoints carry it and resumes repeat its masks; `--embed_dropout` draws
        from `dropout_seed` like the recurrent models."""
        position, valid, caches = state
        steps = tf.shape(tokens)[1]
        table = awd.embedding_dropout(tf.convert_to_tensor(self.embedding.embeddings),
                                      self.embed_dropout, training, awd.site_seed(dropout_seed, 1))
        x = tf.gather(table, tokens)
        if self.embed_in is not None:
            x = self.embed_in(x)
        if self.pos_encoding == "sinusoidal":
            x = x + sinusoid(position[:, None] + tf.cast(tf.range(steps), tf.float32)[None], self.d_model)
        x = self.drop(x, training=training)
        bias = self._attention_bias(valid, steps)
        slot_rotation = (rotation(self.context + steps, self.d_model // self.heads)
                         if self.pos_encoding == "rotary" else None)  # the same for every layer
        new_caches = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block(x, cache, bias, slot_rotation, training=training)
            new_caches.append(cache)
        x = self.norm(x)
        new_valid = tf.concat([valid, tf.ones_like(tf.cast(tokens, tf.float32))], axis=1)[:, -self.context:]
        new_state = (position + tf.cast(steps, tf.float32), new_valid, tuple(new_caches))
        return self._logits(x), x, new_state

    def _logits(self, x: tf.Tensor) -> tf.Tensor:
        if not self.tied:
            return self.output_layer(x)
        if self.embed_out is not None:
            x = self.embed_out(x)
        return tf.einsum("bte,ve->btv", x, self.embedding.embeddings) + self.output_bias


def _normal(stddev: float) -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(0.0, stddev)


def _reject_recurrent_options(hparams: HParams) -> None:
    """AWD options that only mean something for a recurrence fail loudly instead of being ignored."""
    for name in ("weight_drop", "input_dropout", "ar_alpha", "tar_beta"):
        if getattr(hparams, name):
            raise UsageError(f"--{name} applies to recurrent cells, not --cell=transformer; leave it at 0")
    if hparams.state_reset_windows != HParams.state_reset_windows:
        raise UsageError("--state_reset_windows applies to recurrent cells: --cell=transformer starts every "
                         "training window from an empty cache; drop the flag")
    if hparams.weight_norm:
        raise UsageError("--weight_norm applies to --cell=mlstm, not --cell=transformer; drop it")
