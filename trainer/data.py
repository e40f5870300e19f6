"""Input: the shards of one split as windows for stateful truncated back-propagation.

The split's token stream (records concatenated in shard order) is cut into `batch_size` parallel
streams, and consecutive windows of `unroll_steps` tokens continue each stream, so the state a
window ends with is the right state for the next window of the same row (char-rnn, awd-lstm's
`batchify`). Labels are the inputs shifted by one token.

Streaming: the reader never holds the split. It cuts the stream into chunks of at most
MAX_CHUNK_TOKENS and lays each chunk out as [batch_size, per-stream length]; a split up to that
size is therefore exactly the classic layout, and a larger one is a sequence of such layouts, each
row jumping to new text at a chunk boundary (as it does anyway at record boundaries, whose order
carries no meaning). Memory is one chunk, whatever the corpus size.

A position in an epoch is the number of windows consumed; `windows(..., start=n)` resumes exactly
there. The layout depends only on the metadata's token count, batch size and unroll length.

Models that carry nothing from one window to the next (the transformer) take `random_starts`:
the same number of windows per chunk, each row cut at a random offset of the chunk (nanoGPT's
sampling), reproducibly for the epoch's seed.

Several readers (one per worker of a multi-worker job, `plan_reading`): the train shards are
divided between them by the token counts the metadata keeps for each shard, and each reader cuts
only its own shards into windows of its own rows (--batch_size / readers streams), so a worker
reads about 1/readers of the split instead of all of it. Every reader takes as many windows per
epoch as the one with the least text has; the same readers resume exactly where they were. With
one worker, or data whose shards cannot be divided (fewer shards than workers, metadata without
per-shard counts), every worker reads the whole stream as above and keeps its rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import tensorflow as tf

from preprocessing import contract, failures
from trainer import storage
from trainer.errors import UsageError

# 2M tokens: 8 MB as int32 once reshaped; large enough that chunk seams are rare.
MAX_CHUNK_TOKENS = 1 << 21


def read_metadata(data_dir: str, prefix: str) -> contract.Metadata:
    """The metadata of a data dir; any problem is a one-line UsageError naming the flag."""
    if not data_dir:
        raise UsageError("--data_dir is missing: point it at the output_dir of preprocessing.run")
    if not prefix:
        raise UsageError("--data_prefix is missing: give the --data_prefix used with preprocessing.run")
    path = contract.metadata_path(data_dir, prefix)
    if not tf.io.gfile.exists(path):
        found = sorted({name.split(".")[0] for name in _listdir(data_dir) if name.endswith(".metadata.json")})
        hint = f" (prefixes there: {', '.join(found)})" if found else ""
        raise UsageError(f"--data_dir={data_dir} --data_prefix={prefix}: no {path}{hint}; "
                         "run preprocessing.run first or fix the flags")
    with tf.io.gfile.GFile(path) as f:
        return with_tokenizer_model(contract.metadata_from_json(f.read(), source=path), path)


def with_tokenizer_model(metadata: contract.Metadata, metadata_file: str) -> contract.Metadata:
    """The metadata with its tokenizer file attached (bpe/unigram); ContractError if it is
    missing or is not the file this metadata was written with."""
    def read(path: str) -> bytes:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()

    return contract.with_tokenizer_model(metadata, metadata_file, read)


def _listdir(directory: str) -> list[str]:
    try:
        return tf.io.gfile.listdir(directory)
    except tf.errors.NotFoundError:
        return []


def shard_files(data_dir: str, prefix: str, split: str) -> list[str]:
    """The shards of a split, sorted (a fixed order makes the stream, and resuming, exact)."""
    pattern = contract.shard_glob(data_dir, prefix, split)
    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise UsageError(f"--data_dir={data_dir} --data_prefix={prefix}: no {split} shards match "
                         f"{pattern}; rerun preprocessing.run or fix the flags")
    return files


@contextlib.contextmanager
def reading_shards(data_dir: str, prefix: str) -> Iterator[None]:
    """A damaged shard (cut short, corrupt) met while reading becomes one UsageError line naming
    it; tf.data's own error names neither the file nor the fix."""
    try:
        yield
    except tf.errors.PermissionDeniedError as err:
        raise UsageError(f"--data_dir={data_dir}: cannot read a shard ({failures.plain(err.message)}); "
                         "give this user read access to the data") from None
    except tf.errors.DataLossError as err:
        damaged = damaged_shards(data_dir, prefix)
        what = ", ".join(damaged) or f"a shard of --data_dir={data_dir} --data_prefix={prefix}"
        # "{{function_node ...}} truncated record at 65580' failed with EOF reached [Op:...]"
        reason = failures.plain(err.message) or "unreadable"
        raise UsageError(f"{what}: damaged ({reason}); run preprocessing.run again to rewrite the data "
                         "(a training job then resumes from its last checkpoint)") from None


