"""Job dirs: resolving `%JOB%`, the files that make a job dir self-contained, and loading a model.

A job dir holds::

    hparams.json            the resolved hyperparameters of the latest run (atomic write)
    metadata.json           a copy of the data's metadata (vocabulary!), so the dir outlives the data
    ckpt-N.*, checkpoint    tf.train.CheckpointManager checkpoints (model, optimizer, step, epoch,
                            data position, carried state)
    best/ckpt-N.*           the checkpoint with the lowest validation loss so far
    samples/step-N.txt      generated text at each sample
    eval-SPLIT.json         results of trainer.evaluate

evaluate, babble, serve and export call `load_job(job_dir)` and need nothing else.
"""

from __future__ import annotations

import json
import os
import uuid

import tensorflow as tf

from preprocessing import contract
from trainer import data, optimizers, storage
from trainer.errors import UsageError, warn
from trainer.hparams import (
    ANY_VOCAB_SIZE,
    CHOSEN_KEY,
    HPARAMS_FILE,
    JOB_PLACEHOLDER,
    LANGUAGE_MODELS,
    HParams,
    resolve_job_dirs,
)
from trainer.models import build_model
from trainer.models.base import LanguageModel

METADATA_FILE = "metadata.json"
BEST_DIR = "best"
SAMPLES_DIR = "samples"


def join(directory: str, *names: str) -> str:
    return "/".join([directory.rstrip("/"), *names])


def write_atomic(path: str, text: str | bytes) -> None:
    """Writes `text` to `path` via a temporary name and a rename (local or gs://; Cloud Storage
    faults are retried, see trainer.storage)."""

    def write() -> None:
        parent = os.path.dirname(path)
        if parent:
            tf.io.gfile.makedirs(parent)
        temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with tf.io.gfile.GFile(temporary, "w" if isinstance(text, str) else "wb") as f:
            f.write(text)
        tf.io.gfile.rename(temporary, path, overwrite=True)

    storage.retry("writing", path, write)


def _read(path: str) -> str | None:
    def read() -> str | None:
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            return f.read()

    return storage.retry("reading", path, read)


def saved_hparams(job_dir: str) -> HParams | None:
    path = join(job_dir, HPARAMS_FILE)
    text = _read(path)
    return None if text is None else HParams.from_json(text, source=path)


def saved_chosen(job_dir: str) -> dict | None:
    """hparams.json's record of the model chosen for --time_budget (trainer.choose), if any."""
    text = _read(join(job_dir, HPARAMS_FILE))
    return None if text is None else json.loads(text).get(CHOSEN_KEY)


def saved_metadata(job_dir: str) -> contract.Metadata | None:
    path = join(job_dir, METADATA_FILE)
    text = _read(path)
    if text is None:
        return None
    return data.with_tokenizer_model(contract.metadata_from_json(text, source=path), path)


def save_metadata(job_dir: str, metadata: contract.Metadata) -> None:
    """The data's metadata into the job dir, its tokenizer file (if any) first and beside it,
    so the job dir explains itself and outlives the data."""
    if metadata.learned:
        write_atomic(join(job_dir, metadata.tokenizer_file), metadata.tokenizer_model)
    write_atomic(join(job_dir, METADATA_FILE), contract.metadata_to_json(metadata))


def resolve_hparams(hparams: HParams, metadata: contract.Metadata) -> HParams:
    """Fills language_model and vocab_size from the data (checking any given value), resolves
    `%JOB%` and defaults --summary_dir to JOB_DIR/tensorboard."""
    given = hparams.language_model
    if given is not None and given != metadata.tokenizer:
        raise UsageError(f"--language_model={given} but the data at --data_dir is "
                         f"{metadata.tokenizer}-level; drop --language_model or use "
                         f"--language_model={metadata.tokenizer}")
    if hparams.vocab_size and hparams.vocab_size != metadata.vocab_size:
        raise UsageError(f"--vocab_size={hparams.vocab_size} but the data's vocabulary has "
                         f"{metadata.vocab_size} tokens; drop --vocab_size")
    if not hparams.job_dir:
        raise UsageError("--job-dir is missing: give a directory for checkpoints, e.g. job/%JOB%")
    resolved = resolve_job_dirs(hparams.replace(language_model=metadata.tokenizer,
                                                vocab_size=metadata.vocab_size))
    if not resolved.summary_dir:
        resolved = resolved.replace(summary_dir=join(resolved.job_dir, "tensorboard"))
    return resolved


