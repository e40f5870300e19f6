"""The model registry: one short, explicit map from `--cell` to a model class.

Every model implements `trainer.models.base.LanguageModel`:

    model = build_model(hparams)                      # hparams.vocab_size already resolved
    state = model.initial_state(batch_size)           # nested structure of float32 tensors
    logits, state = model(tokens, state, training=b)  # tokens int32 [B, T] -> logits [B, T, V]

The state returned for one window is the state the next window starts from (stateful truncated
back-propagation in training, one token at a time in sampling), so every model, recurrent or
not, is driven the same way by the runner, evaluation and generation.
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from trainer.errors import UsageError
from trainer.hparams import HParams
from trainer.models.base import LanguageModel
from trainer.models.mlstm import MLSTMLM
from trainer.models.mogrifier import MogrifierLM
from trainer.models.qrnn import QRNNLM
from trainer.models.recurrent import RecurrentLM
from trainer.models.transformer import TransformerLM

# --cell -> constructor taking the (resolved) HParams. Add new models here, explicitly.
MODELS: dict[str, Callable[[HParams], LanguageModel]] = {
    "lstm": RecurrentLM,
    "gru": RecurrentLM,
    "rnn": RecurrentLM,
    "mlstm": MLSTMLM,
    "mogrifier": MogrifierLM,
    "qrnn": QRNNLM,
    "transformer": TransformerLM,
}


def build_model(hparams: HParams) -> LanguageModel:
    """The model for `hparams.cell`, with its variables created (ready to restore or train).

    Pure: no I/O. `hparams.vocab_size` must already come from the data's metadata.
    """
    if hparams.cell not in MODELS:
        raise UsageError(f"--cell={hparams.cell!r} is not available; choose one of {', '.join(MODELS)}")
    if hparams.vocab_size <= 0:
        raise ValueError("build_model needs hparams.vocab_size (resolve it from the data's metadata)")
    model = MODELS[hparams.cell](hparams)
    # One call on a single token creates every variable, so checkpoints restore eagerly and
    # optimizers can be built before the first step.
    model(tf.zeros([1, 1], tf.int32), model.initial_state(1))
    return model
