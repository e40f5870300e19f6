"""The small Estimator replacement: `train(hparams)` runs and resumes a training job.

One job dir, one model: the first run writes `hparams.json` and a copy of the data's metadata,
every run resumes from the newest checkpoint (global step, optimizer slots, epoch, window
position in the epoch and the carried recurrent state) and says so in one line. Checkpoints go
out every `save_checkpoints_steps`, at the end and on SIGTERM (preemption; with several workers a
SIGTERM to any one of them stops all after the same step, see `distribute.stop_agreement`) or
SIGINT (Ctrl-C); the best checkpoint by validation loss is kept in `best/`. A NaN or Inf stops the
run before anything is saved. With NT-ASGD, once it has switched to averaging, best/ and the
exported SavedModel hold the averaged weights; the regular checkpoints keep the raw ones (and the
averages in the optimizer), so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import keras
import tensorflow as tf

from preprocessing import contract
from trainer import (
    checkpoints,
    cloud_env,
    data,
    distribute,
    errors,
    finetune,
    kernels,
    loops,
    optimizers,
    sampling,
    storage,
    xla,
)
from trainer.budget import (
    EVAL_SHARE,
    Budget,
    Reading,
    TailEstimate,
    affords_periodic,
    format_duration,
    parse_duration,
)
from trainer.errors import UsageError
from trainer.hparams import HPARAMS_FILE, HParams, resolve_precision, shape_mismatches
from trainer.model_fn import Params, bits_per_token, perplexity
from trainer.models import build_model
from trainer.progress import Progress
from trainer.summaries import Summaries, bits_name_for

SAMPLE_TEMPERATURE = 0.8


class TrainingDiverged(UsageError):
    """The loss or the weights became NaN/Inf; nothing was saved after the last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
    job_dir: str
    language_model: str
    step: int
    epoch: int
    position: int
    train_loss: float | None  # mean over the last logging interval
    eval_loss: float | None  # the last validation loss (nats/token)
    best_eval_loss: float | None
    tokens_per_second: float
    stopped: str  # "finished" | "terminated" (SIGTERM) | "interrupted" (SIGINT, Ctrl-C)


# --------------------------------------------------------------------------- set-up


def prepare_job(hparams: HParams, strategy: tf.distribute.Strategy | None = None,
                chosen: dict[str, Any] | None = None) -> tuple[HParams, contract.Metadata]:
    """Resolves hparams against the data and the job dir, checks every user error, then writes
    hparams.json (with `chosen`, the record of trainer.choose, if any) and metadata.json into the
    job dir. Nothing is written if a check fails.

    `strategy` (None: one device) must be able to split --batch_size between its replicas."""
    metadata = data.read_metadata(hparams.data_dir, hparams.data_prefix)
    try:
        hparams = checkpoints.resolve_hparams(hparams, metadata).validate()
    except ValueError as err:  # HParams built in code (pipelines, tests) skip the flags' check
        raise UsageError(str(err)) from None
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    accelerator = bool(tf.config.list_physical_devices("GPU")) or distribute.is_tpu(strategy)
    hparams = xla.resolve(hparams, replicas, accelerator)
    hparams = resolve_precision(hparams, on_tpu=distribute.is_tpu(strategy))
    if strategy is not None:
        # Before anything is written: an uneven split would silently drop streams, then fail
        # on the first assignment of the carried state.
        distribute.per_replica_batch(hparams.batch_size, strategy)
    data.shard_files(hparams.data_dir, hparams.data_prefix, "train")
    data.layout_for(metadata.splits["train"].tokens, hparams.batch_size, hparams.unroll_steps)
    _check_existing_job(hparams, metadata)
    finetune.check(hparams, metadata)
    with errors.writing(f"--job-dir={hparams.job_dir}"):
        checkpoints.write_atomic(checkpoints.join(hparams.job_dir, HPARAMS_FILE), hparams.to_json(chosen))
        checkpoints.save_metadata(hparams.job_dir, metadata)
    return hparams, metadata


def _check_existing_job(hparams: HParams, metadata: contract.Metadata) -> None:
    saved_metadata = checkpoints.saved_metadata(hparams.job_dir)
    if saved_metadata is not None and saved_metadata.vocab != metadata.vocab:
        raise UsageError(
            f"--data_dir={hparams.data_dir} --data_prefix={hparams.data_prefix}: its vocabulary "
            f"({metadata.vocab_size} tokens) differs from the one --job-dir={hparams.job_dir} was "
            f"trained with ({saved_metadata.vocab_size}); use another --job-dir or that job's data")
    saved = checkpoints.saved_hparams(hparams.job_dir)
    if saved is not None:
        mismatches = shape_mismatches(saved, hparams)
        if mismatches:
            raise UsageError(f"--job-dir={hparams.job_dir} holds a model of another shape "
                             f"({'; '.join(mismatches)}); use the job's flags or another --job-dir")