def resolve_job_dir(hparams: HParams) -> str:
    """The concrete job dir for loaders (evaluate, babble, serve, export).

    `%JOB%` is resolved from the shape flags and the language model: the data's when --data_dir
    is given (as training resolved it), else --language_model, else whichever of char, byte and
    word names a job dir that training wrote. A job dir outlives its data, so loaders must not
    need the data just to find it.
    """
    if not hparams.job_dir:
        raise UsageError("--job-dir is missing: give the job dir that training wrote")
    if JOB_PLACEHOLDER not in hparams.job_dir:
        return hparams.job_dir
    if hparams.data_dir:
        job_dir = resolve_hparams(hparams, data.read_metadata(hparams.data_dir, hparams.data_prefix)).job_dir
        if not _is_trained_job(job_dir):
            raise UsageError(f"--job-dir={job_dir}: no trained job there ({HPARAMS_FILE}); check the "
                             "shape flags (--layers, --lstm_state_size, ...) or give the concrete job dir")
        return job_dir
    return _find_trained_job(hparams)


def _job_dir_candidates(hparams: HParams) -> list[tuple[str, str]]:
    """(language model, job dir) for each language model `%JOB%` may stand for: the given
    --language_model, or all of them."""
    models = (hparams.language_model,) if hparams.language_model else LANGUAGE_MODELS
    candidates = []
    for lm in models:
        if lm in contract.SUBWORD_TOKENIZERS and not hparams.vocab_size:
            # The name holds the vocabulary size: any size that training wrote.
            pattern = resolve_job_dirs(hparams.replace(language_model=lm, vocab_size=ANY_VOCAB_SIZE)).job_dir
            candidates += [(lm, job_dir) for job_dir in sorted(tf.io.gfile.glob(pattern))]
        else:
            candidates.append((lm, resolve_job_dirs(hparams.replace(language_model=lm)).job_dir))
    return candidates


def _is_trained_job(job_dir: str) -> bool:
    return tf.io.gfile.exists(join(job_dir, HPARAMS_FILE))


def _find_trained_job(hparams: HParams) -> str:
    candidates = _job_dir_candidates(hparams)
    found = [(lm, job_dir) for lm, job_dir in candidates if _is_trained_job(job_dir)]
    if len(found) == 1:
        return found[0][1]
    if not found:
        tried = ", ".join(job_dir for _, job_dir in candidates)
        raise UsageError(f"--job-dir={hparams.job_dir}: no trained job ({HPARAMS_FILE}) at {tried}; "
                         "check the shape flags (--layers, --lstm_state_size, ...) and --data_prefix, "
                         "or give the concrete job dir")
    models = sorted({lm for lm, _ in found})
    choices = " or ".join(f"--language_model={lm}" for lm in models)
    if len(models) < len(found):  # learned vocabularies of several sizes
        choices += " with --vocab_size (or the concrete job dir)"
    raise UsageError(f"--job-dir={hparams.job_dir}: several trained jobs match "
                     f"({', '.join(job_dir for _, job_dir in found)}); give {choices}")


def latest_usable(directory: str) -> str | None:
    """The newest checkpoint in `directory` whose files read whole; None if there is none.

    A checkpoint cut short (a full disk, an interrupted copy) would otherwise stop every resume,
    evaluation and export with a traceback; the one before it costs only the steps since. Each
    damaged one passed over is a warning. UsageError if there are checkpoints but none reads.
    """
    damaged = []
    for path in _checkpoints_newest_first(directory):
        problem = _damage(path)
        if problem is None:
            return path
        warn(f"checkpoint {path} is damaged ({problem}); using the one before it")
        damaged.append(path)
    if damaged:
        raise UsageError(f"{directory}: every checkpoint is damaged ({', '.join(damaged)}); restore the "
                         "job dir from a copy, or delete its ckpt-* files and checkpoint to start over")
    return None


