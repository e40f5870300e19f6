"""User mistakes, reported as one line instead of a traceback.

Library code raises `UsageError` (or the data contract's `ContractError`) with a message that
names the flag or file and the fix; entry points wrap `main` in `run_cli`, which prints that line
to stderr and exits with status 1. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from preprocessing.contract import ContractError
from preprocessing.failures import writes_reported_as


class UsageError(Exception):
    """A mistake the user can fix; the message is one line naming the flag or file and the fix."""


def writing(target: str, then: str = "") -> contextlib.AbstractContextManager[None]:
    """Writes under `target` (a flag and its value) that fail for want of space, permission or a
    directory become one UsageError line; `then` says what happens next (e.g. how to resume)."""
    return writes_reported_as(UsageError, target, then)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run_cli(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """Wraps an absl `main` so user mistakes end in one line and exit status 1."""

    def wrapped(argv: list[str]) -> Any:
        _quiet_libraries()
        try:
            return main(argv)
        except (UsageError, ContractError) as err:
            fail(str(err))
        except KeyboardInterrupt:
            # Ctrl-C outside training (which checkpoints and exits by itself): stop without a
            # traceback, with the shell's status for SIGINT.
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)

    return wrapped


def _quiet_libraries() -> None:
    """TensorFlow's INFO chatter (SavedModel assets, signature renames) buries verne's own lines;
    `--verbosity 0` (absl) brings it back."""
    import logging

    from absl import flags
    from absl import logging as absl_logging

    if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("tensorflow").setLevel(
        logging.INFO if absl_logging.get_verbosity() >= absl_logging.INFO else logging.WARNING)
