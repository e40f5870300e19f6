"""Learned subword tokenizers (bpe, unigram): learning, round trips, the Beam job, the trainer's
tools and the exported SavedModel's in-graph tokenizer, on tiny corpora written here."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import unicodedata
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from test_preprocessing import BOOK1, BOOK2, check_outputs, read_split, run_job, tile, write_books

from preprocessing import contract, run, subword, tokenizers

KINDS = ("bpe", "unigram")
# Training text for the unit tests: a few KB, several hundred pieces' worth.
TEXT = BOOK1 + BOOK2
UNSEEN = "Ωμέγα 😀 → naïve\ttabs  and   spaces\n\n\nZ"


@pytest.fixture(scope="module")
def models() -> dict[str, bytes]:
    return {kind: subword.learn(kind, [TEXT], 400) for kind in KINDS}


def _tokenizer(models: dict[str, bytes], kind: str) -> subword.SubwordTokenizer:
    return subword.SubwordTokenizer(kind, models[kind])


# ---------------------------------------------------------------------------------------------
# The tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_any_text_round_trips_through_byte_pieces(models: dict[str, bytes], kind: str) -> None:
    tok = _tokenizer(models, kind)
    assert tok.vocab_size == 400 and tok.vocab[0] == contract.UNK and contract.NEWLINE in tok.vocab
    for text in (TEXT, UNSEEN, "", " ", "\n"):
        ids = tok.encode(text)
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    # Subwords: fewer tokens than characters, and whole frequent words as one piece.
    assert len(tok.encode(TEXT)) < 0.8 * len(TEXT)
    assert "▁book" in tok.pieces(" book")
    # Characters never seen become their UTF-8 bytes' pieces.
    assert [tok.vocab[i] for i in tok.encode("😀")] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_decoder_holds_a_character_until_its_last_byte_piece(models: dict[str, bytes]) -> None:
    tok = _tokenizer(models, "bpe")
    ids = tok.encode("a😀")
    decoder = tok.decoder()
    assert [decoder.push(i) for i in ids] == ["a", "", "", "", "😀"]
    cut = tok.decoder()
    assert "".join(cut.push(i) for i in ids[:3]) + cut.flush() == "a\ufffd"


def test_tokenizer_from_metadata_checks_the_vocabulary(models: dict[str, bytes]) -> None:
    tok = _tokenizer(models, "unigram")
    with pytest.raises(contract.ContractError, match="differ from the metadata"):
        subword.SubwordTokenizer("unigram", models["unigram"], tok.vocab[:-1] + ("other",))
    with pytest.raises(contract.ContractError, match="needs its tokenizer file"):
        tokenizers.make_tokenizer("bpe", tok.vocab)


@pytest.mark.parametrize(("texts", "size", "message"), [
    ([TEXT], 100_000,
     r"--vocab_size 100000 is more pieces than the training text supports \(at most \d+\)"),
    ([TEXT], 270, r"--vocab_size 270 is too small: .* at least \d+"),
    (["", "\n"], 300, "the training split has no text"),
])
def test_learning_errors_say_what_to_change(texts: list[str], size: int, message: str) -> None:
    for kind in KINDS:
        with pytest.raises(subword.LearnError, match=message):
            subword.learn(kind, texts, size)


# ---------------------------------------------------------------------------------------------
# The export's tokenizer in TensorFlow ops


@pytest.mark.parametrize("kind", KINDS)
def test_graph_tokenizer_gives_sentencepieces_ids(models: dict[str, bytes], kind: str) -> None:
    import tensorflow as tf

    from trainer.graph_subword import SubwordGraph

    tok = _tokenizer(models, kind)
    graph = SubwordGraph(tok.piece_table())
    encode = tf.function(graph.encode, input_signature=[tf.TensorSpec([], tf.string)])
    lines = TEXT.split("\n")
    texts = ["", " ", "\n\n", UNSEEN, "<0x41> <unk>", "book book book book"]
    texts += ["\n".join(lines[i:i + 3]) for i in range(0, len(lines) - 3, 11)]
    for text in texts:
        ids = tok.encode_array(text).tolist()
        assert encode(tf.constant(text)).numpy().tolist() == ids, text
        assert graph.decode(tf.constant([ids], tf.int32)).numpy()[0].decode("utf-8") == text
    # A sample cut inside a character's bytes decodes to U+FFFD, as the Python decoder does.
    cut = tok.encode("a😀")[:3]
    assert graph.decode(tf.constant([cut], tf.int32)).numpy()[0].decode("utf-8") == tok.decode(cut)


# An NFD prime (as macOS input often is): the Python tokenizer composes it first (NFC).
NFD_PRIMES = [unicodedata.normalize("NFD", text) for text in
              ("Ωμέγα naïve café", "Ça été\r\nÉTÉ ǖ", "한국어 ḗ ố ṩ", "e\u0323\u0302 x\u0301")]


@pytest.mark.parametrize("kind", KINDS)
def test_an_nfd_prime_gets_the_same_ids_from_babble_serve_and_the_export(tmp_path: Path, kind: str) -> None:
    import tensorflow as tf
    from conftest import write_data_dir

    from trainer.export import MAX_BPE_PRIME_CHARS, GenerationModule
    from trainer.hparams import HParams
    from trainer.models import build_model
    from trainer.sampling import TextGenerator

    _, _, metadata = write_data_dir(tmp_path, TEXT, kind)
    shape = {"layers": 1, "lstm_state_size": 8, "embedding_size": 4}
    model = build_model(HParams(vocab_size=metadata.vocab_size, **shape))
    generator = TextGenerator(model, metadata)  # what babble and serve encode primes with
    # The function the SavedModel's signatures run (tests/test_export.py saves and loads them).
    prime_ids = tf.function(GenerationModule(model, metadata).prime_ids,
                            input_signature=[tf.TensorSpec([], tf.string)])
    for prime in NFD_PRIMES:
        composed = unicodedata.normalize("NFC", prime)
        assert prime != composed
        ids = generator.encode_prime(composed).ids
        assert generator.encode_prime(prime).ids == ids
        assert prime_ids(tf.constant(prime)).numpy().tolist() == ids, prime
    if kind == "bpe":  # quadratic in the graph: capped, and the message says why
        assert len(prime_ids(tf.constant("a b" * (MAX_BPE_PRIME_CHARS // 3))).numpy()) > 100
        with pytest.raises(tf.errors.InvalidArgumentError, match="grows with the square of the prime length"):
            prime_ids(tf.constant("x" * (MAX_BPE_PRIME_CHARS + 1)))


def test_graph_nfc_is_pythons_nfc() -> None:
    """Random strings of the characters that decompose, reorder or compose (and plain ones), half
    of them decomposed first, against `unicodedata.normalize`."""
    import random

    import tensorflow as tf

    from trainer.graph_nfc import GraphNFC, nfc_tables

    nfc = tf.function(GraphNFC().normalize, input_signature=[tf.TensorSpec([], tf.string)])
    decompositions, classes, _, seconds = nfc_tables()
    hangul = [chr(c) for c in (*range(0x1100, 0x1113), 0xAC00, 0xAC01, 0xD7A3)]
    pool = [*decompositions, *map(chr, classes), *map(chr, seconds), *hangul, *"aeoAEn ,\n"]
    rng = random.Random(0)
    texts = ["", "plain text", "\u0301x", "Zalgo" + "\u0301\u0323" * 300]
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 12))) for _ in range(600)]
    texts = [unicodedata.normalize("NFD", t) if i % 2 else t for i, t in enumerate(texts)]
    wrong = [t for t in texts
             if nfc(tf.constant(t)).numpy().decode("utf-8") != unicodedata.normalize("NFC", t)]
    assert not wrong, [[hex(ord(c)) for c in t] for t in wrong[:3]]


# ---------------------------------------------------------------------------------------------
# The Beam job


def test_bpe_job_learns_writes_and_counts_characters(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    metadata, out = run_job(tmp_path, "--tokenizer", "bpe", "--vocab_size", "400")
    records = check_outputs(metadata, out)
    model = (out / "tiny.tokenizer.model").read_bytes()
    assert metadata.tokenizer_file == "tiny.tokenizer.model"
    assert metadata.tokenizer_sha256 == hashlib.sha256(model).hexdigest()
    body = json.loads((out / "tiny.metadata.json").read_text())
    assert "tokenizer_model" not in body and body["tokenizer_file"] == "tiny.tokenizer.model"
    train_chars = metadata.splits["train"].characters
    assert metadata.tokenizer_sample == {"characters": train_chars, "limit": 20_000_000,
                                         "train_characters": train_chars}
    tok = tokenizers.tokenizer_from_metadata(contract.with_tokenizer_model(
        metadata, str(out / "tiny.metadata.json"), lambda path: Path(path).read_bytes()))
    assert tok.vocab == metadata.vocab and len(tok.vocab) == 400
    # Every record decodes to a piece of one book, the books are covered exactly, and each split
    # counts the characters its records decode to.
    texts = {split: [tok.decode(r) for r in records[split]] for split in contract.SPLITS}
    for split in contract.SPLITS:
        assert metadata.splits[split].characters == sum(map(len, texts[split])) > 0
    pool = Counter(t for split in contract.SPLITS for t in texts[split])
    assert tile(BOOK1, pool) and tile(BOOK2, pool) and not +pool
    summary = capsys.readouterr().out
    assert "characters per train token" in summary and "tokenizer learned from" in summary


@pytest.mark.parametrize("kind", ["char", "byte", "word"])
def test_every_tokenizer_counts_the_characters_of_its_splits(tmp_path: Path, kind: str) -> None:
    """Per-character losses need each split's characters, whatever unit its tokens are."""
    metadata, out = run_job(tmp_path, "--tokenizer", kind)
    records = check_outputs(metadata, out)
    characters = {split: stats.characters for split, stats in metadata.splits.items()}
    assert sum(characters.values()) == len(BOOK1) + len(BOOK2)
    if kind == "char":
        assert characters == {split: stats.tokens for split, stats in metadata.splits.items()}
    if kind == "byte":  # records may cut a character's bytes: count the bytes that start one
        assert characters == {split: sum(sum(1 for b in r if b & 0xC0 != 0x80) for r in records[split])
                              for split in contract.SPLITS}


