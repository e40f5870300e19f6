"""Under MultiWorkerMirroredStrategy the chief chooses the checkpoint every worker restores.

Were each worker to judge the checkpoints itself, a storage fault seen by one of them alone would
make it restore another step than the rest. Here the newest checkpoint of a two-worker job is
damaged: only the chief reads the checkpoints and says so, and both workers resume from the one
before it, at the same step.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_multiworker import MODEL, _finish
from test_multiworker_preemption import _workers

pytestmark = pytest.mark.slow

RESUMED = re.compile(r"Resuming .* from (\S+): step (\d+), epoch")


def test_every_worker_restores_the_step_the_chief_chose(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    job_dir = tmp_path / "multi"
    common = [f"--data_dir={data_dir}", f"--data_prefix={prefix}", f"--job-dir={job_dir}",
              *[arg for arg in MODEL if not arg.startswith("--max_steps")]]
    for output in [_finish(worker) for worker in _workers([*common, "--max_steps=4"])]:
        assert "from scratch" in output, output[-2000:]
    (data,) = job_dir.glob("ckpt-4.data-*")
    data.write_bytes(data.read_bytes()[:40])

    outputs = [_finish(worker) for worker in _workers([*common, "--max_steps=6"])]
    resumed = [RESUMED.search(output).groups() for output in outputs]
    assert resumed == [(str(job_dir / "ckpt-2"), "2")] * 2, resumed
    chief, other = outputs
    assert "ckpt-4 is damaged" in chief and "damaged" not in other, other[-2000:]
    assert all("finished: step 6" in output for output in outputs)
