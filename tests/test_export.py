"""The exported SavedModel: written by training and by `python -m trainer.export`, loaded by a
Python that cannot import verne, and generating what babble generates for the same seed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from generation_job import MODEL, autograph_conversions, python_env, trained_job

from preprocessing.tokenizers import word_pieces
from trainer import checkpoints, export, kernels
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
log_probs = loaded.signatures["next_token_log_probs"](prime=tf.constant(["First", "All"]))

# What TF Serving does with a Vertex AI `{"instances": [...]}` body (row format): each named
# input is the instances' values stacked along a new leading dimension, typed by the signature.
request = json.loads(sys.argv[3])
serving = loaded.signatures["serving_default"]
specs = serving.structured_input_signature[1]
assert set(specs) == set(request["instances"][0]), (sorted(specs), request["instances"][0])
assert all(spec.shape.as_list() == [None] for spec in specs.values()), specs
tensors = {name: tf.constant([row[name] for row in request["instances"]], spec.dtype)
           for name, spec in specs.items()}
rows = serving(**tensors)
# The row-format response splits every output along its first dimension, one per instance.
assert all(int(t.shape[0]) == len(request["instances"]) for t in rows.values()), rows
print(json.dumps({"text": [t.decode("utf-8") for t in out["text"].numpy()],
                  "log_probs": log_probs["log_probs"].numpy().tolist(),
                  "vocab": [[v.decode("utf-8") for v in row] for row in log_probs["vocab"].numpy()],
                  "rows": [t.decode("utf-8") for t in rows["text"].numpy()],
                  "row_tokens": rows["tokens"].numpy().tolist()}))
"""
# A Vertex AI prediction request: one object per instance, every input named.
VERTEX_REQUEST = {"instances": [
    {"prime": "First Ciéizen", "length": 40, "temperature": 0.8, "top_k": 0, "top_p": 1.0,
     "seed": 7, "sample_mode": 1, "no_unk": False},
    {"prime": "All", "length": 25, "temperature": 1.3, "top_k": 5, "top_p": 0.9,
     "seed": 11, "sample_mode": 2, "no_unk": True},
    # NFD (as macOS input often is): the graph composes it (NFC) as babble does, or the ids differ.
    {"prime": "Cafe\u0301 Cie\u0301izen", "length": 30, "temperature": 0.9, "top_k": 0, "top_p": 1.0,
     "seed": 5, "sample_mode": 1, "no_unk": False},
]}


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "generation"