def test_the_tokenizer_is_learned_from_the_training_split_only(tmp_path: Path) -> None:
    books = tmp_path / "books"
    books.mkdir()
    (books / "train.txt").write_text(BOOK1)
    # A word repeated so often that any tokenizer learning from this file would make it a piece.
    (books / "valid.txt").write_text("Zyxwvut quorbl.\n" * 300)
    (books / "test.txt").write_text(BOOK2)
    metadata = run.run_preprocessing([
        "--train", str(books / "train.txt"), "--valid", str(books / "valid.txt"),
        "--test", str(books / "test.txt"), "--output_dir", str(tmp_path / "out"), "--data_prefix", "p",
        "--tokenizer", "bpe", "--vocab_size", "400"])
    assert not any("Zyx" in piece or "quorbl" in piece for piece in metadata.vocab)
    assert metadata.tokenizer_sample["train_characters"] == len(BOOK1)
    # The valid text still encodes (byte fallback and small pieces) and round-trips.
    records, _ = read_split(tmp_path / "out", "p", "valid")
    tok = tokenizers.tokenizer_from_metadata(contract.with_tokenizer_model(
        metadata, str(tmp_path / "out" / "p.metadata.json"), lambda path: Path(path).read_bytes()))
    assert "".join(tok.decode(r) for r in records) == "Zyxwvut quorbl.\n" * 300


