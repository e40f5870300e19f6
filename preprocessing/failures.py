"""Failed writes told apart from bugs, for both sides' one-line errors (preprocessing.run's
--output_dir, the trainer's --job-dir and --export_dir).

Beam, TensorFlow's file system and Python each wrap an OS error their own way (OSError,
BeamIOError around a worker's error, tf.errors.OpError), but all keep the operating system's text,
so that text is what is matched: anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

_WRITE_FAILURES = ("No space left on device", "Disk quota exceeded", "Permission denied",
                   "Read-only file system", "Not a directory", "is not a directory",
                   "No such file or directory")


def write_failure(err: BaseException) -> str | None:
    """One line naming the path and the reason if `err` is a write that failed for want of space,
    permission or a directory; None for any other error."""
    text = plain(str(getattr(err, "message", None) or err))
    if not any(reason in text for reason in _WRITE_FAILURES):
        return None
    line = next((line.strip() for line in text.splitlines() if any(r in line for r in _WRITE_FAILURES)), text)
    return line if len(line) <= 240 else line[:237] + "..."


def plain(message: str) -> str:
    """A TensorFlow error message without its graph decorations
    (`{{function_node __wrapped__SaveV2...}} ... [Op:SaveV2]`)."""
    return re.sub(r"\{\{.*?\}\}", "", message).split("[Op:")[0].strip()


@contextlib.contextmanager
def writes_reported_as(usage_error: type[Exception], target: str, then: str = "") -> Iterator[None]:
    """Writes under `target` (a flag and its value) that fail for want of space, permission or a
    directory become one `usage_error` line (each side has its own class); `then` says what
    happens next (e.g. how to resume). Any other error propagates unchanged."""
    try:
        yield
    except usage_error:
        raise
    except Exception as err:
        reason = write_failure(err)
        if reason is None:
            raise
        raise usage_error(f"{target}: cannot write there ({reason}); free space or give a directory "
                          f"you can write to{then}") from None
