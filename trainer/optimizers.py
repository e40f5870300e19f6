"""NT-ASGD (Merity et al. 2017): SGD that switches to averaged SGD when validation stalls.

awd-lstm-lm trains with plain SGD and, at the first evaluation whose loss is worse than the best
loss seen more than `nonmono` evaluations ago, switches to ASGD: from then on it keeps the
running average of the weights since the switch, and evaluates and saves that average.

Here the optimizer is a Keras SGD with three additions, all optimizer variables so they are
checkpointed and a resumed run continues exactly:
- `averages`: one slot per weight, the uniform average of the weights since the trigger step;
- `trigger_step`: -1 until triggered, then the step of the switch;
- the validation history `observe_validation(loss)` needs for the non-monotone test.
`averaged_weights(optimizer)` swaps the averages into the model for evaluation or saving (and
back afterwards); for any other optimizer, or before the trigger, it does nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import keras
import tensorflow as tf

# awd-lstm-lm's default `--nonmono 5`.
NONMONO = 5


class NTASGD(keras.optimizers.SGD):
    """SGD, then averaged SGD once `observe_validation` sees the validation loss stall."""

    def __init__(self, learning_rate: Any = 0.01, nonmono: int = NONMONO, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        if nonmono < 1:
            raise ValueError(f"nonmono must be >= 1, got {nonmono}")
        self.nonmono = nonmono

    def build(self, variables: list[Any]) -> None:
        if self.built:
            return
        super().build(variables)
        self.averaged_variables = list(variables)
        self.averages = self.add_optimizer_variables(variables, "average")
        self.trigger_step = self.add_variable((), initializer=keras.initializers.Constant(-1),
                                              dtype="int64", name="trigger_step")
        self.recent_losses = self.add_variable((self.nonmono,), dtype="float64", name="recent_losses")
        self.older_min = self.add_variable((), initializer=keras.initializers.Constant(math.inf),
                                           dtype="float64", name="older_min")
        self.evaluations = self.add_variable((), dtype="int64", name="evaluations")

    @property
    def triggered(self) -> bool:
        return bool(self.built and int(self.trigger_step.numpy()) >= 0)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        super().update_step(gradient, variable, learning_rate)
        average = self.averages[self._get_variable_index(variable)]
        # Uniform average since the trigger: a_k = a_{k-1} + (w_k - a_{k-1}) / (k + 1), k = 0 at
        # the first averaged step (so a_0 = w_0); weight 0 before the trigger.
        since = tf.cast(self.iterations - self.trigger_step, variable.dtype)
        weight = tf.where(self.trigger_step >= 0, 1.0 / (since + 1.0), tf.zeros_like(since))
        self.assign(average, average + weight * (variable - average))

    def observe_validation(self, loss: float) -> bool:
        """Records a validation loss; returns True when this one triggers the switch to ASGD.

        awd-lstm-lm's test: more than `nonmono` losses seen and this one worse than the best of
        all but the last `nonmono`.
        """
        count = int(self.evaluations.numpy())
        trigger = (not self.triggered and count > self.nonmono
                   and loss > float(self.older_min.numpy()))
        if trigger:
            self.trigger_step.assign(self.iterations)
        slot = count % self.nonmono
        recent = self.recent_losses.numpy()
        if count >= self.nonmono:
            self.older_min.assign(min(float(self.older_min.numpy()), float(recent[slot])))
        recent[slot] = loss
        self.recent_losses.assign(recent)
        self.evaluations.assign(count + 1)
        return trigger


def make_ntasgd(learning_rate: Any) -> NTASGD:
    """The optimizer `--optimizer=ntasgd` names (the runner's factory calls this)."""
    return NTASGD(learning_rate)


def _swap(optimizer: NTASGD) -> None:
    for variable, average in zip(optimizer.averaged_variables, optimizer.averages, strict=True):
        current = tf.identity(variable)
        variable.assign(average)
        average.assign(current)


@contextmanager
def averaged_weights(optimizer: keras.optimizers.Optimizer) -> Iterator[bool]:
    """Inside the block the model holds NT-ASGD's averaged weights (yields whether it does)."""
    if not isinstance(optimizer, NTASGD) or not optimizer.triggered:
        yield False
        return
    _swap(optimizer)
    try:
        yield True
    finally:
        _swap(optimizer)


class _NoLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Stands in for the training schedule in an optimizer that is only restored, never stepped."""

    def __call__(self, step: Any) -> tf.Tensor:
        return tf.constant(0.0)

    def get_config(self) -> dict[str, Any]:
        return {}


def restore_averaged(model: keras.Model, path: str) -> bool:
    """Puts NT-ASGD's averaged weights from the training checkpoint at `path` into `model` (whose
    raw weights are already restored) if the run had switched; returns whether it had. The
    checkpoint stores the optimizer under "optimizer", its variables built from the model's
    trainable variables in order, as trainer.runner builds them."""
    # A schedule, as trainer.runner always passes one: a float would add a learning-rate
    # variable and shift every optimizer variable against the checkpoint's.
    optimizer = NTASGD(_NoLearningRate())
    optimizer.build(model.trainable_variables)
    tf.train.Checkpoint(optimizer=optimizer).read(path).expect_partial()
    if not optimizer.triggered:
        return False
    _swap(optimizer)
    return True


class DynamicLossScale(tf.Module):
    """float16 training's dynamic loss scale (Micikevicius et al. 2018; the rule of Keras'
    LossScaleOptimizer): the loss is multiplied by `scale` before differentiating so that small
    gradients survive float16, and the gradient divided by it after. A step whose gradient is
    not finite is skipped and halves the scale; `period` finite steps in a row double it.

    Not Keras' LossScaleOptimizer, which wraps the optimizer: that would move the optimizer's
    slots in the checkpoint (a job could not change --precision), hide NT-ASGD, and leave
    clipping to see the scaled gradient. The scale is not checkpointed: a resumed run finds it
    again within a few skipped steps.
    """

    def __init__(self, initial: float = 2.0 ** 15, period: int = 2000) -> None:
        super().__init__(name="loss_scale")
        self.period = period
        # Every replica sees the same all-reduced gradient, so any one's update is everyone's.
        first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.scale = tf.Variable(initial, dtype=tf.float32, trainable=False, aggregation=first)
        self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=first)
        self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, aggregation=first)

    def update(self, finite: tf.Tensor) -> None:
        """After a step: `finite` says whether its (unscaled) gradient was finite."""
        grown = self.good_steps + 1 >= self.period
        self.scale.assign(tf.where(finite, tf.where(grown, self.scale * 2.0, self.scale),
                                   self.scale * 0.5))
        self.good_steps.assign(tf.where(finite & ~grown, self.good_steps + 1, 0))
        self.skipped.assign_add(tf.where(finite, tf.constant(0, tf.int64), 1))
