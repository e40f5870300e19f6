"""The whole chain on gs:// against the local emulator, each step the real entry point run as
`python -m ...` the way a user (or Vertex AI / Dataflow) runs it:

preprocessing.run → trainer.task (killed mid-run) → trainer.task again (resumes from gs://) →
trainer.evaluate → trainer.babble, all reading and writing one emulated bucket.

The steps share one module-scoped bucket and run in order; a step whose entry point is missing
is skipped naming the module, and the steps after it skip too (they need its output).
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from gcs.server import GcsServer

from preprocessing import contract
from trainer import hparams
from trainer.hparams import HParams

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "books"
# Tiny but real: the same flags on every trainer command, as in the Makefile's demo.
MODEL = ["--layers", "1", "--lstm_state_size", "16", "--embedding_size", "8", "--batch_size", "4",
         "--unroll_steps", "16", "--seed", "3"]
# A guard against a hung subprocess, not a speed check.
TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")


def _run(gcs: GcsServer, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    _require(module)
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=_env(gcs),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, \
        f"{module} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    # os.makedirs("gs://b/x") and friends would have made a local directory named "gs:".
    assert not (ROOT / "gs:").exists(), f"{module} wrote a gs:// path to the local disk"
    return done


def _env(gcs: GcsServer) -> dict[str, str]:
    env = gcs.subprocess_env()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _books(count: int = 4, words: int = 1500) -> dict[str, str]:
    """Made-up text (no third-party books in tests): sentences over a small vocabulary."""
    rng = random.Random(5)
    vocab = ("the sea ship captain island night storm light deep long voyage map "
             "crew engine silent stars river cold machine").split()
    books = {}
    for number in range(count):
        sentences = []
        for _ in range(words // 10):
            sentence = " ".join(rng.choice(vocab) for _ in range(10))
            sentences.append(sentence.capitalize() + ".")
        books[f"book{number}.txt"] = "\n".join(sentences) + "\n"
    return books


class Chain:
    """What the steps pass on to each other."""

    def __init__(self, gcs: GcsServer, bucket: str) -> None:
        self.gcs = gcs
        self.bucket = bucket
        self.data_dir = f"{bucket}/data"
        self.job_pattern = f"{bucket}/job/%JOB%"
        self.summary_pattern = f"{bucket}/tb/%JOB%"
        self.job_dir = ""  # the resolved %JOB%, known once training has run
        self.final_step = 0
        self.done: set[str] = set()

        self.client = gcs.storage_client()

    def objects(self, prefix: str) -> list[str]:
        blobs = self.client.list_blobs(self.bucket.removeprefix("gs://"), prefix=prefix)
        return sorted(b.name for b in blobs)

    def read(self, name: str) -> str:
        return self.client.bucket(self.bucket.removeprefix("gs://")).blob(name).download_as_text()

    def after(self, step: str) -> None:
        if step not in self.done:
            pytest.skip(f"needs the {step} step, which did not pass")

    def train_args(self, *extra: str) -> list[str]:
        return ["--data_dir", self.data_dir, "--data_prefix", PREFIX, "--job-dir", self.job_pattern,
                "--summary_dir", self.summary_pattern, *MODEL, "--eval_every", "0",
                "--sample_every", "0", "--log_every", "1", *extra]


@pytest.fixture(scope="module")
def chain(gcs_server: GcsServer) -> Chain:
    bucket = gcs_server.create_bucket(f"verne-chain-{os.getpid()}")
    client_bucket = gcs_server.storage_client().bucket(bucket.removeprefix("gs://"))
    for name, text in _books().items():
        client_bucket.blob(f"books/{name}").upload_from_string(text)
    return Chain(gcs_server, bucket)


def test_1_preprocess_to_gcs(chain: Chain, gcs_in_process: GcsServer) -> None:
    _run(chain.gcs, "preprocessing.run", "--input", f"{chain.bucket}/books/*.txt", "--output_dir",
         chain.data_dir, "--data_prefix", PREFIX, "--tokenizer", "char", "--record_tokens", "200",
         "--valid_fraction", "0.1", "--test_fraction", "0.1")
    names = chain.objects("data/")
    # Everything in place, nothing of the job's temporary directory left behind.
    assert all(n.count("/") == 1 for n in names), names
    metadata = contract.metadata_from_json(chain.read(f"data/{PREFIX}.metadata.json"), "metadata on gs://")
    assert f"data/{PREFIX}.vocab.txt" in names
    text = "".join(_books().values())
    assert metadata.tokenizer == "char" and set(metadata.vocab) >= set(text)

    # The shards decode, through TF's own gs:// filesystem, to what the metadata promises.
    import tensorflow as tf

    for split in contract.SPLITS:
        shards = tf.io.gfile.glob(contract.shard_glob(chain.data_dir, PREFIX, split))
        assert len(shards) == metadata.splits[split].shards > 0
        records = tf.data.TFRecordDataset(shards, compression_type="GZIP").map(contract.parse_example)
        tokens = sum(int(tf.size(r)) for r in records)
        assert tokens == metadata.splits[split].tokens > 0
    chain.done.add("preprocess")


def _latest_checkpoint_step(chain: Chain, job: str) -> int | None:
    """The step of the checkpoint TF would restore, read from the bucket's `checkpoint` file."""
    if f"{job}/checkpoint" not in chain.objects(f"{job}/checkpoint"):
        return None
    match = re.search(r'^model_checkpoint_path: ".*?ckpt-(\d+)"', chain.read(f"{job}/checkpoint"), re.M)
    return int(match.group(1)) if match else None


