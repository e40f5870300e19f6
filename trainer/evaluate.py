"""`python -m trainer.evaluate --job-dir DIR [--split valid|test] [--best] [--eval_steps N]
[--batch_size B] [--unroll_steps T]`.

Loss (nats/token), perplexity and bits per token over a whole split (or its first N windows),
and the loss and bits per character (data preprocessed by this version records each split's
characters), so a char, word and subword model of the same text compare; with the same stateful
windows as training: the split cut into parallel streams, the state carried from window to
window. The job's --batch_size and --unroll_steps shape the windows unless given (a small split
gets fewer streams). Printed, written to `JOB_DIR/eval-SPLIT[-best].json` and to
TensorBoard.
`--job-dir` may hold `%JOB%` (resolved from the other flags and the data, as in training) or name
a concrete job dir (its hparams.json supplies the rest). `--data_dir` overrides the data location
saved in the job dir, for data that moved. `--cache_pointer [--theta --lambda --window]` also
reports the loss with the continuous cache pointer (trainer.cache_pointer, docs/models.md).
"""

from __future__ import annotations

import json

import tensorflow as tf
from absl import app, flags

from preprocessing import contract
from trainer import cache_pointer, checkpoints, data, errors, loops, runner, xla
from trainer.errors import UsageError, run_cli
from trainer.flags import define_best_flag, define_hparams_flags, explicitly_set, hparams_from_command_line
from trainer.hparams import HParams
from trainer.model_fn import Params, bits_per_token, perplexity
from trainer.summaries import Summaries, bits_name_for


def evaluate(job_dir: str, split: str = "valid", best: bool = False, eval_steps: int = 0,
             data_dir: str | None = None, batch_size: int | None = None,
             unroll_steps: int | None = None, write: bool = True,
             pointer: cache_pointer.PointerConfig | None = None) -> dict[str, object]:
    """Evaluates the job's latest (or best) checkpoint on `split`; returns the metrics.

    eval_steps 0 means the whole split. The result is also written as JSON into the job dir
    and as TensorBoard scalars `SPLIT/...` at the checkpoint's step, unless `write` is false.
    """
    if split not in contract.SPLITS:
        raise UsageError(f"--split={split}: choose one of {', '.join(contract.SPLITS)}")
    hparams, metadata, model, path = checkpoints.load_job_at(job_dir, best=best)
    hparams = hparams.replace(data_dir=data_dir or hparams.data_dir,
                              batch_size=batch_size or hparams.batch_size,
                              unroll_steps=unroll_steps or hparams.unroll_steps)
    _check_same_vocabulary(hparams, metadata)
    layout = runner.eval_layout(metadata.splits[split].tokens, hparams, split)
    dataset = data.windows(data.shard_files(hparams.data_dir, hparams.data_prefix, split), layout)
    if eval_steps > 0:
        dataset = dataset.take(eval_steps)
    strategy = tf.distribute.get_strategy()
    params = Params(hparams, model)
    state = loops.initial_state(params, strategy, layout.batch_size)
    with data.reading_shards(hparams.data_dir, hparams.data_prefix):
        compiled = xla.resolve(hparams, strategy.num_replicas_in_sync).xla == "step"
        eval_step = loops.make_eval_step(params, strategy, jit_compile=compiled)
        nats, tokens, windows = loops.run_eval(eval_step, dataset, state)
    loss = nats / tokens
    step = int(path.rsplit("-", 1)[-1])
    result: dict[str, object] = {
        "split": split, "loss": loss, "perplexity": perplexity(loss),
        bits_name_for(metadata.tokenizer): bits_per_token(loss),
        "tokens": int(tokens), "windows": windows, "batch_size": layout.batch_size,
        "unroll_steps": layout.unroll_steps, "checkpoint": path, "step": step,
    }
    result.update(per_character(loss, int(tokens), metadata.splits[split]))
    if pointer is not None:
        result.update(_pointer_metrics(model, dataset, layout.batch_size, pointer))
    if write:
        _write_result(job_dir, split, best, result, hparams, metadata, step, loss)
    return result


def _write_result(job_dir: str, split: str, best: bool, result: dict[str, object], hparams: HParams,
                  metadata: contract.Metadata, step: int, loss: float) -> None:
    with errors.writing(f"--job-dir={job_dir}"):
        name = f"eval-{split}{'-best' if best else ''}.json"
        checkpoints.write_atomic(checkpoints.join(job_dir, name), json.dumps(result, indent=1) + "\n")
        summaries = Summaries(hparams.summary_dir or checkpoints.join(job_dir, "tensorboard"),
                              metadata.tokenizer)
        summaries.eval(step, loss, split=f"{split}{'_best' if best else ''}",
                       characters_per_token=metadata.splits[split].characters_per_token)
        summaries.close()


