"""Cloud Storage faults are retried (bounded, logged) and never taken for damaged data; no emulator
needed here (tests/test_gcs_faults.py injects the same faults on the way to the emulator).

The errors are the ones TensorFlow's gs:// client raises, messages included: its checkpoint reader
drops the error code, so the kind is also read from the text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer import checkpoints, storage

# What TensorFlow 2.21 raised through the test proxy (tests/gcs) with GCS_RETRY_CONFIG_MAX_RETRIES=2.
EXHAUSTED = ("All 2 retry attempts failed. The last failure: Error executing an HTTP request: HTTP response "
             "code 503 with body '{\"error\": {\"code\": 503}}' \t when reading gs://b/job/ckpt-20.index")
TIMED_OUT = ("All 2 retry attempts failed. The last failure: Error executing an HTTP request: "
             "libcurl code 42 meaning 'Operation was aborted by an application callback' when reading gs://b/job/ckpt-20.index")
FORBIDDEN = ("Error executing an HTTP request: HTTP response code 403 with body "
             "'{\"error\": {\"code\": 403}}' \t when reading gs://b/job/ckpt-20.index")

GRAPH_HEADER = ("Graph execution error:\n\nDetected at node IteratorGetNext defined at (most recent call "
                "last):\n<stack traces unavailable>\n")


def _error(code: int, text: str) -> tf.errors.OpError:
    return tf.errors.OpError(None, None, text, code)


@pytest.mark.parametrize(("error", "kind"), [
    (_error(tf.errors.UNKNOWN, EXHAUSTED), "transient"),  # the checkpoint reader's code
    (_error(tf.errors.UNKNOWN, TIMED_OUT), "transient"),
    (tf.errors.AbortedError(None, None, "{{function_node x}} " + EXHAUSTED + " [Op:IteratorGetNext]"),
     "transient"),
    (tf.errors.UnavailableError(None, None, "Error executing an HTTP request: libcurl code 7 meaning "
                                "'Couldn't connect to server' when reading gs://b/x"), "transient"),
    (tf.errors.DeadlineExceededError(None, None, "deadline exceeded reading gs://b/x"), "transient"),
    # Out of a compiled call (--steps_per_execution > 1), the storage's words come after a header.
    (tf.errors.AbortedError(None, None, GRAPH_HEADER + EXHAUSTED + "\n\t [[{{node IteratorGetNext}}]]"),
     "transient"),
    (tf.errors.ResourceExhaustedError(None, None, "HTTP response code 429"), "transient"),
    # The same codes from elsewhere are no storage fault: a lost worker, a device out of memory.
    (tf.errors.AbortedError(None, None, "Collective ops is aborted by: worker 1 is gone"), None),
    (tf.errors.UnavailableError(None, None, "Socket closed; Connection reset by peer"), None),
    (tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[4096]"), None),
    (_error(tf.errors.UNKNOWN, FORBIDDEN), "denied"),
    (tf.errors.PermissionDeniedError(None, None, "nope"), "denied"),
    (tf.errors.DataLossError(None, None, "truncated record at 65580"), None),
    (_error(tf.errors.UNKNOWN, "Read less bytes than requested"), None),
    (tf.errors.NotFoundError(None, None, "gs://b/x; No such file or directory"), None),
    (ValueError("not an OpError"), None),
])
def test_faults_are_told_apart_from_damage(error: BaseException, kind: str | None) -> None:
    assert storage.kind(error) == kind


class Flaky:
    """Fails with `errors` in turn, then returns "done"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


BACKOFF = storage.Backoff(attempts=4, first_delay=1.0, longest_delay=3.0)


def test_the_line_shown_is_the_error_not_tensorflows_header() -> None:
    err = tf.errors.AbortedError(None, None, GRAPH_HEADER + EXHAUSTED + " [Op:__inference_steps_1]")
    assert storage.message(err) == EXHAUSTED


def test_transient_faults_on_gs_are_retried_with_growing_delays(capsys: pytest.CaptureFixture) -> None:
    slept: list[float] = []
    action = Flaky(*[_error(tf.errors.UNKNOWN, EXHAUSTED)] * 3)
    reopened = []
    assert storage.retry("reading a checkpoint", "gs://b/job/ckpt-20", action, backoff=BACKOFF,
                         sleep=slept.append, before_retry=lambda: reopened.append(1)) == "done"
    assert action.calls == 4 and slept == [1.0, 2.0, 3.0] and len(reopened) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("warning: gs://b/job/ckpt-20: reading a checkpoint failed")
                                   for line in lines)
    assert "retrying in 1 s (attempt 2 of 4)" in lines[0]


