"""Every zoo cell through the real runner: trains with falling loss, checkpoints, resumes,
evaluates, samples and exports; plus the zoo's runner options (mLSTM weight norm by default,
--init_from, --word2vec_embedding, NT-ASGD, the cache pointer in trainer.evaluate)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from trainer import checkpoints, runner
from trainer.babble import generate_from_job
from trainer.cache_pointer import PointerConfig
from trainer.errors import UsageError
from trainer.evaluate import evaluate
from trainer.export import export_job, generate_with_saved_model
from trainer.flags import define_hparams_flags, hparams_from_flags
from trainer.hparams import HParams, job_name

TINY = dict(layers=1, lstm_state_size=16, embedding_size=8, d_model=16, heads=2, max_context=16,
            batch_size=4, unroll_steps=16, learning_rate=1e-2, eval_every=5, eval_steps=2,
            save_checkpoints_steps=5, sample_every=0, sample_length=8, log_every=5, mogrify_rounds=2)


def _data(make_data_dir, tmp_path, tokenizer: str = "char", **options: object) -> tuple[str, str, object]:
    return make_data_dir(tmp_path, tokenizer=tokenizer, **options)


def _hparams(data_dir: str, prefix: str, job_root: object, **changes: object) -> HParams:
    values = dict(TINY, data_dir=data_dir, data_prefix=prefix, job_dir=f"{job_root}/job/%JOB%")
    values.update(changes)
    return HParams(**values)


@pytest.mark.parametrize("cell", ["mlstm", "mogrifier", "qrnn", "transformer", "lstm+attention"])
def test_cell_trains_resumes_evaluates_samples_and_exports(cell, tmp_path, make_data_dir, capsys) -> None:
    # mLSTM's seed is byte-level; the others run on characters. "+attention": the attention head
    # over the recurrent stack (its buffer is state: checkpointed, sampled, exported).
    cell, _, head = cell.partition("+")
    data_dir, prefix, _ = _data(make_data_dir, tmp_path, "byte" if cell == "mlstm" else "char")
    changes = dict(cell=cell, weight_norm=cell == "mlstm", tie_embeddings=cell == "qrnn",
                   attention_window=6 if head else 0)
    first = runner.train(_hparams(data_dir, prefix, tmp_path, max_steps=5, **changes))
    assert ("-attn6" if head else f"-{cell}") in first.job_dir and first.step == 5
    second = runner.train(_hparams(data_dir, prefix, tmp_path, max_steps=10, **changes))
    assert "Resuming" in capsys.readouterr().out
    assert second.job_dir == first.job_dir and second.step == 10
    assert second.eval_loss < first.eval_loss  # it learns
    result = evaluate(second.job_dir, split="valid", eval_steps=2, write=False)
    assert result["step"] == 10
    # The restored checkpoint is the model that was evaluated in training: every weight saved.
    assert result["loss"] == pytest.approx(second.eval_loss, rel=1e-5)
    text = generate_from_job(second.job_dir, prime="Th", length=12, seed=3)[0]
    assert text.startswith("Th") and len(text) > 2
    exported = tf.saved_model.load(export_job(second.job_dir))
    assert generate_with_saved_model(exported, "Th", 12, seed=3)[0] == text


def test_mlstm_weight_norm_is_on_unless_the_user_says_otherwise() -> None:
    define_hparams_flags()
    try:
        flags.FLAGS(["prog", "--cell=mlstm"])
        on = hparams_from_flags()
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", "--cell=mlstm", "--noweight_norm"])
        off = hparams_from_flags()
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", "--cell=lstm"])
        lstm = hparams_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    assert on.weight_norm and not off.weight_norm and not lstm.weight_norm
    names = [job_name(h.replace(language_model="byte")) for h in (on, off)]
    assert names[0].endswith("-byte-mlstm-wn") and names[1].endswith("-byte-mlstm")


def test_init_from_fine_tunes_with_the_same_vocabulary_and_refuses_another(tmp_path, make_data_dir) -> None:
    data_dir, prefix, _ = _data(make_data_dir, tmp_path)
    base = runner.train(_hparams(data_dir, prefix, tmp_path / "a", cell="qrnn", max_steps=4))
    _, base_meta, base_model = checkpoints.load_job(base.job_dir)
    tuned = runner.train(_hparams(data_dir, prefix, tmp_path / "b", cell="qrnn", max_steps=1,
                                  init_from=base.job_dir, learning_rate=1e-9))
    # One step at a vanishing learning rate: the fine-tuned weights are the base weights.
    _, _, tuned_model = checkpoints.load_job(tuned.job_dir)
    for a, b in zip(base_model.get_weights(), tuned_model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    other_dir, other_prefix, _ = _data(make_data_dir, tmp_path / "other", text="xyz zyx " * 200,
                                       prefix="other")
    with pytest.raises(UsageError, match="--vocab_from"):
        runner.train(_hparams(other_dir, other_prefix, tmp_path / "c", cell="qrnn", max_steps=1,
                              init_from=base.job_dir))
    assert not (tmp_path / "c" / "job").exists() or not any((tmp_path / "c" / "job").rglob("hparams.json"))
    with pytest.raises(UsageError, match="another shape"):
        runner.train(_hparams(data_dir, prefix, tmp_path / "d", cell="qrnn", max_steps=1,
                              lstm_state_size=8, init_from=base.job_dir))
    assert base_meta.vocab  # the base job is untouched and still loadable


def test_word2vec_ntasgd_and_cache_pointer_through_the_runner(tmp_path, make_data_dir, capsys) -> None:
    text = "the king and the queen saw the king . " * 60 + "a zebra .\n"
    data_dir, prefix, metadata = _data(make_data_dir, tmp_path, "word", text=text)
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("3 8\n" + "\n".join(f"{w} " + " ".join(["0.25"] * 8) for w in ("the", "king", "moon")))
    hparams = _hparams(data_dir, prefix, tmp_path, cell="lstm", max_steps=8, optimizer="ntasgd",
                       learning_rate=1.0, word2vec_embedding=str(vectors), freeze_embedding=True,
                       weight_drop=0.2, dropout=0.1, ar_alpha=1.0, tar_beta=1.0, eval_every=2, eval_steps=2)
    result = runner.train(hparams)
    out = capsys.readouterr().out
    assert f"2/{metadata.vocab_size} vocabulary words found" in out
    _, _, model = checkpoints.load_job(result.job_dir)
    row = metadata.vocab.index("king")
    # Frozen: the pretrained row is still exactly the file's vector after training.
    np.testing.assert_array_equal(model.embedding.embeddings.numpy()[row], np.full(8, 0.25, np.float32))
    assert math.isfinite(result.eval_loss)
    plain = evaluate(result.job_dir, eval_steps=3, write=False, pointer=PointerConfig(lambdah=0.0, window=8))
    assert plain["pointer_loss"] == pytest.approx(plain["loss"], rel=1e-6)
    mixed = evaluate(result.job_dir, eval_steps=3, write=False, pointer=PointerConfig(lambdah=0.3, window=8))
    # The mixture itself is checked against a direct loop in test_cache_pointer.py; here the
    # pointer must reach trainer.evaluate and change the answer.
    assert math.isfinite(mixed["pointer_loss"]) and mixed["pointer_loss"] != mixed["loss"]