@contextlib.contextmanager
def vanished_shards_reported(data_dir: str, prefix: str) -> Iterator[None]:
    """A shard deleted or moved while training runs is "missing: PATH", not a failed write (a
    --job-dir wrapper around it, `errors.writing`, would take "No such file or directory" for one)."""
    patterns = [contract.shard_glob(data_dir, prefix, split) for split in contract.SPLITS]
    shards = storage.retry("listing the shards", data_dir,
                           lambda: [name for pattern in patterns for name in tf.io.gfile.glob(pattern)])
    try:
        yield
    except tf.errors.NotFoundError:
        missing = [name for name in shards if not tf.io.gfile.exists(name)]
        if not missing:
            raise
        raise UsageError(f"missing: {', '.join(missing)} (deleted or moved while training ran); put it "
                         "back or run preprocessing.run again to rewrite the data, then run the same "
                         "command again to resume from the last checkpoint") from None


def damaged_shards(data_dir: str, prefix: str) -> list[str]:
    """The shards of every split that cannot be read to the end (reads them all)."""
    damaged = []
    for split in contract.SPLITS:
        for name in sorted(tf.io.gfile.glob(contract.shard_glob(data_dir, prefix, split))):
            try:
                tf.data.TFRecordDataset(name, compression_type="GZIP").reduce(0, _count)
            except tf.errors.DataLossError:
                damaged.append(name)
    return damaged


