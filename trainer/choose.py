"""`--time_budget` without shape flags: the model chosen for the corpus and this machine.

Three parts:
- the rule's data: CANDIDATES and the named thresholds below, with the measurements they rest
  on. The lead's measured sweep changes these, and nothing else.
- `choose(corpus_tokens, train_seconds, rates)`, the pure rule: the largest candidate that sees
  enough tokens per parameter in the training time at its measured rate, on a corpus big enough
  for it; dropout when it would see the corpus more than OVERFIT_EPOCHS times.
- `for_budget(...)`, what the runner calls before the hyperparameters are final: it keeps every
  flag given on the command line, measures the candidates that could win (`calibrate`: the
  trainer's own train step on the real data, for a few seconds each, within CALIBRATION_SHARE of
  the budget), applies the rule, and returns the hyperparameters with a record of the choice for
  hparams.json. A job dir that already has an hparams.json keeps its model: a resumed job never
  chooses again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from trainer.budget import format_duration, parse_duration
from trainer.errors import UsageError
from trainer.hparams import SHAPE_FIELDS, HParams, cpu_flags

# --------------------------------------------------------------------------- the rule's data
#
# Measured points the thresholds rest on (bench/README.md; 2-core AMD EPYC Zen 5 with
# AVX512-BF16 unless said; "tok/p": training tokens seen per model parameter):
#
# | shape (parameters)          | corpus                  | wall clock  | tok/s | tok/p | epochs | nats/char |
# |-----------------------------|-------------------------|-------------|-------|-------|--------|-----------|
# | LSTM 2x512 (3.45 M)         | tinyshakespeare, 1 M    | 85 s        | ~29 k | 0.67  | 2.3    | 1.548     |
# | transformer 4x4x128 (0.8 M) | tinyshakespeare         | 85 s (62 s) | ~27 k | 1.9   | 1.5    | 1.757     |
# | LSTM 2x512                  | tinyshakespeare         | 600 s       | ~29 k | 5.0   | 16     | 1.539     |
# | LSTM 2x512, dropout 0.25    | tinyshakespeare         | 600 s       | ~29 k | 4.9   | 16     | 1.463     |
# | LSTM 2x512                  | 38 books, 20.8 M, Intel | 509 s       | —     | —     | < 1    | 1.397 (*) |
# | transformer 6x6x384 (10.7 M)| bench/train.py --shape gpt-small, speed only | ~6.4 k | — | — | —  |
# (*) the GPT reference given the same 509 s: 1.454.
#
# bench/budget.py's corpora, 2026-12-06 (AMD EPYC; whole validation split; bench/results/*.json):
# - shelf (20.9 M tokens, 6 held-out books), --time_budget 10m, LSTM 2x512 (what this rule picks
#   there): 556 s, ~23 k tok/s, 3.7 tok/p, 0.6 epochs: 1.658; the GPT reference 1.660.
# - the same with the transformer 4x4x128 (the GPT recipe): spoiled, its step-500 evaluation of
#   the validation split took 16 minutes (evaluation compiled by XLA since).
# - tinyshakespeare, --time_budget 1m, LSTM 2x512 (nothing measured): 197 steps, 45 s: 1.991;
#   the GPT reference 2.007.
# At 10 minutes on whole held-out books the default LSTM only ties the GPT (training loss 1.36
# against the GPT's 1.47, validation equal): what wins there is not found yet.
# Second round (same machine, evaluations during training kept to 5% of the time spent):
# - shelf, 10m, LSTM 2x512 (chosen): 3,053 steps, 1.5966 (GPT 1.6600); the transformer 4x4x128
#   with the GPT recipe (lr 1e-3, batch 12; given by flags): 20,592 steps, 1.6718; with lr 4e-3
#   and batch 24: 12,795 steps, 1.6225.
# - tinyshakespeare, 10m, LSTM 2x512 with dropout 0.25 (chosen): 3,500 steps, 1.4393 (GPT 1.5420).
# - 1m: see SHORT_BUDGET_SHAPE_* and SHORT_BUDGET_TUNING below.
# Third round: shelf, 30m, LSTM 2x512 (chosen; 3 of 4 shapes measured in 49 s): 9,505 steps, 1.8
#   epochs, 1.5258 (GPT 4x4x128 1.5788, 6x6x192 1.5950). Its evaluations of the first 526
#   validation windows: 1.5393 (step 5,500), 1.4989 (8,500), 1.5025 (9,505) while training loss
#   fell to ~1.19: on held-out books validation stalls in the second epoch, before OVERFIT_EPOCHS.
#   Dropout there not measured. At 10m on shelf: dropout 0.1 1.5891 (3,036 steps; noise ~0.02),
#   batch 64 with lr 7e-3 1.6162 (1,846 steps at the same tokens/s as batch 32).
# Fourth round (bench/README, "Fourth round": shapes given by flags, whole validation split). LSTM
#   2x384 runs 1.4-1.7x the tokens/s of 2x512 on the native op but ties it: shelf 10m 1.5555 and
#   1.6000 (2x512 1.5966; dropout 0.1 1.5891), shelf 30m with dropout 1.5240 (1.5258),
#   tinyshakespeare 10m with dropout 1.4422 (1.4393); so the rule keeps 2x512. Worse at shelf 10m:
#   2x256 1.6700; 3x384 at lr 3e-3 (the 3x768 placeholder's depth and rate) 1.7463; 2x512 on bpe
#   data (1,000 pieces) 1.6198 per character.
# Fifth round (bench/README, "Fifth round"): every LSTM candidate gets an attention head over its
#   last ATTENTION_WINDOW outputs. With it, through bench/budget.py on a slower host: shelf 10m
#   1.5640 and 1.5528 (2,391 and 2,715 steps), 30m 1.4959 (7,491 steps, 1.5 epochs);
#   tinyshakespeare 10m with dropout 0.25 1.4189 (2,343 steps).
# Sixth round (bench/README, "Sixth round"): dropout 0.1 for LSTMs past one epoch, tried at shelf
#   30m (1.8 epochs planned) and taken back: that run diverged at step ~900 (training loss 1.61 ->
#   40, gradient norm 97, at lr 4.8e-3) and was still at 3.1 by step 5,000; 1,000 steps of the same
#   model (cosine over 1,000 steps) did not. Dropout at 30 minutes on held-out books stays unknown.
#   The LSTM with the head, 2,400 steps step-matched on shelf: lr 3e-3 1.6513, 5e-3 1.5660, 7e-3
#   diverged (1.6615); with adam_beta2 0.99: 5e-3 1.5521, 7e-3 stable, 1.6076. But shelf 30m
#   with adam_beta2 0.99 spiked repeatedly (loss 5.6 at step 2,000; 1.77 on the first validation
#   windows at step 5,000; 1.7035 on the whole split at the end, against 1.4959): 5e-3 held for
#   thousands of steps is unstable either way. Not adopted.
# Seventh round (bench/README, "Seventh round"): AdamW weight decay for the LSTMs with the head
#   (LSTM_WEIGHT_DECAY). The 7e-3 run above, repeated with checkpoints every 50 steps, spiked
#   at the same step (~710), and the spike started in the head: its output's rms went 0.17 ->
#   3.4 against the LSTM's 0.36, its attention logits to 249, the output logits to 161. With
#   weight decay 0.1 the same run did not spike (gradient norm at most 0.5 after step 50) and
#   scored 1.5612 (5e-3 without it: 1.5660). Shelf 30m with it (sweep run, everything else
#   chosen): 8,979 steps, 1.4747 against 1.4959 without (7,491 steps on a slower host). Then
#   through bench/budget.py with it chosen: shelf 30m 1.4613 (9,103 steps), shelf 10m 1.5315
#   (3,043), tinyshakespeare 10m with dropout 0.25 1.3978 (3,159); the host ran faster than in
#   the fifth and sixth rounds, so part of each gain is its speed. At one minute (the LSTM a CPU
#   with AMX trains; AMX not measured) weight decay does not hurt: 600 steps of LSTM 2x512 + head
#   on tinyshakespeare, 1.5310 with it, 1.5425 without.
#   Normalising the head's queries and keys (LayerNorm) instead spiked earlier (step ~350), and a
#   LayerNorm on the head's output stalled training (loss ~3 at step 300): neither kept.
#
# The training-loss curves of the first two rows (bench/quality.py --compare) cross between 30 s
# and 40 s of wall clock: before, the transformer is ahead; after, the LSTM, which by then has seen
# 0.23-0.31 tokens per parameter. Nothing larger than the default LSTM has been trained for
# quality yet: the thresholds of the larger shapes are placeholders until the sweep (marked
# "not measured").

CALIBRATION_SHARE = 0.05  # of the budget, at most, for measuring candidates (issue #23)
# Below this budget nothing is measured: measuring the two small shapes costs ~10 s (a compiling
# call and 3 s each), a sixth of a minute, and a larger shape cannot see enough tokens in under 3
# minutes on the measured machine (12 M params x 2 tok/param at ~8 k tokens/s: 50 min).
SHORT_BUDGET_SECONDS = 180.0
# What a short budget trains instead, by the CPU's matrix unit, which decides the LSTM's speed
# (its native op runs the bfloat16 recurrence on AMX tiles, 4.6x its float32 rate) far more than
# the transformer's. 1-minute runs, each the whole validation split (bench/budget.py's corpora):
# - AMD EPYC Zen 5, AVX512-BF16, no AMX (2026-12-06, --time_budget 1m): transformer 4x4x128 1.911
#   on tinyshakespeare, 2.120 on shelf; LSTM 2x512 1.968 and 2.400 (two runs) on
#   tinyshakespeare, 2.494 on shelf.
# - Intel Xeon with AMX (issue #23's machine, 60 s of training in bench/quality.py): the LSTM
#   0.24-0.36 ahead of the GPT reference, verne's transformer 0.03-0.05 behind it (issue #22,
#   before that speed-ups).
# A GPU was not measured: it keeps the default.
SHORT_BUDGET_SHAPE_WITH_AMX = "LSTM 2x512"
SHORT_BUDGET_SHAPE_WITHOUT_AMX = "transformer 4x4x128"
# A short budget wants a higher learning rate than the GPT recipe's 1e-3 (its cosine still ends at
# 1e-4) and a larger batch than its 12 (more tokens/s: ~37 k against ~30 k). --time_budget 1m,
# transformer 4x4x128, AMD EPYC, whole validation split:
# - learning rate at batch 12: shelf 2.001 (1e-3), 1.977 (4e-3), 2.019 (8e-3); tinyshakespeare
#   1.867 (1e-3), 1.838 (4e-3). Steps varied 1,166-1,347 with the host's speed (2e-3 ran only 808
#   steps and is not counted).
# - batch at 4e-3, XLA's compile cache off: shelf 1.986 (12), 1.962 (24), 1.954 (32), 2.023 (48,
#   382 steps); tinyshakespeare 1.809 (12), 1.804 (24); 32 at 6e-3: 1.989. 24 and 32 are within
#   the host's noise on shelf; 24 was measured on both corpora.
SHORT_BUDGET_TUNING = {"transformer 4x4x128": {"learning_rate": 4e-3, "batch_size": 24}}
MEASURE_SECONDS = 3.0  # timed training after each candidate's first (compiling) call
MAX_MEASURE_STEPS = 20
# Guess of the work after training (final evaluation, checkpoint, sample, export) before the
# runner measures it: trainer/budget.py's constants add up to ~10 s for a small model.
TAIL_SECONDS = 10.0
# An LSTM trained past ~3 epochs of tinyshakespeare without dropout stops improving (1.541 at
# 86 s, 1.539 at 600 s) and dropout 0.25 makes up for it (1.463 at 600 s). Not measured for the
# transformers, nor for other dropout values.
OVERFIT_EPOCHS = 3.0
DROPOUT_MANY_EPOCHS = 0.25
# A candidate measured on another machine may run this much faster, relative to the default LSTM,
# here (a GPU favours the transformer's matmuls over the LSTM's recurrence): only candidates that
# would win at that rate are measured.
OPTIMISM = 3.0


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One shape the rule may choose, with what it needs to be chosen."""

    name: str
    overrides: Mapping[str, Any]  # HParams fields (every field in CHOSEN_FIELDS)
    # Training tokens it must see per parameter in the time it has, to be chosen over a smaller one.
    min_tokens_per_param: float
    # Training tokens the corpus must hold per parameter (0: any corpus).
    min_corpus_per_param: float
    # Tokens/s of the measured machine (see the table), for a guess before measuring here.
    reference_rate: float
    # Seconds of its first (compiling) training call, before measured.
    compile_seconds: float


