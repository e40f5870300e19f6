"""Progress output: plain log lines off a terminal, a live bar on one."""

from __future__ import annotations

import io

from trainer.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(total=10, start=4, tokens_per_step=100, log_every=2, stream=stream)
    assert progress.step(5, 3.0) is False
    assert progress.step(6, 2.0) is True
    assert progress.interval_loss == 2.5 and progress.tokens_per_second > 0
    progress.log(epoch=1, learning_rate=0.002, grad_norm=0.5)
    progress.note_eval(2.25)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("step 6/10 epoch 1 loss 2.5000 bpc 3.607 lr 0.002 |g| 0.5 ")
    assert "tok/s ETA " in lines[0]
    assert lines[1] == "step 6: valid loss 2.2500 bpc 3.246"


def test_bar_on_a_terminal() -> None:
    stream = _Terminal()
    progress = Progress(total=10, start=0, tokens_per_step=100, log_every=5, stream=stream)
    for step in range(1, 6):
        progress.step(step, 1.0)
    progress.log(epoch=0, learning_rate=0.1, grad_norm=1.0)  # the bar shows it instead
    progress.close()
    out = stream.getvalue()
    assert "5/10" in out and "loss 1.000" in out and "step " not in out.replace("step/s", "")


def test_a_run_shorter_than_its_log_interval_still_has_a_rate() -> None:
    # A resumed --time_budget run trained 34 steps with --log_every 50 and said "0 tokens/s".
    progress = Progress(total=100, start=10, tokens_per_step=100, log_every=50, stream=io.StringIO())
    assert progress.final_tokens_per_second() == 0.0  # nothing timed yet
    for step in range(11, 15):  # the first one compiles and is not timed
        assert progress.step(step, 2.0) is False
    assert progress.tokens_per_second == 0.0 and progress.final_tokens_per_second() > 0
