"""Progress of a training run: a live bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from trainer.budget import Budget
from trainer.model_fn import bits_per_token


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Counts steps, measures tokens/s (excluding evaluation, checkpoints and samples) and shows it.

    `step()` returns True at the end of each logging interval of `log_every` steps. With a
    `budget` (--time_budget) there is no step total: the ETA is the time left of the budget,
    shown with the deadline's time of day.
    """

    def __init__(self, total: int, start: int, tokens_per_step: int, log_every: int,
                 bits_name: str = "bpc", stream: object = None, budget: Budget | None = None) -> None:
        self.total, self.start, self.tokens_per_step = total, start, tokens_per_step
        self.budget = budget
        self.log_every = max(log_every, 1)
        self.bits_name = bits_name
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = (tqdm(total=None if budget else total, initial=start, unit="step", dynamic_ncols=True,
                         file=self.stream) if self.tty else None)
        self.current = start
        self.interval_loss: float | None = None
        self.tokens_per_second = 0.0
        self._losses: list[float] = []
        self._interval_start = time.perf_counter()
        self._paused = 0.0
        self._rate_start, self._rate_steps = time.perf_counter(), 0
        self._paused_total = 0.0
        self._timed_steps = -1  # -1 until the first (compiling) step is done

    def step(self, step: int, loss: float) -> bool:
        self.current = step
        self._losses.append(loss)
        self._rate_steps += 1
        if self.bar is not None:
            self.bar.update(1)
            deadline = f" {self._eta()}" if self.budget is not None else ""
            self.bar.set_postfix_str(f"loss {loss:.3f} {self.tokens_per_second:,.0f} tok/s{deadline}",
                                     refresh=False)
        if self._timed_steps < 0:
            # The first step of a run traces and compiles: leave it out of tokens/s and the ETA.
            self._timed_steps = 0
            self._interval_start = self._rate_start = time.perf_counter()
            self._paused = self._paused_total = 0.0
            self._rate_steps = 0
        else:
            self._timed_steps += 1
        if step % self.log_every:
            return False
        now = time.perf_counter()
        active = max(now - self._interval_start - self._paused, 1e-9)
        if self._timed_steps:
            self.tokens_per_second = self._timed_steps * self.tokens_per_step / active
        self.interval_loss = sum(self._losses) / len(self._losses)
        self._losses, self._interval_start, self._paused, self._timed_steps = [], now, 0.0, 0
        return True

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count against tokens/s."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - begin
            self._paused += spent
            self._paused_total += spent

    def final_tokens_per_second(self) -> float:
        """tokens/s for the run's last line: the last logged interval's, or, when none was logged
        (a resumed run that trained fewer than --log_every steps), the rate of the steps timed."""
        if self.tokens_per_second or self._rate_steps <= 0:
            return self.tokens_per_second
        active = time.perf_counter() - self._rate_start - self._paused_total
        return self._rate_steps * self.tokens_per_step / max(active, 1e-9)

    def eta_seconds(self) -> float:
        if self.budget is not None:
            return self.budget.left()
        active = time.perf_counter() - self._rate_start - self._paused_total
        per_step = active / max(self._rate_steps, 1)
        return per_step * max(self.total - self.current, 0)

    def log(self, epoch: int, learning_rate: float, grad_norm: float) -> None:
        if self.bar is not None or self.interval_loss is None:
            return
        loss = self.interval_loss
        total = "" if self.budget is not None else f"/{self.total}"
        print(f"step {self.current}{total} epoch {epoch} loss {loss:.4f} "
              f"{self.bits_name} {bits_per_token(loss):.3f} lr {learning_rate:.3g} |g| {grad_norm:.3g} "
              f"{self.tokens_per_second:,.0f} tok/s {self._eta()}",
              file=self.stream, flush=True)

    def _eta(self) -> str:
        """`ETA 4m10s`, or under a time budget `ETA 4m10s (deadline 14:05:31)`: when the run
        ends, final evaluation, checkpoint, sample and export included."""
        eta = f"ETA {_duration(self.eta_seconds())}"
        if self.budget is None:
            return eta
        return f"{eta} (deadline {time.strftime('%H:%M:%S', time.localtime(self.budget.deadline()))})"

    def note_eval(self, loss: float | None) -> None:
        if loss is None:
            return
        line = f"step {self.current}: valid loss {loss:.4f} {self.bits_name} {bits_per_token(loss):.3f}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
