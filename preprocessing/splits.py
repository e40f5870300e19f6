"""Which contiguous pieces of which document go to train, valid and test. Pure functions.

Every document is cut into chunks of `chunk_tokens` consecutive tokens. Each chunk gets a score
from a seeded hash of (seed, document digest, chunk index); the chunks with the lowest scores
go to test, the next ones to valid, the rest to train. So the assignment depends only on the
seed and the text (not on paths, worker counts or the order Beam delivers documents), the
split sizes are exact fractions of the chunk count, and no token is in two splits.

Chunks shrink for small corpora so that there are enough of them for the fractions to be
honoured and for valid and test to be non-empty; consecutive chunks of one split are merged
back into records of at most `record_tokens` tokens, so a large corpus still gets long records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Mapping

from preprocessing import contract

# Enough chunks that the smallest positive fraction is met to within ~10% of itself.
CHUNKS_PER_SMALLEST_FRACTION = 10


@dataclasses.dataclass(frozen=True)
class Document:
    """What the plan needs to know about one usable input file."""

    path: str
    tokens: int
    digest: str  # of the cleaned text: identical files get identical assignments
    split: str | None = None  # given by --train/--valid/--test, else chosen here


# (split, start, end): tokens [start, end) of a document form one record of that split.
Span = tuple[str, int, int]


def chunk_tokens(total_tokens: int, fractions: Iterable[float], record_tokens: int) -> int:
    """Chunk length: `record_tokens`, or less when the corpus is too small for the fractions."""
    positive = [f for f in fractions if f > 0]
    if not positive:
        return record_tokens
    wanted_chunks = CHUNKS_PER_SMALLEST_FRACTION * math.ceil(1 / min(positive))
    return max(1, min(record_tokens, total_tokens // wanted_chunks))


def split_counts(chunks: int, valid_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, valid, test) chunk counts; valid and test get ≥1 chunk whenever train keeps one."""
    def share(fraction: float) -> int:
        return max(1, round(chunks * fraction)) if fraction > 0 else 0

    valid, test = share(valid_fraction), share(test_fraction)
    # Too few chunks for all three: train first, then valid, then test.
    while valid + test > max(0, chunks - 1) and (valid or test):
        if test:
            test -= 1
        else:
            valid -= 1
    return chunks - valid - test, valid, test


def _score(seed: int, digest: str, chunk: int) -> bytes:
    return hashlib.blake2b(f"{seed}\0{digest}\0{chunk}".encode(), digest_size=16).digest()


def plan(documents: Iterable[Document], valid_fraction: float, test_fraction: float, seed: int,
         record_tokens: int = contract.DEFAULT_RECORD_TOKENS) -> dict[str, tuple[Span, ...]]:
    """Document path → its records as (split, start, end) spans, in document order."""
    documents = sorted(documents, key=lambda d: d.path)
    if any(d.split is not None for d in documents):
        return {d.path: _cut([(d.split or "train", 0, d.tokens)], record_tokens) for d in documents}
    size = chunk_tokens(sum(d.tokens for d in documents), (valid_fraction, test_fraction), record_tokens)
    chunks = [(d, i) for d in documents for i in range(math.ceil(d.tokens / size))]
    scored = sorted(((_score(seed, doc.digest, i), doc.path, i) for doc, i in chunks))
    _, n_valid, n_test = split_counts(len(chunks), valid_fraction, test_fraction)
    split_of: dict[tuple[str, int], str] = {}
    group_rank, previous = 0, b""
    for rank, (score, path, i) in enumerate(scored):
        # Equal scores are the same chunk of identical files: they share the first one's split.
        group_rank = group_rank if score == previous else rank
        previous = score
        split_of[path, i] = ("test" if group_rank < n_test else
                             "valid" if group_rank < n_test + n_valid else "train")
    result = {}
    for doc in documents:
        spans = [(split_of[doc.path, i], i * size, min(doc.tokens, (i + 1) * size))
                 for i in range(math.ceil(doc.tokens / size))]
        result[doc.path] = _cut(_merge(spans), record_tokens)
    return result


def _merge(spans: list[Span]) -> list[Span]:
    """Joins neighbouring spans of the same split: they are contiguous text."""
    merged: list[Span] = []
    for split, start, end in spans:
        if merged and merged[-1][0] == split and merged[-1][2] == start:
            merged[-1] = (split, merged[-1][1], end)
        else:
            merged.append((split, start, end))
    return merged


def _cut(spans: list[Span], record_tokens: int) -> tuple[Span, ...]:
    return tuple((split, s, min(end, s + record_tokens))
                 for split, start, end in spans for s in range(start, end, record_tokens))


def split_tokens(spans_by_path: Mapping[str, tuple[Span, ...]]) -> dict[str, int]:
    """Tokens per split in a plan (what the job must later count in the shards)."""
    totals = dict.fromkeys(contract.SPLITS, 0)
    for spans in spans_by_path.values():
        for split, start, end in spans:
            totals[split] += end - start
    return totals


def split_characters(spans_by_path: Mapping[str, tuple[Span, ...]],
                     characters_per_unit: Mapping[str, float]) -> dict[str, int]:
    """Characters of text per split: each document's plan units (tokens, or characters for
    bpe/unigram) times that document's characters per unit."""
    totals = dict.fromkeys(contract.SPLITS, 0.0)
    for path, spans in spans_by_path.items():
        for split, start, end in spans:
            totals[split] += (end - start) * characters_per_unit.get(path, 1.0)
    return {split: math.ceil(total) for split, total in totals.items()}


def shard_plan(spans_by_path: Mapping[str, tuple[Span, ...]], shards: Mapping[str, int],
               ) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    """(shards per split, document path → the shard of each of its records).

    Each split's records are taken in document order (paths sorted, records in text order) and
    cut into `shards[split]` consecutive runs of about equal size, so shards differ by at most
    one record and a document's records stay together and in order except where a run ends.
    A split never gets more shards than records (nor fewer than one).
    """
    records = dict.fromkeys(contract.SPLITS, 0)
    for spans in spans_by_path.values():
        for split, _, _ in spans:
            records[split] += 1
    counts = {s: max(1, min(shards.get(s, 1), records[s])) for s in contract.SPLITS}
    totals = split_tokens(spans_by_path)
    done = dict.fromkeys(contract.SPLITS, 0)
    assignment = {}
    for path in sorted(spans_by_path):
        indices = []
        for split, start, end in spans_by_path[path]:
            # The shard whose share of the split this record's middle falls in.
            middle = 2 * done[split] + (end - start)
            indices.append(min(counts[split] - 1, middle * counts[split] // max(2 * totals[split], 1)))
            done[split] += end - start
        assignment[path] = tuple(indices)
    return counts, assignment