def _checkpoints_newest_first(directory: str) -> list[str]:
    """By the files themselves, not the `checkpoint` state file, which may be damaged too."""
    try:
        indexes = storage.retry("listing checkpoints", directory,
                                lambda: tf.io.gfile.glob(join(directory, "ckpt-*.index")))
    except tf.errors.NotFoundError:
        return []
    paths = [index.removesuffix(".index") for index in indexes]
    numbered = [(int(p.rsplit("-", 1)[1]), p) for p in paths if p.rsplit("-", 1)[1].isdigit()]
    return [path for _, path in sorted(numbered, reverse=True)]


def _damage(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be read whole, or None: every tensor is read, since a
    truncated data file passes the index. Only data that reads wrong is damage: a storage fault is
    retried, then a StorageError (trainer.storage), as is a permission error; neither may pass a
    good checkpoint over."""
    try:
        storage.retry("reading a checkpoint", path, lambda: _read_whole(path))
    except (tf.errors.OpError, IndexError, ValueError, RuntimeError) as err:
        if storage.kind(err) == "denied":
            raise storage.denied(path, "reading a checkpoint", err) from None
        return (str(getattr(err, "message", None) or err).strip().splitlines() or ["unreadable"])[0]
    return None


def _read_whole(path: str) -> None:
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)


def checkpoint_path(job_dir: str, best: bool = False) -> str:
    """The newest usable checkpoint of a job dir (or of its best/); UsageError if there is none."""
    directory = join(job_dir, BEST_DIR) if best else job_dir
    path = latest_usable(directory)
    if path is None:
        what = "best checkpoint (run with evaluation first)" if best else "checkpoint"
        raise UsageError(f"--job-dir={job_dir}: no {what} in {directory}; train first or fix --job-dir")
    return path


def load_job(job_dir: str, best: bool = False) -> tuple[HParams, contract.Metadata, LanguageModel]:
    """Restores a trained model from a concrete job dir, with its hyperparameters and metadata."""
    return load_job_at(job_dir, best)[:3]


def load_job_at(job_dir: str, best: bool = False) -> tuple[HParams, contract.Metadata, LanguageModel, str]:
    """`load_job`, and the path of the checkpoint it restored."""
    hparams = saved_hparams(job_dir)
    metadata = saved_metadata(job_dir)
    if hparams is None or metadata is None:
        raise UsageError(f"--job-dir={job_dir}: no {HPARAMS_FILE} / {METADATA_FILE} there; "
                         "point --job-dir at a directory trainer.task wrote")
    if hparams.cell == "transformer" and hparams.max_context > hparams.unroll_steps:
        context = hparams.max_context
        raise UsageError(f"--job-dir={job_dir}: its transformer attends {context} tokens back but trained "
                         f"on windows of {hparams.unroll_steps} (before verne required --max_context <= "
                         f"--unroll_steps); train it on with trainer.task --job-dir {job_dir} "
                         f"--max_context {context} --unroll_steps {context}, or train a new job")
    path = checkpoint_path(job_dir, best)
    model = build_model(hparams)
    restore_model(model, path)
    if hparams.optimizer == "ntasgd" and not best:
        # As awd-lstm-lm: once NT-ASGD has switched, the model is the average (best/ already
        # holds it; the regular checkpoints keep the raw weights for an exact resume).
        optimizers.restore_averaged(model, path)
    return hparams, metadata, model, path


MODEL_KEY = "model_variables"


def model_trackables(model: LanguageModel) -> dict[str, list[tf.Variable]]:
    """How a model lives in a checkpoint: its variables (weights and RNG states) in creation order.

    Not `model=model`: Keras 3 hides layers kept in Python lists (e.g. a stack of recurrent
    layers) from TensorFlow's checkpoint object graph, so their weights would silently be left
    out. The variable list of a model is fixed by its code and shape hyperparameters.
    """
    return {MODEL_KEY: list(model.variables)}


def restore_model(model: LanguageModel, path: str) -> None:
    """Loads only the model's variables from a training checkpoint (no optimizer slots)."""
    status = storage.retry("restoring a checkpoint", path,
                           lambda: tf.train.Checkpoint(**model_trackables(model)).read(path))
    status.expect_partial().assert_existing_objects_matched()
