"""Preemption: `python -m trainer.task` stopped mid-run by SIGTERM (a Spot VM's notice) or
SIGKILL, then rerun with the same command, must end where an uninterrupted run ends; Ctrl-C
(SIGINT) checkpoints and stops like SIGTERM.

No timing: the trainer logs one line per step into a pipe shrunk to one page, and the test stops
reading once it has seen step 12. The trainer then blocks on its own log within a few dozen
steps, long before the end, and the signal lands while it is provably mid-run.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

MAX_STEPS = 120  # more than one epoch of the tiny corpus: the epoch boundary is crossed too
SAVE_EVERY = 10
MODEL = ["--layers=1", "--lstm_state_size=16", "--embedding_size=8", "--unroll_steps=8",
         "--batch_size=4", f"--max_steps={MAX_STEPS}", f"--save_checkpoints_steps={SAVE_EVERY}",
         "--eval_every=0", "--sample_every=0", "--log_every=1", "--learning_rate=0.01", "--seed=5"]
RESUMED = re.compile(r"Resuming .* step (\d+), epoch (\d+), window (\d+)/(\d+)")


def _start(args: list[str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "CLUSTER_SPEC")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    fcntl.fcntl(process.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    return process


def _interrupt_after_step(process: subprocess.Popen[str], step: int, signum: int) -> str:
    """Reads the log up to `step`, then signals; returns everything the process printed."""
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            break
    else:
        pytest.fail(f"the trainer ended before step {step}:\n" + "".join(seen)[-3000:])
    process.send_signal(signum)
    rest, _ = process.communicate(timeout=600)
    return "".join(seen) + rest


def _finish(process: subprocess.Popen[str]) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def _state(job_dir: Path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(job_dir)))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model", "optimizer", "step", "epoch", "position", "carry"))}


def _assert_no_partial_files(job_dir: Path) -> None:
    import tensorflow as tf

    names = [p.name for p in job_dir.rglob("*")]
    assert not [n for n in names if "tmp" in n or "temp" in n], names
    state = tf.train.get_checkpoint_state(str(job_dir))
    for path in state.all_model_checkpoint_paths:
        assert Path(path + ".index").exists() and list(Path(path).parent.glob(Path(path).name + ".data-*"))


def _assert_same_final_state(got_dir: Path, expected_dir: Path) -> None:
    got, expected = _state(got_dir), _state(expected_dir)
    assert got.keys() == expected.keys()
    assert int(got["step/.ATTRIBUTES/VARIABLE_VALUE"]) == MAX_STEPS
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_sigterm_and_sigkill_resume_where_an_uninterrupted_run_ends(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    common = [f"--data_dir={data_dir}", f"--data_prefix={prefix}", *MODEL]
    dirs = {name: tmp_path / name for name in ("whole", "term", "kill")}
    runs = {name: _start([*common, f"--job-dir={path}"]) for name, path in dirs.items()}

    # SIGTERM: the trainer finishes its step, checkpoints exactly there and exits with 143.
    term_output = _interrupt_after_step(runs["term"], 12, signal.SIGTERM)
    assert runs["term"].returncode == 143, term_output[-3000:]
    stopped = int(re.search(r"SIGTERM: saving a checkpoint at step (\d+)", term_output).group(1))
    assert 12 <= stopped < MAX_STEPS
    _assert_no_partial_files(dirs["term"])

    # SIGKILL: nothing is saved; the last periodic checkpoint is where the rerun starts.
    kill_output = _interrupt_after_step(runs["kill"], 12, signal.SIGKILL)
    assert runs["kill"].returncode == -signal.SIGKILL, kill_output[-3000:]
    _assert_no_partial_files(dirs["kill"])
    import tensorflow as tf

    last_saved = int(tf.train.latest_checkpoint(str(dirs["kill"])).rsplit("-", 1)[1])
    assert last_saved >= SAVE_EVERY and last_saved % SAVE_EVERY == 0

    reruns = {name: _start([*common, f"--job-dir={dirs[name]}"]) for name in ("term", "kill")}
    whole_output = _finish(runs["whole"])
    assert "from scratch" in whole_output
    for name, resumed_at in (("term", stopped), ("kill", last_saved)):
        output = _finish(reruns[name])
        step, epoch, window, per_epoch = map(int, RESUMED.search(output).groups())
        assert step == resumed_at
        assert (epoch, window) == divmod(step, per_epoch)  # the data position came back too
        _assert_no_partial_files(dirs[name])
        _assert_same_final_state(dirs[name], dirs["whole"])


def test_ctrl_c_saves_where_it_stopped_and_the_rerun_resumes_there(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    common = [f"--data_dir={data_dir}", f"--data_prefix={prefix}", *MODEL, f"--job-dir={tmp_path / 'job'}"]
    run = _start(common)
    output = _interrupt_after_step(run, 12, signal.SIGINT)
    assert run.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    stopped = int(re.search(r"^SIGINT: saving a checkpoint at step (\d+) and stopping$", output,
                            re.MULTILINE).group(1))
    assert 12 <= stopped < MAX_STEPS
    assert re.search(rf"^interrupted: step {stopped}, ", output, re.MULTILINE)
    _assert_no_partial_files(tmp_path / "job")
    rerun = _finish(_start([*common, f"--max_steps={stopped + 1}"]))
    assert int(RESUMED.search(rerun).group(1)) == stopped
