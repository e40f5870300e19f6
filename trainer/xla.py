"""How the training step is compiled (--xla), and what `auto` means on a machine.

- `off`: TensorFlow's graph and kernels (oneDNN for matmuls on x86). The recurrent cells: their
  step is a handful of large matmuls and a native recurrence op.
- `step`: the whole training step compiled by XLA (`jit_compile`). A small transformer's step on
  a CPU is mostly per-op cost, not arithmetic: bench/train.py --shape gpt-baby (4x4x128, 768
  tokens a step) took 24 ms compiled against 34 ms as a graph (AMD EPYC, float32). XLA's CPU dot
  gains nothing from bfloat16 there (34 ms), so `--precision auto` keeps float32 with it.
- `fusion`: TensorFlow's oneDNN kernels for the matmuls and XLA for the elementwise ops between
  them (TensorFlow's auto-clustering of fusible ops on the CPU). For a large transformer, whose
  matmuls are worth bfloat16: --shape gpt-small (6x6x384, 8,192 tokens a step) took 1.30-1.40 s
  a step this way in bfloat16, 1.58-1.68 s as a plain graph, 2.6 s compiled whole.

`auto`: for the transformer on a CPU, `step` below STEP_XLA_FLOPS matmul FLOPs per training step
and `fusion` above; `off` otherwise (recurrent cells; GPUs and TPUs, not measured here: on a TPU
everything is XLA already).
"""

from __future__ import annotations

import os

from trainer.hparams import HParams

# Between gpt-baby's 3.6 GFLOP a step (per-op cost dominates) and gpt-small's 520 (arithmetic
# does); the crossover in between was not measured.
STEP_XLA_FLOPS = 30e9
# TensorFlow reads these once per process, at its first graph optimisation.
_FUSION_FLAGS = ("--tf_xla_auto_jit=2", "--tf_xla_cpu_global_jit", "--tf_xla_ops_to_cluster=FUSIBLE")


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


def resolve(hparams: HParams, replicas: int = 1, accelerator: bool = False) -> HParams:
    """hparams with --xla=auto replaced by its concrete mode for this machine (`accelerator`: a
    GPU or TPU). A whole compiled step needs one replica (no cross-device reduction inside it)."""
    if hparams.xla != "auto":
        return hparams
    flops = (transformer_train_flops(hparams.layers, hparams.d_model, hparams.vocab_size,
                                     hparams.batch_size, hparams.unroll_steps)
             if hparams.cell == "transformer" else 0.0)
    mode = auto_xla(hparams.cell, flops, on_cpu=not accelerator)
    return hparams.replace(xla="fusion" if mode == "step" and replicas > 1 else mode)


def enable_fusion() -> bool:
    """Turns on XLA's clustering of fusible ops for this process; True if TensorFlow had not read
    its XLA flags yet (it reads them at its first graph optimisation, so call this first)."""
    flags = os.environ.get("TF_XLA_FLAGS", "")
    missing = [flag for flag in _FUSION_FLAGS if flag not in flags]
    os.environ["TF_XLA_FLAGS"] = " ".join([flags, *missing]).strip()
    return bool(missing)