# The LSTMs' attention head (trainer.models.attention): its window. Fifth round (bench/README):
# on shelf, 1,200 steps of LSTM 2x512 at the same schedule, 1.7242 without the head, 1.6525 with
# a 512-token window, at 4% fewer tokens/s (1,024: 1.6508 at 9% fewer; 2,048: 1.6393 at 27%
# fewer). At equal wall clock: the fifth round's rows above.
ATTENTION_WINDOW = 512
# AdamW's decay for the LSTMs (with the head; seventh round above): it kept the head's weights
# from growing into the spike that lr 7e-3 set off (dropout and beta2 0.99 with it: not measured),
# and learned more at 30 minutes on shelf. Biases are not decayed (runner.make_optimizer).
LSTM_WEIGHT_DECAY = 0.1
_LSTM = {"cell": "lstm", "d_model": HParams.d_model, "heads": HParams.heads,
         "max_context": HParams.max_context, "attention_window": ATTENTION_WINDOW,
         "embedding_size": 128, "tie_embeddings": False,
         "unroll_steps": 128, "batch_size": 32, "dropout": 0.0, "learning_rate": 5e-3,
         "min_learning_rate": 0.0, "warmup_steps": 20, "adam_beta2": 0.999,
         "weight_decay": LSTM_WEIGHT_DECAY, "grad_clip": 5.0}
