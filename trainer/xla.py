"""How the training step is compiled (--xla), and what `auto` means on a machine.

- `off`: TensorFlow's graph and kernels (oneDNN for matmuls on x86). The recurrent cells: their
  step is a handful of large matmuls and a native recurrence op.
- `step`: the whole training step compiled by XLA (`jit_compile`). A small transformer's step on
  a CPU is mostly per-op cost, not arithmetic: bench/train.py --shape gpt-baby (4x4x128, 768
  tokens a step) took 24 ms compiled against 34 ms as a graph (AMD EPYC, float32). XLA's CPU dot
  gains nothing from bfloat16 there (34 ms), so on a CPU with bfloat16 dot products the dense
  matmuls run as verne's own product, an XLA custom call (trainer/kernels/native_matmul.cc), and
  `--precision auto` picks bfloat16; without one, float32. The batch runs as --batch_splits
  slices (auto_batch_splits), which XLA's runtime runs on separate cores at once.
- `fusion`: TensorFlow's oneDNN kernels for the matmuls and XLA for the elementwise ops between
  them (TensorFlow's auto-clustering, limited to fusible ops on the CPU by the flags
  trainer/__init__.py sets). For a large transformer, whose
  matmuls are worth bfloat16: --shape gpt-small (6x6x384, 8,192 tokens a step) took 1.30-1.40 s
  a step this way in bfloat16, 1.58-1.68 s as a plain graph, 2.6 s compiled whole.

`auto`: for the transformer on a CPU, `step` below STEP_XLA_FLOPS matmul FLOPs per training step
and `fusion` above; `off` otherwise (recurrent cells; GPUs and TPUs, not measured here: on a TPU
everything is XLA already).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import tensorflow as tf

from trainer import cache_dirs
from trainer.errors import UsageError
from trainer.hparams import HParams

# Between gpt-baby's 3.6 GFLOP a step (per-op cost dominates) and gpt-small's 520 (arithmetic
# does); the crossover in between was not measured.
STEP_XLA_FLOPS = 30e9


def transformer_train_flops(layers: int, d_model: int, vocab_size: int, batch_size: int,
                            unroll_steps: int) -> float:
    """Matmul FLOPs of one training step: per token 2 per weight (12 d^2 a layer) and 4 T d a layer
    for the attention products over the window, forward, and twice that backward."""
    per_token = (2 * 12 * layers * d_model ** 2 + 4 * layers * unroll_steps * d_model
                 + 2 * d_model * vocab_size)
    return 3.0 * per_token * batch_size * unroll_steps


def auto_xla(cell: str, train_flops: float, on_cpu: bool) -> str:
    """What --xla=auto means for a model on a machine (see the module docstring)."""
    if cell != "transformer" or not on_cpu:
        return "off"
    return "step" if train_flops < STEP_XLA_FLOPS else "fusion"


def auto_batch_splits(xla: str, replica_batch: int, on_cpu: bool, cores: int) -> int:
    """What --batch_splits=0 means: 2 for a transformer's step (XLA compiling all of it, or
    fusing between oneDNN's matmuls) on a CPU with two cores or more, 1 otherwise. On 2 cores of
    an AMD EPYC (bench/README.md): gpt-baby's compiled step 8-10% shorter, 3 and 4 slices no
    better than 2; gpt-small's fused step 12-15% shorter; the LSTM's graph 2-4%, within the
    host's drift, so the recurrent cells, whose auto is `off`, keep 1 (an LSTM given --xla=fusion
    by hand gets 2; not measured: GPUs, TPUs)."""
    return 2 if xla in ("step", "fusion") and on_cpu and cores >= 2 and replica_batch % 2 == 0 else 1


def resolve(hparams: HParams, replicas: int = 1, accelerator: bool = False) -> HParams:
    """hparams with --xla=auto and --batch_splits=0 replaced by their concrete values for this
    machine (`accelerator`: a GPU or TPU). A whole compiled step needs one replica (no
    cross-device reduction inside it)."""
    if hparams.xla == "auto":
        flops = (transformer_train_flops(hparams.layers, hparams.d_model, hparams.vocab_size,
                                         hparams.batch_size, hparams.unroll_steps)
                 if hparams.cell == "transformer" else 0.0)
        mode = auto_xla(hparams.cell, flops, on_cpu=not accelerator)
        hparams = hparams.replace(xla="fusion" if mode == "step" and replicas > 1 else mode)
    replica_batch = hparams.batch_size // replicas
    if hparams.batch_splits == 0:
        splits = auto_batch_splits(hparams.xla, replica_batch, not accelerator, os.cpu_count() or 1)
        hparams = hparams.replace(batch_splits=splits)
    if replica_batch % hparams.batch_splits:
        raise UsageError(f"--batch_splits={hparams.batch_splits}: must divide each of the {replicas} "
                         f"replicas' {replica_batch} streams (--batch_size={hparams.batch_size})")
    return hparams


@contextlib.contextmanager
def fusion(enabled: bool) -> Iterator[None]:
    """XLA's clustering of elementwise ops on (`enabled`) for the functions traced inside, and back
    as it was after. The CPU flags it needs are set when `trainer` is imported (trainer/__init__)."""
    before = tf.config.optimizer.get_jit()
    if enabled:
        tf.config.optimizer.set_jit("autoclustering")
    try:
        yield
    finally:
        tf.config.optimizer.set_jit(before)


# What TensorFlow says when an entry of the persistent compile cache (trainer/cache_dirs.py) reads
# wrong: cut short (a failing disk, a full one while something else wrote it), or not the entry its
# name says. TensorFlow writes entries whole (a temporary name, then a rename), so this is damage
# from outside, and it stays until the entry is deleted.
_CACHE_DAMAGE = ("Read less bytes than requested", "Serialized cache key does not match",
                 "Serialized HLO does not match", "No binary found in serialized entry")


@contextlib.contextmanager
def cache_damage_reported() -> Iterator[None]:
    """A damaged compile-cache entry as one line naming the directory and the fix."""
    try:
        yield
    except tf.errors.OpError as err:
        directory = cache_dirs.flag_directory(os.environ.get("TF_XLA_FLAGS", ""))
        damage = next((words for words in _CACHE_DAMAGE if words in (err.message or "")), None)
        if directory is None or damage is None:
            raise
        raise UsageError(f"XLA's compile cache {directory} holds a damaged entry ({damage}): delete that "
                         f"directory and run again, or set {cache_dirs.XLA_CACHE_SWITCH}=0") from None
