"""Benchmark: the Beam job vs a plain single-process loop doing the same work on the same corpus.

    .venv/bin/python bench/preprocess.py [--corpus GLOB] [--tokenizer char] [--scale 10]
        [--beam_args '--direct_running_mode multi_processing --direct_num_workers 2']

Both sides use the same functions (preprocessing.cleaning, tokenizers, splits, contract) and
the same algorithm — read and clean every file twice (vocabulary pass, then encoding pass), so
neither holds the corpus in memory — and write GZIP TFRecords; the loop writes them with
tf.io.TFRecordWriter. Each side runs once in its own subprocess, timed from after its imports
to its last file written (CPU seconds are reported too: on a busy machine they are the steadier
measure); peak memory is that process's max RSS, its children included
(multi_processing workers). `--scale N` feeds the corpus N times (as symlinked copies) to check
that memory stays flat as the corpus grows. Target: Beam ≥ 0.8× the loop's MB/s.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

DEFAULT_CORPUS = "/work/shared/corpora/**/*.txt"


def _cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (multi_processing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # Linux reports KiB


def _corpus(pattern: str, scale: int, scratch: Path) -> list[str]:
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise SystemExit(f"bench/preprocess.py: --corpus {pattern!r} matches no files")
    if scale == 1:
        return files
    copies = []
    for copy in range(scale):
        for i, path in enumerate(files):
            link = scratch / "corpus" / f"{copy:03d}-{i:04d}-{Path(path).name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.abspath(path))
            copies.append(str(link))
    return copies


def run_beam(files: list[str], out: str, tokenizer: str, beam_args: list[str]) -> dict[str, float]:
    from preprocessing import run

    started = time.perf_counter()
    metadata = run.run_preprocessing(["--input", ",".join(files), "--output_dir", out,
                                      "--data_prefix", "bench", "--tokenizer", tokenizer, *beam_args])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": sum(s.tokens for s in metadata.splits.values())}


def run_plain(files: list[str], out: str, tokenizer: str) -> dict[str, float]:
    import hashlib

    import tensorflow as tf

    from preprocessing import cleaning, contract, splits, tokenizers

    def cleaned(path: str) -> str | None:
        with open(path, "rb") as f:
            return cleaning.clean_bytes(f.read()).text

    started = time.perf_counter()
    counts: Counter[str] = Counter()
    documents = []
    for path in files:  # pass 1: vocabulary and sizes
        text = cleaned(path)
        if text is None:
            continue
        tokens, doc_counts = tokenizers.count_tokens(tokenizer, text)
        counts.update(doc_counts)
        digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        documents.append(splits.Document(path, tokens, digest))
    vocab = tokenizers.build_vocab(tokenizer, counts, vocab_size=10000 if tokenizer == "word" else None)
    tok = tokenizers.make_tokenizer(tokenizer, vocab)
    plan = splits.plan(documents, 0.05, 0.05, seed=0)
    writers = {s: tf.io.TFRecordWriter(f"{contract.shard_prefix(out, 'plain', s)}-00000-of-00001"
                                       f"{contract.SHARD_SUFFIX}", "GZIP") for s in contract.SPLITS}
    total = 0
    for path in files:  # pass 2: encode and write
        text = cleaned(path)
        if text is None:
            continue
        ids = tok.encode_array(text)
        for split, start, end in plan[path]:
            writers[split].write(contract.encode_example(ids[start:end]))
        total += len(ids)
    for writer in writers.values():
        writer.close()
    return {"seconds": time.perf_counter() - started, "tokens": total}


def _child(args: argparse.Namespace) -> None:
    files = json.loads(Path(args.files).read_text())
    os.makedirs(args.out, exist_ok=True)
    cpu = _cpu_seconds()
    if args.child == "beam":
        result = run_beam(files, args.out, args.tokenizer, shlex.split(args.beam_args))
    else:
        result = run_plain(files, args.out, args.tokenizer)
    result["cpu_seconds"] = _cpu_seconds() - cpu
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result))


def _spawn(side: str, files_json: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", side, "--files", str(files_json), "--out", str(out),
               "--tokenizer", args.tokenizer, "--beam_args", args.beam_args]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"bench/preprocess.py: the {side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=DEFAULT_CORPUS,
                        help="Glob of text files (≥10 MB for a fair number).")
    parser.add_argument("--tokenizer", default="char", choices=("char", "byte", "word"))
    parser.add_argument("--scale", type=int, default=1, help="Feed the corpus this many times.")
    parser.add_argument("--beam_args", default="", help="Extra Beam options for the Beam side.")
    parser.add_argument("--child", choices=("beam", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as scratch_name:
        scratch = Path(scratch_name)
        files = _corpus(args.corpus, args.scale, scratch)
        megabytes = sum(os.path.getsize(f) for f in files) / 1e6
        files_json = scratch / "files.json"
        files_json.write_text(json.dumps(files))
        plain = _spawn("plain", files_json, scratch / "plain", args)
        beam = _spawn("beam", files_json, scratch / "beam", args)
    if plain["tokens"] != beam["tokens"]:
        raise SystemExit(f"token counts differ: plain {plain['tokens']}, beam {beam['tokens']}")
    print(f"corpus: {len(files)} files, {megabytes:.1f} MB, {beam['tokens']:,.0f} {args.tokenizer} tokens"
          f" (scale {args.scale})")
    for name, result in (("plain loop", plain), (f"beam {args.beam_args or 'in_memory'}", beam)):
        print(f"  {name:28s} {megabytes / result['seconds']:6.2f} MB/s  ({result['seconds']:.2f} s wall, "
              f"{result['cpu_seconds']:.2f} s CPU)  peak RSS {result['peak_rss_mb']:.0f} MB")
    print(f"  ratio beam / plain: {plain['seconds'] / beam['seconds']:.2f}x by wall time, "
          f"{plain['cpu_seconds'] / beam['cpu_seconds']:.2f}x by CPU time (target >= 0.8x; CPU time is "
          "the steadier number on a shared machine)")


if __name__ == "__main__":
    main()
