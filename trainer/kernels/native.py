"""The native CPU recurrences of `native_recurrences.cc`: built on first use, cached, loaded as ops.

Why a C++ op: on a 2-core CPU a recurrence step written as TensorFlow ops is ~20 small ops
whose dispatch, not their FLOPs, is most of the time (PyTorch's fused oneDNN LSTM pays none).
Here the whole window's recurrence is one op forward and one backward; the input projection and
the recurrent weight gradient stay single large TensorFlow matmuls around them.

The library is compiled with the machine's C++ compiler against the installed TensorFlow's
headers (`tf.sysconfig`), for this CPU (`-march=native`), into a cache directory keyed by the
source, TensorFlow's version, the compile command and the CPU's flags, so a change to any of
them rebuilds it. Where
no compiler is found or the build fails, `load()` returns None and the callers keep the
pure-TensorFlow kernels (`lstm.py`, `gru.py`); `VERNE_NATIVE_KERNELS=0` asks for that explicitly.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import tensorflow as tf

from trainer.hparams import cpu_flags
from trainer.kernels.lstm import cast, zeros_if_none

SOURCE = pathlib.Path(__file__).with_name("native_recurrences.cc")
ENV_SWITCH = "VERNE_NATIVE_KERNELS"


def cache_dir() -> pathlib.Path:
    root = os.environ.get("VERNE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "verne")
    return pathlib.Path(root) / "ops"


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def _compile_flags() -> list[str]:
    return ["-shared", "-fPIC", "-O3", "-march=native", "-w",
            *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]


def library_path() -> pathlib.Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), tf.__version__, _compiler(), *_compile_flags(), *sorted(cpu_flags())):
        key.update(part if isinstance(part, bytes) else part.encode())
    return cache_dir() / f"{SOURCE.stem}-{key.hexdigest()[:16]}.so"


def build(path: pathlib.Path) -> None:
    """Compiles the library to `path` (through a temporary name, so a concurrent or interrupted
    build never leaves a half-written library where a loader would find it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        partial = os.path.join(scratch, path.name)
        result = subprocess.run([_compiler(), str(SOURCE), "-o", partial, *_compile_flags()],
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                               else f"compiler exited with {result.returncode}")
        os.replace(partial, path)


@functools.cache
def load() -> object | None:
    """The loaded op module, or None when native kernels are off, or cannot be built or used here."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    if tf.config.list_physical_devices("GPU") or tf.config.list_logical_devices("TPU"):
        return None  # CPU kernels only: accelerators run the portable kernels
    compiler = _compiler()
    if shutil.which(compiler) is None:
        _say(f"no C++ compiler ({compiler}) to build the native CPU kernels: using the slower "
             "TensorFlow ones (install g++ for the fast ones)")
        return None
    path = library_path()
    try:
        if not path.exists():
            _say(f"building the native CPU kernels for this machine (once, ~15 s): {path}")
            build(path)
        return tf.load_op_library(str(path))
    except (OSError, RuntimeError, tf.errors.NotFoundError) as error:
        _say(f"native CPU kernels unavailable ({error}): using the slower TensorFlow ones")
        return None


def _say(message: str) -> None:
    print(f"verne: {message}", file=sys.stderr, flush=True)


def available() -> bool:
    return load() is not None


def lstm_sequence_native(
    x_proj: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_h: tf.Tensor, *,
    compute_dtype: tf.DType = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Same contract as `lstm_sequence_reference`, one op each way. The recurrence computes in
    float32 whatever `compute_dtype` says: that is already faster than the TensorFlow kernels'
    bfloat16 loop (bench/README.md) and more accurate; `compute_dtype` still sets the dtype of
    the weight gradient's one large matmul."""
    ops = load()
    w_h = tf.convert_to_tensor(w_h)

    @tf.custom_gradient
    def run(x_proj: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_h: tf.Tensor):  # noqa: ANN202
        outputs, cs, gates, c_T = ops.verne_lstm_sequence(x_proj, h0, c0, w_h)

        def grad(d_out: tf.Tensor | None, dh_T: tf.Tensor | None, dc_T: tf.Tensor | None):  # noqa: ANN202
            dz, dh0, dc0 = ops.verne_lstm_sequence_grad(
                h0, c0, w_h, cs, gates, zeros_if_none(d_out, outputs), zeros_if_none(dh_T, h0),
                zeros_if_none(dc_T, c0))
            return dz, dh0, dc0, _weight_grad(h0, outputs, dz, compute_dtype)

        return (outputs, outputs[:, -1], c_T), grad

    return run(x_proj, h0, c0, w_h)


def gru_sequence_native(
    x_proj: tf.Tensor, h0: tf.Tensor, w_h: tf.Tensor, b_h: tf.Tensor, *,
    compute_dtype: tf.DType = tf.float32,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Same contract as `gru_sequence_reference`, one op each way (float32 recurrence, as
    `lstm_sequence_native`)."""
    ops = load()
    w_h, b_h = tf.convert_to_tensor(w_h), tf.convert_to_tensor(b_h)

    @tf.custom_gradient
    def run(x_proj: tf.Tensor, h0: tf.Tensor, w_h: tf.Tensor, b_h: tf.Tensor):  # noqa: ANN202
        outputs, gates = ops.verne_gru_sequence(x_proj, h0, w_h, b_h)

        def grad(d_out: tf.Tensor | None, dh_T: tf.Tensor | None):  # noqa: ANN202
            dx, dhz, dh0 = ops.verne_gru_sequence_grad(h0, w_h, outputs, gates, zeros_if_none(d_out, outputs),
                                                       zeros_if_none(dh_T, h0))
            return dx, dh0, _weight_grad(h0, outputs, dhz, compute_dtype), tf.reduce_sum(dhz, axis=[0, 1])

        return (outputs, outputs[:, -1]), grad

    return run(x_proj, h0, w_h, b_h)


def _weight_grad(h0: tf.Tensor, outputs: tf.Tensor, d_pre: tf.Tensor, compute_dtype: tf.DType) -> tf.Tensor:
    """dW_h for the whole window in ONE matmul: h_{t-1} [B*T, H]ᵀ @ d(pre-activation) [B*T, G*H]."""
    units, width = h0.shape[-1], d_pre.shape[-1]
    h_prev = tf.concat([h0[:, None], outputs[:, :-1]], axis=1)
    dw = tf.matmul(cast(tf.reshape(h_prev, [-1, units]), compute_dtype),
                   cast(tf.reshape(d_pre, [-1, width]), compute_dtype), transpose_a=True)
    return cast(dw, tf.float32)
