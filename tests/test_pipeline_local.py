"""The whole pipeline run by kfp.local on a tiny corpus, and both branches of its quality gate.

Two runs of the real pipeline, shared by the tests of this module: preprocess → train (a few
steps) → evaluate → sample + publish with a threshold every model passes, and preprocess → train
→ evaluate → not-published with one nothing passes (this one with a learned bpe tokenizer, so
the pipeline is shown to take one with no other change). Each step is a subprocess that pays a
TensorFlow import, so there are no more runs than that.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from pipelines import run, steps
from pipelines.pipeline import create_gate_pipeline

NEEDED = ("preprocessing.run", "trainer.runner", "trainer.evaluate", "trainer.sampling")
MISSING = [name for name in NEEDED if importlib.util.find_spec(name) is None]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (not written yet)")]

BOOK = ("ROMEO. But soft, what light through yonder window breaks?\n"
        "It is the east, and Juliet is the sun.\n\n"
        "JULIET. O Romeo, Romeo, wherefore art thou Romeo?\n"
        "Deny thy father and refuse thy name.\n\n") * 12
TINY_MODEL = ["--layers", "1", "--lstm_state_size", "16", "--embedding_size", "8",
              "--unroll_steps", "16", "--batch_size", "4", "--max_steps", "3",
              "--save_checkpoints_steps", "3", "--eval_every", "3", "--log_every", "1",
              "--sample_every", "0"]


def artifacts_by_task(run_dir: str) -> dict[str, run.LocalArtifact]:
    return {f"{a.task}/{a.name}": a for a in run.local_artifacts(run_dir)}


def run_pipeline(base: Path, quality_threshold: float, *argv: str) -> dict[str, Any]:
    """One local run of the full pipeline on the tiny book; its root, run dir and printout."""
    (base / "books").mkdir()
    (base / "books" / "play.txt").write_text(BOOK, encoding="utf-8")
    root = base / "root"
    printed = io.StringIO()
    with mock.patch.dict(os.environ), contextlib.redirect_stdout(printed):
        run.main(["pipelines.run", "--local", "--pipeline_root", str(root),
                  "--corpus", str(base / "books" / "*.txt"), "--data_prefix", "play",
                  "--preprocess_arg=--valid_fraction=0.1", "--preprocess_arg=--test_fraction=0.1",
                  *TINY_MODEL, "--quality_threshold", str(quality_threshold), *argv])
    runs = [p for p in root.iterdir() if p.name.startswith("verne-train-")]
    assert len(runs) == 1
    return {"root": root, "run_dir": str(runs[0]), "printed": printed.getvalue()}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_pipeline(tmp_path_factory.mktemp("pipeline"), 1000, "--num_samples", "2",
                        "--generate_length", "30", "--prime", "ROMEO.")


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # No model gets below 0.5 bits per character (or per bpe piece) after three steps.
    return run_pipeline(tmp_path_factory.mktemp("failing"), 0.5, "--tokenizer", "bpe",
                        "--preprocess_arg=--vocab_size=300")


def summary_tags(directory: Path) -> set[str]:
    import tensorflow as tf

    return {value.tag for path in directory.rglob("events.out.tfevents.*")
            for event in tf.compat.v1.train.summary_iterator(str(path))
            for value in event.summary.value}


def test_every_step_leaves_its_artifact(local_run: dict[str, Any]) -> None:
    found = artifacts_by_task(local_run["run_dir"])
    assert set(found) == {"preprocess/dataset", "train/model", "evaluate/metrics",
                          "sample/samples", "publish/published"}

    data_dir = Path(found["preprocess/dataset"].uri)
    assert (data_dir / "play.metadata.json").is_file() and (data_dir / "play.vocab.txt").is_file()
    assert list(data_dir.glob("play.train-*-of-*.tfrecord.gz"))
    assert found["preprocess/dataset"].metadata["vocab_size"] > 20

    job_dir = Path(found["train/model"].uri)
    assert (job_dir / "hparams.json").is_file()
    assert (job_dir / "checkpoint").is_file()
    hparams = json.loads((job_dir / "hparams.json").read_text())
    assert (hparams["layers"], hparams["lstm_state_size"], hparams["data_prefix"]) == (1, 16, "play")
    assert found["train/model"].metadata["step"] == 3

    samples = Path(found["sample/samples"].uri).read_text()
    assert samples.count("## Sample ") == 2
    assert samples.count("ROMEO.") >= 2  # each sample starts with the prime

    # Everything the runner printed points at the artifacts.
    for key, artifact in found.items():
        assert f"{key}: {artifact.uri}" in local_run["printed"]


def test_metrics_are_what_trainer_evaluate_gives(local_run: dict[str, Any]) -> None:
    from trainer.evaluate import evaluate

    found = artifacts_by_task(local_run["run_dir"])
    logged = found["evaluate/metrics"].metadata
    expected = evaluate(found["train/model"].uri, split="test", best=False, write=False)
    for name in ("loss", "perplexity", "bpc", "loss_per_char", "bits_per_char"):
        assert logged[name] == pytest.approx(expected[name], rel=1e-6)
    assert logged["tokens"] == expected["tokens"]


def test_evaluation_leaves_the_trained_model_as_it_was(local_run: dict[str, Any]) -> None:
    # The model is the train step's artifact: evaluate reads it, and its scores live in its own
    # Metrics artifact only (trainer.evaluate would otherwise add eval-test.json and test/ scalars).
    found = artifacts_by_task(local_run["run_dir"])
    job_dir = Path(found["train/model"].uri)
    assert not list(job_dir.rglob("eval-*.json"))
    tags = summary_tags(job_dir)
    assert tags, "training wrote no TensorBoard summaries to look at"
    assert not [tag for tag in tags if tag.startswith("test")]
    assert found["evaluate/metrics"].metadata["split"] == "test"


def test_a_model_that_passes_the_gate_is_published(local_run: dict[str, Any]) -> None:
    found = artifacts_by_task(local_run["run_dir"])
    published = Path(found["publish/published"].uri)
    job_name = found["train/model"].metadata["job_name"]
    assert published.parent == local_run["root"] / "models" / job_name
    manifest = json.loads((published / steps.PUBLISHED_MANIFEST).read_text())
    job_dir = Path(found["train/model"].uri)
    copied = sorted(str(p.relative_to(job_dir)) for p in job_dir.rglob("*") if p.is_file())
    assert set(copied) <= set(manifest["files"])
    assert all((published / name).read_bytes() == (job_dir / name).read_bytes() for name in copied)
    assert all((published / name).is_file() for name in manifest["files"])
    assert manifest["metrics"]["bpc"] == found["evaluate/metrics"].metadata["bpc"]

    # The published SavedModel serves without verne's model code.
    import tensorflow as tf

    from trainer.export import generate_with_saved_model

    loaded = tf.saved_model.load(str(published / manifest["saved_model"]))
    texts = generate_with_saved_model(loaded, "ROMEO.", 5, temperature=0.0, num_samples=2)
    assert len(texts) == 2 and all(text.startswith("ROMEO.") for text in texts)


def test_a_model_that_fails_the_gate_is_not_published(failing_run: dict[str, Any]) -> None:
    found = artifacts_by_task(failing_run["run_dir"])
    assert set(found) == {"preprocess/dataset", "train/model", "evaluate/metrics",
                          "not-published/report"}
    assert found["preprocess/dataset"].metadata["tokenizer"] == "bpe"
    assert (Path(found["train/model"].uri) / "play.tokenizer.model").is_file()
    metrics = found["evaluate/metrics"].metadata
    bpc = metrics["bpc"]  # bits per bpe piece
    assert bpc >= 0.5 and 0 < metrics["bits_per_char"] < bpc
    report = found["not-published/report"]
    assert {k: v for k, v in report.metadata.items() if k != "display_name"} == {
        "metric": "bpc", "value": bpc, "threshold": 0.5}
    text = Path(report.uri).read_text()
    assert "Not published" in text and f"{bpc:.6g}" in text and found["train/model"].uri in text
    assert not (failing_run["root"] / "models").exists()
    assert f"not-published/report: {report.uri}" in failing_run["printed"]


def test_the_gate_alone_rejects_a_trained_model(local_run: dict[str, Any], tmp_path: Path) -> None:
    # create_gate_pipeline: the same gate (add_quality_gate) on an existing job dir and scores,
    # with a threshold nothing beats.
    found = artifacts_by_task(local_run["run_dir"])
    scores = found["evaluate/metrics"].metadata
    models = tmp_path / "models"
    with mock.patch.dict(os.environ):
        run_dir = run.run_local(create_gate_pipeline(), {
            "job_dir": found["train/model"].uri, "job_name": found["train/model"].metadata["job_name"],
            "publish_uri": str(models), "loss": scores["loss"], "perplexity": scores["perplexity"],
            "bpc": scores["bpc"], "quality_threshold": 0.5}, str(tmp_path / "root"))
    gate = artifacts_by_task(run_dir)
    assert set(gate) == {"not-published/report"}
    report = Path(gate["not-published/report"].uri).read_text()
    assert "Not published" in report and "bpc" in report and "0.5" in report
    assert not models.exists()


def test_a_published_model_is_never_overwritten(local_run: dict[str, Any]) -> None:
    found = artifacts_by_task(local_run["run_dir"])
    published = Path(found["publish/published"].uri)
    manifest = (published / steps.PUBLISHED_MANIFEST).read_text()
    with pytest.raises(steps.UsageError, match="already a published model"):
        steps.publish(found["train/model"].uri, str(published), {"bpc": 0.0})
    assert (published / steps.PUBLISHED_MANIFEST).read_text() == manifest
