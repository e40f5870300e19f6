"""Pretrained word vectors: word2vec text and binary (gensim's formats), GloVe, found-count, errors."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from trainer.embeddings import load_embedding
from trainer.errors import UsageError

VOCAB = ("<unk>", "the", "King", "queen", "zebra")
VECTORS = {"the": [0.5, -1.0, 2.0], "king": [1.0, 2.0, 3.0], "queen": [-0.25, 0.0, 4.5],
           "unused": [9.0, 9.0, 9.0]}


def _write_text(path: pathlib.Path, header: bool) -> None:
    lines = [f"{len(VECTORS)} 3"] if header else []
    lines += [word + " " + " ".join(repr(v) for v in vec) for word, vec in VECTORS.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _write_binary(path: pathlib.Path) -> None:
    """The layout gensim's `save_word2vec_format(binary=True)` writes."""
    body = f"{len(VECTORS)} 3\n".encode()
    for word, vec in VECTORS.items():
        body += word.encode("utf-8") + b" " + np.asarray(vec, dtype="<f4").tobytes() + b"\n"
    path.write_bytes(body)


@pytest.mark.parametrize("kind", ["word2vec_text", "glove", "binary", "binary_no_suffix"])
def test_loads_every_format_and_counts_found_words(tmp_path: pathlib.Path, kind: str) -> None:
    path = tmp_path / {"binary": "v.bin", "binary_no_suffix": "v.w2v"}.get(kind, "v.txt")
    if kind.startswith("binary"):
        _write_binary(path)
    else:
        _write_text(path, header=kind == "word2vec_text")
    initial = np.arange(15, dtype=np.float32).reshape(5, 3)
    loaded = load_embedding(str(path), VOCAB, initial)
    assert loaded.found == 3  # the, King (via lower case), queen
    np.testing.assert_array_equal(loaded.matrix[1], VECTORS["the"])
    np.testing.assert_array_equal(loaded.matrix[2], VECTORS["king"])
    np.testing.assert_array_equal(loaded.matrix[3], VECTORS["queen"])
    # Missing words keep their initial rows.
    np.testing.assert_array_equal(loaded.matrix[[0, 4]], initial[[0, 4]])
    assert "3/5 vocabulary words found" in loaded.report(str(path))


def test_wrong_dimension_names_the_flag_and_the_fix(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "v.txt"
    _write_text(path, header=True)
    with pytest.raises(UsageError, match="--embedding_size=3"):
        load_embedding(str(path), VOCAB, np.zeros((5, 8), np.float32))


def test_missing_and_truncated_files_are_one_line_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        load_embedding(str(tmp_path / "nope.bin"), VOCAB, np.zeros((5, 3), np.float32))
    path = tmp_path / "cut.bin"
    _write_binary(path)
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(UsageError, match="truncated"):
        load_embedding(str(path), VOCAB, np.zeros((5, 3), np.float32))
