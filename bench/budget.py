"""Loss on the whole validation split against wall-clock budget: verne `--time_budget` next to the
GPT reference given the same minutes (issue 23), as a table (docs/budget.md) and a plot
(docs/budget.png).

    python bench/budget.py [--corpus shelf,tinyshakespeare] [--minutes 1,10,30]
                           [--only reference|verne] [--rerun_reference] [--table_only]

Corpora, and the budgets run on each unless --minutes says otherwise:
- shelf (../shared/corpora/shelf, 63 raw Gutenberg books): 1, 10 and 30 minutes. The books in file
  name order; the last 10% of them (whole books) are the validation split, never trained on.
  Preprocessed with verne's `python -m preprocessing.run --train … --valid … --tokenizer char`.
- tinyshakespeare: 1 and 10 minutes; the last 10% of the text is validation (bench/quality.py's
  write_char_data).
Prepared data is kept in --workdir and reused.

Each budget runs
- the GPT reference (bench/gpt_reference.py in bench's torch venv) on the same token ids verne
  trains on (written from verne's shards), its iteration count set so that training ends when the
  budget is spent, counted from its process start (imports, data loading and the step-time
  calibration on its first warm-up steps included; the count is corrected as the step time
  drifts). Its final whole-validation evaluation is not in the budget, as verne's
  `trainer.evaluate` below is not; the recipe's periodic 200-batch
  estimates are left out (they would only take training time from the reference). At 10 minutes
  and more it runs twice, as the 4x4x128 baby (block 64, batch 12) and as 6 layers x 6 heads x 192
  (block 128, batch 32), and the better one counts;
- verne: `python -m trainer.task --time_budget=<N>m` with only the data and job-dir flags, so
  everything else (the model, its schedule, and its own final evaluation, checkpoint, sample and
  export) is verne's choice and inside the budget; its process's wall clock is recorded (the
  budget allows 5% over). XLA's persistent compile cache is off for it, as on a user's first
  run. Then `trainer.evaluate` scores the validation split in 4 streams (all
  but < 4 x unroll tokens of it).

References do not change when verne does: each result is kept in bench/results/budget_reference.json
under the CPU's name, corpus, minutes and shape, and reused unless --rerun_reference (or the data
changed). verne's results go to bench/results/budget_verne.json with the git commit. Every run ends
by rewriting the table and the plot for this CPU from both files (--table_only does only that).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from quality import DEFAULT_CORPUS, PREFIX, ROOT, validation_loss, write_char_data

SHARED = ROOT.parent / "shared" / "corpora"
VALID_FRACTION = 0.1
TARGET_MARGIN = 0.10  # verne <= reference - 0.10 nats/char (issue 23)
OVER_BUDGET = 1.05  # verne's process may end 5% after the budget
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
REFERENCE_FILE, VERNE_FILE = "budget_reference.json", "budget_verne.json"
TABLE_FILE, PLOT_FILE = "budget.md", "budget.png"
# The reference's two shapes: gpt_reference.py flags.
SHAPES = {
    "4x4x128": ["--layers", "4", "--heads", "4", "--width", "128", "--block", "64", "--batch", "12"],
    "6x6x192": ["--layers", "6", "--heads", "6", "--width", "192", "--block", "128", "--batch", "32"],
}
BOTH_SHAPES_FROM = 10.0  # minutes: from here on the reference is the better of both shapes
PROGRESS_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    path: Path
    minutes: tuple[float, ...]


def default_corpora(shelf: Path, tinyshakespeare: Path) -> dict[str, Corpus]:
    return {"shelf": Corpus("shelf", shelf, (1.0, 10.0, 30.0)),
            "tinyshakespeare": Corpus("tinyshakespeare", tinyshakespeare, (1.0, 10.0))}


# ---------------------------------------------------------------------------------------------
# Flags


def parse_minutes(text: str) -> tuple[float, ...]:
    """`1,10,30` → (1.0, 10.0, 30.0); ValueError naming --minutes otherwise."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--minutes={text!r}: give positive minutes separated by commas, e.g. 1,10,30")
    return values


def parse_corpora(text: str, corpora: dict[str, Corpus]) -> list[Corpus]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in corpora]
    if not names or unknown:
        raise ValueError(f"--corpus={text!r}: choose from {', '.join(corpora)} (comma-separated)")
    return [corpora[name] for name in names]