def test_the_sample_is_bounded(tmp_path: Path) -> None:
    metadata, _ = run_job(tmp_path, "--tokenizer", "bpe", "--vocab_size", "300",
                          "--tokenizer_sample_chars", "1")
    sample = metadata.tokenizer_sample
    # One block (16K characters) at most, however much training text there is.
    assert sample["limit"] == 1 and 0 < sample["characters"] <= run.SAMPLE_BLOCK_CHARS
    assert sample["train_characters"] == metadata.splits["train"].characters


def test_vocab_from_reuses_the_learned_tokenizer(tmp_path: Path) -> None:
    first, out = run_job(tmp_path, "--tokenizer", "bpe", "--vocab_size", "400")
    new = tmp_path / "new"
    new.mkdir()
    (new / "more.txt").write_text("A new book, with a café and words never seen: quorbl.\n" * 40)
    again = run.run_preprocessing(["--input", str(new / "more.txt"), "--output_dir", str(tmp_path / "ft"),
                                   "--data_prefix", "ft", "--vocab_from", str(out / "tiny")])
    assert (again.tokenizer, again.vocab, again.tokenizer_sha256) == (
        "bpe", first.vocab, first.tokenizer_sha256)
    assert again.tokenizer_sample == first.tokenizer_sample
    copied = (tmp_path / "ft" / "ft.tokenizer.model").read_bytes()
    assert copied == (out / "tiny.tokenizer.model").read_bytes()
    with pytest.raises(run.UsageError, match="--vocab_size 500 conflicts with --vocab_from"):
        run.parse_args(["--input", str(new / "more.txt"), "--output_dir", str(tmp_path / "x"),
                        "--data_prefix", "x", "--vocab_from", str(out / "tiny"), "--vocab_size", "500"])


