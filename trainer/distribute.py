"""The tf.distribute strategy for where the trainer runs, chosen from the environment.

- A TPU VM (Vertex `ct5lp-hightpu-*`, or `TPU_NAME` set): TPUStrategy via TPUClusterResolver.
- A cluster of more than one worker in TF_CONFIG (Vertex also sets CLUSTER_SPEC; we derive
  TF_CONFIG from it when missing): MultiWorkerMirroredStrategy.
- Several GPUs on one machine: MirroredStrategy.
- Otherwise the default strategy (one device, no wrapping cost).

`--batch_size` is the global batch (the number of parallel token streams); each replica takes a
contiguous block of `batch_size / replicas` streams, so the stateful streams keep their identity
whatever the replica count. Only the chief writes summaries, samples and the exported model;
under MultiWorkerMirroredStrategy every worker must still take part in a checkpoint save (it may
run collectives), so the others save into a scratch dir (`checkpoint_dir`) they delete after.
The carried state is gathered from the replicas into the checkpoint and split again on resume
(trainer.loops), and a SIGTERM on any worker is agreed on by all (`stop_agreement`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import tensorflow as tf

from trainer import storage
from trainer.errors import UsageError

# Vertex worker pools, in order, and the TF_CONFIG task type each one plays.
VERTEX_POOL_ROLES = {"workerpool0": "chief", "workerpool1": "worker", "workerpool2": "ps",
                     "workerpool3": "evaluator"}
DEFAULT, MIRRORED, MULTI_WORKER, TPU = "default", "mirrored", "multi_worker", "tpu"
COLLECTIVE_TIMEOUT_ENV = "VERNE_COLLECTIVE_TIMEOUT"
DEFAULT_COLLECTIVE_TIMEOUT = 600.0


def tf_config_from_cluster_spec(cluster_spec: Mapping[str, Any]) -> dict[str, Any]:
    """Vertex's CLUSTER_SPEC (pools named workerpoolN) as a TF_CONFIG (chief/worker/ps)."""
    cluster = {VERTEX_POOL_ROLES[pool]: list(hosts)
               for pool, hosts in cluster_spec.get("cluster", {}).items()
               if pool in VERTEX_POOL_ROLES and hosts}
    task = dict(cluster_spec.get("task", {}))
    task["type"] = VERTEX_POOL_ROLES.get(task.get("type", ""), task.get("type"))
    config: dict[str, Any] = {"cluster": cluster, "task": task}
    if "environment" in cluster_spec:
        config["environment"] = cluster_spec["environment"]
    return config


def tf_config(env: Mapping[str, str]) -> dict[str, Any]:
    """TF_CONFIG as a dict: TF_CONFIG itself, else derived from CLUSTER_SPEC, else {}."""
    for name in ("TF_CONFIG", "CLUSTER_SPEC"):
        text = env.get(name, "")
        if not text:
            continue
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            raise UsageError(f"environment variable {name} is not valid JSON; unset or fix it") from None
        return body if name == "TF_CONFIG" else tf_config_from_cluster_spec(body)
    return {}


