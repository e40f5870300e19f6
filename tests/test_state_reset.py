"""Staggered state restarts in stateful truncated back-propagation (trainer.loops.reset_streams)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.loops import reset_streams


class _Zeros:
    """Stands in for a model: only its initial state (zeros, two tensors of different rank)."""

    def initial_state(self, batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.zeros([batch, 3]), tf.zeros([batch, 2, 2])


def _restarted(step: int, period: int, batch: int, first: int = 0, global_batch: int | None = None):
    state = (tf.ones([batch, 3]), tf.ones([batch, 2, 2]))
    out = reset_streams(_Zeros(), state, tf.constant(step), period, tf.constant(first),
                        global_batch or batch)
    flat = out[0].numpy()[:, 0] == 0
    assert np.array_equal(flat, out[1].numpy()[:, 0, 0] == 0)  # every tensor of a stream together
    return flat


def test_every_stream_restarts_once_per_period_and_restarts_are_staggered() -> None:
    period, batch = 4, 8
    restarts = np.stack([_restarted(step, period, batch) for step in range(period)])
    assert restarts.sum(axis=0).tolist() == [1] * batch  # each stream once per period
    assert restarts.sum(axis=1).tolist() == [batch // period] * period  # spread evenly over steps


def test_replicas_see_their_slice_of_the_global_batch() -> None:
    period, batch = 4, 8
    for step in range(6):
        whole = _restarted(step, period, batch)
        halves = np.concatenate([_restarted(step, period, 4, first=0, global_batch=8),
                                 _restarted(step, period, 4, first=4, global_batch=8)])
        assert np.array_equal(whole, halves)
