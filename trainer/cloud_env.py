"""What Vertex AI tells a training job through its environment, turned into hyperparameters.

Vertex sets, on every replica of a CustomJob whose `baseOutputDirectory` is set (trainer.submit
always sets it to the job dir):

    AIP_MODEL_DIR            <base>/model/         where the exported model belongs
    AIP_CHECKPOINT_DIR       <base>/checkpoints/
    AIP_TENSORBOARD_LOG_DIR  <base>/logs/          the only place Vertex TensorBoard uploads from
    CLUSTER_SPEC, TF_CONFIG  the cluster; `task.trial` is the tuning trial id (trials get
                             <base>/<trial>/... above)

Rule: a flag the user gave wins; the environment only fills what was left empty. So the same
command line behaves the same locally and on Vertex, and `--job-dir gs://b/job/%JOB%` keeps
resuming one model. Tuning trials are the exception that must not share a dir: with a trial id,
an explicit job dir (and summary dir) get `/<trial>` appended, matching Vertex's own layout.

The trainer calls `apply_environment(hparams, os.environ)` in task.py before
`resolve_job_dirs`, and `report_metric(...)` after each evaluation.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

from trainer.errors import UsageError
from trainer.hparams import HParams

MODEL_DIR = "AIP_MODEL_DIR"
CHECKPOINT_DIR = "AIP_CHECKPOINT_DIR"
TENSORBOARD_LOG_DIR = "AIP_TENSORBOARD_LOG_DIR"
# What Vertex's tuning service reads; the HyperparameterTuningJob's metric_spec names the same tag.
METRIC_TAG = "valid_loss"
# cloudml-hypertune writes here unless told otherwise; on Vertex the service collects it.
METRIC_FILE_ENV = "CLOUD_ML_HP_METRIC_FILE"
_ON_VERTEX_MARKERS = ("CLUSTER_SPEC", MODEL_DIR, "CLOUD_ML_TRIAL_ID", METRIC_FILE_ENV)


def _json_env(env: Mapping[str, str], name: str) -> dict[str, Any]:
    text = env.get(name, "")
    if not text:
        return {}
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        # Vertex writes valid JSON; a broken value was set by hand (a local multi-worker run).
        raise UsageError(f"environment variable {name} is not valid JSON ({text[:80]!r}); "
                         "unset or fix it") from None
    return body if isinstance(body, dict) else {}


def trial_id(env: Mapping[str, str]) -> str | None:
    """The hyperparameter-tuning trial this replica belongs to, or None outside tuning."""
    for name in ("CLUSTER_SPEC", "TF_CONFIG"):
        trial = _json_env(env, name).get("task", {}).get("trial")
        if trial:
            return str(trial)
    return env.get("CLOUD_ML_TRIAL_ID") or None


def _dir(value: str) -> str:
    return value.rstrip("/")


def environment_overrides(hparams: HParams, env: Mapping[str, str]) -> dict[str, str]:
    """HParams fields to change for this environment (pure: env in, overrides out)."""
    changes: dict[str, str] = {}
    trial = trial_id(env)
    if hparams.job_dir:
        if trial:
            changes["job_dir"] = f"{_dir(hparams.job_dir)}/{trial}"
    elif env.get(CHECKPOINT_DIR):
        changes["job_dir"] = _dir(env[CHECKPOINT_DIR])  # already per trial
    if hparams.summary_dir:
        if trial:
            changes["summary_dir"] = f"{_dir(hparams.summary_dir)}/{trial}"
    elif env.get(TENSORBOARD_LOG_DIR):
        changes["summary_dir"] = _dir(env[TENSORBOARD_LOG_DIR])
    return changes


def apply_environment(hparams: HParams, env: Mapping[str, str]) -> HParams:
    """`hparams` with the Vertex environment applied (see the module doc for the rule)."""
    changes = environment_overrides(hparams, env)
    return hparams.replace(**changes) if changes else hparams


def model_export_dir(hparams: HParams, env: Mapping[str, str]) -> str:
    """Where the chief exports the trained model: AIP_MODEL_DIR on Vertex, else JOB_DIR/export."""
    if env.get(MODEL_DIR):
        return _dir(env[MODEL_DIR])
    return _dir(hparams.job_dir) + "/export"


def report_metric(value: float, step: int, env: Mapping[str, str] | None = None,
                  tag: str = METRIC_TAG) -> bool:
    """Reports the validation metric to Vertex hyperparameter tuning; returns whether it did.

    Off Vertex this does nothing, so local runs leave no /tmp/hypertune behind. Call it after
    every evaluation: Vertex keeps the last (or best, per the tuning job) value of each trial.
    """
    env = os.environ if env is None else env
    if not any(env.get(name) for name in _ON_VERTEX_MARKERS):
        return False
    reporter = _reporter(env.get(METRIC_FILE_ENV, ""), trial_id(env) or "")
    # hypertune writes step 0 as "no step"; our steps start at 1 so nothing is lost.
    reporter.report_hyperparameter_tuning_metric(
        hyperparameter_metric_tag=tag, metric_value=float(value), global_step=int(step))
    return True


@functools.cache
def _reporter(metric_path: str, trial: str) -> Any:
    """One reporter per file: it rewrites the file with every value reported so far (up to 100),
    so Vertex can pick the best measurement, not only the last."""
    import hypertune  # deferred: only tuning trials need it

    reporter = hypertune.HyperTune()
    if metric_path:
        reporter.metric_path = metric_path
        os.makedirs(os.path.dirname(metric_path), exist_ok=True)
    if trial:
        reporter.trial_id = trial
    return reporter
