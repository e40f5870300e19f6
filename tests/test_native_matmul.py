"""verne's bfloat16 matmul as an XLA custom call (trainer/kernels/native_matmul.cc), for the
transformer's compiled step (on unless VERNE_XLA_BF16_MATMUL=0).

The compiled checks run in subprocesses: each with the switch on whatever the environment of this
one, and the cache test as two processes sharing one compile cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer import cache_dirs, kernels
from trainer.kernels import native

ROOT = Path(__file__).resolve().parents[1]
NEEDS_NATIVE = pytest.mark.skipif(os.environ.get(native.ENV_SWITCH) == "0" or not native.available(),
                                  reason="verne's native library is off or did not build here: its XLA "
                                         "matmul was NOT checked")


def _run_with_the_switch(script: str, tf_xla_flags: str = "") -> dict:
    """The JSON `script` prints last, run in a process with the switch on and TF_XLA_FLAGS
    `tf_xla_flags` (by default, no persistent compile cache)."""
    env = {**os.environ, native.XLA_BF16_MATMUL_SWITCH: "1", "TF_XLA_FLAGS": tf_xla_flags}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])

_COMPILED_CHECKS = r"""
import json, os
import numpy as np
import tensorflow as tf
import trainer
from trainer import kernels
from trainer.hparams import HParams
from trainer.kernels import native
from trainer.models import build_model

isa = native.bf16_isa()
rng = np.random.default_rng(0)

def rounded(x):
    return x if isa == "none" else x.astype(tf.bfloat16.as_numpy_dtype).astype(np.float32)

# Products: odd sizes (padding of K, rows and column blocks; partial 64-row chunks) and the
# transformer's own, each form; the reference is the float64 product of the same rounded inputs.
errors = []
for m, k, n in ((37, 70, 45), (130, 33, 17), (768, 128, 512)):
    for ta, tb in ((False, False), (False, True), (True, False)):
        a = rng.normal(size=(k, m) if ta else (m, k)).astype(np.float32)
        b = rng.normal(size=(n, k) if tb else (k, n)).astype(np.float32)
        got = tf.function(lambda a, b: native._xla_product(a, b, ta, tb), jit_compile=True)(a, b).numpy()
        ra, rb = rounded(a).astype(np.float64), rounded(b).astype(np.float64)
        want = (ra.T if ta else ra) @ (rb.T if tb else rb)
        errors.append(float(np.abs(got - want).max() / np.abs(want).max()))

# Gradients of xla_bf16_matmul: dx = dy @ w^T and dw = x^T @ dy, the same kernel.
x = rng.normal(size=(96, 40)).astype(np.float32)
w = rng.normal(size=(40, 24)).astype(np.float32)
dy = rng.normal(size=(96, 24)).astype(np.float32)

@tf.function(jit_compile=True)
def grads(x, w):
    with tf.GradientTape() as tape:
        tape.watch([x, w])
        loss = tf.reduce_sum(native.xla_bf16_matmul(x, w) * dy)
    return tape.gradient(loss, [x, w])

gx, gw = (g.numpy() for g in grads(x, w))
rdy = rounded(dy).astype(np.float64)
grad_errors = [float(np.abs(gx - rdy @ rounded(w).astype(np.float64).T).max() / np.abs(gx).max()),
               float(np.abs(gw - rounded(x).astype(np.float64).T @ rdy).max() / np.abs(gw).max())]

# The transformer's compiled forward uses it inside kernels.xla_step() only, and its loss stays
# within bfloat16's rounding of XLA's own bfloat16 dot.
hp = HParams(cell="transformer", vocab_size=31, layers=2, d_model=32, heads=4, embedding_size=32,
             unroll_steps=16, max_context=16, batch_size=4, precision="bfloat16").validate()
model = build_model(hp)
tokens = tf.constant(rng.integers(0, 31, (4, 16)), tf.int32)

def loss(native_matmul):
    def run(tokens):
        with kernels.xla_step(native_matmul):
            logits, _ = model(tokens, (), training=False)
        return tf.reduce_mean(
            tf.keras.losses.sparse_categorical_crossentropy(tokens, logits, from_logits=True))
    fn = tf.function(run, jit_compile=True)
    return float(fn(tokens)), fn.experimental_get_compiler_ir(tokens)(stage="hlo")

native_loss, native_hlo = loss(True)
xla_loss, xla_hlo = loss(False)
print(json.dumps({"isa": isa, "errors": errors, "grad_errors": grad_errors, "native_loss": native_loss,
                  "xla_loss": xla_loss, "native_calls": native_hlo.count("verne_bf16_matmul"),
                  "xla_calls": xla_hlo.count("verne_bf16_matmul")}))
