"""Shared fixtures: tiny data dirs written directly with the data contract (no Beam needed)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Quiet TensorFlow's start-up chatter in test logs; keep oneDNN (the speed tests rely on it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from gcs.fixture import gcs_bucket, gcs_in_process, gcs_server  # noqa: E402,F401  (gs:// emulator, tests/gcs)

from preprocessing import contract  # noqa: E402

SHAKESPEARE_LIKE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy "
    "to the people.\n\n"
)


# Learned vocabularies for SHAKESPEARE_LIKE-sized texts: what a few KB of it supports.
SUBWORD_VOCAB = {"bpe": 360, "unigram": 310}


def _tokenize(text: str, tokenizer: str, train: str) -> tuple[list[int], tuple[str, ...], bytes]:
    """Ids, vocabulary and (bpe/unigram) model exactly as preprocessing would make them, so the
    trainer and the sampler see the same vocabularies in tests as on real data; a learned
    tokenizer is learned from `train` only."""
    from preprocessing import subword, tokenizers

    if tokenizer in contract.SUBWORD_TOKENIZERS:
        model = subword.learn(tokenizer, [train], SUBWORD_VOCAB[tokenizer])
        learned = subword.SubwordTokenizer(tokenizer, model)
        return learned.encode(text), learned.vocab, model
    _, counts = tokenizers.count_tokens(tokenizer, text)
    vocab = tokenizers.build_vocab(tokenizer, counts)
    return tokenizers.make_tokenizer(tokenizer, vocab).encode(text), vocab, b""


def write_data_dir(data_dir: Path, text: str, tokenizer: str = "char", prefix: str = "tiny",
                   splits: tuple[float, float, float] = (0.8, 0.1, 0.1), record_tokens: int = 97,
                   shards: int = 2) -> tuple[str, str, contract.Metadata]:
    """Writes `text` as a data dir for `prefix` following the contract; returns (dir, prefix, metadata).

    The split sizes are fractions of the token stream; train is spread over `shards` shards of
    `record_tokens`-token records, valid and test over one shard each.
    """
    import hashlib

    import tensorflow as tf

    data_dir.mkdir(parents=True, exist_ok=True)
    ids, vocab, model = _tokenize(text, tokenizer, text[:int(len(text) * splits[0])])
    bounds = [0, int(len(ids) * splits[0]), int(len(ids) * (splits[0] + splits[1])), len(ids)]
    stats = {}
    for index, split in enumerate(contract.SPLITS):
        tokens = ids[bounds[index]:bounds[index + 1]]
        records = [tokens[i:i + record_tokens] for i in range(0, len(tokens), record_tokens)]
        count = shards if split == "train" else 1
        for shard in range(count):
            name = f"{contract.shard_prefix(str(data_dir), prefix, split)}-{shard:05d}-of-{count:05d}"
            with tf.io.TFRecordWriter(name + contract.SHARD_SUFFIX, options="GZIP") as writer:
                for record in records[shard::count]:
                    writer.write(contract.serialize_example(record))
        shard_tokens = tuple(sum(map(len, records[shard::count])) for shard in range(count))
        stats[split] = contract.SplitStats(tokens=len(tokens), records=len(records), shards=count,
                                           characters=round(len(tokens) * len(text) / len(ids)),
                                           shard_tokens=shard_tokens)
    learned = {}
    if model:
        learned = {"tokenizer_file": contract.tokenizer_file_name(prefix),
                   "tokenizer_sha256": hashlib.sha256(model).hexdigest(), "tokenizer_model": model}
        (data_dir / learned["tokenizer_file"]).write_bytes(model)
    metadata = contract.Metadata(tokenizer=tokenizer, vocab=vocab, splits=stats, documents=1, **learned)
    Path(contract.vocab_path(str(data_dir), prefix)).write_text(contract.vocab_text(vocab))
    Path(contract.metadata_path(str(data_dir), prefix)).write_text(contract.metadata_to_json(metadata))
    return str(data_dir), prefix, metadata


def _make(tmp_path: Path, text: str = SHAKESPEARE_LIKE * 8, tokenizer: str = "char",
          prefix: str = "tiny", **options: object) -> tuple[str, str, contract.Metadata]:
    return write_data_dir(Path(tmp_path) / "data", text, tokenizer, prefix, **options)


@pytest.fixture
def make_data_dir() -> Callable[..., tuple[str, str, contract.Metadata]]:
    """Factory: make_data_dir(tmp_path, text, tokenizer='char', prefix='tiny', **options)
    -> (data_dir, prefix, metadata). Writes into tmp_path / "data"."""
    return _make


@pytest.fixture(scope="module")
def make_data_dir_module() -> Callable[..., tuple[str, str, contract.Metadata]]:
    """The same factory for module-scoped fixtures (pass a tmp_path_factory directory)."""
    return _make
