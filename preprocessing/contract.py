"""The data contract between `preprocessing` (the writer) and `trainer` (the reader).

Everything both sides must agree on lives here and nowhere else: file names, the TFRecord
feature, the metadata schema and its validation. Importing this module is cheap (no Beam, no
TensorFlow at import time) so the trainer can use it on machines without Beam.

Layout of a data directory for prefix NAME::

    DIR/NAME.train-00000-of-00004.tfrecord.gz   GZIP TFRecords of tf.train.Example
    DIR/NAME.valid-00000-of-00001.tfrecord.gz   with one int64 list feature `tokens`:
    DIR/NAME.test-00000-of-00001.tfrecord.gz    a long contiguous run of token ids
    DIR/NAME.metadata.json                      written last: it is the commit marker
    DIR/NAME.vocab.txt                          the vocabulary for people, one token a line
    DIR/NAME.tokenizer.model                    bpe/unigram only: the learned SentencePiece model

A learned tokenizer is a file of its own (the format SentencePiece reads), named and hashed in the
metadata. Whoever copies the metadata elsewhere (a trainer job dir) copies the tokenizer file next
to it under the same name: readers look for it in the directory the metadata file is in.

Records are long runs, not training windows, so the trainer can pick its unroll length later.
Each record is contiguous text from one document. A split is cut into shards of at most
SHARD_CHARACTERS characters of text (`shards_for`), so that many writers and many readers can
share it; consecutive records of a document stay in order in one shard where they can. The
metadata counts each shard's tokens (`SplitStats.shard_tokens`): a reader divides the shards
between workers from it without opening them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
# Subword tokenizers are learned from the training split (preprocessing.subword).
SUBWORD_TOKENIZERS = ("bpe", "unigram")
TOKENIZERS = ("char", "byte", "word") + SUBWORD_TOKENIZERS
# How word text splits into tokens: WORD_PATTERN's words and punctuation (raw books), or runs of
# non-whitespace (pre-tokenized corpora such as PTB and WikiText, split as awd-lstm-lm does).
WORD_SPLITS = ("pattern", "whitespace")
TOKENS_FEATURE = "tokens"
UNK = "<unk>"
EOS = "<eos>"
NEWLINE = "\n"
SHARD_SUFFIX = ".tfrecord.gz"
# Beam's shard_name_template; the trainer globs for the same shape.
SHARD_TEMPLATE = "-SSSSS-of-NNNNN"
# Tokens per record: long enough that per-record overhead vanishes, short enough that a
# record never strains memory. The trainer concatenates records, so the value is free to change.
DEFAULT_RECORD_TOKENS = 65536
# Text per shard: a shard is what one writer writes and one reader reads, so a split of N of these
# can be written by N workers and read by up to N. 32 MB compresses to ~12 MB (char ids, GZIP).
SHARD_CHARACTERS = 32_000_000


class ContractError(ValueError):
    """Data on disk does not follow this contract; the message says which file and why."""


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def shard_prefix(data_dir: str, prefix: str, split: str) -> str:
    """Path prefix handed to Beam's WriteToTFRecord (it appends SHARD_TEMPLATE + SHARD_SUFFIX)."""
    _check_split(split)
    return _join(data_dir, f"{prefix}.{split}")


def shard_glob(data_dir: str, prefix: str, split: str) -> str:
    """Glob matching every shard of one split."""
    return shard_prefix(data_dir, prefix, split) + "-*-of-*" + SHARD_SUFFIX


def shard_name(data_dir: str, prefix: str, split: str, index: int, shards: int) -> str:
    """The path of shard `index` of `shards` (what SHARD_TEMPLATE makes of it)."""
    return shard_prefix(data_dir, prefix, split) + f"-{index:05d}-of-{shards:05d}" + SHARD_SUFFIX


