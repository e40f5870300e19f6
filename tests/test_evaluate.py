"""trainer.evaluate: the whole-split loss equals a direct numpy computation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from preprocessing import contract
from trainer import checkpoints, data, runner
from trainer.evaluate import evaluate
from trainer.hparams import HParams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_job(tmp_path_factory, make_data_dir_module) -> tuple[str, str]:
    tmp = tmp_path_factory.mktemp("evaluate")
    data_dir, prefix, _ = make_data_dir_module(tmp)
    hparams = HParams(data_dir=data_dir, data_prefix=prefix, job_dir=str(tmp / "job" / "%JOB%"),
                      layers=1, lstm_state_size=16, embedding_size=8, batch_size=4, unroll_steps=16,
                      max_steps=4, eval_every=2, save_checkpoints_steps=2, sample_every=0,
                      sample_length=5, log_every=2)
    return runner.train(hparams).job_dir, data_dir


def _split_ids(data_dir: str, split: str) -> np.ndarray:
    """The split's token stream, read with plain TFRecord parsing (not trainer.data)."""
    files = sorted(tf.io.gfile.glob(contract.shard_glob(data_dir, "tiny", split)))
    records = tf.data.TFRecordDataset(files, compression_type="GZIP").map(contract.parse_example)
    return np.concatenate([r.numpy() for r in records])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("eval_steps", [0, 2])
def test_evaluated_loss_equals_direct_computation(trained_job, eval_steps: int) -> None:
    job_dir, data_dir = trained_job
    result = evaluate(job_dir, split="valid", eval_steps=eval_steps)
    hparams, _, model = checkpoints.load_job(job_dir)
    ids = _split_ids(data_dir, "valid")
    layout = runner.eval_layout(len(ids), hparams, "valid")
    windows = eval_steps or layout.windows_per_epoch
    length = layout.windows_per_chunk * layout.unroll_steps + 1
    rows = ids[:layout.batch_size * length].reshape(layout.batch_size, length)
    steps = windows * layout.unroll_steps
    # One call over each whole stream: the windowed, state-carrying evaluation must agree.
    logits, _ = model(tf.constant(rows[:, :steps], tf.int32), model.initial_state(layout.batch_size))
    log_probs = _log_softmax(logits.numpy().astype(np.float64))
    nats = -np.take_along_axis(log_probs, rows[:, 1:steps + 1, None], axis=-1).sum()
    assert result["tokens"] == rows.shape[0] * steps
    np.testing.assert_allclose(result["loss"], nats / result["tokens"], rtol=1e-5)
    np.testing.assert_allclose(result["bpc"], result["loss"] / np.log(2), rtol=1e-9)
    saved = json.loads(Path(job_dir, "eval-valid.json").read_text())
    assert saved["loss"] == result["loss"]


def test_best_checkpoint_is_the_lowest_validation_loss(trained_job) -> None:
    job_dir, _ = trained_job
    best = evaluate(job_dir, split="valid", best=True, write=False)
    assert "/best/" in best["checkpoint"]
    latest = evaluate(job_dir, split="valid", write=False)
    assert best["loss"] <= latest["loss"] + 1e-9


def test_cli_resolves_job_and_writes_json(trained_job) -> None:
    job_dir, data_dir = trained_job
    job_pattern = str(Path(job_dir).parent / "%JOB%")
    done = subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", f"--job-dir={job_pattern}", f"--data_dir={data_dir}",
         "--data_prefix=tiny", "--layers=1", "--lstm_state_size=16", "--embedding_size=8",
         "--split=test", "--eval_steps=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("test: loss ")
    assert json.loads(Path(job_dir, "eval-test.json").read_text())["windows"] == 1
    missing = subprocess.run([sys.executable, "-m", "trainer.evaluate", f"--job-dir={data_dir}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1].startswith("error: --job-dir=")


def test_data_module_error_for_a_missing_split(trained_job, tmp_path) -> None:
    _, data_dir = trained_job
    with pytest.raises(Exception, match="no valid shards"):
        data.shard_files(str(tmp_path), "tiny", "valid")


def test_unroll_steps_is_honoured_and_a_too_long_one_names_the_fix(trained_job) -> None:
    job_dir, _ = trained_job
    assert evaluate(job_dir, split="test", unroll_steps=8, write=False)["unroll_steps"] == 8
    test_tokens = json.loads(Path(job_dir, "metadata.json").read_text())["splits"]["test"]["tokens"]
    done = subprocess.run([sys.executable, "-m", "trainer.evaluate", f"--job-dir={job_dir}",
                           "--split=test", "--unroll_steps=5000"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    # The split is cut into one stream, so the longest window that fits is the split minus one.
    assert done.stderr.strip().splitlines()[-1].endswith(f"use --unroll_steps <= {test_tokens - 1}")
