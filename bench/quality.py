"""Quality per CPU-minute: validation loss of the default char model after a wall-clock budget.

    python bench/quality.py [--corpus ../shared/corpora/tinyshakespeare/input.txt] [--seconds 120]
                            [--workdir DIR] [-- extra trainer.task flags]

Encodes the corpus at character level with the data contract (the last 10% of the text is the
validation split), runs `python -m trainer.task` with the default hyperparameters as a child
process, stops it with SIGTERM when the budget is spent (the trainer checkpoints and exits, the
preemption path), then evaluates the whole validation split with `trainer.evaluate`.
The budget covers everything the trainer does, start-up and compilation included.

    python bench/quality.py --compare [--corpus FILE] [--seconds S]

The three-way comparison of the issue "quality per CPU-second", in one run on one machine:
(1) the small-GPT reference (bench/gpt_reference.py, PyTorch, in bench's torch venv), timed as a
whole process; (2) verne's default char model and (3) verne's transformer at the reference's
shape, batch and schedule, each given the reference's wall clock (or --seconds). It prints each
model's loss over the whole validation split, the three training curves by wall clock (the loss
logged by each fifth of the budget, from process start), the training loss at steps 250/500/1000
of both transformers, verne's time from process start to its first training step, and both
targets.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preprocessing import contract  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpora" / "tinyshakespeare" / "input.txt"
PREFIX = "quality"
RECORD_TOKENS = contract.DEFAULT_RECORD_TOKENS


def write_char_data(text: str, data_dir: Path, valid_fraction: float = 0.1) -> contract.Metadata:
    """Char-level shards: train = the first 90% of the text, valid = the rest (test = valid), with
    the vocabulary preprocessing would build (its `<unk>` included, which sampling needs)."""
    import tensorflow as tf

    from preprocessing import tokenizers

    vocab = tokenizers.build_vocab("char", tokenizers.count_tokens("char", text)[1])
    ids = list(tokenizers.make_tokenizer("char", vocab).encode(text))
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
        stats[split] = contract.SplitStats(tokens=len(tokens), records=len(records), shards=1,
                                           characters=len(tokens))
    metadata = contract.Metadata(tokenizer="char", vocab=vocab, splits=stats, documents=1)
    Path(contract.metadata_path(str(data_dir), PREFIX)).write_text(contract.metadata_to_json(metadata))
    return metadata


def train_for(seconds: float, data_dir: Path, job_dir: Path, extra: list[str],
              log: Path | None = None) -> int:
    """Runs trainer.task until it finishes or the budget is spent; returns its exit status. With
    `log`, its output goes there, each line stamped with the seconds since the process started."""
    command = [sys.executable, "-m", "trainer.task", f"--data_dir={data_dir}", f"--data_prefix={PREFIX}",
               f"--job-dir={job_dir}", "--epochs=1000", "--eval_every=0", "--sample_every=0",
               "--save_checkpoints_steps=1000000", *extra]
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE if log else None,
                             stderr=subprocess.STDOUT if log else None, text=True)
    # SIGTERM once, when the budget is spent (a second one would kill it before it saves).
    timer = threading.Timer(seconds, lambda: child.poll() is None and child.send_signal(signal.SIGTERM))
    timer.start()
    try:
        if log:
            with log.open("w") as out:
                for line in child.stdout:
                    out.write(f"{time.monotonic() - started:.2f} {line}")
        child.wait()
    finally:
        timer.cancel()
    return child.returncode


def fresh_job_dir(job_dir: Path) -> Path:
    """`job_dir`, refused if a run is already there (trainer.task would resume it, and the budget
    would measure the rest of an old run)."""
    if job_dir.exists():
        sys.exit(f"error: --workdir {job_dir.parent} already holds a run ({job_dir.name}/); "
                 "pass an empty or new --workdir")
    return job_dir


def validation_loss(job_dir: Path, batch_size: int | None = None) -> tuple[float, int, int]:
    """(nats/char over the whole validation split, the checkpoint's step, tokens evaluated), in
    the job's batch of parallel streams or `batch_size` (fewer streams leave out fewer tokens:
    under batch x unroll)."""
    from trainer.evaluate import evaluate

    result = evaluate(str(job_dir), split="valid", batch_size=batch_size)
    return float(result["loss"]), int(result["step"]), int(result["tokens"])


def single(args: argparse.Namespace) -> None:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="verne-quality-"))
    metadata = write_char_data(args.corpus.read_text(encoding="utf-8"), workdir / "data")
    job_dir = fresh_job_dir(workdir / "job")
    started = time.monotonic()
    status = train_for(args.seconds, workdir / "data", job_dir, args.extra)
    elapsed = time.monotonic() - started
    if status not in (0, 143):
        sys.exit(f"error: trainer.task exited with status {status}")
    nats, step, tokens = validation_loss(job_dir)
    print(json.dumps({"corpus": str(args.corpus), "train_tokens": metadata.splits["train"].tokens,
                      "valid_tokens": tokens, "seconds": round(elapsed, 1), "steps": step}))
    print(f"validation loss after {elapsed:.0f} s ({step} steps): "
          f"{nats:.4f} nats/char, {nats / math.log(2):.4f} bits/char")


# The reference's recipe in trainer.task's flags (bench/gpt_reference.py has it in PyTorch): its
# shape (tied embeddings), batch, AdamW, schedule and clipping.
TRANSFORMER = ["--cell=transformer", "--layers=4", "--d_model=128", "--heads=4", "--max_context=64",
               "--embedding_size=128", "--tie_embeddings", "--unroll_steps=64", "--batch_size=12",
               "--learning_rate=1e-3", "--min_learning_rate=1e-4", "--adam_beta2=0.99", "--weight_decay=0.1",
               "--warmup_steps=100", "--lr_schedule=cosine", "--max_steps=2000", "--grad_clip=1",
               "--log_every=50"]
CHECKPOINTS = (250, 500, 1000)
_STEP_LINE = re.compile(r"^(\S+) step (\d+)/\d+ .*? loss ([0-9.]+)")


def verne_curve(log: Path) -> tuple[list[tuple[float, int, float]], float | None]:
    """(seconds since process start, step, training loss: mean of the last --log_every steps) per
    logged step, and the estimated seconds from process start to the first training step (the
    first logged step's time less its share of the steady step time between the first two logs)."""
    points = [(float(t), int(step), float(loss)) for t, step, loss in
              (m.groups() for m in map(_STEP_LINE.match, log.read_text().splitlines()) if m)]
    if len(points) < 2:
        return points, None
    (t1, s1, _), (t2, s2, _) = points[:2]
    return points, t1 - (s1 - 1) * (t2 - t1) / (s2 - s1)


def loss_by_step(points: list[tuple[float, int, float]]) -> dict[int, float]:
    return {step: loss for _, step, loss in points}


def loss_at_time(points: list[tuple[float, int, float]], seconds: float) -> float:
    """The last training loss logged by `seconds` after process start (nan before the first)."""
    return next((loss for t, _, loss in reversed(points) if t <= seconds), math.nan)


def reference(corpus: Path, workdir: Path) -> tuple[dict[str, object], float]:
    """Runs the GPT reference as a whole process; its JSON lines and its wall clock."""
    from train import ensure_torch_venv  # bench/train.py keeps the torch venv

    python = ensure_torch_venv(ROOT / "bench" / ".venv-torch")
    started = time.monotonic()
    result = subprocess.run([str(python), str(ROOT / "bench" / "gpt_reference.py"), "--corpus", str(corpus)],
                            capture_output=True, text=True, check=True)
    seconds = time.monotonic() - started
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    (workdir / "reference.jsonl").write_text(result.stdout)
    final = next(line for line in lines if "final" in line)
    points = [(line["seconds"], line["step"], line["loss"]) for line in lines if "loss" in line]
    return {"valid_loss": final["valid_loss"], "points": points}, seconds


def compare(args: argparse.Namespace) -> None:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="verne-quality-"))
    jobs = {name: fresh_job_dir(workdir / name) for name in ("default", "transformer")}
    write_char_data(args.corpus.read_text(encoding="utf-8"), workdir / "data")
    ref, ref_seconds = reference(args.corpus, workdir)
    budget = args.seconds if args.given_seconds else ref_seconds
    print(f"reference GPT (4x4x128, 2000 iterations): {ref_seconds:.1f} s for the whole process, "
          f"validation {ref['valid_loss']:.4f} nats/char; verne's budget: {budget:.1f} s each", flush=True)
    rows = {}
    for name, flags in (("default", ["--log_every=50"]), ("transformer", TRANSFORMER)):
        log = workdir / f"{name}.log"
        status = train_for(budget, workdir / "data", jobs[name], [*flags, *args.extra], log=log)
        if status not in (0, 143):
            sys.exit(f"error: trainer.task ({name}) exited with status {status}; see {log}")
        nats, step, _ = validation_loss(jobs[name])
        points, first_step = verne_curve(log)
        rows[name] = {"loss": nats, "steps": step, "points": points, "first_step": first_step}
        print(f"verne {name}: validation {nats:.4f} nats/char after {budget:.0f} s ({step} steps); "
              f"process start to first training step ~{first_step or float('nan'):.1f} s", flush=True)
    curves = {"reference GPT": ref["points"], "verne default": rows["default"]["points"],
              "verne transformer": rows["transformer"]["points"]}
    times = [round(budget * k / 5) for k in range(1, 6)]
    print("training loss at  second " + "  ".join(f"{t:>6d}" for t in times))
    for name, points in curves.items():
        print(f"{name:>24s}  " + "  ".join(f"{loss_at_time(points, t):6.3f}" for t in times))
    by_step = {name: loss_by_step(curves[name]) for name in ("reference GPT", "verne transformer")}
    print("training loss at    step " + "  ".join(f"{s:>6d}" for s in CHECKPOINTS))
    for name, curve in by_step.items():
        print(f"{name:>24s}  " + "  ".join(f"{curve.get(s, math.nan):6.3f}" for s in CHECKPOINTS))
    gaps = [by_step["verne transformer"].get(s, math.inf) - by_step["reference GPT"][s] for s in CHECKPOINTS]
    print(f"{'difference':>24s}  " + "  ".join(f"{g:+6.3f}" for g in gaps))
    default_gap = rows["default"]["loss"] - ref["valid_loss"]
    transformer_gap = rows["transformer"]["loss"] - ref["valid_loss"]
    print(f"target default <= reference - 0.15: {default_gap:+.4f} nats/char "
          f"({'met' if default_gap <= -0.15 else 'not met'})")
    print(f"target transformer <= reference, not worse per step: {transformer_gap:+.4f} nats/char, "
          f"per step {'met' if max(gaps) <= 0 else 'not met'} "
          f"({'met' if transformer_gap <= 0 and max(gaps) <= 0 else 'not met'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--seconds", type=float, default=None,
                        help="training budget (default 120; with --compare: the reference's wall clock)")
    parser.add_argument("--compare", action="store_true", help="the three-way comparison (see above)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep data and job here")
    parser.add_argument("extra", nargs="*", help="extra trainer.task flags (after --)")
    args = parser.parse_args()
    args.given_seconds = args.seconds is not None
    args.seconds = args.seconds if args.given_seconds else 120.0
    if not args.corpus.is_file():
        sys.exit(f"error: --corpus {args.corpus} does not exist; fetch tinyshakespeare or pass --corpus")
    (compare if args.compare else single)(args)


if __name__ == "__main__":
    main()