def _count(count: tf.Tensor, _: tf.Tensor) -> tf.Tensor:
    return count + 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one split becomes windows: `chunks` x `windows_per_chunk` windows of [batch, unroll]."""

    batch_size: int
    unroll_steps: int
    windows_per_chunk: int
    chunks: int

    @property
    def windows_per_epoch(self) -> int:
        return self.chunks * self.windows_per_chunk

    @property
    def chunk_tokens(self) -> int:
        # One extra token per row: the label of the row's last input.
        return self.batch_size * (self.windows_per_chunk * self.unroll_steps + 1)

    @property
    def tokens_per_window(self) -> int:
        return self.batch_size * self.unroll_steps


def layout_for(split_tokens: int, batch_size: int, unroll_steps: int, split: str = "train",
               max_chunk_tokens: int | None = None) -> Layout:
    """The layout for a split of `split_tokens` tokens (in chunks of at most `max_chunk_tokens`,
    default MAX_CHUNK_TOKENS); UsageError if not one window fits."""
    pieces = max(1, -(-split_tokens // (max_chunk_tokens or MAX_CHUNK_TOKENS)))
    row = split_tokens // (pieces * batch_size)
    per_chunk = (row - 1) // unroll_steps if row > 1 else 0
    if per_chunk <= 0:
        most = (split_tokens // batch_size) - 1
        fixes = [f"--unroll_steps <= {most}"] if most >= 1 else []
        fixes += ["a smaller --batch_size"] if batch_size > 1 else []
        if not fixes:
            more = f" (preprocessing.run --{split}_fraction)" if split != "train" else ""
            fixes = [f"more {split} text{more}"]
        fix = " or ".join(fixes)
        raise UsageError(
            f"--unroll_steps={unroll_steps} with --batch_size={batch_size} needs "
            f"{batch_size * (unroll_steps + 1)} {split} tokens, the {split} split has {split_tokens}; "
            f"use {fix}")
    chunk_tokens = batch_size * (per_chunk * unroll_steps + 1)
    return Layout(batch_size, unroll_steps, per_chunk, split_tokens // chunk_tokens)


@dataclasses.dataclass(frozen=True)
class Reading:
    """How a split is read: by one reader (the whole stream) or divided between `readers`.

    `layout` is the job's: --batch_size streams, and the windows per epoch every reader takes.
    With several readers, reader r reads `files[r]` only and cuts them by `local` into windows of
    its own --batch_size / readers streams: the rows of its replicas, in order.
    """

    layout: Layout
    local: Layout
    files: tuple[tuple[str, ...], ...]  # per reader
    note: str = ""  # one line for the log: how the split is divided, or why it is not

    @property
    def readers(self) -> int:
        return len(self.files)


def assign_shards(shard_tokens: Sequence[int], readers: int) -> list[list[int]]:
    """Shard indices per reader: the largest shard first, each to the reader with the least text
    so far (the lower index on a tie), so loads differ by at most one shard. Pure: every worker
    computes the same assignment from the metadata."""
    loads, assigned = [0] * readers, [[] for _ in range(readers)]
    for shard in sorted(range(len(shard_tokens)), key=lambda i: (-shard_tokens[i], i)):
        reader = min(range(readers), key=lambda r: (loads[r], r))
        assigned[reader].append(shard)
        loads[reader] += shard_tokens[shard]
    return [sorted(shards) for shards in assigned]


def plan_reading(files: Sequence[str], stats: contract.SplitStats, batch_size: int, unroll_steps: int,
                 readers: int = 1, split: str = "train") -> Reading:
    """Who reads which shards of a split (see the module docstring); UsageError if not one window
    of the whole split fits."""
    whole = layout_for(stats.tokens, batch_size, unroll_steps, split)
    if readers <= 1:
        return Reading(whole, whole, (tuple(files),))
    everything = f"every one of the {readers} workers reads the whole {split} split"
    if len(stats.shard_tokens) != len(files):
        why = ("its metadata has no per-shard token counts (written by an older verne); rerun "
               "preprocessing.run to let each worker read only its own shards")
        return Reading(whole, whole, (tuple(files),), f"{everything}: {why}")
    if len(files) < readers or batch_size % readers:
        why = (f"{len(files)} shards cannot be divided between {readers} workers; rerun "
               f"preprocessing.run with --num_shards {split}={readers * max(1, -(-len(files) // readers))}")
        return Reading(whole, whole, (tuple(files),), f"{everything}: {why}")
    shards = assign_shards(stats.shard_tokens, readers)
    loads = [sum(stats.shard_tokens[i] for i in own) for own in shards]
    try:
        local = layout_for(min(loads), batch_size // readers, unroll_steps, split)
    except UsageError:
        why = f"the smallest share ({min(loads)} tokens) is too short for one window of its streams"
        return Reading(whole, whole, (tuple(files),), f"{everything}: {why}")
    layout = Layout(batch_size, unroll_steps, local.windows_per_chunk, local.chunks)
    used = readers * local.chunks * local.chunk_tokens
    note = (f"{readers} workers each read their own {min(map(len, shards))}-{max(map(len, shards))} of "
            f"the {len(files)} {split} shards ({max(loads) / max(stats.tokens, 1):.0%} of the text at "
            f"most); {1 - used / max(stats.tokens, 1):.1%} of it is left out of each epoch so all take "
            f"{layout.windows_per_epoch} windows")
    return Reading(layout, local, tuple(tuple(files[i] for i in own) for own in shards), note)


def division(readers: int, split: str = "train") -> str:
    """How a split's shards are read, in words (for the line a resume prints)."""
    return (f"{split} shards read whole by every worker" if readers == 1
            else f"{split} shards divided between {readers} workers")