# bench/quality.py's TRANSFORMER recipe (the GPT reference's: AdamW 0.1, beta2 0.99, clip 1,
# cosine to 1e-4 after 100 warm-up steps).
_GPT = {"cell": "transformer", "lstm_state_size": HParams.lstm_state_size, "attention_window": 0,
        "tie_embeddings": True,
        "dropout": 0.0, "learning_rate": 1e-3, "min_learning_rate": 1e-4, "warmup_steps": 100,
        "adam_beta2": 0.99, "weight_decay": 0.1, "grad_clip": 1.0}

CANDIDATES: tuple[Candidate, ...] = (
    # The default (HParams' own): tuned at 1-2 minutes; ahead of the small transformer from ~0.3
    # tokens per parameter on (the crossing above). The first candidate is the fallback.
    Candidate("LSTM 2x512", {**_LSTM, "layers": 2, "lstm_state_size": 512},
              min_tokens_per_param=0.3, min_corpus_per_param=0.0, reference_rate=29_000,
              compile_seconds=2.0),
    # Ahead of the default LSTM only before the crossing (0.3 tokens per parameter for the LSTM).
    # Rate: 2,000 steps of 768 tokens in ~57 s of --compare; its XLA compilation took ~6 s.
    Candidate("transformer 4x4x128", {**_GPT, "layers": 4, "d_model": 128, "heads": 4, "max_context": 64,
                                      "embedding_size": 128, "unroll_steps": 64, "batch_size": 12},
              min_tokens_per_param=0.0, min_corpus_per_param=0.0, reference_rate=27_000,
              compile_seconds=8.0),
    # Not measured for quality: chosen when it sees >= 2 tokens per parameter (~7x what the
    # default saw when it overtook the transformer; ~50 minutes here at its rate) on a corpus
    # with no more parameters per token than the default had on tinyshakespeare (3.45 M on 1 M:
    # 0.29 tokens per parameter, where dropout 0.25 was needed and enough). Its rate: the
    # default's scaled by their parameters (12.3 M / 3.45 M), as FLOPs scale; its learning rate
    # below the default's, as wider models want: neither measured.
    Candidate("LSTM 3x768", {**_LSTM, "layers": 3, "lstm_state_size": 768, "learning_rate": 3e-3},
              min_tokens_per_param=2.0, min_corpus_per_param=0.25, reference_rate=8_200,
              compile_seconds=3.0),
    # Not measured for quality; the same placeholders. Rate: bench/train.py --shape gpt-small
    # (bfloat16, --xla fusion); its compilation time is a guess.
    Candidate("transformer 6x6x384", {**_GPT, "layers": 6, "d_model": 384, "heads": 6, "max_context": 256,
                                      "embedding_size": 384, "unroll_steps": 256, "batch_size": 32},
              min_tokens_per_param=2.0, min_corpus_per_param=0.25, reference_rate=6_400,
              compile_seconds=15.0),
)
CHOSEN_FIELDS: tuple[str, ...] = tuple(sorted({name for c in CANDIDATES for name in c.overrides}))
# The flags that fix the shape: a run that gives all of those its cell uses has nothing to choose.
SHAPE_FLAGS = {"lstm": ("layers", "lstm_state_size", "embedding_size"),
               "transformer": ("layers", "d_model", "heads", "embedding_size", "max_context")}


