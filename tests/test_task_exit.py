"""`python -m trainer.task` leaves its garbage to the operating system at exit (the interpreter's
final collection over TensorFlow's traced graphs cost seconds of a --time_budget run)."""

from __future__ import annotations

import subprocess
import sys

from generation_job import python_env

PROGRAM = """
import atexit
from trainer import task

class Cycle:
    def __del__(self):
        print("collected", flush=True)

atexit.register(lambda: print("other exit handlers run", flush=True))
if sys.argv[1] == "leave":
    task.leave_garbage_to_exit()
cycle = Cycle()
cycle.self = cycle
del cycle
"""


def run(mode: str) -> list[str]:
    result = subprocess.run([sys.executable, "-c", "import gc, sys; gc.disable()\n" + PROGRAM, mode],
                            capture_output=True, text=True, env=python_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split("\n")[:-1]


def test_garbage_is_left_to_the_exit_and_exit_handlers_still_run() -> None:
    # The interpreter's final collection is what finalizes a cycle that nothing collected before...
    assert run("collect") == ["other exit handlers run", "collected"]
    # ...and the one trainer.task skips.
    assert run("leave") == ["other exit handlers run"]

