"""Compiled steps shared by training and evaluation, written against `tf.distribute`.

Each step runs `model_fn` in one replica through `strategy.run`; with the default strategy (one
device) that is a plain call. The recurrent state is an input and an output of every step, so
the caller carries it from window to window (per replica under a multi-device strategy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from trainer import kernels, optimizers
from trainer.model_fn import Mode, Params, model_fn
from trainer.models import awd
from trainer.models.base import State

TrainStep = Callable[[tf.Tensor, tf.Tensor, State], tuple[tf.Tensor, tf.Tensor, State]]
TrainSteps = Callable[[Any, State, tf.Tensor], tuple[tf.Tensor, tf.Tensor, State]]
EvalStep = Callable[[tf.Tensor, tf.Tensor, State], tuple[tf.Tensor, tf.Tensor, State]]


def initial_state(params: Params, strategy: tf.distribute.Strategy, global_batch: int) -> State:
    """The state training and evaluation windows of `global_batch` streams start from (the
    model's `window_state`), split over the strategy's replicas."""
    per_replica = global_batch // strategy.num_replicas_in_sync
    return strategy.run(lambda: params.model.window_state(per_replica))


def split_state(strategy: tf.distribute.Strategy, state: State) -> State:
    """A global state ([global_batch, ...] leaves) as per-replica values, replica r taking the
    contiguous block of streams it trains (trainer.distribute.replica_streams)."""
    leaves = tf.nest.flatten(state)
    if not leaves:  # a model that carries nothing between windows
        return state

    def rows() -> list[tf.Tensor]:
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        size = tf.shape(leaves[0])[0] // strategy.num_replicas_in_sync
        return [leaf[replica * size:(replica + 1) * size] for leaf in leaves]

    return tf.nest.pack_sequence_as(state, strategy.run(rows))


def gather_state(strategy: tf.distribute.Strategy, state: State) -> State:
    """The inverse of `split_state`: per-replica state back as [global_batch, ...] tensors (an
    all-gather, so every worker must call it at the same point)."""
    return tf.nest.map_structure(lambda leaf: strategy.gather(leaf, axis=0), state)


def training_loss(tokens: tf.Tensor, labels: tf.Tensor, state: State, seed: tf.Tensor,
                  params: Params) -> tuple[tf.Tensor, State]:
    """model_fn's TRAIN loss and next state, over --batch_splits equal slices of the streams,
    each run forward on its own; their mean loss is the batch's (every window has as many
    tokens). No op joins the slices before the gradients meet, so XLA's CPU runtime runs them on
    separate cores at once (trainer/xla.py). Each slice draws its own dropout masks."""
    splits = max(params.hparams.batch_splits, 1)  # 0, unresolved: the batch whole
    if splits == 1:
        spec = model_fn({"tokens": tokens, "state": state, "dropout_seed": seed}, labels, Mode.TRAIN, params)
        return spec.loss, spec.state
    leaves = [tf.split(leaf, splits) for leaf in tf.nest.flatten(state)]
    losses, states = [], []
    for index, (part_tokens, part_labels) in enumerate(zip(tf.split(tokens, splits), tf.split(labels, splits),
                                                           strict=True)):
        part_state = tf.nest.pack_sequence_as(state, [leaf[index] for leaf in leaves])
        part_seed = tf.random.experimental.stateless_fold_in(seed, index)
        spec = model_fn({"tokens": part_tokens, "state": part_state, "dropout_seed": part_seed}, part_labels,
                        Mode.TRAIN, params)
        losses.append(spec.loss)
        states.append(spec.state)
    joined = tf.nest.map_structure(lambda *parts: tf.concat(parts, 0), *states)
    return tf.add_n(losses) / splits, joined


def _replica_train_step(params: Params, optimizer: keras.optimizers.Optimizer,
                        strategy: tf.distribute.Strategy,
                        loss_scale: optimizers.DynamicLossScale | None) -> Callable[..., tuple[Any, ...]]:
    """One replica's training step: (tokens, labels, state) -> (loss, gradient norm, state)."""
    model, clip = params.model, params.hparams.grad_clip
    replicas = strategy.num_replicas_in_sync
    period = model.training_reset_period(params.hparams.state_reset_windows)

    def replica_step(tokens: tf.Tensor, labels: tf.Tensor, state: State) -> tuple[Any, ...]:
        if period:
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            streams = tf.shape(tokens)[0]
            state = reset_streams(model, state, optimizer.iterations, period,
                                  first_stream=tf.cast(replica, tf.int32) * streams,
                                  global_batch=streams * replicas)
        # Dropout masks as a function of (--seed, global step, replica): a resumed run draws
        # the masks an uninterrupted one draws (the optimizer's step is checkpointed).
        replica_id = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = awd.step_seed(params.hparams.seed, optimizer.iterations, replica_id)
        with tf.GradientTape() as tape:
            loss, state = training_loss(tokens, labels, state, seed, params)
            # Gradients are summed over replicas, so each contributes its share of the mean.
            scaled = loss / replicas
            if loss_scale is not None:
                scaled = scaled * loss_scale.scale
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        if loss_scale is not None:
            grads = [_scale(g, 1.0 / loss_scale.scale) for g in grads]
        if replicas > 1:
            # Norm and clipping see the summed gradient, as on one device; Keras sums again
            # in apply_gradients, so each replica hands over an equal share of the sum.
            grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        norm = tf.linalg.global_norm(grads)
        if clip > 0:
            grads, _ = tf.clip_by_global_norm(grads, clip, use_norm=norm)
        if replicas > 1:
            grads = [_scale(g, 1.0 / replicas) for g in grads]
        if loss_scale is None:
            optimizer.apply_gradients(zip(grads, variables, strict=True))
        else:
            finite = tf.math.is_finite(norm)

            def apply() -> tf.Tensor:
                optimizer.apply_gradients(zip(grads, variables, strict=True))
                return tf.constant(True)

            tf.cond(finite, apply, lambda: tf.constant(False))
            loss_scale.update(finite)
        return loss, norm, state

    return replica_step