def shapes_for(minutes: float) -> list[str]:
    return list(SHAPES) if minutes >= BOTH_SHAPES_FROM else ["4x4x128"]


def budget_flag(minutes: float) -> str:
    return f"{minutes:g}m"


def key(minutes: float) -> str:
    return f"{minutes:g}"


# ---------------------------------------------------------------------------------------------
# Data: verne's shards for trainer.task, the same ids as .npy files for the reference


def split_books(books: list[Path], valid_fraction: float = VALID_FRACTION) -> tuple[list[Path], list[Path]]:
    """(train, valid) whole books: the last `valid_fraction` of them in file name order (at least
    one each)."""
    ordered = sorted(books, key=lambda path: path.name)
    if len(ordered) < 2:
        raise ValueError("needs at least two books (one to train on, one to validate)")
    valid = min(len(ordered) - 1, max(1, round(len(ordered) * valid_fraction)))
    return ordered[:-valid], ordered[-valid:]


def corpus_books(corpus: Corpus) -> list[Path]:
    books = sorted(corpus.path.glob("*.txt")) if corpus.path.is_dir() else []
    if len(books) < 2:
        raise ValueError(f"--{corpus.name}={corpus.path}: not a directory of at least two *.txt books")
    return books


def source_description(corpus: Corpus) -> dict[str, object]:
    """What the prepared data was made from: reused only while this stays the same."""
    if corpus.name == "tinyshakespeare":
        if not corpus.path.is_file():
            raise ValueError(f"--{corpus.name}={corpus.path}: no such file")
        return {"file": str(corpus.path.resolve()), "bytes": corpus.path.stat().st_size,
                "valid_fraction": VALID_FRACTION}
    train, valid = split_books(corpus_books(corpus))
    return {"directory": str(corpus.path.resolve()), "train": [p.name for p in train],
            "valid": [p.name for p in valid], "bytes": sum(p.stat().st_size for p in train + valid)}


def preprocess_books(train: list[Path], valid: list[Path], data_dir: Path) -> None:
    """verne's Beam job over whole books given per split (no test split: nothing here reads it)."""
    def patterns(paths: list[Path]) -> str:
        return ",".join(str(p.resolve()) for p in paths)

    command = [sys.executable, "-m", "preprocessing.run", "--train", patterns(train), "--valid",
               patterns(valid), "--output_dir", str(data_dir),
               "--data_prefix", PREFIX, "--tokenizer", "char"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: preprocessing.run failed ({result.returncode}): "
                 f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")


def write_token_files(data_dir: Path, tokens_dir: Path) -> dict[str, int]:
    """The train and valid ids of verne's shards, in shard and record order, as DIR/SPLIT.npy
    (uint16/uint32) plus DIR/vocab.json: what gpt_reference.py --tokens reads."""
    import numpy as np
    import tensorflow as tf

    from preprocessing import contract
    from trainer import data

    metadata = data.read_metadata(str(data_dir), PREFIX)
    dtype = np.uint16 if metadata.vocab_size <= 1 << 16 else np.uint32
    tokens_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "valid"):
        files = data.shard_files(str(data_dir), PREFIX, split)
        records = tf.data.TFRecordDataset(files, compression_type="GZIP")
        ids = np.concatenate([contract.parse_example(r).numpy() for r in records]).astype(dtype)
        expected = metadata.splits[split].tokens
        if len(ids) != expected:
            raise RuntimeError(f"{split}: read {len(ids)} tokens, the metadata says {expected}")
        np.save(tokens_dir / f"{split}.npy", ids)
        counts[split] = len(ids)
    (tokens_dir / "vocab.json").write_text(json.dumps({"vocab_size": metadata.vocab_size}))
    return counts


def prepare(corpus: Corpus, workdir: Path) -> tuple[Path, Path, dict[str, object]]:
    """(verne's data dir, the reference's token dir, a description of the data), made once and
    reused while the corpus is unchanged."""
    source = source_description(corpus)
    base = workdir / corpus.name
    stamp = base / "prepared.json"
    if stamp.exists():
        prepared = json.loads(stamp.read_text())
        if prepared["source"] == source:
            return base / "data", base / "tokens", prepared
    print(f"[budget] preparing {corpus.name} from {corpus.path} ...", flush=True)
    started = time.monotonic()
    for stale in ("data", "tokens"):  # verne's job dirs and the logs stay
        shutil.rmtree(base / stale, ignore_errors=True)
    if corpus.name == "tinyshakespeare":
        write_char_data(corpus.path.read_text(encoding="utf-8"), base / "data", VALID_FRACTION)
    else:
        train, valid = split_books(corpus_books(corpus))
        preprocess_books(train, valid, base / "data")
    counts = write_token_files(base / "data", base / "tokens")
    prepared = {"source": source, "tokens": counts}
    write_json(stamp, prepared)
    print(f"[budget] {corpus.name}: {counts['train']:,} train and {counts['valid']:,} valid tokens "
          f"({time.monotonic() - started:.0f} s)", flush=True)
    return base / "data", base / "tokens", prepared