def _main_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("preprocessing.run: error:"), err
    return err


def test_bad_subword_input_is_one_line_and_writes_nothing(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    books = write_books(tmp_path / "books")
    out = tmp_path / "out"
    err = _main_error(["--input", f"{books}/*.txt", "--output_dir", str(out), "--data_prefix", "x",
                       "--tokenizer", "unigram", "--vocab_size", "50000"], capsys)
    assert "--vocab_size 50000 is more pieces than the training text supports" in err
    assert not list(out.iterdir()), "nothing is written"
    # Pre-split input whose training files are all unusable: an empty training split.
    err = _main_error(["--train", str(books / "empty.txt"), "--valid", str(books / "book1.txt"),
                       "--output_dir", str(out), "--data_prefix", "x", "--tokenizer", "bpe"], capsys)
    assert "the training split has no text" in err
    assert not list(out.iterdir())
    # No usable file at all: the same message as for the other tokenizers.
    err = _main_error(["--input", str(books / "empty.txt"), "--output_dir", str(out), "--data_prefix", "x",
                       "--tokenizer", "bpe"], capsys)
    assert "no usable input: all 1 matched files were skipped" in err
    assert not list(out.iterdir())


def test_a_tokenizer_file_that_does_not_match_is_refused(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from trainer import data

    _, out = run_job(tmp_path, "--tokenizer", "bpe", "--vocab_size", "400")
    other = subword.learn("bpe", [TEXT], 300)
    (out / "tiny.tokenizer.model").write_bytes(other)
    with pytest.raises(contract.ContractError,
                       match=r"tiny.tokenizer.model does not match .*tiny.metadata.json"):
        data.read_metadata(str(out), "tiny")
    err = _main_error(["--input", str(out / "tiny.vocab.txt"), "--output_dir", str(tmp_path / "o"),
                       "--data_prefix", "o", "--vocab_from", str(out / "tiny")], capsys)
    assert "does not match" in err
    (out / "tiny.tokenizer.model").unlink()
    with pytest.raises(contract.ContractError, match="cannot read the tokenizer file"):
        data.read_metadata(str(out), "tiny")


@pytest.mark.slow
def test_the_tokenizer_file_travels_with_its_metadata_on_gcs(gcs_in_process: object, gcs_bucket: str,
                                                            tmp_path: Path) -> None:
    """Beam writes it to gs://, TensorFlow reads it back and copies it into a gs:// job dir, and
    --vocab_from finds it there through Beam again."""
    from trainer import checkpoints, data

    books = write_books(tmp_path / "books")
    written = run.run_preprocessing(["--input", f"{books}/book*.txt", "--output_dir", f"{gcs_bucket}/data",
                                     "--data_prefix", "g", "--tokenizer", "bpe", "--vocab_size", "400"])
    read = data.read_metadata(f"{gcs_bucket}/data", "g")
    assert hashlib.sha256(read.tokenizer_model).hexdigest() == written.tokenizer_sha256
    checkpoints.save_metadata(f"{gcs_bucket}/job", read)
    assert checkpoints.saved_metadata(f"{gcs_bucket}/job").tokenizer_model == read.tokenizer_model
    options, _ = run.parse_args(["--input", f"{books}/book1.txt", "--output_dir", str(tmp_path / "o"),
                                 "--data_prefix", "o", "--vocab_from", f"{gcs_bucket}/job"])
    assert (options.tokenizer, options.tokenizer_model) == ("bpe", read.tokenizer_model)


# ---------------------------------------------------------------------------------------------
# The trainer


def test_job_names_carry_the_learned_vocabulary() -> None:
    from trainer.hparams import ANY_VOCAB_SIZE, HParams, job_name

    base = HParams(data_prefix="books", layers=2, lstm_state_size=512)
    assert job_name(base.replace(language_model="bpe", vocab_size=8000)) == "books-512-states-2-layers-bpe8k"
    assert job_name(base.replace(language_model="unigram", vocab_size=500)).endswith("-unigram500")
    assert job_name(base.replace(language_model="bpe", vocab_size=ANY_VOCAB_SIZE)).endswith("-bpe*")
    assert job_name(base.replace(language_model="char", vocab_size=65)).endswith("-char")
    with pytest.raises(ValueError, match="needs vocab_size for a bpe model"):
        job_name(base.replace(language_model="bpe"))


def test_loaders_find_a_learned_vocabularys_job_dir_by_its_size(tmp_path: Path) -> None:
    from trainer import checkpoints
    from trainer.errors import UsageError
    from trainer.hparams import HPARAMS_FILE, HParams

    hparams = HParams(data_prefix="books", job_dir=str(tmp_path / "%JOB%"), layers=1, lstm_state_size=32)
    for name in ("books-32-states-1-layers-bpe8k", "books-32-states-1-layers-char"):
        (tmp_path / name).mkdir()
        (tmp_path / name / HPARAMS_FILE).write_text("{}")
    with pytest.raises(UsageError, match="--language_model=bpe or --language_model=char"):
        checkpoints.resolve_job_dir(hparams)
    found = checkpoints.resolve_job_dir(hparams.replace(language_model="bpe"))
    assert found == str(tmp_path / "books-32-states-1-layers-bpe8k")
    (tmp_path / "books-32-states-1-layers-bpe2k").mkdir()
    (tmp_path / "books-32-states-1-layers-bpe2k" / HPARAMS_FILE).write_text("{}")
    with pytest.raises(UsageError, match="with --vocab_size"):
        checkpoints.resolve_job_dir(hparams.replace(language_model="bpe"))
    found = checkpoints.resolve_job_dir(hparams.replace(language_model="bpe", vocab_size=2000))
    assert found == str(tmp_path / "books-32-states-1-layers-bpe2k")


def test_loss_per_character() -> None:
    from trainer.evaluate import per_character

    stats = contract.SplitStats(tokens=1000, records=1, shards=1, characters=3000)
    result = per_character(2.0, 900, stats)
    assert result["characters"] == 2700
    assert result["loss_per_char"] == pytest.approx(2.0 / 3)
    assert result["bits_per_char"] == pytest.approx(2.0 / 3 / 0.6931471805599453)
    assert per_character(2.0, 900, contract.SplitStats(tokens=1000, records=1, shards=1)) == {}


def test_bpe_from_books_to_a_savedmodel_that_tokenizes_without_verne(tmp_path: Path) -> None:
    """The whole chain on a tiny corpus: preprocessing.run --tokenizer bpe → training → evaluate
    → babble (CLI, %JOB% found without --data_dir) → the export's `generate` in a Python that
    cannot import verne, which must give babble's text for the same seed."""
    import tensorflow as tf
    from generation_job import Server, python_env
    from test_export import CLEAN_CLIENT, VERTEX_REQUEST

    from trainer import checkpoints, data, evaluate, runner
    from trainer.hparams import HParams
    from trainer.sampling import SamplingOptions, TextGenerator

    _, out = run_job(tmp_path, "--tokenizer", "bpe", "--vocab_size", "400")
    shape = {"layers": 1, "lstm_state_size": 32, "embedding_size": 16}
    hparams = HParams(data_dir=str(out), data_prefix="tiny", job_dir=str(tmp_path / "job" / "%JOB%"),
                      batch_size=4, unroll_steps=16, max_steps=20, eval_every=20, save_checkpoints_steps=20,
                      log_every=20, sample_every=0, **shape)
    trained = runner.train(hparams)
    job = trained.job_dir
    assert job.endswith("tiny-32-states-1-layers-bpe400-emb16")
    assert (Path(job) / "tiny.tokenizer.model").read_bytes() == (out / "tiny.tokenizer.model").read_bytes()

    result = evaluate.evaluate(job, write=False)
    assert result["loss_per_char"] < result["loss"] and result["characters"] > result["tokens"]
    # TensorBoard has the validation loss per character too, on the axis a char model's shares.
    events = [e for path in (Path(job) / "tensorboard").glob("events.out.tfevents.*")
              for e in tf.compat.v1.train.summary_iterator(str(path))]
    per_char = [tf.make_ndarray(v.tensor) for e in events for v in e.summary.value
                if v.tag == "eval/loss_per_char"]
    valid = data.read_metadata(str(out), "tiny").splits["valid"]
    assert valid.characters_per_token > 1
    assert per_char == [pytest.approx(trained.eval_loss / valid.characters_per_token, rel=1e-5)]

    flags = [f"--{name}={value}" for name, value in shape.items()]
    babble = subprocess.run([sys.executable, "-m", "trainer.babble", "--job-dir",
                             str(tmp_path / "job" / "%JOB%"), "--data_prefix", "tiny", *flags,
                             "--prime", "Line 3 of", "--length", "20", "--seed", "3"],
                            capture_output=True, text=True, env=python_env(), timeout=300)
    assert babble.returncode == 0, babble.stderr[-2000:]
    _, metadata, model = checkpoints.load_job(job)
    generator = TextGenerator(model, metadata)
    (expected,) = generator.generate("Line 3 of", 20, SamplingOptions(1.0, seed=3))
    assert expected in babble.stdout

    # The web service and its page, unchanged.
    server = Server(job)
    try:
        body = json.dumps({"prime": "Line 3 of", "length": 20, "seed": 3}).encode()
        request = urllib.request.Request(f"{server.url}/v1/generate", method="POST", data=body)
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["samples"] == [expected]
        with urllib.request.urlopen(f"{server.url}/ui", timeout=60) as response:
            assert "(bpe-level)" in response.read().decode("utf-8")
    finally:
        server.stop()

    # Fine-tuning on new text: the job dir's own tokenizer (--vocab_from JOB_DIR), --init_from.
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "more.txt").write_text("A new book, with a café and words never seen: quorbl.\n" * 60)
    tuned_data = run.run_preprocessing(["--input", str(tmp_path / "new" / "more.txt"), "--output_dir",
                                        str(tmp_path / "ft"), "--data_prefix", "ft", "--vocab_from", job])
    assert tuned_data.tokenizer_sha256 == metadata.tokenizer_sha256
    tuned = runner.train(hparams.replace(data_dir=str(tmp_path / "ft"), data_prefix="ft", max_steps=5,
                                         job_dir=str(tmp_path / "tuned" / "%JOB%"), init_from=job,
                                         eval_every=5, save_checkpoints_steps=5, log_every=5))
    assert tuned.job_dir.endswith("ft-32-states-1-layers-bpe400-emb16") and tuned.step == 5

    site_packages = str(Path(tf.__file__).parents[1])
    served = subprocess.run([sys.executable, "-S", "-I", "-c", CLEAN_CLIENT, site_packages,
                             str(Path(job) / "export"), json.dumps(VERTEX_REQUEST)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**python_env(), "PYTHONNOUSERSITE": "1"})
    assert served.returncode == 0, served.stderr[-3000:]
    answer = json.loads(served.stdout.strip().splitlines()[-1])
    # The graph must encode each prime to the tokenizer's own ids, or these samples would differ.
    assert answer["text"] == generator.generate("First Ciéizen", 40, SamplingOptions(0.8, seed=7), 2)
    for row, instance in zip(answer["rows"], VERTEX_REQUEST["instances"], strict=True):
        options = {k: instance[k] for k in ("temperature", "top_k", "top_p", "seed", "sample_mode", "no_unk")}
        assert [row] == generator.generate(instance["prime"], instance["length"], SamplingOptions(**options))
    assert answer["vocab"][0] == list(metadata.vocab)