def make_train_step(params: Params, optimizer: keras.optimizers.Optimizer,
                    strategy: tf.distribute.Strategy,
                    loss_scale: optimizers.DynamicLossScale | None = None,
                    jit_compile: bool = False) -> TrainStep:
    """(tokens, labels, state) -> (mean loss, gradient norm before clipping, next state).

    With `loss_scale` (--precision=float16) a step whose gradient overflows is skipped: the
    optimizer does not move, and the returned norm is that non-finite value. `jit_compile`:
    the whole step compiled by XLA (--xla=step)."""
    replica_step = _replica_train_step(params, optimizer, strategy, loss_scale)

    @tf.function(jit_compile=jit_compile or None)
    def step(tokens: tf.Tensor, labels: tf.Tensor, state: State) -> tuple[Any, ...]:
        with kernels.xla_step(jit_compile):
            loss, norm, state = strategy.run(replica_step, args=(tokens, labels, state))
        mean = tf.distribute.ReduceOp.MEAN
        return (strategy.reduce(mean, loss, axis=None), strategy.reduce(mean, norm, axis=None), state)

    return step


def make_train_steps(params: Params, optimizer: keras.optimizers.Optimizer,
                     strategy: tf.distribute.Strategy,
                     loss_scale: optimizers.DynamicLossScale | None = None) -> TrainSteps:
    """(iterator, state, count) -> (losses [count], norms [count], next state): `count` training
    steps on the next `count` windows of `iterator` in one compiled call (--steps_per_execution).
    `count` is a tensor, so a shorter call (the end of an epoch) does not retrace."""
    replica_step = _replica_train_step(params, optimizer, strategy, loss_scale)
    mean = tf.distribute.ReduceOp.MEAN

    @tf.function
    def steps(iterator: Any, state: State, count: tf.Tensor) -> tuple[Any, ...]:
        losses = tf.TensorArray(tf.float32, size=count)
        norms = tf.TensorArray(tf.float32, size=count)
        for i in tf.range(count):
            tokens, labels = next(iterator)
            loss, norm, state = strategy.run(replica_step, args=(tokens, labels, state))
            losses = losses.write(i, strategy.reduce(mean, loss, axis=None))
            norms = norms.write(i, strategy.reduce(mean, norm, axis=None))
        return losses.stack(), norms.stack(), state

    return steps