# --------------------------------------------------------------------------- the pure rule


@dataclasses.dataclass(frozen=True)
class Option:
    """A candidate as it would run: its overrides less the given flags, its name and size with
    them (`LSTM 3x768`, `transformer 6x6x384`)."""

    candidate: Candidate
    overrides: Mapping[str, Any]
    name: str
    parameters: int


def shape_name(hparams: HParams) -> str:
    if hparams.cell == "transformer":
        return f"transformer {hparams.layers}x{hparams.heads}x{hparams.d_model}"
    return f"{hparams.cell.upper()} {hparams.layers}x{hparams.lstm_state_size}"


@dataclasses.dataclass(frozen=True)
class Choice:
    name: str
    overrides: dict[str, Any]
    reason: str
    tokens_per_second: float | None = None
    epochs: float | None = None


def parameters(hparams: HParams) -> int:
    """Trainable parameters of an lstm or transformer shape (the rule's size; a close count)."""
    vocab, emb = max(hparams.vocab_size, 1), hparams.embedding_size
    if hparams.cell == "transformer":
        d = hparams.d_model
        inner = (emb * d if emb != d else 0) * (1 if hparams.tie_embeddings else 2)
        out = 0 if hparams.tie_embeddings else vocab * emb
        return vocab * emb + inner + hparams.layers * (12 * d * d + 13 * d) + 2 * d + out
    width, total, inputs = hparams.lstm_state_size, vocab * emb, emb
    for _ in range(hparams.layers):
        total += 4 * width * (inputs + width + 1)
        inputs = width
    # Here, not at import: trainer.models loads TensorFlow, and trainer.submit reads this module.
    from trainer.models.attention import WIDTH

    head = 4 * WIDTH * width if hparams.attention_window else 0
    return total + head + (width * emb + vocab if hparams.tie_embeddings else width * vocab + vocab)


_ANY_CELLS_SHAPE = frozenset().union(*SHAPE_FIELDS.values())


def make_options(hparams: HParams, given: Iterable[str],
                 candidates: Sequence[Candidate] | None = None) -> tuple[list[Option], list[str]]:
    """The candidates with the given flags kept (their cell only, when --cell is given or a given
    shape flag is one only some cells read; a shape the flags make invalid is dropped), one per
    shape (the first); and a note per dropped one."""
    given = set(given)
    options, notes = [], []
    for candidate in CANDIDATES if candidates is None else candidates:
        cell = candidate.overrides["cell"]
        if "cell" in given and cell != hparams.cell:
            continue
        # --lstm_state_size alone means an LSTM, --d_model a transformer: a candidate that would
        # ignore a given shape flag is not the model asked for (`--layers 2 --lstm_state_size 384`
        # alone once chose a 2-layer transformer, keeping only the --layers it reads).
        ignored = sorted(given & _ANY_CELLS_SHAPE - set(SHAPE_FIELDS[cell]))
        if ignored:
            notes.append(f"{candidate.name} does not read --{', --'.join(ignored)}")
            continue
        merged = {k: v for k, v in candidate.overrides.items() if k not in given}
        try:
            shaped = hparams.replace(**merged).validate()
        except ValueError as err:
            notes.append(f"{candidate.name} does not go with the given flags ({err})")
            continue
        name = shape_name(shaped)
        if all(option.name != name for option in options):
            options.append(Option(candidate, merged, name, parameters(shaped)))
    return options, notes


