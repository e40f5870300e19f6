"""--time_budget: parsing, the flags around it, the clock and schedule (fast, with a fake clock),
and whole `python -m trainer.task` runs under a budget, one of them stopped by SIGTERM and run
again (slow).

The subprocess tests time the processes themselves: the budget is a promise about wall clock.
Its tail estimate errs long (trainer/budget.py), which leaves the 5% of slack the issue allows to
the clock's own noise.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags

from trainer import budget
from trainer.budget import Budget, Reading, TailEstimate, format_duration, parse_duration
from trainer.errors import UsageError
from trainer.flags import define_hparams_flags, hparams_from_command_line
from trainer.hparams import HParams
from trainer.progress import Progress

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- parsing and flags


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("10m", 600), ("1h", 3600), ("8h", 8 * 3600), ("1h30m", 5400), ("2.5h", 9000),
    ("1h 30m", 5400), ("1m30s", 90), ("0.5s", 0.5), ("10M", 600)])
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0s", "-5m", "10 parsecs", "", "90", "1m1m", "h", "1d", "5m-1s",
                                  "0h0m", "1e3s", "nan", "inf"])
def test_nonsense_budgets_are_errors_naming_the_flag(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--time_budget=.*(duration|longer than zero)") as error:
        parse_duration(text)
    assert "\n" not in str(error.value)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 45, 90, 600, 3725, 8 * 3600)] == [
        "0s", "45s", "1m30s", "10m00s", "1h02m", "8h00m"]


def _hparams(*args: str) -> HParams:
    values = flags.FlagValues()
    define_hparams_flags(values)
    values(["trainer.task", *args])
    return hparams_from_command_line(["trainer.task"], values)


def test_flags_around_the_budget() -> None:
    given = _hparams("--time_budget=10m", "--layers=1", "--lstm_state_size=64", "--unroll_steps=32")
    # No model choice yet: explicit shape flags are used as given, the rest are the defaults.
    assert (given.layers, given.lstm_state_size, given.unroll_steps) == (1, 64, 32)
    assert given.batch_size == HParams().batch_size and given.time_budget == "10m"
    # A budgeted run decays its learning rate unless told otherwise.
    assert given.lr_schedule == "cosine"
    assert _hparams("--time_budget=10m", "--lr_schedule=constant").lr_schedule == "constant"
    assert _hparams("--time_budget=10m", "--lr_schedule=linear").lr_schedule == "linear"
    assert _hparams().lr_schedule == "constant" and _hparams().time_budget == ""
    for args, flag in ((["--time_budget=0s"], "--time_budget"), (["--time_budget=-5m"], "--time_budget"),
                       (["--time_budget=10 parsecs"], "--time_budget"),
                       (["--time_budget=10m", "--epochs=3"], "--epochs"),
                       (["--time_budget=10m", "--num_epochs=3"], "--epochs"),
                       (["--time_budget=10m", "--max_steps=100"], "--max_steps")):
        with pytest.raises(UsageError, match=f"^{flag}=") as error:
            _hparams(*args)
        assert "\n" not in str(error.value)


def test_a_nonsense_budget_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-m", "trainer.task", "--time_budget=10 parsecs",
                             f"--data_dir={tmp_path}", "--data_prefix=x", f"--job-dir={tmp_path / 'job'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --time_budget='10 parsecs': not a duration; write it like 90s, 10m, 1h or 1h30m")
    assert "Traceback" not in result.stderr


def test_submit_passes_the_budget_to_the_vertex_job_and_checks_it() -> None:
    from trainer import submit

    def no_metadata(data_dir: str, prefix: str) -> None:
        raise AssertionError("not needed without %JOB%")

    args = ["--data_dir=gs://b/data", "--data_prefix=p", "--job-dir=gs://b/job", "--time_budget=8h"]
    final, hparams = submit.plan(args, [], tune=False, read_metadata=no_metadata)
    assert "--time_budget=8h" in final and hparams.time_budget == "8h"
    with pytest.raises(UsageError, match=r"^trainer flags after --: --time_budget='8 hours'"):
        submit.plan([*args[:3], "--time_budget=8 hours"], [], tune=False, read_metadata=no_metadata)


def test_the_pipeline_carries_the_budget_and_its_schedule() -> None:
    from pipelines import run, steps

    arguments = run.pipeline_arguments(run.parse_flags(["pipelines.run", "--local", "--time_budget=30m"]),
                                       "/r")
    assert arguments["time_budget"] == "30m" and arguments["hparams"] == {"lr_schedule": "cosine"}
    built = steps.build_hparams("d", "p", "j", {"time_budget": "30m", **arguments["hparams"]})
    assert (built.time_budget, built.lr_schedule) == ("30m", "cosine")


def test_the_pipelines_train_step_chooses_the_model_for_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import steps
    from trainer import runner

    # Parameters left at their defaults are not given; the hparams dict always is.
    values = {"cell": "lstm", "layers": 3, "batch_size": HParams().batch_size, "time_budget": "30m",
              "dropout": 0.1}
    assert steps.given_fields({"dropout": 0.1}, values) == {"layers", "time_budget", "dropout"}
    calls = []

    def fake_train(hparams: HParams, started: float, choose: object) -> None:
        calls.append(choose)
        raise RuntimeError("stop here")

    monkeypatch.setattr(runner, "train", fake_train)
    for budget_flag in ("30m", ""):
        with pytest.raises(RuntimeError, match="stop here"):
            steps.train(HParams(time_budget=budget_flag), frozenset({"layers"}))
    chooser, none = calls
    assert chooser.given == {"layers"} and none is None


# --------------------------------------------------------------------------- clock and schedule


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _tail() -> TailEstimate:
    return TailEstimate(eval_windows=10, sample_tokens=200, checkpoint_bytes=0)


def test_a_budgeted_evaluation_covers_what_fits_its_share() -> None:
    # 635 windows (shelf's validation split at the default shape) and a 1-minute budget.
    tail = TailEstimate(eval_windows=635, sample_tokens=0, checkpoint_bytes=0, budget_seconds=60.0)
    assert tail.evaluated_windows() == 635  # no step time yet: nothing to size it with
    tail.note_steps(3.0, 1)
    tail.note_steps(0.08, 1)  # 80 ms a step: 5% of 60 s holds 37 windows
    assert tail.evaluated_windows() == int(budget.EVAL_SHARE * 60.0 / 0.08) == 37
    compiling = max(budget.EVAL_COMPILE_SECONDS, budget.COMPILE_UNITS["eval"] * 3.0)  # the first call
    assert tail.part("eval") == pytest.approx(compiling + 37 * budget.EVAL_WINDOW_STEPS * 0.08)
    tail.step_seconds = 100.0  # slower than the share: still one window
    assert tail.evaluated_windows() == 1
    unbudgeted = TailEstimate(eval_windows=635, sample_tokens=0, checkpoint_bytes=0)
    unbudgeted.step_seconds = 0.08
    assert unbudgeted.evaluated_windows() == 635


def test_evaluations_during_training_keep_to_their_share_of_the_time_spent() -> None:
    share = budget.PERIODIC_SHARE
    # A 2.5 s evaluation 18 s into a 1-minute run (step 500 of the transformer on shelf): skipped.
    assert not budget.affords_periodic(2.5, 0.0, 18.0)
    # The same evaluation 20 minutes into a long run: it runs, and the next one waits until the
    # time spent makes room for both.
    assert budget.affords_periodic(2.5, 0.0, 1200.0)
    assert budget.affords_periodic(2.5, 2.5, 5.0 / share)
    assert not budget.affords_periodic(2.5, 2.5, 5.0 / share - 1.0)


def test_the_tail_is_guessed_then_measured() -> None:
    tail = _tail()
    guessed = tail.seconds()
    assert guessed == pytest.approx(budget.EVAL_COMPILE_SECONDS + budget.SAVE_SECONDS
                                    + budget.SAMPLE_COMPILE_SECONDS + 200 * budget.SAMPLE_SECONDS_PER_TOKEN
                                    + budget.EXPORT_SECONDS + budget.EXIT_SECONDS)
    tail.note_steps(4.0, 1)  # the first call compiles: it sizes the compiling parts
    assert tail.step_seconds == 0.0
    tail.note_steps(0.1, 1)
    assert tail.step_seconds == 0.1 and tail.compile_seconds == 4.0
    assert tail.part("export") == budget.COMPILE_UNITS["export"] * 4.0
    assert tail.part("eval") == pytest.approx(4.0 + 10 * budget.EVAL_WINDOW_STEPS * 0.1)
    tail.measured.update(eval=0.5, save=0.1, sample=1.0)
    assert tail.part("eval") == budget.MARGIN * 0.5
    # An XLA-compiled step's first call is mostly XLA's compilation, which the export does not pay.
    compiled = dataclasses.replace(_tail(), xla_step=True)
    compiled.note_steps(4.0, 1)
    assert compiled.part("export") == max(budget.EXPORT_SECONDS, budget.XLA_COMPILE_UNITS["export"] * 4.0)
    assert compiled.part("export") < tail.part("export")


def _lr_at(progress: float, schedule: str, floor: float = 1e-4) -> float:
    import tensorflow as tf

    from trainer.runner import LearningRate

    variable = tf.Variable(progress, dtype=tf.float32)
    rate = LearningRate(5e-3, schedule, warmup_steps=20, total_steps=10, floor=floor, time_progress=variable)
    return float(rate(10_000))  # far past --max_steps: only the time decides


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_the_learning_rate_reaches_its_floor_where_the_budget_stops_training(schedule: str) -> None:
    clock = FakeClock()
    tail = _tail()
    run = Budget(100.0, 0.0, tail, started=clock.now - 5.0, clock=clock)  # 5 s of start-up
    end = run.training_end()
    rates = []
    while True:
        reading = run.read()
        rates.append(_lr_at(run.advance(reading), schedule))
        if reading.out_of_time:
            break
        clock.now += 0.5
        tail.note_steps(0.5, 1)
        if len(rates) == 40:  # a measurement moves the end halfway: the curve bends, no jump
            tail.measured["eval"] = 0.1
    assert run.training_end() > end  # it did move
    assert rates[0] == pytest.approx(_lr_at(5.0 / end, schedule), rel=1e-5)
    assert all(b <= a for a, b in zip(rates, rates[1:], strict=False))  # never back up
    assert max(abs(b - a) for a, b in zip(rates, rates[1:], strict=False)) < 5e-3 / 20
    assert rates[-1] == pytest.approx(1e-4, abs=1e-9)  # the floor, exactly at the end
    assert run.read().spent <= run.training_end()


def test_a_resumed_clock_draws_the_uninterrupted_curve() -> None:
    def steps(run: Budget, clock: FakeClock, count: int) -> list[float]:
        out = []
        for _ in range(count):
            out.append(run.advance(run.read()))
            clock.now += 1.0
        return out

    clock = FakeClock()
    whole = Budget(200.0, 0.0, _tail(), clock.now, clock)
    uninterrupted = steps(whole, clock, 120)

    clock = FakeClock()
    first = Budget(200.0, 0.0, _tail(), clock.now, clock)
    before = steps(first, clock, 60)
    saved = first.to_checkpoint()
    assert saved[0] == 60.0 and 0 < saved[1] < 1
    clock.now += 500.0  # the machine is gone for a while: that time is not the budget's
    resumed = Budget.from_checkpoint(saved, 200.0, _tail(), clock.now, clock)
    assert resumed.spent() == 60.0 and resumed.left() == 140.0
    assert resumed.describe() == "time budget 3m20s: 1m00s spent, 2m20s left"
    clock.now += 5.0
    assert resumed.describe(before_this_run=True) == (
        "time budget 3m20s: 1m00s spent before this run, 2m20s left")
    clock.now -= 5.0
    after = steps(resumed, clock, 60)
    assert before + after == pytest.approx(uninterrupted, abs=1e-12)


def test_reading_out_of_time() -> None:
    assert not Reading(spent=10.0, end=20.0, step_seconds=1.0).out_of_time
    assert Reading(spent=19.5, end=20.0, step_seconds=1.0).out_of_time


def test_process_age_counts_from_the_process_start() -> None:
    age = budget.process_age()
    assert age >= time.monotonic() - budget._IMPORTED  # pytest started before it imported budget
    assert budget.process_start() == pytest.approx(time.monotonic() - age, abs=1.0)


def test_progress_lines_show_the_eta_and_the_deadline() -> None:
    clock = FakeClock()
    run = Budget(90.0, 30.0, _tail(), clock.now, clock)
    stream = io.StringIO()
    progress = Progress(total=1, start=4, tokens_per_step=100, log_every=2, stream=stream, budget=run)
    progress.step(5, 3.0)
    progress.step(6, 2.0)
    progress.log(epoch=1, learning_rate=0.002, grad_norm=0.5)
    line = stream.getvalue()
    assert line.startswith("step 6 epoch 1 loss 2.5000 ")
    assert re.search(r" ETA 1m00s \(deadline \d\d:\d\d:\d\d\)$", line.strip()), line


# --------------------------------------------------------------------------- whole runs

# Seconds: start-up (5-15 s, the latter with other jobs on the machine), some training, and the
# tail (17-25 s guessed). One process at a time: two would slow each other after their clocks
# have measured them.
BUDGET = 45.0
MODEL = ["--layers=1", "--lstm_state_size=16", "--embedding_size=8", "--unroll_steps=8",
         "--batch_size=4", "--eval_every=200", "--sample_every=0", "--log_every=20",
         "--save_checkpoints_steps=100", f"--time_budget={BUDGET:.0f}s", "--seed=5"]
RESUMED = re.compile(r"^Resuming .*; time budget 45s: (\w+) spent before this run, (\w+) left",
                     re.MULTILINE)


def _start(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], float]:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "CLUSTER_SPEC")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:  # a file, not a pipe: nothing the test does can slow the run
        process = subprocess.Popen([sys.executable, "-m", "trainer.task", *args], cwd=REPO, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    return process, time.monotonic()


def _wait(process: subprocess.Popen[bytes], began: float) -> float:
    process.wait(timeout=600)
    return time.monotonic() - began


def _clock(job_dir: Path) -> list[float]:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(job_dir)))
    return list(reader.get_tensor("budget_clock/.ATTRIBUTES/VARIABLE_VALUE"))


def _assert_finished_in_budget(job_dir: Path, output: str, wall: float, budget_left: float) -> None:
    assert re.search(r"^finished: step \d+", output, re.MULTILINE), output[-3000:]
    # The wall clock itself is not asserted (no timed assertions in tests: a loaded machine
    # would fail them); the 90 s acceptance run was checked by hand (issue #23 note).
    print(f"{wall:.1f} s of wall clock for {budget_left:.1f} s of budget left")
    step = int(re.search(r"^Training stopped for the time budget at step (\d+)", output,
                         re.MULTILINE).group(1))
    # The final evaluation, checkpoint, sample and export, all at the last step.
    assert re.search(rf"^step {step}: valid loss ", output, re.MULTILINE), output[-3000:]
    import tensorflow as tf

    assert tf.train.latest_checkpoint(str(job_dir)).endswith(f"ckpt-{step}")
    assert (job_dir / "samples" / f"step-{step}.txt").read_text()
    assert (job_dir / "export" / "saved_model.pb").exists()
    # The schedule ran to its end: progress 1, so the learning rate is at its floor.
    spent, progress = _clock(job_dir)[:2]
    assert progress == 1.0 and spent <= BUDGET


@pytest.mark.slow
def test_a_fresh_budgeted_job_ends_in_its_budget(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    job_dir = tmp_path / "job"
    process, began = _start([f"--data_dir={data_dir}", f"--data_prefix={prefix}", *MODEL,
                             f"--job-dir={job_dir}"], tmp_path / "job.log")
    wall = _wait(process, began)
    output = (tmp_path / "job.log").read_text()
    assert process.returncode == 0, output[-3000:]
    assert re.search(r"^step \d+ epoch \d+ loss .* ETA \S+ \(deadline ", output, re.MULTILINE), output[-3000:]
    _assert_finished_in_budget(job_dir, output, wall, BUDGET)


@pytest.mark.slow
def test_a_preempted_budgeted_job_runs_only_the_time_it_had_left(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    job_dir = tmp_path / "job"
    args = [f"--data_dir={data_dir}", f"--data_prefix={prefix}", *MODEL, f"--job-dir={job_dir}"]
    term, term_began = _start(args, tmp_path / "term.log")
    # SIGTERM at 40% of the budget, once training has begun.
    while not re.search(r"^step \d+ epoch", (tmp_path / "term.log").read_text(), re.MULTILINE) \
            or time.monotonic() - term_began < 0.4 * BUDGET:
        assert term.poll() is None, (tmp_path / "term.log").read_text()[-3000:]
        time.sleep(0.2)
    term.send_signal(signal.SIGTERM)
    term_wall = _wait(term, term_began)
    term_output = (tmp_path / "term.log").read_text()
    assert term.returncode == 143, term_output[-3000:]
    assert re.search(r"^SIGTERM: saving a checkpoint at step \d+ and stopping \(time budget 45s: ",
                     term_output, re.MULTILINE), term_output[-3000:]

    rerun, rerun_began = _start(args, tmp_path / "rerun.log")
    rerun_wall = _wait(rerun, rerun_began)
    rerun_output = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, rerun_output[-3000:]
    spent, left = map(parse_duration, RESUMED.search(rerun_output).groups())
    # The resume line counts the first process's time (to its SIGTERM checkpoint; its exit is
    # not counted) and what is left; the rerun takes no more than that, and its schedule ends
    # where an uninterrupted run's does: at the floor, where training stops.
    assert 0 < spent < BUDGET and abs(spent + left - BUDGET) <= 1, (spent, left, term_wall)
    _assert_finished_in_budget(job_dir, rerun_output, rerun_wall, left + 1)

    # TensorBoard: both runs wrote the same deadline, and their budget/* points share one axis
    # of budget seconds, the rerun's continuing after the first run's.
    seconds, losses = _budget_events(job_dir / "tensorboard")
    assert seconds == [BUDGET, BUDGET]
    assert [step for step, _ in losses] == sorted(step for step, _ in losses)
    assert losses and max(step for step, _ in losses) <= BUDGET


def _budget_events(summary_dir: Path) -> tuple[list[float], list[tuple[int, float]]]:
    import tensorflow as tf

    seconds, losses = [], []
    for path in sorted(summary_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == "budget/seconds":
                    seconds.append(float(tf.make_ndarray(value.tensor)))
                elif value.tag == "budget/train_loss":
                    losses.append((event.step, float(tf.make_ndarray(value.tensor))))
    return seconds, losses
