"""The continuous cache pointer against a direct per-position computation (pointer.py's loop)."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from trainer.cache_pointer import PointerConfig, empty_memory, pointer_log_probs, run_pointer_eval
from trainer.hparams import HParams
from trainer.models import build_model

B, T, V, H = 2, 7, 6, 4


def _window(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return (log_probs.astype(np.float32), rng.normal(size=(B, T, H)).astype(np.float32),
            rng.integers(0, V, size=(B, T)).astype(np.int32))


def _direct(log_probs: np.ndarray, hidden: np.ndarray, targets: np.ndarray, theta: float, lam: float,
            window: int) -> np.ndarray:
    """pointer.py's per-position loop over one stream history (no window boundaries)."""
    out = np.zeros(targets.shape)
    for b in range(targets.shape[0]):
        for t in range(targets.shape[1]):
            p_model = math.exp(log_probs[b, t, targets[b, t]])
            lo = max(0, t - window)
            if t == lo:
                out[b, t] = math.log(p_model)
                continue
            scores = theta * hidden[b, lo:t] @ hidden[b, t]
            attn = np.exp(scores - scores.max())
            attn /= attn.sum()
            p_ptr = attn[targets[b, lo:t] == targets[b, t]].sum()
            out[b, t] = math.log(lam * p_ptr + (1 - lam) * p_model)
    return out


def test_pointer_matches_the_direct_loop_across_window_boundaries() -> None:
    config = PointerConfig(theta=0.7, lambdah=0.3, window=4)
    windows = [_window(s) for s in (0, 1)]
    memory = empty_memory(B, config.window, H)
    got = []
    for log_probs, hidden, targets in windows:
        log_p, memory = pointer_log_probs(tf.constant(log_probs), tf.constant(hidden),
                                          tf.constant(targets), memory, config)
        got.append(log_p.numpy())
    joined = [np.concatenate(parts, axis=1) for parts in zip(*windows, strict=True)]
    expected = _direct(*joined, theta=0.7, lam=0.3, window=4)
    np.testing.assert_allclose(np.concatenate(got, axis=1), expected, atol=1e-5)
    # Repeated tokens must gain: the pointer is not a no-op at lambda > 0.
    assert not np.allclose(expected, np.take_along_axis(joined[0], joined[2][..., None], -1)[..., 0])


def test_lambda_zero_gives_exactly_the_model_loss() -> None:
    log_probs, hidden, targets = _window(2)
    config = PointerConfig(theta=1.0, lambdah=0.0, window=3)
    log_p, _ = pointer_log_probs(tf.constant(log_probs), tf.constant(hidden), tf.constant(targets),
                                 empty_memory(B, 3, H), config)
    model = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    np.testing.assert_array_equal(log_p.numpy(), model)


def test_pointer_eval_over_a_model_reports_both_losses() -> None:
    model = build_model(HParams(cell="lstm", vocab_size=V, layers=1, lstm_state_size=8,
                                embedding_size=4, language_model="word"))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, V, size=(B, 3 * T + 1)).astype(np.int32)
    windows = [(tokens[:, i:i + T], tokens[:, i + 1:i + T + 1]) for i in range(0, 3 * T, T)]
    dataset = tf.data.Dataset.from_tensor_slices(
        ([w[0] for w in windows], [w[1] for w in windows]))
    plain, pointer, count = run_pointer_eval(model, dataset, B, PointerConfig(lambdah=0.0, window=5))
    assert count == B * 3 * T
    assert pointer == plain
    # Direct: the model over the whole stream at once (state carried implicitly).
    logits, _ = model(tf.constant(tokens[:, :-1]), model.initial_state(B))
    direct = -tf.reduce_sum(tf.gather(tf.nn.log_softmax(logits), tokens[:, 1:], batch_dims=2))
    np.testing.assert_allclose(plain, float(direct), rtol=1e-5)
    _, mixed, _ = run_pointer_eval(model, dataset, B, PointerConfig(lambdah=0.5, window=5))
    assert mixed != plain
