"""Real multi-worker training: two `python -m trainer.task` processes on localhost under
MultiWorkerMirroredStrategy (TF_CONFIG, gRPC collectives) against one process with the same
global batch. Same seed, same data, same steps: the weights must agree to float tolerance."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# SGD, not Adam: Adam divides by the root of tiny second moments, so a last-bit difference in
# an all-reduced gradient can flip a whole learning-rate step; SGD shows the real agreement.
MODEL = ["--layers=1", "--lstm_state_size=16", "--embedding_size=8", "--unroll_steps=8",
         "--batch_size=4", "--max_steps=4", "--save_checkpoints_steps=2", "--eval_every=0",
         "--sample_every=0", "--log_every=2", "--optimizer=sgd", "--learning_rate=0.5", "--grad_clip=0.5",
         "--seed=3",
         # Equality across process layouts is a float32 property: bf16 rounding (the auto default
         # on bf16 CPUs) differs with the reduction order and grows over a hundred steps.
         "--precision=float32"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "CLUSTER_SPEC")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", **extra)
    return env


def _train(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen[str]) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def _weights(job_dir: Path) -> dict[str, np.ndarray]:
    """Model weights, optimizer slots, counters and the carried recurrent state (a multi-replica
    run gathers it from its replicas) of the newest checkpoint."""
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(job_dir)))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model", "optimizer", "step", "epoch", "position", "carry"))}


def test_two_workers_train_like_one_process_with_the_same_global_batch(tmp_path: Path, make_data_dir) -> None:
    pytest.importorskip("trainer.runner", reason="trainer/runner.py not written yet")
    # One train shard, which two workers cannot divide: each reads the whole stream and keeps its
    # rows, so the job is the single process's exactly (divided shards: test_multiworker_shards.py).
    data_dir, prefix, _ = make_data_dir(tmp_path, shards=1)
    common = [f"--data_dir={data_dir}", f"--data_prefix={prefix}", *MODEL]
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"

    single = _train([*common, f"--job-dir={single_dir}"], _env())
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    configs = [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]
    workers = [_train([*common, f"--job-dir={multi_dir}"], _env(TF_CONFIG=config)) for config in configs]
    _finish(single)
    outputs = [_finish(worker) for worker in workers]
    assert all("step 4" in output for output in outputs), outputs[0][-2000:]

    expected, got = _weights(single_dir), _weights(multi_dir)
    assert expected.keys() == got.keys()
    assert sum(name.startswith("model") for name in expected) >= 3
    assert got["step/.ATTRIBUTES/VARIABLE_VALUE"] == 4
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
    # Training moved the weights (so the comparison above means something).
    import tensorflow as tf

    first = tf.train.load_checkpoint(str(single_dir / "ckpt-2"))
    assert any(not np.allclose(first.get_tensor(n), expected[n]) for n in expected if n.startswith("model"))

    # One consistent job dir: the chief's checkpoints only, no worker scratch left behind.
    assert tf.train.latest_checkpoint(str(multi_dir)).endswith("ckpt-4")
    assert not list(multi_dir.glob(".scratch-*"))
    events = list((multi_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1  # summaries come from the chief alone