def per_character(loss: float, tokens: int, stats: contract.SplitStats) -> dict[str, float]:
    """Loss per character, so models with different tokenizers compare on the same text.

    The evaluated tokens cover `tokens` × the split's characters per token (whole-split
    evaluation leaves out only the remainder of the last window). Nothing for data
    preprocessed before character counts were recorded.
    """
    if not stats.characters_per_token:
        return {}
    characters = tokens * stats.characters_per_token
    per_char = loss / stats.characters_per_token
    return {"characters": round(characters), "loss_per_char": per_char,
            "bits_per_char": bits_per_token(per_char)}


def _pointer_metrics(model: object, dataset: tf.data.Dataset, batch: int,
                     config: cache_pointer.PointerConfig) -> dict[str, object]:
    """The same split again with the continuous cache pointer (see trainer.cache_pointer)."""
    _, nats, tokens = cache_pointer.run_pointer_eval(model, dataset, batch, config)
    loss = nats / tokens
    return {"pointer_loss": loss, "pointer_perplexity": perplexity(loss),
            "pointer_theta": config.theta, "pointer_lambda": config.lambdah,
            "pointer_window": config.window}


def _check_same_vocabulary(hparams: HParams, metadata: contract.Metadata) -> None:
    current = data.read_metadata(hparams.data_dir, hparams.data_prefix)
    if current.vocab != metadata.vocab:
        raise UsageError(f"--data_dir={hparams.data_dir}: its vocabulary differs from the one the "
                         "job was trained with; point --data_dir at the job's data")


def describe(result: dict[str, object]) -> str:
    bits = next(k for k in ("bpc", "bits_per_token") if k in result)
    line = (f"{result['split']}: loss {result['loss']:.4f} nats/token, perplexity "
            f"{result['perplexity']:.3f}, {bits} {result[bits]:.4f} over {result['tokens']:,} tokens "
            f"({result['checkpoint']})")
    if "loss_per_char" in result:
        line += (f"\n{result['split']} per character: loss {result['loss_per_char']:.4f} nats/char, "
                 f"{result['bits_per_char']:.4f} bits/char over {result['characters']:,} characters")
    if "pointer_loss" in result:
        line += (f"\n{result['split']} with the cache pointer: loss {result['pointer_loss']:.4f} "
                 f"nats/token, perplexity {result['pointer_perplexity']:.3f}")
    return line


def _define_flags() -> None:
    define_hparams_flags()
    if "split" not in flags.FLAGS:
        flags.DEFINE_enum("split", "valid", list(contract.SPLITS), "Split to evaluate.")
    define_best_flag()
    if "cache_pointer" not in flags.FLAGS:
        flags.DEFINE_boolean("cache_pointer", False, "Also report the loss with the continuous "
                             "cache pointer (Grave et al. 2016; meant for word models).")
        flags.DEFINE_float("theta", cache_pointer.DEFAULT_THETA, "Cache pointer: attention sharpness.")
        flags.DEFINE_float("lambda", cache_pointer.DEFAULT_LAMBDA, "Cache pointer: mixture weight.")
        flags.DEFINE_integer("window", cache_pointer.DEFAULT_WINDOW, "Cache pointer: positions remembered.")


_define_flags()


@run_cli
def main(argv: list[str]) -> None:
    hparams = hparams_from_command_line(argv)
    job_dir = checkpoints.resolve_job_dir(hparams)
    given = explicitly_set()
    result = evaluate(job_dir, split=flags.FLAGS.split, best=flags.FLAGS.best,
                      eval_steps=hparams.eval_steps,
                      data_dir=hparams.data_dir if "data_dir" in given else None,
                      batch_size=hparams.batch_size if "batch_size" in given else None,
                      unroll_steps=hparams.unroll_steps if "unroll_steps" in given else None,
                      pointer=_pointer_from_flags())
    print(describe(result), flush=True)


def _pointer_from_flags() -> cache_pointer.PointerConfig | None:
    if not flags.FLAGS.cache_pointer:
        return None
    config = cache_pointer.PointerConfig(theta=flags.FLAGS.theta, lambdah=flags.FLAGS["lambda"].value,
                                         window=flags.FLAGS.window)
    try:
        return config.validate()
    except ValueError as err:
        raise UsageError(str(err)) from None


if __name__ == "__main__":
    app.run(main)
