"""The one hyperparameter object every part of the trainer reads.

Flags (trainer/flags.py) build it, code receives it, nothing reads flags directly. It is frozen,
written next to the checkpoints as `hparams.json`, and read back by evaluate/babble/serve so a
job dir explains itself.

Fields fall in two groups:
- SHAPE_FIELDS fix the checkpoint's variables. They name the job dir (`%JOB%`) and must match
  an existing checkpoint.
- Everything else (learning rate, unroll length, epochs, ...) may change between runs of the
  same job dir: a rerun with another learning rate continues the same model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from preprocessing import contract
from trainer import budget

JOB_PLACEHOLDER = "%JOB%"
HPARAMS_FILE = "hparams.json"
CHOSEN_KEY = "chosen"  # hparams.json's record of the model chosen for --time_budget (trainer.choose)

CELLS = ("lstm", "gru", "rnn", "mlstm", "mogrifier", "qrnn", "transformer")
LANGUAGE_MODELS = contract.TOKENIZERS
# A vocab_size that stands for any size in a job name: loaders find a bpe/unigram job dir
# without being told its vocabulary size (trainer.checkpoints globs for it).
ANY_VOCAB_SIZE = -1
OPTIMIZERS = ("adam", "rmsprop", "sgd", "ntasgd")
LR_SCHEDULES = ("constant", "linear", "cosine")
POS_ENCODINGS = ("none", "sinusoidal", "learned", "rotary")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
XLA_MODES = ("auto", "off", "step", "fusion")  # trainer/xla.py
# Cells whose matmuls honour --precision=bfloat16/float16 (trainer/models/precision.py); the other
# zoo cells (mlstm, mogrifier, qrnn) compute in float32 whatever --precision says.
BF16_CELLS = ("lstm", "gru", "rnn", "transformer")
# Cells with a --layer_norm variant (trainer/models/recurrent.py). The transformer always
# normalises; mlstm, mogrifier and qrnn have none, so the flag would be silently ignored.
LAYER_NORM_CELLS = ("lstm", "gru", "rnn")
# /proc/cpuinfo flags of native bf16 matmuls: oneDNN runs bf16 matmuls ~1.8x faster than float32
# with them, and emulates bf16 (slower than float32) without them.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclasses.dataclass(frozen=True)
class HParams:
    # --- data ---
    data_dir: str = ""
    data_prefix: str = ""
    # None until resolved from the data's metadata.
    language_model: str | None = None
    vocab_size: int = 0

    # --- model shape: these fix the checkpoint (see SHAPE_FIELDS) ---
    cell: str = "lstm"
    layers: int = 2
    lstm_state_size: int = 512
    embedding_size: int = 128
    layer_norm: bool = False
    tie_embeddings: bool = False
    weight_norm: bool = False
    mogrify_rounds: int = 5
    mogrify_rank: int = 0
    # Recurrent cells: one attention head over the top layer's last N outputs (0: none;
    # trainer.models.attention).
    attention_window: int = 0
    d_model: int = 256
    heads: int = 4
    # Rotary: 1.757 nats/char on bench/quality.py --compare's transformer recipe, against 1.933
    # with the relative distance bias (the default until 2026-12-06) and 1.891 with absolute
    # learned positions; and exact in a sampled stream of any length (docs/models.md).
    pos_encoding: str = "rotary"
    # Keys a query attends, itself included (distances 0..max_context-1). At most --unroll_steps
    # (validate): training windows show distances up to unroll_steps - 1, and sampling must not
    # reach farther back than training did.
    max_context: int = 128

    # --- regularisation (AWD-LSTM); free to change between runs ---
    dropout: float = 0.0
    embed_dropout: float = 0.0
    input_dropout: float = 0.0
    weight_drop: float = 0.0
    ar_alpha: float = 0.0
    tar_beta: float = 0.0

    # --- optimisation ---
    # Defaults tuned for quality per wall-clock minute on a 2-core CPU (bench/README.md, quality
    # trials): 2x512 at batch 32, Adam 5e-3 with a 20-step warm-up reached 1.63-1.65 nats/char on
    # tinyshakespeare in 120 s (batch 64 at 2e-3: 1.90).
    batch_size: int = 32
    unroll_steps: int = 128
    epochs: int = 1
    max_steps: int = 0  # 0: as many as `epochs` take
    learning_rate: float = 5e-3
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    warmup_steps: int = 20
    # Where linear and cosine decay end (0: at zero); a small GPT's recipe ends at 0.1x its peak.
    min_learning_rate: float = 0.0
    # Wall clock for the whole run (`90s`, `10m`, `1h30m`; "" for none), start-up and the final
    # evaluation, checkpoint, sample and export included, across preemptions (trainer.budget).
    # It replaces --epochs/--max_steps, and --lr_schedule's decay follows the time spent.
    time_budget: str = ""
    # Adam's second-moment decay; 0.99 suits short runs (the small GPT's recipe).
    adam_beta2: float = 0.999
    # Decoupled weight decay (AdamW) on weight matrices and embeddings, never on biases or
    # layer-norm scales; 0: plain Adam.
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    # Stateful TBPTT carries each stream's state through the epoch, so without resets a model
    # meets a zero state once an epoch and writes garbage from a cold start (a short prime).
    # Each stream restarts from zero every N windows, staggered so 1/N of the batch does each step.
    state_reset_windows: int = 32
    seed: int = 1
    # "auto": bfloat16 matmuls where they are native and fast (see resolve_precision), else
    # float32. Resolved on the training machine (runner.prepare_job; bench/train.py explicitly),
    # so hparams.json holds the concrete value. Models never resolve it themselves (build_model
    # stays pure: no /proc/cpuinfo, no device query) and compute an unresolved "auto" in float32.
    precision: str = "auto"
    # Windows per compiled call. Above 1 the training loop runs inside one tf.function per call
    # (Keras' steps_per_execution): what keeps a TPU busy, where each call has a fixed host cost.
    steps_per_execution: int = 1
    # How the training step is compiled: off, step (all of it by XLA), fusion (XLA between the
    # matmuls) or auto (trainer/xla.py). Resolved on the training machine, like precision.
    xla: str = "auto"
    # The batch's streams as this many equal slices, each run forward and backward on its own in
    # the step (their losses averaged: the batch's loss). XLA's CPU runtime (and TensorFlow's
    # executor) runs work that does not depend on other work at the same time, so slices keep two
    # cores busy where one batch's ops ran one after another. 0: auto (trainer/xla.py), resolved
    # like --xla.
    batch_splits: int = 0

    # --- fine-tuning and embeddings ---
    init_from: str = ""
    word2vec_embedding: str = ""
    freeze_embedding: bool = False

    # --- bookkeeping ---
    job_dir: str = ""
    summary_dir: str = ""
    save_checkpoints_steps: int = 500  # 0: only at the end and on SIGTERM/SIGINT
    keep_checkpoint_max: int = 5
    eval_every: int = 500
    eval_steps: int = 0  # 0: the whole validation split
    log_every: int = 50
    sample_every: int = 500
    sample_length: int = 200

    def replace(self, **changes: Any) -> HParams:
        return dataclasses.replace(self, **changes)

    def validate(self) -> HParams:
        """Raises ValueError naming the flag for any value out of range; returns self."""
        choices = {
            "cell": CELLS, "optimizer": OPTIMIZERS, "lr_schedule": LR_SCHEDULES,
            "pos_encoding": POS_ENCODINGS, "precision": PRECISIONS, "xla": XLA_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if self.language_model is not None and self.language_model not in LANGUAGE_MODELS:
            raise ValueError(f"--language_model={self.language_model!r}: choose one of "
                             f"{', '.join(LANGUAGE_MODELS)}")
        positive = ("layers", "lstm_state_size", "embedding_size", "batch_size", "unroll_steps",
                    "d_model", "heads", "max_context", "keep_checkpoint_max", "steps_per_execution")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name}={getattr(self, name)}: must be positive")
        for name in ("dropout", "embed_dropout", "input_dropout", "weight_drop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name}={getattr(self, name)}: must be in [0, 1)")
        non_negative = {"state_reset_windows": "0: never", "save_checkpoints_steps": "0: only at the "
                        "end and on SIGTERM/Ctrl-C", "mogrify_rounds": "0: a plain LSTM",
                        "mogrify_rank": "0: full rank", "attention_window": "0: none",
                        "batch_splits": "0: auto"}
        for name, zero in non_negative.items():
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)}: must be >= 0 ({zero})")
        if self.layer_norm and self.cell not in LAYER_NORM_CELLS:
            always = " (it always normalises)" if self.cell == "transformer" else ""
            raise ValueError(f"--layer_norm: --cell={self.cell} has no layer-norm variant{always}; "
                             f"drop --layer_norm (it exists for {', '.join(LAYER_NORM_CELLS)})")
        if self.precision in ("bfloat16", "float16") and self.cell not in BF16_CELLS:
            raise ValueError(f"--precision={self.precision}: --cell={self.cell} computes in float32 "
                             f"(16-bit matmuls exist for {', '.join(BF16_CELLS)}); use --precision=auto "
                             "or float32")
        if self.batch_splits and self.batch_size % self.batch_splits:
            raise ValueError(f"--batch_splits={self.batch_splits}: must divide "
                             f"--batch_size={self.batch_size}")
        if self.xla == "step" and self.cell != "transformer":
            raise ValueError(f"--xla=step compiles the transformer's step; --cell={self.cell} runs ops "
                             "XLA cannot compile (its recurrence): use --xla=off or auto")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate={self.learning_rate}: must be positive")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"--min_learning_rate={self.min_learning_rate}: must be in [0, --learning_rate]")
        if self.time_budget:
            budget.parse_duration(self.time_budget)
            if self.max_steps:
                raise ValueError(f"--max_steps={self.max_steps}: --time_budget={self.time_budget} "
                                 "decides when training stops; drop one of them")
        if not 0 < self.adam_beta2 < 1:
            raise ValueError(f"--adam_beta2={self.adam_beta2}: must be in (0, 1)")
        if self.weight_decay < 0 or (self.weight_decay and self.optimizer != "adam"):
            raise ValueError(f"--weight_decay={self.weight_decay}: must be >= 0, and goes with "
                             "--optimizer=adam (it makes it AdamW)")
        if not 0 <= self.seed < 2 ** 63:  # it seeds TensorFlow's int64 stateless random ops
            raise ValueError(f"--seed={self.seed}: must be in [0, 2**63)")
        if self.cell == "transformer" and self.d_model % self.heads:
            raise ValueError(f"--d_model={self.d_model} must be divisible by --heads={self.heads}")
        if self.cell == "transformer" and self.max_context > self.unroll_steps:
            raise ValueError(f"--max_context={self.max_context} is longer than the training windows "
                             f"(--unroll_steps={self.unroll_steps}): sampling would attend distances "
                             f"training never showed; give --unroll_steps={self.max_context} or "
                             f"--max_context={self.unroll_steps}")
        depth = self.d_model // self.heads
        if self.cell == "transformer" and self.pos_encoding == "rotary" and depth % 2:
            raise ValueError(f"--pos_encoding=rotary rotates pairs of each head's {depth} dimensions, "
                             "which must be even: change --d_model or --heads")
        return self

    def to_json(self, chosen: dict[str, Any] | None = None) -> str:
        """hparams.json; `chosen`: how trainer.choose chose the model (--time_budget), kept
        beside the values as a record, never read back as hyperparameters."""
        body = dataclasses.asdict(self)
        if chosen is not None:
            body[CHOSEN_KEY] = chosen
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = HPARAMS_FILE) -> HParams:
        body = json.loads(text)
        body.pop(CHOSEN_KEY, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - known)
        if unknown:
            raise ValueError(f"{source}: unknown hyperparameters {unknown}")
        return cls(**body)


# Fields that fix the variables of a checkpoint, per cell. `vocab_size` and `language_model`
# come from the data and are checked separately (a clearer error names the data).
# `layer_norm` only where a cell implements it (LAYER_NORM_CELLS): elsewhere validate refuses it.
_COMMON_SHAPE = ("embedding_size", "tie_embeddings")
_ATTENTION_SHAPE = ("attention_window",)
_STACK_SHAPE = ("layers", "lstm_state_size") + _COMMON_SHAPE + _ATTENTION_SHAPE
_RECURRENT_SHAPE = ("layers", "lstm_state_size", "layer_norm") + _COMMON_SHAPE + _ATTENTION_SHAPE
SHAPE_FIELDS: dict[str, tuple[str, ...]] = {
    "lstm": _RECURRENT_SHAPE,
    "gru": _RECURRENT_SHAPE,
    "rnn": _RECURRENT_SHAPE,
    "qrnn": _STACK_SHAPE,
    "mlstm": _STACK_SHAPE + ("weight_norm",),
    "mogrifier": _STACK_SHAPE + ("mogrify_rounds", "mogrify_rank"),
    "transformer": ("layers", "d_model", "heads", "pos_encoding", "max_context") + _COMMON_SHAPE,
}

_DEFAULTS = HParams()


def auto_precision(cell: str, cpu_flags: frozenset[str], has_gpu: bool, has_tpu: bool = False,
                   xla: str = "off", xla_bf16_matmul: bool = False) -> str:
    """What --precision=auto means on a machine, for a cell that honours 16-bit matmuls:
    bfloat16 on a TPU (its native matmul type), float16 with loss scaling on a GPU (tensor cores;
    the usual mixed-precision recipe, not measured here: no GPU), bfloat16 on a CPU with native
    bf16 matmuls unless XLA compiles the whole step there (`xla` = "step": its CPU dot gained
    nothing from bfloat16, trainer/xla.py) and verne's own bfloat16 matmul cannot run there
    (`xla_bf16_matmul`: kernels.xla_bf16_matmul_here); float32 otherwise and for the zoo cells."""
    if cell not in BF16_CELLS:
        return "float32"
    if has_tpu:
        return "bfloat16"
    if has_gpu:
        return "float16"
    return "bfloat16" if cpu_flags & BF16_CPU_FLAGS and (xla != "step" or xla_bf16_matmul) else "float32"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The `flags` of the first CPU in /proc/cpuinfo; empty where there is none (macOS)."""
    try:
        with open(cpuinfo, encoding="utf-8") as lines:
            for line in lines:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first CPU's vendor, family and model in /proc/cpuinfo ("AuthenticAMD 25 17"); "" where
    there is none. Two CPU generations can show the same `flags` (a virtual machine's AMD EPYC
    Zen 4 and Zen 5 did), and what is compiled for one is tuned for it: caches of compiled code are
    keyed by both."""
    fields = {}
    try:
        with open(cpuinfo, encoding="utf-8") as lines:
            for line in lines:
                if not line.strip():
                    break  # the first CPU's block ends
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        return ""
    return " ".join(fields[name] for name in ("vendor_id", "cpu family", "model") if name in fields)


def resolve_precision(hparams: HParams, on_tpu: bool = False) -> HParams:
    """hparams with --precision=auto replaced by the concrete precision for this machine
    (`on_tpu`: the trainer runs under a TPUStrategy)."""
    if hparams.precision != "auto":
        return hparams
    import tensorflow as tf  # here, not at import: hparams.py is read by light tools too

    from trainer import kernels  # here: kernels imports TensorFlow and reads this module

    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    native_matmul = hparams.xla == "step" and not (has_gpu or on_tpu) and kernels.xla_bf16_matmul_here()
    return hparams.replace(precision=auto_precision(hparams.cell, cpu_flags(), has_gpu, on_tpu, hparams.xla,
                                                    native_matmul))


def shape_of(hparams: HParams) -> dict[str, Any]:
    """The hyperparameters that fix the checkpoint's variables, plus cell and data kind."""
    fields = ("cell", "language_model", "vocab_size") + SHAPE_FIELDS[hparams.cell]
    return {name: getattr(hparams, name) for name in fields}


