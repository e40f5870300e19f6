"""Every entry point against the mistakes and accidents users meet: each ends in one line naming the
file or flag and what to do (or, for a damaged checkpoint, goes on from the one before with a
warning), never in a traceback, and leaves nothing half-written.

The cases here are the table in docs/errors.md: a test checks that the page is this table, so the
page says only what these runs show. After changing a case, `python tests/test_errors.py` rewrites it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "errors.md"
TABLE_START, TABLE_END = "<!-- table: tests/test_errors.py -->", "<!-- end of table -->"
MODEL = ("--layers", "1", "--lstm_state_size", "16", "--embedding_size", "8", "--batch_size", "4",
         "--unroll_steps", "16")
# TensorFlow's C++ start-up lines on stderr, which are not verne's to shorten.
NOISE = re.compile(r"^([EWIF]\d{4} |WARNING: All log messages)")


@dataclasses.dataclass(frozen=True)
class Case:
    entry: str          # the module run as `python -m ENTRY`
    bad_input: str      # what is wrong (docs/errors.md)
    outcome: str        # what verne does about it (docs/errors.md)
    argv: tuple[str, ...]  # {tmp}, {data}, {job}, {books} are filled in
    expect: str         # in the last line of stderr (the error), or anywhere in the output (code 0)
    code: int = 1
    prepare: Callable[[Path], None] | None = None
    mount: str = ""     # "ro": {tmp}/mnt read-only (after `prepare`); "full": a 64 KiB file system there
    native_build: bool = False  # builds the native kernels into {tmp}/cache (skipped where none build)
    env: tuple[tuple[str, str], ...] = ()  # more environment; values filled in as argv
    absent: str = ""    # nowhere in the output

    @property
    def id(self) -> str:
        return f"{self.entry.split('.')[-1]}: {self.bad_input}"


def _cut(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[:int(path.stat().st_size * keep)])


def _damage_shard(tmp: Path) -> None:
    shutil.copytree(tmp / "data", tmp / "damaged")
    _cut(sorted((tmp / "damaged").glob("tiny.train-*"))[0])


def _big_book(tmp: Path) -> None:
    """Text that compresses badly: its shards outgrow the 64 KiB file system of mount="full"."""
    import random

    words = ["".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=6)) for i in range(5000)]
    (tmp / "big").mkdir()
    (tmp / "big" / "a.txt").write_text(" ".join(random.Random(0).choices(words, k=60000)))


def _other_vocabulary(tmp: Path) -> None:
    from conftest import write_data_dir

    write_data_dir(tmp / "other", "abc cab bca\n" * 300)


def _damage_newest_checkpoint(part: str) -> Callable[[Path], None]:
    return lambda tmp: _cut(next((tmp / "job").glob(f"ckpt-20.{part}*")), 0.3)


def _damage_every_checkpoint(tmp: Path) -> None:
    for data in (tmp / "job").glob("ckpt-*.data-*"):
        _cut(data, 0.3)


def _job_in_mount(tmp: Path) -> None:
    shutil.copytree(tmp / "job", tmp / "mnt" / "job")


def _shard_vanishes_after_first_checkpoint(tmp: Path) -> None:
    """Deletes a train shard once the run in {tmp}/j has saved (so while it trains)."""
    import threading
    import time

    def vanish() -> None:
        deadline = time.monotonic() + 300
        while not list((tmp / "j").glob("ckpt-*.index")) and time.monotonic() < deadline:
            time.sleep(0.02)
        (tmp / "data" / "tiny.train-00000-of-00002.tfrecord.gz").unlink()

    threading.Thread(target=vanish, daemon=True).start()


TRANSFORMER_STEP = ("--data_prefix", "tiny", "--cell", "transformer", "--layers", "1", "--d_model", "16",
                    "--heads", "2", "--embedding_size", "16", "--max_context", "16", "--unroll_steps", "16",
                    "--batch_size", "4", "--xla", "step", "--max_steps", "3", "--eval_every", "0",
                    "--sample_every", "0")
# Children of this test process would inherit its TF_XLA_FLAGS, cache directory included.
OWN_XLA_CACHE = (("VERNE_CACHE_DIR", "{tmp}/cache"), ("TF_XLA_FLAGS", ""))


def _damaged_xla_cache(tmp: Path) -> None:
    """A first run fills {tmp}/cache with its compiled step; then every entry is cut short."""
    env = {**os.environ, "VERNE_CACHE_DIR": str(tmp / "cache"), "TF_XLA_FLAGS": ""}
    subprocess.run([sys.executable, "-m", "trainer.task", "--data_dir", str(tmp / "data"), "--job-dir",
                    str(tmp / "first"), *TRANSFORMER_STEP], env=env, check=True, capture_output=True,
                   timeout=300)
    entries = list((tmp / "cache" / "xla").rglob("*.pb"))
    assert entries, "the first run cached no compiled step"
    for entry in entries:
        _cut(entry)


def _stand_in_compiler(body: str) -> Callable[[Path], None]:
    """Writes {tmp}/cxx: answers --version and option probes (-E), then runs `body`."""
    def write(tmp: Path) -> None:
        from trainer.kernels import native

        script = tmp / "cxx"
        script.write_text(f"#!{sys.executable}\nimport os, signal, sys\nargs = sys.argv[1:]\n"
                          f"REAL = {shutil.which(native._compiler())!r}\n{body}")
        script.chmod(0o755)
    return write


# GCC 11 (Ubuntu 22.04's default) does not know -mno-avx512fp16; otherwise the real compiler runs.
_GCC11 = ("if '-mno-avx512fp16' in args:\n"
          "    sys.exit(\"g++: error: unrecognized command-line option '-mno-avx512fp16'\")\n"
          "os.execv(REAL, [REAL, *args])\n")
# The OOM killer takes the compiler (the probe of its options still answers).
_OOM_KILLED = ("if '--version' in args or '-E' in args:\n    sys.exit(0)\n"
               "os.kill(os.getpid(), signal.SIGKILL)\n")


PRE, TASK, EVAL, BABBLE = "preprocessing.run", "trainer.task", "trainer.evaluate", "trainer.babble"
PREPROCESS = ("--data_prefix", "t", "--tokenizer", "char")
TRAIN = ("--data_prefix", "tiny", *MODEL, "--max_steps", "30", "--eval_every", "0", "--sample_every", "0")
CASES = [
    Case(PRE, "`--input` matches no file", "error naming the pattern; exit 2",
         ("--input", "{tmp}/none/*.txt", "--output_dir", "{tmp}/out", *PREPROCESS), "matches no files", 2),
    Case(PRE, "`--input` is a directory", "error: give the files, e.g. `DIR/*.txt`; exit 2",
         ("--input", "{books}", "--output_dir", "{tmp}/out", *PREPROCESS), "give the files", 2),
    Case(PRE, "`--output_dir` cannot be made (a file is in the way)",
         "error naming `--output_dir` and the reason, before any input is read; exit 2",
         ("--input", "{books}/*.txt", "--output_dir", "{books}/a.txt/out", *PREPROCESS),
         "--output_dir {books}/a.txt/out: cannot write there", 2),
    Case(PRE, "`--output_dir` on a read-only file system", "error naming `--output_dir`; exit 2",
         ("--input", "{books}/*.txt", "--output_dir", "{tmp}/mnt/out", *PREPROCESS),
         "Read-only file system", 2, mount="ro"),
    Case(PRE, "`--output_dir` fills up while writing",
         "error naming `--output_dir`; the work dir is removed, no metadata is written; exit 2",
         ("--input", "{tmp}/big/*.txt", "--output_dir", "{tmp}/mnt/out", *PREPROCESS),
         "No space left on device", 2, prepare=_big_book, mount="full"),
    Case(PRE, "`--vocab_from` names no preprocessed data", "error naming `--vocab_from`; exit 2",
         ("--input", "{books}/*.txt", "--output_dir", "{tmp}/out", "--data_prefix", "t",
          "--vocab_from", "{tmp}/none/t"), "--vocab_from {tmp}/none/t: no", 2),
    Case(TASK, "`--data_dir` holds no preprocessed data", "error: run preprocessing.run first",
         ("--data_dir", "{tmp}/none", "--job-dir", "{tmp}/j", *TRAIN), "run preprocessing.run first"),
    Case(TASK, "a shard is damaged (cut short)",
         "error naming the shard: run preprocessing.run again; checkpoints untouched",
         ("--data_dir", "{tmp}/damaged", "--job-dir", "{tmp}/j", *TRAIN),
         "tiny.train-00000-of-00002.tfrecord.gz: damaged (truncated record", prepare=_damage_shard),
    Case(TASK, "`--job-dir` cannot be made (a file is in the way)", "error naming `--job-dir`",
         ("--data_dir", "{data}", "--job-dir", "{books}/a.txt/job", *TRAIN), "cannot write there"),
    Case(TASK, "`--job-dir` on a read-only file system", "error naming `--job-dir`; nothing written",
         ("--data_dir", "{data}", "--job-dir", "{tmp}/mnt/job", *TRAIN), "Read-only file system",
         prepare=_job_in_mount, mount="ro"),
    Case(TASK, "`--job-dir` fills up while saving a checkpoint",
         "error naming `--job-dir`: free space and run again to resume; no partial checkpoint left",
         ("--data_dir", "{data}", "--job-dir", "{tmp}/mnt/job", *TRAIN, "--save_checkpoints_steps", "10"),
         "No space left on device", mount="full"),
    Case(TASK, "`--job-dir` trained on another vocabulary",
         "error: use another `--job-dir` or that job's data",
         ("--data_dir", "{tmp}/other", "--job-dir", "{job}", *TRAIN), "use another --job-dir",
         prepare=_other_vocabulary),
    Case(TASK, "the newest checkpoint is damaged (`.index` cut short)",
         "warning naming it; resumes from the one before and trains on", ("--data_dir", "{data}",
                                                                          "--job-dir", "{job}", *TRAIN),
         "ckpt-20 is damaged", 0, prepare=_damage_newest_checkpoint("index")),
    Case(TASK, "a shard is deleted while training runs",
         "error `missing:` naming the shard: put it back or rerun preprocessing.run, then rerun to resume",
         ("--data_dir", "{data}", "--job-dir", "{tmp}/j", *TRAIN, "--max_steps", "5000",
          "--save_checkpoints_steps", "10"),
         "missing: {data}/tiny.train-00000-of-00002.tfrecord.gz (deleted or moved while training ran)",
         prepare=_shard_vanishes_after_first_checkpoint),
    Case(TASK, "Ctrl-C while the native kernels build (first run)",
         "`interrupted`, exit 130; no library or temporary left in the cache; the next run builds again",
         ("--data_dir", "{data}", "--job-dir", "{tmp}/j", *TRAIN), "interrupted", 130, native_build=True),
    Case(TASK, "the OOM killer kills the compiler of the native kernels",
         "one line saying so; trains with TensorFlow's kernels; no `.failed` marker: next run builds again",
         ("--data_dir", "{data}", "--job-dir", "{tmp}/j", *TRAIN),
         "the compiler was killed by SIGKILL (out of memory?)", 0, prepare=_stand_in_compiler(_OOM_KILLED),
         native_build=True, env=(("CXX", "{tmp}/cxx"),), absent="delete"),
    Case(TASK, "the C++ compiler does not know `-mno-avx512fp16` (GCC 11)",
         "builds the native kernels for this exact CPU (without the flag) and trains with them",
         ("--data_dir", "{data}", "--job-dir", "{tmp}/j", *TRAIN), "building the native CPU kernels", 0,
         prepare=_stand_in_compiler(_GCC11), native_build=True, env=(("CXX", "{tmp}/cxx"),),
         absent="as the build for this CPU failed"),
    Case(TASK, "an entry of XLA's compile cache is damaged (cut short)",
         "error naming the cache directory: delete it and run again, or `VERNE_XLA_CACHE=0`",
         ("--data_dir", "{data}", "--job-dir", "{tmp}/j", *TRANSFORMER_STEP),
         "XLA's compile cache {tmp}/cache/xla/", prepare=_damaged_xla_cache, env=OWN_XLA_CACHE),
    Case(EVAL, "`--job-dir` holds no trained job",
         "error: point `--job-dir` at a directory trainer.task wrote",
         ("--job-dir", "{tmp}/none"), "point --job-dir at a directory trainer.task wrote"),
    Case(EVAL, "the newest checkpoint is damaged (`.data` cut short)",
         "warning naming it; evaluates the one before", ("--job-dir", "{job}"), "ckpt-20 is damaged", 0,
         prepare=_damage_newest_checkpoint("data")),
    Case(EVAL, "`--data_dir` of another vocabulary", "error: point `--data_dir` at the job's data",
         ("--job-dir", "{job}", "--data_dir", "{tmp}/other"), "its vocabulary differs",
         prepare=_other_vocabulary),
    Case(EVAL, "job dir on a read-only file system", "error naming `--job-dir` (it writes eval-SPLIT.json)",
         ("--job-dir", "{tmp}/mnt/job"), "Read-only file system", prepare=_job_in_mount, mount="ro"),
    Case(BABBLE, "every checkpoint is damaged", "error naming them: restore the job dir or start over",
         ("--job-dir", "{job}", "--length", "5"), "every checkpoint is damaged",
         prepare=_damage_every_checkpoint),
    Case(BABBLE, "job dir on a read-only file system", "writes text as usual (babble writes nothing)",
         ("--job-dir", "{tmp}/mnt/job", "--length", "5"), "", 0, prepare=_job_in_mount, mount="ro"),
    Case("trainer.export", "`--export_dir` cannot be made", "error naming `--export_dir`; no partial export",
         ("--job-dir", "{job}", "--export_dir", "{books}/a.txt/export"), "--export_dir={books}/a.txt/export"),
    Case("trainer.serve", "`--job-dir` holds no trained job", "error naming `--job-dir`",
         ("--job-dir", "{tmp}/none"), "point --job-dir at a directory trainer.task wrote"),
    Case("trainer.submit", "`--config` file missing", "error naming `--config`",
         ("--check_config", "--config", "{tmp}/none.yaml"), "--config={tmp}/none.yaml: no such file"),
    Case("trainer.submit", "`--staging_bucket` not on Cloud Storage", "error: must be a gs:// path",
         ("--project", "p", "--region", "us-central1", "--staging_bucket", "{tmp}", "--dry_run", "--",
          "--data_dir", "gs://b/d", "--data_prefix", "t", "--job-dir", "gs://b/j"), "must be a gs:// path"),
    Case("pipelines.run", "`--compile` into a missing directory", "error naming `--compile`",
         ("--compile", "{tmp}/none/pipeline.yaml", "--image", "verne:latest"), "--compile: directory"),
    Case("pipelines.run", "`--local --pipeline_root` cannot be made", "error naming `--pipeline_root`",
         ("--local", "--corpus", "{books}/*.txt", "--data_prefix", "t",
          "--pipeline_root", "{books}/a.txt/root", "--max_steps", "2"),
         "--pipeline_root={books}/a.txt/root: cannot write there"),
    Case("pipelines.run", "`--local --corpus` matches no file", "error naming `--corpus`",
         ("--local", "--corpus", "{tmp}/none/*.txt", "--data_prefix", "t", "--max_steps", "2"),
         "--corpus: no file matches"),
]


def render_table(cases: list[Case]) -> str:
    rows = [f"| `{c.entry}` | {c.bad_input} | {c.outcome} |" for c in cases]
    return "\n".join(["| entry point | bad input | what verne does |", "|---|---|---|", *rows])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Books, a data dir and a job dir with checkpoints at steps 10 and 20."""
    from conftest import SHAKESPEARE_LIKE, write_data_dir

    from trainer import runner
    from trainer.hparams import HParams

    root = tmp_path_factory.mktemp("errors")
    (root / "books").mkdir()
    (root / "books" / "a.txt").write_text(SHAKESPEARE_LIKE * 20)
    write_data_dir(root / "data", SHAKESPEARE_LIKE * 20)
    runner.train(HParams(data_dir=str(root / "data"), data_prefix="tiny", job_dir=str(root / "job"),
                         layers=1, lstm_state_size=16, embedding_size=8, batch_size=4, unroll_steps=16,
                         max_steps=20, save_checkpoints_steps=10, eval_every=0, sample_every=0))
    return root


