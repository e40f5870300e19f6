"""trainer.distribute: the strategy chosen from the environment, chief rules, and how windows are
split between replicas (checked for real under MirroredStrategy on two logical CPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import tensorflow as tf

from trainer import distribute
from trainer.errors import UsageError

REPO = Path(__file__).resolve().parents[1]

# What Vertex AI sets on the second replica of pool 1 of a trial of a tuning job.
VERTEX_CLUSTER_SPEC = {
    "cluster": {"workerpool0": ["cmle-training-workerpool0-0:2222"],
                "workerpool1": ["cmle-training-workerpool1-0:2222", "cmle-training-workerpool1-1:2222"]},
    "environment": "cloud",
    "task": {"type": "workerpool1", "index": 1, "trial": "7"},
    "job": "{}",
}


def test_cluster_spec_becomes_tf_config() -> None:
    config = distribute.tf_config_from_cluster_spec(VERTEX_CLUSTER_SPEC)
    assert config["cluster"] == {"chief": ["cmle-training-workerpool0-0:2222"],
                                 "worker": ["cmle-training-workerpool1-0:2222",
                                            "cmle-training-workerpool1-1:2222"]}
    assert config["task"] == {"type": "worker", "index": 1, "trial": "7"}
    assert distribute.cluster_workers(config) == 3
    # TF_CONFIG, when Vertex (or the user) sets it, wins over CLUSTER_SPEC.
    own = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}
    env = {"TF_CONFIG": json.dumps(own), "CLUSTER_SPEC": json.dumps(VERTEX_CLUSTER_SPEC)}
    assert distribute.tf_config(env) == own
    assert distribute.tf_config({"CLUSTER_SPEC": json.dumps(VERTEX_CLUSTER_SPEC)}) == config
    assert distribute.tf_config({}) == {}
    with pytest.raises(UsageError, match="TF_CONFIG is not valid JSON"):
        distribute.tf_config({"TF_CONFIG": "{cluster"})


def test_strategy_kind_follows_the_hardware_and_the_cluster() -> None:
    one_worker = {"cluster": {"chief": ["a:1"]}, "task": {"type": "chief", "index": 0}}
    two_workers = distribute.tf_config_from_cluster_spec(VERTEX_CLUSTER_SPEC)
    assert distribute.choose_kind({}, gpus=0, tpu=False) == distribute.DEFAULT
    assert distribute.choose_kind({}, gpus=1, tpu=False) == distribute.DEFAULT
    assert distribute.choose_kind(one_worker, gpus=4, tpu=False) == distribute.MIRRORED
    assert distribute.choose_kind(two_workers, gpus=4, tpu=False) == distribute.MULTI_WORKER
    assert distribute.choose_kind(two_workers, gpus=0, tpu=True) == distribute.TPU
    assert distribute.on_tpu_vm({"TPU_NAME": "local"})


def test_this_machine_gets_the_default_strategy() -> None:
    strategy = distribute.strategy_from_environment({})
    assert strategy is tf.distribute.get_strategy()
    assert distribute.is_chief(strategy)
    assert distribute.per_replica_batch(64, strategy) == 64
    assert distribute.checkpoint_dir("gs://b/job", strategy) == "gs://b/job"
    assert distribute.distribute_windows(strategy, tf.data.Dataset.range(3)) is not None


def _strategy(cluster: dict, task_type: str, task_id: int, replicas: int = 2) -> SimpleNamespace:
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type=task_type, task_id=task_id)
    return SimpleNamespace(cluster_resolver=resolver, num_replicas_in_sync=replicas)


def test_a_worker_waits_for_the_others_a_bounded_time() -> None:
    # Longer than one worker retrying Cloud Storage for its whole budget, so that never times out.
    assert distribute.collective_timeout({}) == distribute.DEFAULT_COLLECTIVE_TIMEOUT
    patient = {"VERNE_GCS_RETRIES": "20,10,100"}  # waits 10 + 20 + 40 + 80 + 15 * 100 s in all
    assert distribute.collective_timeout(patient) == 2 * 1650
    assert distribute.collective_timeout({distribute.COLLECTIVE_TIMEOUT_ENV: "90"}) == 90.0
    assert distribute.collective_timeout({distribute.COLLECTIVE_TIMEOUT_ENV: "0"}) == 0.0  # for ever
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(UsageError, match=f"{distribute.COLLECTIVE_TIMEOUT_ENV}={bad}: give the seconds"):
            distribute.collective_timeout({distribute.COLLECTIVE_TIMEOUT_ENV: bad})


def test_chief_and_where_each_worker_saves() -> None:
    workers_only = {"worker": ["a:1", "b:2"]}
    with_chief = {"chief": ["c:0"], "worker": ["a:1", "b:2"]}
    assert distribute.is_chief(_strategy(workers_only, "worker", 0))
    assert not distribute.is_chief(_strategy(workers_only, "worker", 1))
    assert distribute.is_chief(_strategy(with_chief, "chief", 0))
    assert not distribute.is_chief(_strategy(with_chief, "worker", 0))
    assert distribute.checkpoint_dir("gs://b/job/", _strategy(with_chief, "chief", 0)) == "gs://b/job/"
    assert distribute.checkpoint_dir("gs://b/job/", _strategy(with_chief, "worker", 1)) == (
        "gs://b/job/.scratch-worker-1")
    with pytest.raises(UsageError, match="--batch_size=7 does not split over 2 replicas"):
        distribute.per_replica_batch(7, _strategy(workers_only, "worker", 0))
    assert distribute.replica_streams(8, 1, 2) == (4, 8)


def test_remove_scratch_never_removes_the_job_dir(tmp_path: Path) -> None:
    scratch = tmp_path / ".scratch-worker-1"
    scratch.mkdir(parents=True)
    (scratch / "ckpt-1.index").write_text("x")
    distribute.remove_scratch(str(tmp_path) + "/", str(tmp_path))
    assert scratch.exists()
    distribute.remove_scratch(str(scratch), str(tmp_path))
    assert not scratch.exists() and tmp_path.exists()


_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from trainer import distribute
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    # 3 windows of a global batch of 4 streams; entry = 100 * window + 10 * row + column.
    windows = tf.constant([[[100 * w + 10 * r + c for c in range(3)] for r in range(4)] for w in range(3)])
    dataset = tf.data.Dataset.from_tensor_slices((windows, windows + 1))
    seen = []
    for inputs, labels in distribute.distribute_windows(strategy, dataset):
        parts = strategy.experimental_local_results(inputs)
        seen.append([part.numpy().tolist() for part in parts])
    print(json.dumps(seen))
""")


