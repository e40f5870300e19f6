"""The Beam job end to end on tiny corpora written here, its splits, its outputs and its errors.

Every shard is read back with tf.data through the contract's parser; the records, put back in
order, must rebuild exactly the text each book holds between its Project Gutenberg markers.
"""

from __future__ import annotations

import codecs
import json
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from preprocessing import contract, run, splits, tokenizers

# ---------------------------------------------------------------------------------------------
# Tiny corpora: every line is numbered, so any run of records has one place in its book.

BOOK1 = "".join(f"Line {i} of the first book: a café, “quoted” — naïve text.\n" + ("\n" if i % 7 == 6 else "")
                for i in range(120))
BOOK2 = "".join(f"Row {i}, the second book said “hello” — it’s fine.\n" for i in range(150))


def _gutenberg(body: str, form: str) -> str:
    return (f"The Project Gutenberg eBook of X\n\n*** START OF {form} PROJECT GUTENBERG EBOOK X ***\n\n\n"
            + body + f"\n\n*** END OF {form} PROJECT GUTENBERG EBOOK X ***\n\nSection 1. General Terms\n")


def write_books(directory: Path) -> Path:
    """A UTF-8 BOM book (decomposed accents), a cp1252 CRLF book, an empty and a binary file."""
    directory.mkdir(parents=True, exist_ok=True)
    decomposed = unicodedata.normalize("NFD", _gutenberg(BOOK1, "THE"))
    (directory / "book1.txt").write_bytes(codecs.BOM_UTF8 + decomposed.encode("utf-8"))
    (directory / "book2.txt").write_bytes(_gutenberg(BOOK2, "THIS").replace("\n", "\r\n").encode("cp1252"))
    (directory / "empty.txt").write_bytes(b"")
    (directory / "binary.txt").write_bytes(bytes(range(256)) * 8)
    return directory


def read_split(out: Path, prefix: str, split: str) -> tuple[list[np.ndarray], int]:
    """(records, number of shard files) of one split, read with tf.data and the contract parser."""
    import tensorflow as tf

    files = sorted(str(p) for p in out.glob(f"{prefix}.{split}-*-of-*{contract.SHARD_SUFFIX}"))
    if not files:
        return [], 0
    dataset = tf.data.TFRecordDataset(files, compression_type="GZIP").map(contract.parse_example)
    return list(dataset.as_numpy_iterator()), len(files)


def shard_tokens(out: Path, prefix: str, split: str) -> list[int]:
    """Tokens in each shard file of a split, in shard order."""
    files = sorted(str(p) for p in out.glob(f"{prefix}.{split}-*-of-*{contract.SHARD_SUFFIX}"))
    return [sum(len(r) for r in read_shard(f)) for f in files]


def read_shard(path: str) -> list[np.ndarray]:
    """One shard's records in file order."""
    import tensorflow as tf

    dataset = tf.data.TFRecordDataset(path, compression_type="GZIP").map(contract.parse_example)
    return list(dataset.as_numpy_iterator())


def tile(document: Sequence[Any], pool: Counter[Any]) -> bool:
    """Consumes from `pool` records that laid end to end form `document` (backtracking)."""
    def place(pos: int) -> bool:
        if pos == len(document):
            return True
        for record in sorted((r for r, n in pool.items() if n > 0), key=len, reverse=True):
            if document[pos:pos + len(record)] == record:
                pool[record] -= 1
                if place(pos + len(record)):
                    return True
                pool[record] += 1
        return False
    return place(0)


def run_job(tmp_path: Path, *extra: str, books: Path | None = None, prefix: str = "tiny") -> tuple[
        contract.Metadata, Path]:
    books = books or write_books(tmp_path / "books")
    out = tmp_path / "out"
    metadata = run.run_preprocessing(["--input", f"{books}/*.txt", "--output_dir", str(out),
                                      "--data_prefix", prefix, "--record_tokens", "100", *extra])
    return metadata, out


