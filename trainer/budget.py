"""`--time_budget`: a wall-clock limit for a whole training run, preemptions included.

The budget covers everything the process does: start-up, compilation, periodic evaluations,
checkpoints and samples, and the final evaluation, checkpoint, sample and export. Training
therefore stops early enough to leave time for that final work (the *tail*), whose length
`Budget` estimates and refines as the run measures its own evaluations, saves and samples.

Time is counted on one clock, *spent*: seconds of the budget used so far, from the start of the
first process. The runner saves it with every checkpoint, so a preempted job that is started
again continues with the budget it had left (only the seconds between its last checkpoint and
its end are lost, and a SIGTERM checkpoints at the stop).

Pure Python, no TensorFlow: hparams.validate parses budgets with it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Callable

FLAG = "--time_budget"
_PART = re.compile(r"(\d+(?:\.\d+)?)([hms])")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}

# The tail before anything is measured. First from a 1x32 LSTM on an 8 KB corpus (2-core Xeon,
# 2026-12-06; quiet machine / four other jobs running): the first evaluation 0.5 / 2.2 s (it
# compiles), a checkpoint 0.02 / 0.2 s. Then, after the export and sampler traced less (no
# AutoGraph, the model's step traced 3 times per export instead of 8) and the exit skipped the
# final garbage collection, in 1-minute runs on a 2-core AMD EPYC (transformer 4x4x128 / LSTM
# 2x512): the export 3.0 / 1.4 s (tracing 2.0 / 0.5 s, writing ~0.8 s), a first 200-token sample
# 1.1-2.2 / 0.7 s, warm sampling 1.1-1.6 ms a token, the exit 0.13-0.16 s (was 1.30-1.57 s; 1.3-3 s
# on the loaded Xeon). The floors below are at or above the slowest of those (the exit's allows
# for a loaded machine). Compilation grows with the model and the machine's load, so each
# compiling part is also at least a multiple of the process's first training call (which traces
# and compiles the training step).
EVAL_COMPILE_SECONDS = 2.0  # added to the evaluation's windows times the measured step time
SAVE_SECONDS = 1.0  # plus the checkpoint's bytes at SAVE_BYTES_PER_SECOND
SAVE_BYTES_PER_SECOND = 50e6  # a conservative gs:// upload rate
SAMPLE_COMPILE_SECONDS = 2.0
SAMPLE_SECONDS_PER_TOKEN = 0.0025
EXPORT_SECONDS = 3.5  # plus the weights' bytes at SAVE_BYTES_PER_SECOND; never measured early
EXIT_SECONDS = 1.0
# Parts of the tail in units of the first training call (see above): the evaluation and sample
# about 1.5x the measured (Xeon); the export's 1.5 (3.5 before its tracing was cut by more than
# half) not measured against the first call since.
COMPILE_UNITS = {"eval": 1.0, "sample": 1.0, "export": 1.5}
# The same when XLA compiles the training step (--xla step, the transformer's default on a CPU):
# its first call is mostly XLA's compilation, which the sample and export (plain graphs) do not
# pay. Transformer 4x4x128, first call 3-4 s: export 3.0 s and a first sample 1.1-2.2 s after the
# tracing was cut (before it: checkpoint, sample and export 5.8-5.9 s together, where the units
# for a plain graph guessed 17-21 s). The evaluation compiles a forward pass only: shelf, 1
# minute (AMD EPYC, 2026-12-07), first training calls 3.4-4.4 s, the final evaluation of 64
# windows 1.97-2.91 s in all (five runs; ~2 s of it compiling), where 1.0 unit guessed 5.8 s.
XLA_COMPILE_UNITS = {"eval": 0.5, "sample": 0.5, "export": 0.5}
# An evaluation window against a training step (forward only: about a third of it; measured 0.29
# on the transformer above, 1,335 windows in 10.5 s at 27 ms a step), with room to spare.
EVAL_WINDOW_STEPS = 0.5
# Measured parts of the tail are counted this much longer, against noise.
MARGIN = 1.25
# One evaluation takes at most this share of the budget: a budgeted run evaluates the first
# windows of the validation split that fit (at the measured training step time a window, which
# errs short: a forward pass is about a third of a step). Evaluating the whole split would not
# fit short budgets on large corpora: shelf's 2.6 M validation tokens took ~45 s of a 1-minute
# budget, and training stopped at step 2 (bench/README.md, bench/budget.py).
EVAL_SHARE = 0.05
# Evaluations and samples during training (--eval_every, --sample_every) together take at most
# this share of the time spent so far: the one due is skipped otherwise (the final evaluation and
# sample always run). At one minute each took 2.5-2.8 s of the ~18 s spent by step 500, time the
# run would have trained (AMD EPYC, bench logs); at an hour they run as given.
PERIODIC_SHARE = 0.05


def parse_duration(text: str) -> float:
    """Seconds in a duration like `90s`, `10m`, `1h`, `8h`, `1h30m` or `2.5h`; ValueError naming
    --time_budget otherwise (zero, negative, no unit, other units)."""
    compact = text.strip().lower().replace(" ", "")
    parts = _PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact or len({u for _, u in parts}) < len(parts):
        raise ValueError(f"{FLAG}={text!r}: not a duration; write it like 90s, 10m, 1h or 1h30m")
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"{FLAG}={text!r}: must be longer than zero, e.g. 90s, 10m, 1h")
    return seconds


def format_duration(seconds: float) -> str:
    """`1h05m`, `4m30s`, `45s`."""
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


_IMPORTED = time.monotonic()


def process_age() -> float:
    """Seconds since this process started, interpreter start-up and imports included (Linux's
    /proc; elsewhere, since this module was imported, which is within a second of it)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
        with open("/proc/uptime", encoding="ascii") as uptime:
            now = float(uptime.read().split()[0])
        # Field 22 of stat (the 20th after the command's closing parenthesis): start time in ticks.
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(now - started, time.monotonic() - _IMPORTED)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