def cluster_workers(config: Mapping[str, Any]) -> int:
    """Workers that train (chief + worker) in a TF_CONFIG."""
    cluster = config.get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def on_tpu_vm(env: Mapping[str, str]) -> bool:
    # TPU VMs expose the chips as /dev/accel* (v2-v4) or /dev/vfio/N (v5e and later).
    return bool(env.get("TPU_NAME") or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def choose_kind(config: Mapping[str, Any], gpus: int, tpu: bool) -> str:
    """Which strategy fits: pure, so the choice is testable without the hardware."""
    if tpu:
        return TPU
    if cluster_workers(config) > 1:
        return MULTI_WORKER
    if gpus > 1:
        return MIRRORED
    return DEFAULT


def strategy_from_environment(env: Mapping[str, str] | None = None) -> tf.distribute.Strategy:
    """Builds the strategy for this machine. Call once, before any variable is created."""
    env = os.environ if env is None else env
    config = tf_config(env)
    if config and "TF_CONFIG" not in os.environ:
        # MultiWorkerMirroredStrategy's resolver reads TF_CONFIG from the process environment.
        os.environ["TF_CONFIG"] = json.dumps(config)
    kind = choose_kind(config, len(tf.config.list_physical_devices("GPU")), on_tpu_vm(env))
    if kind == TPU:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=env.get("TPU_NAME", "local"))
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if kind == MULTI_WORKER:
        timeout = collective_timeout(env)
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout or None)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    if kind == MIRRORED:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def collective_timeout(env: Mapping[str, str]) -> float:
    """Seconds a worker waits in one collective before it gives up (0: for ever), so that a worker
    that stopped (an error, a lost VM) does not leave the others waiting for ever.
    `VERNE_COLLECTIVE_TIMEOUT`; the default outlasts every wait a healthy job has: one worker
    retrying Cloud Storage for its whole budget (trainer.storage), the chief alone choosing the
    checkpoint to restore, writing a sample or a checkpoint."""
    text = env.get(COLLECTIVE_TIMEOUT_ENV, "").strip()
    if not text:
        return max(DEFAULT_COLLECTIVE_TIMEOUT, 2 * storage.Backoff.from_env(env).longest_wait())
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise UsageError(f"{COLLECTIVE_TIMEOUT_ENV}={text}: give the seconds a worker may wait for the "
                         "others (0: for ever), e.g. 600")
    return seconds


@contextlib.contextmanager
def lost_workers_reported(strategy: tf.distribute.Strategy) -> Iterator[None]:
    """With several workers, a collective that fails because another worker stopped (its error,
    a lost VM) or did not answer within `collective_timeout` is one line, not a traceback: every
    worker then ends in bounded time, and the failed one's log says why."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        yield
        return
    try:
        yield
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.CancelledError) as err:
        if storage.kind(err) is not None:
            raise
        raise UsageError(f"another worker of this job stopped or stopped answering ({storage.message(err)}); "
                         "its log says why; run the same command again on every worker to resume from the "
                         "last checkpoint") from None


def is_tpu(strategy: tf.distribute.Strategy | None) -> bool:
    return isinstance(strategy, tf.distribute.TPUStrategy)


def _task(strategy: tf.distribute.Strategy) -> tuple[str | None, int]:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one worker that writes summaries and samples and exports the model.
    hparams.json and metadata.json are the exception: every worker writes them (runner.prepare_job
    runs on each one), from the same flags and data and each by an atomic rename, so the copies
    agree and a reader never sees half a file."""
    task_type, task_id = _task(strategy)
    if task_type is None or task_type == "chief":
        return True
    if task_type != "worker":
        return False
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return "chief" not in cluster and task_id == 0


def per_replica_batch(global_batch: int, strategy: tf.distribute.Strategy) -> int:
    """Streams each replica carries; a global batch that does not split evenly is an error."""
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise UsageError(f"--batch_size={global_batch} does not split over {replicas} replicas; "
                         f"use a multiple of {replicas}")
    return global_batch // replicas


def replica_streams(global_batch: int, replica_id: int, replicas: int) -> tuple[int, int]:
    """[start, stop) of the global streams replica `replica_id` carries (contiguous blocks)."""
    size = global_batch // replicas
    return replica_id * size, (replica_id + 1) * size


