"""--precision=float16: dynamic loss scaling skips overflowing steps instead of diverging, grows
the scale back, and a float16 run trains end to end (on the CPU here; it is the GPU default).
--precision=bfloat16: a 300-step loss curve stays within 0.02 nats of float32's."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import kernels, loops, optimizers, runner
from trainer.hparams import HParams
from trainer.kernels import native
from trainer.model_fn import Params
from trainer.models import build_model


def test_loss_scale_halves_on_overflow_and_doubles_after_a_period() -> None:
    scale = optimizers.DynamicLossScale(initial=8.0, period=3)
    scale.update(tf.constant(False))
    assert (float(scale.scale), int(scale.skipped), int(scale.good_steps)) == (4.0, 1, 0)
    for _ in range(2):
        scale.update(tf.constant(True))
    assert (float(scale.scale), int(scale.good_steps)) == (4.0, 2)
    scale.update(tf.constant(True))
    assert (float(scale.scale), int(scale.good_steps), int(scale.skipped)) == (8.0, 0, 1)


def _tiny(precision: str, cell: str = "lstm") -> tuple[Params, keras.optimizers.Optimizer]:
    hparams = HParams(language_model="char", vocab_size=11, cell=cell, layers=2, lstm_state_size=16,
                      embedding_size=8, precision=precision, grad_clip=0.0).validate()
    keras.utils.set_random_seed(3)
    model = build_model(hparams)
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    return Params(hparams, model), optimizer


def _batch() -> tuple[tf.Tensor, tf.Tensor]:
    tokens = tf.random.stateless_uniform([4, 12], seed=[1, 2], maxval=11, dtype=tf.int32)
    return tokens, tf.roll(tokens, -1, axis=1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_an_overflowing_float16_step_is_skipped_and_a_scaled_one_matches_float32(cell: str) -> None:
    tokens, labels = _batch()
    strategy = tf.distribute.get_strategy()
    params, optimizer = _tiny("float16", cell)
    scale = optimizers.DynamicLossScale(initial=2.0 ** 40)  # gradients overflow float16 (max 65504)
    step = loops.make_train_step(params, optimizer, strategy, scale)
    before = [v.numpy() for v in params.model.trainable_variables]
    loss, norm, _ = step(tokens, labels, params.model.initial_state(4))
    assert np.isfinite(float(loss)) and not np.isfinite(float(norm))
    assert int(optimizer.iterations) == 0 and int(scale.skipped) == 1
    assert float(scale.scale) == 2.0 ** 39
    for old, new in zip(before, params.model.trainable_variables, strict=True):
        np.testing.assert_array_equal(old, new.numpy())

    # At a workable scale the update is the float32 one within float16 rounding.
    scale.scale.assign(2.0 ** 10)
    _, norm16, _ = step(tokens, labels, params.model.initial_state(4))
    assert int(optimizer.iterations) == 1 and int(scale.skipped) == 1
    reference, reference_optimizer = _tiny("float32", cell)
    _, norm32, _ = loops.make_train_step(reference, reference_optimizer, strategy)(
        tokens, labels, reference.model.initial_state(4))
    assert float(norm16) == pytest.approx(float(norm32), rel=2e-2)
    for a, b in zip(params.model.trainable_variables, reference.model.trainable_variables, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-3)


def test_float16_trains_end_to_end(tmp_path, make_data_dir) -> None:
    data_dir, _, _ = make_data_dir(tmp_path)
    hparams = HParams(data_dir=data_dir, data_prefix="tiny", job_dir=str(tmp_path / "job"), layers=1,
                      lstm_state_size=8, embedding_size=4, batch_size=4, unroll_steps=16, eval_every=0,
                      sample_every=0, sample_length=4, log_every=2, max_steps=4, precision="float16")
    result = runner.train(hparams)
    assert result.step == 4 and result.stopped == "finished"
    assert np.isfinite(result.train_loss)
    assert json.loads((tmp_path / "job" / "hparams.json").read_text())["precision"] == "float16"


def _loss_curve(precision: str, cell: str, steps: int = 300, vocab: int = 16, batch: int = 8,
                unroll: int = 16, jit_compile: bool = False) -> np.ndarray:
    """Per-step training losses of a tiny model (Adam) on a fixed, learnable token stream: each
    token follows from the previous one by a fixed rule 80% of the time, else is random.
    `jit_compile`: the step compiled by XLA, as --xla=step runs it."""
    hparams = HParams(language_model="char", vocab_size=vocab, cell=cell, layers=1, lstm_state_size=32,
                      embedding_size=8, batch_size=batch, unroll_steps=unroll, precision=precision,
                      d_model=32, heads=2, max_context=unroll).validate()
    keras.utils.set_random_seed(7)
    params = Params(hparams, build_model(hparams))
    step = loops.make_train_step(params, keras.optimizers.Adam(1e-2), tf.distribute.get_strategy(),
                                 jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    stream = np.zeros((batch, steps * unroll + 1), np.int32)
    stream[:, 0] = rng.integers(0, vocab, batch)
    for t in range(1, stream.shape[1]):
        follows = (stream[:, t - 1] * 5 + 3) % vocab
        stream[:, t] = np.where(rng.random(batch) < 0.8, follows, rng.integers(0, vocab, batch))
    state, losses = params.model.window_state(batch), []
    for i in range(steps):
        window = stream[:, i * unroll:(i + 1) * unroll + 1]
        loss, _, state = step(tf.constant(window[:, :-1]), tf.constant(window[:, 1:]), state)
        losses.append(float(loss))
    return np.array(losses)


@pytest.mark.parametrize("cell", ["lstm", "gru", "transformer"])
def test_bfloat16_loss_curve_stays_within_0_02_nats_of_float32(cell: str) -> None:
    # The whole bf16 recipe (bf16 matmuls around the recurrence, and inside the native op its
    # bf16 per-step products where the CPU has them), float32 master weights, state and sums.
    ran = f"native op, bf16 products on {native.bf16_isa()}" if kernels.use_native() else "TensorFlow kernels"
    fp32, bf16 = _loss_curve("float32", cell), _loss_curve("bfloat16", cell)
    learned = fp32[-20:].mean()
    assert learned < fp32[0] - 1.0, f"the tiny model did not learn: {fp32[0]:.3f} -> {learned:.3f}"
    worst = int(np.abs(bf16 - fp32).argmax())
    assert abs(bf16[worst] - fp32[worst]) <= 0.02, (ran, worst, fp32[worst], bf16[worst])