def test_each_replica_always_gets_the_same_streams() -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(seen) == 3
    for w, (replica0, replica1) in enumerate(seen):
        assert [row[0] for row in replica0] == [100 * w, 100 * w + 10]  # rows 0-1
        assert [row[0] for row in replica1] == [100 * w + 20, 100 * w + 30]  # rows 2-3


_STATE_SCRIPT = textwrap.dedent("""
    import json, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from trainer import loops
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    # A nested state of 4 streams, as the carried state a checkpoint holds.
    state = ((tf.reshape(tf.range(8.0), [4, 2]), tf.range(4.0)),)
    split = loops.split_state(strategy, state)
    parts = [[leaf.numpy().tolist() for leaf in strategy.experimental_local_results(per_replica)]
             for per_replica in tf.nest.flatten(split)]
    back = [leaf.numpy().tolist() for leaf in tf.nest.flatten(loops.gather_state(strategy, split))]
    print(json.dumps({"parts": parts, "back": back}))
""")


def test_carried_state_splits_over_replicas_and_gathers_back() -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", _STATE_SCRIPT], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    # Replica r holds streams [2r, 2r + 2): the rows distribute_windows hands it.
    assert got["parts"] == [[[[0, 1], [2, 3]], [[4, 5], [6, 7]]], [[0, 1], [2, 3]]]
    assert got["back"] == [[[0, 1], [2, 3], [4, 5], [6, 7]], [0, 1, 2, 3]]
