"""Quality per CPU-minute: validation loss of the default char model after a wall-clock budget.

    python bench/quality.py [--corpus ../shared/corpora/tinyshakespeare/input.txt] [--seconds 120]
                            [--workdir DIR] [-- extra trainer.task flags]

Encodes the corpus at character level with the data contract (the last 10% of the text is the
validation split), runs `python -m trainer.task` with the default hyperparameters as a child
process, stops it with SIGTERM when the budget is spent (the trainer checkpoints and exits, the
preemption path), then evaluates the whole validation split with `trainer.evaluate`.
The budget covers everything the trainer does, start-up and compilation included.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preprocessing import contract  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "tinyshakespeare" / "input.txt"
PREFIX = "quality"
RECORD_TOKENS = contract.DEFAULT_RECORD_TOKENS


def write_char_data(text: str, data_dir: Path, valid_fraction: float = 0.1) -> contract.Metadata:
    """Char-level shards: train = the first 90% of the text, valid = the rest (test = valid)."""
    import tensorflow as tf

    vocab = tuple(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    ids = [index[c] for c in text]
    cut = int(len(ids) * (1 - valid_fraction))
    parts = {"train": ids[:cut], "valid": ids[cut:], "test": ids[cut:]}
    data_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, tokens in parts.items():
        path = contract.shard_prefix(str(data_dir), PREFIX, split) + "-00000-of-00001" + contract.SHARD_SUFFIX
        records = [tokens[i:i + RECORD_TOKENS] for i in range(0, len(tokens), RECORD_TOKENS)]
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for record in records:
                writer.write(contract.serialize_example(record))
        stats[split] = contract.SplitStats(tokens=len(tokens), records=len(records), shards=1)
    metadata = contract.Metadata(tokenizer="char", vocab=vocab, splits=stats, documents=1)
    Path(contract.metadata_path(str(data_dir), PREFIX)).write_text(contract.metadata_to_json(metadata))
    return metadata


def train_for(seconds: float, data_dir: Path, job_dir: Path, extra: list[str]) -> int:
    """Runs trainer.task until it finishes or the budget is spent; returns its exit status."""
    command = [sys.executable, "-m", "trainer.task", f"--data_dir={data_dir}", f"--data_prefix={PREFIX}",
               f"--job-dir={job_dir}", "--epochs=1000", "--eval_every=0", "--sample_every=0",
               "--save_checkpoints_steps=1000000", *extra]
    child = subprocess.Popen(command, cwd=ROOT)
    try:
        child.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGTERM)  # checkpoint and stop after the current step
        child.wait()
    return child.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and job here")
    parser.add_argument("extra", nargs="*", help="extra trainer.task flags (after --)")
    args = parser.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"error: --corpus {args.corpus} does not exist; fetch tinyshakespeare or pass --corpus")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="verne-quality-"))
    metadata = write_char_data(args.corpus.read_text(encoding="utf-8"), workdir / "data")
    job_dir = workdir / "job"
    started = time.monotonic()
    status = train_for(args.seconds, workdir / "data", job_dir, args.extra)
    elapsed = time.monotonic() - started
    if status not in (0, 143):
        sys.exit(f"error: trainer.task exited with status {status}")
    from trainer.evaluate import evaluate

    result = evaluate(str(job_dir), split="valid")
    nats = float(result["loss"])
    print(json.dumps({"corpus": str(args.corpus), "train_tokens": metadata.splits["train"].tokens,
                      "valid_tokens": result["tokens"], "seconds": round(elapsed, 1),
                      "steps": result["step"]}))
    print(f"validation loss after {elapsed:.0f} s ({result['step']} steps): "
          f"{nats:.4f} nats/char, {nats / math.log(2):.4f} bits/char")


if __name__ == "__main__":
    main()
