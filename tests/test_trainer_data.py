"""The input pipeline: stateful-TBPTT layout, resumable positions, and its user errors."""

from __future__ import annotations

import numpy as np
import pytest

from trainer import data
from trainer.errors import UsageError


def _train_ids(data_dir: str, prefix: str) -> np.ndarray:
    records = data.token_stream(data.shard_files(data_dir, prefix, "train"))
    return np.concatenate([r.numpy() for r in records])


def _windows(files: list[str], layout: data.Layout, start: int = 0,
             **options: object) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x.numpy(), y.numpy()) for x, y in data.windows(files, layout, start=start, **options)]


def test_windows_continue_each_stream_and_labels_shift_by_one(tmp_path, make_data_dir) -> None:
    data_dir, prefix, metadata = make_data_dir(tmp_path)
    stream = _train_ids(data_dir, prefix)
    assert len(stream) == metadata.splits["train"].tokens
    layout = data.layout_for(len(stream), batch_size=3, unroll_steps=7)
    windows = _windows(data.shard_files(data_dir, prefix, "train"), layout)
    assert len(windows) == layout.windows_per_epoch > 1
    inputs = np.concatenate([x for x, _ in windows], axis=1)
    labels = np.concatenate([y for _, y in windows], axis=1)
    row = layout.windows_per_chunk * 7 + 1  # tokens per stream, its last one only a label
    for b in range(3):  # one chunk here: the classic [batch, tokens/batch] layout
        expected = stream[b * row: b * row + inputs.shape[1] + 1]
        np.testing.assert_array_equal(inputs[b], expected[:-1])
        np.testing.assert_array_equal(labels[b], expected[1:])