def shards_for(characters: int) -> int:
    """How many shards a split of `characters` characters of text gets: none above the limit."""
    return max(1, -(-characters // SHARD_CHARACTERS))


def metadata_path(data_dir: str, prefix: str) -> str:
    return _join(data_dir, f"{prefix}.metadata.json")


def vocab_path(data_dir: str, prefix: str) -> str:
    return _join(data_dir, f"{prefix}.vocab.txt")


def tokenizer_file_name(prefix: str) -> str:
    """The learned tokenizer's file name, beside the shards (and beside a job dir's metadata)."""
    return f"{prefix}.tokenizer.model"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


@dataclasses.dataclass(frozen=True)
class SplitStats:
    tokens: int
    records: int
    shards: int
    # Characters of cleaned text the split's tokens cover, so that losses of models with different
    # tokenizers compare per character. 0: unknown (metadata written before the field existed).
    characters: int = 0
    # Tokens in each shard, in shard order (NAME.SPLIT-00000-of-N first), so that readers can
    # divide the shards between them without opening any. Empty: unknown (metadata written
    # before the field existed; such a split is read whole by every reader).
    shard_tokens: tuple[int, ...] = ()

    @property
    def characters_per_token(self) -> float:
        """0.0 when unknown."""
        return self.characters / self.tokens if self.characters and self.tokens else 0.0


@dataclasses.dataclass(frozen=True)
class Metadata:
    """What `NAME.metadata.json` holds. `vocab[i]` is the token with id i."""

    tokenizer: str
    vocab: tuple[str, ...]
    splits: dict[str, SplitStats]
    lowercase: bool = False
    line_eos: bool = False
    # Metadata written before the field existed was made with the pattern: that stays its reading.
    word_split: str = "pattern"
    documents: int = 0
    skipped: tuple[dict[str, str], ...] = ()
    sources: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # bpe/unigram: the tokenizer file's name (in the metadata's directory) and its SHA-256, and
    # what it was learned from: {"characters": sampled, "limit": the sample bound,
    # "train_characters": the whole training split}.
    tokenizer_file: str = ""
    tokenizer_sha256: str = ""
    tokenizer_sample: dict[str, int] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # The tokenizer file's bytes once `with_tokenizer_model` has read and checked them; never
    # part of the JSON.
    tokenizer_model: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def learned(self) -> bool:
        """True for tokenizers that need their tokenizer file (bpe, unigram)."""
        return self.tokenizer in SUBWORD_TOKENIZERS

    @property
    def unk_id(self) -> int | None:
        """Id of `<unk>`, or None for tokenizers that cannot meet an unknown (byte)."""
        try:
            return self.vocab.index(UNK)
        except ValueError:
            return None


def metadata_to_json(metadata: Metadata) -> str:
    body = dataclasses.asdict(metadata)
    body["vocab"] = list(metadata.vocab)
    del body["tokenizer_model"]
    return json.dumps(body, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def metadata_from_json(text: str, source: str = "metadata") -> Metadata:
    """Parses and validates metadata; any problem is a ContractError naming `source`."""
    try:
        body: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as err:
        raise ContractError(f"{source}: not valid JSON ({err})") from None
    version = body.get("format_version")
    if version != FORMAT_VERSION:
        raise ContractError(
            f"{source}: format_version {version!r}, this verne reads {FORMAT_VERSION}; "
            "rerun preprocessing.run with this version")
    known = {f.name for f in dataclasses.fields(Metadata)} - {"tokenizer_model"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ContractError(f"{source}: unknown keys {unknown}")
    try:
        splits = {name: SplitStats(**{**stats, "shard_tokens": tuple(stats.get("shard_tokens", ()))})
                  for name, stats in body.pop("splits").items()}
        metadata = Metadata(
            splits=splits,
            vocab=tuple(body.pop("vocab")),
            skipped=tuple(body.pop("skipped", ())),
            sources={k: tuple(v) for k, v in body.pop("sources", {}).items()},
            **body,
        )
    except (KeyError, TypeError) as err:
        raise ContractError(f"{source}: missing or malformed field ({err})") from None
    _validate(metadata, source)
    return metadata


def _validate(metadata: Metadata, source: str) -> None:
    if metadata.tokenizer not in TOKENIZERS:
        raise ContractError(f"{source}: tokenizer {metadata.tokenizer!r} not in {TOKENIZERS}")
    if metadata.word_split not in WORD_SPLITS:
        raise ContractError(f"{source}: word_split {metadata.word_split!r} not in {WORD_SPLITS}")
    if metadata.word_split != "pattern" and metadata.tokenizer != "word":
        raise ContractError(f"{source}: word_split {metadata.word_split!r} needs the word tokenizer")
    if len(set(metadata.vocab)) != len(metadata.vocab):
        raise ContractError(f"{source}: vocabulary has duplicate tokens")
    if metadata.tokenizer == "byte" and metadata.vocab_size != 256:
        raise ContractError(f"{source}: a byte vocabulary has 256 entries, not {metadata.vocab_size}")
    missing = [s for s in SPLITS if s not in metadata.splits]
    if missing:
        raise ContractError(f"{source}: no stats for splits {missing}")
    for name, stats in metadata.splits.items():
        if stats.shard_tokens and (len(stats.shard_tokens) != stats.shards
                                   or sum(stats.shard_tokens) != stats.tokens):
            raise ContractError(f"{source}: the {name} split's shard_tokens do not add up to its "
                                f"{stats.shards} shards and {stats.tokens} tokens")
    if metadata.learned and not (metadata.tokenizer_file and metadata.tokenizer_sha256):
        raise ContractError(f"{source}: a {metadata.tokenizer} tokenizer needs tokenizer_file and "
                            "tokenizer_sha256; rerun preprocessing.run")
    if metadata.tokenizer_file and "/" in metadata.tokenizer_file:
        raise ContractError(f"{source}: tokenizer_file {metadata.tokenizer_file!r} must be a file name")


def tokenizer_location(metadata_file: str, metadata: Metadata) -> str:
    """Where the tokenizer file of the metadata read from `metadata_file` is: beside it."""
    return _join(metadata_file.rsplit("/", 1)[0] if "/" in metadata_file else ".",
                 metadata.tokenizer_file)


def with_tokenizer_model(metadata: Metadata, metadata_file: str,
                         read_bytes: Callable[[str], bytes]) -> Metadata:
    """The metadata with its tokenizer file's bytes attached (unchanged if it has none).

    `read_bytes` is the caller's file reader (Beam's or TensorFlow's: this module imports
    neither). A missing file or one whose SHA-256 is not the metadata's is a ContractError.
    """
    if not metadata.learned:
        return metadata
    path = tokenizer_location(metadata_file, metadata)
    try:
        model = read_bytes(path)
    except Exception as err:  # noqa: BLE001 — Beam and TF raise different errors for a missing file
        raise ContractError(f"{path}: cannot read the tokenizer file {metadata_file} names "
                            f"({type(err).__name__}); copy it next to the metadata or rerun "
                            "preprocessing.run") from None
    if hashlib.sha256(model).hexdigest() != metadata.tokenizer_sha256:
        raise ContractError(f"{path} does not match {metadata_file} (another SHA-256): the tokenizer "
                            "file is from another run; copy the matching one or rerun preprocessing.run")
    return dataclasses.replace(metadata, tokenizer_model=model)


def escape_token(token: str) -> str:
    """One-line, readable form of a token for NAME.vocab.txt (newline becomes \\n, etc.)."""
    if token.isprintable() and "\\" not in token:
        return token
    return token.encode("unicode_escape").decode("ascii")


def vocab_text(vocab: Sequence[str]) -> str:
    return "".join(escape_token(token) + "\n" for token in vocab)


def serialize_example(token_ids: Sequence[int]) -> bytes:
    """One record: a tf.train.Example with the int64 list feature `tokens`."""
    import tensorflow as tf  # deferred: the contract must import without TensorFlow

    feature = tf.train.Feature(int64_list=tf.train.Int64List(value=token_ids))
    example = tf.train.Example(features=tf.train.Features(feature={TOKENS_FEATURE: feature}))
    return example.SerializeToString()


def parse_example(serialized: Any) -> Any:
    """tf.data map function: a serialized record to a 1-D int64 tensor of token ids."""
    import tensorflow as tf

    spec = {TOKENS_FEATURE: tf.io.RaggedFeature(tf.int64)}
    return tf.io.parse_single_example(serialized, spec)[TOKENS_FEATURE]


def encode_example(token_ids: Any) -> bytes:
    """The same bytes as `serialize_example`, built with numpy instead of TensorFlow.

    The Beam job uses this: importing TensorFlow costs each Beam worker seconds and hundreds of
    MB just to build a message of one packed int64 list, and the varint encoding below is
    several times faster than protobuf's. tests/test_preprocessing.py checks both byte for byte.
    """
    import numpy as np

    values = np.asarray(token_ids, dtype=np.int64).ravel()
    if values.size and values.min() < 0:
        raise ValueError("token ids are non-negative")
    packed = _varints(values.astype(np.uint64))
    int64_list = (b"\x0a" + _varint(len(packed)) + packed) if packed else b""
    feature = b"\x1a" + _varint(len(int64_list)) + int64_list            # Feature.int64_list = 3
    key = TOKENS_FEATURE.encode()
    entry = b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(feature)) + feature
    features = b"\x0a" + _varint(len(entry)) + entry                    # Features.feature map
    return b"\x0a" + _varint(len(features)) + features                  # Example.features = 1


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varints(values: Any) -> bytes:
    """Protobuf base-128 varints of non-negative uint64s, vectorised over the whole array."""
    import numpy as np

    if not values.size:
        return b""
    top = int(values.max())
    if top < 0x80:  # every id fits one byte: the common case for char and byte vocabularies
        return values.astype(np.uint8).tobytes()
    lengths = np.ones(values.shape, dtype=np.int64)
    for k in range(1, (top.bit_length() + 6) // 7):
        lengths += values >= np.uint64(1 << (7 * k))
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for k in range(int(lengths.max())):
        has = lengths > k
        group = (values[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (lengths[has] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + k] = (group | more).astype(np.uint8)
    return out.tobytes()
