"""--batch_splits: the training step's loss over equal slices of the batch's streams is the
batch's loss, its gradients the batch's, and each slice draws its own dropout masks."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer.hparams import HParams
from trainer.loops import training_loss
from trainer.model_fn import Params
from trainer.models import awd, build_model

HP = HParams(cell="transformer", vocab_size=23, layers=2, d_model=16, heads=2, embedding_size=16,
             unroll_steps=8, max_context=8, batch_size=4, precision="float32").validate()
# A recurrent cell too: its state, carried from window to window, is split and joined again.
LSTM = HParams(vocab_size=23, layers=2, lstm_state_size=16, embedding_size=8, unroll_steps=8, batch_size=4,
               precision="float32").validate()


def _loss_and_grads(params: Params, tokens: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor) -> tuple:
    model = params.model
    with tf.GradientTape() as tape:
        loss, state = training_loss(tokens, labels, model.window_state(tokens.shape[0]), seed, params)
    return loss, state, tape.gradient(loss, model.trainable_variables)


@pytest.mark.parametrize("hp", [HP, LSTM], ids=["transformer", "lstm"])
def test_the_mean_over_slices_is_the_batch_loss_with_the_batch_gradients(hp: HParams) -> None:
    model = build_model(hp)
    rng = np.random.default_rng(0)
    tokens = tf.constant(rng.integers(0, 23, (4, 8)), tf.int32)
    labels = tf.constant(rng.integers(0, 23, (4, 8)), tf.int32)
    seed = awd.step_seed(1, 0)
    whole_loss, whole_state, whole_grads = _loss_and_grads(Params(hp, model), tokens, labels, seed)
    assert tf.nest.flatten(whole_state) or hp.cell == "transformer"
    for splits in (2, 4):
        sliced = Params(hp.replace(batch_splits=splits), model)
        loss, state, grads = _loss_and_grads(sliced, tokens, labels, seed)
        np.testing.assert_allclose(loss.numpy(), whole_loss.numpy(), rtol=1e-6)
        for got, want in zip(tf.nest.flatten(state), tf.nest.flatten(whole_state), strict=True):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, whole_grads, strict=True):
            np.testing.assert_allclose(tf.convert_to_tensor(got).numpy(), tf.convert_to_tensor(want).numpy(),
                                       rtol=1e-4, atol=1e-6)


def test_each_slice_draws_its_own_dropout_masks() -> None:
    # Two identical halves: the mean of the halves' losses each under its own slice's seed, which
    # with one mask for both would be the first half's loss alone.
    # --embed_dropout draws from the step's seed (--dropout is Keras' own, with its own generator).
    hp = HP.replace(embed_dropout=0.5, batch_splits=2)
    params = Params(hp, build_model(hp))
    half = np.random.default_rng(1).integers(0, 23, (2, 8))
    tokens = tf.constant(np.concatenate([half, half]), tf.int32)
    seed = awd.step_seed(1, 0)
    both, _, _ = _loss_and_grads(params, tokens, tokens, seed)
    whole = Params(hp.replace(batch_splits=1), params.model)
    first, second = (float(_loss_and_grads(whole, tokens[:2], tokens[:2],
                                           tf.random.experimental.stateless_fold_in(seed, index))[0])
                     for index in (0, 1))
    assert abs(first - second) > 1e-4
    np.testing.assert_allclose(float(both), (first + second) / 2, rtol=1e-6)