def test_a_fault_that_outlasts_the_budget_is_one_line_not_damage() -> None:
    action = Flaky(*[tf.errors.UnavailableError(None, None, "HTTP response code 503")] * 4)
    with pytest.raises(storage.StorageUnavailable, match=r"gs://b/j: Cloud Storage kept failing while saving "
                       r"a checkpoint \(4 tries over 6 s; last: HTTP response code 503\); nothing was lost"):
        storage.retry("saving a checkpoint", "gs://b/j", action, backoff=BACKOFF, sleep=lambda _: None)
    assert action.calls == 4


def test_permission_errors_and_damage_are_not_retried() -> None:
    denied = Flaky(_error(tf.errors.UNKNOWN, FORBIDDEN))
    with pytest.raises(storage.StorageDenied, match=r"^gs://b/j: permission denied while reading .*403"):
        storage.retry("reading", "gs://b/j", denied, backoff=BACKOFF, sleep=pytest.fail)
    damaged = Flaky(tf.errors.DataLossError(None, None, "truncated record"))
    with pytest.raises(tf.errors.DataLossError):
        storage.retry("reading", "gs://b/j", damaged, backoff=BACKOFF, sleep=pytest.fail)
    assert denied.calls == damaged.calls == 1


def test_local_paths_are_not_retried() -> None:
    # A full or read-only local disk is the user's to fix now (errors.writing says so).
    action = Flaky(tf.errors.ResourceExhaustedError(None, None, "No space left on device"))
    with pytest.raises(tf.errors.ResourceExhaustedError):
        storage.retry("saving a checkpoint", "/tmp/job", action, backoff=BACKOFF, sleep=pytest.fail)
    assert action.calls == 1


def test_the_budget_comes_from_the_environment() -> None:
    assert storage.Backoff.from_env({}) == storage.Backoff()
    assert storage.Backoff.from_env({storage.ENV_BUDGET: "3,0.5,2"}) == storage.Backoff(3, 0.5, 2.0)
    assert [storage.Backoff().delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    for bad in ("3", "x,1,2", "0,1,2"):
        with pytest.raises(storage.UsageError, match=storage.ENV_BUDGET):
            storage.Backoff.from_env({storage.ENV_BUDGET: bad})


@pytest.fixture
def job_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Checkpoints 10 and 20, read as if they were on gs:// (only the path decides retrying)."""
    variable = tf.Variable(np.zeros(4, np.float32))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=variable), str(tmp_path), max_to_keep=3)
    for step in (10, 20):
        variable.assign_add(tf.ones(4))
        manager.save(checkpoint_number=step)
    monkeypatch.setattr(storage, "is_remote", lambda path: True)
    monkeypatch.setenv(storage.ENV_BUDGET, "3,0,0")
    return tmp_path


def _reads_of_newest_fail(monkeypatch: pytest.MonkeyPatch, *errors: BaseException) -> Flaky:
    failures = Flaky(*errors)
    load = tf.train.load_checkpoint

    def flaky_load(path: str) -> object:
        if path.endswith("ckpt-20"):
            failures()
        return load(path)

    monkeypatch.setattr(checkpoints.tf.train, "load_checkpoint", flaky_load)
    return failures


def test_a_storage_hiccup_at_restore_keeps_the_newest_checkpoint(
        job_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    failures = _reads_of_newest_fail(monkeypatch, _error(tf.errors.UNKNOWN, EXHAUSTED),
                                     _error(tf.errors.UNKNOWN, TIMED_OUT))
    assert checkpoints.latest_usable(str(job_dir)) == f"{job_dir}/ckpt-20"
    assert failures.calls == 3
    err = capsys.readouterr().err
    assert err.count("retrying") == 2 and "damaged" not in err


@pytest.mark.parametrize(("errors", "raised", "says"), [
    ([_error(tf.errors.UNKNOWN, EXHAUSTED)] * 3, storage.StorageUnavailable, "Cloud Storage kept failing"),
    ([_error(tf.errors.UNKNOWN, FORBIDDEN)], storage.StorageDenied, "permission denied while reading"),
])
def test_a_checkpoint_that_cannot_be_read_for_now_is_an_error_never_a_rollback(
        job_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        errors: list, raised: type, says: str) -> None:
    _reads_of_newest_fail(monkeypatch, *errors)
    with pytest.raises(raised, match=says):
        checkpoints.latest_usable(str(job_dir))
    assert "damaged" not in capsys.readouterr().err


def test_a_truncated_checkpoint_is_still_damage(job_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (data,) = job_dir.glob("ckpt-20.data-*")
    data.write_bytes(data.read_bytes()[:5])
    assert checkpoints.latest_usable(str(job_dir)) == f"{job_dir}/ckpt-10"
    assert "ckpt-20 is damaged" in capsys.readouterr().err
