"""The model zoo compared: tokens/s and validation bpc of every `--cell` after the same budget.

    .venv/bin/python bench/models.py [--corpus ../shared/corpora/tinyshakespeare/input.txt]
        [--seconds 60] [--params 400000] [--cells lstm,gru,...] [--write_docs docs/models.md]

One run, one machine: the corpus is encoded once at character level (bench/quality.py's
`write_char_data`, last 10% = validation), then for each cell `python -m trainer.task` — the
real runner — trains a model whose width is chosen so its parameter count is as close as
possible to `--params`, and is stopped with SIGTERM when `--seconds` of wall clock are spent
(start-up and compilation included, so slow-to-trace models pay for it). Each job is then
evaluated on the whole validation split. tokens/s is the median of the runner's own progress
readings (the first include tracing, the last the final checkpoint). With `--write_docs`, the
table replaces the block between the `<!-- bench:models -->` markers of that file.
"""

from __future__ import annotations

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import quality  # noqa: E402

CELLS = ("lstm", "gru", "rnn", "mlstm", "mogrifier", "qrnn", "transformer")
COMMON = ["--embedding_size=64", "--batch_size=32", "--unroll_steps=64", "--learning_rate=2e-3",
          "--grad_clip=5", "--log_every=20"]
SHAPE = {"transformer": ["--layers=4", "--heads=4", "--max_context=64"]}
MARKER = "<!-- bench:models -->"


def _hparams(cell: str, width: int, vocab_size: int):  # noqa: ANN202 (imported lazily)
    from trainer.hparams import HParams

    base = dict(cell=cell, vocab_size=vocab_size, embedding_size=64, layers=2, language_model="char")
    if cell == "transformer":
        return HParams(**base | dict(layers=4, heads=4, max_context=64, d_model=width))
    return HParams(**base | dict(lstm_state_size=width, weight_norm=cell == "mlstm"))


def param_count(cell: str, width: int, vocab_size: int) -> int:
    from trainer.models import build_model

    return int(build_model(_hparams(cell, width, vocab_size)).count_params())


def matched_width(cell: str, target: int, vocab_size: int) -> tuple[int, int]:
    """The width (state size, or d_model in steps of 8: 4 heads of an even depth, which rotary
    positions pair up) whose model is closest to target."""
    step = 8 if cell == "transformer" else 1
    low, high = 1, 2048 // step
    while low < high:  # the smallest width with at least `target` parameters
        mid = (low + high) // 2
        if param_count(cell, mid * step, vocab_size) < target:
            low = mid + 1
        else:
            high = mid
    candidates = [w * step for w in (low - 1, low) if w >= 1]
    counts = {w: param_count(cell, w, vocab_size) for w in candidates}
    best = min(counts, key=lambda w: abs(counts[w] - target))
    return best, counts[best]


def width_flags(cell: str, width: int) -> list[str]:
    if cell == "transformer":
        return [f"--d_model={width}", *SHAPE["transformer"]]
    return [f"--lstm_state_size={width}", "--layers=2"]


def train_for(seconds: float, data_dir: Path, job_dir: Path, flags: list[str]) -> tuple[int, float | None]:
    """Runs trainer.task for `seconds`; returns (exit status, median tokens/s it reported)."""
    command = [sys.executable, "-m", "trainer.task", f"--data_dir={data_dir}",
               f"--data_prefix={quality.PREFIX}", f"--job-dir={job_dir}", "--epochs=1000",
               "--eval_every=0", "--sample_every=0", "--save_checkpoints_steps=1000000", *flags]
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + seconds
    rates = []
    stopped = False
    assert child.stdout is not None
    for line in child.stdout:
        found = re.search(r"([\d,]+) tok/s", line)
        if found:
            rates.append(float(found.group(1).replace(",", "")))
        if not stopped and time.monotonic() > deadline:
            child.send_signal(signal.SIGTERM)  # checkpoint and stop after the current step
            stopped = True
    # The median reading: the first ones include tracing and the last one the final checkpoint.
    return child.wait(), statistics.median(rates) if rates else None


def table(rows: list[dict[str, object]], seconds: float) -> str:
    lstm = next((r for r in rows if r["cell"] == "lstm"), None)
    lines = [f"Budget {seconds:.0f} s of wall clock per model (start-up and compilation included), "
             "tinyshakespeare, char level, batch 32, unroll 64, Adam 2e-3; bpc over the whole "
             "validation split (last 10%).", "",
             "| cell | width | parameters | steps | tokens/s | vs lstm | valid bpc |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['tokens_per_s'] / lstm['tokens_per_s']:.2f}x"
                 if lstm and r["tokens_per_s"] and lstm["tokens_per_s"] else "-")
        rate = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        lines.append(f"| {r['cell']} | {r['width']} | {r['params']:,} | {r['steps']} | {rate} | "
                     f"{ratio} | {r['bpc']:.3f} |")
    return "\n".join(lines)


def write_docs(path: Path, text: str) -> None:
    body = path.read_text(encoding="utf-8")
    parts = body.split(MARKER)
    if len(parts) != 3:
        sys.exit(f"error: --write_docs {path}: needs exactly two {MARKER} lines around the table")
    temporary = path.with_suffix(".tmp")
    temporary.write_text(f"{parts[0]}{MARKER}\n{text}\n{MARKER}{parts[2]}", encoding="utf-8")
    temporary.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=quality.DEFAULT_CORPUS)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--params", type=int, default=400_000)
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write_docs", type=Path, default=None)
    args = parser.parse_args()
    if not args.corpus.is_file():
        sys.exit(f"error: --corpus {args.corpus} does not exist; fetch tinyshakespeare or pass --corpus")
    cells = args.cells.split(",")
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        sys.exit(f"error: --cells: unknown {unknown}; choose from {','.join(CELLS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="verne-models-"))
    metadata = quality.write_char_data(args.corpus.read_text(encoding="utf-8"), workdir / "data")
    from trainer.evaluate import evaluate
    from trainer.model_fn import bits_per_token

    rows = []
    for cell in cells:
        width, params = matched_width(cell, args.params, metadata.vocab_size)
        job_dir = quality.fresh_job_dir(workdir / "job" / cell)
        status, rate = train_for(args.seconds, workdir / "data", job_dir,
                                 [f"--cell={cell}", *COMMON, *width_flags(cell, width)])
        if status not in (0, 143):
            sys.exit(f"error: trainer.task --cell={cell} exited with status {status}")
        result = evaluate(str(job_dir), split="valid", write=False)
        rows.append(dict(cell=cell, width=width, params=params, steps=result["step"],
                         tokens_per_s=rate, bpc=bits_per_token(float(result["loss"]))))
        print(f"{cell}: width {width}, {params:,} parameters, {result['step']} steps, "
              f"{rate or 0:,.0f} tokens/s, valid bpc {rows[-1]['bpc']:.3f}", flush=True)
    text = table(rows, args.seconds)
    print(text)
    if args.write_docs:
        write_docs(args.write_docs, text)


if __name__ == "__main__":
    main()
