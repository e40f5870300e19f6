"""The runner: exact resume, the NaN guard, job-dir files and every user error of issue 3."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer import checkpoints, runner
from trainer.errors import UsageError
from trainer.hparams import HParams

ROOT = Path(__file__).resolve().parents[1]


def _hparams(data_dir: str, job_dir: str, **changes: object) -> HParams:
    # 4 streams x 64 steps: 6 windows per epoch of the tiny train split, so runs cross epochs.
    base = HParams(data_dir=data_dir, data_prefix="tiny", job_dir=job_dir, layers=1,
                   lstm_state_size=16, embedding_size=8, batch_size=4, unroll_steps=64,
                   eval_every=4, save_checkpoints_steps=3, sample_every=0, sample_length=8, log_every=2)
    return base.replace(**changes)


def _weights(job_dir: str) -> list[np.ndarray]:
    return [v.numpy() for v in checkpoints.load_job(job_dir)[2].trainable_variables]


def test_resume_continues_exactly(tmp_path, make_data_dir) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)
    straight = runner.train(_hparams(data_dir, str(tmp_path / "a"), max_steps=9))
    first = runner.train(_hparams(data_dir, str(tmp_path / "b"), max_steps=4))
    assert (first.step, first.epoch, first.position) == (4, 0, 4)
    resumed = runner.train(_hparams(data_dir, str(tmp_path / "b"), max_steps=9))
    assert (resumed.step, resumed.epoch, resumed.position) == (straight.step, straight.epoch,
                                                                straight.position) == (9, 1, 3)
    assert resumed.eval_loss == pytest.approx(straight.eval_loss, rel=1e-4)
    for a, b in zip(_weights(straight.job_dir), _weights(resumed.job_dir), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_job_dir_is_self_contained(tmp_path, make_data_dir) -> None:
    data_dir, _, metadata = make_data_dir(tmp_path)
    result = runner.train(_hparams(data_dir, str(tmp_path / "job" / "%JOB%"), max_steps=2,
                                   summary_dir="", sample_every=2))
    job = Path(result.job_dir)
    assert job.name == "tiny-16-states-1-layers-char-emb8"
    saved = HParams.from_json((job / "hparams.json").read_text())
    assert (saved.language_model, saved.vocab_size, saved.job_dir) == ("char", metadata.vocab_size, str(job))
    assert json.loads((job / "metadata.json").read_text())["vocab"] == list(metadata.vocab)
    assert len((job / "samples" / "step-2.txt").read_text()) > 0
    assert list((job / "tensorboard").glob("events.out.tfevents.*"))
    assert tf.train.latest_checkpoint(str(job / "best"))
    # The metadata copy lets a job dir load after its data moved away.
    hparams, loaded_metadata, model = checkpoints.load_job(str(job))
    assert loaded_metadata.vocab == metadata.vocab and hparams == saved and model.built


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, make_data_dir) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)
    job = str(tmp_path / "job")
    runner.train(_hparams(data_dir, job, max_steps=3, eval_every=0))
    good = tf.train.latest_checkpoint(job)
    before = Path(good + ".data-00000-of-00001").read_bytes()
    exploding = _hparams(data_dir, job, max_steps=9, eval_every=0, save_checkpoints_steps=1,
                         optimizer="sgd", learning_rate=1e38, grad_clip=0.0)
    with pytest.raises(runner.TrainingDiverged, match=r"NaN/Inf at step \d+; stopped without saving") as err:
        runner.train(exploding)
    diverged = int(re.search(r"step (\d+)", str(err.value)).group(1))
    latest = tf.train.latest_checkpoint(job)
    assert latest in str(err.value) and int(latest.rsplit("-", 1)[1]) < diverged
    assert Path(good + ".data-00000-of-00001").read_bytes() == before
    assert all(np.isfinite(w).all() for w in _weights(job))


def _task(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer.task", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last


def test_cli_errors_are_one_line(tmp_path, make_data_dir) -> None:
    _assert_one_line_error(_task("--job-dir", str(tmp_path / "job")), "--data_dir is missing")
    data_dir, _, _ = make_data_dir(tmp_path)
    _assert_one_line_error(_task("--data_dir", data_dir, "--data_prefix", "tiny", "--job_dir",
                                 str(tmp_path / "job"), "--unroll_steps", "5000"),
                           "--unroll_steps=5000", "--batch_size")


def test_user_errors_name_the_flag(tmp_path, make_data_dir) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)
    job = str(tmp_path / "job")
    with pytest.raises(UsageError, match="--data_prefix=nope: no .*nope.metadata.json"):
        runner.prepare_job(_hparams(data_dir, job).replace(data_prefix="nope"))
    with pytest.raises(UsageError, match="--language_model=word .* char-level"):
        runner.prepare_job(_hparams(data_dir, job, language_model="word"))
    runner.prepare_job(_hparams(data_dir, job))
    with pytest.raises(UsageError, match="another shape .*--layers: job dir has 1, flags give 2"):
        runner.prepare_job(_hparams(data_dir, job, layers=2))
    other_dir, _, _ = make_data_dir(tmp_path / "other", text="completely different words " * 90)
    with pytest.raises(UsageError, match="vocabulary .* differs"):
        runner.prepare_job(_hparams(other_dir, job))
    # Free hyperparameters may change between runs of one job dir.
    runner.prepare_job(_hparams(data_dir, job, learning_rate=0.1, unroll_steps=32))


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5]),
    ("cosine", [0.5, 1.0, 1.0, 0.8535534, 0.5]),
])
def test_learning_rate_schedules_with_warmup(schedule: str, expected: list[float]) -> None:
    rate = runner.LearningRate(1.0, schedule, warmup_steps=2, total_steps=6)
    np.testing.assert_allclose([float(rate(step)) for step in range(5)], expected, rtol=1e-5)


def test_decay_ends_at_the_floor() -> None:
    rate = runner.LearningRate(1.0, "cosine", warmup_steps=0, total_steps=4, floor=0.1)
    np.testing.assert_allclose([float(rate(step)) for step in (0, 2, 4, 9)], [1.0, 0.55, 0.1, 0.1], rtol=1e-5)


def test_weight_decay_is_adamw_on_matrices_only() -> None:
    hparams = HParams(weight_decay=0.5, adam_beta2=0.99, learning_rate=0.1, warmup_steps=0).validate()
    optimizer = runner.make_optimizer(hparams, total_steps=10)
    assert type(optimizer).__name__ == "AdamW"
    kernel = tf.Variable(tf.ones([2, 2]), name="kernel")
    bias = tf.Variable(tf.ones([2]), name="bias")
    optimizer.apply_gradients([(tf.zeros([2, 2]), kernel), (tf.zeros([2]), bias)])
    np.testing.assert_allclose(kernel.numpy(), 1.0 - 0.1 * 0.5)  # decayed with a zero gradient
    np.testing.assert_allclose(bias.numpy(), 1.0)
    assert float(optimizer.beta_2) == pytest.approx(0.99)
    with pytest.raises(ValueError, match="--weight_decay"):
        HParams(weight_decay=0.1, optimizer="sgd").validate()


def test_the_final_checkpoint_is_saved_before_the_final_sample(tmp_path, make_data_dir, monkeypatch) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)

    def failing_sample(self: object, step: int) -> None:
        raise RuntimeError("the sample failed")

    monkeypatch.setattr(runner._Trainer, "sample", failing_sample)
    with pytest.raises(RuntimeError, match="the sample failed"):
        runner.train(_hparams(data_dir, str(tmp_path / "job"), max_steps=5, save_checkpoints_steps=0))
    assert tf.train.latest_checkpoint(str(tmp_path / "job")).endswith("ckpt-5")
