"""Option checks of the runner and HParams: checkpoint cadence, refused flags, mLSTM defaults,
the replica split of --batch_size, --init_from without a checkpoint, a too-short valid split and
the pure model build under --precision=auto."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import tensorflow as tf
from absl import flags

from trainer import hparams as hparams_module
from trainer import runner
from trainer.errors import UsageError
from trainer.flags import define_hparams_flags, hparams_from_flags
from trainer.hparams import HParams, job_name, shape_mismatches
from trainer.models import build_model


def _hparams(data_dir: str, job_dir: Path, **changes: object) -> HParams:
    values = dict(data_dir=data_dir, data_prefix="tiny", job_dir=str(job_dir), layers=1,
                  lstm_state_size=8, embedding_size=4, batch_size=4, unroll_steps=16, eval_every=0,
                  sample_every=0, sample_length=4, log_every=5)
    values.update(changes)
    return HParams(**values)


@pytest.mark.parametrize("changes,message", [
    (dict(save_checkpoints_steps=-1), "--save_checkpoints_steps=-1: must be >= 0"),
    (dict(mogrify_rounds=-2), "--mogrify_rounds=-2: must be >= 0"),
    (dict(mogrify_rank=-1), "--mogrify_rank=-1: must be >= 0"),
    (dict(cell="qrnn", layer_norm=True), "--layer_norm: --cell=qrnn has no layer-norm variant"),
    (dict(cell="mlstm", layer_norm=True), "--layer_norm: --cell=mlstm"),
    (dict(cell="mogrifier", layer_norm=True), "--layer_norm: --cell=mogrifier"),
    (dict(cell="transformer", layer_norm=True), "--cell=transformer has no layer-norm variant .it always"),
])
def test_out_of_range_and_ignored_options_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HParams(**changes).validate()


def test_layer_norm_is_a_shape_field_only_where_it_exists() -> None:
    for cell in ("lstm", "gru", "rnn"):
        HParams(cell=cell, layer_norm=True).validate()
        assert job_name(HParams(cell=cell, layer_norm=True, language_model="char")).count("-norm-") == 1
    # A job dir of another cell saved before the check compares equal without the flag.
    saved = HParams(cell="qrnn", layer_norm=True, language_model="char")
    assert shape_mismatches(saved, saved.replace(layer_norm=False)) == []
    assert "-norm" not in job_name(saved)


def test_zero_save_steps_saves_only_at_the_end(tmp_path, make_data_dir) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)
    result = runner.train(_hparams(data_dir, tmp_path / "job", max_steps=3, save_checkpoints_steps=0))
    assert result.step == 3
    assert tf.train.get_checkpoint_state(result.job_dir).all_model_checkpoint_paths == [
        f"{result.job_dir}/ckpt-3"]


def test_code_built_hparams_get_one_line_errors_before_anything_is_written(tmp_path, make_data_dir) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)
    with pytest.raises(UsageError, match="--layer_norm: --cell=qrnn"):
        runner.prepare_job(_hparams(data_dir, tmp_path / "a", cell="qrnn", layer_norm=True))
    three = types.SimpleNamespace(num_replicas_in_sync=3)  # all the check reads of a strategy
    with pytest.raises(UsageError, match="--batch_size=4 does not split over 3 replicas"):
        runner.prepare_job(_hparams(data_dir, tmp_path / "b"), three)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    runner.prepare_job(_hparams(data_dir, tmp_path / "c", batch_size=6), three)


def test_init_from_a_job_without_checkpoint_names_init_from(tmp_path, make_data_dir) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)
    source = tmp_path / "source"
    runner.prepare_job(_hparams(data_dir, source))  # hparams.json and metadata.json, no ckpt-N
    with pytest.raises(UsageError, match=f"^--init_from={source}: no checkpoint there"):
        runner.prepare_job(_hparams(data_dir, tmp_path / "tuned", init_from=str(source)))
    assert not (tmp_path / "tuned").exists()


def test_a_valid_split_too_short_turns_evaluation_off_in_one_line(tmp_path, make_data_dir, capsys) -> None:
    data_dir, _, metadata = make_data_dir(tmp_path, splits=(0.9, 0.004, 0.096))
    assert metadata.splits["valid"].tokens < 17
    result = runner.train(_hparams(data_dir, tmp_path / "job", max_steps=2, eval_every=1))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Evaluation is off")]
    assert len(lines) == 1 and f"has {metadata.splits['valid'].tokens} tokens" in lines[0]
    assert "--unroll_steps=16" in lines[0]
    assert result.eval_loss is None and not (Path(result.job_dir) / "best").exists()


@pytest.fixture
def trainer_flags():
    define_hparams_flags()

    def parse(*args: str) -> HParams:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", *args])
        return hparams_from_flags()

    yield parse
    flags.FLAGS.unparse_flags()


def test_mlstm_decays_linearly_unless_told_otherwise(trainer_flags) -> None:
    assert trainer_flags("--cell=mlstm").lr_schedule == "linear"
    assert trainer_flags("--cell=mlstm", "--lr_schedule=cosine").lr_schedule == "cosine"
    assert trainer_flags("--cell=mlstm", "--nolr_decay").lr_schedule == "constant"
    assert trainer_flags("--cell=mlstm", "--decay_rate=0.9").lr_schedule == "cosine"
    assert trainer_flags("--cell=lstm").lr_schedule == "constant"
    assert trainer_flags("--cell=lstm", "--lr_decay").lr_schedule == "linear"


def test_building_a_model_with_precision_auto_reads_nothing_of_the_machine(monkeypatch) -> None:
    def machine(*args: object) -> object:
        raise AssertionError("build_model looked at the machine")

    monkeypatch.setattr(hparams_module, "cpu_flags", machine)
    monkeypatch.setattr(tf.config, "list_physical_devices", machine)
    small = HParams(vocab_size=5, layers=1, lstm_state_size=4, embedding_size=3)
    assert small.precision == "auto"
    assert build_model(small).compute_dtype_ == tf.float32
    assert build_model(small.replace(precision="bfloat16")).compute_dtype_ == tf.bfloat16