def test_export_cli_writes_a_savedmodel_that_loads_without_verne(root: Path, tmp_path: Path) -> None:
    job = trained_job(root, "char")
    # A job dir alone, found through %JOB% without --data_dir: the data may be long gone.
    shutil.copytree(job, tmp_path / "job" / Path(job).name)
    shape = [f"--{name}={value}" for name, value in MODEL.items()]
    export_dir = tmp_path / "exports" / "char"
    pattern = str(tmp_path / "job" / "%JOB%")
    result = subprocess.run([sys.executable, "-m", "trainer.export", "--job-dir", pattern,
                             "--data_prefix", "tiny", *shape, "--export_dir", str(export_dir)],
                            capture_output=True, text=True, env=python_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(export_dir.parent) == ["char"], "no staging dir is left behind"
    site_packages = str(Path(tf.__file__).parents[1])
    result = subprocess.run([sys.executable, "-S", "-I", "-c", CLEAN_CLIENT, site_packages, str(export_dir),
                             json.dumps(VERTEX_REQUEST)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**python_env(), "PYTHONNOUSERSITE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])

    _, metadata, model = checkpoints.load_job(job)
    generator = TextGenerator(model, metadata)
    expected = generator.generate("First Ciéizen", 40, SamplingOptions(0.8, seed=7), 2)
    assert served["text"] == expected
    # Each instance is generated with its own prime, length and options, as babble would alone.
    for row, tokens, instance in zip(served["rows"], served["row_tokens"], VERTEX_REQUEST["instances"],
                                     strict=True):
        options = {k: instance[k] for k in ("temperature", "top_k", "top_p", "seed", "sample_mode", "no_unk")}
        (alone,) = generator.generate(instance["prime"], instance["length"], SamplingOptions(**options))
        assert row == alone
        assert len(tokens) == 40 and tokens[instance["length"]:] == [-1] * (40 - instance["length"])
    assert served["rows"][0] == expected[0], "row 0 of a batch is the same sample"
    assert served["vocab"] == [list(metadata.vocab)] * 2
    for prime, log_probs in zip(["First", "All"], served["log_probs"], strict=True):
        ids = [metadata.vocab.index(c) for c in prime]
        with kernels.portable():  # the SavedModel's kernels (native ones differ by bf16 rounding)
            logits, _ = model(tf.constant([ids]), model.initial_state(1))
        np.testing.assert_allclose(log_probs, tf.nn.log_softmax(logits[0, -1]).numpy(), atol=1e-4)


def test_byte_export_returns_valid_utf8_for_a_non_ascii_prime(root: Path, tmp_path: Path) -> None:
    job = trained_job(root, "byte")
    _, metadata, model = checkpoints.load_job(job)
    loaded = tf.saved_model.load(export.export_model(model, metadata, str(tmp_path / "byte")))
    prime = "Ciéizen, ça va — ünïcode?\r\nAll"
    # Hot sampling from a barely trained byte model writes bytes that are not UTF-8.
    texts = export.generate_with_saved_model(loaded, prime, 80, temperature=2.0, seed=5, num_samples=4)
    out = _generate_signature(loaded, prime, length=80, temperature=2.0, seed=5, num_samples=4)
    raw = [bytes(row) for row in out["tokens"].numpy().tolist()]
    assert any(_invalid_utf8(b) for b in raw), "the test needs invalid byte sequences to mean anything"
    for text, tokens in zip(out["text"].numpy(), raw, strict=True):
        text.decode("utf-8")  # strict: raises on anything but valid UTF-8
        assert text == prime.encode("utf-8") + tokens.decode("utf-8", errors="replace").encode("utf-8")
    # The prime is normalised (CRLF -> LF) as babble normalises it, so both generate the same.
    ids = TextGenerator(model, metadata).encode_prime(prime).ids
    assert bytes(ids) == prime.replace("\r\n", "\n").encode("utf-8")
    tokens = Generator(model, metadata.vocab, "byte").generate(ids, 80, SamplingOptions(2.0, seed=5), 4)
    np.testing.assert_array_equal(out["tokens"].numpy(), tokens)
    assert texts == TextGenerator(model, metadata).generate(prime, 80, SamplingOptions(2.0, seed=5), 4)


def _generate_signature(loaded: object, prime: str, length: int, temperature: float, seed: int,
                        num_samples: int) -> dict[str, tf.Tensor]:
    """The `generate` signature called as a serving client would: every input, as tensors."""
    return loaded.signatures["generate"](
        prime=tf.constant(prime), length=tf.constant(length), temperature=tf.constant(temperature),
        top_k=tf.constant(0), top_p=tf.constant(1.0), seed=tf.constant(seed, tf.int64),
        sample_mode=tf.constant(1), num_samples=tf.constant(num_samples), no_unk=tf.constant(False))


def _invalid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_training_exports_a_word_model_that_generates_the_generators_tokens(root: Path) -> None:
    job = trained_job(root, "word")
    export_dir = checkpoints.join(job, export.EXPORT_DIR)
    assert (Path(export_dir) / "saved_model.pb").exists(), "trainer.runner exports at the end of training"
    loaded = tf.saved_model.load(export_dir)
    prime = "You are, zebra!\nAll"
    texts = export.generate_with_saved_model(loaded, prime, 30, temperature=1.2, seed=3, num_samples=3)
    out = _generate_signature(loaded, prime, length=30, temperature=1.2, seed=3, num_samples=3)

    _, metadata, model = checkpoints.load_job(job)
    text_generator = TextGenerator(model, metadata)
    ids = text_generator.encode_prime(prime).ids
    tokens = Generator(model, metadata.vocab, "word", metadata.unk_id).generate(
        ids, 30, SamplingOptions(1.2, seed=3), batch_size=3)
    np.testing.assert_array_equal(out["tokens"].numpy(), tokens)
    assert all(text.startswith(prime) for text in texts)
    # Spacing in TF follows the tokenizer's decoder (straight quotes aside; this vocab has none).
    assert texts == text_generator.generate(prime, 30, SamplingOptions(1.2, seed=3), 3)


def test_the_export_traces_the_model_steps_once_without_autograph(root: Path, tmp_path: Path) -> None:
    """Tracing is most of an export's time, which a --time_budget run keeps free at its end:
    serving_default calls generate's graph, and generate and next_token_log_probs one graph of the
    primed model, rather than tracing the model steps again."""
    _, metadata, model = checkpoints.load_job(trained_job(root, "char"))
    traces, call = [], model.call
    model.call = lambda *args, **kwargs: traces.append(args) or call(*args, **kwargs)
    with autograph_conversions() as converted:
        export.export_model(model, metadata, str(tmp_path / "export"))
    # The prime's first step, its loop and the generation loop, once for all three signatures.
    assert len(traces) == 3
    assert converted == []


def test_word_pieces_in_tensorflow_match_the_tokenizer() -> None:
    text = ("Dr. O'Neill's café—3,000 “people” (10:30) said: don't!\n\n  Über_alles_ & co.\t"
            "naïve 3.14 x\u00a0y <unk> end")
    tf_pieces = [p.decode("utf-8") for p in export.word_pieces(tf.constant(text)).numpy()]
    assert tf_pieces == word_pieces(text)
