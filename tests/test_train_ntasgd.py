"""NT-ASGD through the runner: once it switches, best/, the exported SavedModel and the model
that evaluate/babble load hold the averaged weights (awd-lstm-lm's model), and best/ records
where in training it was taken."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer import checkpoints, runner
from trainer.hparams import HParams


def _hparams(data_dir: str, prefix: str, job_dir: str, **changes: object) -> HParams:
    # One evaluation per step: the switch needs more than NONMONO (5) of them. A learning rate
    # far too high makes the validation loss rise after the first steps, which is the stall.
    values = dict(data_dir=data_dir, data_prefix=prefix, job_dir=job_dir, layers=1, lstm_state_size=8,
                  embedding_size=4, batch_size=2, unroll_steps=8, optimizer="ntasgd", learning_rate=50.0,
                  warmup_steps=0, eval_every=1, eval_steps=1, save_checkpoints_steps=0, sample_every=0,
                  sample_length=4, log_every=5)
    values.update(changes)
    return HParams(**values)


def _trainer(hparams: HParams) -> runner._Trainer:
    strategy = tf.distribute.get_strategy()
    prepared, metadata = runner.prepare_job(hparams, strategy)
    return runner._Trainer(prepared, metadata, strategy)


def _averaged(trainer: runner._Trainer) -> list[np.ndarray]:
    """model.variables with NT-ASGD's averages in place of the trained weights."""
    optimizer = trainer.optimizer
    by_variable = {id(v): a for v, a in zip(optimizer.averaged_variables, optimizer.averages, strict=True)}
    return [by_variable.get(id(v), v).numpy() for v in trainer.model.variables]


def test_the_export_holds_the_averaged_weights_after_the_switch(tmp_path, make_data_dir, capsys) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    hparams = _hparams(data_dir, prefix, str(tmp_path / "job"), max_steps=10)
    result = runner.train(hparams)
    assert "NT-ASGD: validation loss stalled at step" in capsys.readouterr().out
    assert result.stopped == "finished"
    # The final regular checkpoint keeps the raw weights and the averages (exact resume).
    trainer = _trainer(hparams)
    trainer.restore()
    assert trainer.optimizer.triggered
    raw = [v.numpy() for v in trainer.model.variables]
    averaged = _averaged(trainer)
    assert any(not np.allclose(a, r) for a, r in zip(averaged, raw, strict=True))
    exported = tf.saved_model.load(str(tmp_path / "job" / "export"))
    for got, want in zip(exported.weights, averaged, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # evaluate, babble and serve load the latest checkpoint's average too.
    _, _, loaded = checkpoints.load_job(str(tmp_path / "job"))
    for got, want in zip(loaded.variables, averaged, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_best_holds_the_averaged_weights_and_the_current_position(tmp_path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    trainer = _trainer(_hparams(data_dir, prefix, str(tmp_path / "job"), max_steps=10))
    _, state = trainer.restore()
    optimizer = trainer.optimizer
    # As if NT-ASGD had switched: averages distinct from the current weights.
    optimizer.trigger_step.assign(0)
    for variable, average in zip(optimizer.averaged_variables, optimizer.averages, strict=True):
        average.assign(variable * 0.5)
    raw = [v.numpy() for v in trainer.model.variables]
    averaged = _averaged(trainer)
    loss = trainer.evaluate(runner._Position(step=3, epoch=1, window=2), state)
    assert np.isfinite(loss)
    for now, before in zip(trainer.model.variables, raw, strict=True):  # swapped back afterwards
        np.testing.assert_array_equal(now.numpy(), before)
    path = checkpoints.checkpoint_path(trainer.hparams.job_dir, best=True)
    _, _, best_model = checkpoints.load_job(trainer.hparams.job_dir, best=True)
    for got, want in zip(best_model.variables, averaged, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    reader = tf.train.load_checkpoint(path)
    counters = [int(reader.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE"))
                for name in ("step", "epoch", "position")]
    assert counters == [3, 1, 2]
