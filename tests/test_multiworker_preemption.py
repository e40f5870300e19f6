"""Preemption under MultiWorkerMirroredStrategy: a Spot VM's SIGTERM reaches one worker only.

Two `python -m trainer.task` workers on localhost; SIGTERM goes to the chief alone, then (a
fresh job) to the other worker alone. Both must stop after the same step, save one consistent
checkpoint and exit 143; rerunning both resumes there, and the final weights equal those of one
uninterrupted process with the same global batch (tests/test_multiworker.py shows the two agree).

No timing, as in tests/test_preemption.py: the signalled worker logs one line per step into a
pipe shrunk to one page and the test stops reading it at step 5; the workers run in lockstep, so
both block within a few dozen steps, long before the end, and the signal lands mid-run.
"""

from __future__ import annotations

import fcntl
import json
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_multiworker import MODEL, _env, _finish, _train, _weights, free_port

pytestmark = pytest.mark.slow

MAX_STEPS = 120
ARGS = [arg for arg in MODEL if not arg.startswith(("--max_steps", "--log_every", "--save_checkpoints"))]
ARGS += [f"--max_steps={MAX_STEPS}", "--log_every=1", "--save_checkpoints_steps=50"]
STOPPED = re.compile(r"SIGTERM: saving a checkpoint at step (\d+)")
RESUMED = re.compile(r"Resuming .* step (\d+), epoch")
# Without agreement the unsignalled worker would wait in a collective forever: fail, don't hang.
TIMEOUT = 300


def _workers(args: list[str]) -> list[subprocess.Popen[str]]:
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"localhost:{port}" for port in ports]}  # worker 0 is the chief
    return [_train(args, _env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                                                   "index": i}})))
            for i in range(2)]


def _preempt(workers: list[subprocess.Popen[str]], target: int, step: int) -> list[str]:
    """Signals worker `target` once it has logged `step`; returns both workers' output."""
    process = workers[target]
    fcntl.fcntl(process.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            break
    else:
        pytest.fail(f"worker {target} ended before step {step}:\n" + "".join(seen)[-3000:])
    process.send_signal(signal.SIGTERM)
    # The other worker's pipe is the default 64 KiB, more than its whole log: it never blocks.
    try:
        signalled = "".join(seen) + process.communicate(timeout=TIMEOUT)[0]
        other = workers[1 - target].communicate(timeout=TIMEOUT)[0]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    return [signalled, other] if target == 0 else [other, signalled]


@pytest.mark.parametrize("target", [0, 1], ids=["chief", "non_chief"])
def test_sigterm_on_one_worker_stops_all_at_one_step_and_resumes(target, tmp_path: Path,
                                                                  make_data_dir) -> None:
    # One train shard, which two workers cannot divide: each reads the whole stream and keeps its
    # rows, so the job is the single process's exactly (divided shards: test_multiworker_shards.py).
    data_dir, prefix, _ = make_data_dir(tmp_path, shards=1)
    common = [f"--data_dir={data_dir}", f"--data_prefix={prefix}", *ARGS]
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    single = _train([*common, f"--job-dir={single_dir}"], _env())

    workers = _workers([*common, f"--job-dir={multi_dir}"])
    outputs = _preempt(workers, target, 5)
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 143, output[-3000:]
    stops = [int(STOPPED.search(output).group(1)) for output in outputs]
    assert stops[0] == stops[1] and 5 <= stops[0] < MAX_STEPS, stops
    import tensorflow as tf

    # One consistent checkpoint, the chief's, at the agreed step; no scratch dir left behind.
    assert tf.train.latest_checkpoint(str(multi_dir)).endswith(f"ckpt-{stops[0]}")
    assert not list(multi_dir.glob(".scratch-*"))

    reruns = _workers([*common, f"--job-dir={multi_dir}"])
    rerun_outputs = [_finish(worker) for worker in reruns]
    assert [int(RESUMED.search(output).group(1)) for output in rerun_outputs] == stops
    _finish(single)

    expected, got = _weights(single_dir), _weights(multi_dir)
    assert expected.keys() == got.keys()
    assert any(name.startswith("carry") for name in expected)
    assert got["step/.ATTRIBUTES/VARIABLE_VALUE"] == MAX_STEPS
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
