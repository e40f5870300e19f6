"""`python -m trainer.task`: train (or resume) a language model. Thin: flags -> HParams -> runner."""

from __future__ import annotations

import os

from absl import app

from trainer import cloud_env, runner
from trainer.errors import run_cli
from trainer.flags import define_hparams_flags, hparams_from_command_line

define_hparams_flags()


@run_cli
def main(argv: list[str]) -> int:
    hparams = hparams_from_command_line(argv)
    # On Vertex AI: AIP_* dirs fill what the flags left empty; tuning trials get their own dir.
    hparams = cloud_env.apply_environment(hparams, os.environ)
    result = runner.train(hparams)
    print(runner.describe(result), flush=True)
    # 143 = 128 + SIGTERM: a supervisor sees that the job stopped early (and will resume it).
    return 143 if result.stopped == "terminated" else 0


if __name__ == "__main__":
    app.run(main)
