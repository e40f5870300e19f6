"""verne's causal attention op (trainer/kernels/native_attention.cc): what the transformer's
training and evaluation windows run under --precision bfloat16 outside a compiled step."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

from trainer import kernels
from trainer.hparams import HParams
from trainer.kernels import native
from trainer.model_fn import Mode, Params, model_fn
from trainer.models import build_model

pytestmark = pytest.mark.skipif(
    os.environ.get(native.ENV_SWITCH) == "0" or not native.available() or native.bf16_isa() == "none",
    reason="needs the native library on a CPU with bfloat16 dot products")


def _rounded(x: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.cast(x, tf.bfloat16), tf.float32)


def _reference(q: tf.Tensor, k: tf.Tensor, v: tf.Tensor, window: int) -> tf.Tensor:
    """softmax(q kᵀ + causal window mask) v in float32 on [B, T, H, D]."""
    steps = q.shape[1]
    distance = np.arange(steps)[:, None] - np.arange(steps)[None]
    mask = np.where((distance >= 0) & (distance < window), 0.0, -1e9).astype(np.float32)
    heads_first = [tf.transpose(t, [0, 2, 1, 3]) for t in (q, k, v)]
    weights = tf.nn.softmax(tf.matmul(heads_first[0], heads_first[1], transpose_b=True) + mask, axis=-1)
    return tf.transpose(tf.matmul(weights, heads_first[2]), [0, 2, 1, 3])


@pytest.mark.parametrize("batch,steps,heads,depth,window", [
    (2, 64, 3, 32, 64),    # one query block
    (1, 256, 2, 64, 256),  # gpt-small's head: four blocks, the causal skip
    (1, 128, 2, 16, 40),   # a sliding window shorter than the window of tokens
    (2, 80, 1, 32, 80),    # a last block of 16 queries
])
def test_the_op_and_its_gradients_equal_softmax_attention(batch: int, steps: int, heads: int, depth: int,
                                                          window: int) -> None:
    rng = np.random.default_rng(0)
    q, k, v, d_o = (rng.standard_normal((batch, steps, heads, depth)).astype(np.float32) for _ in range(4))
    q /= np.sqrt(depth)
    q, k, v = (tf.constant(t) for t in (q, k, v))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([q, k, v])
        ours = native.causal_attention_native(q, k, v, window)
        # The op's products take bfloat16 inputs: the reference gets the same rounded inputs.
        reference = _reference(_rounded(q), _rounded(k), _rounded(v), window)
        ours_loss, reference_loss = tf.reduce_sum(ours * d_o), tf.reduce_sum(reference * d_o)
    assert ours.shape == (batch, steps, heads, depth)

    def relative(a: tf.Tensor, b: tf.Tensor) -> float:
        return float(tf.reduce_max(tf.abs(a - b)) / tf.reduce_max(tf.abs(b)))

    # The op also rounds probabilities and logit gradients to bfloat16 for its second products:
    # measured 0.2-0.5% of the largest value here.
    assert relative(ours, reference) < 0.01
    ours_grads = tape.gradient(ours_loss, [q, k, v])
    for name, a, b in zip("qkv", ours_grads, tape.gradient(reference_loss, [q, k, v]), strict=True):
        assert relative(a, b) < 0.015, name


def test_no_query_reads_a_key_after_it_or_window_or_more_before_it() -> None:
    rng = np.random.default_rng(1)
    steps, window, query = 128, 40, 70
    q, k, v = (rng.standard_normal((1, steps, 2, 16)).astype(np.float32) for _ in range(3))
    before = native.causal_attention_native(q, k, v, window).numpy()
    for unseen in (query + 1, steps - 1, query - window, 0):
        k2, v2 = k.copy(), v.copy()
        k2[:, unseen], v2[:, unseen] = 50.0, -50.0
        after = native.causal_attention_native(q, k2, v2, window).numpy()
        assert np.array_equal(after[:, query], before[:, query]), unseen
    seen = query - window + 1
    k2 = k.copy()
    k2[:, seen] = 50.0
    changed = native.causal_attention_native(q, k2, v, window).numpy()
    assert not np.array_equal(changed[:, query], before[:, query])


def _transformer(pos_encoding: str) -> Params:
    hparams = HParams(language_model="char", vocab_size=20, cell="transformer", layers=2, d_model=64, heads=2,
                      batch_size=4, unroll_steps=32, max_context=32, precision="bfloat16",
                      pos_encoding=pos_encoding).validate()
    tf.keras.utils.set_random_seed(3)
    return Params(hparams, build_model(hparams))


def _op_types(run: object, tokens: tf.Tensor, labels: tf.Tensor) -> set[str]:
    return {op.type for op in run.get_concrete_function(tokens, labels).graph.get_operations()}


def _loss_and_grads(params: Params, tokens: tf.Tensor, labels: tf.Tensor) -> tuple[object, float, list]:
    @tf.function
    def run(tokens: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, list]:
        with tf.GradientTape() as tape:
            loss = model_fn({"tokens": tokens, "state": ()}, labels, Mode.TRAIN, params).loss
        return loss, tape.gradient(loss, params.model.trainable_variables)

    loss, grads = run(tokens, labels)
    return run, float(loss), grads


def test_the_transformer_runs_it_in_bfloat16_and_learns_what_tensorflows_attention_gives() -> None:
    rng = np.random.default_rng(2)
    tokens, labels = (tf.constant(rng.integers(0, 20, (4, 32)), tf.int32) for _ in range(2))
    params = _transformer("rotary")
    run, loss, grads = _loss_and_grads(params, tokens, labels)
    assert {"VerneCausalAttention", "VerneCausalAttentionGrad"} <= _op_types(run, tokens, labels)
    with kernels.portable():  # TensorFlow's own ops: the batched products and softmax
        portable_run, portable_loss, portable_grads = _loss_and_grads(params, tokens, labels)
    assert "VerneCausalAttention" not in _op_types(portable_run, tokens, labels)
    assert abs(loss - portable_loss) < 2e-3, (loss, portable_loss)
    for ours, theirs in zip(grads, portable_grads, strict=True):
        ours, theirs = tf.convert_to_tensor(ours), tf.convert_to_tensor(theirs)
        assert float(tf.norm(ours - theirs) / tf.norm(theirs)) < 0.03


def test_learned_distance_bias_keeps_tensorflows_attention() -> None:
    # The op's mask is the causal window alone; `learned` adds a bias per head and distance.
    rng = np.random.default_rng(2)
    tokens, labels = (tf.constant(rng.integers(0, 20, (4, 32)), tf.int32) for _ in range(2))
    run, _, _ = _loss_and_grads(_transformer("learned"), tokens, labels)
    assert "VerneCausalAttention" not in _op_types(run, tokens, labels)
