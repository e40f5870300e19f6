"""Training speed of verne's char model against a PyTorch reference of the same size, in one run.

    .venv/bin/python -m bench.train [--cell lstm|gru] [--layers 2] [--state 512] [--precision ...]
    .venv/bin/python -m bench.train --shape ptb-medium     # word-level: vocab 10,000, 2x650 tied
    .venv/bin/python -m bench.train --shape gpt-baby       # transformer 4x4x128, block 64, batch 12
    .venv/bin/python -m bench.train --shape gpt-small      # transformer 6x6x384, block 256, batch 32

Prints tokens/s of verne's real train step (trainer.models.build_model + trainer.loops, the code
`trainer.task` runs) and of torch 2.13 `nn.LSTM`/`nn.GRU` (fp32, and with bfloat16 autocast as extra
information), measured in interleaved blocks after warm-up (medians); model-FLOPs utilisation
against float32 / bfloat16 matmuls measured in the same run; how a verne step splits into
forward, backward, optimizer and input; the input pipeline's own rate on GZIP shards; peak RSS.
The header names the CPU, its bfloat16 instruction set (`amx`, `avx512_bf16` or none) and the
recurrence verne ran (for the transformer: how XLA compiled its step, --xla). The GPT shapes run
verne's transformer against bench/gpt_reference.py's GPT with the same recipe (tied embeddings,
AdamW with weight decay 0.1 on matrices, betas 0.9/0.99, clip 1).
`ratio verne/pytorch: R.RRx` is verne at --precision over torch fp32; the
last line, `ratio verne/pytorch-best: R.RRx`, is verne over the faster of torch fp32 and torch bf16
autocast in the same run, with verne's MFU against the bfloat16 matmul ceiling on the line before.

torch is never a verne dependency: the first run creates bench/.venv-torch (no system site
packages) and installs torch there; the reference runs as a subprocess (bench/torch_reference.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf
from absl import app, flags

from preprocessing import contract
from trainer import data, kernels, loops, runner, xla
from trainer.errors import UsageError, run_cli
from trainer.hparams import HParams, resolve_precision
from trainer.kernels import native
from trainer.model_fn import Mode, Params, model_fn
from trainer.models import build_model

BENCH_DIR = Path(__file__).resolve().parent
TORCH_PIN = "torch==2.13.0"
# What the torch venv holds: the references, and bench/budget.py's plot.
TORCH_PACKAGES = (TORCH_PIN, "numpy", "matplotlib==3.11.2")

flags.DEFINE_enum("shape", "char", ["char", "ptb-medium", "gpt-baby", "gpt-small"],
                  "char: the char model the flags below describe; ptb-medium: the word-level "
                  "PTB-medium shape (vocab 10,000, embedding 650 tied to the output, LSTM 2x650, "
                  "batch 20, unroll 35, dropout 0.5), which replaces those flags; gpt-baby / "
                  "gpt-small: the transformer (4 layers x 4 heads x 128, block 64, batch 12 / 6 x 6 "
                  "x 384, block 256, batch 32; char vocabulary 65) against the PyTorch GPT of "
                  "bench/gpt_reference.py.")
flags.DEFINE_enum("cell", "lstm", ["lstm", "gru"], "Recurrent cell of both models.")
flags.DEFINE_integer("layers", 2, "Recurrent layers.")
flags.DEFINE_integer("state", 512, "Units per recurrent layer (--lstm_state_size).")
flags.DEFINE_integer("embedding", 128, "Embedding size.")
flags.DEFINE_integer("vocab", 65, "Vocabulary size (65: tinyshakespeare's characters).")
flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_integer("unroll", 128, "Unroll steps.")
flags.DEFINE_enum("precision", HParams().precision, ["auto", "float32", "bfloat16", "float16"],
                  "verne's --precision for the headline ratio (default: verne's default; auto "
                  "resolves as trainer.task resolves it).")
flags.DEFINE_integer("repeats", 3, "Interleaved rounds (verne, torch fp32, torch bf16 each round).")
flags.DEFINE_integer("steps", 3, "Timed train steps per block.")
flags.DEFINE_integer("input_tokens", 4_000_000, "Tokens in the GZIP shards of the input benchmark.")
flags.DEFINE_string("torch_venv", str(BENCH_DIR / ".venv-torch"), "Where the torch reference lives.")
flags.DEFINE_bool("torch", True, "Run the PyTorch reference (off: verne numbers only, no ratio).")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Shape:
    cell: str
    layers: int
    state: int
    embedding: int
    vocab: int
    batch: int
    unroll: int
    dropout: float = 0.0
    tied: bool = False  # output layer = the embedding table transposed (embedding == state)
    heads: int = 0  # the transformer's; its width is `state`, its context `unroll`

    @property
    def tokens(self) -> int:
        return self.batch * self.unroll

    def train_flops_per_token(self) -> float:
        """Matmul FLOPs of one training token: forward 2*m*n per weight, backward twice that."""
        if self.cell == "transformer":
            return xla.transformer_train_flops(self.layers, self.state, self.vocab, self.batch,
                                               self.unroll) / self.tokens
        gates = {"lstm": 4, "gru": 3}[self.cell]
        forward = sum(2 * ((self.embedding if i == 0 else self.state) + self.state) * gates * self.state
                      for i in range(self.layers))
        return 3.0 * (forward + 2 * self.state * self.vocab)


# Zaremba et al.'s medium PTB model, as word-level users know it.
PTB_MEDIUM = Shape("lstm", layers=2, state=650, embedding=650, vocab=10_000, batch=20, unroll=35,
                   dropout=0.5, tied=True)
# nanoGPT's "baby GPT" for characters (bench/quality.py --compare's recipe) and a GPT-small-like
# one; both tied, as the reference.
GPT_SHAPES = {
    "gpt-baby": Shape("transformer", layers=4, state=128, embedding=128, vocab=65, batch=12, unroll=64,
                      tied=True, heads=4),
    "gpt-small": Shape("transformer", layers=6, state=384, embedding=384, vocab=65, batch=32, unroll=256,
                       tied=True, heads=6),
}


def verne_hparams(shape: Shape, precision: str) -> HParams:
    """trainer.task's hyperparameters for `shape`; the GPT shapes take the reference's recipe."""
    common = dict(vocab_size=shape.vocab, cell=shape.cell, layers=shape.layers,
                  embedding_size=shape.embedding, batch_size=shape.batch, unroll_steps=shape.unroll,
                  dropout=shape.dropout, tie_embeddings=shape.tied, precision=precision)
    if shape.cell == "transformer":
        return HParams(d_model=shape.state, heads=shape.heads, max_context=shape.unroll, weight_decay=0.1,
                       adam_beta2=0.99, grad_clip=1.0, learning_rate=1e-3, **common).validate()
    return HParams(lstm_state_size=shape.state, **common).validate()


# --------------------------------------------------------------------------- timing helpers


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_gflops(dtype: tf.DType, size: int = 2048, repeats: int = 5) -> float:
    """The matmul ceiling: best GFLOP/s of a size^3 matmul in `dtype` on this machine, now."""
    a = tf.cast(tf.random.normal([size, size]), dtype)
    b = tf.cast(tf.random.normal([size, size]), dtype)
    run = tf.function(lambda: tf.reduce_sum(tf.cast(tf.matmul(a, b)[:1], tf.float32)))
    run()
    return 2 * size ** 3 / min(timed(lambda: run().numpy()) for _ in range(repeats)) / 1e9


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------- verne


class VerneSteps:
    """verne's train step as trainer.task runs it, plus forward-only and optimizer-only twins."""

    def __init__(self, shape: Shape, precision: str) -> None:
        self.hparams = xla.resolve(verne_hparams(shape, precision))
        strategy = tf.distribute.get_strategy()
        self.params = Params(self.hparams, build_model(self.hparams))
        self.optimizer = runner.make_optimizer(self.hparams, total_steps=10_000)
        self.train_step = loops.make_train_step(self.params, self.optimizer, strategy,
                                                jit_compile=self.hparams.xla == "step")
        rng = np.random.default_rng(0)
        self.tokens = tf.constant(rng.integers(0, shape.vocab, (shape.batch, shape.unroll)), tf.int32)
        self.labels = tf.constant(rng.integers(0, shape.vocab, (shape.batch, shape.unroll)), tf.int32)
        self.state = self.params.model.window_state(shape.batch)
        # Drawn once: drawn inside the timed twin, ptb-medium's 13 M random numbers per call were
        # counted as optimizer time.
        self.grads = [tf.random.normal(v.shape, stddev=1e-3) for v in self.params.model.trainable_variables]
        jit = self.hparams.xla == "step" or None  # the twins compiled as the step is
        self.forward = tf.function(self._forward, jit_compile=jit)
        self.apply = tf.function(self._apply, jit_compile=jit)

    def _forward(self, tokens: tf.Tensor, labels: tf.Tensor, state: object) -> tf.Tensor:
        with kernels.xla_step(self.hparams.xla == "step"):  # as loops.make_train_step traces the step
            return model_fn({"tokens": tokens, "state": state}, labels, Mode.TRAIN, self.params).loss

    def _apply(self) -> tf.Tensor:
        """The optimizer's share of a step: clip and apply (small random) gradients."""
        variables = self.params.model.trainable_variables
        grads, norm = tf.clip_by_global_norm(self.grads, self.hparams.grad_clip)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        return norm

    def time_optimizer(self) -> float:
        return timed(lambda: self.apply().numpy())

    def step(self) -> float:
        loss, _, self.state = self.train_step(self.tokens, self.labels, self.state)
        return float(loss)  # waits for the step

    def time_forward(self) -> float:
        return timed(lambda: self.forward(self.tokens, self.labels, self.state).numpy())



