"""The interface every verne language model implements (see `trainer.models`)."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

# A model's recurrent state: any nest (tuples) of float32 tensors whose leading dim is the batch.
State = Any


class LanguageModel(keras.Model):
    """Maps a window of tokens and the state left by the previous window to next-token logits.

    Subclasses implement `initial_state` and `call`; regularisation terms that only apply in
    training (AWD's AR/TAR) are added with `self.add_loss` when `training` is true, and the
    model_fn adds `model.losses` to the training loss.
    """

    def initial_state(self, batch_size: int | tf.Tensor) -> State:
        """The state a stream starts from (zeros for recurrent models)."""
        raise NotImplementedError

    # Whether a window of training or evaluation starts from the state the previous window left
    # (stateful truncated back-propagation) or stands on its own.
    carries_state_between_windows = True

    def window_state(self, batch_size: int | tf.Tensor) -> State:
        """The state training and evaluation carry from window to window: `initial_state` for
        models that carry state, `()` (nothing) for models whose windows stand on their own,
        which `call` then computes without any state."""
        return self.initial_state(batch_size) if self.carries_state_between_windows else ()

    def training_reset_period(self, state_reset_windows: int) -> int:
        """Every how many windows a stream restarts from `initial_state` in training
        (--state_reset_windows for models that carry state; 0: never, or nothing to reset)."""
        return state_reset_windows if self.carries_state_between_windows else 0

    def call(self, tokens: tf.Tensor, state: State, training: bool = False,
             dropout_seed: tf.Tensor | None = None) -> tuple[tf.Tensor, State]:
        """tokens int32 [B, T], state -> (logits float32 [B, T, V], the state after the window).

        `dropout_seed` (int64 [2], see trainer.models.awd.step_seed) makes training-time masks a
        function of it; the train step passes one derived from --seed and the global step."""
        raise NotImplementedError
