"""`python -m trainer.babble`: generate text from a trained job, streamed to stdout.

    python -m trainer.babble --job-dir job/%JOB% --data_prefix jules \\
        --layers 2 --lstm_state_size 50 --prime 'The ' --length 400 --temperature 0.8 --seed 7

`%JOB%` resolves from the shape flags and the language model: the data's with --data_dir (as in
training), else --language_model, else whichever language model names a trained job dir (see
`checkpoints.resolve_job_dir`); or `--job-dir` names a concrete job dir and its saved
hparams.json fills in the rest. Sampling:
`--sample_mode` 0 argmax / 1 sample / 2 sample at word boundaries (char-rnn-tensorflow's
`--sample`), `--temperature` (0: argmax), `--top_k`, `--top_p`, `--seed`, `--num_samples`
(generated together as one batch, so they print when the batch is done; a single sample
streams), `--best` (the best checkpoint by validation loss). `babble | head` ends quietly.

`generate_from_job` is the same thing as a library call (the pipeline's sample step uses it).
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from absl import app, flags, logging

from trainer import checkpoints, kernels
from trainer.errors import UsageError, run_cli
from trainer.flags import define_best_flag, define_hparams_flags, hparams_from_command_line
from trainer.sampling import SamplingOptions, TextGenerator

MAX_SAMPLES = 1024
# Lengths travel as int32 tensors into the compiled loop.
MAX_LENGTH = 2**31 - 1


def load_text_generator(job_dir: str, best: bool = False) -> TextGenerator:
    _, metadata, model = checkpoints.load_job(job_dir, best=best)
    return TextGenerator(model, metadata)


def generate_from_job(job_dir: str, prime: str = "", length: int = 200, num_samples: int = 1,
                      temperature: float = 1.0, sample_mode: int = 1, top_k: int = 0,
                      top_p: float = 1.0, seed: int = 1, no_unk: bool = False,
                      best: bool = False) -> list[str]:
    """`num_samples` texts from the model in a concrete job dir, each the prime followed by
    `length` generated tokens. Same arguments, same texts."""
    options = sampling_options(temperature=temperature, sample_mode=sample_mode, top_k=top_k,
                               top_p=top_p, seed=seed, no_unk=no_unk)
    check_counts(length, num_samples)
    generator = load_text_generator(job_dir, best)
    return generator.generate(prime, length, options, num_samples)


def sampling_options(**values: object) -> SamplingOptions:
    """Validated SamplingOptions; a value out of range is a UsageError naming its flag."""
    try:
        return SamplingOptions(**values).validate()
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_counts(length: int, num_samples: int, length_flag: str = "--length") -> None:
    """Generated length and sample count within what the compiled loop takes; the errors name
    `length_flag` (the pipeline calls it --generate_length)."""
    if not 1 <= length <= MAX_LENGTH:
        raise UsageError(f"{length_flag}={length}: must be in [1, {MAX_LENGTH}]")
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise UsageError(f"--num_samples={num_samples}: must be in [1, {MAX_SAMPLES}]")


def write_samples(generator: TextGenerator, prime: str, length: int, options: SamplingOptions,
                  num_samples: int, out: TextIO) -> None:
    """One sample streams as it is generated; several (one batch) print one after another."""
    if num_samples == 1:
        for (piece,) in generator.stream(prime, length, options):
            out.write(piece)
            out.flush()
        out.write("\n")
        return
    for i, text in enumerate(generator.generate(prime, length, options, num_samples)):
        out.write(f"{'' if i == 0 else chr(10)}----- sample {i + 1} -----\n{text}\n")
    out.flush()


def define_flags() -> None:
    """babble's flags: the hyperparameter flags plus sampling. Idempotent."""
    if "prime" in flags.FLAGS:
        return
    define_hparams_flags()
    flags.DEFINE_string("prime", "", "Text the samples start from (empty: a new paragraph).")
    flags.DEFINE_integer("length", 500, "Tokens to generate per sample (characters, bytes or words).")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 takes the most likely token.")
    flags.DEFINE_integer("sample_mode", 1, "0: argmax each step, 1: sample each step, "
                         "2: sample only at word boundaries, argmax inside words.")
    flags.DEFINE_integer("top_k", 0, "Sample only among the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Sample only from the smallest set of tokens with this much "
                       "probability (nucleus sampling; 1: all).")
    flags.DEFINE_integer("num_samples", 1, "Independent samples, generated together as one batch: "
                         "one sample streams as it is written, several print when the batch is done.")
    define_best_flag()
    flags.DEFINE_boolean("no_unk", False, "Never generate <unk> (word models).")
    # char-rnn-tensorflow's sample.py names.
    flags.DEFINE_alias("n", "length")
    flags.DEFINE_alias("sample", "sample_mode")


@run_cli
def main(argv: list[str]) -> int:
    hparams = hparams_from_command_line(argv)
    print(kernels.describe_runtime(portable=True), file=sys.stderr, flush=True)
    flag = flags.FLAGS
    options = sampling_options(temperature=flag.temperature, sample_mode=flag.sample_mode,
                               top_k=flag.top_k, top_p=flag.top_p, seed=flag.seed, no_unk=flag.no_unk)
    check_counts(flag.length, flag.num_samples)
    generator = load_text_generator(checkpoints.resolve_job_dir(hparams), flag.best)
    unknown = generator.encode_prime(flag.prime).unknown
    if unknown:
        fate = "<unk>" if generator.tokenizer.unk_id is not None else "nothing (no <unk> in the vocabulary)"
        logging.warning("--prime: %d piece(s) not in the vocabulary became %s: %s",
                        len(unknown), fate, ", ".join(repr(p) for p in sorted(set(unknown))[:10]))
    try:
        write_samples(generator, flag.prime, flag.length, options, flag.num_samples, sys.stdout)
    except BrokenPipeError:
        _stdout_closed()
    return 0


def _stdout_closed() -> None:
    """The reader went away (`babble | head`): stop quietly, as command-line tools do.

    stdout is pointed at /dev/null first, so the interpreter's flush at exit does not raise again
    (what the Python docs advise for SIGPIPE); the exit status is 1 like theirs.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
