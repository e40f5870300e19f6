"""Command-line surface: absl flags for every HParams field, the seed tools' aliases, and the
single conversion flags -> HParams. Entry points call `define_hparams_flags()` at import and
`hparams_from_flags()` in main; library code never touches FLAGS.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import flags

from trainer.errors import UsageError
from trainer.hparams import HParams

_HELP = {
    "data_dir": "Directory (local or gs://) holding the shards written by preprocessing.run.",
    "data_prefix": "The --data_prefix given to preprocessing.run.",
    "language_model": "char, byte, word, bpe or unigram; read from the data's metadata when not given.",
    "vocab_size": "Set from the data's metadata; giving it is an error if it disagrees.",
    "cell": "Model: lstm, gru, rnn, mlstm, mogrifier, qrnn or transformer.",
    "layers": "Number of stacked recurrent (or transformer) layers.",
    "lstm_state_size": "Hidden state size of each recurrent layer.",
    "embedding_size": "Size of the token embedding.",
    "layer_norm": "Layer-normalise the recurrent cells (lstm, gru, rnn; refused for the others).",
    "tie_embeddings": "Share the input embedding with the output projection.",
    "weight_norm": "Weight-normalise the mLSTM matrices (on by default for --cell=mlstm).",
    "mogrify_rounds": "Mogrifier rounds (0 reduces to an LSTM).",
    "mogrify_rank": "Low-rank factorisation of the Mogrifier matrices (0: full rank).",
    "attention_window": "Recurrent cells: one attention head over the top layer's last N outputs, "
                        "carried like the state (0: none). At high learning rates pair it with "
                        "--weight_decay=0.1, as --time_budget does: without it the head can spike.",
    "d_model": "Transformer width.",
    "heads": "Transformer attention heads.",
    "pos_encoding": "Transformer positional encoding: rotary (rotated queries and keys), learned "
                    "(relative distance bias), sinusoidal or none.",
    "max_context": "Transformer attention window: the tokens a query sees, itself included; at most "
                   "--unroll_steps, so sampling never reaches farther back than training windows did.",
    "dropout": "Dropout between layers and before the output.",
    "embed_dropout": "AWD embedding dropout (drops whole words).",
    "input_dropout": "AWD locked dropout on the embedded input.",
    "weight_drop": "AWD DropConnect on the hidden-to-hidden weights.",
    "ar_alpha": "AWD activation regularisation weight.",
    "tar_beta": "AWD temporal activation regularisation weight.",
    "batch_size": "Number of parallel token streams (global batch).",
    "unroll_steps": "Tokens per training window (truncated back-propagation length).",
    "epochs": "Passes over the training split.",
    "max_steps": "Stop after this many global steps (0: as many as --epochs take).",
    "learning_rate": "Peak learning rate.",
    "optimizer": "adam, rmsprop, sgd or ntasgd.",
    "lr_schedule": "constant, linear (decay to 0) or cosine. Default: linear for --cell=mlstm "
                   "(as its seed), constant otherwise.",
    "warmup_steps": "Linear warm-up steps before the schedule.",
    "min_learning_rate": "Where --lr_schedule linear or cosine ends (0: at zero).",
    "time_budget": "Wall clock for the whole run, e.g. 90s, 10m, 1h30m: training stops in time for the "
                   "final evaluation, checkpoint, sample and export, and the learning rate decays "
                   "(--lr_schedule, cosine unless given) to --min_learning_rate at that point. A "
                   "resumed job keeps the time it had left. Replaces --epochs and --max_steps. The "
                   "model's shape is chosen for the corpus and the machine (trainer/choose.py); "
                   "shape flags given beside it are kept.",
    "adam_beta2": "Adam's second-moment decay (0.99 for short runs, as a small GPT's recipe).",
    "weight_decay": "Decoupled weight decay (AdamW) on weight matrices and embeddings, not on "
                    "biases or layer-norm scales (0: plain Adam).",
    "state_reset_windows": "Each stream restarts from a zero state every N windows (staggered), so "
                           "the model also learns to write from a cold start (0: carry the whole epoch).",
    "grad_clip": "Clip the global gradient norm to this (0: off).",
    "seed": "Random seed for initialisation, dropout and sampling.",
    "precision": "auto, float32, bfloat16 or float16 (16-bit matmuls; fp32 state and weights; float16 "
                 "adds dynamic loss scaling). auto: lstm/gru/rnn use bfloat16 on a TPU, float16 on a "
                 "GPU, bfloat16 on a CPU with AVX512_BF16 or AMX, else float32; the transformer too "
                 "(under --xla step with verne's own bfloat16 matmul; VERNE_XLA_BF16_MATMUL=0: float32 "
                 "there). mlstm, mogrifier and qrnn always compute in "
                 "float32.",
    "xla": "How the training step is compiled: auto, off, step (the whole step by XLA) or fusion "
           "(XLA fuses the elementwise ops between TensorFlow's matmuls); auto: the transformer on a "
           "CPU, step when small, fusion when large; off otherwise.",
    "batch_splits": "The batch as this many equal slices that the training step runs forward and "
                    "backward side by side (their losses averaged), which XLA's CPU runtime runs on "
                    "separate cores at once. 0: auto (2 for the transformer on a CPU, where --xla resolves "
                    "to step or fusion; else 1).",
    "steps_per_execution": "Training windows run per compiled call (1: one; more saves a TPU "
                           "the host round trip between steps). "
                           "Evaluation, checkpoints and samples still happen at their exact steps.",
    "init_from": "Job dir whose weights start this run (fine-tuning; same vocabulary).",
    "word2vec_embedding": "word2vec/GloVe file to initialise a word model's embedding.",
    "freeze_embedding": "Keep the embedding fixed during training.",
    "job_dir": "Where checkpoints go; %JOB% becomes a name built from the model's shape.",
    "summary_dir": "TensorBoard directory; %JOB% as in --job-dir. Default: JOB_DIR/tensorboard.",
    "save_checkpoints_steps": "Checkpoint every N steps (0: only at the end and on SIGTERM/Ctrl-C).",
    "keep_checkpoint_max": "Checkpoints kept (the best one is kept apart in best/).",
    "eval_every": "Evaluate on the validation split every N steps.",
    "eval_steps": "Validation windows per evaluation (0: the whole split).",
    "log_every": "Log and write train summaries every N steps.",
    "sample_every": "Write a generated sample every N steps (0: only at the end).",
    "sample_length": "Tokens per periodic sample.",
}

# Names used by the seed tools, so their users can switch without relearning.
ALIASES = {
    "job-dir": "job_dir",
    "rnn_size": "lstm_state_size",
    "num_layers": "layers",
    "model": "cell",
    "seq_length": "unroll_steps",
    "num_epochs": "epochs",
    "save_every": "save_checkpoints_steps",
    "print_every": "log_every",
    "init_lr": "learning_rate",
    "summary_frequency": "log_every",
    "sampling_frequency": "sample_every",
    "num_chars": "sample_length",
}
# Seed flags whose meaning differs enough to need a conversion rather than an alias.
_CONVERTED = {
    "decay_rate": "char-rnn's per-epoch exponential decay; verne maps any value < 1 to --lr_schedule=cosine",
    "lr_decay": "Tensorflow_mLSTM's switch for linear decay to zero (--lr_schedule=linear)",
}


def define_hparams_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines one flag per HParams field plus the aliases. Safe to call twice.

    `flag_values` lets trainer.submit parse the trainer's arguments apart from its own flags.
    """
    if "cell" in flag_values:
        return
    for field in dataclasses.fields(HParams):
        _define(field.name, field.default, _HELP.get(field.name, field.name), flag_values)
    for alias, target in ALIASES.items():
        flags.DEFINE_alias(alias, target, flag_values=flag_values)
    flags.DEFINE_float("decay_rate", None, _CONVERTED["decay_rate"], flag_values=flag_values)
    flags.DEFINE_boolean("lr_decay", None, _CONVERTED["lr_decay"], flag_values=flag_values)


