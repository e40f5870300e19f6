"""Vertex AI hyperparameter tuning for verne: the search space and the tuning job.

`python -m trainer.submit --tune ... -- TRAINER FLAGS` wraps the usual CustomJob in a
HyperparameterTuningJob. Vertex runs each trial as that job with `--NAME=VALUE` appended for
every parameter below (absl keeps the last value of a repeated flag, so these win over the
config's args). Each trial trains in its own job dir: trainer.submit appends a study id (the
submission time) to --job-dir, the trainer appends the trial id (trainer.cloud_env), and %JOB%
is resolved per trial because the state size changes the model's shape. Trial ids restart at 1
in every study, so the study id is what keeps a new study from resuming an old one's trials.
After each evaluation the trainer reports `valid_loss` (trainer.cloud_env.report_metric, through
cloudml-hypertune); Vertex minimises it.
"""

from __future__ import annotations

from typing import Any

from trainer.cloud_env import METRIC_TAG

# name -> (kind, settings); kept as plain data so tests and docs can read the space.
SEARCH_SPACE: dict[str, tuple[str, dict[str, Any]]] = {
    "learning_rate": ("double", {"min": 1e-4, "max": 1e-2, "scale": "log"}),
    # Categorical, not discrete: discrete values are doubles and could arrive as "--lstm_state_size=512.0",
    # which an integer flag refuses.
    "lstm_state_size": ("categorical", {"values": ["256", "512", "1024"]}),
    "dropout": ("double", {"min": 0.0, "max": 0.5, "scale": "linear"}),
}
METRIC_GOAL = "minimize"


def parameter_specs() -> dict[str, Any]:
    """SEARCH_SPACE as the SDK's parameter specs."""
    from google.cloud.aiplatform import hyperparameter_tuning as hpt

    kinds = {"double": hpt.DoubleParameterSpec, "discrete": hpt.DiscreteParameterSpec,
             "integer": hpt.IntegerParameterSpec, "categorical": hpt.CategoricalParameterSpec}
    return {name: kinds[kind](**settings) for name, (kind, settings) in SEARCH_SPACE.items()}


def make_tuning_job(custom_job: Any, display_name: str, max_trials: int, parallel_trials: int,
                    project: str, region: str, credentials: Any = None) -> Any:
    """A HyperparameterTuningJob running `custom_job` once per trial (not yet created)."""
    from google.cloud import aiplatform

    from trainer.errors import UsageError

    if not 1 <= parallel_trials <= max_trials:
        raise UsageError(f"--parallel_trials={parallel_trials}: must be from 1 to --max_trials={max_trials}")
    return aiplatform.HyperparameterTuningJob(
        display_name=display_name, custom_job=custom_job, metric_spec={METRIC_TAG: METRIC_GOAL},
        parameter_spec=parameter_specs(), max_trial_count=max_trials,
        parallel_trial_count=parallel_trials, project=project, location=region,
        credentials=credentials)