def reset_streams(model: Any, state: State, step: tf.Tensor, period: int, first_stream: tf.Tensor,
                  global_batch: int | tf.Tensor) -> State:
    """`state` with the streams due for a restart at `step` set back to the model's initial state.

    Stream s restarts when (step + s * period // global_batch) % period == 0: every stream once
    per `period` windows, staggered across the batch. A function of the global step only, so a
    resumed run restarts the same streams as an uninterrupted one.
    """
    streams = tf.shape(tf.nest.flatten(state)[0])[0]
    index = first_stream + tf.range(streams)
    offset = index * period // tf.cast(global_batch, tf.int32)
    due = tf.equal((tf.cast(step, tf.int32) + offset) % period, 0)
    fresh = model.initial_state(streams)

    def pick(initial: tf.Tensor, carried: tf.Tensor) -> tf.Tensor:
        mask = tf.reshape(due, tf.concat([[streams], tf.ones([tf.rank(carried) - 1], tf.int32)], 0))
        return tf.where(mask, initial, carried)

    return tf.nest.map_structure(pick, fresh, state)


def _scale(grad: Any, factor: float) -> Any:
    if isinstance(grad, tf.IndexedSlices):  # embedding gradients stay sparse
        return tf.IndexedSlices(grad.values * factor, grad.indices, grad.dense_shape)
    return grad * factor


def make_eval_step(params: Params, strategy: tf.distribute.Strategy, jit_compile: bool = False) -> EvalStep:
    """(tokens, labels, state) -> (summed nats, token count, next state). `jit_compile`: compiled
    by XLA, as --xla=step compiles the train step. A forward-only transformer graph is the case
    that needs it: as a graph, gpt-baby's evaluation window took 330 ms where its whole training
    step (forward, backward, optimizer) takes 30-39 ms as a graph, and its forward 12 ms under XLA
    (AMD EPYC, TF 2.21). Grappler is what slows the forward-only graph: with it off, one block took
    3.6 ms instead of 80 (bench/README.md)."""

    def replica_step(tokens: tf.Tensor, labels: tf.Tensor, state: State) -> tuple[Any, ...]:
        spec = model_fn({"tokens": tokens, "state": state}, labels, Mode.EVAL, params)
        return spec.eval_metrics["nats"], spec.eval_metrics["tokens"], spec.state

    @tf.function(jit_compile=jit_compile or None)
    def step(tokens: tf.Tensor, labels: tf.Tensor, state: State) -> tuple[Any, ...]:
        with kernels.xla_step(jit_compile):
            nats, count, state = strategy.run(replica_step, args=(tokens, labels, state))
        total = tf.distribute.ReduceOp.SUM
        return strategy.reduce(total, nats, axis=None), strategy.reduce(total, count, axis=None), state

    return step


def run_eval(step: EvalStep, dataset: tf.data.Dataset, state: State) -> tuple[float, float, int]:
    """Sums (nats, tokens, windows) over every window of `dataset`, carrying the state."""
    nats, tokens, windows = 0.0, 0.0, 0
    for inputs, labels in dataset:
        window_nats, window_tokens, state = step(inputs, labels, state)
        # Summed in Python float64: exact whole-split averages even over millions of tokens.
        nats += float(window_nats)
        tokens += float(window_tokens)
        windows += 1
    return nats, tokens, windows
