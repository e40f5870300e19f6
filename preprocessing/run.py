"""The Beam job: raw books → cleaned text → token ids → GZIP TFRecord shards + vocab + metadata.

    python -m preprocessing.run --input 'books/*.txt' --output_dir DIR --data_prefix NAME \\
        --tokenizer char|byte|word [options] [Beam pipeline options]

Our options are parsed here; everything else goes to Beam's PipelineOptions, so the same command
runs on Dataflow with `--runner DataflowRunner --project … --region … --temp_location gs://…
--setup_file ./setup.py` and gs:// inputs and output (`check_dataflow_options` refuses, in one
line, what Dataflow workers could not run). Without `--runner` (or with `--runner DirectRunner`)
the job runs on Beam's FnApiRunner directly — what DirectRunner falls back to — so an offline
machine does not first try to download the Prism runner. `--direct_running_mode
multi_processing --direct_num_workers N` is allowed; `multi_threading` is refused (it silently
dropped records in our measurements, see FINDINGS.md).

Shape of the job (per-element overhead dominates in Beam, so elements are whole files and
records are long): two passes over the files, each file one element.
1. survey: read, clean, count tokens per document → vocabulary (a combiner) and the split plan
   (document sizes only, see splits.py).
2. encode: read, clean, encode with the vocabulary (side input), cut into records along the plan,
   write each split as shards of at most ~32 MB of text (contract.shards_for, or --num_shards).
   The plan fixes which shard each record goes to (splits.shard_plan: consecutive records of a
   document stay together), so the metadata can count each shard's tokens. Each bundle writes
   one part per shard it meets and the parts of a shard are joined afterwards (a rename when
   there is one part, as in a local run): every worker writes, and memory stays flat.
Reading twice instead of carrying cleaned text between the passes keeps memory flat: no stage
ever holds more than one document's text.

Everything is written into a hidden temporary directory next to the output; only after the
pipeline succeeds does the driver replace the previous run's files: old metadata first (the
commit marker), old shards of every split, then the new shards are moved in, then the vocab and
the metadata are written last, each to a temporary name and renamed. A crash at any point
leaves either the old complete data set or no metadata at all — never metadata that points at
missing or mixed shards.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    SetupOptions,
    StandardOptions,
    TypeOptions,
    WorkerOptions,
)

from preprocessing import cleaning, contract, failures, splits, tokenizers

LOG = logging.getLogger("preprocessing.run")
_DIRECT_RUNNERS = ("", "directrunner", "direct", "fnapirunner")
# Names Beam's create_runner resolves to its DataflowRunner (case-insensitive, "runner" optional).
_DATAFLOW_RUNNERS = ("dataflow", "dataflowrunner", "testdataflow", "testdataflowrunner")
_STATS_FILE = "stats.json"
# The word default is the classic 10,000-word vocabulary; 8,000 pieces is the middle of the
# 2,000-32,000 range subword models use on a few MB of books.
DEFAULT_VOCAB_SIZE = {"word": 10000, "bpe": 8000, "unigram": 8000}


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2, no traceback."""


@dataclasses.dataclass(frozen=True)
class JobOptions:
    output_dir: str
    data_prefix: str
    tokenizer: str
    sources: dict[str, tuple[str, ...]]  # "input" → patterns, or split name → patterns
    lowercase: bool = False
    min_count: int = 1
    vocab_size: int = 10000
    line_eos: bool = False
    word_split: str = "pattern"
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    seed: int = 0
    record_tokens: int = contract.DEFAULT_RECORD_TOKENS
    vocab: tuple[str, ...] | None = None  # fixed by --vocab_from
    # bpe/unigram: at most this many characters of training text go to the one worker that learns
    # the tokenizer (a deterministic sample of blocks), however large the corpus.
    tokenizer_sample_chars: int = 20_000_000
    # bpe/unigram with --vocab_from: the reused tokenizer (its file's bytes, and its metadata's
    # record of what it was learned from).
    tokenizer_model: bytes = b""
    tokenizer_sample: dict[str, int] = dataclasses.field(default_factory=dict)
    # --num_shards: shards per split; a split not named gets one per SHARD_CHARACTERS of text.
    num_shards: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def presplit(self) -> bool:
        return "input" not in self.sources


# ---------------------------------------------------------------------------------------------
# Flags