def reader_windows(reading: Reading, start: int = 0, shuffle_seed: int | None = None,
                   random_starts: bool = False) -> tf.data.Dataset | Callable[[int], tf.data.Dataset]:
    """One epoch of `reading`'s windows from window `start` on: the whole split's (one reader),
    or a function of the reader returning that reader's own (what distribute_windows takes)."""
    if reading.readers == 1:
        return windows(list(reading.files[0]), reading.layout, start, shuffle_seed, random_starts)

    def of_reader(reader: int) -> tf.data.Dataset:
        return windows(list(reading.files[reader]), reading.local, start, shuffle_seed, random_starts,
                       reader=reader)

    return of_reader


def token_stream(files: list[str], shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Records of the split as 1-D int32 tensors, in a deterministic order.

    With `shuffle_seed` the shard order is shuffled (deterministically for that seed), so each
    training epoch sees the documents in another order yet resuming reproduces it.
    """
    names = tf.data.Dataset.from_tensor_slices(files)
    if shuffle_seed is not None and len(files) > 1:
        names = names.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=False)
    records = names.interleave(
        lambda name: tf.data.TFRecordDataset(name, compression_type="GZIP"),
        cycle_length=min(4, len(files)), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return records.map(lambda record: tf.cast(contract.parse_example(record), tf.int32),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def windows(files: list[str], layout: Layout, start: int = 0, shuffle_seed: int | None = None,
            random_starts: bool = False, reader: int = 0) -> tf.data.Dataset:
    """One epoch of (inputs int32 [B, T], labels int32 [B, T]) windows, from window `start` on.

    With `random_starts` (for models that carry nothing from one window to the next) each row of
    each window starts at a random token of its chunk instead of continuing its stream, as
    nanoGPT's `get_batch` draws them: a text seen again in a later epoch is cut differently, which
    stateless models overfit less with (bench/README.md, `--compare`). The draws are a function of
    `shuffle_seed` and the chunk, so resuming at `start` reproduces them. The epoch has as many
    windows either way. `reader` (of several, `plan_reading`) numbers its chunks after the
    other readers' for those draws, so no two readers cut their chunks alike.
    """
    batch, unroll, per_chunk = layout.batch_size, layout.unroll_steps, layout.windows_per_chunk
    chunks = token_stream(files, shuffle_seed).rebatch(layout.chunk_tokens, drop_remainder=True)
    chunks = chunks.take(layout.chunks).enumerate().skip(start // per_chunk)
    seed = 0 if shuffle_seed is None else shuffle_seed

    def streams(chunk: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:  # [K, B, T]: rows continue streams
        rows = tf.reshape(chunk, [batch, per_chunk * unroll + 1])
        inputs = tf.reshape(rows[:, :-1], [batch, per_chunk, unroll])
        labels = tf.reshape(rows[:, 1:], [batch, per_chunk, unroll])
        return tf.transpose(inputs, [1, 0, 2]), tf.transpose(labels, [1, 0, 2])

    def random_rows(index: tf.Tensor, chunk: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        starts = tf.random.stateless_uniform(
            [per_chunk, batch], seed=tf.stack([tf.constant(seed, tf.int64), index + reader * layout.chunks]),
            maxval=layout.chunk_tokens - unroll, dtype=tf.int32)
        rows = tf.gather(chunk, starts[..., None] + tf.range(unroll + 1))  # [K, B, T + 1]
        return rows[..., :-1], rows[..., 1:]

    def to_windows(index: tf.Tensor, chunk: tf.Tensor) -> tf.data.Dataset:
        pairs = random_rows(index, chunk) if random_starts else streams(chunk)
        return tf.data.Dataset.from_tensor_slices(pairs)

    # No autotuning: with it, dropping an iterator before its end (each epoch's, or the last one
    # when training stops mid-epoch) blocked ~30 s in tf.data's destructor while its model thread
    # slept (measured with the default model on 2 cores: 28 s lost at every epoch boundary). The
    # pipeline outruns training by two orders of magnitude without it (bench/README.md).
    options = tf.data.Options()
    options.autotune.enabled = False
    return chunks.flat_map(to_windows).skip(start % per_chunk).prefetch(2).with_options(options)