# ---------------------------------------------------------------------------------------------
# Results


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU model name with its family and model numbers, from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            import platform
            return platform.processor() or platform.machine() or "unknown CPU"
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    model = fields.get("model name", "unknown CPU")
    return f"{model} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        sys.exit(f"error: {path} is not valid JSON; fix or remove it")


def write_json(path: Path, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def store(path: Path, cpu: str, corpus: str, minutes: float, result: dict, shape: str | None = None) -> None:
    """Adds one result under [cpu][corpus][minutes] (and [shape]), re-reading the file first."""
    body = read_json(path)
    slot = body.setdefault(cpu, {}).setdefault(corpus, {})
    if shape is None:
        slot[key(minutes)] = result
    else:
        slot.setdefault(key(minutes), {})[shape] = result
    write_json(path, body)


def git_commit() -> str:
    """HEAD, with `+dirty` when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(max(seconds, 0))), 60)
    return f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------------------------------------
# Runs


def run_reference(python: Path, tokens_dir: Path, shape: str, minutes: float, label: str,
                  log: Path) -> dict:
    """gpt_reference.py filling `minutes` of wall clock (its output kept in `log`); its final line
    plus the process's wall clock."""
    seconds = minutes * 60
    command = [str(python), str(ROOT / "bench" / "gpt_reference.py"), "--tokens", str(tokens_dir),
               *SHAPES[shape], "--seconds", f"{seconds:g}", "--eval_every", "0"]
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    final, iters, shown = None, None, started
    with log.open("w") as out:
        for line in child.stdout:
            out.write(line)
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            iters = entry.get("iters", iters)
            final = entry if "final" in entry else final
            if entry.get("step") == iters:
                print(f"[budget] {label}: training done at {entry['seconds']:.0f} s; evaluating the "
                      "whole validation split ...", flush=True)
            elif "evaluated" in entry:
                print(f"[budget] {label}: evaluated {entry['evaluated']:,} of {entry['of']:,} tokens "
                      f"({clock(time.monotonic() - started)} since start)", flush=True)
            elif "loss" in entry and time.monotonic() - shown >= PROGRESS_SECONDS:
                shown = time.monotonic()
                print(f"[budget] {label}: step {entry['step']:,}/{iters or 0:,}, train loss "
                      f"{entry['loss']:.3f}, {clock(shown - started)} of {clock(seconds)}", flush=True)
    if child.wait() or final is None:
        sys.exit(f"error: gpt_reference.py ({label}) exited with status {child.returncode}; see {log}")
    return {"shape": shape, "iters": final["final"], "valid_loss": final["valid_loss"],
            "train_seconds": final["seconds"], "process_seconds": round(time.monotonic() - started, 1),
            "step_seconds": final["step_seconds"], "valid_tokens": final["valid_tokens"],
            "train_tokens": final["train_tokens"], "parameters": final["parameters"], "date": now()}


def model_summary(hparams: dict) -> str:
    """`lstm 2x512, unroll 128, batch 32` (`transformer 4x4x128, …`) from a job's hparams.json."""
    if hparams.get("cell") == "transformer":
        shape = f"{hparams.get('layers')}x{hparams.get('heads')}x{hparams.get('d_model')}"
    else:
        shape = f"{hparams.get('layers')}x{hparams.get('lstm_state_size')}"
    head = f" + attention over {hparams['attention_window']}" if hparams.get("attention_window") else ""
    text = (f"{hparams.get('cell')} {shape}{head}, unroll {hparams.get('unroll_steps')}, "
            f"batch {hparams.get('batch_size')}")
    return text + (f", dropout {hparams['dropout']:g}" if hparams.get("dropout") else "")


def first_run_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` for a user's first run on this machine: XLA's persistent compile cache off (a
    second run of the same model would load its compiled steps instead of compiling them, 3-8 s
    of a transformer's minute), and none inherited through TF_XLA_FLAGS."""
    from trainer import cache_dirs

    flags = [f for f in environ.get("TF_XLA_FLAGS", "").split()
             if f.partition("=")[0] != cache_dirs.PERSISTENT_CACHE_FLAG]
    return {**environ, "TF_XLA_FLAGS": " ".join(flags), cache_dirs.XLA_CACHE_SWITCH: "0"}


def run_verne(data_dir: Path, job_dir: Path, minutes: float, label: str) -> dict:
    """trainer.task --time_budget with only data and job flags, compiling everything as a first
    run does, then the whole validation split."""
    command = [sys.executable, "-m", "trainer.task", f"--data_dir={data_dir}", f"--data_prefix={PREFIX}",
               f"--job-dir={job_dir}", f"--time_budget={budget_flag(minutes)}"]
    print(f"[budget] {label}: {' '.join(command[1:])} (XLA's compile cache off)", flush=True)
    started = time.monotonic()
    status = subprocess.run(command, cwd=ROOT, env=first_run_environment(dict(os.environ))).returncode
    wall = time.monotonic() - started
    if status:
        sys.exit(f"error: trainer.task ({label}) exited with status {status}")
    hparams = json.loads((job_dir / "hparams.json").read_text())
    print(f"[budget] {label}: trainer.task took {clock(wall)} of {clock(minutes * 60)}; "
          "evaluating the validation split ...", flush=True)
    loss, step, tokens = validation_loss(job_dir, batch_size=4)
    return {"model": model_summary(hparams), "valid_loss": round(loss, 4), "steps": step,
            "wall_seconds": round(wall, 1), "within_budget": wall <= OVER_BUDGET * minutes * 60,
            "valid_tokens_evaluated": tokens, "commit": git_commit(), "date": now(),
            # trainer.choose's record of why it chose this model (absent before it existed)
            "chosen": hparams.get("chosen"),
            "hparams": {k: hparams.get(k) for k in ("cell", "layers", "lstm_state_size", "d_model", "heads",
                                                    "embedding_size", "unroll_steps", "batch_size", "dropout",
                                                    "learning_rate", "lr_schedule", "precision")}}


@dataclasses.dataclass(frozen=True)
class Run:
    kind: str  # "reference" or "verne"
    corpus: Corpus
    minutes: float
    shape: str = ""

    @property
    def label(self) -> str:
        what = f"reference {self.shape}" if self.kind == "reference" else "verne --time_budget"
        return f"{what} on {self.corpus.name}, {budget_flag(self.minutes)}"


def plan(corpora: list[Corpus], minutes: tuple[float, ...] | None, only: str | None, cpu: str,
         references: dict, prepared: dict[str, dict], rerun_reference: bool,
         shapes: tuple[str, ...] = tuple(SHAPES)) -> list[Run]:
    """The runs to do, in order: per corpus and budget, the references (of `shapes`) not stored
    yet, then verne."""
    runs = []
    for corpus in corpora:
        for m in minutes or corpus.minutes:
            if only != "verne":
                for shape in (s for s in shapes_for(m) if s in shapes):
                    stored = references.get(cpu, {}).get(corpus.name, {}).get(key(m), {}).get(shape)
                    tokens = prepared[corpus.name]["tokens"]
                    same_data = stored and (stored["train_tokens"], stored["valid_tokens"]) == (
                        tokens["train"], tokens["valid"])
                    if stored and same_data and not rerun_reference:
                        print(f"[budget] reusing the stored reference {shape} on {corpus.name}, "
                              f"{budget_flag(m)}: {stored['valid_loss']:.4f} ({stored['date']})", flush=True)
                        continue
                    runs.append(Run("reference", corpus, m, shape))
            if only != "reference":
                runs.append(Run("verne", corpus, m))
    return runs


# ---------------------------------------------------------------------------------------------
# Table and plot


def rows_for(cpu: str, references: dict, verne: dict, corpora: dict[str, Corpus]) -> list[dict]:
    """One row per corpus and budget with anything stored for this CPU (the default budgets always)."""
    rows = []
    for name, corpus in corpora.items():
        stored = set(references.get(cpu, {}).get(name, {})) | set(verne.get(cpu, {}).get(name, {}))
        for m in sorted({key(m) for m in corpus.minutes} | stored, key=float):
            shapes = references.get(cpu, {}).get(name, {}).get(m, {})
            best = min(shapes.values(), key=lambda r: r["valid_loss"]) if shapes else None
            ours = verne.get(cpu, {}).get(name, {}).get(m)
            rows.append({"corpus": name, "minutes": float(m), "reference": best, "shapes": shapes,
                         "verne": ours, "complete": set(shapes) >= set(shapes_for(float(m)))})
    return rows


def table(cpu: str, rows: list[dict]) -> str:
    lines = [
        "# verne `--time_budget` against the GPT reference at equal wall clock",
        "",
        f"Written by `python bench/budget.py` (bench/README.md says how it measures), {now()}.",
        f"CPU: **{cpu}**, {os.cpu_count()} cores. Loss: nats/char over the whole validation split "
        "(held-out whole books on shelf; the last 10% of tinyshakespeare). Target: verne ≤ reference − "
        f"{TARGET_MARGIN:.2f}.",
        "",
        "| corpus | budget | reference (shape, iterations) | reference loss | verne (model chosen, steps, "
        "wall clock) | verne loss | difference | target | met? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref, ours = row["reference"], row["verne"]
        ref_text = "not run" if ref is None else (
            f"{ref['shape']}, {ref['iters']:,} in {clock(ref['train_seconds'])}"
            + ("" if abs(ref["train_seconds"] / (row["minutes"] * 60) - 1) <= OVER_BUDGET - 1
               else " **off budget by > 5%: rerun**")
            + ("" if row["complete"] else " (other shape not run)"))
        others = [f"{s} {r['valid_loss']:.4f}" for s, r in sorted(row["shapes"].items()) if r is not ref]
        ref_loss = "—" if ref is None else (
            f"{ref['valid_loss']:.4f}" + (f" ({'; '.join(others)})" if others else ""))
        ours_text = "not run" if ours is None else (
            f"{ours['model']}; {ours['steps']:,} steps; {clock(ours['wall_seconds'])}"
            + ("" if ours["within_budget"] else " **over budget**"))
        ours_loss = "—" if ours is None else f"{ours['valid_loss']:.4f}"
        target = "—" if ref is None else f"≤ {ref['valid_loss'] - TARGET_MARGIN:.4f}"
        if ref is None or ours is None:
            difference, met = "—", "—"
        else:
            gap = ours["valid_loss"] - ref["valid_loss"]
            difference = f"{gap:+.4f}"
            met = "**yes**" if gap <= -TARGET_MARGIN and ours["within_budget"] else "no"
            met += "" if row["complete"] else " (one shape only)"
        lines.append(f"| {row['corpus']} | {budget_flag(row['minutes'])} | {ref_text} | {ref_loss} | "
                     f"{ours_text} | {ours_loss} | {difference} | {target} | {met} |")
    reasons = [f"- {row['corpus']}, {budget_flag(row['minutes'])}: {row['verne']['chosen']['reason']}"
               for row in rows if row["verne"] and (row["verne"].get("chosen") or {}).get("reason")]
    if reasons:
        lines += ["", "Why verne chose each model (its hparams.json):", "", *reasons]
    commits = sorted({row["verne"]["commit"] for row in rows if row["verne"]})
    lines += ["", "verne's runs: commit " + ", ".join(commits) if commits else "verne: nothing run yet.", "",
              f"![loss against budget]({PLOT_FILE})", ""]
    return "\n".join(lines)


def plot(python: Path, cpu: str, rows: list[dict], path: Path) -> None:
    """The plot, drawn by bench/budget_plot.py in the torch venv (matplotlib is no verne dependency)."""
    series = [{"corpus": r["corpus"], "minutes": r["minutes"],
               "reference": r["reference"] and r["reference"]["valid_loss"],
               "verne": r["verne"] and r["verne"]["valid_loss"]} for r in rows]
    body = json.dumps({"cpu": cpu, "rows": series, "output": str(path)})
    subprocess.run([str(python), str(ROOT / "bench" / "budget_plot.py")], input=body, text=True, check=True)


def write_docs(python: Path, cpu: str, results: Path, docs: Path, corpora: dict[str, Corpus]) -> None:
    rows = rows_for(cpu, read_json(results / REFERENCE_FILE), read_json(results / VERNE_FILE), corpora)
    docs.mkdir(parents=True, exist_ok=True)
    temporary = docs / (TABLE_FILE + ".tmp")
    temporary.write_text(table(cpu, rows))
    os.replace(temporary, docs / TABLE_FILE)
    plot(python, cpu, rows, docs / PLOT_FILE)
    print(f"[budget] wrote {docs / TABLE_FILE} and {docs / PLOT_FILE}", flush=True)


# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.exit(f"error: {message} (see --help)")  # one line, no usage dump


def main() -> None:
    parser = _Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="shelf,tinyshakespeare", help="shelf, tinyshakespeare or both")
    parser.add_argument("--minutes", default=None,
                        help="budgets to run, e.g. 1,10 (default: 1,10,30 on shelf, 1,10 on tinyshakespeare)")
    parser.add_argument("--only", choices=("reference", "verne"), default=None, help="run only one side")
    parser.add_argument("--rerun_reference", action="store_true", help="rerun stored references")
    parser.add_argument("--shape", choices=tuple(SHAPES), action="append",
                        help="run only this reference shape (repeatable; default: both where they apply)")
    parser.add_argument("--table_only", action="store_true", help="only rewrite the table and plot")
    parser.add_argument("--shelf", type=Path, default=SHARED / "shelf", help="the shelf's directory of books")
    parser.add_argument("--tinyshakespeare", type=Path, default=DEFAULT_CORPUS,
                        help="tinyshakespeare's input.txt")
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".budget-work",
                        help="prepared data and verne's job dirs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON results are kept")
    parser.add_argument("--docs", type=Path, default=DOCS, help="where the table and plot go")
    parser.add_argument("--torch_venv", type=Path, default=ROOT / "bench" / ".venv-torch")
    args = parser.parse_args()
    args.workdir = args.workdir.resolve()  # trainer.task runs in the repository's root
    corpora = default_corpora(args.shelf, args.tinyshakespeare)
    try:
        selected = parse_corpora(args.corpus, corpora)
        minutes = parse_minutes(args.minutes) if args.minutes is not None else None
        for corpus in selected if not args.table_only else ():
            source_description(corpus)  # a missing corpus is an error before anything runs
    except ValueError as err:
        sys.exit(f"error: {err}")
    from train import ensure_torch_venv  # bench/train.py keeps the torch venv

    cpu = cpu_name()
    python = ensure_torch_venv(args.torch_venv)
    if not args.table_only:
        prepared = {c.name: prepare(c, args.workdir)[2] for c in selected}
        runs = plan(selected, minutes, args.only, cpu, read_json(args.results / REFERENCE_FILE), prepared,
                    args.rerun_reference, tuple(args.shape or SHAPES))
        execute(runs, cpu, python, args.workdir, args.results)
    write_docs(python, cpu, args.results, args.docs, corpora)


def execute(runs: list[Run], cpu: str, python: Path, workdir: Path, results: Path) -> None:
    began = time.monotonic()
    for index, run in enumerate(runs):
        # Budget plus ~15% for the reference's evaluation or verne's, per run still to do.
        eta = sum(r.minutes * 60 * 1.15 + 20 for r in runs[index:])
        print(f"[budget] run {index + 1}/{len(runs)}: {run.label}; {clock(time.monotonic() - began)} "
              f"elapsed, about {clock(eta)} to go", flush=True)
        base = workdir / run.corpus.name
        if run.kind == "reference":
            log = base / "logs" / f"reference-{run.shape}-{budget_flag(run.minutes)}.jsonl"
            result = run_reference(python, base / "tokens", run.shape, run.minutes, run.label, log)
            store(results / REFERENCE_FILE, cpu, run.corpus.name, run.minutes, result, run.shape)
            print(f"[budget] {run.label}: {result['iters']:,} iterations, training ended at "
                  f"{result['train_seconds']:.0f} s, validation {result['valid_loss']:.4f}", flush=True)
            if abs(result["train_seconds"] / (run.minutes * 60) - 1) > OVER_BUDGET - 1:
                print(f"[budget] warning: the reference's training missed its {run.minutes * 60:.0f} s by "
                      "more than 5% (its step time changed after calibration: another process?); "
                      "consider --rerun_reference on a quiet machine", flush=True)
        else:
            job_dir = base / "jobs" / f"verne-{budget_flag(run.minutes)}-{datetime.now():%Y%m%d-%H%M%S}"
            result = run_verne(base / "data", job_dir, run.minutes, run.label)
            store(results / VERNE_FILE, cpu, run.corpus.name, run.minutes, result)
            print(f"[budget] {run.label}: {result['model']}, {result['steps']:,} steps in "
                  f"{result['wall_seconds']:.0f} s, validation {result['valid_loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()