def _tokens(count: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count:.0f}"


def _assess(option: Option, corpus_tokens: int, seconds: float, rate: float) -> tuple[float, float, bool]:
    """(epochs, tokens per parameter, whether the option qualifies) at `rate` for `seconds`."""
    seen = rate * max(seconds, 0.0)
    per_param = seen / option.parameters
    enough_corpus = corpus_tokens >= option.candidate.min_corpus_per_param * option.parameters
    return seen / max(corpus_tokens, 1), per_param, (per_param >= option.candidate.min_tokens_per_param
                                                     and enough_corpus)


def choose(corpus_tokens: int, train_seconds: float, rates: Mapping[str, float],
           options: Sequence[Option] | None = None, startup: Mapping[str, float] | None = None,
           budget_seconds: float | None = None) -> Choice:
    """The rule. `rates`: measured training tokens/s by option name (an option without one is
    not chosen, except the first, the fallback); `train_seconds`: the budget left for training
    after start-up, calibration and the final work; `startup`: seconds an option's first
    (compiling) call takes out of that (default: its candidate's guess).

    The largest option (by parameters) that sees at least its candidate's tokens per parameter
    and whose corpus is big enough for it; none: the first. Dropout DROPOUT_MANY_EPOCHS when the
    chosen one would see the corpus more than OVERFIT_EPOCHS times."""
    options = list(options) if options is not None else make_options(HParams(), ())[0]
    startup = startup or {}
    budget = f"time budget {format_duration(budget_seconds)}" if budget_seconds else "time budget"
    seconds = {o.name: train_seconds - startup.get(o.name, o.candidate.compile_seconds) for o in options}
    assessed = {o.name: _assess(o, corpus_tokens, seconds[o.name], rates[o.name])
                for o in options if o.name in rates}
    qualified = [o for o in options if o.name in assessed and assessed[o.name][2]]
    chosen = max(qualified, key=lambda o: o.parameters) if qualified else options[0]
    overrides = dict(chosen.overrides)
    rate = rates.get(chosen.name)
    head = f"{budget} on {_tokens(corpus_tokens)} tokens: {chosen.name}"
    larger = [o for o in options if o.parameters > chosen.parameters]
    why_not = ""
    if larger:
        bigger = min(larger, key=lambda o: o.parameters)
        why_not = f"; {bigger.name} {_why_not(bigger, corpus_tokens, assessed)}"
    if rate is None:
        return Choice(chosen.name, overrides, f"{head} ({_tokens(chosen.parameters)} parameters), "
                      f"its speed not measured{why_not}", None, None)
    epochs, per_param, _ = assessed[chosen.name]
    if epochs > OVERFIT_EPOCHS and "dropout" in overrides:
        overrides["dropout"] = max(overrides["dropout"], DROPOUT_MANY_EPOCHS)
    extras = [f"an attention head over its last {overrides['attention_window']} outputs"
              ] if overrides.get("attention_window") else []
    extras += [f"dropout {overrides['dropout']:g}"] if overrides.get("dropout") else []
    with_extras = f" with {' and '.join(extras)}" if extras else ""
    bar = chosen.candidate.min_tokens_per_param
    why = (("the largest shape that qualifies" if not bar else
            f"the largest shape that sees enough tokens per parameter (>= {bar:g} for it)") if qualified
           else "no shape sees enough tokens per parameter, so the first")
    left = format_duration(seconds[chosen.name])
    reason = (f"{head}{with_extras} ({_tokens(chosen.parameters)} parameters), {why}: it trains "
              f"{epochs:.2g} epochs ({per_param:.2g} tokens per parameter) in the ~{left} left for "
              f"training at {_tokens(rate)} tokens/s{why_not}")
    return Choice(chosen.name, overrides, reason, rate, epochs)


def _why_not(option: Option, corpus_tokens: int, assessed: Mapping[str, tuple[float, float, bool]]) -> str:
    needed = option.candidate.min_corpus_per_param * option.parameters
    if corpus_tokens < needed:
        return f"needs a corpus of >= {_tokens(needed)} tokens"
    if option.name not in assessed:
        return "was not measured"
    return (f"would see {assessed[option.name][1]:.2g} of the {option.candidate.min_tokens_per_param:g} "
            "tokens per parameter it needs")


# --------------------------------------------------------------------------- calibration


@dataclasses.dataclass(frozen=True)
class Measurement:
    tokens_per_second: float
    compile_seconds: float  # the first call (tracing and compilation), not in the rate
    steps: int  # timed steps after it
    seconds: float  # all of it, the first call included