def job_name(hparams: HParams) -> str:
    """`{prefix}-{state}-states-{layers}-layers[-norm]-{lm}` plus what differs from the defaults.

    The seed's form, extended only for shape hyperparameters that are not at their defaults,
    so the names users already have keep meaning the same model.
    """
    if hparams.language_model is None:
        raise ValueError("job_name needs language_model; resolve it from the data first")
    width = hparams.d_model if hparams.cell == "transformer" else hparams.lstm_state_size
    parts = [hparams.data_prefix or "model", f"{width}-states", f"{hparams.layers}-layers"]
    if hparams.layer_norm and "layer_norm" in SHAPE_FIELDS[hparams.cell]:
        parts.append("norm")
    parts.append(_language_model_part(hparams.language_model, hparams.vocab_size))
    if hparams.cell != _DEFAULTS.cell:
        parts.append(hparams.cell)
    for name in SHAPE_FIELDS[hparams.cell]:
        if name in ("layers", "lstm_state_size", "d_model", "layer_norm"):
            continue
        value = getattr(hparams, name)
        if value != getattr(_DEFAULTS, name):
            parts.append(_name_part(name, value))
    return "-".join(parts)


def _language_model_part(language_model: str, vocab_size: int) -> str:
    """`char`, `byte`, `word`; a learned tokenizer with its size (`bpe8k`, `unigram500`), since
    two sizes are two different models of the same data."""
    if language_model not in contract.SUBWORD_TOKENIZERS:
        return language_model
    if vocab_size == ANY_VOCAB_SIZE:
        return f"{language_model}*"
    if vocab_size <= 0:
        raise ValueError(f"job_name needs vocab_size for a {language_model} model; resolve it from the "
                         "data first or give --vocab_size")
    size = f"{vocab_size // 1000}k" if vocab_size and vocab_size % 1000 == 0 else str(vocab_size)
    return f"{language_model}{size}"


_NAME_ABBREVIATIONS = {
    "embedding_size": "emb", "tie_embeddings": "tied", "weight_norm": "wn",
    "mogrify_rounds": "mog", "mogrify_rank": "rank", "heads": "heads",
    "pos_encoding": "pos", "max_context": "ctx", "attention_window": "attn",
}


def _name_part(name: str, value: Any) -> str:
    short = _NAME_ABBREVIATIONS.get(name, name)
    if isinstance(value, bool):
        return short if value else f"no{short}"
    return f"{short}{value}"


def resolve_job_dirs(hparams: HParams) -> HParams:
    """Replaces %JOB% in job_dir and summary_dir by job_name(hparams)."""
    name = job_name(hparams)
    return hparams.replace(
        job_dir=hparams.job_dir.replace(JOB_PLACEHOLDER, name),
        summary_dir=hparams.summary_dir.replace(JOB_PLACEHOLDER, name),
    )


def shape_mismatches(saved: HParams, wanted: HParams) -> list[str]:
    """Human-readable `--flag: saved X, given Y` for every shape field that differs."""
    a, b = shape_of(saved), shape_of(wanted)
    return [f"--{k}: job dir has {a.get(k)!r}, flags give {b.get(k)!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