def readers(strategy: tf.distribute.Strategy) -> int:
    """Input pipelines that can each read their own shards: one per worker under
    MultiWorkerMirroredStrategy (each one's id is its place in the cluster, chief first), else 1."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    return max(1, cluster_workers({"cluster": strategy.cluster_resolver.cluster_spec().as_dict()}))


def distribute_windows(strategy: tf.distribute.Strategy,
                       windows: tf.data.Dataset | Callable[[int], tf.data.Dataset]) -> Any:
    """Windows -> per-replica windows [B/R, T], replica r always getting the global rows
    [r*B/R, (r+1)*B/R): the same streams every window, so the state each replica carries stays
    the state of its own rows.

    `windows` is either the global (inputs, labels) windows [B, T], which every input pipeline
    reads whole to keep its replicas' rows, or a function of the input pipeline (one per worker)
    that returns that pipeline's own windows [B/P, T], its replicas' rows only, read from its own
    shards (trainer.data.reader_windows). tf.data's auto-sharding is never used: it would hand
    whole windows or files to different workers without regard to the streams."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return windows(0) if callable(windows) else windows

    def per_pipeline(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = replicas // context.num_input_pipelines
        if callable(windows):  # the pipeline's own windows: its replicas' rows only, in order
            dataset, first, shares = windows(context.input_pipeline_id), 0, local
        else:
            dataset, first, shares = windows, context.input_pipeline_id * local, replicas

        def blocks(inputs: tf.Tensor, labels: tf.Tensor) -> tf.data.Dataset:
            size = tf.shape(inputs)[0] // shares
            rows = tf.range(first * size, (first + local) * size)

            def split(matrix: tf.Tensor) -> tf.Tensor:  # [B, T] -> [local, B/R, T]
                return tf.reshape(tf.gather(matrix, rows), [local, size, -1])

            # Consecutive elements go to this worker's replicas in order.
            return tf.data.Dataset.from_tensor_slices((split(inputs), split(labels)))

        return dataset.flat_map(blocks)

    return strategy.distribute_datasets_from_function(per_pipeline)


def stop_agreement(strategy: tf.distribute.Strategy) -> Callable[[bool], bool]:
    """`agree(stop_here) -> stop`: whether any worker wants to stop, the same answer on all.

    A Spot VM's SIGTERM reaches one worker; if only that one stopped, the others would wait
    forever in the next collective. Every worker calls `agree` at the same point of every step,
    so all of them see one all-reduced flag and stop (and save) after the same step. With one
    process (every other strategy is driven by a single Python process) the local flag is the
    answer and nothing is reduced.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return bool

    @tf.function
    def workers_stopping(flag: tf.Tensor) -> tf.Tensor:
        # SUM, not MAX: collective all-reduce implements SUM and MEAN on every backend.
        flags = strategy.run(lambda: tf.identity(flag))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, flags, axis=None)

    def agree(stop_here: bool) -> bool:
        return float(workers_stopping(tf.constant(1.0 if stop_here else 0.0))) > 0.0

    return agree


def chief_decides(strategy: tf.distribute.Strategy, lowest: int = 0) -> Callable[[int], int] | None:
    """With several workers, `from_chief(value) -> the chief's value` on every worker, for integers
    >= `lowest` (an all-reduce in which only the chief's replicas count); None with one process,
    which decides alone. As `stop_agreement`, every worker must call it at the same point."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    local = len(strategy.extended.worker_devices)

    @tf.function
    def broadcast(value: tf.Tensor) -> tf.Tensor:
        share = strategy.run(lambda: tf.identity(value))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, share, axis=None)

    def from_chief(value: int) -> int:
        # Shifted so that every value the chief sends is positive; the others send 0.
        mine = (value - lowest + 1) / local if is_chief(strategy) else 0.0
        return round(float(broadcast(tf.constant(mine, tf.float64)))) + lowest - 1

    return from_chief


def mean_agreement(strategy: tf.distribute.Strategy) -> Callable[[list[float]], list[float]]:
    """`agree(values) -> means`: the workers' values averaged, the same on all (as
    `stop_agreement`, every worker calls it at the same point). --time_budget's clock: each
    worker reads its own, and they must take the same stop and learning-rate decisions."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return list

    @tf.function
    def mean(values: tf.Tensor) -> tf.Tensor:
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(lambda: tf.identity(values)),
                               axis=None)

    def agree(values: list[float]) -> list[float]:
        return [float(v) for v in mean(tf.constant(values, tf.float64)).numpy()]

    return agree


def checkpoint_dir(job_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Where this worker saves: the job dir on the chief, a scratch dir on the others."""
    if is_chief(strategy):
        return job_dir
    task_type, task_id = _task(strategy)
    return f"{job_dir.rstrip('/')}/.scratch-{task_type}-{task_id}"


def remove_scratch(path: str, job_dir: str) -> None:
    """Deletes a non-chief's scratch save dir; never the job dir itself."""
    if path.rstrip("/") != job_dir.rstrip("/") and tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