def _patterns(values: list[str] | None) -> tuple[str, ...]:
    return tuple(p.strip() for v in values or () for p in v.split(",") if p.strip())


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: otherwise argparse would take Beam flags as abbreviations of ours.
    parser = _ArgumentParser(
        prog="python -m preprocessing.run", allow_abbrev=False,
        description="Raw books → TFRecord shards, vocabulary and metadata (Apache Beam). "
                    "Unrecognised flags are Beam pipeline options (--runner, --project, …).")
    parser.add_argument("--input", action="append", metavar="PATTERN[,PATTERN…]",
                        help="Files to read (local or gs://, globs allowed); split into "
                             "train/valid/test by --valid_fraction/--test_fraction.")
    for split in contract.SPLITS:
        parser.add_argument(f"--{split}", action="append", metavar="PATTERN[,PATTERN…]",
                            help=f"Pre-split input: files that form the {split} split as given.")
    parser.add_argument("--output_dir", required=True, help="Directory (local or gs://) for the outputs.")
    parser.add_argument("--data_prefix", required=True, help="NAME in NAME.train-…tfrecord.gz etc.")
    parser.add_argument("--tokenizer", choices=contract.TOKENIZERS)
    parser.add_argument("--lowercase", action="store_true", help="Lower-case the text.")
    parser.add_argument("--min_count", type=int, default=1,
                        help="char/word: tokens seen fewer times become <unk>.")
    parser.add_argument("--vocab_size", type=int,
                        help="word: keep this many most frequent words (plus <unk> and newline/<eos>; "
                             f"default {DEFAULT_VOCAB_SIZE['word']}); bpe/unigram: pieces to learn, "
                             "256 byte pieces, <unk> and the newline included (default "
                             f"{DEFAULT_VOCAB_SIZE['bpe']}).")
    parser.add_argument("--tokenizer_sample_chars", type=int, default=JobOptions.tokenizer_sample_chars,
                        help="bpe/unigram: learn the tokenizer from at most this many characters "
                             "of the training split (a fixed sample of 16K-character blocks, so one "
                             "worker never holds the whole corpus).")
    parser.add_argument("--line_eos", action="store_true",
                        help="word: every line end is an <eos> token (PTB/WikiText style).")
    parser.add_argument("--word_split", choices=contract.WORD_SPLITS,
                        help="word: 'pattern' cuts words, numbers and single punctuation marks out "
                             "of raw text; 'whitespace' takes pre-tokenized text as it is, one token "
                             "per run of non-space characters and every line kept, as awd-lstm-lm's "
                             "line.split() (PTB's mr. 's u.s., WikiText's @-@ stay whole), so "
                             "perplexities compare with published ones. Default: whitespace with "
                             "--line_eos, else pattern.")
    parser.add_argument("--valid_fraction", type=float, default=0.05)
    parser.add_argument("--test_fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="Seeds the train/valid/test assignment.")
    parser.add_argument("--record_tokens", type=int, default=contract.DEFAULT_RECORD_TOKENS,
                        help="Tokens per TFRecord record (the trainer cuts its own windows); "
                             "characters for bpe/unigram, whose records are cut before encoding.")
    parser.add_argument("--num_shards", metavar="N|SPLIT=N[,SPLIT=N…]",
                        help="Shards per split instead of one per ~32 MB of text "
                             f"({contract.SHARD_CHARACTERS // 1_000_000} million characters): one "
                             "number for every split, or per split, e.g. train=8,valid=1,test=1 "
                             "(a split never gets more shards than records).")
    parser.add_argument("--vocab_from", metavar="DATA_DIR/PREFIX",
                        help="Reuse an existing vocabulary (and tokenizer settings), e.g. for "
                             "fine-tuning: DATA_DIR/PREFIX, a *.metadata.json file or a trainer job dir.")
    return parser


def parse_args(argv: Sequence[str]) -> tuple[JobOptions, list[str]]:
    """Our flags → JobOptions; the rest are returned for Beam. Raises UsageError."""
    args, beam_args = _parser().parse_known_args(list(argv))
    _check_beam_args(beam_args)  # first: a misspelt flag explains the errors that follow from it
    sources = {"input": _patterns(args.input)} if args.input else {}
    presplit = {s: _patterns(getattr(args, s)) for s in contract.SPLITS if getattr(args, s)}
    if sources and presplit:
        raise UsageError("give either --input or --train/--valid/--test, not both")
    if not sources and not presplit:
        raise UsageError("no input: give --input PATTERN (or pre-split --train/--valid/--test PATTERN)")
    if presplit and "train" not in presplit:
        raise UsageError("pre-split input needs --train PATTERN (the vocabulary is built from it)")
    _check_names(args)
    vocab, tokenizer, lowercase, line_eos = None, args.tokenizer, args.lowercase, args.line_eos
    word_split = args.word_split
    model, sample = b"", {}
    if args.vocab_from:
        md = read_metadata(args.vocab_from)
        model, sample = md.tokenizer_model, md.tokenizer_sample
        if md.learned and args.vocab_size is not None and args.vocab_size != md.vocab_size:
            raise UsageError(f"--vocab_size {args.vocab_size} conflicts with --vocab_from "
                             f"{args.vocab_from} ({md.vocab_size} pieces); drop --vocab_size")
        for flag, given, stored in (("--tokenizer", tokenizer, md.tokenizer),
                                    ("--lowercase", lowercase or None, md.lowercase or None),
                                    ("--line_eos", line_eos or None, md.line_eos or None),
                                    ("--word_split", word_split, md.word_split)):
            if given is not None and given != stored:
                raise UsageError(f"{flag} {given} conflicts with --vocab_from {args.vocab_from} "
                                 f"({stored}); drop {flag}")
        vocab, tokenizer, lowercase, line_eos = md.vocab, md.tokenizer, md.lowercase, md.line_eos
        # The vocabulary's tokens were cut this way (other tokenizers have no split to keep).
        word_split = md.word_split if tokenizer == "word" else None
    elif tokenizer is None:
        raise UsageError(f"--tokenizer is required ({', '.join(contract.TOKENIZERS)}) unless "
                         "--vocab_from is given")
    if line_eos and tokenizer != "word":
        raise UsageError("--line_eos needs --tokenizer word")
    if word_split is not None and tokenizer != "word":
        raise UsageError("--word_split needs --tokenizer word")
    if word_split is None:
        # --line_eos is for PTB/WikiText-style corpora, which are pre-tokenized.
        word_split = "whitespace" if line_eos else "pattern"
    return JobOptions(
        output_dir=args.output_dir.rstrip("/") or "/", data_prefix=args.data_prefix, tokenizer=tokenizer,
        sources=sources or presplit, lowercase=lowercase, min_count=args.min_count,
        vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE.get(tokenizer, DEFAULT_VOCAB_SIZE["word"]),
        line_eos=line_eos, word_split=word_split,
        valid_fraction=args.valid_fraction, test_fraction=args.test_fraction, seed=args.seed,
        record_tokens=args.record_tokens,
        vocab=vocab, tokenizer_sample_chars=args.tokenizer_sample_chars,
        tokenizer_model=model, tokenizer_sample=sample,
        num_shards=_num_shards(args.num_shards)), beam_args


def _num_shards(text: str | None) -> dict[str, int]:
    """--num_shards: "8" (every split) or "train=8,valid=1" (the splits named) → {split: count}."""
    if not text:
        return {}
    fix = "give one number, or per split, e.g. --num_shards train=8,valid=1,test=1"
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if "=" in text:
        named = [part.partition("=") for part in parts]
    else:
        named = [(split, "=", text) for split in contract.SPLITS]
    shards = {}
    for split, _, count in named:
        split = split.strip()
        if split not in contract.SPLITS:
            raise UsageError(f"--num_shards {text}: {split!r} is not a split "
                             f"({', '.join(contract.SPLITS)}); {fix}")
        if not count.strip().isdigit() or int(count) < 1:
            raise UsageError(f"--num_shards {text}: {count.strip()!r} is not a count of at least 1; {fix}")
        shards[split] = int(count)
    return shards


def _check_names(args: argparse.Namespace) -> None:
    if not args.data_prefix or "/" in args.data_prefix or args.data_prefix.startswith("."):
        raise UsageError(f"--data_prefix {args.data_prefix!r}: a plain file name prefix, e.g. 'jules'")
    for flag in ("min_count", "vocab_size", "record_tokens", "tokenizer_sample_chars"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("valid_fraction", "test_fraction"):
        if not 0 <= getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be in [0, 1), got {getattr(args, flag)}")
    if args.valid_fraction + args.test_fraction >= 1:
        raise UsageError("--valid_fraction + --test_fraction must leave something for train")


def _check_beam_args(beam_args: list[str]) -> None:
    """Unknown flags are errors here, not Beam's 'Discarding unparseable args' warning."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser  # Beam's own flag parser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    try:
        known, unknown = parser.parse_known_args(beam_args)
    except SystemExit:
        raise UsageError(f"bad Beam pipeline option in {' '.join(beam_args)}") from None
    flags = [a for a in unknown if a.startswith("-")]
    if flags:
        raise UsageError(f"unknown flag {flags[0]} (see python -m preprocessing.run --help)")
    if unknown:
        raise UsageError(f"unexpected argument {unknown[0]!r}: patterns go after --input")
    if known.direct_running_mode == "multi_threading":
        raise UsageError("--direct_running_mode multi_threading silently drops records in Beam 2.77; "
                         "use in_memory (default) or multi_processing")


def read_metadata(location: str) -> contract.Metadata:
    """The metadata `--vocab_from` names; a UsageError if missing or invalid.

    Accepts DATA_DIR/PREFIX (→ PREFIX.metadata.json), a path to any *.json metadata file, or a
    trainer job dir (which keeps a copy of its data's metadata as JOB_DIR/metadata.json).
    """
    location = location.rstrip("/")
    if location.endswith(".json"):
        candidates = [location]
    else:
        candidates = [location + ".metadata.json", _join(location, "metadata.json")]
    path = next((c for c in candidates if FileSystems.exists(c)), None)
    if path is None:
        raise UsageError(f"--vocab_from {location}: no {' or '.join(candidates)}; give DATA_DIR/PREFIX of "
                         "a finished preprocessing run or a trainer job dir")
    try:
        text = _read_text(path)
    except Exception as err:  # noqa: BLE001 — any failure to read is "no usable metadata here"
        raise UsageError(f"--vocab_from: cannot read {path} ({type(err).__name__}: {err})") from None
    try:
        return contract.with_tokenizer_model(contract.metadata_from_json(text, path), path, _read_bytes)
    except contract.ContractError as err:
        raise UsageError(f"--vocab_from: {err}") from None


def _beam_default_region() -> str | None:
    """The region Beam falls back to without --region: $CLOUDSDK_COMPUTE_REGION, then gcloud's."""
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    return DataflowRunner().get_default_gcp_region()


def check_dataflow_options(options: JobOptions, beam_options: PipelineOptions,
                           default_region: Callable[[], str | None] = _beam_default_region) -> None:
    """DataflowRunner mistakes as UsageErrors, before anything is read, staged or submitted.

    Beam reports some of them as a ValueError traceback from beam.Pipeline(), others only when
    workers fail minutes later: they run on Google's machines, which see neither local files
    nor this checkout, so inputs, outputs and the temp location must be gs:// and verne must be
    shipped to them (--setup_file builds and installs it there). Other runners are not checked.
    """
    if (beam_options.view_as(StandardOptions).runner or "").lower() not in _DATAFLOW_RUNNERS:
        return
    cloud, setup = beam_options.view_as(GoogleCloudOptions), beam_options.view_as(SetupOptions)
    needs = "--runner DataflowRunner needs"
    if not cloud.project:
        raise UsageError(f"{needs} --project PROJECT_ID (the Google Cloud project to run in)")
    if not cloud.region and not default_region():
        raise UsageError(f"{needs} --region REGION, e.g. --region europe-west1")
    if not cloud.temp_location and not cloud.staging_location:
        raise UsageError(f"{needs} --temp_location gs://BUCKET/tmp (where Dataflow stages the job)")
    for flag, location in (("--temp_location", cloud.temp_location),
                           ("--staging_location", cloud.staging_location)):
        if location and not location.startswith("gs://"):
            raise UsageError(f"{flag} {location}: Dataflow needs a gs:// location, e.g. gs://BUCKET/tmp")
    for source, patterns in options.sources.items():
        for pattern in patterns:
            if "://" not in pattern:
                raise UsageError(f"--{source} {pattern!r} is local, and Dataflow workers cannot read it: "
                                 "copy the files to Cloud Storage and give gs://BUCKET/…")
    if "://" not in options.output_dir:
        raise UsageError(f"--output_dir {options.output_dir} is local, and Dataflow workers write the "
                         "shards: give gs://BUCKET/DIR")
    if not (setup.setup_file or setup.requirements_file or setup.extra_packages
            or beam_options.view_as(WorkerOptions).sdk_container_image):
        raise UsageError(f"{needs} --setup_file ./setup.py (or --sdk_container_image with verne "
                         "installed): its workers must import verne")
    for flag, path in (("--setup_file", setup.setup_file), ("--requirements_file", setup.requirements_file)):
        if path and not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: no such file (give its path from here, e.g. ./setup.py "
                             "in the verne checkout)")


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass(frozen=True)
class InputFile:
    path: str
    split: str | None
    size: int


def match_inputs(options: JobOptions) -> list[InputFile]:
    """Expands the patterns in the driver: a pattern matching nothing is a user mistake."""
    seen: dict[str, InputFile] = {}
    for source, patterns in options.sources.items():
        for pattern in patterns:
            try:
                found = FileSystems.match([pattern])[0].metadata_list
            except Exception as err:  # noqa: BLE001 — Beam raises BeamIOError/ValueError/OSError
                raise UsageError(f"--{source} {pattern!r}: cannot list it ({err})") from None
            if not found:
                raise UsageError(f"--{source} {pattern!r} matches no files")
            split = None if source == "input" else source
            for meta in found:
                if "://" not in meta.path and os.path.isdir(meta.path):
                    raise UsageError(f"--{source} {pattern!r} matches the directory {meta.path}; "
                                     f"give the files, e.g. '{meta.path.rstrip('/')}/*.txt'")
                earlier = seen.setdefault(meta.path, InputFile(meta.path, split, meta.size_in_bytes))
                if earlier.split != split:
                    raise UsageError(f"{meta.path} is matched by both --{earlier.split} and --{split}")
    return sorted(seen.values(), key=lambda f: f.path)


def _read_clean(readable: Any, options: JobOptions) -> cleaning.Cleaned:
    try:
        data = readable.read()
    except Exception as err:  # noqa: BLE001 — one unreadable file (e.g. corrupt .gz) never fails the job
        return cleaning.Cleaned(None, skip_reason=f"unreadable: {type(err).__name__}: {err}")
    # Pre-tokenized text is taken line for line, blank lines included, as awd-lstm-lm reads it.
    return cleaning.clean_bytes(data, options.lowercase, keep_lines=options.word_split == "whitespace")


# ---------------------------------------------------------------------------------------------
# Pass 1: survey


@dataclasses.dataclass(frozen=True)
class Survey:
    path: str
    split: str | None
    tokens: int
    digest: str
    encoding: str
    counts: Counter[str]
    characters: int = 0  # of cleaned text


class _SurveyFn(beam.DoFn):
    """One file → its Survey (token count, counts for the vocabulary) or a skipped record."""

    def __init__(self, options: JobOptions) -> None:
        self._options = options

    def process(self, element: tuple[Any, str | None]) -> Iterator[Any]:
        readable, split = element
        path = readable.metadata.path
        cleaned = _read_clean(readable, self._options)
        if cleaned.text is None:
            LOG.warning("skipping %s: %s", path, cleaned.skip_reason)
            beam.metrics.Metrics.counter("preprocessing", "skipped").inc()
            yield beam.pvalue.TaggedOutput("skipped", {"path": path, "reason": cleaned.skip_reason or ""})
            return
        if cleaned.fallback:
            LOG.warning("%s is not UTF-8: decoded as %s", path, cleaned.encoding)
            beam.metrics.Metrics.counter("preprocessing", "fallback_decodes").inc()
        text = cleaned.text
        o = self._options
        tokens, counts = tokenizers.count_tokens(o.tokenizer, text, o.line_eos, o.word_split)
        # Pre-split data builds its vocabulary from train only: valid/test words stay unknown.
        if self._options.vocab is not None or split not in (None, "train"):
            counts = Counter()
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
        yield Survey(path, split, tokens, digest, cleaned.encoding or "", counts, len(text))


class _MergeCounts(beam.CombineFn):
    def create_accumulator(self) -> Counter[str]:
        return Counter()

    def add_input(self, acc: Counter[str], counts: Counter[str]) -> Counter[str]:
        acc.update(counts)
        return acc

    def merge_accumulators(self, accs: Any) -> Counter[str]:
        merged: Counter[str] = Counter()
        for acc in accs:
            merged.update(acc)
        return merged

    def extract_output(self, acc: Counter[str]) -> Counter[str]:
        return acc


def _vocabulary(counts: Counter[str], options: JobOptions) -> tuple[str, ...]:
    size = options.vocab_size if options.tokenizer == "word" else None
    return tokenizers.build_vocab(options.tokenizer, counts, options.min_count, size, options.line_eos)


def _plan(surveys: list[Survey], options: JobOptions) -> dict[str, tuple[splits.Span, ...]]:
    documents = [splits.Document(s.path, s.tokens, s.digest, s.split) for s in surveys]
    return splits.plan(documents, options.valid_fraction, options.test_fraction, options.seed,
                       options.record_tokens)


# (shards per split, document path → the shard of each of its records in the plan)
ShardPlan = tuple[dict[str, int], dict[str, tuple[int, ...]]]


def _shard_plan(plan: dict[str, tuple[splits.Span, ...]], surveys: list[Survey],
                options: JobOptions) -> ShardPlan:
    """--num_shards, else one shard per SHARD_CHARACTERS characters of each split's text."""
    per_unit = {s.path: s.characters / s.tokens for s in surveys if s.tokens and s.characters}
    characters = splits.split_characters(plan, per_unit)
    wanted = {s: options.num_shards.get(s) or contract.shards_for(characters[s]) for s in contract.SPLITS}
    return splits.shard_plan(plan, wanted)


# ---------------------------------------------------------------------------------------------
# Pass 2: encode


class _EncodeFn(beam.DoFn):
    """One file → (shard, tokens, serialized record) tagged by split, plus
    (split, (tokens, records, characters))."""

    def __init__(self, options: JobOptions) -> None:
        self._options = options
        self._vocab: tuple[str, ...] | None = None
        self._tokenizer: tokenizers.Tokenizer | None = None

    def _tokenizer_for(self, vocab: tuple[str, ...], model: bytes) -> tokenizers.Tokenizer:
        if self._tokenizer is None or self._vocab != vocab:
            o = self._options
            self._tokenizer = tokenizers.make_tokenizer(o.tokenizer, vocab, o.lowercase, o.line_eos,
                                                        o.word_split, model=model)
            self._vocab = vocab
        return self._tokenizer

    def process(self, element: tuple[Any, str | None], vocab: tuple[str, ...], learned: Learned,
                plan: dict[str, tuple[splits.Span, ...]], shard_plan: ShardPlan) -> Iterator[Any]:
        if learned.error:  # nothing to encode with; the driver reports the error
            return
        readable, _ = element
        path = readable.metadata.path
        # A skipped file (text None) was recorded by the survey and has no spans in the plan.
        text = _read_clean(readable, self._options).text or ""
        tokenizer, o = self._tokenizer_for(vocab, learned.model), self._options
        spans = plan.get(path, ())
        if o.tokenizer in contract.SUBWORD_TOKENIZERS:
            # Planned in characters: each record's text is encoded on its own.
            _check_unchanged(path, spans, len(text))
            records = ((split, tokenizer.encode_array(text[start:end]), end - start)
                       for split, start, end in spans)
        else:
            ids = tokenizer.encode_array(text)
            _check_unchanged(path, spans, len(ids))
            offsets = tokenizers.plan_offsets(o.tokenizer, text, o.line_eos, o.word_split)
            records = ((split, ids[start:end],
                        end - start if offsets is None else int(offsets[end] - offsets[start]))
                       for split, start, end in spans)
        shards = shard_plan[1].get(path, ())
        for shard, (split, record, characters) in zip(shards, records, strict=True):
            yield beam.pvalue.TaggedOutput(split, (shard, len(record), contract.encode_example(record)))
            yield beam.pvalue.TaggedOutput("counts", (split, (len(record), 1, characters)))


def _check_unchanged(path: str, spans: tuple[splits.Span, ...], units: int) -> None:
    if sum(end - start for _, start, end in spans) != units:
        raise RuntimeError(f"{path} changed while the job was running; rerun it")


def _sum_counts(counts: Any) -> tuple[int, int, int]:
    tokens = records = characters = 0
    for t, r, c in counts:
        tokens, records, characters = tokens + t, records + r, characters + c
    return tokens, records, characters


# ---------------------------------------------------------------------------------------------
# bpe/unigram: a bounded sample of the training split, and the one step that learns from it


# Sampling unit: large enough that per-element overhead vanishes, small enough that the sample
# mixes many parts of many books.
SAMPLE_BLOCK_CHARS = 16384


@dataclasses.dataclass(frozen=True)
class Learned:
    """The tokenizer the encode pass uses: a SentencePiece model and its pieces, or an error."""

    model: bytes = b""
    vocab: tuple[str, ...] = ()
    sample: dict[str, int] = dataclasses.field(default_factory=dict)
    error: str = ""


class _SampleFn(beam.DoFn):
    """One file → (score, text) for each block of its training spans.

    Scores are seeded hashes of the text, so keeping the lowest ones is a sample that depends
    only on the seed and the text, whichever runner and worker count.
    """

    def __init__(self, options: JobOptions) -> None:
        self._options = options

    def process(self, element: tuple[Any, str | None],
                plan: dict[str, tuple[splits.Span, ...]]) -> Iterator[tuple[bytes, str]]:
        readable, _ = element
        text = _read_clean(readable, self._options).text or ""
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
        for split, start, end in plan.get(readable.metadata.path, ()):
            if split != "train":
                continue
            for block in range(start, end, SAMPLE_BLOCK_CHARS):
                score = hashlib.blake2b(f"{self._options.seed}\0{digest}\0{block}".encode(),
                                        digest_size=16).digest()
                yield score, text[block:min(end, block + SAMPLE_BLOCK_CHARS)]


def _learn(sample: list[tuple[bytes, str]], plan: dict[str, tuple[splits.Span, ...]],
           options: JobOptions) -> Learned:
    from preprocessing import subword

    texts = [text for _, text in sorted(sample)]
    record = {"characters": sum(map(len, texts)), "limit": options.tokenizer_sample_chars,
              "train_characters": splits.split_tokens(plan)["train"]}
    try:
        model = subword.learn(options.tokenizer, texts, options.vocab_size)
    except subword.LearnError as err:
        return Learned(error=str(err))
    vocab = subword.SubwordTokenizer(options.tokenizer, model).vocab
    return Learned(model, vocab, record)


def _learned_tokenizer(p: beam.Pipeline, files: list[InputFile], options: JobOptions,
                       plan: beam.PCollection) -> beam.PCollection:
    """One Learned: reused (--vocab_from), learned from a sample of train (bpe/unigram), or none."""
    if options.tokenizer not in contract.SUBWORD_TOKENIZERS:
        return p | "NoTokenizerFile" >> beam.Create([Learned()])
    if options.tokenizer_model:
        reused = Learned(options.tokenizer_model, options.vocab or (), options.tokenizer_sample)
        return p | "ReusedTokenizer" >> beam.Create([reused])
    blocks = -(-options.tokenizer_sample_chars // SAMPLE_BLOCK_CHARS)
    return (_read_files(p, files, "Sample")
            | "SampleBlocks" >> beam.ParDo(_SampleFn(options), plan=beam.pvalue.AsSingleton(plan))
            | "BoundedSample" >> beam.combiners.Top.Smallest(blocks, key=lambda block: block[0])
            | "Learn" >> beam.Map(_learn, beam.pvalue.AsSingleton(plan), options))


# ---------------------------------------------------------------------------------------------
# The pipeline


def _read_files(p: beam.Pipeline, files: list[InputFile], label: str) -> beam.PCollection:
    """One element per file: (ReadableFile, split or None). Read uncompressed: bytes as stored."""
    by_split: dict[str | None, list[str]] = {}
    for f in files:
        by_split.setdefault(f.split, []).append(f.path)
    branches = []
    for split, paths in sorted(by_split.items(), key=lambda kv: str(kv[0])):
        branches.append(
            p | f"{label}Files{split or ''}" >> beam.Create(paths)
            | f"{label}Open{split or ''}" >> fileio.ReadMatches(
                compression=CompressionTypes.UNCOMPRESSED)
            | f"{label}Tag{split or ''}" >> beam.Map(lambda readable, s=split: (readable, s)))
    return branches[0] if len(branches) == 1 else branches | f"{label}Flatten" >> beam.Flatten()


def build_pipeline(p: beam.Pipeline, files: list[InputFile], options: JobOptions, work_dir: str) -> None:
    """Adds the whole job to `p`; its last step writes WORK_DIR/stats.json."""
    AsSingleton, AsList, AsDict = beam.pvalue.AsSingleton, beam.pvalue.AsList, beam.pvalue.AsDict
    surveyed = (_read_files(p, files, "Survey")
                | "Survey" >> beam.ParDo(_SurveyFn(options)).with_outputs("skipped", main="docs"))
    docs = surveyed.docs
    # Only the small per-document facts travel to the plan, never the counts or the text.
    sizes = docs | "Sizes" >> beam.Map(lambda s: dataclasses.replace(s, counts=Counter()))
    plan = sizes | "AllSizes" >> beam.combiners.ToList() | "Plan" >> beam.Map(_plan, options)
    learned = _learned_tokenizer(p, files, options, plan)
    if options.tokenizer in contract.SUBWORD_TOKENIZERS:
        vocab = learned | "Vocab" >> beam.Map(lambda tokenizer: tokenizer.vocab)
    elif options.vocab is None:
        vocab = (docs | "Counts" >> beam.Map(lambda s: s.counts)
                 | "MergeCounts" >> beam.CombineGlobally(_MergeCounts())
                 | "Vocab" >> beam.Map(_vocabulary, options))
    else:
        vocab = p | "FixedVocab" >> beam.Create([options.vocab])

    shard_plan = plan | "ShardPlan" >> beam.Map(_shard_plan, AsList(sizes), options)
    encoded = (_read_files(p, files, "Encode")
               | "Encode" >> beam.ParDo(_EncodeFn(options), vocab=AsSingleton(vocab),
                                        learned=AsSingleton(learned), plan=AsSingleton(plan),
                                        shard_plan=AsSingleton(shard_plan))
               .with_outputs(*contract.SPLITS, "counts"))
    shards = {}
    for split in contract.SPLITS:
        # Each bundle writes a part per shard it meets; the parts of a shard are then joined (a
        # rename when there is one, as in a local run). Memory stays one record per open part.
        shards[split] = (
            encoded[split]
            | f"WriteParts{split}" >> beam.ParDo(_WritePartsFn(work_dir, options.data_prefix, split))
            | f"PartsOf{split}" >> beam.GroupByKey()
            | f"JoinParts{split}" >> beam.ParDo(_JoinPartsFn(work_dir, options.data_prefix, split),
                                                 shard_plan=AsSingleton(shard_plan))
            | f"Shards{split}" >> beam.combiners.ToList())
    counts = encoded.counts | "SumCounts" >> beam.CombinePerKey(_sum_counts)
    skipped = surveyed.skipped | "AllSkipped" >> beam.combiners.ToList()
    (p | "Done" >> beam.Create([None])
     | "WriteStats" >> beam.Map(
         _write_stats, work_dir, options, vocab=AsSingleton(vocab), learned=AsSingleton(learned),
         sizes=AsList(sizes), shard_plan=AsSingleton(shard_plan),
         skipped=AsSingleton(skipped), counts=AsDict(counts),
         **{f"shards_{s}": AsSingleton(shards[s]) for s in contract.SPLITS}))


class _WritePartsFn(beam.DoFn):
    """(shard, tokens, record) → one GZIP TFRecord part per shard met in a bundle, closed at the
    bundle's end, which yields (shard, (part path, tokens)) for each."""

    def __init__(self, work_dir: str, prefix: str, split: str) -> None:
        self._work_dir, self._prefix, self._split = work_dir, prefix, split
        self._parts: dict[int, list[Any]] = {}

    def start_bundle(self) -> None:
        self._parts = {}

    def process(self, element: tuple[int, int, bytes]) -> None:
        from apache_beam.io.tfrecordio import _TFRecordUtil  # what WriteToTFRecord frames records with

        shard, tokens, record = element
        part = self._parts.get(shard)
        if part is None:
            # Not a shard name (no "-"): a leftover part never matches contract.shard_glob.
            name = f"{self._prefix}.{self._split}.part-{shard:05d}-{uuid.uuid4().hex}.gz"
            path = _join(self._work_dir, name)
            handle = FileSystems.create(path, compression_type=CompressionTypes.GZIP)
            part = self._parts[shard] = [path, handle, 0]
        _TFRecordUtil.write_record(part[1], record)
        part[2] += tokens

    def finish_bundle(self) -> Iterator[Any]:
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for shard, (path, handle, tokens) in sorted(self._parts.items()):
            handle.close()
            yield WindowedValue((shard, (path, tokens)), GlobalWindow().max_timestamp(), [GlobalWindow()])
        self._parts = {}


class _JoinPartsFn(beam.DoFn):
    """(shard, its parts) → the shard file, named for its index and the split's shard count;
    yields (shard, tokens)."""

    def __init__(self, work_dir: str, prefix: str, split: str) -> None:
        self._work_dir, self._prefix, self._split = work_dir, prefix, split

    def process(self, element: tuple[int, Any], shard_plan: ShardPlan) -> Iterator[tuple[int, int]]:
        shard, parts = element
        parts = sorted(parts)
        target = contract.shard_name(self._work_dir, self._prefix, self._split, shard,
                                     shard_plan[0][self._split])
        _concatenate([path for path, _ in parts], target)
        yield shard, sum(tokens for _, tokens in parts)


def _concatenate(sources: list[str], target: str) -> None:
    """`target` := the sources one after the other. GZIP files concatenate into one GZIP file of
    several members, which TensorFlow's reader reads through. Safe to run again (a retried bundle)."""
    if len(sources) == 1:
        if FileSystems.exists(sources[0]) or not FileSystems.exists(target):
            FileSystems.rename(sources, [target])
        return
    temp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(temp, compression_type=CompressionTypes.UNCOMPRESSED) as out:
        for source in sources:
            with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                while block := f.read(1 << 24):
                    out.write(block)
    FileSystems.rename([temp], [target])


def _write_stats(_: None, work_dir: str, options: JobOptions, vocab: tuple[str, ...], learned: Learned,
                 sizes: list[Survey], shard_plan: ShardPlan, skipped: list[dict[str, str]],
                 counts: dict[str, tuple[int, int, int]], **shards: list[tuple[int, int]]) -> None:
    """Runs after every write (its side inputs say so): what the driver needs to commit."""
    tokenizer_file = contract.tokenizer_file_name(options.data_prefix) if learned.model else ""
    if tokenizer_file:
        _write_atomically(_join(work_dir, tokenizer_file), learned.model)
    shard_files, shard_tokens = {}, {}
    for split in contract.SPLITS:
        count, written = shard_plan[0][split], dict(shards[f"shards_{split}"])
        shard_files[split] = [contract.shard_name(work_dir, options.data_prefix, split, i, count)
                              for i in range(count)]
        shard_tokens[split] = tuple(written.get(i, 0) for i in range(count))
        for i, path in enumerate(shard_files[split]):
            if i not in written:  # no record fell in it (a split with no text): an empty shard
                _write_atomically(path, gzip.compress(b"", mtime=0))
    stats = {
        "metadata": contract.metadata_to_json(contract.Metadata(
            tokenizer=options.tokenizer, vocab=tuple(vocab), lowercase=options.lowercase,
            line_eos=options.line_eos, word_split=options.word_split, documents=len(sizes),
            skipped=tuple(sorted(skipped, key=lambda s: s["path"])), sources=options.sources,
            splits={s: _split_stats(counts.get(s, (0, 0, 0)), shard_tokens[s]) for s in contract.SPLITS},
            tokenizer_file=tokenizer_file,
            tokenizer_sha256=hashlib.sha256(learned.model).hexdigest() if learned.model else "",
            tokenizer_sample=learned.sample)),
        "shards": shard_files,
        "fallback_decodes": sorted(s.path for s in sizes if s.encoding in ("cp1252", "latin-1")),
        "tokenizer_file": tokenizer_file and _join(work_dir, tokenizer_file),
        "error": learned.error,
    }
    _write_atomically(_join(work_dir, _STATS_FILE), json.dumps(stats))


def _split_stats(counts: tuple[int, int, int], shard_tokens: tuple[int, ...]) -> contract.SplitStats:
    tokens, records, characters = counts
    return contract.SplitStats(tokens=tokens, records=records, shards=len(shard_tokens),
                               characters=characters, shard_tokens=shard_tokens)


# ---------------------------------------------------------------------------------------------
# Driver: runner, commit, summary


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def _write_atomically(path: str, text: str | bytes) -> None:
    temp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with FileSystems.create(temp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
    except BaseException:
        with contextlib.suppress(Exception):
            FileSystems.delete([temp])
        raise
    FileSystems.rename([temp], [path])


def _read_text(path: str) -> str:
    return _read_bytes(path).decode("utf-8")


def _read_bytes(path: str) -> bytes:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


def _delete_matching(pattern: str) -> None:
    found = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    if found:
        FileSystems.delete(found)


def _remove_tree(path: str) -> None:
    """Best-effort removal of the work dir: a leftover hidden dir must not hide the real error."""
    try:
        if "://" not in path:
            if FileSystems.exists(path):
                FileSystems.delete([path])  # a local directory: removed recursively
        else:
            FileSystems.delete([path + "/"])  # an object-store prefix: everything under it
    except Exception as err:  # noqa: BLE001
        LOG.warning("could not remove the temporary directory %s: %s", path, err)


def commit(work_dir: str, options: JobOptions, stats: dict[str, Any]) -> contract.Metadata:
    """Replaces the previous run's outputs with this run's; the metadata file goes last."""
    out, prefix = options.output_dir, options.data_prefix
    metadata_file = contract.metadata_path(out, prefix)
    if FileSystems.exists(metadata_file):
        FileSystems.delete([metadata_file])
    moves: list[tuple[str, str]] = []
    for split in contract.SPLITS:
        _delete_matching(contract.shard_glob(out, prefix, split))  # stale shards of any count
        moves += [(src, _join(out, src.rsplit("/", 1)[-1])) for src in stats["shards"][split]]
    # A tokenizer file is part of the data set it was written with: an older one goes too.
    _delete_matching(_join(out, contract.tokenizer_file_name(prefix)))
    if stats["tokenizer_file"]:
        moves.append((stats["tokenizer_file"], _join(out, contract.tokenizer_file_name(prefix))))
    if moves:
        FileSystems.rename([m[0] for m in moves], [m[1] for m in moves])
    metadata = contract.metadata_from_json(stats["metadata"], "this run's metadata")
    _write_atomically(contract.vocab_path(out, prefix), contract.vocab_text(metadata.vocab))
    _write_atomically(metadata_file, stats["metadata"])
    return metadata


def pipeline_options(beam_args: list[str]) -> tuple[PipelineOptions, Any]:
    """Beam options and the runner: our FnApiRunner for direct runs, else Beam's choice."""
    options = PipelineOptions(beam_args)
    if (options.view_as(StandardOptions).runner or "").lower() not in _DIRECT_RUNNERS:
        return options, None
    direct = options.view_as(DirectOptions)
    if not any(a.startswith("--direct_running_mode") for a in beam_args):
        direct.direct_running_mode = "in_memory"
    if not any("pipeline_type_check" in a for a in beam_args):
        # Construction-time type inference costs ~0.5 s of a local run and our hints are loose.
        options.view_as(TypeOptions).pipeline_type_check = False
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # As DirectRunner builds its FnApiRunner, minus the attempt to start Prism first.
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return options, fn_runner.FnApiRunner(provision_info=info)


def _pipeline(runner: Any, beam_options: PipelineOptions) -> beam.Pipeline:
    """beam.Pipeline(), with what Beam's option validation rejects (e.g. a malformed --project)
    as a one-line UsageError instead of its ValueError."""
    try:
        return beam.Pipeline(runner=runner, options=beam_options)
    except ValueError as err:
        header, _, errors = str(err).partition("\n")
        if not header.startswith("Pipeline has validations errors"):
            raise
        raise UsageError("; ".join(line.strip() for line in errors.splitlines() if line.strip())) from None


def _make_work_dir(output_dir: str, prefix: str) -> str:
    """The hidden work dir of this run, made and written to once up front, so an output dir that
    cannot be written is a one-line error before any input is read."""
    work_dir = _join(output_dir, f".{prefix}.tmp-{uuid.uuid4().hex[:12]}")
    with _output_errors(output_dir):
        if "://" not in work_dir:
            FileSystems.mkdirs(work_dir)  # object stores have no directories to make
        probe = _join(work_dir, "probe")
        _write_atomically(probe, "verne")
        FileSystems.delete([probe])
    return work_dir


def _output_errors(output_dir: str) -> contextlib.AbstractContextManager[None]:
    """A write that fails for want of space or permission, in the driver or in a Beam worker,
    as one line naming --output_dir (the previous run's files there are untouched until commit)."""
    return failures.writes_reported_as(UsageError, f"--output_dir {output_dir}")


def run_preprocessing(args: Sequence[str]) -> contract.Metadata:
    """The whole job (what `main` and the Kubeflow component call). Raises UsageError."""
    started = time.monotonic()
    options, beam_args = parse_args(args)
    beam_options, runner = pipeline_options(beam_args)
    check_dataflow_options(options, beam_options)
    files = match_inputs(options)
    pipeline = _pipeline(runner, beam_options)
    work_dir = _make_work_dir(options.output_dir, options.data_prefix)
    try:
        with _output_errors(options.output_dir):
            with pipeline as p:
                build_pipeline(p, files, options, work_dir)
            stats = json.loads(_read_text(_join(work_dir, _STATS_FILE)))
            _check_usable(stats, len(files))
            metadata = commit(work_dir, options, stats)
    finally:
        _remove_tree(work_dir)
    print(summary(metadata, files, stats["fallback_decodes"], time.monotonic() - started, options))
    return metadata


def _check_usable(stats: dict[str, Any], matched: int) -> None:
    """UsageError when the job read no text, or could not learn its tokenizer from it."""
    body = json.loads(stats["metadata"])
    if body["documents"] == 0:
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in body["skipped"][:3])
        raise UsageError(f"no usable input: all {matched} matched files were skipped ({reasons})")
    if stats["error"]:
        raise UsageError(stats["error"])


def summary(metadata: contract.Metadata, files: list[InputFile], fallbacks: list[str], seconds: float,
            options: JobOptions) -> str:
    megabytes = sum(f.size for f in files) / 1e6
    lines = [f"preprocessing: {len(files)} files matched, {metadata.documents} read, "
             f"{len(metadata.skipped)} skipped, {len(fallbacks)} not UTF-8 (decoded as cp1252/latin-1)"]
    lines += [f"  skipped {s['path']}: {s['reason']}" for s in metadata.skipped]
    lines += [f"  {split:5s} {st.tokens:>12,d} tokens {st.records:>7,d} records {st.shards:>4d} shards"
              for split, st in ((s, metadata.splits[s]) for s in contract.SPLITS)]
    lines.append(f"  vocab {metadata.vocab_size} ({metadata.tokenizer}); {megabytes:.1f} MB in "
                 f"{seconds:.1f} s = {megabytes / max(seconds, 1e-9):.2f} MB/s")
    train = metadata.splits["train"]
    lines.append(f"  {train.characters / max(train.tokens, 1):.2f} characters per train token")
    if metadata.tokenizer_sample:
        sample = metadata.tokenizer_sample
        lines.append(f"  tokenizer learned from {sample['characters']:,d} of {sample['train_characters']:,d} "
                     f"train characters (sample limit {sample['limit']:,d}): "
                     f"{contract.tokenizer_file_name(options.data_prefix)}")
    lines.append(f"  wrote {contract.metadata_path(options.output_dir, options.data_prefix)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # multi_processing workers forward harmless start-up warnings through this logger.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    # Beam logs a failing transform's traceback, then raises the same error to us: said once, by
    # main (as one line when it is a user's mistake, with its traceback when it is a bug).
    logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
    try:
        run_preprocessing(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"preprocessing.run: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    # Run the imported module, not __main__: Beam workers in other processes unpickle our
    # DoFns and records by module name, and "__main__" there is not this file.
    from preprocessing import run as _run

    _run.main()
