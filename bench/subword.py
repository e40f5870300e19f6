"""Subword vs char at equal wall clock: validation loss per character, and preprocessing speed.

    python bench/subword.py [--corpus '../shared/corpora/tinyshakespeare/input.txt'] [--seconds 120]
                            [--tokenizer bpe|unigram] [--vocab_size 2000] [--workdir DIR]
                            [-- extra trainer.task flags, given to both models]

Preprocesses the corpus twice with `python -m preprocessing.run` (char, then the subword
tokenizer, learned from the training split), timing each as a child process, start-up included.
Both jobs use the same seed and fractions, and a subword job plans its splits in characters as
a char job does, so both models are validated on exactly the same text. Each model then trains
for the same wall-clock budget with the same trainer flags (`bench/quality.py`'s `train_for`:
the default model, SIGTERM when the budget is spent), one after the other, and `trainer.evaluate`
reports its validation split per character (4 parallel streams, so both models see all but a
few hundred tokens of it). The last line compares the two.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from quality import DEFAULT_CORPUS, PREFIX, ROOT, train_for


def preprocess(corpus: str, data_dir: Path, tokenizer: list[str]) -> float:
    """Runs preprocessing.run as a child process; returns its wall-clock seconds."""
    command = [sys.executable, "-m", "preprocessing.run", "--input", corpus, "--output_dir", str(data_dir),
               "--data_prefix", PREFIX, "--seed", "1", *tokenizer]
    started = time.monotonic()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.monotonic() - started


def run_model(name: str, data_dir: Path, job_dir: Path, seconds: float,
              extra: list[str]) -> dict[str, object]:
    started = time.monotonic()
    status = train_for(seconds, data_dir, job_dir, extra)
    elapsed = time.monotonic() - started
    if status not in (0, 143):
        sys.exit(f"error: trainer.task ({name}) exited with status {status}")
    from trainer.evaluate import evaluate

    # 4 streams: whole windows then leave out under 4 × unroll tokens of the split, a few percent
    # of either model's validation text (at the training batch of 32 a bpe model would skip 17%).
    result = evaluate(str(job_dir), split="valid", batch_size=4)
    return {"model": name, "seconds": round(elapsed, 1), "steps": result["step"],
            "valid_tokens": result["tokens"], "valid_characters": result["characters"],
            "loss_per_token": round(float(result["loss"]), 4),
            "loss_per_char": round(float(result["loss_per_char"]), 4),
            "bits_per_char": round(float(result["bits_per_char"]), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="glob of text files")
    parser.add_argument("--seconds", type=float, default=120.0, help="training budget per model")
    parser.add_argument("--tokenizer", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--vocab_size", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and jobs here")
    parser.add_argument("extra", nargs="*", help="extra trainer.task flags (after --)")
    args = parser.parse_args()
    files = glob.glob(args.corpus)
    if not files:
        sys.exit(f"error: --corpus {args.corpus} matches no files; fetch the corpora or pass --corpus")
    megabytes = sum(Path(f).stat().st_size for f in files) / 1e6
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="verne-subword-"))
    subword_name = f"{args.tokenizer}{args.vocab_size}"
    rows = []
    subword_flags = ["--tokenizer", args.tokenizer, "--vocab_size", str(args.vocab_size)]
    for name, flags in (("char", ["--tokenizer", "char"]), (subword_name, subword_flags)):
        data_dir = workdir / f"data-{name}"
        seconds = preprocess(args.corpus, data_dir, flags)
        print(json.dumps({"preprocess": name, "megabytes": round(megabytes, 2),
                          "seconds": round(seconds, 1), "mb_per_s": round(megabytes / seconds, 3)}),
              flush=True)
        rows.append((name, data_dir))
    results = [run_model(name, data_dir, workdir / f"job-{name}", args.seconds, args.extra)
               for name, data_dir in rows]
    for result in results:
        print(json.dumps(result), flush=True)
    char, sub = results
    print(f"validation loss per character after {args.seconds:.0f} s of training each: char "
          f"{char['loss_per_char']:.4f} nats/char ({char['bits_per_char']:.4f} bits/char), "
          f"{sub['model']} {sub['loss_per_char']:.4f} nats/char ({sub['bits_per_char']:.4f} bits/char); "
          f"{sub['model']}/char = {float(sub['loss_per_char']) / float(char['loss_per_char']):.3f}"
          " (below 1: the subword model is better)")


if __name__ == "__main__":
    main()
