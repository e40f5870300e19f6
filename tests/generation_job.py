"""One tiny trained job dir shared by the generation tests (sampling, babble, export, serve, browser).

Data is written with the real tokenizers (so the vocabulary has `<unk>`, as preprocessing makes
it) and the model is trained for a few steps through the real runner, once per test session.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from preprocessing import contract
from preprocessing.tokenizers import build_vocab, make_tokenizer

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy "
    "to the people.\n\n"
) * 12
MODEL = {"layers": 2, "lstm_state_size": 32, "embedding_size": 16}
_JOBS: dict[tuple[str, str], str] = {}


def write_data(data_dir: Path, kind: str, prefix: str = "tiny", text: str = TEXT) -> contract.Metadata:
    """A data dir following the contract: 80/10/10 splits, one shard each, 200-token records."""
    import tensorflow as tf

    tokenizer = make_tokenizer(kind, build_vocab(kind, Counter(make_tokenizer(kind, _all_vocab(kind, text))
                                                               .pieces(text))))
    ids = tokenizer.encode(text)
    data_dir.mkdir(parents=True, exist_ok=True)
    bounds = [0, len(ids) * 8 // 10, len(ids) * 9 // 10, len(ids)]
    stats = {}
    for index, split in enumerate(contract.SPLITS):
        tokens = ids[bounds[index]:bounds[index + 1]]
        records = [tokens[i:i + 200] for i in range(0, len(tokens), 200)]
        name = f"{contract.shard_prefix(str(data_dir), prefix, split)}-00000-of-00001{contract.SHARD_SUFFIX}"
        with tf.io.TFRecordWriter(name, options="GZIP") as writer:
            for record in records:
                writer.write(contract.serialize_example(record))
        stats[split] = contract.SplitStats(tokens=len(tokens), records=len(records), shards=1)
    metadata = contract.Metadata(tokenizer=kind, vocab=tokenizer.vocab, splits=stats, documents=1)
    Path(contract.metadata_path(str(data_dir), prefix)).write_text(contract.metadata_to_json(metadata))
    Path(contract.vocab_path(str(data_dir), prefix)).write_text(contract.vocab_text(tokenizer.vocab))
    return metadata


def _all_vocab(kind: str, text: str) -> tuple[str, ...]:
    # A throwaway vocabulary just to reach `pieces` (which does not depend on the vocabulary).
    return build_vocab(kind, Counter(list(text) + [contract.UNK, contract.NEWLINE]))


def trained_job(root: Path, kind: str = "char", steps: int = 30) -> str:
    """The job dir of a tiny model trained `steps` steps on TEXT (cached for the session)."""
    key = (str(root), kind)
    if key not in _JOBS:
        from trainer import runner
        from trainer.hparams import HParams

        data_dir = root / f"data-{kind}"
        write_data(data_dir, kind)
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