def _mount(kind: str, where: Path) -> None:
    command = (["mount", "-o", "bind,ro", str(where), str(where)] if kind == "ro"
               else ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)])
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            command, capture_output=True, check=False).returncode != 0:
        pytest.skip(f"needs root and mount to make a {'read-only' if kind == 'ro' else 'full'} file system")


def _run(case: Case, argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    command = [sys.executable, "-m", case.entry, *argv]
    if case.code != 130:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
        return result.returncode, result.stdout, result.stderr
    # Ctrl-C as a terminal sends it: SIGINT to the whole process group, compiler included. The
    # child starts with SIGINT at its default, as a terminal's foreground job does: started from
    # a background job (`make test &`) it would inherit SIGINT ignored, and rightly ignore it.
    restore_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.executable, sys.argv[1:])")
    process = subprocess.Popen([sys.executable, "-c", restore_sigint, *command], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "building the native CPU kernels" in line:
            os.killpg(process.pid, signal.SIGINT)
    output = "".join(lines)
    return process.wait(timeout=120), output, output


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_ends_in_one_line(case: Case, trained: Path, tmp_path: Path) -> None:
    shutil.copytree(trained / "job", tmp_path / "job")
    shutil.copytree(trained / "data", tmp_path / "data")
    names = {"tmp": str(tmp_path), "data": str(tmp_path / "data"), "job": str(tmp_path / "job"),
             "books": str(trained / "books")}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    if case.native_build:
        from trainer.kernels import native

        if shutil.which(native._compiler()) is None or os.environ.get(native.ENV_SWITCH) == "0":
            pytest.skip("no native kernels to build here")
        env["VERNE_CACHE_DIR"] = str(tmp_path / "cache")
    env.update((name, value.format(**names)) for name, value in case.env)
    (tmp_path / "mnt").mkdir()
    if case.prepare:
        case.prepare(tmp_path)
    if case.mount:
        _mount(case.mount, tmp_path / "mnt")
    try:
        code, stdout, stderr = _run(case, [arg.format(**names) for arg in case.argv], env)
    finally:
        if case.mount:
            subprocess.run(["umount", str(tmp_path / "mnt")], check=False)
    said = [line for line in stderr.splitlines() if line.strip() and not NOISE.match(line)]
    assert "Traceback" not in stderr + stdout, stderr
    assert code == case.code, f"exit {code}:\n" + "\n".join(said[-8:])
    assert not case.absent or case.absent not in stdout + stderr, said[-3:]
    if code == 0:
        assert case.expect.format(**names) in stdout + stderr, said[-3:]
    else:
        assert said and case.expect.format(**names) in said[-1], said[-3:]
        assert said[-1].startswith(("error:", f"{case.entry}: error:", "interrupted")), said[-1]
    leftovers = [str(p) for p in tmp_path.rglob("*") if re.search(r"\.tmp-|_temp$|tmp[a-z0-9_]{8}$", p.name)]
    assert not leftovers, leftovers
    if case.code == 130:
        assert not list((tmp_path / "cache").rglob("*.so")), "a library from an interrupted build"


def test_docs_errors_md_is_this_table() -> None:
    text = DOC.read_text()
    table = text.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert table == render_table(CASES), "docs/errors.md is out of date: run python tests/test_errors.py"


if __name__ == "__main__":
    page = DOC.read_text()
    head, rest = page.split(TABLE_START)
    DOC.write_text(f"{head}{TABLE_START}\n{render_table(CASES)}\n{TABLE_END}{rest.split(TABLE_END)[1]}")
    print(f"wrote {DOC}")