def eval_layout(split_tokens: int, hparams: HParams, split: str, replicas: int = 1) -> data.Layout:
    """Evaluation keeps the unroll length; a small split gets fewer streams rather than none
    (a multiple of the replicas, which split the streams between them)."""
    batch = min(hparams.batch_size, max(split_tokens // (hparams.unroll_steps + 1), 1))
    batch = max(batch - batch % replicas, replicas)
    return data.layout_for(split_tokens, batch, hparams.unroll_steps, split)


def strategy_from_environment() -> tf.distribute.Strategy:
    """One device, several GPUs, several workers or a TPU: see trainer.distribute."""
    return distribute.strategy_from_environment()


class LearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to the peak, then constant, or linear or cosine decay to `floor`.

    The decay follows the steps towards `total_steps`, or with `time_progress` (--time_budget)
    that variable: the fraction of the training time spent, which the runner sets before each
    compiled call from the clock the checkpoint keeps (trainer.budget), so that the rate reaches
    `floor` when the budget stops training, and a resumed run follows the same curve."""

    def __init__(self, peak: float, schedule: str, warmup_steps: int, total_steps: int,
                 floor: float = 0.0, time_progress: tf.Variable | None = None) -> None:
        self.peak, self.schedule, self.floor = peak, schedule, floor
        self.warmup_steps, self.total_steps = warmup_steps, max(total_steps, 1)
        self.time_progress = time_progress

    def __call__(self, step: Any) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        warmup = tf.minimum(1.0, (step + 1.0) / max(self.warmup_steps, 1))
        if self.time_progress is not None:
            progress = tf.clip_by_value(tf.cast(self.time_progress, tf.float32), 0.0, 1.0)
        else:
            decay_steps = max(self.total_steps - self.warmup_steps, 1)
            progress = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)
        if self.schedule == "linear":
            factor = 1.0 - progress
        elif self.schedule == "cosine":
            factor = 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            factor = tf.constant(1.0)
        return warmup * (self.floor + (self.peak - self.floor) * factor)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "schedule": self.schedule, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "floor": self.floor}


def make_optimizer(hparams: HParams, total_steps: int,
                   time_progress: tf.Variable | None = None) -> keras.optimizers.Optimizer:
    rate = LearningRate(hparams.learning_rate, hparams.lr_schedule, hparams.warmup_steps, total_steps,
                        hparams.min_learning_rate, time_progress)
    if hparams.optimizer == "adam" and hparams.weight_decay:
        optimizer = keras.optimizers.AdamW(rate, weight_decay=hparams.weight_decay, beta_2=hparams.adam_beta2)
        # Keras and verne name vectors so: biases (also the transformer's distance and output
        # biases) and layer-norm scales and offsets are not decayed, as in GPT-2's recipe.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        return optimizer
    if hparams.optimizer == "adam":
        return keras.optimizers.Adam(rate, beta_2=hparams.adam_beta2)
    if hparams.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(rate)
    if hparams.optimizer == "sgd":
        return keras.optimizers.SGD(rate)
    if hparams.optimizer == "ntasgd":
        return optimizers.make_ntasgd(rate)
    raise UsageError(f"--optimizer={hparams.optimizer} is not available yet; use adam, rmsprop or sgd")


def total_steps(hparams: HParams, layout: data.Layout) -> int:
    """Where training stops: --max_steps when given, else --epochs over the training split."""
    return hparams.max_steps if hparams.max_steps > 0 else hparams.epochs * layout.windows_per_epoch


# --------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    window: int = 0  # windows consumed in the current epoch


class _Trainer:
    """Holds the objects of one run; `run()` is the loop."""

    def __init__(self, hparams: HParams, metadata: contract.Metadata,
                 strategy: tf.distribute.Strategy, started: float | None = None) -> None:
        self.hparams, self.metadata = hparams, metadata
        # --time_budget: set up in restore(), which reads the time already spent.
        self.budget_seconds = parse_duration(hparams.time_budget) if hparams.time_budget else 0.0
        self.started = time.monotonic() if started is None else started
        self.budget: Budget | None = None
        self.out_of_time = False
        # With several workers each reads only its own train shards where they divide.
        self.reading = data.plan_reading(data.shard_files(hparams.data_dir, hparams.data_prefix, "train"),
                                         metadata.splits["train"], hparams.batch_size,
                                         hparams.unroll_steps, distribute.readers(strategy))
        if self.reading.note:
            print(self.reading.note, flush=True)
        self.layout = self.reading.layout
        self.total = total_steps(hparams, self.layout)
        self.strategy = strategy
        # Only the chief writes summaries and samples; with several workers the others save
        # their (identical) checkpoints into a scratch dir, as MultiWorkerMirroredStrategy needs.
        self.chief = distribute.is_chief(self.strategy)
        self.save_dir = distribute.checkpoint_dir(hparams.job_dir, self.strategy)
        self.valid = self._valid_split()
        keras.utils.set_random_seed(hparams.seed)
        with self.strategy.scope():
            self.model = build_model(hparams)
            # The learning rate's decay input under --time_budget (see LearningRate).
            self.time_progress = (tf.Variable(0.0, dtype=tf.float32, trainable=False)
                                  if self.budget_seconds else None)
            self.optimizer = make_optimizer(hparams, self.total, self.time_progress)
            self.optimizer.build(self.model.trainable_variables)
            self.counters = {name: tf.Variable(0, dtype=tf.int64, trainable=False)
                             for name in ("step", "epoch", "position")}
            self.layout_var = tf.Variable([0, 0, 0], dtype=tf.int64, trainable=False)
            self.readers = tf.Variable(0, dtype=tf.int64, trainable=False)  # Reading.readers
            self.best_loss = tf.Variable(math.inf, dtype=tf.float64, trainable=False)
            # The budget's clock (Budget.to_checkpoint): seconds spent and measured times.
            self.clock = tf.Variable([0.0] * 6, dtype=tf.float64, trainable=False)
        self.params = Params(hparams, self.model)
        self.single_replica = self.strategy.num_replicas_in_sync == 1
        # The carried state is saved too (gathered from the replicas), so a resumed run
        # continues exactly.
        self.carry = [tf.Variable(t, trainable=False)
                      for t in tf.nest.flatten(self.model.window_state(hparams.batch_size))]
        self.items = dict(optimizer=self.optimizer, layout=self.layout_var, readers=self.readers,
                          best_loss=self.best_loss, **checkpoints.model_trackables(self.model),
                          **self.counters)
        self.checkpoint = tf.train.Checkpoint(**self.items, carry=self.carry)
        # Saved with the clock, restored without it: checkpoints from before the clock existed
        # must still restore (restore() reads the clock apart, when it is there).
        saved = tf.train.Checkpoint(**self.items, carry=self.carry, budget_clock=self.clock)
        self.manager = tf.train.CheckpointManager(saved, self.save_dir,
                                                  max_to_keep=hparams.keep_checkpoint_max)
        self.best_manager = tf.train.CheckpointManager(
            saved, checkpoints.join(self.save_dir, checkpoints.BEST_DIR), max_to_keep=1)
        with self.strategy.scope():
            # float16 gradients underflow without it; bfloat16 has float32's exponent range.
            self.loss_scale = (optimizers.DynamicLossScale() if hparams.precision == "float16"
                               else None)
        self.train_step = loops.make_train_step(self.params, self.optimizer, self.strategy,
                                                self.loss_scale, jit_compile=hparams.xla == "step")
        self.train_steps = loops.make_train_steps(self.params, self.optimizer, self.strategy,
                                                  self.loss_scale)
        self.eval_step = loops.make_eval_step(self.params, self.strategy, jit_compile=hparams.xla == "step")
        self.sampler = sampling.Sampler(self.model)
        self.summaries = Summaries(hparams.summary_dir, metadata.tokenizer, write=self.chief)
        self.terminate = False  # set by SIGTERM or SIGINT on this worker
        self.periodic_seconds = 0.0  # evaluations and samples during training, this process
        self.said_eval_share = False  # the line on --time_budget's evaluation windows, once
        # What stopped the run, for its last line and exit status; another worker's SIGTERM
        # (preemption) stops this one too, hence the default.
        self.stop_signal = signal.SIGTERM
        self.agree_to_stop = distribute.stop_agreement(self.strategy)
        self.from_chief = distribute.chief_decides(self.strategy, lowest=_CHIEF_FAILED)
        self.agree_on_clock = distribute.mean_agreement(self.strategy)
        self.saved_step = -1

    def _valid_split(self) -> tuple[list[str], data.Layout] | None:
        if self.hparams.eval_every <= 0:
            return None
        tokens = self.metadata.splits["valid"].tokens
        try:
            layout = eval_layout(tokens, self.hparams, "valid", self.strategy.num_replicas_in_sync)
        except UsageError:
            # A short valid split must not stop training, but the user must know why no
            # validation loss and no best/ appear.
            print(f"Evaluation is off: the valid split has {tokens} tokens, too few for one "
                  f"window of --unroll_steps={self.hparams.unroll_steps}; no validation loss and no "
                  f"best/ checkpoint (use a smaller --unroll_steps or more validation text)", flush=True)
            return None
        return data.shard_files(self.hparams.data_dir, self.hparams.data_prefix, "valid"), layout

    # ------------------------------------------------------------ resume and save

    def restore(self) -> tuple[_Position, Any]:
        """Restores the newest checkpoint if any; returns the position and the carried state."""
        state = self._fresh_state()
        path = self._checkpoint_to_restore()
        if path is None:
            for line in finetune.warm_start(self.model, self.hparams, self.metadata):
                print(line, flush=True)
            clock = self._start_budget(None)
            print(f"Starting {self.hparams.job_dir} from scratch "
                  f"({self.layout.windows_per_epoch} windows per epoch){clock}", flush=True)
            return _Position(), state
        stored = storage.retry("restoring a checkpoint", path, lambda: tf.train.load_checkpoint(path))
        saved_layout = stored.get_tensor("layout/.ATTRIBUTES/VARIABLE_VALUE")
        # A checkpoint from before the train shards could be divided between workers had one reader.
        has_readers = stored.has_tensor("readers/.ATTRIBUTES/VARIABLE_VALUE")
        saved_readers = int(stored.get_tensor("readers/.ATTRIBUTES/VARIABLE_VALUE")) if has_readers else 1
        clock_name = "budget_clock/.ATTRIBUTES/VARIABLE_VALUE"
        clock = self._start_budget(list(stored.get_tensor(clock_name))
                                   if stored.has_tensor(clock_name) else None)
        current = [self.layout.batch_size, self.layout.unroll_steps, self.layout.windows_per_epoch]
        same_layout = list(saved_layout) == current and saved_readers == self.reading.readers
        # expect_partial: a changed layout skips the saved state, another --optimizer its slots.
        items = {name: item for name, item in self.items.items() if has_readers or name != "readers"}
        checkpoint = tf.train.Checkpoint(**items, **({"carry": self.carry} if same_layout else {}))
        storage.retry("restoring a checkpoint", path, lambda: checkpoint.restore(path)
                      .expect_partial().assert_existing_objects_matched())
        position = _Position(*(int(self.counters[k].numpy()) for k in ("step", "epoch", "position")))
        note = ""
        if same_layout:
            saved = tf.nest.pack_sequence_as(self.model.window_state(self.hparams.batch_size),
                                             [v.read_value() for v in self.carry])
            state = saved if self.single_replica else loops.split_state(self.strategy, saved)
        else:
            # Another batch size, unroll length or division of the shards between workers (whose
            # streams then read other text): keep the same fraction of the epoch.
            position.window = position.window * current[2] // max(int(saved_layout[2]), 1)
            changed = "batch/unroll changed"
            if saved_readers != self.reading.readers:
                changed = f"{data.division(saved_readers)} before, {data.division(self.reading.readers)} now"
            note = f" ({changed}: same point of the epoch, fresh state)"
        self.saved_step = position.step
        print(f"Resuming {self.hparams.job_dir} from {path}: step {position.step}, "
              f"epoch {position.epoch}, window {position.window}/{self.layout.windows_per_epoch}{note}"
              f"{clock}", flush=True)
        return position, state

    def _checkpoint_to_restore(self) -> str | None:
        """The newest usable checkpoint of the job dir, as the chief judges it: with several workers
        the others restore the step it chose (a storage fault on one worker must not make it
        restore another step) and never judge the checkpoints themselves."""
        if self.from_chief is None:
            return checkpoints.latest_usable(self.hparams.job_dir)
        choice, failure = _NO_CHECKPOINT, None
        if self.chief:
            try:
                path = checkpoints.latest_usable(self.hparams.job_dir)
                choice = _NO_CHECKPOINT if path is None else int(path.rsplit("-", 1)[1])
            except UsageError as err:  # told to every worker, so none waits forever
                choice, failure = _CHIEF_FAILED, err
        step = self.from_chief(choice)
        if failure is not None:
            raise failure
        if step == _CHIEF_FAILED:
            raise UsageError(f"--job-dir={self.hparams.job_dir}: the chief worker could not choose a "
                             "checkpoint to restore; its log says why")
        return None if step == _NO_CHECKPOINT else checkpoints.join(self.hparams.job_dir, f"ckpt-{step}")

    def _start_budget(self, saved_clock: list[float] | None) -> str:
        """Starts --time_budget's clock from a checkpoint's (None: a fresh job, or one saved
        without a budget); returns what the start or resume line says of it ("" without one)."""
        if not self.budget_seconds:
            return ""
        eval_windows = 0
        if self.valid is not None:
            eval_windows = self.valid[1].windows_per_epoch
            if self.hparams.eval_steps > 0:
                eval_windows = min(eval_windows, self.hparams.eval_steps)
        variables = [*self.model.variables, *self.optimizer.variables]
        tail = TailEstimate(
            eval_windows=eval_windows, sample_tokens=self.hparams.sample_length if self.chief else 0,
            checkpoint_bytes=sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables),
            budget_seconds=self.budget_seconds, xla_step=self.hparams.xla == "step")
        resumed = saved_clock is not None and saved_clock[0] > 0
        self.budget = (Budget.from_checkpoint(saved_clock, self.budget_seconds, tail, self.started)
                       if resumed else Budget(self.budget_seconds, 0.0, tail, self.started))
        end = self.budget.training_end()
        return (f"; {self.budget.describe(before_this_run=resumed)}, training stops at "
                f"{format_duration(end)} of it (the last {format_duration(self.budget_seconds - end)} "
                "are kept for the final evaluation, checkpoint, sample and export)")

    def _check_budget(self) -> bool:
        """Sets the learning rate's time progress; returns whether training must stop now. With
        several workers the clock is averaged first, so all of them decide alike."""
        reading = self.budget.read()
        reading = Reading(*self.agree_on_clock([reading.spent, reading.end, reading.step_seconds]))
        self.time_progress.assign(self.budget.advance(reading))
        return reading.out_of_time

    def _affords(self, part: str, agreed: bool = False) -> bool:
        """Whether the evaluation or sample due during training runs: always without a budget;
        under one, while such work fits its share of the time spent (budget.affords_periodic).
        `agreed`: decided on the workers' averaged figures, as an evaluation's collectives need
        every worker to take it alike (only the chief samples)."""
        if self.budget is None:
            return True
        figures = [self.budget.spent(), self.periodic_seconds, self.budget.tail.part(part)]
        spent, periodic, cost = self.agree_on_clock(figures) if agreed else figures
        return affords_periodic(cost, periodic, spent)

    @contextmanager
    def _periodic(self) -> Iterator[None]:
        """Counts the time of an evaluation or sample during training (see _affords)."""
        begin = time.monotonic()
        yield
        self.periodic_seconds += time.monotonic() - begin

    @contextmanager
    def _timed(self, part: str) -> Iterator[None]:
        """Measures one part of the budget's tail (an evaluation, a checkpoint, a sample)."""
        begin = time.monotonic()
        yield
        if self.budget is not None:
            self.budget.tail.measured[part] = time.monotonic() - begin

    def save(self, position: _Position, state: Any, again: bool = False) -> None:
        """Checkpoints `position` (`again`: even if it is already saved, for the clock)."""
        if self.saved_step == position.step and not again:
            return
        self._check_weights_finite(position.step)
        self._record(position, state)
        with self._timed("save"):
            self._save_with(self.manager, position.step)
        self._drop_scratch()
        self.saved_step = position.step

    def _save_with(self, manager: tf.train.CheckpointManager, step: int) -> None:
        """Saves, retrying Cloud Storage faults (trainer.storage); no partial checkpoint is left."""
        def drop_partial() -> None:
            # TensorFlow leaves the parts of a checkpoint it could not finish in ckpt-N_temp/.
            for partial in tf.io.gfile.glob(checkpoints.join(manager.directory, "ckpt-*_temp")):
                storage.remove_tree(partial)

        try:
            storage.retry("saving a checkpoint", manager.directory,
                          lambda: manager.save(checkpoint_number=step), before_retry=drop_partial)
        except Exception:
            drop_partial()
            raise

    def _record(self, position: _Position, state: Any) -> None:
        """Copies the position, layout and carried state into the checkpointed variables."""
        for name, value in (("step", position.step), ("epoch", position.epoch),
                            ("position", position.window)):
            self.counters[name].assign(value)
        self.layout_var.assign([self.layout.batch_size, self.layout.unroll_steps,
                                self.layout.windows_per_epoch])
        self.readers.assign(self.reading.readers)
        if not self.single_replica:
            state = loops.gather_state(self.strategy, state)
        for variable, value in zip(self.carry, tf.nest.flatten(state), strict=True):
            variable.assign(value)
        if self.budget is not None:
            self.clock.assign(self.budget.to_checkpoint())

    def _fresh_state(self) -> Any:
        """Zero state for every stream (per replica under a multi-device strategy)."""
        if self.single_replica:
            return self.model.window_state(self.hparams.batch_size)
        return loops.initial_state(self.params, self.strategy, self.hparams.batch_size)

    def _drop_scratch(self) -> None:
        if not self.chief:
            distribute.remove_scratch(self.save_dir, self.hparams.job_dir)

    def _check_weights_finite(self, step: int) -> None:
        finite = all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in self.model.trainable_variables)
        if not finite:
            self._diverged(step, "the weights")

    def _overflow_skipped(self, loss: float) -> bool:
        """A float16 step whose gradient overflowed was skipped (the loss scale halved), which is
        not divergence while the loss is finite and the scale has not collapsed below 1."""
        return (self.loss_scale is not None and math.isfinite(loss)
                and float(self.loss_scale.scale.numpy()) >= 1.0)

    def _diverged(self, step: int, what: str) -> None:
        last = self.manager.latest_checkpoint or "none yet"
        raise TrainingDiverged(
            f"{what} became NaN/Inf at step {step}; stopped without saving (last good checkpoint: "
            f"{last}); lower --learning_rate or set --grad_clip, then rerun to resume")

    # ------------------------------------------------------------ evaluation and samples

    def evaluate(self, position: _Position, state: Any) -> float | None:
        """The validation loss at `position` (None with evaluation off); keeps best/ up to date."""
        if self.valid is None:
            return None
        with self._timed("eval"):
            return self._evaluate(position, state)

    def _evaluate(self, position: _Position, state: Any) -> float:
        step = position.step
        files, layout = self.valid
        dataset = data.windows(files, layout)
        if self.budget is not None:  # the windows that fit its share of the budget (or --eval_steps)
            windows = self.budget.tail.evaluated_windows()
            if windows < self.budget.tail.eval_windows and not self.said_eval_share:
                print(f"Evaluations under --time_budget cover the first {windows:,} of "
                      f"{self.budget.tail.eval_windows:,} validation windows (what fits in "
                      f"{EVAL_SHARE:.0%} of the budget); trainer.evaluate scores all of them",
                      flush=True)
                self.said_eval_share = True
            dataset = dataset.take(windows)
        elif self.hparams.eval_steps > 0:
            dataset = dataset.take(self.hparams.eval_steps)
        eval_state = loops.initial_state(self.params, self.strategy, layout.batch_size)
        # A shard read that fails is read again from the start: evaluation changes nothing until it
        # ends. Not with several workers, whose collectives would pair one worker's first window
        # with another's k-th: there one line says so.
        once = None if self.from_chief is None else storage.Backoff(attempts=1)
        # NT-ASGD evaluates (and keeps as best/) the averaged weights once it has switched.
        with optimizers.averaged_weights(self.optimizer):
            nats, tokens, _ = storage.retry(
                "reading the validation shards", self.hparams.data_dir, backoff=once,
                action=lambda: loops.run_eval(self.eval_step, self._distribute(dataset), eval_state))
            loss = nats / tokens
            self.summaries.eval(step, loss,
                                characters_per_token=self.metadata.splits["valid"].characters_per_token)
            cloud_env.report_metric(loss, step)  # Vertex hyperparameter tuning reads it
            # The loss is all-reduced, so every worker takes this branch (and its collectives) alike.
            if loss < float(self.best_loss.numpy()):
                self.best_loss.assign(loss)
                self._record(position, state)  # else best/ would carry the last save's position
                self._save_with(self.best_manager, step)
                self._drop_scratch()
        if self.budget is not None:
            self.summaries.budget(self.budget.spent(), eval_loss=loss)
        if isinstance(self.optimizer, optimizers.NTASGD) and self.optimizer.observe_validation(loss):
            print(f"NT-ASGD: validation loss stalled at step {step}; averaging weights from now on",
                  flush=True)
        return loss

    def sample(self, step: int) -> None:
        with self._timed("sample"):
            self._sample(step)

    def _sample(self, step: int) -> None:
        hparams = self.hparams
        ids = self.sampler.generate(sampling.default_prime(self.metadata), hparams.sample_length,
                                    SAMPLE_TEMPERATURE, seed=hparams.seed + step)
        text = sampling.decode(ids, self.metadata)
        checkpoints.write_atomic(checkpoints.join(hparams.job_dir, checkpoints.SAMPLES_DIR,
                                                  f"step-{step}.txt"), text)
        self.summaries.sample(step, text)

    def _distribute(self, dataset: tf.data.Dataset | Callable[[int], tf.data.Dataset]) -> Any:
        return distribute.distribute_windows(self.strategy, dataset)

    # ------------------------------------------------------------ the loop

    def _execution_size(self, position: _Position) -> int:
        """How many windows the next compiled call trains: up to --steps_per_execution, never
        past the epoch's end, --max_steps, or a step that evaluates, saves or samples."""
        hparams = self.hparams
        size = min(hparams.steps_per_execution, self.layout.windows_per_epoch - position.window)
        if hparams.max_steps > 0:
            size = min(size, hparams.max_steps - position.step)
        for every in (hparams.eval_every, hparams.save_checkpoints_steps, hparams.sample_every):
            if every > 0:
                size = min(size, every - position.step % every)
        return size

    def _train(self, windows: Iterator[Any], state: Any, count: int,
               ) -> tuple[list[float], list[float], Any]:
        """Trains on the next `count` windows: (their losses, their gradient norms, state)."""
        if self.hparams.steps_per_execution == 1:
            inputs, labels = next(windows)
            loss, norm, state = self.train_step(inputs, labels, state)
            return [float(loss)], [float(norm)], state
        losses, norms, state = self.train_steps(windows, state, tf.constant(count))
        return losses.numpy().tolist(), norms.numpy().tolist(), state

    def _windows(self, position: _Position) -> Iterator[Any]:
        """The training windows of this epoch from `position` on (a resume continues exactly)."""
        dataset = data.reader_windows(self.reading, start=position.window,
                                      shuffle_seed=self.hparams.seed * 100003 + position.epoch,
                                      random_starts=not self.model.carries_state_between_windows)
        return iter(self._distribute(dataset))

    def _train_retrying(self, windows: Iterator[Any], state: Any, position: _Position,
                        ) -> tuple[list[float], list[float], Any, Iterator[Any]]:
        """`_train` on the next windows; a Cloud Storage fault while reading the shards is retried
        from the same window with a new reader, which is exact as long as the failed call applied
        no step: always with --steps_per_execution=1. Above it, a fault that surfaces inside a
        call after some of its steps (the input pipeline reads ahead) ends the run with one line,
        and the next run resumes from the last checkpoint: those steps are trained again."""
        count = self._execution_size(position)
        current = [windows]

        def attempt() -> tuple[list[float], list[float], Any]:
            applied = int(self.optimizer.iterations.numpy())
            try:
                return self._train(current[0], state, count)
            except tf.errors.OpError as err:
                if storage.kind(err) == "transient" and int(self.optimizer.iterations.numpy()) != applied:
                    raise storage.StorageUnavailable(
                        f"--data_dir={self.hparams.data_dir}: a shard read failed ({storage.message(err)}) "
                        f"inside a --steps_per_execution={self.hparams.steps_per_execution} call after "
                        "some of its steps; run the same command again to resume from the last "
                        "checkpoint") from None
                raise

        def reopen() -> None:
            current[0] = self._windows(position)

        losses, norms, state = storage.retry("reading the shards", self.hparams.data_dir, attempt,
                                             before_retry=reopen)
        return losses, norms, state, current[0]

    def finished(self, position: _Position) -> bool:
        if self.budget is not None:  # --time_budget replaces --epochs and --max_steps
            return self.out_of_time
        if self.hparams.max_steps > 0:
            return position.step >= self.hparams.max_steps
        return position.epoch >= self.hparams.epochs

    def run(self) -> TrainResult:
        hparams = self.hparams
        position, state = self.restore()
        self.summaries.hparams(hparams)
        if self.budget is not None:
            self.summaries.budget(self.budget.spent(), seconds=self.budget_seconds)
            self.out_of_time = self._check_budget()
            if self.out_of_time and self.budget.left() > 0:
                print(f"The --time_budget={hparams.time_budget} leaves no time to train: "
                      f"{self.budget.describe()}, and the final evaluation, checkpoint, sample and "
                      f"export take ~{format_duration(self.budget.tail.seconds())}", flush=True)
        progress = Progress(self.total, position.step, self.layout.tokens_per_window,
                            hparams.log_every, bits_name=self.summaries.bits_name, budget=self.budget)
        eval_loss, last_eval_step, stopped = None, -1, "finished"
        # Decided together by all workers (see distribute.stop_agreement), never from the local
        # flag alone: every worker must run the same collectives in the same order.
        stopping = self.agree_to_stop(self.terminate)
        while not self.finished(position) and not stopping:
            windows = self._windows(position)
            while position.window < self.layout.windows_per_epoch:
                if self.budget is not None:
                    self.out_of_time = self._check_budget()
                    if self.out_of_time:
                        break
                begin = time.monotonic()
                losses, norms, state, windows = self._train_retrying(windows, state, position)
                if self.budget is not None:
                    self.budget.tail.note_steps(time.monotonic() - begin, len(losses))
                for loss, norm in zip(losses, norms, strict=True):
                    if not (math.isfinite(loss) and math.isfinite(norm) or self._overflow_skipped(loss)):
                        progress.close()
                        what = "the loss" if not math.isfinite(loss) else "the gradient"
                        self._diverged(position.step + 1, what)
                    position.step += 1
                    position.window += 1
                    if progress.step(position.step, loss):
                        rate = float(self.optimizer.learning_rate.numpy())
                        self.summaries.train(position.step, progress.interval_loss, rate, norm,
                                             progress.tokens_per_second)
                        if self.budget is not None:
                            self.summaries.budget(self.budget.spent(), train_loss=progress.interval_loss,
                                                  learning_rate=rate, seconds_left=self.budget.left())
                        progress.log(position.epoch, rate, norm)
                stopping = self.agree_to_stop(self.terminate)
                with progress.paused():
                    if (hparams.eval_every > 0 and position.step % hparams.eval_every == 0
                            and self._affords("eval", agreed=True)):
                        with self._periodic():
                            eval_loss, last_eval_step = self.evaluate(position, state), position.step
                        progress.note_eval(eval_loss)
                    if (hparams.save_checkpoints_steps > 0
                            and position.step % hparams.save_checkpoints_steps == 0):
                        self.save(position, state)
                    if (self.chief and hparams.sample_every > 0
                            and position.step % hparams.sample_every == 0 and self._affords("sample")):
                        with self._periodic():
                            self.sample(position.step)
                if self.finished(position) or stopping:
                    break
            else:
                # The epoch is over: the next one starts from fresh state at its first window.
                position.epoch += 1
                position.window = 0
                state = self._fresh_state()
        if stopping:
            interrupted = self.stop_signal == signal.SIGINT
            stopped = "interrupted" if interrupted else "terminated"
            clock = f" ({self.budget.describe()})" if self.budget is not None else ""
            print(f"{signal.Signals(self.stop_signal).name}: saving a checkpoint at step "
                  f"{position.step} and stopping{clock}", flush=True)
        elif self.budget is not None:
            progress.close()
            print(f"Training stopped for the time budget at step {position.step}: "
                  f"{self.budget.describe()}", flush=True)
        if not stopping and last_eval_step != position.step and self.valid is not None:
            eval_loss = self.evaluate(position, state)
            progress.note_eval(eval_loss)
        # Before the sample: nothing may cost the final checkpoint. Under --time_budget it is
        # written even at an already saved step, for the time spent up to here.
        self.save(position, state, again=self.budget is not None)
        if self.chief and not stopping:
            self.sample(position.step)
        progress.close()
        self.summaries.close()
        best = float(self.best_loss.numpy())
        return TrainResult(hparams.job_dir, str(hparams.language_model), position.step, position.epoch,
                           position.window, progress.interval_loss, eval_loss,
                           best if math.isfinite(best) else None, progress.final_tokens_per_second(),
                           stopped)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_NO_CHECKPOINT, _CHIEF_FAILED = -1, -2


@contextmanager
def _signals_set_flag(trainer: _Trainer) -> Iterator[None]:
    """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to checkpoint and stop after the
    current step, so an interrupted run resumes where it stopped."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        trainer.terminate, trainer.stop_signal = True, signum

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


Chooser = Callable[[HParams, tf.distribute.Strategy, float | None], tuple[HParams, dict[str, Any]]]


def train(hparams: HParams, started: float | None = None, choose: Chooser | None = None) -> TrainResult:
    """Trains (or resumes) the job described by `hparams`; see the module docstring.

    `started` (a time.monotonic() value; default: now) is where --time_budget's clock starts:
    entry points pass their process's start (budget.process_start()), so start-up counts too.
    `choose` (trainer.choose.ForBudget) fills the model's shape for --time_budget once the
    strategy exists; its record goes into hparams.json."""
    strategy = strategy_from_environment()
    chosen = None
    if choose is not None:
        hparams, chosen = choose(hparams, strategy, started)
    # What runs the model here, before training; after the strategy, which must set up TensorFlow itself
    # (a multi-worker job's collectives are configured before any other TensorFlow call).
    print(kernels.describe_runtime(fused=hparams.cell in ("lstm", "gru") and not hparams.layer_norm),
          file=sys.stderr, flush=True)
    hparams, metadata = prepare_job(hparams, strategy, chosen)
    resume = "; run the same command again to resume from the last checkpoint"
    with (errors.writing(f"--job-dir={hparams.job_dir}", then=resume),
          data.reading_shards(hparams.data_dir, hparams.data_prefix),
          data.vanished_shards_reported(hparams.data_dir, hparams.data_prefix),
          distribute.lost_workers_reported(strategy),
          xla.fusion(hparams.xla == "fusion")):
        trainer = _Trainer(hparams, metadata, strategy, started)
        with _signals_set_flag(trainer):
            result = trainer.run()
        if result.stopped == "finished" and trainer.chief:
            # A serving-ready SavedModel of the final weights (trainer.export; AIP_MODEL_DIR on
            # Vertex), NT-ASGD's averaged ones once it has switched (what awd-lstm-lm keeps).
            from trainer import export  # deferred: export imports babble, which imports this package

            export_dir = cloud_env.model_export_dir(hparams, os.environ)
            with optimizers.averaged_weights(trainer.optimizer):  # Cloud Storage faults: retried inside
                export.export_model(trainer.model, metadata, export_dir)
    return result


def describe(result: TrainResult) -> str:
    """One line for the end of a run."""
    parts = [f"step {result.step}", f"epoch {result.epoch}"]
    if result.eval_loss is not None:
        unit = bits_name_for(result.language_model)
        parts.append(f"valid loss {result.eval_loss:.4f} ppl {perplexity(result.eval_loss):.2f} "
                     f"{unit} {bits_per_token(result.eval_loss):.4f}")
    parts.append(f"{result.tokens_per_second:,.0f} tokens/s")
    return f"{result.stopped}: " + ", ".join(parts) + f" -> {result.job_dir}"