"""


@NEEDS_NATIVE
def test_compiled_products_gradients_and_the_transformer_under_the_switch() -> None:
    result = _run_with_the_switch(_COMPILED_CHECKS)
    # float32 sums of exactly rounded products: only the summation order differs from float64.
    assert max(result["errors"]) < 1e-5 and max(result["grad_errors"]) < 1e-5, result
    if result["isa"] == "none":  # no bfloat16 dot products: the model keeps XLA's dot
        assert result["native_calls"] == 0, result
    else:
        # 2 layers x 4 dense matmuls; XLA's bfloat16 dot also rounds its output to bfloat16.
        assert result["native_calls"] == 8 and result["xla_calls"] == 0, result
        assert abs(result["native_loss"] - result["xla_loss"]) < 0.02, result


_LOSS_CURVES = r"""
import json, sys
import numpy as np
sys.path.insert(0, "tests")
from test_mixed_precision import _loss_curve
from trainer.kernels import native
fp32 = _loss_curve("float32", "transformer", jit_compile=True)
bf16 = _loss_curve("bfloat16", "transformer", jit_compile=True)
print(json.dumps({"isa": native.bf16_isa(), "fp32": fp32.tolist(), "bf16": bf16.tolist()}))
"""


@NEEDS_NATIVE
def test_a_300_step_loss_curve_with_it_stays_within_0_02_nats_of_float32() -> None:
    # As tests/test_mixed_precision.py's, with the step compiled and the switch on.
    result = _run_with_the_switch(_LOSS_CURVES)
    fp32, bf16 = np.array(result["fp32"]), np.array(result["bf16"])
    assert fp32[-20:].mean() < fp32[0] - 1.0, "the tiny model did not learn"
    worst = int(np.abs(bf16 - fp32).argmax())
    assert abs(bf16[worst] - fp32[worst]) <= 0.02, (result["isa"], worst, fp32[worst], bf16[worst])


def test_the_custom_call_is_used_only_when_asked_inside_a_compiled_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "bf16_isa", lambda: "avx512_bf16")
    monkeypatch.setenv(native.XLA_BF16_MATMUL_SWITCH, "1")
    assert not kernels.use_xla_bf16_matmul(tf.bfloat16)  # outside a compiled step (sampling, export)
    with kernels.xla_step():
        assert kernels.use_xla_bf16_matmul(tf.bfloat16)
        assert not kernels.use_xla_bf16_matmul(tf.float32)
        with kernels.portable():
            assert not kernels.use_xla_bf16_matmul(tf.bfloat16)
    with kernels.xla_step(False):  # a step traced without XLA
        assert not kernels.use_xla_bf16_matmul(tf.bfloat16)
    monkeypatch.setenv(native.XLA_BF16_MATMUL_SWITCH, "0")
    with kernels.xla_step():
        assert not kernels.use_xla_bf16_matmul(tf.bfloat16)
    monkeypatch.setenv(native.XLA_BF16_MATMUL_SWITCH, "1")
    monkeypatch.setattr(native, "bf16_isa", lambda: "none")
    with kernels.xla_step():
        assert not kernels.use_xla_bf16_matmul(tf.bfloat16)


_PRODUCTS_OF_EACH_FORM = r"""
import json
import numpy as np
import tensorflow as tf
import trainer
from trainer.kernels import native

native.load()  # registers the custom call with XLA
rng = np.random.default_rng(0)
outputs = []
for ta, tb in ((False, False), (False, True), (True, False)):
    a = rng.normal(size=(40, 96) if ta else (96, 40)).astype(np.float32)
    b = rng.normal(size=(24, 40) if tb else (40, 24)).astype(np.float32)
    product = tf.function(lambda a, b: native._xla_product(a, b, ta, tb) * 2.0 + 1.0, jit_compile=True)
    outputs.append(product(a, b).numpy().tolist())
print(json.dumps({"outputs": outputs}))
"""


@NEEDS_NATIVE
def test_steps_restored_from_the_persistent_compile_cache_compute_what_compiled_ones_did(
        tmp_path: Path) -> None:
    # Restored from TensorFlow's cache, a step must compute what the compiled one did. (The call's
    # first version, on XLA's legacy interface, received its result buffer inside an array there and
    # crashed the second process.)
    flags = f"{cache_dirs.PERSISTENT_CACHE_FLAG}={tmp_path}"
    compiled = _run_with_the_switch(_PRODUCTS_OF_EACH_FORM, flags)
    written = sorted(path.name for path in tmp_path.iterdir())
    assert len(written) == 3, written
    restored = _run_with_the_switch(_PRODUCTS_OF_EACH_FORM, flags)
    assert sorted(path.name for path in tmp_path.iterdir()) == written  # nothing compiled again
    assert restored == compiled


@NEEDS_NATIVE
def test_trainer_task_with_the_switch_trains_compiled_and_exports_a_model_without_it(
        tmp_path: Path, make_data_dir) -> None:
    # End to end: the compiled train and eval steps call the custom call; the SavedModel written at
    # the end, traced without XLA, must not (it has to load where verne is not installed).
    data_dir, prefix, _ = make_data_dir(tmp_path)
    job = tmp_path / "job"
    env = {**os.environ, native.XLA_BF16_MATMUL_SWITCH: "1", "TF_XLA_FLAGS": ""}
    flags = ["--data_dir", data_dir, "--data_prefix", prefix, "--job-dir", str(job), "--cell", "transformer",
             "--layers", "1", "--d_model", "32", "--heads", "2", "--embedding_size", "32",
             "--unroll_steps", "16", "--max_context", "16", "--batch_size", "4", "--max_steps", "6",
             "--eval_every", "3", "--eval_steps", "1", "--sample_every", "0"]
    done = subprocess.run([sys.executable, "-m", "trainer.task", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    hparams = json.loads((job / "hparams.json").read_text())
    assert hparams["xla"] == "step"
    assert hparams["precision"] == ("float32" if native.bf16_isa() == "none" else "bfloat16")
    assert b"verne_bf16_matmul" not in (job / "export" / "saved_model.pb").read_bytes()
    exported = tf.saved_model.load(str(job / "export"))
    log_probs = exported.signatures["next_token_log_probs"](prime=tf.constant(["ab"]))["log_probs"]
    assert np.isfinite(log_probs.numpy()).all()
