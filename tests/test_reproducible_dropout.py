"""Dropout masks are a function of (--seed, global step, call site): a run resumed with every
dropout flag on ends where an uninterrupted run ends, and two runs with the same seed agree."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from trainer import checkpoints, runner
from trainer.hparams import HParams
from trainer.models import awd, build_model

RECURRENT_DROPOUT = dict(dropout=0.3, weight_drop=0.3, embed_dropout=0.2, input_dropout=0.2)
# The transformer has no recurrence: --weight_drop / --input_dropout do not apply to it.
TRANSFORMER_DROPOUT = dict(dropout=0.3, embed_dropout=0.2)
CELLS = {
    "lstm": dict(layers=2, **RECURRENT_DROPOUT),
    "mlstm": dict(layers=1, **RECURRENT_DROPOUT),
    "mogrifier": dict(layers=1, mogrify_rounds=2, **RECURRENT_DROPOUT),
    "qrnn": dict(layers=2, **RECURRENT_DROPOUT),
    "transformer": dict(layers=1, d_model=16, heads=2, max_context=16, **TRANSFORMER_DROPOUT),
}


def _hparams(data_dir: str, job_dir: str, cell: str, **changes: object) -> HParams:
    # 4 streams x 64 steps: 6 windows per epoch of the tiny train split, so runs cross epochs.
    base = HParams(data_dir=data_dir, data_prefix="tiny", job_dir=job_dir, cell=cell,
                   lstm_state_size=16, embedding_size=8, batch_size=4, unroll_steps=64,
                   learning_rate=0.01, eval_every=0, save_checkpoints_steps=3, sample_every=0,
                   sample_length=8, log_every=3, seed=7, **CELLS[cell])
    return base.replace(**changes)


def _state(job_dir: str) -> dict[str, np.ndarray]:
    """The newest checkpoint's weights, RNG states, optimizer slots, counters and carried state."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(job_dir))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model", "optimizer", "step", "epoch", "position", "carry"))}


@pytest.mark.parametrize("cell", ["lstm", "transformer"])
def test_resumed_run_with_dropout_equals_an_uninterrupted_one(cell, tmp_path, make_data_dir) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)
    straight = runner.train(_hparams(data_dir, str(tmp_path / "a"), cell, max_steps=9))
    again = runner.train(_hparams(data_dir, str(tmp_path / "b"), cell, max_steps=9))
    runner.train(_hparams(data_dir, str(tmp_path / "c"), cell, max_steps=4))
    resumed = runner.train(_hparams(data_dir, str(tmp_path / "c"), cell, max_steps=9))
    assert straight.step == again.step == resumed.step == 9
    expected = _state(straight.job_dir)
    # Same seed, same run: bit for bit.
    for name, value in _state(again.job_dir).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    got = _state(resumed.job_dir)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Dropout was on: another seed's masks give other weights (so the equalities above mean something).
    other = runner.train(_hparams(data_dir, str(tmp_path / "d"), cell, max_steps=9, seed=8))
    assert any(not np.allclose(a, b) for a, b in zip(_trainable(straight.job_dir),
                                                     _trainable(other.job_dir), strict=True))


def _trainable(job_dir: str) -> list[np.ndarray]:
    return [v.numpy() for v in checkpoints.load_job(job_dir)[2].trainable_variables]


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_every_dropout_site_draws_its_mask_from_the_step_seed(cell) -> None:
    options = dict(CELLS[cell])
    if cell == "transformer":
        # Its --dropout draws from Keras' own checkpointed SeedGenerators (covered by the resume
        # test); only --embed_dropout follows the step seed.
        options["dropout"] = 0.0
    hparams = HParams(cell=cell, vocab_size=11, lstm_state_size=8, embedding_size=8, **options)
    model = build_model(hparams)
    tokens = tf.constant(np.random.default_rng(0).integers(0, 11, size=(3, 5)), tf.int32)

    def logits(seed: tf.Tensor) -> np.ndarray:
        return model(tokens, model.initial_state(3), training=True, dropout_seed=seed)[0].numpy()

    step_3 = awd.step_seed(7, 3)
    np.testing.assert_array_equal(logits(step_3), logits(awd.step_seed(7, 3)))
    assert not np.allclose(logits(step_3), logits(awd.step_seed(7, 4)))
    assert not np.allclose(logits(step_3), logits(awd.step_seed(7, 3, replica=1)))
