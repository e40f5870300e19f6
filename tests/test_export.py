"""The exported SavedModel: written by training and by `python -m trainer.export`, loaded by a
Python that cannot import verne, and generating what babble generates for the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from generation_job import python_env, trained_job

from preprocessing.tokenizers import word_pieces
from trainer import checkpoints, export
from trainer.sampling import Generator, SamplingOptions, TextGenerator

# Runs in `python -S -I`: no site (so no editable-install finder for verne), no PYTHONPATH, no
# user site, cwd elsewhere; only site-packages is added back so TensorFlow itself imports.
CLEAN_CLIENT = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])
missing = [name for name in ("trainer", "preprocessing") if importlib.util.find_spec(name) is not None]
assert not missing, f"verne is importable here: {missing} ({sys.path})"
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[2])
out = loaded.signatures["generate"](
    prime=tf.constant("First Ciéizen"), length=tf.constant(40), temperature=tf.constant(0.8),
    top_k=tf.constant(0), top_p=tf.constant(1.0), seed=tf.constant(7, tf.int64),
    sample_mode=tf.constant(1), num_samples=tf.constant(2), no_unk=tf.constant(False))
log_probs = loaded.signatures["next_token_log_probs"](prime=tf.constant("First"))
print(json.dumps({"text": [t.decode("utf-8") for t in out["text"].numpy()],
                  "log_probs": log_probs["log_probs"].numpy().tolist(),
                  "vocab": [v.decode("utf-8") for v in log_probs["vocab"].numpy()]}))
"""


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "generation"


def test_export_cli_writes_a_savedmodel_that_loads_without_verne(root: Path, tmp_path: Path) -> None:
    job = trained_job(root, "char")
    export_dir = tmp_path / "exports" / "char"
    result = subprocess.run([sys.executable, "-m", "trainer.export", "--job-dir", job, "--export_dir",
                             str(export_dir)], capture_output=True, text=True, env=python_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(export_dir.parent) == ["char"], "no staging dir is left behind"
    site_packages = str(Path(tf.__file__).parents[1])
    result = subprocess.run([sys.executable, "-S", "-I", "-c", CLEAN_CLIENT, site_packages, str(export_dir)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**python_env(), "PYTHONNOUSERSITE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])

    _, metadata, model = checkpoints.load_job(job)
    expected = TextGenerator(model, metadata).generate("First Ciéizen", 40, SamplingOptions(0.8, seed=7), 2)
    assert served["text"] == expected
    assert served["vocab"] == list(metadata.vocab)
    ids = [metadata.vocab.index(c) for c in "First"]
    logits, _ = model(tf.constant([ids]), model.initial_state(1))
    np.testing.assert_allclose(served["log_probs"], tf.nn.log_softmax(logits[0, -1]).numpy(), atol=1e-4)


def test_training_exports_a_word_model_that_generates_the_generators_tokens(root: Path) -> None:
    job = trained_job(root, "word")
    export_dir = checkpoints.join(job, export.EXPORT_DIR)
    assert (Path(export_dir) / "saved_model.pb").exists(), "trainer.runner exports at the end of training"
    loaded = tf.saved_model.load(export_dir)
    prime = "You are, zebra!\nAll"
    texts = export.generate_with_saved_model(loaded, prime, 30, temperature=1.2, seed=3, num_samples=3)
    out = loaded.signatures["generate"](
        prime=tf.constant(prime), length=tf.constant(30), temperature=tf.constant(1.2), top_k=tf.constant(0),
        top_p=tf.constant(1.0), seed=tf.constant(3, tf.int64), sample_mode=tf.constant(1),
        num_samples=tf.constant(3), no_unk=tf.constant(False))

    _, metadata, model = checkpoints.load_job(job)
    text_generator = TextGenerator(model, metadata)
    ids = text_generator.encode_prime(prime).ids
    tokens = Generator(model, metadata.vocab, "word", metadata.unk_id).generate(
        ids, 30, SamplingOptions(1.2, seed=3), batch_size=3)
    np.testing.assert_array_equal(out["tokens"].numpy(), tokens)
    assert all(text.startswith(prime) for text in texts)
    # Spacing in TF follows the tokenizer's decoder (straight quotes aside; this vocab has none).
    assert texts == text_generator.generate(prime, 30, SamplingOptions(1.2, seed=3), 3)


def test_word_pieces_in_tensorflow_match_the_tokenizer() -> None:
    text = ("Dr. O'Neill's café—3,000 “people” (10:30) said: don't!\n\n  Über_alles_ & co.\t"
            "naïve 3.14 x\u00a0y <unk> end")
    tf_pieces = [p.decode("utf-8") for p in export.word_pieces(tf.constant(text)).numpy()]
    assert tf_pieces == word_pieces(text)
