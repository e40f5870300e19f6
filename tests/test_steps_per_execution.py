"""--steps_per_execution: several windows per compiled call train exactly as one per call, and
evaluation, checkpoints and epochs still fall on their exact steps."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer import runner
from trainer.hparams import HParams


def _run(tmp_path, data_dir: str, name: str, steps_per_execution: int) -> tuple[runner.TrainResult, dict]:
    hparams = HParams(data_dir=data_dir, data_prefix="tiny", job_dir=str(tmp_path / name), layers=1,
                      lstm_state_size=8, embedding_size=4, batch_size=4, unroll_steps=16,
                      eval_every=7, save_checkpoints_steps=5, keep_checkpoint_max=20, sample_every=0,
                      log_every=4, max_steps=30, steps_per_execution=steps_per_execution)
    result = runner.train(hparams)
    reader = tf.train.load_checkpoint(result.job_dir)
    weights = {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
               if "/.ATTRIBUTES/" in name and "model" in name}
    return result, weights


def test_steps_per_execution_trains_like_one_step_per_call(tmp_path, make_data_dir) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)
    one, one_weights = _run(tmp_path, data_dir, "one", 1)
    many, many_weights = _run(tmp_path, data_dir, "many", 8)
    # 25 windows an epoch: 30 steps cross into the second epoch.
    assert (one.step, one.epoch) == (many.step, many.epoch) == (30, 1)
    assert one_weights and one_weights.keys() == many_weights.keys()
    for name, value in one_weights.items():
        np.testing.assert_allclose(many_weights[name], value, atol=1e-5, err_msg=name)
    assert many.eval_loss == pytest.approx(one.eval_loss, abs=1e-5)
    assert many.best_eval_loss == pytest.approx(one.best_eval_loss, abs=1e-5)
    saved = [tf.train.get_checkpoint_state(r.job_dir).all_model_checkpoint_paths for r in (one, many)]
    assert [p.rsplit("-", 1)[1] for p in saved[1]] == ["5", "10", "15", "20", "25", "30"]
    assert [p.rsplit("/", 1)[1] for p in saved[0]] == [p.rsplit("/", 1)[1] for p in saved[1]]


def test_steps_per_execution_must_be_positive() -> None:
    with pytest.raises(ValueError, match="--steps_per_execution=0: must be positive"):
        HParams(steps_per_execution=0).validate()


_MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from trainer import runner
    from trainer.hparams import HParams
    runner.strategy_from_environment = lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    data_dir, job_dir, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    result = runner.train(HParams(
        data_dir=data_dir, data_prefix="tiny", job_dir=job_dir, layers=1, lstm_state_size=8,
        embedding_size=4, batch_size=4, unroll_steps=16, eval_every=10, sample_every=0,
        log_every=2, max_steps=10, steps_per_execution=k))
    print(json.dumps([result.step, result.train_loss, result.eval_loss]))
""")


def test_steps_per_execution_under_two_replicas(tmp_path, make_data_dir) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)
    runs = []
    for k in (1, 4):  # a process each: two MirroredStrategies in one process share collective keys
        done = subprocess.run([sys.executable, "-c", _MIRRORED, data_dir, str(tmp_path / f"k{k}"), str(k)],
                              capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parent.parent)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    one, many = runs
    assert one[0] == many[0] == 10
    assert many[1:] == pytest.approx(one[1:], abs=1e-5)


