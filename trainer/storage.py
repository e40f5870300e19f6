"""Cloud Storage faults told apart from damaged data: retried when they pass, one line when not.

A read or write on gs:// can fail for reasons that say nothing about the data: the service is
briefly unavailable (HTTP 503), throttles (429), times out, or TensorFlow's own retries of one
request ran out ("All N retry attempts failed", AbortedError). Such an error is retried here with
exponential backoff, each retry a warning line; if it outlasts the budget the run ends with one
line saying so (`StorageUnavailable`), so a checkpoint that could not be read is never taken for a
damaged one (which would roll the job back and later overwrite the newer checkpoint). Permission
errors are not retried: one line naming the path (`StorageDenied`). Only data that reads wrong
(truncated, bad checksum, DataLoss) is damage, and that is the caller's to judge.

TensorFlow's checkpoint reader drops the error code (every failure arrives as UNKNOWN), so the
kind is also read from the message TensorFlow's gs:// client writes ("HTTP response code 503",
"libcurl code 28", ...). Local paths are not retried: a full or read-only disk is the user's to fix
at once (`errors.writing`).

The budget: `VERNE_GCS_RETRIES="ATTEMPTS,FIRST_DELAY_S,LONGEST_DELAY_S"` (default "8,1,60": about
two minutes of waiting, on top of TensorFlow's own per-request retries).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import tensorflow as tf

from trainer.errors import UsageError, warn

T = TypeVar("T")
ENV_BUDGET = "VERNE_GCS_RETRIES"

_TRANSIENT_CODES = frozenset({tf.errors.UNAVAILABLE, tf.errors.DEADLINE_EXCEEDED, tf.errors.ABORTED,
                              tf.errors.RESOURCE_EXHAUSTED})
_DENIED_CODES = frozenset({tf.errors.PERMISSION_DENIED, tf.errors.UNAUTHENTICATED})
_TRANSIENT_TEXT = re.compile(r"retry attempts failed|HTTP response code (408|429|5\d\d)\b|libcurl code")
# A transient code alone is not enough: a collective aborted by a lost worker (ABORTED, UNAVAILABLE)
# or a device out of memory (RESOURCE_EXHAUSTED) is no storage fault, and retrying would hide it.
_FROM_STORAGE = re.compile(r"gs://|HTTP|libcurl|retry attempts failed")
_DENIED_TEXT = re.compile(r"HTTP response code (401|403)\b")


class StorageError(UsageError):
    """Cloud Storage failed in a way no retry here fixes; the message is one line with what to do."""


class StorageUnavailable(StorageError):
    pass


class StorageDenied(StorageError):
    pass


@dataclasses.dataclass(frozen=True)
class Backoff:
    attempts: int = 8
    first_delay: float = 1.0
    longest_delay: float = 60.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return min(self.first_delay * 2 ** (attempt - 1), self.longest_delay)

    def longest_wait(self) -> float:
        """Seconds slept before a fault that never passes is given up on."""
        return sum(self.delay(attempt) for attempt in range(1, self.attempts))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Backoff:
        text = env.get(ENV_BUDGET, "").strip()
        if not text:
            return cls()
        try:
            attempts, first, longest = text.split(",")
            backoff = cls(int(attempts), float(first), float(longest))
        except ValueError:
            raise UsageError(f"{ENV_BUDGET}={text}: give ATTEMPTS,FIRST_DELAY_S,LONGEST_DELAY_S, "
                             "e.g. 8,1,60") from None
        if backoff.attempts < 1 or backoff.first_delay < 0 or backoff.longest_delay < 0:
            raise UsageError(f"{ENV_BUDGET}={text}: attempts must be >= 1 and delays >= 0")
        return backoff


def is_remote(path: str) -> bool:
    """A path on an object store (gs://...), where transient faults are expected."""
    return "://" in path and not path.startswith("file://")


def kind(err: BaseException) -> str | None:
    """"transient" (a Cloud Storage fault worth retrying), "denied" (a permission error), or None
    (anything else, damage included)."""
    if not isinstance(err, tf.errors.OpError):
        return None
    text = _plain(err)  # whole: an error inside a compiled call puts the storage's words on later lines
    if err.error_code in _DENIED_CODES or _DENIED_TEXT.search(text):
        return "denied"
    if _TRANSIENT_TEXT.search(text) or (err.error_code in _TRANSIENT_CODES and _FROM_STORAGE.search(text)):
        return "transient"
    return None


def message(err: BaseException) -> str:
    """The first line of a TensorFlow error that says something, without its graph decorations."""
    lines = [line.strip() for line in _plain(err).splitlines()]
    line = next((line for line in lines if line and not _BOILERPLATE.match(line)), "no message")
    return line if len(line) <= 240 else line[:237] + "..."


# What TensorFlow puts before the error itself when it comes out of a tf.function.
_BOILERPLATE = re.compile(r"Graph execution error:|Detected at node|<stack traces unavailable>|\[\[")


def _plain(err: BaseException) -> str:
    text = str(getattr(err, "message", None) or err)
    return re.sub(r"\{\{.*?\}\}", "", text).split("[Op:")[0].strip()


def denied(path: str, doing: str, err: BaseException) -> StorageDenied:
    return StorageDenied(f"{path}: permission denied while {doing} ({message(err)}); give the account "
                         "this job runs as access to it (e.g. roles/storage.objectAdmin on the bucket)")


def retry(doing: str, path: str, action: Callable[[], T], *, backoff: Backoff | None = None,
          sleep: Callable[[float], None] = time.sleep, before_retry: Callable[[], None] | None = None,
          ) -> T:
    """`action()`, retried while it fails with a transient fault on remote `path` (see the module
    docstring); `doing` ("reading checkpoint", ...) goes into the log lines and errors.
    `before_retry` cleans up what a failed attempt left (a partial checkpoint, say)."""
    if not is_remote(path):
        return action()
    backoff = backoff or Backoff.from_env(os.environ)
    waited = 0.0
    for attempt in range(1, backoff.attempts + 1):
        try:
            return action()
        except tf.errors.OpError as err:
            fault = kind(err)
            if fault == "denied":
                raise denied(path, doing, err) from None
            if fault != "transient":
                raise
            if attempt == backoff.attempts:
                raise StorageUnavailable(
                    f"{path}: Cloud Storage kept failing while {doing} ({backoff.attempts} tries over "
                    f"{waited:.0f} s; last: {message(err)}); nothing was lost: run the same command "
                    "again later to resume from the last checkpoint") from None
            delay = backoff.delay(attempt)
            warn(f"{path}: {doing} failed ({message(err)}); retrying in {delay:g} s "
                 f"(attempt {attempt + 1} of {backoff.attempts})")
            sleep(delay)
            waited += delay
            if before_retry is not None:
                before_retry()
    raise AssertionError("unreachable")


def remove_tree(path: str) -> None:
    """Deletes a directory tree if it is there, file by file, then its directories: TensorFlow's
    rmtree reports any delete that failed as PermissionDenied, which would hide a Cloud Storage
    fault from `kind` (and `retry`)."""
    if not tf.io.gfile.exists(path):
        return
    for directory, _, files in tf.io.gfile.walk(path):
        for name in files:
            tf.io.gfile.remove(f"{directory.rstrip('/')}/{name}")
    tf.io.gfile.rmtree(path)