def test_chunked_layout_streams_in_pieces(tmp_path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    stream = _train_ids(data_dir, prefix)
    layout = data.layout_for(len(stream), batch_size=2, unroll_steps=5, max_chunk_tokens=300)
    assert layout.chunks > 1
    windows = _windows(data.shard_files(data_dir, prefix, "train"), layout)
    assert len(windows) == layout.windows_per_epoch
    # Chunk k holds the next chunk_tokens tokens of the stream, laid out as [batch, row].
    second = windows[layout.windows_per_chunk]
    row_length = layout.windows_per_chunk * 5 + 1
    np.testing.assert_array_equal(second[0][1], stream[layout.chunk_tokens + row_length:][:5])


def test_start_resumes_at_the_exact_window(tmp_path, make_data_dir) -> None:
    data_dir, prefix, metadata = make_data_dir(tmp_path)
    files = data.shard_files(data_dir, prefix, "train")
    layout = data.layout_for(metadata.splits["train"].tokens, 2, 5, max_chunk_tokens=300)
    everything = _windows(files, layout)
    for start in (1, layout.windows_per_chunk, layout.windows_per_chunk + 2):
        resumed = _windows(files, layout, start=start)
        assert len(resumed) == len(everything) - start
        np.testing.assert_array_equal(resumed[0][0], everything[start][0])


def test_random_starts_cut_each_row_anywhere_in_its_chunk_reproducibly(tmp_path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    stream = _train_ids(data_dir, prefix)
    files = data.shard_files(data_dir, prefix, "train")
    layout = data.layout_for(len(stream), batch_size=2, unroll_steps=5, max_chunk_tokens=300)
    assert layout.chunks > 1
    drawn = _windows(files, layout, shuffle_seed=4, random_starts=True)
    assert len(drawn) == layout.windows_per_epoch
    stream = np.concatenate([r.numpy() for r in data.token_stream(files, shuffle_seed=4)])  # its order
    starts = []
    for index, (inputs, labels) in enumerate(drawn):
        chunk = stream[(index // layout.windows_per_chunk) * layout.chunk_tokens:][:layout.chunk_tokens]
        for x, y in zip(inputs, labels, strict=True):
            # Each row is 6 consecutive tokens of its own chunk, labels shifted by one.
            matches = [s for s in range(len(chunk) - 5)
                       if np.array_equal(chunk[s:s + 5], x) and np.array_equal(chunk[s + 1:s + 6], y)]
            assert matches, (index, x, y)
            starts.append(matches[0])
    assert len(set(starts)) > len(starts) // 2  # drawn, not a handful of fixed streams
    again = _windows(files, layout, shuffle_seed=4, random_starts=True)
    np.testing.assert_array_equal(np.stack([x for x, _ in again]), np.stack([x for x, _ in drawn]))
    other = _windows(files, layout, shuffle_seed=5, random_starts=True)
    assert not np.array_equal(np.stack([x for x, _ in other]), np.stack([x for x, _ in drawn]))
    for start in (1, layout.windows_per_chunk + 2):
        resumed = _windows(files, layout, start=start, shuffle_seed=4, random_starts=True)
        np.testing.assert_array_equal(np.stack([x for x, _ in resumed]),
                                      np.stack([x for x, _ in drawn[start:]]))


def test_unroll_longer_than_the_data_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--unroll_steps=500"):
        data.layout_for(1000, batch_size=4, unroll_steps=500)


def test_missing_data_dir_and_prefix_name_the_flag(tmp_path, make_data_dir) -> None:
    with pytest.raises(UsageError, match="--data_dir is missing"):
        data.read_metadata("", "tiny")
    data_dir, _, _ = make_data_dir(tmp_path)
    with pytest.raises(UsageError, match="prefixes there: tiny"):
        data.read_metadata(data_dir, "other")
    with pytest.raises(UsageError, match="no train shards"):
        data.shard_files(str(tmp_path), "tiny", "train")


def test_a_shard_that_cannot_be_read_names_the_data_dir(tmp_path) -> None:
    # Root reads any file, so the permission error is raised as TensorFlow raises it.
    import tensorflow as tf

    with pytest.raises(UsageError, match=r"--data_dir=d: cannot read a shard \(d/x.tfrecord.gz; Permission"):
        with data.reading_shards("d", "x"):
            raise tf.errors.PermissionDeniedError(None, None, "{{function_node f}} d/x.tfrecord.gz; "
                                                  "Permission denied [Op:IteratorGetNext]")


def test_a_damaged_shard_is_named(tmp_path, make_data_dir) -> None:
    from pathlib import Path

    data_dir, prefix, _ = make_data_dir(tmp_path)
    shard = sorted(Path(data_dir).glob(f"{prefix}.valid-*"))[0]
    shard.write_bytes(shard.read_bytes()[:-20])  # cut inside the last record
    assert data.damaged_shards(data_dir, prefix) == [str(shard)]
    with pytest.raises(UsageError, match=rf"{shard}: damaged \(.*\); run preprocessing.run again"):
        with data.reading_shards(data_dir, prefix):
            for _ in data.token_stream([str(shard)]):
                pass


def test_windows_are_not_autotuned(tmp_path, make_data_dir) -> None:
    # An autotuned iterator dropped before its end blocked ~30 s in its destructor (trainer.data).
    data_dir, prefix, metadata = make_data_dir(tmp_path)
    dataset = data.windows(data.shard_files(data_dir, prefix, "train"),
                           data.layout_for(metadata.splits["train"].tokens, 2, 8))
    assert dataset.options().autotune.enabled is False


def test_shards_are_assigned_to_readers_by_their_token_counts() -> None:
    assert data.assign_shards([5, 5, 3, 3, 2, 2], 2) == [[0, 2, 4], [1, 3, 5]]
    assert data.assign_shards([9, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    shards = data.assign_shards([7, 3, 8, 2, 6, 4, 5, 1], 4)
    assert sorted(i for own in shards for i in own) == list(range(8))
    loads = [sum([7, 3, 8, 2, 6, 4, 5, 1][i] for i in own) for own in shards]
    assert max(loads) - min(loads) <= 8  # one shard at most


def test_readers_divide_the_shards_or_say_why_not(tmp_path, make_data_dir) -> None:
    import dataclasses

    data_dir, prefix, metadata = make_data_dir(tmp_path, shards=8, record_tokens=32)
    files, stats = data.shard_files(data_dir, prefix, "train"), metadata.splits["train"]
    one = data.plan_reading(files, stats, 4, 5)
    assert one.readers == 1 and one.files == (tuple(files),) and not one.note
    assert one.layout == one.local == data.layout_for(stats.tokens, 4, 5)

    two = data.plan_reading(files, stats, 4, 5, readers=2)
    assert two.readers == 2 and sorted(sum(two.files, ())) == files
    assert (two.layout.batch_size, two.local.batch_size) == (4, 2)
    assert two.layout.windows_per_epoch == two.local.windows_per_epoch > 0
    assert "2 workers each read their own 4-4 of the 8 train shards" in two.note
    # Each reader's windows are the classic layout of its own shards' stream, its rows only.
    reader_windows = data.reader_windows(two)
    for reader in range(2):
        stream = np.concatenate([r.numpy() for r in data.token_stream(list(two.files[reader]))])
        windows = [x.numpy() for x, _ in reader_windows(reader)]
        assert len(windows) == two.layout.windows_per_epoch and windows[0].shape == (2, 5)
        row = two.local.windows_per_chunk * 5 + 1
        for b in range(2):
            np.testing.assert_array_equal(windows[0][b], stream[b * row:b * row + 5])
        resumed = [x.numpy() for x, _ in data.reader_windows(two, start=3)(reader)]
        np.testing.assert_array_equal(np.stack(resumed), np.stack(windows[3:]))

    assert "cannot be divided between 16 workers" in data.plan_reading(files, stats, 16, 5, readers=16).note
    old = dataclasses.replace(stats, shard_tokens=())
    whole = data.plan_reading(files, old, 4, 5, readers=2)
    assert whole.readers == 1 and whole.layout == one.layout and "no per-shard token counts" in whole.note
