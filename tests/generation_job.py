"""One tiny trained job dir shared by the generation tests (sampling, babble, export, serve, browser).

Data comes from conftest's `write_data_dir` (real tokenizers, so the vocabulary has `<unk>` as
preprocessing makes it) and the model is trained for a few steps through the real runner, once
per test session and language model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from conftest import SHAKESPEARE_LIKE, write_data_dir

TEXT = SHAKESPEARE_LIKE * 12
MODEL = {"layers": 2, "lstm_state_size": 32, "embedding_size": 16}
_JOBS: dict[tuple[str, str], str] = {}


def trained_job(root: Path, kind: str = "char", steps: int = 30) -> str:
    """The job dir of a tiny model trained `steps` steps on TEXT (cached for the session)."""
    key = (str(root), kind)
    if key not in _JOBS:
        from trainer import runner
        from trainer.hparams import HParams

        data_dir = root / f"data-{kind}"
        write_data_dir(data_dir, TEXT, kind, prefix="tiny")
        hparams = HParams(data_dir=str(data_dir), data_prefix="tiny", job_dir=str(root / "job" / "%JOB%"),
                          batch_size=4, unroll_steps=16, max_steps=steps, eval_every=steps,
                          save_checkpoints_steps=steps, log_every=steps, sample_every=0,
                          sample_length=20, **MODEL)
        _JOBS[key] = runner.train(hparams).job_dir
    return _JOBS[key]


def python_env() -> dict[str, str]:
    """Environment for subprocesses running verne's entry points."""
    import os

    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


class Server:
    """`python -m trainer.serve` on a free port, for as long as the test session needs it."""

    def __init__(self, job_dir: str, *flags: str) -> None:
        import subprocess
        import sys

        self.process = subprocess.Popen(
            [sys.executable, "-m", "trainer.serve", "--job-dir", job_dir, "--port", "0", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=python_env())
        line = self.process.stdout.readline()  # "serving http://127.0.0.1:PORT/ui" once ready
        if not line.startswith("serving "):
            self.process.kill()
            raise RuntimeError(f"trainer.serve did not start (exit {self.process.wait()}): {line!r}")
        self.url = line.split()[1].removesuffix("/ui")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


_SERVERS: dict[str, Server] = {}


def shared_server(job_dir: str) -> Server:
    """One server per job dir for the session (test_serve and test_browser share it)."""
    if job_dir not in _SERVERS or _SERVERS[job_dir].process.poll() is not None:
        _SERVERS[job_dir] = Server(job_dir)
    return _SERVERS[job_dir]


@contextlib.contextmanager
def autograph_conversions() -> Iterator[list[object]]:
    """verne's functions that AutoGraph converts while inside (generation's graphs use
    tf.while_loop and tf.cond themselves, so converting them only costs tracing time: seconds of an
    export). TensorFlow's own wrappers (SavedModel signatures, custom gradients) do not count."""
    from tensorflow.python.autograph.impl import api

    converted, original = [], api.converted_call

    def counting(f: object, *args: object, **kwargs: object) -> object:
        if getattr(f, "__module__", "").split(".")[0] in ("trainer", "preprocessing"):
            converted.append(f)
        return original(f, *args, **kwargs)

    api.converted_call = counting
    try:
        yield converted
    finally:
        api.converted_call = original
