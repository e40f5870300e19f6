"""The fast recurrent kernels equal the plain autodiff recurrences, and those equal Keras' layers."""

from __future__ import annotations

import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import kernels
from trainer.kernels import native, reference

# (batch, time, units): odd sizes, a single step, a single sequence, and windows of 12 and 16
# (the sizes a blocked loop, tried and measured no faster, would have run in blocks).
SHAPES = [(3, 7, 5), (1, 1, 3), (2, 9, 17), (2, 12, 6), (3, 16, 5)]


def _inputs(cell: str, batch: int, time: int, units: int, seed: int = 0) -> dict[str, tf.Tensor]:
    rng = np.random.default_rng(seed)
    gates = 4 if cell == "lstm" else 3

    def normal(*shape: int, scale: float = 1.0) -> tf.Tensor:
        return tf.constant(rng.normal(0.0, scale, shape).astype(np.float32))

    args = {"x_proj": normal(batch, time, gates * units), "h0": normal(batch, units, scale=0.5),
            "w_h": normal(units, gates * units, scale=units ** -0.5)}
    if cell == "lstm":
        args["c0"] = normal(batch, units)
    else:
        args["b_h"] = normal(gates * units, scale=0.3)
    return args


def _run(fn, cell: str, args: dict[str, tf.Tensor], dtype: tf.DType, seed: int = 1,
         use_final: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Outputs, and gradients w.r.t. every input of a random linear loss over all outputs."""
    names = sorted(args)
    with tf.GradientTape() as tape:
        tape.watch([args[n] for n in names])
        if cell == "lstm":
            outs = fn(args["x_proj"], args["h0"], args["c0"], args["w_h"], compute_dtype=dtype)
        else:
            outs = fn(args["x_proj"], args["h0"], args["w_h"], args["b_h"], compute_dtype=dtype)
        used = outs if use_final else outs[:1]
        rng = np.random.default_rng(seed)
        # Random cotangents so every output (sequence, final h, final c) contributes its own gradient.
        loss = tf.add_n([tf.reduce_sum(o * rng.normal(size=o.shape).astype(np.float32)) for o in used])
    grads = tape.gradient(loss, [args[n] for n in names])
    return [o.numpy() for o in outs], [g.numpy() for g in grads]


IMPLEMENTATIONS = {
    "fast": {"lstm": kernels.lstm_sequence_fast, "gru": kernels.gru_sequence_fast},
    "native": {"lstm": kernels.lstm_sequence_native, "gru": kernels.gru_sequence_native},
}
REFERENCE = {"lstm": kernels.lstm_sequence_reference, "gru": kernels.gru_sequence_reference}


@pytest.fixture(params=["fast", "native", "dispatch-without-native"])
def fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict:
    if request.param == "native" and not native.available():
        pytest.skip(f"native kernels unavailable here (no g++, or {native.ENV_SWITCH}=0): "
                    "only the TensorFlow kernels were tested")
    if request.param == "dispatch-without-native":
        # What a machine without g++ (or VERNE_NATIVE_KERNELS=0) runs: the dispatching entry
        # points must fall back to the TensorFlow kernels, not call a missing op.
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        native.load.cache_clear()
        request.addfinalizer(native.load.cache_clear)
        assert not kernels.use_native()
        return {"lstm": kernels.lstm_sequence, "gru": kernels.gru_sequence}
    return IMPLEMENTATIONS[request.param]


@pytest.mark.skipif(os.environ.get(native.ENV_SWITCH) == "0",
                    reason=f"{native.ENV_SWITCH}=0 is set: the native build was not tried")
def test_native_kernels_build_where_a_compiler_is() -> None:
    # Not a skip: on a machine with g++ the native kernels must build, or the default is slow.
    if shutil.which(native._compiler()):
        assert native.available(), "native_recurrences.cc did not build: see the message above"
        assert kernels.use_native()
        with kernels.portable():
            assert not kernels.use_native()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_float32_equals_autodiff(fast: dict, cell: str, shape: tuple[int, int, int]) -> None:
    args = _inputs(cell, *shape)
    fast_out, fast_grad = _run(fast[cell], cell, args, tf.float32)
    ref_out, ref_grad = _run(REFERENCE[cell], cell, args, tf.float32)
    for got, want in zip(fast_out + fast_grad, ref_out + ref_grad, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("shape", [(4, 16, 32), *SHAPES])
def test_fast_bfloat16_close_to_float32_autodiff(fast: dict, cell: str, shape: tuple[int, int, int]) -> None:
    args = _inputs(cell, *shape)
    fast_out, fast_grad = _run(fast[cell], cell, args, tf.bfloat16)
    ref_out, ref_grad = _run(REFERENCE[cell], cell, args, tf.float32)
    for got, want in zip(fast_out + fast_grad, ref_out + ref_grad, strict=True):
        # bfloat16 keeps 8 mantissa bits: errors of a few 1e-3 relative to the tensor's scale.
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 2e-2 * scale, (got.shape, np.abs(got - want).max(), scale)


def _bf16_isa_or_skip() -> str:
    if not native.available():
        pytest.skip(f"native kernels unavailable here (no g++, or {native.ENV_SWITCH}=0): their bfloat16 "
                    "products were NOT tested")
    isa = native.bf16_isa()
    if isa == "none":
        pytest.skip("this CPU has no bfloat16 dot products (no AVX512_BF16/AMX): the native op runs "
                    "float32 under compute_dtype=bfloat16, and its bfloat16 products were NOT tested")
    return isa


def _bf16_inputs_matmul(h: tf.Tensor, w_h: tf.Tensor, compute_dtype: tf.DType) -> tf.Tensor:
    """What the native bfloat16 products compute: inputs rounded to bfloat16, float32 sums."""
    del compute_dtype

    def rounded(x: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.cast(x, tf.bfloat16), tf.float32)

    return tf.matmul(rounded(h), rounded(w_h))


# Odd widths (not multiples of the 16-column blocks or of 32-wide K), batch 1, T=1, a thread's
# rows not a multiple of the 4-row tiles, and H=70 (K padded from 70 to 96, 280 = 17.5 blocks).
BF16_SHAPES = [*SHAPES, (5, 3, 70)]


def test_native_bf16_isa_follows_the_cpu() -> None:
    if not native.available():
        pytest.skip(f"native kernels unavailable here (no g++, or {native.ENV_SWITCH}=0)")
    flags = native.cpu_flags()
    isa = native.bf16_isa()
    if not flags & {"avx512_bf16", "amx_bf16"}:
        assert isa == "none"
    elif "amx_bf16" in flags:
        # AMX needs the kernel's permission (arch_prctl) and must pass its self-check first.
        assert isa in ("amx", "avx512_bf16")
    else:
        assert isa == "avx512_bf16"
    assert native.describe().startswith("verne's native C++ ops")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("shape", BF16_SHAPES)
def test_native_bfloat16_forward_is_the_product_of_bfloat16_inputs(
        cell: str, shape: tuple[int, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    isa = _bf16_isa_or_skip()
    args = _inputs(cell, *shape)
    native_fn = IMPLEMENTATIONS["native"][cell]
    got, _ = _run(native_fn, cell, args, tf.bfloat16)
    as_float32, _ = _run(native_fn, cell, args, tf.float32)
    monkeypatch.setattr(reference, "_recurrent_matmul", _bf16_inputs_matmul)
    want, _ = _run(REFERENCE[cell], cell, args, tf.float32)
    for g, w in zip(got, want, strict=True):
        # The same rounded inputs summed in float32 (in another order): float32 rounding apart.
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"bfloat16 products on {isa}")
    # ...and really bfloat16: a bf16-sized difference from the float32 op, not none.
    difference = max(np.abs(g - f).max() for g, f in zip(got, as_float32, strict=True))
    assert 1e-6 < difference < 2e-2, (isa, difference)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradients_without_final_state_and_inside_tf_function(fast: dict, cell: str) -> None:
    args = _inputs(cell, 2, 5, 6)
    graph_fast = tf.function(fast[cell])
    fast_out, fast_grad = _run(graph_fast, cell, args, tf.float32, use_final=False)
    ref_out, ref_grad = _run(REFERENCE[cell], cell, args, tf.float32, use_final=False)
    for got, want in zip(fast_out + fast_grad, ref_out + ref_grad, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_unknown_batch_size_inside_tf_function(fast: dict, cell: str) -> None:
    # Sampling and the SavedModel trace with the batch unknown; an 8-step window runs as one block.
    args = _inputs(cell, 3, 8, 4)
    names = ["x_proj", "h0", "c0", "w_h"] if cell == "lstm" else ["x_proj", "h0", "w_h", "b_h"]
    specs = [tf.TensorSpec([None, *args[n].shape[1:]] if n in ("x_proj", "h0", "c0") else args[n].shape)
             for n in names]
    graph_fast = tf.function(fast[cell], input_signature=specs)
    got = graph_fast(*(args[n] for n in names))
    want = REFERENCE[cell](*(args[n] for n in names))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5, atol=1e-5)


def test_final_state_gradient_reaches_initial_state(fast: dict) -> None:
    # A loss on the final cell state only: its gradient must flow back to h0 and c0 through every step.
    args = _inputs("lstm", 2, 6, 4)
    with tf.GradientTape() as tape:
        tape.watch([args["h0"], args["c0"]])
        _, _, c_t = fast["lstm"](args["x_proj"], args["h0"], args["c0"], args["w_h"])
        loss = tf.reduce_sum(c_t)
    dh0, dc0 = tape.gradient(loss, [args["h0"], args["c0"]])
    assert np.abs(dh0.numpy()).max() > 1e-4 and np.abs(dc0.numpy()).max() > 1e-4


def test_reference_lstm_matches_keras() -> None:
    x = np.random.default_rng(2).normal(size=(2, 6, 5)).astype(np.float32)
    layer = keras.layers.LSTM(4, return_sequences=True, return_state=True)
    layer(x)
    kernel, recurrent, bias = layer.get_weights()
    bias = np.random.default_rng(3).normal(size=bias.shape).astype(np.float32)
    layer.set_weights([kernel, recurrent, bias])
    want, want_h, want_c = layer(x)
    zeros = tf.zeros([2, 4])
    got, got_h, got_c = kernels.lstm_sequence_reference(x @ kernel + bias, zeros, zeros, recurrent)
    for g, w in ((got, want), (got_h, want_h), (got_c, want_c)):
        np.testing.assert_allclose(g.numpy(), np.asarray(w), rtol=1e-5, atol=1e-6)


def test_reference_gru_matches_keras_reset_after() -> None:
    x = np.random.default_rng(4).normal(size=(2, 6, 5)).astype(np.float32)
    layer = keras.layers.GRU(4, return_sequences=True, return_state=True, reset_after=True)
    layer(x)
    kernel, recurrent, bias = layer.get_weights()
    bias = np.random.default_rng(5).normal(size=bias.shape).astype(np.float32)  # [2, 3H]: input, recurrent
    layer.set_weights([kernel, recurrent, bias])
    want, want_h = layer(x)
    got, got_h = kernels.gru_sequence_reference(x @ kernel + bias[0], tf.zeros([2, 4]), recurrent, bias[1])
    np.testing.assert_allclose(got.numpy(), np.asarray(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_h.numpy(), np.asarray(want_h), rtol=1e-5, atol=1e-6)