def time_steps(step: Callable[[], int], allowed: float, clock: Callable[[], float] = time.monotonic,
               measure_seconds: float = MEASURE_SECONDS, max_steps: int = MAX_MEASURE_STEPS) -> Measurement:
    """Calls `step` (which trains one window and returns its tokens) once to compile it, then
    times further calls until `measure_seconds` of them, `max_steps`, or `allowed` seconds in
    all have passed (one timed call at least: a rate needs one)."""
    begin = clock()
    step()
    compiled = clock()
    tokens = steps = 0
    while steps < max_steps and (steps == 0 or (clock() - compiled < measure_seconds
                                                and clock() - begin < allowed)):
        tokens += step()
        steps += 1
    end = clock()
    return Measurement(tokens / max(end - compiled, 1e-9), compiled - begin, steps, end - begin)


Measure = Callable[[Option, float], Measurement]


@dataclasses.dataclass
class Calibration:
    """What `calibrate` measured and left out (for hparams.json and the reason)."""

    measured: dict[str, Measurement] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


def _optimistic_rate(option: Option, default: Option, measured: Mapping[str, Measurement]) -> float:
    """The fastest `option` may plausibly run here: the measured machine's rate, scaled by how the
    default ran here, times OPTIMISM."""
    scale = 1.0
    if default.name in measured:
        scale = measured[default.name].tokens_per_second / default.candidate.reference_rate
    return option.candidate.reference_rate * scale * OPTIMISM


def calibrate(options: Sequence[Option], corpus_tokens: int, budget_seconds: float,
              spent: Callable[[], float], measure: Measure) -> Calibration:
    """Measures the first option (the default), then, largest first, each other option that would
    be chosen at an optimistic rate given what is measured so far, while the measurements fit in
    CALIBRATION_SHARE of the budget; notes why each other one was not measured."""
    result = Calibration()
    allowance = CALIBRATION_SHARE * budget_seconds
    began = spent()

    def left() -> float:
        return allowance - (spent() - began)

    def train_seconds() -> float:
        return budget_seconds - spent() - max(left(), 0.0) - TAIL_SECONDS

    def rates(extra: Mapping[str, float] = {}) -> dict[str, float]:  # noqa: B006 (read only)
        return {**{name: m.tokens_per_second for name, m in result.measured.items()}, **extra}

    default = options[0]
    order = [default, *sorted(options[1:], key=lambda o: -o.parameters)]
    for option in order:
        if option is not default:
            if default.name not in result.measured:
                result.skipped[option.name] = "the default could not be measured"
                continue
            hope = _optimistic_rate(option, default, result.measured)
            winner = choose(corpus_tokens, train_seconds(), rates({option.name: hope}), options).name
            if winner != option.name:
                result.skipped[option.name] = (f"cannot win: not chosen even at {_tokens(hope)} tokens/s")
                continue
        cost = option.candidate.compile_seconds + MEASURE_SECONDS
        if cost > left():
            result.skipped[option.name] = (f"no time to measure it (~{cost:.0f} s) within "
                                           f"{CALIBRATION_SHARE:.2g} of the budget")
            continue
        try:
            result.measured[option.name] = measure(option, left())
        except UsageError as err:  # e.g. its batch and unroll need more text than the corpus has
            result.skipped[option.name] = f"could not run: {err}"
    result.seconds = spent() - began
    return result


# --------------------------------------------------------------------------- the run's choice


def short_budget_shape(cpu_flags: Iterable[str], has_accelerator: bool) -> str | None:
    """The candidate a budget under SHORT_BUDGET_SECONDS trains on this machine (None: the
    default, on a GPU or TPU, where nothing was measured), from the CPU's /proc/cpuinfo flags."""
    if has_accelerator:
        return None
    return SHORT_BUDGET_SHAPE_WITH_AMX if "amx_bf16" in set(cpu_flags) else SHORT_BUDGET_SHAPE_WITHOUT_AMX


def _short_budget_why(short_shape: str | None, first: Option) -> str:
    """Why a short budget trains `first`: the CPU's rule (short_budget_shape), or the default."""
    if short_shape is None:
        return f"{first.name}, the default, on a machine where no other was measured"
    if first.candidate.name != short_shape:
        return f"{first.name}, the first shape that goes with the given flags"
    cpu = "with AMX" if short_shape == SHORT_BUDGET_SHAPE_WITH_AMX else "without AMX"
    return f"on a CPU {cpu}, {first.name} learns most in a short budget"


def _first(options: Sequence[Option], name: str | None) -> list[Option]:
    """`options` with the candidate called `name` first (the rule's fallback), if it is there."""
    ahead = [o for o in options if o.candidate.name == name]
    return [*ahead, *(o for o in options if o not in ahead)]