# --------------------------------------------------------------------------- torch


def ensure_torch_venv(venv: Path) -> Path:
    """The venv's python with torch importable; creates the venv and installs torch if needed."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import torch, numpy, matplotlib"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"installing {' '.join(TORCH_PACKAGES)} into {venv} (once) ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *TORCH_PACKAGES], check=True)
    return python


class TorchReference:
    """bench/torch_reference.py as a subprocess, driven block by block."""

    def __init__(self, python: Path, shape: Shape) -> None:
        cell = "gpt" if shape.cell == "transformer" else shape.cell
        args = [str(python), str(BENCH_DIR / "torch_reference.py"), "--cell", cell,
                "--heads", str(shape.heads),
                "--layers", str(shape.layers), "--state", str(shape.state),
                "--embedding", str(shape.embedding), "--vocab", str(shape.vocab),
                "--batch", str(shape.batch), "--unroll", str(shape.unroll),
                "--dropout", str(shape.dropout), *(["--tied"] if shape.tied else [])]
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the torch reference exited early (see its traceback above)")
        return json.loads(line)

    def run(self, steps: int, bf16: bool) -> list[list[float]]:
        self.process.stdin.write(f"run {steps} {'bf16' if bf16 else 'fp32'}\n")
        self.process.stdin.flush()
        return self._read()["splits"]

    def close(self) -> float:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        rss = self._read()["peak_rss_mib"]
        self.process.wait()
        return rss


# --------------------------------------------------------------------------- input pipeline


def write_shards(directory: str, total_tokens: int, vocab: int, shards: int = 4) -> list[str]:
    """GZIP TFRecord shards named and encoded as preprocessing writes them, of random tokens."""
    rng = np.random.default_rng(1)
    per_shard = total_tokens // shards
    prefix = contract.shard_prefix(directory, "bench", "train")
    for index in range(shards):
        path = f"{prefix}-{index:05d}-of-{shards:05d}{contract.SHARD_SUFFIX}"
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for start in range(0, per_shard, contract.DEFAULT_RECORD_TOKENS):
                size = min(contract.DEFAULT_RECORD_TOKENS, per_shard - start)
                writer.write(contract.serialize_example(rng.integers(0, vocab, size).tolist()))
    return data.shard_files(directory, "bench", "train")


def input_tokens_per_second(shape: Shape, total_tokens: int) -> tuple[float, float]:
    """(tokens/s of trainer.data.windows over a whole epoch of GZIP shards, RSS growth MiB)."""
    with tempfile.TemporaryDirectory() as directory:
        files = write_shards(directory, total_tokens, shape.vocab)
        layout = data.layout_for(total_tokens, shape.batch, shape.unroll)
        rss_before = peak_rss_mib()
        start, windows = time.perf_counter(), 0
        for _ in data.windows(files, layout):
            windows += 1
        seconds = time.perf_counter() - start
    return windows * shape.tokens / seconds, peak_rss_mib() - rss_before


# --------------------------------------------------------------------------- report


def median_rate(seconds: list[float], tokens: int) -> float:
    return tokens / statistics.median(seconds)


def header(shape: Shape, torch_info: dict | None, xla_mode: str) -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    torch = f", torch {torch_info['torch']} ({torch_info['threads']} threads)" if torch_info else ""
    extras = (f", dropout {shape.dropout}" if shape.dropout else "") + (", tied output" if shape.tied else "")
    if shape.cell == "transformer":
        model = (f"model: transformer {shape.layers} layers x {shape.heads} heads x {shape.state}, block "
                 f"{shape.unroll}, vocab {shape.vocab}, batch {shape.batch}{extras}, AdamW 0.1, clip 1")
        matmul = ("verne's native XLA custom call" if xla_mode == "step" and kernels.xla_bf16_matmul_here()
                  else "XLA's dot" if xla_mode == "step" else "oneDNN")
        compiled = f"compiled: --xla={xla_mode}; bfloat16 matmuls: {matmul}"
    else:
        model = (f"model: {shape.cell} {shape.layers}x{shape.state}, embedding {shape.embedding}, vocab "
                 f"{shape.vocab}, batch {shape.batch}, unroll {shape.unroll}{extras}, Adam, clip 5")
        compiled = f"recurrence: {native.describe()}"
    return [f"machine: {cpu}, {os.cpu_count()} cores, bf16 ISA {kernels.cpu_bf16_isa()}, "
            f"load average {os.getloadavg()[0]:.1f}",
            f"versions: Python {platform.python_version()}, tensorflow {tf.__version__}{torch}",
            f"{model}; {shape.train_flops_per_token() / 1e6:.1f} MFLOP per training token", compiled]


def main(argv: list[str]) -> None:
    del argv
    shape = {"ptb-medium": PTB_MEDIUM, **GPT_SHAPES}.get(FLAGS.shape) or Shape(
        FLAGS.cell, FLAGS.layers, FLAGS.state, FLAGS.embedding, FLAGS.vocab, FLAGS.batch, FLAGS.unroll)
    if FLAGS.repeats < 1 or FLAGS.steps < 1:
        raise UsageError("--repeats and --steps must be at least 1")
    xla_mode = xla.resolve(verne_hparams(shape, "float32")).xla  # as trainer.task resolves it
    if xla_mode == "fusion":
        tf.config.optimizer.set_jit("autoclustering")  # as xla.fusion does for trainer.task
    # The input pipeline first: it is quick, and a broken data path should fail before the long part.
    input_rate, input_rss = input_tokens_per_second(shape, FLAGS.input_tokens)
    print(f"input pipeline: {input_rate:,.0f} tokens/s", flush=True)
    torch_ref = TorchReference(ensure_torch_venv(Path(FLAGS.torch_venv)), shape) if FLAGS.torch else None
    # Resolved as trainer.task resolves it, so the headline is what a default run gets here.
    FLAGS.precision = resolve_precision(HParams(cell=shape.cell, precision=FLAGS.precision,
                                                xla=xla_mode)).precision
    other = "bfloat16" if FLAGS.precision == "float32" else "float32"
    verne = {p: VerneSteps(shape, p) for p in (FLAGS.precision, other)}
    for steps in verne.values():  # warm-up: tracing, oneDNN primitive caches
        for _ in range(2):
            steps.step()
        steps.time_forward()
        steps.time_optimizer()

    times: dict[str, list[float]] = {name: [] for name in
                                     (*verne, "forward", "optimizer", "torch fp32", "torch bf16")}
    torch_splits: list[list[float]] = []
    peaks = {"float32": 0.0, "bfloat16": 0.0}
    for round_ in range(FLAGS.repeats):
        print(f"round {round_ + 1}/{FLAGS.repeats} ...", flush=True)
        for dtype, name in ((tf.float32, "float32"), (tf.bfloat16, "bfloat16")):
            peaks[name] = max(peaks[name], matmul_gflops(dtype))
        for precision, steps in verne.items():
            times[precision] += [timed(steps.step) for _ in range(FLAGS.steps)]
        head = verne[FLAGS.precision]
        times["forward"] += [head.time_forward() for _ in range(FLAGS.steps)]
        times["optimizer"] += [head.time_optimizer() for _ in range(FLAGS.steps)]
        if torch_ref:
            for bf16, name in ((False, "torch fp32"), (True, "torch bf16")):
                splits = torch_ref.run(FLAGS.steps, bf16)
                times[name] += [sum(s) for s in splits]
                if not bf16:
                    torch_splits += splits
    torch_rss = torch_ref.close() if torch_ref else None

    flops = shape.train_flops_per_token()
    rates = {name: median_rate(seconds, shape.tokens) for name, seconds in times.items()
             if name not in ("forward", "optimizer") and seconds}
    lines = header(shape, torch_ref.info if torch_ref else None, xla_mode)
    lines.append(f"matmul ceiling (2048^3, best of run): float32 {peaks['float32']:.0f} GFLOP/s, "
                 f"bfloat16 {peaks['bfloat16']:.0f} GFLOP/s")
    lines.append(f"{'implementation':<34}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU fp32':>10}{'MFU bf16':>10}")
    for name, rate in rates.items():
        reference = "GPT" if shape.cell == "transformer" else f"nn.{shape.cell.upper()}"
        label = f"verne --precision={name}" if name in verne else f"{name} ({reference})"
        achieved = rate * flops / 1e9
        lines.append(f"{label:<34}{rate:>10.0f}{achieved:>9.0f}{achieved / peaks['float32']:>10.0%}"
                     f"{achieved / peaks['bfloat16']:>10.0%}")
    # Fastest runs: differences of medians go negative when other processes steal the CPU.
    step, forward, optimizer = (min(times[name]) for name in (FLAGS.precision, "forward", "optimizer"))
    lines.append(f"verne --precision={FLAGS.precision} step {step * 1e3:.0f} ms = "
                 f"forward {forward * 1e3:.0f} + backward {(step - forward - optimizer) * 1e3:.0f} "
                 f"+ optimizer/clip {optimizer * 1e3:.0f} (fastest runs); "
                 f"input {shape.tokens / input_rate * 1e3:.1f} ms per window (prefetched, overlaps the step)")
    if torch_splits:
        f, b, o = (statistics.median(column) * 1e3 for column in zip(*torch_splits, strict=True))
        lines.append(f"torch fp32 step: forward {f:.0f} + backward/clip {b:.0f} + optimizer {o:.0f} ms")
    lines.append(f"input pipeline (trainer.data.windows, {FLAGS.input_tokens:,} tokens in 4 GZIP shards): "
                 f"{input_rate:,.0f} tokens/s = {input_rate / rates[FLAGS.precision]:.1f}x the train step's "
                 f"consumption; peak RSS grew {input_rss:.0f} MiB while streaming")
    torch_mem = f", torch reference {torch_rss:.0f} MiB" if torch_rss is not None else ""
    lines.append(f"peak RSS: verne benchmark process {peak_rss_mib():.0f} MiB{torch_mem}")
    if torch_ref:
        lines.append(f"ratio verne bf16/torch bf16 autocast: {rates['bfloat16'] / rates['torch bf16']:.2f}x "
                     "(extra information)")
        lines.append(f"ratio verne/pytorch: {rates[FLAGS.precision] / rates['torch fp32']:.2f}x")
        best = max(("torch fp32", "torch bf16"), key=rates.__getitem__)
        mfu = rates[FLAGS.precision] * flops / 1e9 / peaks["bfloat16"]
        lines.append(f"pytorch-best: {best} ({rates[best]:.0f} tokens/s); "
                     f"verne --precision={FLAGS.precision} MFU {mfu:.0%} of the bfloat16 ceiling")
        lines.append(f"ratio verne/pytorch-best: {rates[FLAGS.precision] / rates[best]:.2f}x")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    app.run(run_cli(main))
