"""Starting weights for a new job: `--init_from JOB_DIR` (fine-tuning) and `--word2vec_embedding`.

Both only act when a job starts from scratch; a job dir with checkpoints resumes from its own.
`check` runs before the runner writes anything into the new job dir, so a mistake costs nothing;
`warm_start` then loads the weights into the freshly built model.

Fine-tuning needs the same vocabulary (token ids index the embedding and the softmax) and the
same model shape. New text is encoded with an old job's vocabulary by preprocessing it with
`--vocab_from JOB_DIR`; the error says so.
"""

from __future__ import annotations

import tensorflow as tf

from preprocessing import contract
from trainer import checkpoints, embeddings
from trainer.errors import UsageError
from trainer.hparams import HParams, shape_mismatches
from trainer.models.base import LanguageModel


def _source(hparams: HParams) -> tuple[HParams, contract.Metadata]:
    source = hparams.init_from
    saved, metadata = checkpoints.saved_hparams(source), checkpoints.saved_metadata(source)
    if saved is None or metadata is None:
        raise UsageError(f"--init_from={source}: not a job dir (no hparams.json / metadata.json); "
                         "give the --job-dir of a finished training run")
    return saved, metadata


def check(hparams: HParams, metadata: contract.Metadata) -> None:
    """Raises UsageError for any --init_from / --word2vec_embedding mistake (no I/O on success
    beyond reading the source job's small files)."""
    if hparams.init_from and hparams.word2vec_embedding:
        raise UsageError("--init_from and --word2vec_embedding both set the embedding; give one")
    if hparams.word2vec_embedding and hparams.language_model != "word":
        raise UsageError(f"--word2vec_embedding needs a word model; this data is "
                         f"{hparams.language_model}-level (preprocess with --tokenizer word)")
    if not hparams.init_from or tf.train.latest_checkpoint(hparams.job_dir) is not None:
        return  # a job dir with checkpoints resumes from its own weights
    saved, saved_metadata = _source(hparams)
    if saved_metadata.vocab != metadata.vocab:
        raise UsageError(
            f"--init_from={hparams.init_from}: its vocabulary ({saved_metadata.vocab_size} tokens) "
            f"differs from this data's ({metadata.vocab_size}); preprocess the new text with "
            f"--vocab_from {hparams.init_from} so it uses the old vocabulary")
    mismatches = shape_mismatches(saved, hparams)
    if mismatches:
        raise UsageError(f"--init_from={hparams.init_from} holds a model of another shape "
                         f"({'; '.join(mismatches)}); give the flags it was trained with")
    _source_checkpoint(hparams.init_from)


def _source_checkpoint(source: str) -> str:
    """The checkpoint --init_from starts from; the error names --init_from, not --job-dir."""
    path = checkpoints.latest_usable(source)
    if path is None:
        raise UsageError(f"--init_from={source}: no checkpoint there (hparams.json but no ckpt-N); "
                         "let that job save a checkpoint first or point --init_from at another job dir")
    return path


def warm_start(model: LanguageModel, hparams: HParams, metadata: contract.Metadata) -> list[str]:
    """Loads --init_from weights or --word2vec_embedding vectors into `model`; returns log lines."""
    check(hparams, metadata)
    lines = []
    if hparams.init_from:
        path = _source_checkpoint(hparams.init_from)
        checkpoints.restore_model(model, path)
        lines.append(f"--init_from: starting from the weights of {path} (fresh optimizer and step)")
    if hparams.word2vec_embedding:
        loaded = embeddings.initialize_embedding(model, hparams.word2vec_embedding, metadata.vocab)
        lines.append(loaded.report(hparams.word2vec_embedding))
    return lines