def _tuned_for_short_budget(choice: Choice, options: Sequence[Option], given: Iterable[str]) -> Choice:
    """`choice` with SHORT_BUDGET_TUNING's values for its candidate (the given flags kept)."""
    candidate = next(o.candidate.name for o in options if o.name == choice.name)
    tuning = {k: v for k, v in SHORT_BUDGET_TUNING.get(candidate, {}).items() if k not in set(given)}
    if not tuning:
        return choice
    said = ", ".join(f"{name} {value:g}" for name, value in tuning.items())
    reason = choice.reason.replace(f"{choice.name} (", f"{choice.name} with {said} for a short budget (", 1)
    return dataclasses.replace(choice, overrides={**choice.overrides, **tuning}, reason=reason)


def _describe_given(hparams: HParams, given: Iterable[str]) -> str:
    kept = sorted(set(given) & set(CHOSEN_FIELDS))
    return ", ".join(f"--{name}={getattr(hparams, name)}" for name in kept)


def chooses_shape(hparams: HParams, given: Iterable[str]) -> bool:
    """Whether the choice may set the checkpoint's shape (and so %JOB%'s name): with
    --time_budget, unless --cell and all of its shape flags are given (or a cell without
    candidates)."""
    given = set(given)
    shape_flags = SHAPE_FLAGS.get(hparams.cell)
    fixed = "cell" in given and (shape_flags is None or set(shape_flags) <= given)
    return bool(hparams.time_budget) and not fixed


def decide(hparams: HParams, given: Iterable[str], corpus_tokens: int, vocab_size: int,
           budget_seconds: float, spent: Callable[[], float], measure: Measure | None,
           short_shape: str | None = None) -> tuple[HParams, dict[str, Any]]:
    """The choice for a fresh job: hparams with the chosen fields (the given ones kept), and the
    record for hparams.json. `measure` None: nothing is measured (several workers, which must
    all choose alike). `short_shape`: the candidate a budget under SHORT_BUDGET_SECONDS trains
    (short_budget_shape; None: the default)."""
    given = set(given)
    sized = hparams.replace(vocab_size=vocab_size)
    kept = _describe_given(hparams, given)
    record: dict[str, Any] = {"given": sorted(given & set(CHOSEN_FIELDS)), "corpus_tokens": corpus_tokens,
                              "budget_seconds": budget_seconds}
    if not chooses_shape(hparams, given):
        why = (f"--cell={hparams.cell} and its shape flags given" if hparams.cell in SHAPE_FLAGS
               else f"--cell={hparams.cell} given, and only lstm and transformer shapes are chosen")
        reason = (f"time budget {format_duration(budget_seconds)}: nothing chosen ({why}); flags and "
                  "defaults used as given")
        return hparams, {**record, "reason": reason, "candidates": {}}
    options, notes = make_options(sized, given)
    if not options:
        reason = (f"time budget {format_duration(budget_seconds)}: nothing chosen (no candidate shape goes "
                  f"with {kept}); flags and defaults used as given")
        return hparams, {**record, "reason": reason, "candidates": {}, "notes": notes}
    startup_spent = spent()
    unmeasured = ""
    if budget_seconds < SHORT_BUDGET_SECONDS:
        options = _first(options, short_shape)
        unmeasured = (f"under {format_duration(SHORT_BUDGET_SECONDS)} nothing is measured: "
                      f"{_short_budget_why(short_shape, options[0])}")
    elif measure is None:
        unmeasured = "not measured on several workers, which must all choose alike, nor on a TPU"
    if unmeasured:
        calibration = Calibration(skipped={o.name: unmeasured for o in options})
    else:
        calibration = calibrate(options, corpus_tokens, budget_seconds, spent, measure)
    train_seconds = budget_seconds - spent() - TAIL_SECONDS
    rates = {name: m.tokens_per_second for name, m in calibration.measured.items()}
    startup = {name: m.compile_seconds for name, m in calibration.measured.items()}
    choice = choose(corpus_tokens, train_seconds, rates, options, startup, budget_seconds)
    if budget_seconds < SHORT_BUDGET_SECONDS:
        choice = _tuned_for_short_budget(choice, options, given)
    reason = choice.reason
    if calibration.measured:
        reason += (f" (measured {len(calibration.measured)} of {len(options)} shapes in "
                   f"{calibration.seconds:.0f} s)")
    elif unmeasured:
        reason += f" ({unmeasured})"
    if kept:
        reason += f"; kept {kept} as given"
    reason += "; give --cell, --layers, --lstm_state_size or --d_model to choose yourself"
    candidates = {o.name: {"parameters": o.parameters,
                           **({"tokens_per_second": round(calibration.measured[o.name].tokens_per_second),
                               "compile_seconds": round(calibration.measured[o.name].compile_seconds, 2),
                               "steps": calibration.measured[o.name].steps}
                              if o.name in calibration.measured else
                              {"skipped": calibration.skipped.get(o.name, "")})}
                  for o in options}
    record.update(reason=reason, shape=choice.name, overrides=choice.overrides, candidates=candidates,
                  calibration_seconds=round(calibration.seconds, 2),
                  start_up_seconds=round(startup_spent, 2), notes=notes)
    return hparams.replace(**choice.overrides), record