def test_2_train_is_killed_then_resumes_from_gcs(chain: Chain) -> None:
    chain.after("preprocess")
    _require("trainer.task")
    # A long run, killed (SIGKILL: no chance to save) once a periodic checkpoint is in the bucket.
    command = [sys.executable, "-m", "trainer.task", *chain.train_args("--max_steps", "100000",
                                                                      "--save_checkpoints_steps", "3")]
    job = "job/" + hparams.job_name(HParams(data_prefix=PREFIX, language_model="char", layers=1,
                                            lstm_state_size=16, embedding_size=8))
    process = subprocess.Popen(command, cwd=ROOT, env=_env(chain.gcs), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    # If the trainer hangs silently, this unblocks the read loop below (and the test fails).
    watchdog = threading.Timer(TIMEOUT_S, process.kill)
    watchdog.start()
    output: list[str] = []
    try:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            # Progress lines arrive every step (--log_every 1): a cheap moment to look.
            if (_latest_checkpoint_step(chain, job) or 0) >= 3:
                break
        else:
            pytest.fail("trainer.task ended before writing a checkpoint:\n" + "".join(output[-40:]))
    finally:
        watchdog.cancel()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT_S)
        if process.stdout is not None:
            process.stdout.close()
    assert any("from scratch" in line for line in output), "".join(output[-40:])
    killed_at = _latest_checkpoint_step(chain, job)
    assert killed_at is not None and killed_at % 3 == 0

    # The same command with a nearer goal resumes from the bucket's checkpoint and finishes.
    done = _run(chain.gcs, "trainer.task", *chain.train_args("--max_steps", str(killed_at + 2),
                                                            "--save_checkpoints_steps", "3"))
    resumed = rf"Resuming gs://\S+ from \S+ckpt-{killed_at}: step {killed_at},"
    assert re.search(resumed, done.stdout), done.stdout
    assert re.search(rf"^finished: step {killed_at + 2},", done.stdout, re.M), done.stdout
    assert _latest_checkpoint_step(chain, job) == killed_at + 2
    names = chain.objects(job + "/")
    assert f"{job}/hparams.json" in names and f"{job}/export/saved_model.pb" in names, names
    assert any(n.startswith("tb/") for n in chain.objects("tb/")), "no TensorBoard events in the bucket"
    chain.job_dir, chain.final_step = f"{chain.bucket}/{job}", killed_at + 2
    chain.done.add("train")


def test_3_evaluate_reads_the_gcs_job_dir(chain: Chain) -> None:
    chain.after("train")
    done = _run(chain.gcs, "trainer.evaluate", "--data_dir", chain.data_dir, "--data_prefix", PREFIX,
                "--job-dir", chain.job_pattern, *MODEL, "--split", "test", "--eval_steps", "2")
    # e.g. "test: loss 3.4826 nats/token, ... over 128 tokens (gs://…/ckpt-5)"
    found = re.search(r"^test: loss (\d+\.\d+) nats/token.*\((gs://\S+)\)$", done.stdout, re.M)
    assert found, done.stdout
    assert 0 < float(found.group(1)) < 10 and found.group(2) == f"{chain.job_dir}/ckpt-{chain.final_step}"


def test_4_babble_reads_the_gcs_job_dir(chain: Chain) -> None:
    chain.after("train")
    done = _run(chain.gcs, "trainer.babble", "--data_dir", chain.data_dir, "--data_prefix", PREFIX,
                "--job-dir", chain.job_pattern, *MODEL, "--prime", "The sea", "--length", "40",
                "--temperature", "0.8", "--seed", "7")
    text = done.stdout
    assert text.startswith("The sea") and len(text) >= len("The sea") + 40, text
    assert set(text) <= set("".join(_books().values())) | {"\n"}, text
