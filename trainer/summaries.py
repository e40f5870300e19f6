"""TensorBoard output of a training run: scalars, text samples and the hyperparameters."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import tensorflow as tf
from tensorboard.plugins.hparams import api as hparams_api

from trainer import storage
from trainer.hparams import HParams
from trainer.model_fn import bits_per_token, perplexity


def bits_name_for(tokenizer: str) -> str:
    """bpc for char and byte models (what their papers report), bits per token for words."""
    return "bpc" if tokenizer in ("char", "byte") else "bits_per_token"


class Summaries:
    def __init__(self, summary_dir: str, tokenizer: str, write: bool = True) -> None:
        # write=False on non-chief workers, whose summaries would duplicate the chief's.
        self.writer = tf.summary.create_file_writer(summary_dir) if write else tf.summary.create_noop_writer()
        self.summary_dir = summary_dir
        self.bits_name = bits_name_for(tokenizer)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Summaries written in the block; a Cloud Storage fault uploading the event file is retried.
        Events are kept in the writer's local buffer and each upload sends the whole file, so a
        flush that failed loses nothing when a later one succeeds."""
        try:
            with self.writer.as_default():
                yield
        except tf.errors.OpError as err:
            if not storage.is_remote(self.summary_dir) or storage.kind(err) != "transient":
                raise
            storage.retry("writing summaries", self.summary_dir, self.writer.flush)

    def _losses(self, prefix: str, step: int, loss: float) -> None:
        tf.summary.scalar(f"{prefix}/loss", loss, step=step)
        tf.summary.scalar(f"{prefix}/perplexity", perplexity(loss), step=step)
        tf.summary.scalar(f"{prefix}/{self.bits_name}", bits_per_token(loss), step=step)

    def train(self, step: int, loss: float, learning_rate: float, grad_norm: float,
              tokens_per_second: float) -> None:
        with self._writing():
            self._losses("train", step, loss)
            tf.summary.scalar("train/learning_rate", learning_rate, step=step)
            tf.summary.scalar("train/grad_norm", grad_norm, step=step)
            tf.summary.scalar("train/tokens_per_second", tokens_per_second, step=step)

    def eval(self, step: int, loss: float, split: str = "eval", characters_per_token: float = 0.0) -> None:
        """Validation losses; also per character when the data counted its characters, so runs
        with different tokenizers share a TensorBoard axis."""
        with self._writing():
            self._losses(split, step, loss)
            if characters_per_token:
                tf.summary.scalar(f"{split}/loss_per_char", loss / characters_per_token, step=step)
                tf.summary.scalar(f"{split}/bits_per_char", bits_per_token(loss / characters_per_token),
                                  step=step)
        self.flush()

    def budget(self, spent: float, **values: float) -> None:
        """--time_budget's scalars, their step the seconds of the budget spent: that axis goes on
        across preemptions, so a resumed run's points continue an uninterrupted run's and the
        deadline stays at the budget (`seconds`, written when each run starts)."""
        with self.writer.as_default():
            for name, value in values.items():
                tf.summary.scalar(f"budget/{name}", value, step=int(spent))

    def sample(self, step: int, text: str) -> None:
        with self._writing():
            # Indented: TensorBoard renders text as Markdown, a code block keeps line breaks.
            tf.summary.text("sample", "\n".join("    " + line for line in text.split("\n")), step=step)
        self.flush()

    def hparams(self, hparams: HParams) -> None:
        values = {k: v for k, v in dataclasses.asdict(hparams).items()
                  if isinstance(v, bool | int | float | str)}
        with self._writing():
            hparams_api.hparams(values, trial_id=hparams.job_dir)

    def flush(self) -> None:
        storage.retry("writing summaries", self.summary_dir, self.writer.flush)

    def close(self) -> None:
        self.flush()
        self.writer.close()