def resumed(hparams: HParams, given: Iterable[str], saved: HParams, saved_record: dict[str, Any] | None,
            ) -> tuple[HParams, dict[str, Any]]:
    """A job dir with an hparams.json: its chosen fields (those not given now), never a new choice."""
    given = set(given)
    kept = {name: getattr(saved, name) for name in CHOSEN_FIELDS if name not in given}
    record = dict(saved_record or {})
    first = record.get("reason", "its hparams.json has no choice record")
    record["resumed"] = f"resumed: the model of its hparams.json is kept ({first})"
    return hparams.replace(**kept), record



# --------------------------------------------------------------------------- the runner's hook


class ForBudget:
    """What `runner.train(choose=...)` calls once the distribution strategy exists and before the
    hyperparameters are final: (hparams, strategy, started) -> (hparams, record for hparams.json).

    `given`: the HParams fields given on the command line (trainer.flags.explicitly_set), which
    the choice never changes."""

    def __init__(self, given: Iterable[str]) -> None:
        self.given = frozenset(given)

    def __call__(self, hparams: HParams, strategy: Any, started: float | None,
                 ) -> tuple[HParams, dict[str, Any]]:
        import tensorflow as tf

        from trainer import checkpoints, data, distribute

        started = time.monotonic() if started is None else started
        metadata = data.read_metadata(hparams.data_dir, hparams.data_prefix)
        sized = hparams.replace(vocab_size=metadata.vocab_size, language_model=metadata.tokenizer)
        for job_dir in _job_dirs(sized, self.given, metadata):
            saved = checkpoints.saved_hparams(job_dir)
            if saved is not None:
                chosen, record = resumed(hparams, self.given, saved, checkpoints.saved_chosen(job_dir))
                print(f"Model for the time budget: {record['resumed']}", flush=True)
                return chosen, record
        several = (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
                   or distribute.is_tpu(strategy))
        measure = None if several else _measurer(sized, strategy, metadata)
        accelerator = bool(tf.config.list_physical_devices("GPU")) or distribute.is_tpu(strategy)
        short_shape = short_budget_shape(cpu_flags(), accelerator)
        chosen, record = decide(hparams, self.given, metadata.splits["train"].tokens, metadata.vocab_size,
                                parse_duration(hparams.time_budget), lambda: time.monotonic() - started,
                                measure, short_shape)
        print(f"Model for the time budget: {record['reason']}", flush=True)
        return chosen, record


def _job_dirs(sized: HParams, given: Iterable[str], metadata: Any) -> list[str]:
    """The job dirs this run may resume: its --job-dir, or with %JOB% each candidate's."""
    from trainer import checkpoints

    chosen = [sized.replace(**o.overrides) for o in make_options(sized, given)[0]]
    # Budgeted jobs of verne before the LSTMs' attention head (2026-12-07) chose LSTMs without it.
    earlier = [shape.replace(attention_window=0) for shape in chosen
               if shape.attention_window and "attention_window" not in set(given)]
    shapes = [sized, *chosen, *earlier]
    dirs = []
    for shape in shapes:
        job_dir = checkpoints.resolve_hparams(shape, metadata).job_dir
        if job_dir not in dirs:
            dirs.append(job_dir)
    return dirs


def _measurer(sized: HParams, strategy: Any, metadata: Any) -> Measure:
    """`measure(option, allowed_seconds)`: the trainer's own train step (trainer.loops) of that
    shape on the real training windows, timed by `time_steps`."""
    import keras
    import tensorflow as tf

    from trainer import data, distribute, loops, optimizers, runner, xla
    from trainer.hparams import resolve_precision
    from trainer.model_fn import Params
    from trainer.models import build_model

    files = data.shard_files(sized.data_dir, sized.data_prefix, "train")
    accelerator = bool(tf.config.list_physical_devices("GPU"))
    replicas = strategy.num_replicas_in_sync

    def measure(option: Option, allowed: float) -> Measurement:
        shaped = xla.resolve(sized.replace(**option.overrides), replicas, accelerator)
        shaped = resolve_precision(shaped)
        layout = data.layout_for(metadata.splits["train"].tokens, shaped.batch_size, shaped.unroll_steps)
        with xla.fusion(shaped.xla == "fusion"):
            with strategy.scope():
                model = build_model(shaped)
                optimizer = runner.make_optimizer(shaped, total_steps=1000)
                optimizer.build(model.trainable_variables)
                loss_scale = optimizers.DynamicLossScale() if shaped.precision == "float16" else None
            params = Params(shaped, model)
            train_step = loops.make_train_step(params, optimizer, strategy, loss_scale,
                                               jit_compile=shaped.xla == "step")
            windows = data.windows(files, layout, random_starts=not model.carries_state_between_windows)
            batches = iter(distribute.distribute_windows(strategy, windows.repeat()))
            state = [model.window_state(shaped.batch_size) if replicas == 1
                     else loops.initial_state(params, strategy, shaped.batch_size)]

            def step() -> int:
                inputs, labels = next(batches)
                loss, _, state[0] = train_step(inputs, labels, state[0])
                float(loss)  # waits for the step
                return layout.tokens_per_window

            result = time_steps(step, allowed)
        keras.backend.clear_session()  # the run's model is built as if nothing came before
        return result

    return measure
