"""The continuous cache pointer (Grave, Joulin & Usunier 2016), as awd-lstm-lm's pointer.py.

At evaluation time, each position t mixes the model's next-token distribution with a pointer
over the last `window` positions of the same stream: position j holds (h_j, y_j), the last
layer's output at j and the token that followed it, and

    p_ptr(w) = sum_j softmax_j(theta * h_t . h_j) [y_j = w]
    p(w)     = lambda * p_ptr(w) + (1 - lambda) * p_model(w)

so words seen recently (names!) become likely again. No training: theta, lambda and window are
tuned on the validation split. Only the target's probability is needed, so the pointer is an
attention over the window with no [V]-sized scatter. Positions with no history yet (the very
start of a stream) use the model alone; unlike pointer.py, which waits for a full window,
the pointer starts as soon as one past position exists. The mixture is computed in log space,
so lambda = 0 gives exactly the model's loss.

The history is a fixed-size buffer carried from window to window like the model's state.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import tensorflow as tf

# awd-lstm-lm's pointer.py defaults (tuned there for PTB).
DEFAULT_THETA = 0.6625523432485668
DEFAULT_LAMBDA = 0.12785920428335693
DEFAULT_WINDOW = 3785


@dataclasses.dataclass(frozen=True)
class PointerConfig:
    theta: float = DEFAULT_THETA
    lambdah: float = DEFAULT_LAMBDA
    window: int = DEFAULT_WINDOW

    def validate(self) -> PointerConfig:
        if not 0.0 <= self.lambdah <= 1.0:
            raise ValueError(f"--lambda={self.lambdah}: must be in [0, 1]")
        if self.window < 1:
            raise ValueError(f"--window={self.window}: must be positive")
        return self


Memory = tuple[tf.Tensor, tf.Tensor, tf.Tensor]  # hidden [B, W, H], next token [B, W], valid [B, W]


def empty_memory(batch: int, window: int, units: int) -> Memory:
    return (tf.zeros([batch, window, units], tf.float32), tf.zeros([batch, window], tf.int32),
            tf.zeros([batch, window], tf.float32))


def pointer_log_probs(log_probs: tf.Tensor, hidden: tf.Tensor, targets: tf.Tensor, memory: Memory,
                      config: PointerConfig) -> tuple[tf.Tensor, Memory]:
    """log p(target) [B, T] under the pointer mixture, and the memory after this window.

    log_probs [B, T, V] are the model's log-probabilities, hidden [B, T, H] its last layer's
    outputs, targets [B, T] the next tokens.
    """
    mem_h, mem_y, mem_valid = memory
    window = mem_h.shape[1]
    steps = tf.shape(targets)[1]
    targets = tf.cast(targets, tf.int32)
    keys = tf.concat([mem_h, hidden], axis=1)                        # [B, W + T, H]
    next_tokens = tf.concat([mem_y, targets], axis=1)                # [B, W + T]
    valid = tf.concat([mem_valid, tf.ones_like(targets, tf.float32)], axis=1) > 0.5
    # Query t sits at index W + t; it may look at indices W + t - window .. W + t - 1.
    t = tf.range(steps)[:, None]
    k = tf.range(window + steps)[None, :]
    in_window = tf.logical_and(k < window + t, k >= t)
    allowed = tf.logical_and(in_window[None], valid[:, None, :])    # [B, T, W + T]
    scores = config.theta * tf.einsum("bth,bkh->btk", hidden, keys)
    scores = tf.where(allowed, scores, -math.inf)
    hits = tf.equal(next_tokens[:, None, :], targets[:, :, None])
    # log p_ptr(target) = logsumexp over hits of the scores minus logsumexp over all allowed.
    log_hit = tf.reduce_logsumexp(tf.where(hits, scores, -math.inf), axis=-1)
    log_all = tf.reduce_logsumexp(scores, axis=-1)
    has_history = tf.reduce_any(allowed, axis=-1)
    log_ptr = tf.where(has_history, log_hit - tf.where(has_history, log_all, 0.0), -math.inf)
    log_model = tf.gather(log_probs, targets, batch_dims=2)
    log_mixed = tf.reduce_logsumexp(tf.stack([
        _log(config.lambdah) + log_ptr, _log(1.0 - config.lambdah) + log_model]), axis=0)
    log_p = tf.where(has_history, log_mixed, log_model)
    new_memory = (keys[:, -window:], next_tokens[:, -window:],
                  tf.cast(valid, tf.float32)[:, -window:])
    return log_p, new_memory


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def make_pointer_eval_step(model: Any, config: PointerConfig) -> Any:
    """(tokens, labels, state, memory) -> (model nats, pointer nats, tokens, state, memory)."""

    @tf.function
    def step(tokens: tf.Tensor, labels: tf.Tensor, state: Any, memory: Memory) -> tuple[Any, ...]:
        logits, hidden, state = model.forward_with_hidden(tokens, state, training=False)
        log_probs = tf.nn.log_softmax(logits, axis=-1)
        labels = tf.cast(labels, tf.int32)
        model_nats = -tf.reduce_sum(tf.gather(log_probs, labels, batch_dims=2))
        log_p, memory = pointer_log_probs(log_probs, hidden, labels, memory, config)
        count = tf.cast(tf.size(labels), tf.float32)
        return model_nats, -tf.reduce_sum(log_p), count, state, memory

    return step


def run_pointer_eval(model: Any, dataset: tf.data.Dataset, batch: int, config: PointerConfig,
                     ) -> tuple[float, float, float]:
    """Sums (model nats, pointer nats, tokens) over `dataset`, carrying state and memory."""
    step = make_pointer_eval_step(model, config)
    state = model.initial_state(batch)
    memory: Memory | None = None
    model_nats = pointer_nats = tokens = 0.0
    for inputs, labels in dataset:
        if memory is None:
            _, hidden, _ = model.forward_with_hidden(inputs[:, :1], state)
            memory = empty_memory(batch, config.window, int(hidden.shape[-1]))
        a, b, n, state, memory = step(inputs, labels, state, memory)
        model_nats, pointer_nats, tokens = model_nats + float(a), pointer_nats + float(b), tokens + float(n)
    return model_nats, pointer_nats, tokens
