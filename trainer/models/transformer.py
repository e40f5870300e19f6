"""Causal self-attention language model whose state is a key/value cache.

Design (so the runner drives it exactly like a recurrent model):
- Every query attends to the `max_context` most recent tokens, itself included: a sliding
  window. The state carries, per layer, the keys and values of the last `max_context` tokens
  (a fixed-size buffer, right-aligned, with a validity mask), so in sampling one call per token
  costs one attention row, and its output equals the full forward pass over the same tokens
  exactly (tests/test_zoo_layers.py checks it). Training and evaluation windows stand on their
  own (`window_state` is `()`) and attend within the window: carried across training windows,
  the cache learned far slower per step, and carried into evaluation it holds context from
  beyond the window, which training never showed. `max_context` is at most `unroll_steps`
  (HParams.validate), so sampling attends no distance training windows did not show. Fixed
  shapes keep one traced graph for every window.
- Matmuls in --precision's compute dtype on float32 weights; everything between them in float32,
  written as small functions XLA can fuse (--xla, trainer/xla.py). In bfloat16 outside a compiled
  step, on a CPU with bfloat16 dot products, a window's attention is verne's native op
  (trainer/kernels/native_attention.cc: only the keys each query block sees; Block._native_attention).
- Positional encoding: `rotary` by default (RoFormer: queries and keys rotated by their slot in
  [cache ; window], so attention sees distances only, exactly, however long a sampled stream
  runs); `learned`, a learned bias per head and relative distance 0..max_context-1 added to the
  attention logits; `sinusoidal` adds the sinusoid of each token's absolute position in its
  stream (counted in the sampling state); `none` leaves order to the
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

from trainer import kernels
from trainer.errors import UsageError
from trainer.hparams import HParams
from trainer.kernels import native
from trainer.models import awd, precision
from trainer.models.attention import key_distances, window_mask
from trainer.models.base import LanguageModel, State

_EPSILON = 1e-5


def sinusoid(positions: tf.Tensor, width: int) -> tf.Tensor:
    """Vaswani et al.'s encoding of float positions [...] -> [..., width]."""
    half = width // 2
    rates = tf.exp(-math.log(10000.0) * tf.range(half, dtype=tf.float32) / max(half, 1))
    angles = positions[..., None] * rates
    encoding = tf.concat([tf.sin(angles), tf.cos(angles)], axis=-1)
    return tf.pad(encoding, [[0, 0]] * (encoding.shape.rank - 1) + [[0, width - 2 * half]])


def rotation(slots: tf.Tensor, depth: int) -> tuple[tf.Tensor, tf.Tensor]:
    """(cos, sin) [L, 1, depth // 2] of the rotary angles of key slots 0..L-1 (RoFormer's rates)."""
    rates = tf.exp(-math.log(10000.0) * tf.range(0, depth, 2, dtype=tf.float32) / depth)
    angles = tf.cast(tf.range(slots), tf.float32)[:, None, None] * rates
    return tf.cos(angles), tf.sin(angles)


def rotate(x: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor, heads: int) -> tf.Tensor:
    """Rotary position embedding of x [B, L, H * Dh] by angles [L, 1, Dh / 2] given as cos and
    sin: each head's first and second halves are paired as the (real, imaginary) parts of Dh / 2
    complex numbers. Computed in x's dtype."""
    shape = tf.shape(x)
    cos, sin = tf.cast(cos, x.dtype), tf.cast(sin, x.dtype)
    first, second = tf.split(tf.reshape(x, [shape[0], shape[1], heads, -1]), 2, axis=-1)
    rotated = tf.concat([first * cos - second * sin, first * sin + second * cos], axis=-1)
    return tf.reshape(rotated, shape)


