"""The GPU path: plain LSTM/GRU layers hand the whole layer to cuDNN through Keras' backend.

No GPU here, so two halves are checked on the CPU: verne's weights are in exactly the layout
`keras.layers.LSTM`/`GRU` use (whose GPU path is the backend call verne makes), and with a GPU
visible the layer calls that backend function with arguments that pass Keras' own cuDNN
predicate, and uses what it returns (or falls back where Keras declines).
"""

from __future__ import annotations

import importlib
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import kernels
from trainer.kernels import cudnn
from trainer.models.recurrent import RecurrentLayer

# The module (its name is shadowed by its function `rnn` in the package).
keras_rnn = importlib.import_module("keras.src.backend.tensorflow.rnn")
B, T, D, H = 3, 7, 5, 6


def _layer(cell: str, compute_dtype: tf.DType = tf.float32) -> RecurrentLayer:
    layer = RecurrentLayer(cell, H, layer_norm=False, compute_dtype=compute_dtype)
    layer.build(tf.TensorShape([B, T, D]))
    rng = np.random.default_rng(0)
    for weight in layer.weights:  # non-zero biases, so a misplaced one shows
        weight.assign(rng.normal(0, 0.4, weight.shape).astype(np.float32))
    return layer


def _inputs(cell: str) -> tuple[tf.Tensor, tuple[tf.Tensor, ...]]:
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(B, T, D)), tf.float32)
    state = tuple(tf.constant(rng.normal(size=(B, H)), tf.float32) for _ in range(2 if cell == "lstm" else 1))
    return x, state


def _keras_layer(cell: str, kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray,
                 ) -> keras.layers.Layer:
    kind = keras.layers.LSTM if cell == "lstm" else keras.layers.GRU
    layer = kind(H, return_sequences=True, return_state=True, use_cudnn=False)
    layer.build((B, T, kernel.shape[0]))
    layer.set_weights([kernel, recurrent, bias])
    return layer


def _keras_run(cell: str, x: tf.Tensor, state: tuple[tf.Tensor, ...], kernel: np.ndarray,
               recurrent: np.ndarray, bias: np.ndarray) -> list[tf.Tensor]:
    outputs, *final = _keras_layer(cell, kernel, recurrent, bias)(x, initial_state=list(state))
    return [outputs, *final]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_verne_weights_are_in_keras_layout(cell: str) -> None:
    layer, (x, state) = _layer(cell), _inputs(cell)
    outputs, final = layer(x, state)  # the CPU kernels
    bias = (layer.bias.numpy() if cell == "lstm"
            else np.stack([layer.bias.numpy(), layer.recurrent_bias.numpy()]))
    expected = _keras_run(cell, x, state, layer.kernel.numpy(), layer.recurrent_kernel.numpy(), bias)
    for got, want in zip([outputs, *final], expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


class _KerasOnCpu:
    """Stands in for keras' backend on a GPU machine: checks the call is one Keras would run on
    cuDNN, records it, and answers as keras.layers.LSTM/GRU would."""

    def __init__(self, decline: bool = False) -> None:
        self.calls: list[dict] = []
        self.decline = decline

    def _check(self, cell: str, args: tuple, kwargs: dict) -> None:
        # cudnn_ok without its "is there a GPU" half.
        supports = (keras_rnn._do_gru_arguments_support_cudnn if cell == "gru"
                    else keras_rnn._do_lstm_arguments_support_cudnn)
        extra = {"reset_after": kwargs["reset_after"]} if cell == "gru" else {}
        assert supports(activation=kwargs["activation"], recurrent_activation=kwargs["recurrent_activation"],
                        unroll=kwargs.get("unroll", False), use_bias=kwargs["bias"] is not None, **extra)
        assert args[-1] is None and kwargs["return_sequences"] is True  # no mask; every step
        self.calls.append({"cell": cell, "dtypes": {t.dtype for t in args[:-1]}})
        if self.decline:
            raise NotImplementedError

    def _answer(self, cell: str, x: tf.Tensor, state: list[tf.Tensor], kwargs: dict) -> tuple:
        as32 = [tf.cast(t, tf.float32) for t in (x, *state)]
        weights = [tf.cast(kwargs[k], tf.float32).numpy() for k in ("kernel", "recurrent_kernel", "bias")]
        outputs, *final = _keras_run(cell, as32[0], tuple(as32[1:]), *weights)
        dtype = x.dtype
        return outputs[:, -1].numpy(), tf.cast(outputs, dtype), [tf.cast(s, dtype) for s in final]

    def lstm(self, x: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, mask: None, **kwargs: object) -> tuple:
        self._check("lstm", (x, h0, c0, mask), kwargs)
        return self._answer("lstm", x, [h0, c0], kwargs)

    def gru(self, x: tf.Tensor, h0: tf.Tensor, mask: None, **kwargs: object) -> tuple:
        self._check("gru", (x, h0, mask), kwargs)
        return self._answer("gru", x, [h0], kwargs)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16])
def test_with_a_gpu_the_layer_runs_keras_cudnn_call(monkeypatch, cell: str, dtype: tf.DType) -> None:
    layer, (x, state) = _layer(cell, dtype), _inputs(cell)
    expected_outputs, expected_state = layer(x, state)  # no GPU: the CPU kernels
    backend = _KerasOnCpu()
    monkeypatch.setattr(cudnn, "keras_backend", types.SimpleNamespace(lstm=backend.lstm, gru=backend.gru))
    monkeypatch.setattr(kernels, "use_cudnn", lambda: True)
    outputs, final = layer(x, state)
    assert [c["cell"] for c in backend.calls] == [cell]
    assert backend.calls[0]["dtypes"] == {dtype}  # inputs, state and weights in the compute dtype
    assert outputs.dtype == tf.float32 and len(final) == len(state)
    tolerance = 1e-5 if dtype == tf.float32 else 2e-2
    for got, want in zip([outputs, *final], [expected_outputs, *expected_state], strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=tolerance)


def test_where_keras_declines_cudnn_the_cpu_kernels_run(monkeypatch) -> None:
    layer, (x, state) = _layer("lstm"), _inputs("lstm")
    expected, _ = layer(x, state)
    backend = _KerasOnCpu(decline=True)
    monkeypatch.setattr(cudnn, "keras_backend", types.SimpleNamespace(lstm=backend.lstm, gru=backend.gru))
    monkeypatch.setattr(kernels, "use_cudnn", lambda: True)
    outputs, _ = layer(x, state)
    assert len(backend.calls) == 1
    np.testing.assert_allclose(outputs.numpy(), expected.numpy(), atol=1e-6)


def test_no_cudnn_without_a_gpu_or_inside_portable() -> None:
    assert kernels.use_cudnn() is bool(tf.config.list_logical_devices("GPU"))
    with kernels.portable():
        assert kernels.use_cudnn() is False