@dataclasses.dataclass
class TailEstimate:
    """Seconds the work after the last training step takes. Each part is a guess from the run's
    shape until the run measures it (the latest measured value wins: the first one includes a
    compilation, so it errs long)."""

    eval_windows: int  # windows in the final evaluation (0: evaluation is off)
    sample_tokens: int  # tokens in the final sample (0: no sample, e.g. a non-chief worker)
    checkpoint_bytes: int  # model + optimizer variables
    step_seconds: float = 0.0  # measured time of one training step (0: not yet)
    compile_seconds: float = 0.0  # this process's first training call (it compiles)
    measured: dict[str, float] = dataclasses.field(default_factory=dict)  # eval, save, sample
    calls: int = 0  # compiled training calls timed in this process
    budget_seconds: float = 0.0  # the whole budget: caps an evaluation's windows (0: no cap)
    xla_step: bool = False  # XLA compiles the training step (XLA_COMPILE_UNITS)

    def evaluated_windows(self) -> int:
        """Windows an evaluation covers: all of them, or under a budget the first ones that fit
        in EVAL_SHARE of it once the step time is measured (at least one)."""
        if not self.budget_seconds or self.step_seconds <= 0:
            return self.eval_windows
        return max(1, min(self.eval_windows, int(EVAL_SHARE * self.budget_seconds / self.step_seconds)))

    def part(self, name: str) -> float:
        if name in self.measured:
            return MARGIN * self.measured[name]
        units = XLA_COMPILE_UNITS if self.xla_step else COMPILE_UNITS
        compiling = units.get(name, 0.0) * self.compile_seconds
        if name == "eval":
            if not self.eval_windows:
                return 0.0
            return (max(EVAL_COMPILE_SECONDS, compiling)
                    + self.evaluated_windows() * EVAL_WINDOW_STEPS * self.step_seconds)
        if name == "save":
            return SAVE_SECONDS + self.checkpoint_bytes / SAVE_BYTES_PER_SECOND
        if name == "sample":
            if not self.sample_tokens:
                return 0.0
            return max(SAMPLE_COMPILE_SECONDS, compiling) + self.sample_tokens * SAMPLE_SECONDS_PER_TOKEN
        if name == "export":
            # The export writes the weights without the optimizer's slots (a third of the
            # checkpoint for Adam): counting all of it errs long.
            return max(EXPORT_SECONDS, compiling) + self.checkpoint_bytes / SAVE_BYTES_PER_SECOND
        raise KeyError(name)

    def note_steps(self, seconds: float, count: int) -> None:
        """One compiled call trained `count` steps in `seconds`. The process's first call compiles:
        it sizes the compiling parts of the tail, and the step time comes from the later ones
        (the second call's, then averaged)."""
        per_step = seconds / max(count, 1)
        self.calls += 1
        if self.calls == 1:
            self.compile_seconds = seconds
        else:
            self.step_seconds = per_step if self.calls == 2 else 0.9 * self.step_seconds + 0.1 * per_step

    def seconds(self) -> float:
        return sum(self.part(name) for name in ("eval", "save", "sample", "export")) + EXIT_SECONDS


