"""Job-name rules (`%JOB%`) and the shape checks that protect an existing job dir."""

from __future__ import annotations

import pytest

from trainer.hparams import HParams, job_name, resolve_job_dirs, shape_mismatches


def _h(**changes: object) -> HParams:
    base = HParams(data_prefix="jules", language_model="word", layers=4, lstm_state_size=120)
    return base.replace(**changes)


def test_seed_form_of_the_job_name() -> None:
    assert job_name(_h()) == "jules-120-states-4-layers-word"
    assert job_name(_h(layer_norm=True)) == "jules-120-states-4-layers-norm-word"


def test_only_shape_changes_change_the_name() -> None:
    base = job_name(_h())
    for free in (dict(learning_rate=0.1), dict(unroll_steps=7), dict(epochs=9), dict(dropout=0.5),
                 dict(batch_size=3), dict(optimizer="sgd"), dict(max_steps=5)):
        assert job_name(_h(**free)) == base, free
    assert job_name(_h(cell="gru")) == base + "-gru"
    assert job_name(_h(embedding_size=64)) == base + "-emb64"
    assert job_name(_h(tie_embeddings=True)) == base + "-tied"


def test_resolve_replaces_job_in_both_dirs() -> None:
    resolved = resolve_job_dirs(_h(job_dir="gs://b/job/%JOB%", summary_dir="tb/%JOB%/x"))
    assert resolved.job_dir == "gs://b/job/jules-120-states-4-layers-word"
    assert resolved.summary_dir == "tb/jules-120-states-4-layers-word/x"


def test_job_name_needs_the_language_model() -> None:
    with pytest.raises(ValueError, match="language_model"):
        job_name(HParams(data_prefix="x"))


def test_shape_mismatches_name_the_flags() -> None:
    assert shape_mismatches(_h(), _h(learning_rate=1.0, unroll_steps=3)) == []
    assert shape_mismatches(_h(), _h(layers=2)) == ["--layers: job dir has 4, flags give 2"]


def test_hparams_json_round_trip_and_unknown_keys() -> None:
    h = _h(dropout=0.25)
    assert HParams.from_json(h.to_json()) == h
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        HParams.from_json('{"layerz": 3}')
