"""AWD-LSTM regularisation on every recurrent cell, and NT-ASGD."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.errors import UsageError
from trainer.hparams import HParams
from trainer.models import awd, build_model
from trainer.optimizers import NTASGD, averaged_weights

RECURRENT = ("lstm", "gru", "rnn", "mlstm", "mogrifier", "qrnn")


def test_locked_dropout_shares_one_mask_across_time() -> None:
    tf.random.set_seed(0)
    x = tf.ones([4, 9, 16])
    y = awd.locked_dropout(x, 0.5, training=True).numpy()
    assert np.all(y == y[:, :1])  # every step sees its stream's mask
    assert set(np.unique(y)) == {0.0, 2.0}  # kept units scaled by 1 / (1 - rate)
    assert awd.locked_dropout(x, 0.5, training=False) is x


def test_embedding_dropout_drops_whole_words_and_drop_connect_whole_weights() -> None:
    tf.random.set_seed(1)
    table = tf.random.normal([50, 8])
    dropped = awd.embedding_dropout(table, 0.5, training=True).numpy()
    zero_rows = np.all(dropped == 0.0, axis=1)
    assert 0 < zero_rows.sum() < 50
    np.testing.assert_allclose(dropped[~zero_rows], 2.0 * table.numpy()[~zero_rows], rtol=1e-6)
    weight = tf.random.normal([30, 40])
    connected = awd.drop_connect(weight, 0.25, training=True).numpy()
    kept = connected != 0.0
    assert 0.6 < kept.mean() < 0.9
    np.testing.assert_allclose(connected[kept], weight.numpy()[kept] / 0.75, rtol=1e-6)


def test_ar_and_tar_formulas() -> None:
    h = tf.constant([[[1.0, 2.0], [3.0, 5.0]]])
    assert float(awd.activation_regularization(h, 2.0)) == pytest.approx(2.0 * (1 + 4 + 9 + 25) / 4)
    assert float(awd.temporal_activation_regularization(h, 3.0)) == pytest.approx(3.0 * (4 + 9) / 2)


def _awd_hparams(cell: str, **changes: object) -> HParams:
    base = dict(cell=cell, vocab_size=12, layers=2, lstm_state_size=8, embedding_size=6,
                mogrify_rounds=2, tie_embeddings=True, language_model="char")
    base.update(changes)
    return HParams(**base)


@pytest.mark.parametrize("cell", RECURRENT)
def test_every_recurrent_cell_takes_every_awd_option(cell: str) -> None:
    options = dict(weight_drop=0.5, dropout=0.3, input_dropout=0.2, embed_dropout=0.2,
                   ar_alpha=2.0, tar_beta=1.0)
    model = build_model(_awd_hparams(cell, **options))
    plain = build_model(_awd_hparams(cell))
    plain.set_weights(model.get_weights())
    tokens = tf.constant(np.random.default_rng(0).integers(0, 12, size=(3, 10)), tf.int32)
    # Outside training every option is off: the same weights give the same logits.
    evaluated, _ = model(tokens, model.initial_state(3))
    np.testing.assert_allclose(evaluated.numpy(), plain(tokens, plain.initial_state(3))[0].numpy(),
                               atol=1e-6)
    tf.random.set_seed(2)
    trained, _ = model(tokens, model.initial_state(3), training=True)
    assert not np.allclose(trained.numpy(), evaluated.numpy())
    assert len(model.losses) == 2 and all(float(loss) > 0 for loss in model.losses)


@pytest.mark.parametrize("cell", RECURRENT)
def test_weight_drop_alone_changes_the_recurrence(cell: str) -> None:
    # Only DropConnect is on: a different output in training proves the layer applies it.
    model = build_model(_awd_hparams(cell, weight_drop=0.9))
    tokens = tf.constant(np.random.default_rng(1).integers(0, 12, size=(2, 6)), tf.int32)
    tf.random.set_seed(3)
    trained, _ = model(tokens, model.initial_state(2), training=True)
    evaluated, _ = model(tokens, model.initial_state(2))
    assert not np.allclose(trained.numpy(), evaluated.numpy())


def test_transformer_rejects_recurrent_only_options() -> None:
    with pytest.raises(UsageError, match="--weight_drop"):
        build_model(HParams(cell="transformer", vocab_size=5, d_model=8, heads=2, weight_drop=0.1))


def test_weight_norm_only_for_mlstm() -> None:
    with pytest.raises(UsageError, match="--weight_norm"):
        build_model(_awd_hparams("lstm", weight_norm=True))


def _fit(optimizer: NTASGD, variable: keras.Variable, steps: int) -> list[np.ndarray]:
    seen = []
    for _ in range(steps):
        optimizer.apply_gradients([(tf.constant([1.0, -2.0]) + variable, variable)])
        seen.append(variable.numpy().copy())
    return seen


def test_ntasgd_switches_on_stalled_validation_and_averages_since_then() -> None:
    variable = keras.Variable(np.array([3.0, 1.0], np.float32))
    optimizer = NTASGD(0.1, nonmono=2)
    optimizer.build([variable])
    _fit(optimizer, variable, 3)
    # awd-lstm-lm's rule: switch when the loss is worse than the best one older than 2 evals.
    decisions = [optimizer.observe_validation(loss) for loss in (3.0, 2.0, 1.0, 1.5)]
    assert decisions == [False] * 4 and not optimizer.triggered
    assert optimizer.observe_validation(2.5) and optimizer.triggered
    assert not optimizer.observe_validation(9.0)  # triggers once
    weights = _fit(optimizer, variable, 4)
    np.testing.assert_allclose(optimizer.averages[0].numpy(), np.mean(weights, axis=0), rtol=1e-6)
    with averaged_weights(optimizer) as swapped:
        assert swapped
        np.testing.assert_allclose(variable.numpy(), np.mean(weights, axis=0), rtol=1e-6)
    np.testing.assert_allclose(variable.numpy(), weights[-1])


def test_ntasgd_state_survives_a_checkpoint(tmp_path: object) -> None:
    variable = keras.Variable(np.array([3.0, 1.0], np.float32))
    optimizer = NTASGD(0.1, nonmono=1)
    optimizer.build([variable])
    for loss in (1.0, 2.0, 1.5):
        optimizer.observe_validation(loss)
    assert optimizer.triggered
    _fit(optimizer, variable, 2)
    path = tf.train.Checkpoint(v=variable, optimizer=optimizer).save(f"{tmp_path}/ckpt")
    other_variable = keras.Variable(np.zeros(2, np.float32))
    other = NTASGD(0.1, nonmono=1)
    other.build([other_variable])
    tf.train.Checkpoint(v=other_variable, optimizer=other).restore(path).assert_consumed()
    assert other.triggered and int(other.evaluations.numpy()) == 3
    np.testing.assert_allclose(other.averages[0].numpy(), optimizer.averages[0].numpy())