def affords_periodic(cost: float, periodic_seconds: float, spent: float) -> bool:
    """Whether an evaluation or sample during training, expected to take `cost` seconds, fits
    PERIODIC_SHARE of the `spent` seconds with the `periodic_seconds` such work took before."""
    return periodic_seconds + cost <= PERIODIC_SHARE * spent


@dataclasses.dataclass(frozen=True)
class Reading:
    """The clock at one point of the run; with several workers, the agreed (averaged) one, so
    that every worker takes the same decisions from it."""

    spent: float  # seconds of the budget spent
    end: float  # the budget second at which training stops
    step_seconds: float  # one training step

    @property
    def out_of_time(self) -> bool:
        """Whether one more training step would end past `end`."""
        return self.spent + self.step_seconds >= self.end


def process_start(clock: Callable[[], float] = time.monotonic) -> float:
    """When this process started, on `clock`."""
    return clock() - process_age()


class Budget:
    """The clock of one process of a budgeted run.

    `spent()` counts from the start of the job's first process: the seconds restored from the
    checkpoint (`spent_before`) plus the time since `started` (this process's start, or when a
    library caller began the run). Training stops once one more step would pass the budget minus
    the tail (the reading's `end`).

    `advance(reading)` moves the learning-rate schedule's input, `progress`, from 0 at the start
    of the job to 1 at `end`, spreading what is left of it evenly over the time left: progress is
    spent/end while the end stays put, and when a measurement moves the end it bends without a
    jump or a step back. Being a state, it is saved with the checkpoint (with the spent seconds
    and the tail's measurements), so a resumed run continues the curve an uninterrupted run draws.
    """

    def __init__(self, seconds: float, spent_before: float, tail: TailEstimate, started: float,
                 clock: Callable[[], float] = time.monotonic, progress: float = 0.0) -> None:
        self.seconds, self.spent_before, self.tail = seconds, spent_before, tail
        self.started, self.clock = started, clock
        self.progress, self.progress_spent = progress, spent_before

    def spent(self) -> float:
        return self.spent_before + self.clock() - self.started

    def left(self) -> float:
        return self.seconds - self.spent()

    def training_end(self) -> float:
        return self.seconds - self.tail.seconds()

    def read(self) -> Reading:
        return Reading(self.spent(), self.training_end(), self.tail.step_seconds)

    def _progress_at(self, spent: float, end: float, step_seconds: float = 0.0) -> float:
        if spent + step_seconds >= end:  # where training stops (Reading.out_of_time)
            return 1.0
        moved = max(spent - self.progress_spent, 0.0) / (end - self.progress_spent)
        return min(self.progress + (1.0 - self.progress) * moved, 1.0)

    def advance(self, reading: Reading) -> float:
        """The schedule's progress at `reading` (and from now on)."""
        self.progress = self._progress_at(reading.spent, reading.end, reading.step_seconds)
        self.progress_spent = max(reading.spent, self.progress_spent)
        return self.progress

    # What a checkpoint keeps of the clock: spent seconds, the schedule's progress then, the
    # measured tail parts and step time (-1: not measured).
    CHECKPOINT_PARTS = ("eval", "save", "sample")

    def to_checkpoint(self) -> list[float]:
        spent = self.spent()
        measured = [self.tail.measured.get(name, -1.0) for name in self.CHECKPOINT_PARTS]
        # Progress carried to this moment without moving the run's own (which only agreed
        # readings move, so that several workers keep the same).
        return [spent, self._progress_at(spent, self.training_end()), *measured,
                self.tail.step_seconds or -1.0]

    @classmethod
    def from_checkpoint(cls, values: list[float], seconds: float, tail: TailEstimate,
                        started: float, clock: Callable[[], float] = time.monotonic) -> Budget:
        spent, progress, *measured, step = values
        tail.measured.update({name: value for name, value in zip(cls.CHECKPOINT_PARTS, measured,
                                                                 strict=True) if value >= 0})
        if step > 0:
            tail.step_seconds = step
        return cls(seconds, spent, tail, started, clock, progress)

    def deadline(self) -> float:
        """The wall-clock time (time.time()) at which the budget runs out."""
        return time.time() + self.left()

    def describe(self, before_this_run: bool = False) -> str:
        """`time budget 1m30s: 1m02s spent, 28s left`; `before_this_run`: what the checkpoint
        says (`1m00s spent before this run, 30s left`), for the resume line."""
        if before_this_run:
            return (f"time budget {format_duration(self.seconds)}: {format_duration(self.spent_before)} "
                    f"spent before this run, {format_duration(self.seconds - self.spent_before)} left")
        return (f"time budget {format_duration(self.seconds)}: {format_duration(self.spent())} spent, "
                f"{format_duration(self.left())} left")
