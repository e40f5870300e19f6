"""The model registry: one short, explicit map from `--cell` to a model class.

Every model implements `trainer.models.base.LanguageModel`:

    model = build_model(hparams)                      # hparams.vocab_size already resolved
    state = model.initial_state(batch_size)           # nested structure of float32 tensors
    logits, state = model(tokens, state, training=b)  # tokens int32 [B, T] -> logits [B, T, V]

The state returned for one window is the state the next window starts from (stateful truncated
back-propagation in training, one token at a time in sampling), so every model, recurrent or
not, is driven the same way by the runner, evaluation and generation.
"""
