"""Recurrent kernels: whole-window LSTM and GRU recurrences with hand-written gradients.

    outputs, h_T, c_T = lstm_sequence(x_proj, h0, c0, w_h, compute_dtype=tf.float32)
    outputs, h_T = gru_sequence(x_proj, h0, w_h, b_h, compute_dtype=tf.float32)

`x_proj` is the input projection for the whole window ([B, T, 4H] gates i, f, g, o, or
[B, T, 3H] gates z, r, n; input bias folded in), computed by the caller in one matmul.

On a GPU the plain LSTM and GRU layers call cuDNN instead (`cudnn.py`, through Keras; it takes the
layer input, not x_proj). On a CPU, three implementations of this module's contract:
- `*_native` (`native.py`, `native_recurrences.cc`): the whole recurrence as one C++ op each way, built
  for this machine on first use. The default on a CPU-only machine where it builds: it is the
  fastest there (bench/README.md). `compute_dtype=tf.bfloat16` runs its per-step products in
  bfloat16 (float32 sums) where the CPU has AVX512-BF16 or AMX (`native.bf16_isa()`).
- `*_fast` (`lstm.py`, `gru.py`): TensorFlow ops in a `tf.while_loop`, portable to any device;
  `compute_dtype=tf.bfloat16` runs the recurrent matmuls in bfloat16. The default with a GPU or
  TPU, where the build failed, and inside `portable()` (SavedModels must load without verne).
- `*_reference`: plain autodiff, the definition both are tested against (tests/test_kernels.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import tensorflow as tf

from trainer.kernels import native
from trainer.kernels.cudnn import gru_sequence_cudnn, lstm_sequence_cudnn
from trainer.kernels.gru import gru_sequence_fast
from trainer.kernels.lstm import lstm_sequence_fast
from trainer.kernels.native import gru_sequence_native, lstm_sequence_native
from trainer.kernels.reference import gru_sequence_reference, lstm_sequence_reference

_portable_depth = 0


@contextlib.contextmanager
def portable() -> Iterator[None]:
    """Kernels traced inside use only TensorFlow's own ops (for graphs saved to run elsewhere)."""
    global _portable_depth
    _portable_depth += 1
    try:
        yield
    finally:
        _portable_depth -= 1


def use_native() -> bool:
    return _portable_depth == 0 and native.available()


_xla_step_depth = 0


@contextlib.contextmanager
def xla_step(enabled: bool = True) -> Iterator[None]:
    """Functions traced inside are compiled whole by XLA (--xla=step): their matmuls may call
    native.xla_bf16_matmul, an XLA custom call, which a TensorFlow graph (sampling, export, an
    uncompiled step) cannot run. Entered by trainer.loops around a compiled step's body."""
    global _xla_step_depth
    _xla_step_depth += int(enabled)
    try:
        yield
    finally:
        _xla_step_depth -= int(enabled)


def xla_bf16_matmul_here() -> bool:
    """Whether verne's native bfloat16 matmul can run in this process's compiled steps: not
    turned off (`VERNE_XLA_BF16_MATMUL=0`, native.XLA_BF16_MATMUL_SWITCH), the native library
    built, and a CPU with bfloat16 dot products (elsewhere XLA's own dot, which gains nothing from
    bfloat16 on a CPU)."""
    return os.environ.get(native.XLA_BF16_MATMUL_SWITCH, "1") != "0" and native.bf16_isa() != "none"


def use_xla_bf16_matmul(compute_dtype: tf.DType) -> bool:
    """Whether a bfloat16 matmul traced here runs as verne's native XLA custom call: inside
    `xla_step()`, not inside `portable()`, where `xla_bf16_matmul_here()`."""
    return (compute_dtype == tf.bfloat16 and _xla_step_depth > 0 and _portable_depth == 0
            and xla_bf16_matmul_here())


def use_native_attention(compute_dtype: tf.DType) -> bool:
    """Whether a bfloat16 attention traced here runs as verne's native op
    (native.causal_attention_native): a TensorFlow op, so not inside `xla_step()` (XLA cannot
    compile it; as an XLA custom call it gained nothing in gpt-baby's compiled step, whose
    attention is small: bench/README.md) nor `portable()`, and only where the CPU has bfloat16
    dot products."""
    return (compute_dtype == tf.bfloat16 and _xla_step_depth == 0 and use_native()
            and native.bf16_isa() != "none")


def use_cudnn() -> bool:
    """cuDNN's fused kernels (cudnn.py) wherever a GPU is visible; never inside `portable()`."""
    return _portable_depth == 0 and bool(tf.config.list_logical_devices("GPU"))


def lstm_sequence(x_proj: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor, w_h: tf.Tensor, *,
                  compute_dtype: tf.DType = tf.float32) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    kernel = lstm_sequence_native if use_native() else lstm_sequence_fast
    return kernel(x_proj, h0, c0, w_h, compute_dtype=compute_dtype)


def gru_sequence(x_proj: tf.Tensor, h0: tf.Tensor, w_h: tf.Tensor, b_h: tf.Tensor, *,
                 compute_dtype: tf.DType = tf.float32) -> tuple[tf.Tensor, tf.Tensor]:
    kernel = gru_sequence_native if use_native() else gru_sequence_fast
    return kernel(x_proj, h0, w_h, b_h, compute_dtype=compute_dtype)


def cpu_bf16_isa(flags: frozenset[str] | None = None) -> str:
    """The CPU's bfloat16 matmul instructions by its /proc/cpuinfo flags (this machine's by
    default): "amx", "avx512_bf16" or "none"."""
    from trainer.hparams import cpu_flags

    flags = cpu_flags() if flags is None else flags
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"


_BF16_NAMES = {"amx": "AMX", "avx512_bf16": "AVX512-BF16", "none": "none"}


def describe_runtime(portable: bool = False, fused: bool = True) -> str:
    """One line saying what runs the model on this machine: verne's native op or TensorFlow's
    kernels, and the CPU's bfloat16 instructions. The first line trainer.task, babble and serve
    print; `portable` for generation, which always traces TensorFlow's kernels (as the export
    must); `fused` false for cells that never call this module's recurrences (the transformer,
    layer-normed cells), which run TensorFlow's kernels whatever the machine has.
    """
    if portable:
        runs = "TensorFlow kernels (generation uses the portable kernels, as the SavedModel does)"
    elif tf.config.list_logical_devices("GPU"):
        runs = "cuDNN / TensorFlow kernels on the GPU"
    elif not fused:
        runs = "TensorFlow kernels (this cell has no fused recurrence)"
    elif native.load() is not None:
        runs = "verne's native C++ recurrence op (trainer/kernels/native_recurrences.cc)"
    else:
        runs = "TensorFlow kernels (verne's native op is unavailable here)"
    return f"model runs on: {runs}; CPU bfloat16: {_BF16_NAMES[cpu_bf16_isa()]}"


__all__ = [
    "gru_sequence", "gru_sequence_cudnn", "gru_sequence_fast", "gru_sequence_native",
    "gru_sequence_reference", "lstm_sequence", "lstm_sequence_cudnn", "lstm_sequence_fast",
    "lstm_sequence_native", "lstm_sequence_reference",
    "cpu_bf16_isa", "describe_runtime", "portable", "use_cudnn", "use_native", "use_native_attention",
    "use_xla_bf16_matmul",
    "xla_step",
]
