"""trainer.choose: the model chosen for --time_budget. The rule and the calibration's bounds with
fake rates and a fake clock (fast); the flags kept; hparams.json's record and a resumed job; one
real measurement of the trainer's step; one short `python -m trainer.task --time_budget` run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import choose
from trainer.choose import Measurement, Option, calibrate, decide, make_options, time_steps
from trainer.hparams import HParams

REPO = Path(__file__).resolve().parents[1]
VOCAB = 65
DEFAULT, BABY, BIG_LSTM, BIG_GPT = "LSTM 2x512", "transformer 4x4x128", "LSTM 3x768", "transformer 6x6x384"
# tokens/s of each shape on the measured 2-core machine (trainer/choose.py's table)
RATES = {DEFAULT: 29_000, BABY: 27_000, BIG_LSTM: 8_000, BIG_GPT: 6_400}


def _options(given: tuple[str, ...] = (), **flags: object) -> list[Option]:
    options, _ = make_options(HParams(vocab_size=VOCAB, time_budget="10m", **flags), given)
    return options


def test_the_candidates_fill_every_chosen_field_and_the_default_is_hparams_own() -> None:
    for candidate in choose.CANDIDATES:
        assert set(candidate.overrides) == set(choose.CHOSEN_FIELDS), candidate.name
    # HParams' own default but for the attention head, which --attention_window gives outside a
    # budget (its default stays 0: old job dirs' hparams.json, which lack it, keep their shape),
    # and the weight decay that keeps the head stable (choose.LSTM_WEIGHT_DECAY).
    default = HParams().replace(**choose.CANDIDATES[0].overrides)
    assert default == HParams(attention_window=choose.ATTENTION_WINDOW, weight_decay=choose.LSTM_WEIGHT_DECAY)
    assert [o.name for o in _options()] == [DEFAULT, BABY, BIG_LSTM, BIG_GPT]
    assert [round(o.parameters / 1e5) for o in _options()] == [37, 8, 127, 107]


# --------------------------------------------------------------------------- the rule


def test_small_corpus_and_short_budget_keep_the_default_lstm() -> None:
    choice = choose.choose(1_000_000, 60.0, RATES, _options(), budget_seconds=90)
    assert choice.name == DEFAULT and choice.overrides == {**choose.CANDIDATES[0].overrides}
    assert choice.reason.startswith("time budget 1m30s on 1.0 M tokens: LSTM 2x512 with an attention head "
                                    "over its last 512 outputs (3.7 M parameters)")
    assert "transformer 6x6x384 needs a corpus of >= 2.7 M tokens" in choice.reason


def test_many_epochs_add_dropout() -> None:
    choice = choose.choose(1_000_000, 560.0, RATES, _options(), budget_seconds=600)
    assert choice.name == DEFAULT and choice.overrides["dropout"] == choose.DROPOUT_MANY_EPOCHS
    assert choice.epochs > choose.OVERFIT_EPOCHS and "512 outputs and dropout 0.25" in choice.reason


def test_big_corpus_and_long_budget_choose_a_larger_shape() -> None:
    corpus = 22_000_000
    assert choose.choose(corpus, 560.0, RATES, _options()).name == DEFAULT  # 10 minutes: too few tokens
    hour = choose.choose(corpus, 3500.0, RATES, _options(), budget_seconds=3600)
    assert hour.name == BIG_LSTM and hour.overrides["layers"] == 3 and hour.overrides["dropout"] == 0.0
    assert "the largest shape that sees enough tokens per parameter (>= 2 for it): it trains 1.3 epochs" \
        in hour.reason
    # Where the transformer runs far faster (a GPU) and the LSTM is not measured, it is the one.
    fast = choose.choose(corpus, 3500.0, {DEFAULT: 29_000, BIG_GPT: 60_000}, _options())
    assert fast.name == BIG_GPT and fast.overrides["unroll_steps"] == 256


def test_the_small_transformer_only_before_the_lstm_has_seen_enough() -> None:
    early = choose.choose(1_000_000, 20.0, RATES, _options())
    assert early.name == BABY and "LSTM 2x512 would see 0.14 of the 0.3 tokens" in early.reason
    assert choose.choose(1_000_000, 60.0, RATES, _options()).name == DEFAULT


def test_unmeasured_shapes_are_not_chosen_except_the_first() -> None:
    assert choose.choose(22_000_000, 8 * 3600.0, {DEFAULT: 29_000}, _options()).name == DEFAULT
    unmeasured = choose.choose(22_000_000, 3600.0, {}, _options())
    assert unmeasured.name == DEFAULT and "its speed not measured" in unmeasured.reason


# --------------------------------------------------------------------------- calibration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_steps_stops_at_its_allowance_counting_steps() -> None:
    clock, calls = Clock(), []

    def step() -> int:
        clock.now += 5.0 if not calls else 0.5  # the first call compiles
        calls.append(1)
        return 100

    measured = time_steps(step, allowed=7.0, clock=clock)
    # 5 s compiling, then 0.5 s steps until 7 s in all: 4 timed steps.
    assert measured.steps == 4 and len(calls) == 5
    assert measured.compile_seconds == 5.0 and measured.tokens_per_second == pytest.approx(200.0)
    calls.clear()
    # A compilation longer than the allowance still times one step: a rate needs one.
    assert time_steps(step, allowed=1.0, clock=clock).steps == 1
    calls.clear()
    assert time_steps(step, allowed=1e9, clock=clock, max_steps=3).steps == 3


def _fake_measure(clock: Clock, rates: dict[str, float], log: list[str]) -> choose.Measure:
    def measure(option: Option, allowed: float) -> Measurement:
        log.append(option.name)
        seconds = min(option.candidate.compile_seconds + choose.MEASURE_SECONDS, allowed + 0.5)
        clock.now += seconds
        return Measurement(rates[option.name], option.candidate.compile_seconds, 5, seconds)

    return measure


def test_calibration_measures_only_shapes_that_can_win_in_its_share(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, log = Clock(), []
    clock.now = 8.0  # start-up
    small = calibrate(_options(), 1_000_000, 600.0, clock, _fake_measure(clock, RATES, log))
    # 10 minutes on 1 M tokens: the larger shapes need a larger corpus, the small transformer
    # cannot beat an LSTM that sees enough: only the default is measured.
    assert log == [DEFAULT]
    assert small.skipped[BABY].startswith("cannot win") and small.skipped[BIG_LSTM].startswith("cannot win")
    assert small.seconds <= choose.CALIBRATION_SHARE * 600.0

    clock.now, log = 8.0, []
    big = calibrate(_options(), 22_000_000, 8 * 3600.0, clock, _fake_measure(clock, RATES, log))
    # Largest first: once the large LSTM is measured to qualify, the smaller shapes cannot win.
    assert log == [DEFAULT, BIG_LSTM] and set(big.skipped) == {BABY, BIG_GPT}
    clock.now, log = 8.0, []
    calibrate(_options(), 22_000_000, 8 * 3600.0, clock, _fake_measure(clock, {**RATES, BIG_LSTM: 500}, log))
    assert log == [DEFAULT, BIG_LSTM, BIG_GPT]  # the large LSTM is too slow here: the transformer may win

    # A share of 8.6 s: enough for the default (5 s), not for the large LSTM too (6 s).
    monkeypatch.setattr(choose, "CALIBRATION_SHARE", 0.0003)
    clock.now, log = 8.0, []
    tight = calibrate(_options(), 22_000_000, 8 * 3600.0, clock, _fake_measure(clock, RATES, log))
    assert log == [DEFAULT] and tight.seconds <= 0.0003 * 8 * 3600.0
    assert tight.skipped[BIG_LSTM] == "no time to measure it (~6 s) within 0.0003 of the budget"


def test_short_budgets_measure_nothing_and_say_so() -> None:
    clock, log = Clock(), []
    hparams = HParams(time_budget="90s")
    chosen, record = decide(hparams, (), 1_000_000, VOCAB, 90.0, clock, _fake_measure(clock, RATES, log))
    # The default shape, with the attention head and its weight decay.
    assert log == [] and chosen == hparams.replace(attention_window=choose.ATTENTION_WINDOW,
                                                   weight_decay=choose.LSTM_WEIGHT_DECAY)
    assert "under 3m00s nothing is measured" in record["reason"]
    assert record["shape"] == DEFAULT and set(record["candidates"]) == {DEFAULT, BABY, BIG_LSTM, BIG_GPT}


def test_short_budgets_train_the_shape_of_the_cpus_matrix_unit() -> None:
    assert choose.short_budget_shape({"avx512f", "amx_bf16", "amx_tile"}, has_accelerator=False) == DEFAULT
    assert choose.short_budget_shape({"avx512f", "avx512_bf16"}, has_accelerator=False) == BABY
    assert choose.short_budget_shape(set(), has_accelerator=False) == BABY
    assert choose.short_budget_shape({"avx512_bf16"}, has_accelerator=True) is None
    clock, log = Clock(), []
    hparams = HParams(time_budget="1m")
    chosen, record = decide(hparams, (), 1_000_000, VOCAB, 60.0, clock, _fake_measure(clock, RATES, log),
                            short_shape=BABY)
    assert log == [] and record["shape"] == BABY
    assert (chosen.cell, chosen.layers, chosen.d_model, chosen.unroll_steps) == ("transformer", 4, 128, 64)
    assert "on a CPU without AMX, transformer 4x4x128 learns most in a short budget" in record["reason"]
    assert (chosen.learning_rate, chosen.batch_size) == (4e-3, 24)
    assert "with learning_rate 0.004, batch_size 24 for a short budget" in record["reason"]
    given_rate, _ = decide(hparams.replace(learning_rate=2e-3), ("learning_rate",), 1_000_000, VOCAB, 60.0,
                           clock, None, short_shape=BABY)
    assert given_rate.learning_rate == 2e-3 and given_rate.cell == "transformer"
    # --cell limits it as ever: an LSTM asked for is an LSTM trained.
    lstm, record = decide(hparams.replace(cell="lstm"), ("cell",), 1_000_000, VOCAB, 60.0, clock, None,
                          short_shape=BABY)
    assert lstm.cell == "lstm" and record["shape"] == DEFAULT
    # Longer budgets measure, whatever the CPU.
    _, record = decide(HParams(time_budget="10m"), (), 1_000_000, VOCAB, 600.0, clock,
                       _fake_measure(clock, RATES, log), short_shape=BABY)
    assert log and record["shape"] == DEFAULT


# --------------------------------------------------------------------------- flags


def test_explicit_flags_are_kept_and_the_choice_fills_the_rest() -> None:
    clock, log = Clock(), []
    given = ("layers", "dropout")
    hparams = HParams(time_budget="8h", layers=4, dropout=0.1)
    chosen, record = decide(hparams, given, 22_000_000, VOCAB, 8 * 3600.0, clock,
                            _fake_measure(clock, {"LSTM 4x512": 20_000, "LSTM 4x768": 5_000,
                                                  "transformer 4x4x128": 27_000,
                                                  "transformer 4x6x384": 9_000}, log))
    assert (chosen.layers, chosen.dropout) == (4, 0.1)
    assert chosen.lstm_state_size == 768 and record["shape"] == "LSTM 4x768"
    assert "kept --dropout=0.1, --layers=4 as given" in record["reason"]
    assert record["given"] == ["dropout", "layers"]


def test_a_given_cell_limits_the_choice_to_its_shapes() -> None:
    names = [o.name for o in _options(("cell",), cell="transformer")]
    assert names == [BABY, BIG_GPT]
    # Flags that make a candidate invalid drop it, with a note.
    options, notes = make_options(HParams(unroll_steps=32), ("unroll_steps",))
    assert [o.name for o in options] == [DEFAULT, BIG_LSTM] and len(notes) == 2
    assert "--max_context=64 is longer than the training windows" in notes[0]


def test_a_shape_flag_only_one_cell_reads_limits_the_choice_to_that_cell() -> None:
    narrow = _options(("lstm_state_size",), lstm_state_size=384)
    assert [o.name for o in narrow] == ["LSTM 2x384", "LSTM 3x384"]
    assert [o.name for o in _options(("d_model", "layers"), d_model=192, layers=3)] == [
        "transformer 3x4x192", "transformer 3x6x192"]
    assert len(_options(("layers",), layers=3)) == 4  # both cells read --layers
    # Flags of both cells: no candidate reads them all, so nothing is chosen.
    options, notes = make_options(HParams(lstm_state_size=384, d_model=192), ("lstm_state_size", "d_model"))
    assert options == [] and "LSTM 2x512 does not read --d_model" in notes
    assert "transformer 4x4x128 does not read --lstm_state_size" in notes


def test_a_fixed_cell_with_its_shape_given_is_not_chosen() -> None:
    hparams = HParams(time_budget="1h", cell="lstm", layers=1, lstm_state_size=64, embedding_size=32)
    given = ("cell", "layers", "lstm_state_size", "embedding_size")
    chosen, record = decide(hparams, given, 22_000_000, VOCAB, 3600.0, Clock(), None)
    assert chosen == hparams and record["candidates"] == {}
    assert "nothing chosen (--cell=lstm and its shape flags given)" in record["reason"]
    gru = HParams(time_budget="1h", cell="gru")
    assert decide(gru, ("cell",), 22_000_000, VOCAB, 3600.0, Clock(), None)[0] == gru


def test_submit_leaves_job_to_a_trainer_that_chooses_the_shape() -> None:
    from trainer import submit

    def no_metadata(data_dir: str, prefix: str) -> None:
        raise AssertionError("--language_model is given")

    args = ["--data_dir=gs://b/data", "--data_prefix=p", "--job-dir=gs://b/job/%JOB%",
            "--language_model=char", "--time_budget=1h"]
    final, _ = submit.plan(args, [], tune=False, read_metadata=no_metadata)
    assert "--job-dir=gs://b/job/%JOB%" in final  # the trainer names it once it has chosen
    fixed = [*args, "--cell=lstm", "--num_layers=3", "--rnn_size=64", "--embedding_size=32"]
    final, hparams = submit.plan(fixed, [], tune=False, read_metadata=no_metadata)
    assert hparams.job_dir == "gs://b/job/p-64-states-3-layers-char-emb32"
    assert f"--job-dir={hparams.job_dir}" in final


# --------------------------------------------------------------------------- the job dir


def test_hparams_json_records_the_choice_and_a_resumed_job_keeps_it(tmp_path: Path, make_data_dir,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf
    from conftest import SHAKESPEARE_LIKE

    from trainer import checkpoints, runner

    data_dir, prefix, _ = make_data_dir(tmp_path, SHAKESPEARE_LIKE * 30)  # a window of 32 x 128 fits
    base = HParams(data_dir=data_dir, data_prefix=prefix, job_dir=str(tmp_path / "job" / "%JOB%"),
                   time_budget="10m", lr_schedule="cosine")
    # A first run chose the large LSTM (what its record says is kept as written).
    record = {"reason": "time budget 10m00s on 2 k tokens: LSTM 3x768 (...)", "shape": BIG_LSTM}
    first = base.replace(layers=3, lstm_state_size=768, learning_rate=3e-3, dropout=0.25)
    prepared, _ = runner.prepare_job(first, None, record)
    job_dir = prepared.job_dir
    assert job_dir.endswith("-768-states-3-layers-char")
    saved = json.loads(Path(job_dir, "hparams.json").read_text())
    assert saved["chosen"] == record and saved["layers"] == 3
    assert checkpoints.saved_hparams(job_dir) == prepared  # the record is not a hyperparameter
    assert checkpoints.saved_chosen(job_dir) == record

    def no_measuring(*args: object) -> None:
        raise AssertionError("a resumed job must not measure or choose again")

    monkeypatch.setattr(choose, "_measurer", no_measuring)
    monkeypatch.setattr(choose, "decide", no_measuring)
    # Run again with the same command (no shape flags), except a learning rate given now.
    again, again_record = choose.ForBudget({"learning_rate"})(base.replace(learning_rate=1e-3),
                                                              tf.distribute.get_strategy(), None)
    assert (again.layers, again.lstm_state_size, again.dropout, again.learning_rate) == (3, 768, 0.25, 1e-3)
    assert again_record["reason"] == record["reason"]
    assert again_record["resumed"].startswith("resumed: the model of its hparams.json is kept (time budget")
    assert runner.prepare_job(again, None, again_record)[0].job_dir == job_dir


def test_calibration_runs_the_trainers_step_a_bounded_number_of_times(tmp_path: Path, make_data_dir) -> None:
    import tensorflow as tf

    data_dir, prefix, metadata = make_data_dir(tmp_path)
    sized = HParams(data_dir=data_dir, data_prefix=prefix, vocab_size=metadata.vocab_size,
                    language_model="char", time_budget="10m")
    tiny = choose.Candidate("tiny", {"layers": 1, "lstm_state_size": 16, "embedding_size": 8,
                                     "batch_size": 4, "unroll_steps": 8}, 0.0, 0.0, 1.0, 1.0)
    measure = choose._measurer(sized, tf.distribute.get_strategy(), metadata)
    measured = measure(Option(tiny, tiny.overrides, "LSTM 1x16", 0), 60.0)
    assert 1 <= measured.steps <= choose.MAX_MEASURE_STEPS
    assert measured.tokens_per_second > 0 and measured.seconds >= measured.compile_seconds


def test_a_longer_budget_measures_the_candidates_on_the_real_data(tmp_path: Path, make_data_dir,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorflow as tf

    data_dir, prefix, metadata = make_data_dir(tmp_path)
    small = {**choose.CANDIDATES[0].overrides, "layers": 1, "lstm_state_size": 16, "embedding_size": 8,
             "batch_size": 4, "unroll_steps": 8}
    # Two tiny shapes whose bars both are met: the larger is chosen once both are measured.
    monkeypatch.setattr(choose, "CANDIDATES", (
        choose.Candidate("small", small, 0.0, 0.0, 1_000.0, 1.0),
        choose.Candidate("larger", {**small, "lstm_state_size": 32}, 0.0, 0.0, 1_000.0, 1.0)))
    hparams = HParams(data_dir=data_dir, data_prefix=prefix, job_dir=str(tmp_path / "job"), time_budget="10m")
    chosen, record = choose.ForBudget(())(hparams, tf.distribute.get_strategy(), None)
    assert chosen.lstm_state_size == 32 and record["shape"] == "LSTM 1x32"
    measured = record["candidates"]
    assert set(measured) == {"LSTM 1x16", "LSTM 1x32"}
    for shape in measured.values():
        assert 1 <= shape["steps"] <= choose.MAX_MEASURE_STEPS and shape["tokens_per_second"] > 0
    tokens = choose._tokens(metadata.splits["train"].tokens)
    # The tiny corpus is seen many times over: dropout is added, and the reason says so.
    head = (f"time budget 10m00s on {tokens} tokens: LSTM 1x32 with an attention head over its last 512 "
            "outputs and dropout 0.25 (")
    assert record["reason"].startswith(head), record["reason"]
    assert "(measured 2 of 2 shapes in " in record["reason"]


# --------------------------------------------------------------------------- a whole run


@pytest.mark.slow
def test_a_budgeted_run_writes_its_choice(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    job_dir = tmp_path / "job"
    # Small shape flags keep the run cheap and are kept; the cell is left to the choice.
    args = [f"--data_dir={data_dir}", f"--data_prefix={prefix}", f"--job-dir={job_dir}",
            "--time_budget=40s", "--layers=1", "--lstm_state_size=16", "--embedding_size=8",
            "--unroll_steps=8", "--batch_size=4", "--eval_every=200", "--sample_every=0",
            "--save_checkpoints_steps=100", "--log_every=50"]
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "CLUSTER_SPEC")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "trainer.task", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("Model for the time budget: time budget 40s on "), lines[:3]
    saved = json.loads((job_dir / "hparams.json").read_text())
    chosen = saved["chosen"]
    assert chosen["shape"] == "LSTM 1x16" and chosen["reason"] == lines[0].split(": ", 1)[1]
    assert "kept --batch_size=4, --embedding_size=8, --layers=1, --lstm_state_size=16, --unroll_steps=8" \
        in chosen["reason"]
    assert (saved["cell"], saved["layers"], saved["lstm_state_size"]) == ("lstm", 1, 16)
    assert set(chosen["candidates"]) == {"LSTM 1x16"}  # the others do not fit these flags