def check_outputs(metadata: contract.Metadata, out: Path,
                  prefix: str = "tiny") -> dict[str, list[np.ndarray]]:
    """Shards, vocab and metadata agree with each other and with the contract."""
    assert contract.metadata_from_json((out / f"{prefix}.metadata.json").read_text()) == metadata
    vocab_lines = (out / f"{prefix}.vocab.txt").read_text().split("\n")[:-1]
    assert vocab_lines == [contract.escape_token(t) for t in metadata.vocab]
    records = {}
    for split in contract.SPLITS:
        records[split], shards = read_split(out, prefix, split)
        stats = metadata.splits[split]
        assert stats.tokens == sum(len(r) for r in records[split]) > 0, split
        assert (stats.records, stats.shards) == (len(records[split]), shards)
        assert all(0 < len(r) <= 100 for r in records[split])
        assert list(stats.shard_tokens) == shard_tokens(out, prefix, split)
    assert not list(out.glob(".*")), "the temporary directory was left behind"
    return records


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("mode", ["in_memory", pytest.param("multi_processing", marks=pytest.mark.slow)])
def test_char_job_end_to_end(tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    workers = ["--direct_running_mode", mode, "--direct_num_workers", "2"] if mode != "in_memory" else []
    metadata, out = run_job(tmp_path, "--tokenizer", "char", *workers)
    records = check_outputs(metadata, out)

    assert metadata.documents == 2
    assert {s["path"].rsplit("/", 1)[-1]: s["reason"].split(":")[0] for s in metadata.skipped} == {
        "empty.txt": "empty file", "binary.txt": "binary"}
    assert metadata.sources == {"input": (f"{tmp_path}/books/*.txt",)}
    assert metadata.vocab[0] == contract.UNK and "“" in metadata.vocab and "\r" not in metadata.vocab
    tok = tokenizers.tokenizer_from_metadata(metadata)
    pool = Counter(tok.decode(r) for split in contract.SPLITS for r in records[split])
    assert tile(BOOK1, pool) and tile(BOOK2, pool)
    assert not +pool, "records that belong to neither book"
    summary = capsys.readouterr().out
    assert "2 read, 2 skipped, 1 not UTF-8" in summary and "MB/s" in summary


def test_byte_job_rebuilds_the_utf8_bytes(tmp_path: Path) -> None:
    metadata, out = run_job(tmp_path, "--tokenizer", "byte", "--lowercase")
    records = check_outputs(metadata, out)
    assert metadata.vocab == tokenizers.byte_vocab() and metadata.lowercase
    pool = Counter(bytes(r.tolist()) for split in contract.SPLITS for r in records[split])
    assert tile(BOOK1.lower().encode(), pool) and tile(BOOK2.lower().encode(), pool)
    assert not +pool


def _awd_lstm_lm_tokens(path: Path) -> list[str]:
    """What awd-lstm-lm's data.py makes of a file: `line.split() + ['<eos>']` for every line."""
    with open(path, encoding="utf-8") as f:
        return [word for line in f for word in line.split() + [contract.EOS]]


def test_presplit_word_job_with_line_eos_then_vocab_from(tmp_path: Path) -> None:
    data = tmp_path / "ptb"
    data.mkdir()
    # PTB/WikiText style: pre-tokenized, a blank first line (WikiText's " \n"), tokens with dots,
    # apostrophes and @-@ that --line_eos (whitespace split) keeps whole.
    train = " \n" + " the cat sat on the mat 's \n the u.s. dog sat <unk> @-@ \n" * 20 + " \n"
    (data / "train.txt").write_text(train)
    (data / "valid.txt").write_text(" the zebra sat \n")
    (data / "test.txt").write_text(" a cat \n the mat")  # no final newline: still one <eos>
    out = tmp_path / "out"
    metadata = run.run_preprocessing([
        *(arg for s in contract.SPLITS for arg in (f"--{s}", str(data / f"{s}.txt"))),
        "--output_dir", str(out), "--data_prefix", "ptb", "--tokenizer", "word", "--line_eos",
        "--record_tokens", "100"])
    records = check_outputs(metadata, out, "ptb")
    assert metadata.vocab[:2] == (contract.UNK, contract.EOS) and metadata.word_split == "whitespace"
    assert set(metadata.vocab) == {contract.UNK, contract.EOS, "the", "cat", "sat", "on", "mat", "dog",
                                   "'s", "u.s.", "@-@"}
    # PTB counting, as awd-lstm-lm: words plus one <eos> per line, blank lines included.
    for split in contract.SPLITS:
        awd = _awd_lstm_lm_tokens(data / f"{split}.txt")
        assert metadata.splits[split].tokens == len(awd), split
    tok = tokenizers.tokenizer_from_metadata(metadata)
    train_ids = np.concatenate(records["train"])
    assert Counter(tok.vocab[i] for i in train_ids) == Counter(_awd_lstm_lm_tokens(data / "train.txt"))
    # Valid/test words unseen in train are <unk>.
    assert [tok.decode(r) for r in records["valid"]] == ["the <unk> sat\n"]
    assert [tok.decode(r) for r in records["test"]] == ["<unk> cat\nthe mat\n"]
    assert metadata.sources == {s: (str(data / f"{s}.txt"),) for s in contract.SPLITS}

    new = tmp_path / "new"
    new.mkdir()
    (new / "more.txt").write_text("the cat sat on a hat\n" * 30)
    again = run.run_preprocessing(["--input", str(new / "more.txt"), "--output_dir", str(tmp_path / "ft"),
                                   "--data_prefix", "ft", "--vocab_from", str(out / "ptb"),
                                   "--record_tokens", "100"])
    assert (again.vocab, again.tokenizer, again.line_eos, again.word_split) == (
        metadata.vocab, "word", True, "whitespace")
    ft_records = check_outputs(again, tmp_path / "ft", "ft")
    ids = np.concatenate([r for s in contract.SPLITS for r in ft_records[s]])
    assert np.count_nonzero(ids == 0) == 2 * 30  # "a" and "hat" are unknown to the old vocabulary

    job_dir = tmp_path / "job"  # a trainer job dir keeps its data's metadata as metadata.json
    job_dir.mkdir()
    (job_dir / "metadata.json").write_text((out / "ptb.metadata.json").read_text())
    options, _ = run.parse_args(["--input", str(new / "more.txt"), "--output_dir", str(tmp_path / "x"),
                                 "--data_prefix", "x", "--vocab_from", str(job_dir), "--tokenizer", "word"])
    assert options.vocab == metadata.vocab and options.line_eos and options.word_split == "whitespace"
    with pytest.raises(run.UsageError, match="--word_split pattern conflicts with --vocab_from"):
        run.parse_args(["--input", str(new / "more.txt"), "--output_dir", str(tmp_path / "x"),
                        "--data_prefix", "x", "--vocab_from", str(job_dir), "--word_split", "pattern"])


def test_word_split_flag_defaults() -> None:
    def split(*flags: str) -> str:
        options, _ = run.parse_args(["--input", "a.txt", "--output_dir", "out", "--data_prefix", "x",
                                     "--tokenizer", "word", *flags])
        return options.word_split

    assert split() == "pattern"  # raw books
    assert split("--line_eos") == "whitespace"  # PTB/WikiText style implies pre-tokenized text
    assert split("--line_eos", "--word_split", "pattern") == "pattern"
    assert split("--word_split", "whitespace") == "whitespace"


def test_rerun_replaces_stale_shards_and_a_crash_keeps_the_previous_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f"tiny.train-00003-of-00007{contract.SHARD_SUFFIX}"
    stale.write_bytes(b"old")
    metadata, _ = run_job(tmp_path, "--tokenizer", "char")
    assert not stale.exists()
    check_outputs(metadata, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(*_: Any, **__: Any) -> Any:
        raise RuntimeError("worker lost")

    monkeypatch.setattr(run._EncodeFn, "process", crash)
    with pytest.raises(Exception, match="worker lost"):
        run_job(tmp_path, "--tokenizer", "char", "--seed", "3")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit code 2, nothing written


def test_no_usable_input_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    books = tmp_path / "books"
    books.mkdir()
    (books / "empty.txt").write_bytes(b"")
    (books / "binary.txt").write_bytes(b"\x00\x01" * 100)
    with pytest.raises(SystemExit) as exit_info:
        run.main(["--input", f"{books}/*", "--output_dir", str(tmp_path / "out"), "--data_prefix", "x",
                  "--tokenizer", "char"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("preprocessing.run: error: no usable input: all 2 matched files were skipped")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize(("args", "message"), [
    (["--input", "{tmp}/nothing-*.txt"], "matches no files"),
    (["--input", "{tmp}"], "matches the directory"),
    (["--input", "{tmp}/a.txt", "--train", "{tmp}/a.txt"], "not both"),
    ([], "no input"),
    (["--input", "{tmp}/a.txt", "--tokeniser", "char"], "unknown flag --tokeniser"),
    (["--input", "{tmp}/a.txt", "--direct_running_mode", "multi_threading"], "multi_threading"),
    (["--input", "{tmp}/a.txt", "--valid_fraction", "0.6", "--test_fraction", "0.5"], "leave something"),
    (["--input", "{tmp}/a.txt", "--line_eos"], "--line_eos needs --tokenizer word"),
    (["--input", "{tmp}/a.txt", "--word_split", "whitespace"], "--word_split needs --tokenizer word"),
    (["--input", "{tmp}/a.txt", "--tokenizer", "word", "--word_split", "spaces"], "invalid choice"),
    (["--input", "{tmp}/a.txt", "--vocab_from", "{tmp}/missing"], "missing.metadata.json or"),
    (["--input", "{tmp}/a.txt", "--tokenizer", "sentencepiece"], "invalid choice"),
])
def test_bad_flags_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                       message: str) -> None:
    (tmp_path / "a.txt").write_text("some text\n")
    argv = [a.format(tmp=tmp_path) for a in args]
    argv += ["--output_dir", str(tmp_path / "out"), "--data_prefix", "x"]
    if "--tokenizer" not in argv and "--tokeniser" not in argv:
        argv += ["--tokenizer", "char"]
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("preprocessing.run: error:") and message in err, err


def test_splits_are_cut_into_shards_of_bounded_text_each_counted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(contract, "SHARD_CHARACTERS", 3000)
    metadata, out = run_job(tmp_path, "--tokenizer", "char", "--valid_fraction", "0.1")
    records = check_outputs(metadata, out)
    train, valid = metadata.splits["train"], metadata.splits["valid"]
    assert train.shards == contract.shards_for(train.characters) >= 4
    assert valid.shards == contract.shards_for(valid.characters) >= 1
    assert max(train.shard_tokens) <= 3000 + 100  # at most one record over the mean share
    assert max(train.shard_tokens) - min(train.shard_tokens) <= 100
    names = sorted(p.name for p in out.glob("tiny.train-*"))
    assert names == [f"tiny.train-{i:05d}-of-{train.shards:05d}{contract.SHARD_SUFFIX}"
                     for i in range(train.shards)]
    # A book's records stay together and in order inside a shard: shard 0 holds the start of book 1.
    tok = tokenizers.tokenizer_from_metadata(metadata)
    cursor, shard0 = 0, read_shard(str(out / names[0]))
    for record in shard0:
        cursor = BOOK1.index(tok.decode(record), cursor) + len(record)
    assert len(shard0) > 10
    pool = Counter(tok.decode(r) for split in contract.SPLITS for r in records[split])
    assert tile(BOOK1, pool) and tile(BOOK2, pool) and not +pool

    # --num_shards overrides, per split or for all; a split never gets more shards than records.
    metadata, out = run_job(tmp_path, "--tokenizer", "char", "--num_shards", "train=3,valid=2")
    check_outputs(metadata, out)
    assert [metadata.splits[s].shards for s in contract.SPLITS] == [3, 2, 1]
    metadata, out = run_job(tmp_path, "--tokenizer", "char", "--num_shards", "100000")
    check_outputs(metadata, out)
    assert [metadata.splits[s].shards for s in contract.SPLITS] == [
        metadata.splits[s].records for s in contract.SPLITS]


@pytest.mark.parametrize("value", ["0", "train=x", "dev=2", "train=2,valid"])
def test_bad_num_shards_is_a_one_line_error(value: str) -> None:
    with pytest.raises(run.UsageError, match="--num_shards"):
        run.parse_args(["--input", "a.txt", "--output_dir", "o", "--data_prefix", "x", "--tokenizer", "char",
                        "--num_shards", value])


def test_shard_plan_balances_and_keeps_documents_together() -> None:
    plan = {"a": (("train", 0, 100), ("train", 100, 200), ("valid", 200, 250), ("train", 250, 300)),
            "b": (("train", 0, 100), ("train", 100, 150))}
    counts, shards = splits.shard_plan(plan, {"train": 2, "valid": 5, "test": 3})
    assert counts == {"train": 2, "valid": 1, "test": 1}
    assert shards == {"a": (0, 0, 0, 1), "b": (1, 1)}
    assert splits.split_characters(plan, {"a": 2.0}) == {"train": 650, "valid": 100, "test": 0}


def test_metadata_without_shard_tokens_still_reads() -> None:
    body = json.loads(contract.metadata_to_json(contract.Metadata(
        tokenizer="char", vocab=("a", "b"),
        splits={s: contract.SplitStats(10, 1, 1, shard_tokens=(10,)) for s in contract.SPLITS})))
    assert contract.metadata_from_json(json.dumps(body)).splits["train"].shard_tokens == (10,)
    for stats in body["splits"].values():
        del stats["shard_tokens"]
    assert contract.metadata_from_json(json.dumps(body)).splits["train"].shard_tokens == ()
    body["splits"]["train"]["shard_tokens"] = [4, 5]
    with pytest.raises(contract.ContractError, match="do not add up"):
        contract.metadata_from_json(json.dumps(body))


# ---------------------------------------------------------------------------------------------
# Pieces


def test_encode_example_is_byte_identical_to_tensorflow() -> None:
    rng = np.random.default_rng(0)
    for ids in ([], [0], [127, 128, 16383, 16384, 2**21, 2**40, 2**63 - 1],
                rng.integers(0, 70, 5000), rng.integers(0, 300_000, 5000)):
        assert contract.encode_example(ids) == contract.serialize_example([int(i) for i in ids])


def _docs(sizes: Sequence[int]) -> list[splits.Document]:
    return [splits.Document(f"/books/{i}.txt", n, f"digest{i}") for i, n in enumerate(sizes)]


def _flatten(plan: dict[str, tuple[splits.Span, ...]]) -> list[tuple[str, str, int, int]]:
    return [(path, *span) for path, spans in plan.items() for span in spans]


def test_split_plan_is_deterministic_disjoint_and_complete() -> None:
    docs = _docs([10_000, 3_000, 57_000, 1])
    plan = splits.plan(docs, 0.1, 0.05, seed=7, record_tokens=500)
    assert plan == splits.plan(list(reversed(docs)), 0.1, 0.05, seed=7, record_tokens=500)
    assert plan != splits.plan(docs, 0.1, 0.05, seed=8, record_tokens=500)
    for doc in docs:  # the spans of a document tile it exactly once: no token in two splits
        spans = plan[doc.path]
        assert [s[1] for s in spans] == [0] + [s[2] for s in spans[:-1]] and spans[-1][2] == doc.tokens
        assert all(0 < end - start <= 500 for _, start, end in spans)
    totals = splits.split_tokens(plan)
    total = sum(d.tokens for d in docs)
    assert sum(totals.values()) == total
    assert abs(totals["valid"] / total - 0.1) < 0.02 and abs(totals["test"] / total - 0.05) < 0.02


def test_small_corpora_still_fill_valid_and_test() -> None:
    for size in (3, 50, 2_000):
        totals = splits.split_tokens(splits.plan(_docs([size]), 0.05, 0.05, seed=0))
        assert all(totals[s] > 0 for s in contract.SPLITS), (size, totals)
    assert splits.split_counts(2, 0.1, 0.1) == (1, 1, 0)
    assert splits.split_counts(1, 0.1, 0.1) == (1, 0, 0)
    assert splits.split_counts(0, 0.1, 0.1) == (0, 0, 0)


def test_identical_files_get_identical_assignments() -> None:
    a, b = (splits.Document(p, 40_000, "same") for p in ("/x/a.txt", "/y/b.txt"))
    plan = splits.plan([a, b, *_docs([40_000])], 0.1, 0.1, seed=1, record_tokens=1_000)
    assert plan[a.path] == plan[b.path]


def test_presplit_documents_keep_their_split() -> None:
    docs = [splits.Document("/t.txt", 250, "t", "train"), splits.Document("/v.txt", 30, "v", "valid")]
    plan = splits.plan(docs, 0.1, 0.1, seed=0, record_tokens=100)
    assert plan == {"/t.txt": (("train", 0, 100), ("train", 100, 200), ("train", 200, 250)),
                    "/v.txt": (("valid", 0, 30),)}


def test_stats_file_is_json_the_driver_reads(tmp_path: Path) -> None:
    """The work dir's stats are plain JSON, so a Dataflow driver can commit without Beam state."""
    metadata, out = run_job(tmp_path, "--tokenizer", "char", "--valid_fraction", "0.2")
    body = json.loads((out / "tiny.metadata.json").read_text())
    assert body["splits"]["valid"]["tokens"] == metadata.splits["valid"].tokens
    assert metadata.splits["valid"].tokens > metadata.splits["test"].tokens


def test_parts_of_a_shard_join_into_one_readable_gzip_file(tmp_path: Path) -> None:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.io.tfrecordio import _TFRecordUtil

    parts = []
    for name, values in (("p1", [[1, 2], [3]]), ("p2", [[4, 5, 6]]), ("p3", [])):
        path = str(tmp_path / name)
        with FileSystems.create(path, compression_type=CompressionTypes.GZIP) as f:
            for ids in values:
                _TFRecordUtil.write_record(f, contract.encode_example(ids))
        parts.append(path)
    target = str(tmp_path / "shard.tfrecord.gz")
    run._concatenate(parts, target)
    assert [r.tolist() for r in read_shard(target)] == [[1, 2], [3], [4, 5, 6]]
    run._concatenate([parts[0]], str(tmp_path / "one.gz"))
    run._concatenate([parts[0]], str(tmp_path / "one.gz"))  # a retried bundle: already done
    assert [r.tolist() for r in read_shard(str(tmp_path / "one.gz"))] == [[1, 2], [3]]
