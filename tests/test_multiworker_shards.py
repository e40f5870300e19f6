"""Each worker of a multi-worker job reads only its own train shards, and resumes exactly.

R `python -m trainer.task` workers on localhost (MultiWorkerMirroredStrategy, TF_CONFIG) train on
8 train shards. Each worker gets a data dir of its own in which every shard that is not its own
(trainer.data.assign_shards) is replaced by bytes no reader can parse: a worker that read any
of them would fail. Its own shards add up to at most 1/R of the split plus one shard. The job
runs past an epoch's end; a second job is killed (SIGKILL, no checkpoint on the way out) part
way and rerun with the same worker count, and must end with the same weights and loss.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import SHAKESPEARE_LIKE
from test_multiworker import MODEL, _env, _finish, _train, _weights, free_port

from trainer import data

pytestmark = pytest.mark.slow

# An epoch is 24 (2 workers) or 23 (4) windows here: the run crosses two epoch boundaries. A
# one-page pipe holds ~54 of the chief's log lines, so a job whose chief stops being read at step
# KILL_AT blocks before its end.
MAX_STEPS, KILL_AT = 64, 6
ARGS = [arg for arg in MODEL if not arg.startswith(("--max_steps", "--log_every", "--save_checkpoints"))]
ARGS += [f"--max_steps={MAX_STEPS}", "--log_every=1", "--save_checkpoints_steps=3"]
RESUMED = re.compile(r"Resuming .* step (\d+), epoch")
LAST_LOSS = re.compile(rf"step {MAX_STEPS}/{MAX_STEPS} epoch \d+ loss (\d+\.\d+)")


def _worker_dirs(tmp_path: Path, data_dir: str, prefix: str, readers: int) -> list[Path]:
    """A copy of the data dir per worker, holding real bytes only in that worker's shards."""
    from preprocessing import contract

    metadata = data.read_metadata(data_dir, prefix)
    files = data.shard_files(data_dir, prefix, "train")
    own = data.assign_shards(metadata.splits["train"].shard_tokens, readers)
    sizes = [Path(f).stat().st_size for f in files]
    dirs = []
    for worker in range(readers):
        # Bytes per worker: at most 1/R of the split and one shard.
        assert sum(sizes[i] for i in own[worker]) <= sum(sizes) / readers + max(sizes)
        copy = tmp_path / f"data-{worker}"
        shutil.copytree(data_dir, copy)
        for i, name in enumerate(files):
            if i not in own[worker]:
                (copy / Path(name).name).write_bytes(b"another worker's shard: not gzip, not TFRecord")
        assert len(list(copy.glob(f"{prefix}.train-*{contract.SHARD_SUFFIX}"))) == len(files)
        dirs.append(copy)
    return dirs


def _workers(args: list[str], dirs: list[Path], prefix: str) -> list[subprocess.Popen[str]]:
    cluster = {"worker": [f"localhost:{free_port()}" for _ in dirs]}  # worker 0 is the chief
    return [_train([*args, f"--data_dir={directory}", f"--data_prefix={prefix}"],
                   _env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})))
            for i, directory in enumerate(dirs)]


def _kill_after(workers: list[subprocess.Popen[str]], step: int) -> None:
    """SIGKILLs every worker once the chief has logged `step`. The chief's pipe is shrunk to one
    page and no longer read, so it blocks (and the others with it) long before the end."""
    chief = workers[0]
    fcntl.fcntl(chief.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    seen = []
    for line in chief.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            break
    else:
        pytest.fail(f"the chief ended before step {step}:\n" + "".join(seen)[-3000:])
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    for worker in workers:
        worker.communicate(timeout=60)


@pytest.mark.parametrize("readers", [2, 4])
def test_workers_read_only_their_own_shards_and_resume_exactly(readers: int, tmp_path: Path,
                                                               make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path, SHAKESPEARE_LIKE * 4, shards=8, record_tokens=32)
    dirs = _worker_dirs(tmp_path, data_dir, prefix, readers)
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"

    straight = [_finish(w) for w in _workers([*ARGS, f"--job-dir={straight_dir}"], dirs, prefix)]
    division = f"{readers} workers each read their own {8 // readers}-{8 // readers} of the 8 train shards"
    assert division in straight[0], straight[0][-3000:]
    assert "epoch 2 loss" in straight[0]  # past two epoch ends: each worker's shards reshuffled

    _kill_after(_workers([*ARGS, f"--job-dir={killed_dir}"], dirs, prefix), step=KILL_AT)
    reruns = [_finish(w) for w in _workers([*ARGS, f"--job-dir={killed_dir}"], dirs, prefix)]
    resumed = [int(RESUMED.search(output).group(1)) for output in reruns]
    assert len(set(resumed)) == 1 and 3 <= resumed[0] < MAX_STEPS, resumed
    assert "fresh state" not in reruns[0]

    assert LAST_LOSS.search(reruns[0]).group(1) == LAST_LOSS.search(straight[0]).group(1)
    expected, got = _weights(straight_dir), _weights(killed_dir)
    assert expected.keys() == got.keys() and any(name.startswith("carry") for name in expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
