"""The Estimator contract, kept: `model_fn(features, labels, mode, params) -> ModelSpec`.

tf.estimator is gone in TF 2.21; the runner (trainer.runner), evaluation and generation call this
function directly inside their `tf.function`s. It is pure: no I/O, no flags, no variables created.

`params` is a `Params` holding the HParams *and the model already built* by
`trainer.models.build_model`. The Estimator rebuilt the graph on every call and found its
variables by name; Keras models own their variables, so building the model inside model_fn
would create fresh weights on every call. Passing the built model keeps model_fn pure and lets
the caller decide where variables live (a `tf.distribute` strategy scope, a restored checkpoint).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

import tensorflow as tf

from trainer.hparams import HParams
from trainer.models.base import LanguageModel, State

LOG2 = math.log(2.0)


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"
    PREDICT = "predict"


@dataclasses.dataclass(frozen=True)
class Params:
    hparams: HParams
    model: LanguageModel


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What one call of model_fn produces.

    loss: mean cross-entropy over the window (plus the model's regularisation losses in TRAIN);
      None in PREDICT.
    predictions: `logits` [B, T, V], `log_probs` (next-token log-probabilities) [B, T, V],
      `state` (the state after the window).
    eval_metrics: `nats` (summed cross-entropy) and `tokens` (count), both float32 scalars, so
      callers can sum them over windows and replicas for exact whole-split averages; empty in
      PREDICT.
    state: the state after the window, to feed the next window of the same streams.
    """

    mode: Mode
    loss: tf.Tensor | None
    predictions: dict[str, Any]
    eval_metrics: dict[str, tf.Tensor]
    state: State


def model_fn(features: dict[str, Any], labels: tf.Tensor | None, mode: Mode, params: Params) -> ModelSpec:
    """features = {"tokens": int32 [B, T], "state": nested state, optionally "dropout_seed"
    (int64 [2]: reproducible dropout masks in TRAIN)}; labels int32 [B, T] or None."""
    model = params.model
    training = mode is Mode.TRAIN
    logits, state = model(features["tokens"], features["state"], training=training,
                          dropout_seed=features.get("dropout_seed"))
    log_probs = tf.nn.log_softmax(logits, axis=-1)
    predictions = {"logits": logits, "log_probs": log_probs, "state": state}
    if mode is Mode.PREDICT:
        return ModelSpec(mode, None, predictions, {}, state)
    if labels is None:
        raise ValueError(f"model_fn in mode {mode.name} needs labels")
    nats = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=logits)
    total = tf.reduce_sum(nats)
    count = tf.cast(tf.size(labels), tf.float32)
    loss = total / count
    if training and model.losses:
        loss = loss + tf.add_n(model.losses)
    return ModelSpec(mode, loss, predictions, {"nats": total, "tokens": count}, state)


def bits_per_token(nats_per_token: float) -> float:
    return nats_per_token / LOG2


def perplexity(nats_per_token: float) -> float:
    # Capped (e^80 ~ 5.5e34) so a diverging model's perplexity still fits a float32 summary.
    return math.exp(min(nats_per_token, 80.0))
