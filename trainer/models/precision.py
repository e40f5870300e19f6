"""16-bit matmuls with float32 everywhere else: the one place the models get their compute dtype.

Weights stay float32 (the optimizer updates float32 master weights); matmul inputs are cast to
the compute dtype and products come back as float32 (or stay 16-bit where the next op is another
matmul). Softmax, layer norm and the loss run in float32 in every model.
"""

from __future__ import annotations

import tensorflow as tf


def compute_dtype_of(precision: str) -> tf.DType:
    """16-bit only when asked for by name: an unresolved "auto" computes in float32, because
    resolving it needs the machine (hparams.resolve_precision) and building a model stays pure."""
    return {"bfloat16": tf.bfloat16, "float16": tf.float16}.get(precision, tf.float32)


def keras_policy(compute_dtype: tf.DType) -> str:
    """The Keras dtype policy of a layer whose matmul runs in compute_dtype: float32 variables,
    16-bit inputs and outputs ("mixed_bfloat16") or all float32."""
    return "float32" if compute_dtype == tf.float32 else f"mixed_{compute_dtype.name}"


def matmul(a: tf.Tensor, b: tf.Tensor, compute_dtype: tf.DType, transpose_b: bool = False) -> tf.Tensor:
    """a @ b, or a @ bᵀ (any leading dims of a), in compute_dtype, result float32. `transpose_b`
    reads b transposed in the matmul: materialising the tied [vocab, E] table's transpose every
    step cost ~25% of the output layer's forward and backward (10,000 x 650, bf16)."""
    if compute_dtype != tf.float32:
        a, b = tf.cast(a, compute_dtype), tf.cast(b, compute_dtype)
    if a.shape.rank == 2:
        out = tf.linalg.matmul(a, b, transpose_b=transpose_b)
    else:
        out = tf.einsum("btd,kd->btk" if transpose_b else "btd,dk->btk", a, b)
    return tf.cast(out, tf.float32)
