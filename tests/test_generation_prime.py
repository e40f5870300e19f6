"""Primes are normalised as the corpus was (NFC, LF, lowercase) in babble/serve and in the export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from preprocessing import tokenizers
from trainer import export
from trainer.hparams import HParams
from trainer.models import build_model
from trainer.sampling import SamplingOptions, TextGenerator

# A --lowercase corpus: preprocessing lowercased it, so the vocabulary has no capitals.
CORPUS = "first citizen:\nbefore we proceed, hear me speak. the café is open.\n\n" * 4


def lowercase_model(make_data_dir, tmp_path: Path, kind: str) -> tuple:
    _, _, metadata = make_data_dir(tmp_path, CORPUS, kind)
    metadata = dataclasses.replace(metadata, lowercase=True)  # as preprocessing --lowercase writes it
    model = build_model(HParams(language_model=kind, vocab_size=metadata.vocab_size, layers=1,
                                lstm_state_size=8, embedding_size=4, precision="float32"))
    return metadata, model


@pytest.mark.parametrize("kind", ["char", "word"])
def test_prime_is_lowercased_nfc_and_lf_like_the_corpus(make_data_dir, tmp_path: Path, kind: str) -> None:
    metadata, model = lowercase_model(make_data_dir, tmp_path, kind)
    assert "T" not in "".join(metadata.vocab), "the test needs a vocabulary without capitals"
    prime = "The Cafe\u0301 IS open.\r\nFirst"  # decomposed é, CRLF, capitals
    encoded = TextGenerator(model, metadata).encode_prime(prime)
    assert encoded.unknown == []
    assert encoded.ids == tokenizers.tokenizer_from_metadata(metadata).encode(prime)
    assert metadata.unk_id not in encoded.ids


def test_babble_and_the_export_read_a_capitalised_prime_alike(make_data_dir, tmp_path: Path) -> None:
    metadata, model = lowercase_model(make_data_dir, tmp_path, "char")
    loaded = tf.saved_model.load(export.export_model(model, metadata, str(tmp_path / "export")))
    prime = "The Citizen\r\nSpeaks"
    texts = export.generate_with_saved_model(loaded, prime, 30, temperature=1.0, seed=3, num_samples=2)
    assert texts == TextGenerator(model, metadata).generate(prime, 30, SamplingOptions(1.0, seed=3), 2)
    ids = TextGenerator(model, metadata).encode_prime(prime).ids
    logits, _ = model(tf.constant([ids]), model.initial_state(1))
    served = loaded.signatures["next_token_log_probs"](prime=tf.constant([prime]))["log_probs"][0]
    np.testing.assert_allclose(served.numpy(), tf.nn.log_softmax(logits[0, -1]).numpy(), atol=1e-5)
