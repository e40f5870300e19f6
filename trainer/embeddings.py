"""Pretrained word vectors for `--word2vec_embedding FILE` (word models).

Reads the formats gensim's `KeyedVectors.load_word2vec_format` reads and writes:
- word2vec text: a header `COUNT DIM`, then `word v1 ... vDIM` per line;
- GloVe text: the same lines without the header;
- word2vec binary (`binary=True`): the header line, then per word its UTF-8 bytes, a space and
  DIM little-endian float32s (a newline between records is optional).
Binary is recognised by the `.bin` suffix or by content that is not text. Only the vocabulary's
words are kept, so a multi-gigabyte file costs one streaming pass and little memory. A word
missing from the file keeps the embedding's own initial value; the found count is reported.
Any gs:// path TensorFlow can read works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

from trainer.errors import UsageError

_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Loaded:
    matrix: np.ndarray  # [V, DIM], the initial matrix with found rows replaced
    found: int  # vocabulary entries that received a pretrained vector
    vocab_size: int

    def report(self, path: str) -> str:
        share = 100.0 * self.found / max(self.vocab_size, 1)
        return (f"--word2vec_embedding={path}: {self.found}/{self.vocab_size} vocabulary words "
                f"found ({share:.1f}%)")


class _Bytes:
    """Buffered byte reader over a tf.io.gfile file (gfile reads are slow in small pieces)."""

    def __init__(self, handle: tf.io.gfile.GFile) -> None:
        self.handle, self.buffer, self.offset = handle, b"", 0

    def _fill(self, wanted: int) -> None:
        while len(self.buffer) - self.offset < wanted:
            chunk = self.handle.read(_CHUNK)
            if not chunk:
                return
            self.buffer = self.buffer[self.offset:] + chunk
            self.offset = 0

    def read(self, size: int) -> bytes:
        self._fill(size)
        data = self.buffer[self.offset:self.offset + size]
        self.offset += len(data)
        return data

    def read_until(self, stop: bytes) -> bytes:
        """Bytes up to (not including) `stop`, which is consumed; b"" at the end of the file."""
        while True:
            index = self.buffer.find(stop, self.offset)
            if index >= 0:
                data = self.buffer[self.offset:index]
                self.offset = index + 1
                return data
            before = len(self.buffer) - self.offset
            self._fill(before + _CHUNK)
            if len(self.buffer) - self.offset == before:
                data = self.buffer[self.offset:]
                self.offset = len(self.buffer)
                return data


def _parse_header(line: bytes) -> tuple[int, int] | None:
    parts = line.split()
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def _looks_binary(path: str, sample: bytes) -> bool:
    if path.endswith(".bin"):
        return True
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as err:
        # A sample cut inside a multi-byte character is still text.
        if err.start < len(sample) - 4:
            return True
        text = sample[:err.start].decode("utf-8")
    return any(ch not in "\t\n\r" and not ch.isprintable() for ch in text)


def _text_vectors(path: str, has_header: bool) -> Iterator[tuple[str, np.ndarray]]:
    with tf.io.gfile.GFile(path, "rb") as handle:
        for number, raw in enumerate(handle):
            if number == 0 and has_header:
                continue
            parts = raw.decode("utf-8", errors="replace").rstrip("\r\n").rstrip(" ").split(" ")
            if len(parts) < 2:
                continue
            try:
                yield parts[0], np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                raise UsageError(f"--word2vec_embedding={path}: line {number + 1} is not "
                                 "`word v1 v2 ...`; give a word2vec or GloVe file") from None


def _binary_vectors(path: str, count: int, dim: int) -> Iterator[tuple[str, np.ndarray]]:
    with tf.io.gfile.GFile(path, "rb") as handle:
        reader = _Bytes(handle)
        reader.read_until(b"\n")
        for number in range(count):
            word = reader.read_until(b" ").lstrip(b"\n")
            raw = reader.read(4 * dim)
            if len(raw) < 4 * dim:
                raise UsageError(f"--word2vec_embedding={path}: ends inside vector {number + 1} of "
                                 f"{count}; the file is truncated")
            yield word.decode("utf-8", errors="replace"), np.frombuffer(raw, dtype="<f4").astype(np.float32)


def read_vectors(path: str) -> tuple[int, Iterator[tuple[str, np.ndarray]]]:
    """(dimension, iterator of (word, vector)) for a word2vec text/binary or GloVe file."""
    if not tf.io.gfile.exists(path):
        raise UsageError(f"--word2vec_embedding={path}: no such file")
    with tf.io.gfile.GFile(path, "rb") as handle:
        sample = handle.read(4096)
    first_line = sample.split(b"\n", 1)[0]
    header = _parse_header(first_line)
    if header is not None and _looks_binary(path, sample[len(first_line) + 1:]):
        return header[1], _binary_vectors(path, *header)
    if header is not None:
        return header[1], _text_vectors(path, has_header=True)
    dim = len(first_line.split()) - 1
    if dim < 1:
        raise UsageError(f"--word2vec_embedding={path}: neither a word2vec header nor a GloVe line "
                         "starts the file")
    return dim, _text_vectors(path, has_header=False)


def load_embedding(path: str, vocab: Sequence[str], initial: np.ndarray) -> Loaded:
    """`initial` [V, E] with the rows of vocabulary words found in `path` replaced.

    Exact matches win; a word found only in lower case (GloVe's files are lower-cased) is used
    for a vocabulary word that has no exact entry.
    """
    dim, vectors = read_vectors(path)
    if dim != initial.shape[1]:
        raise UsageError(f"--word2vec_embedding={path} holds {dim}-dimensional vectors; "
                         f"set --embedding_size={dim}")
    exact = {word: i for i, word in enumerate(vocab)}
    lowered: dict[str, list[int]] = {}
    for i, word in enumerate(vocab):
        lowered.setdefault(word.lower(), []).append(i)
    matrix = initial.astype(np.float32).copy()
    exact_rows: set[int] = set()
    case_rows: set[int] = set()
    for word, vector in vectors:
        if vector.shape != (dim,):
            raise UsageError(f"--word2vec_embedding={path}: the vector of {word!r} has "
                             f"{vector.shape[0]} values, not {dim}")
        if word in exact:
            matrix[exact[word]] = vector
            exact_rows.add(exact[word])
        for row in lowered.get(word, ()):
            if row not in exact_rows and row not in case_rows:
                matrix[row] = vector
                case_rows.add(row)
    return Loaded(matrix, len(exact_rows | case_rows), len(vocab))


def initialize_embedding(model: object, path: str, vocab: Sequence[str]) -> Loaded:
    """Loads `path` into `model.embedding` (every verne model names its table so)."""
    table = model.embedding.embeddings  # type: ignore[attr-defined]
    loaded = load_embedding(path, vocab, table.numpy())
    table.assign(loaded.matrix)
    return loaded
