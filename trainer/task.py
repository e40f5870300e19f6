"""`python -m trainer.task`: train (or resume) a language model. Thin: flags -> HParams -> runner."""

from __future__ import annotations

import atexit
import gc
import os
import signal

from absl import app, flags

from trainer import budget, choose, cloud_env, runner, xla
from trainer import flags as trainer_flags
from trainer.errors import run_cli
from trainer.flags import define_hparams_flags, explicitly_set, hparams_from_command_line

define_hparams_flags()
# absl's --help lists only the flags of the module it runs; the trainer's are defined in trainer.flags.
flags.adopt_module_key_flags(trainer_flags)

EXIT_STATUS = {"terminated": 128 + signal.SIGTERM, "interrupted": 128 + signal.SIGINT}


@run_cli
def main(argv: list[str]) -> int:
    hparams = hparams_from_command_line(argv)
    # On Vertex AI: AIP_* dirs fill what the flags left empty; tuning trials get their own dir.
    hparams = cloud_env.apply_environment(hparams, os.environ)
    # --time_budget counts from this process's start: interpreter and TensorFlow imports too.
    # --time_budget: the model is chosen for the corpus and this machine where the run starts,
    # keeping every flag given here (trainer.choose).
    chooser = choose.ForBudget(explicitly_set()) if hparams.time_budget else None
    with xla.cache_damage_reported():
        result = runner.train(hparams, started=budget.process_start(), choose=chooser)
    print(runner.describe(result), flush=True)
    # 128 + the signal (143 SIGTERM, 130 SIGINT): a supervisor or shell sees that the job
    # stopped early (and may resume it).
    return EXIT_STATUS.get(result.stopped, 0)


def leave_garbage_to_exit() -> None:
    """At exit, freezes what is alive so the interpreter's final garbage collection passes over it:
    that collection walks everything TensorFlow traced (graphs, functions) and took 1.3-1.6 s
    after a 1-minute --time_budget run (2-core AMD EPYC), time its budget counts; 0.16 s frozen.
    The operating system frees the memory anyway; files, checkpoints and summaries are closed
    before main returns, and the other exit handlers (absl's logging) still run."""
    atexit.register(gc.freeze)


if __name__ == "__main__":
    leave_garbage_to_exit()
    app.run(main)