def _define(name: str, default: Any, help_text: str, flag_values: flags.FlagValues) -> None:
    if isinstance(default, bool):
        flags.DEFINE_boolean(name, default, help_text, flag_values=flag_values)
    elif isinstance(default, int):
        flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif isinstance(default, float):
        flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    else:
        flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def hparams_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> HParams:
    """The one place flags become hyperparameters. Raises ValueError naming a bad flag."""
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(HParams)}
    if values["language_model"] == "":
        values["language_model"] = None
    if values["cell"] == "mlstm":
        # The mLSTM seed weight-normalises and decays the learning rate linearly to zero by
        # default; resolving both here keeps hparams.json (and, for weight norm, %JOB%) true to
        # the run. `--noweight_norm`, `--lr_schedule` or the seed's `--nolr_decay` override them.
        if not flag_values["weight_norm"].present:
            values["weight_norm"] = True
        if not flag_values["lr_schedule"].present:
            values["lr_schedule"] = "constant" if flag_values["lr_decay"].value is False else "linear"
    if flag_values["lr_decay"].value:
        values["lr_schedule"] = "linear"
    decay = flag_values["decay_rate"].value
    if decay is not None and decay < 1.0:
        values["lr_schedule"] = "cosine"
    if values["time_budget"]:
        if flag_values["epochs"].present or flag_values["num_epochs"].present:
            raise ValueError(f"--epochs={values['epochs']}: --time_budget={values['time_budget']} "
                             "decides when training stops; drop one of them")
        # Decay to the end is what a budgeted run wants; an explicit --lr_schedule still wins.
        if values["lr_schedule"] == "constant" and not (
                flag_values["lr_schedule"].present or flag_values["lr_decay"].present
                or flag_values["decay_rate"].present):
            values["lr_schedule"] = "cosine"
    # --precision=auto stays unresolved here: pipelines.run and trainer.submit build hparams on a
    # machine other than the one that trains; runner.prepare_job resolves it where training runs.
    return HParams(**values).validate()


def explicitly_set(flag_values: flags.FlagValues = flags.FLAGS) -> set[str]:
    """HParams fields the user gave on the command line (aliases count for their target)."""
    names = {f.name for f in dataclasses.fields(HParams)}
    given = {name for name in names if flag_values[name].present}
    given |= {target for alias, target in ALIASES.items() if flag_values[alias].present}
    return given


def hparams_from_command_line(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> HParams:
    """For entry points' `main(argv)`: the HParams of the parsed flags, with stray positional
    arguments and out-of-range values reported as one-line UsageErrors."""
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}; every option is a --flag")
    try:
        return hparams_from_flags(flag_values)
    except ValueError as err:
        raise UsageError(str(err)) from None


def define_best_flag() -> None:
    """`--best`, shared by evaluate, babble, export and serve (one process may import several)."""
    if "best" not in flags.FLAGS:
        flags.DEFINE_boolean("best", False, "Use the best checkpoint (JOB_DIR/best, lowest validation "
                             "loss) instead of the latest.")