# The elementwise pieces between the matmuls, in float32 (TensorFlow's 16-bit elementwise kernels
# on CPU run several times slower than its float32 ones: GELU's erfc alone took 21 ms of a
# layer's step in bfloat16 at bench/train.py --shape gpt-small). Each is one small function so
# XLA can fuse it into one pass over memory (--xla, trainer/xla.py).
def _layer_norm(x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """Layer norm of float32 x over its last axis, cast to `dtype` (the next matmul's input)."""
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return tf.cast((x - mean) * tf.math.rsqrt(variance + _EPSILON) * gamma + beta, dtype)


def _bias_gelu(y: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """GELU (exact, erf) of a matmul's output plus bias, computed in float32, in y's dtype."""
    return tf.cast(tf.nn.gelu(tf.cast(y, tf.float32) + bias), y.dtype)


def _residual(x: tf.Tensor, y: tf.Tensor, bias: tf.Tensor) -> tf.Tensor:
    """x + (y + bias): a projection's output added to the float32 residual stream."""
    return x + (tf.cast(y, tf.float32) + bias)


def _attention_weights(logits: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """softmax(logits + mask) over the keys in float32, in the logits' dtype."""
    return tf.cast(tf.nn.softmax(tf.cast(logits, tf.float32) + mask, axis=-1), logits.dtype)


def _query_key_value(y: tf.Tensor, bias: tf.Tensor, cos: tf.Tensor, sin: tf.Tensor, heads: int,
                    scale: float, heads_first: bool = True, dtype: tf.DType | None = None
                    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """A window's queries, keys and values [B, H, T, Dh] (`heads_first`) or [B, T, H, Dh], in
    `dtype` (default y's) from the fused projection y [B, T, 3 * D] and its bias: rotary rotation
    of queries and keys by cos/sin [T, 1, Dh / 2] (None: no rotation), queries scaled by `scale`,
    all in float32 before the cast."""
    q, k, v = tf.split(tf.cast(y, tf.float32) + bias, 3, axis=-1)
    batch, steps = tf.shape(y)[0], tf.shape(y)[1]
    q, k, v = (tf.reshape(t, [batch, steps, heads, -1]) for t in (q, k, v))
    if cos is not None:  # [T, 1, Dh / 2]: broadcast over the batch and the heads
        q, k = (tf.concat([a * cos - b * sin, a * sin + b * cos], axis=-1)
                for a, b in (tf.split(q, 2, axis=-1), tf.split(k, 2, axis=-1)))
    if heads_first:
        q, k, v = (tf.transpose(t, [0, 2, 1, 3]) for t in (q, k, v))
    dtype = dtype or y.dtype
    return tf.cast(q * scale, dtype), tf.cast(k, dtype), tf.cast(v, dtype)


class Block(keras.layers.Layer):
    """Pre-LN transformer block: attention over [cached keys/values ;] this window, then a 4x
    GELU MLP. Matmuls run in `compute_dtype` on float32 weights; layer norms, softmax, GELU and
    the residual stream in float32 between them."""

    def __init__(self, d_model: int, heads: int, dropout: float, layers: int = 1,
                 compute_dtype: tf.DType = tf.float32, window: int = 0, window_mask_only: bool = False,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.d_model, self.heads, self.depth = d_model, heads, d_model // heads
        self.compute_dtype_, self.dropout = compute_dtype, dropout
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
        self.window, self.window_mask_only = window, window_mask_only

    def _build_sublayers(self) -> None:
        # In the order the layers were first called when Keras built them lazily, so the
        # variables (checkpointed as one list in creation order) keep their places.
        shape = (None, None, self.d_model)
        for layer, input_shape in ((self.norm_attn, shape), (self.qkv, shape), (self.attn_out, shape),
                                   (self.norm_mlp, shape), (self.mlp_in, shape),
                                   (self.mlp_out, (None, None, 4 * self.d_model))):
            layer.build(input_shape)

    def _matmul(self, x: tf.Tensor, layer: keras.layers.Dense) -> tf.Tensor:
        """x [B, T, in] @ the layer's kernel as one 2-D matmul in compute_dtype (its output too).
        In a step XLA compiles, in bfloat16, on a CPU with bfloat16 dot products: verne's native
        product instead (kernels.use_xla_bf16_matmul; XLA's CPU dot is no faster in bfloat16 than
        in float32), float32 in and out."""
        shape = tf.shape(x)
        if kernels.use_xla_bf16_matmul(self.compute_dtype_) and x.shape[:-1].is_fully_defined():
            flat = tf.reshape(tf.cast(x, tf.float32), [x.shape[:-1].num_elements(), x.shape[-1]])
            y = native.xla_bf16_matmul(flat, layer.kernel)
        else:
            flat = tf.reshape(tf.cast(x, self.compute_dtype_), [-1, x.shape[-1]])
            y = tf.linalg.matmul(flat, tf.cast(layer.kernel, self.compute_dtype_))
        return tf.reshape(y, tf.concat([shape[:-1], [layer.units]], 0))

    def _native_attention(self, x: tf.Tensor) -> bool:
        """Whether a window's attention runs as verne's native op (native_attention.cc: only the
        keys each query block can see, softmax in place): bfloat16 outside a compiled step, on a
        CPU with bfloat16 dot products, when the mask is the causal window alone (not `learned`'s
        distance bias) and T and Dh suit the op (multiples of 16)."""
        steps = x.shape[1]
        return (self.window_mask_only and steps is not None and steps % 16 == 0 and self.depth % 16 == 0
                and kernels.use_native_attention(self.compute_dtype_))

    def _add(self, x: tf.Tensor, y: tf.Tensor, layer: keras.layers.Dense, training: bool) -> tf.Tensor:
        if training and self.dropout:
            return x + self.drop(tf.cast(y, tf.float32) + layer.bias, training=training)
        return _residual(x, y, layer.bias)

    def call(self, x: tf.Tensor, mask: tf.Tensor, rotation: tuple[tf.Tensor, tf.Tensor] | None,
             cache: tuple[tf.Tensor, tf.Tensor] | None = None, training: bool = False
             ) -> tuple[tf.Tensor, tuple[tf.Tensor, tf.Tensor] | None]:
        """x [B, T, D] float32 -> (x, new cache).

        Without `cache` (a window on its own) the queries attend within the window: mask and
        rotation cover its T keys. With `cache` (keys, values [B, C, D], float32) they attend
        [cache ; window]: mask and rotation cover C + T keys, and the new cache is the last C
        keys and values. `rotation` (cos, sin for every key slot) rotates queries and keys by
        their slot just before the product, so the cache holds unrotated keys and only distances
        (slot differences) reach the logits: exact in float32 however long the stream."""
        if not self.qkv.built:
            self._build_sublayers()
        norm = self.norm_attn
        projected = self._matmul(_layer_norm(x, norm.gamma, norm.beta, self.compute_dtype_), self.qkv)
        scale = 1.0 / math.sqrt(self.depth)  # on the queries, not on the [T, keys] logits
        native_attention = cache is None and self._native_attention(x)
        if cache is None:
            cos, sin = rotation if rotation is not None else (None, None)
            # verne's op reads and writes [B, T, H, Dh] in float32: no transposes to heads first.
            q, k, v = _query_key_value(projected, self.qkv.bias, cos, sin, self.heads, scale,
                                       heads_first=not native_attention,
                                       dtype=tf.float32 if native_attention else None)
            new_cache = None
        else:
            q, k, v, new_cache = self._with_cache(projected, cache, rotation, scale)
        if native_attention:
            attended = native.causal_attention_native(q, k, v, self.window)  # [B, T, H, Dh]
        else:
            weights = _attention_weights(tf.linalg.matmul(q, k, transpose_b=True), mask)
            attended = tf.transpose(tf.linalg.matmul(weights, v), [0, 2, 1, 3])  # [B, T, H, Dh]
        shape = tf.shape(x)
        attended = tf.reshape(attended, [shape[0], shape[1], self.d_model])
        x = self._add(x, self._matmul(attended, self.attn_out), self.attn_out, training)
        norm = self.norm_mlp
        hidden = _bias_gelu(self._matmul(_layer_norm(x, norm.gamma, norm.beta, self.compute_dtype_),
                                              self.mlp_in), self.mlp_in.bias)
        return self._add(x, self._matmul(hidden, self.mlp_out), self.mlp_out, training), new_cache

    def _with_cache(self, projected: tf.Tensor, cache: tuple[tf.Tensor, tf.Tensor],
                    rotation: tuple[tf.Tensor, tf.Tensor] | None, scale: float
                    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tuple[tf.Tensor, tf.Tensor]]:
        """Queries [B, H, T, Dh], keys and values [B, H, C + T, Dh] of [cache ; window], and the
        new cache (float32, unrotated). Sampling's path: plain TensorFlow ops, one token at a time."""
        q, k, v = tf.split(tf.cast(projected, tf.float32) + self.qkv.bias, 3, axis=-1)
        keys, values = tf.concat([cache[0], k], axis=1), tf.concat([cache[1], v], axis=1)
        cached = cache[0].shape[1]
        new_cache = (keys[:, -cached:], values[:, -cached:])
        if rotation is not None:
            cos, sin = rotation
            q = rotate(q, cos[-tf.shape(q)[1]:], sin[-tf.shape(q)[1]:], self.heads)
            keys = rotate(keys, cos, sin, self.heads)
        q, keys, values = (tf.cast(self._split_heads(t), self.compute_dtype_)
                           for t in (q * scale, keys, values))
        return q, keys, values, new_cache

    def _split_heads(self, x: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(x)
        return tf.transpose(tf.reshape(x, [shape[0], shape[1], self.heads, self.depth]), [0, 2, 1, 3])


class TransformerLM(LanguageModel):
    """Embedding -> `layers` causal blocks -> layer norm -> logits.

    Training and evaluation windows stand alone: `window_state` is `()` and they attend within
    the window. Sampling streams carry a key/value cache (`initial_state`):
    (valid [B, C], ((keys [B, C, D], values [B, C, D]) per layer)), plus the stream position [B]
    last for `sinusoidal`, the one encoding that reads it. C = --max_context, at most
    --unroll_steps (HParams.validate), so a sampled token never attends a distance training
    windows did not show.
    """

    def __init__(self, hparams: HParams, **kwargs: object) -> None:
        super().__init__(**kwargs)
        _reject_recurrent_options(hparams)
        self.context, self.d_model, self.heads = hparams.max_context, hparams.d_model, hparams.heads
        self.pos_encoding = hparams.pos_encoding
        self.embed_dropout = hparams.embed_dropout
        self.compute_dtype_ = precision.compute_dtype_of(hparams.precision)
        policy = precision.keras_policy(self.compute_dtype_)
        self.embedding = keras.layers.Embedding(hparams.vocab_size, hparams.embedding_size,
                                                embeddings_initializer=_normal(0.02),
                                                trainable=not hparams.freeze_embedding, name="embedding")
        self.embedding.build()  # the table is read directly (embedding dropout, tied output)
        self.embed_in = (keras.layers.Dense(hparams.d_model, use_bias=False, dtype=policy, name="embed_in")
                         if hparams.embedding_size != hparams.d_model else None)
        self.blocks = [Block(hparams.d_model, hparams.heads, hparams.dropout, hparams.layers,
                             self.compute_dtype_, window=self.context,
                             window_mask_only=hparams.pos_encoding != "learned", name=f"block_{i}")
                       for i in range(hparams.layers)]
        for i, block in enumerate(self.blocks):
            setattr(self, f"block_{i}", block)  # checkpoints follow attributes, not Keras lists
        self.drop = keras.layers.Dropout(hparams.dropout)
        self.norm = keras.layers.LayerNormalization(epsilon=1e-5, name="norm")
        if hparams.pos_encoding == "learned":
            self.distance_bias = self.add_weight(name="distance_bias", shape=(hparams.heads, self.context),
                                                 initializer="zeros")
        self.tied = hparams.tie_embeddings
        if self.tied:
            self.embed_out = (keras.layers.Dense(hparams.embedding_size, use_bias=False, dtype=policy,
                                                 name="embed_out")
                              if hparams.embedding_size != hparams.d_model else None)
            self.output_bias = self.add_weight(name="output_bias", shape=(hparams.vocab_size,),
                                               initializer="zeros")
        else:
            self.output_layer = keras.layers.Dense(hparams.vocab_size, kernel_initializer=_normal(0.02),
                                                   dtype=policy, name="output")

    # Every window of training and evaluation starts from an empty cache. Carried across windows
    # in training (Transformer-XL style), the cache made every query see a full window from the
    # first step, and the model learned far slower per step: 2.37 against 2.01 nats/char of
    # training loss at step 1,000 of the bench/quality.py recipe (docs/models.md). Evaluation
    # then must not carry it either: keys cached from the previous window hold context from
    # beyond it, which training never showed the model.
    carries_state_between_windows = False

    def initial_state(self, batch_size: int | tf.Tensor) -> State:
        cache = tf.zeros(tf.stack([batch_size, self.context, self.d_model]), tf.float32)
        state = (tf.zeros(tf.stack([batch_size, self.context]), tf.float32),
                 tuple((cache, cache) for _ in self.blocks))
        if self.pos_encoding == "sinusoidal":
            state += (tf.zeros(tf.stack([batch_size]), tf.float32),)
        return state

    def _attention_mask(self, distance: tf.Tensor, key_valid: tf.Tensor | None) -> tf.Tensor:
        """[B or 1, H or 1, T, keys]: 0 where a query may look (0 <= distance < C, a valid key),
        -1e9 elsewhere, plus the learned distance bias."""
        bias = window_mask(distance, self.context, key_valid)[:, None]
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

        `state` is `()` for a window on its own (training, evaluation: attention within the
        window) or a stream's cache (`initial_state`; sampling). `--dropout` here is Keras'
        Dropout, whose SeedGenerator state (one per layer) is a model variable, so checkpoints
        carry it and resumes repeat its masks; `--embed_dropout` draws from `dropout_seed` like
        the recurrent models."""
        steps = tf.shape(tokens)[1]
        streaming = bool(tf.nest.flatten(state))
        if streaming:
            valid, caches = state[0], state[1]
            cached = self.context
            key_valid = tf.concat([valid, tf.ones(tf.shape(tokens), tf.float32)], axis=1) > 0.5
        else:
            caches, cached, key_valid = (None,) * len(self.blocks), 0, None
        table = awd.embedding_dropout(tf.convert_to_tensor(self.embedding.embeddings),
                                      self.embed_dropout, training, awd.site_seed(dropout_seed, 1))
        x = tf.gather(table, tokens)
        if self.embed_in is not None:
            x = tf.cast(self.embed_in(x), tf.float32)
        if self.pos_encoding == "sinusoidal":
            start = state[2][:, None] if streaming else 0.0
            x = x + sinusoid(start + tf.cast(tf.range(steps), tf.float32)[None], self.d_model)
        x = self.drop(x, training=training)
        # Computed once for every layer.
        mask = self._attention_mask(key_distances(cached, steps), key_valid)
        slot_rotation = (rotation(cached + steps, self.d_model // self.heads)
                         if self.pos_encoding == "rotary" else None)
        new_caches = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block(x, mask, slot_rotation, cache, training=training)
            new_caches.append(cache)
        x = self.norm(x)
        new_state: State = ()
        if streaming:
            new_valid = tf.concat([valid, tf.ones(tf.shape(tokens), tf.float32)], axis=1)[:, -self.context:]
            new_state = (new_valid, tuple(new_caches))
            if self.pos_encoding == "sinusoidal":
                new_state += (state[2] + tf.cast(steps, tf.float32),)
        return self._logits(x), x, new_state

    def _logits(self, x: tf.Tensor) -> tf.Tensor:
        if not self.tied:
            return tf.cast(self.output_layer(x), tf.float32)
        if self.embed_out is not None:
            x = self.embed_out(x)
        return precision.matmul(x, self.embedding.embeddings, self.compute_dtype_, transpose_b=True) \
            + self.output_bias


def _normal(stddev: float) -> keras.initializers.Initializer:
    return keras.initializers.RandomNormal(0.0, stddev)


def _reject_recurrent_options(hparams: HParams) -> None:
    """AWD options that only mean something for a recurrence fail loudly instead of being ignored."""
    for name in ("weight_drop", "input_dropout", "ar_alpha", "tar_beta", "attention_window"):
        if getattr(hparams, name):
            raise UsageError(f"--{name} applies to recurrent cells, not --cell=transformer; leave it at 0")
    if hparams.state_reset_windows != HParams.state_reset_windows:
        raise UsageError("--state_reset_windows applies to recurrent cells: --cell=transformer starts every "
                         "training window from an empty cache; drop the flag")
    if hparams.weight_norm:
        raise UsageError("--weight_norm applies to --cell=mlstm, not --cell=transformer; drop it")
