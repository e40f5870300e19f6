"""trainer.submit and config.yaml against the real Vertex SDK, offline.

The request checks parse what the SDK would send back into aiplatform_v1 types (unknown or
misspelt fields fail there); submission goes through the SDK with only the JobServiceClient's
two RPCs replaced, and the package upload goes to a local GCS emulator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.auth.credentials import AnonymousCredentials
from google.cloud.aiplatform_v1.services.job_service import JobServiceClient
from google.cloud.aiplatform_v1.types import CustomJob, HyperparameterTuningJob, JobState

from trainer import checkpoints, submit, tuning
from trainer.data import read_metadata
from trainer.errors import UsageError
from trainer.hparams import HParams

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config.yaml"
BASE = dict(project="my-project", region="us-central1", staging_bucket="gs://bucket/staging",
            config=str(CONFIG))


def _request_body(prepared: submit.Prepared) -> dict[str, Any]:
    return json.loads(submit.request_json(prepared.parent, prepared.request))


def _as_custom_job(prepared: submit.Prepared) -> CustomJob:
    return CustomJob.from_json(json.dumps(_request_body(prepared)["customJob"]))


def _trainer_args(data_dir: str, prefix: str) -> list[str]:
    return [f"--data_dir={data_dir}", f"--data_prefix={prefix}", "--job-dir", "gs://bucket/job/%JOB%",
            "--summary_dir=gs://bucket/tb/%JOB%", "--layers=3", "--rnn_size=64", "--epochs=2"]


# --- config.yaml ---------------------------------------------------------------------------------

def test_config_and_every_variant_parse_as_custom_job_specs() -> None:
    names = submit.check_config_file(CONFIG)
    assert set(names) == {"", "multi_gpu", "multi_worker", "tpu_v5e"}
    text = CONFIG.read_text()
    main = submit.parse_spec(submit.load_config(text, "config.yaml"), "config.yaml")
    assert main.worker_pool_specs[0].python_package_spec.python_module == "trainer.task"
    assert main.worker_pool_specs[0].machine_spec.accelerator_count == 1
    gpus = submit.parse_spec(submit.load_config(text, "c", "multi_gpu"), "c")
    assert gpus.worker_pool_specs[0].machine_spec.accelerator_count == 4
    workers = submit.parse_spec(submit.load_config(text, "c", "multi_worker"), "c")
    assert [p.replica_count for p in workers.worker_pool_specs] == [1, 3]
    assert workers.scheduling.strategy.name == "SPOT"
    tpu = submit.parse_spec(submit.load_config(text, "c", "tpu_v5e"), "c")
    assert tpu.worker_pool_specs[0].machine_spec.machine_type == "ct5lp-hightpu-4t"
    assert tpu.worker_pool_specs[0].machine_spec.tpu_topology == "2x2"


def test_a_typo_in_config_is_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    bad = CONFIG.read_text().replace("pythonModule: trainer.task", "pythonModul: trainer.task", 1)
    with pytest.raises(UsageError, match=r"bad.yaml: .*pythonModul"):
        submit.load_config(bad, "bad.yaml")
    bad_variant = CONFIG.read_text().replace("#       machineType: ct5lp-hightpu-4t",
                                             "#       machineTyp: ct5lp-hightpu-4t")
    submit.load_config(bad_variant, "c.yaml")  # the main spec is untouched
    with pytest.raises(UsageError, match=r"variant tpu_v5e.*machineTyp"):
        submit.load_config(bad_variant, "c.yaml", "tpu_v5e")
    with pytest.raises(UsageError, match="--variant=nope"):
        submit.load_config(CONFIG.read_text(), "c.yaml", "nope")


# --- %JOB% ---------------------------------------------------------------------------------------

def test_job_dirs_resolve_exactly_as_the_trainer_resolves_them(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path, tokenizer="char")
    args = _trainer_args(data_dir, prefix) + ["--init_from=gs://other/%JOB%"]
    final, hparams = submit.plan(args, [], tune=False, read_metadata=read_metadata)

    from absl import flags as absl_flags

    from trainer.flags import define_hparams_flags, hparams_from_flags
    values = absl_flags.FlagValues()
    define_hparams_flags(values)
    values(["trainer.task", *args])
    expected = checkpoints.resolve_hparams(hparams_from_flags(values), read_metadata(data_dir, prefix))
    assert expected.job_dir == "gs://bucket/job/tiny-64-states-3-layers-char"
    assert (hparams.job_dir, hparams.summary_dir) == (expected.job_dir, expected.summary_dir)
    assert final[final.index("--job-dir") + 1] == expected.job_dir
    assert f"--summary_dir={expected.summary_dir}" in final
    assert "--init_from=gs://other/%JOB%" in final  # the trainer resolves %JOB% nowhere else


def test_job_name_without_reachable_data_needs_language_model(tmp_path: Path) -> None:
    args = [f"--data_dir={tmp_path}/none", "--data_prefix=x", "--job-dir=gs://b/job/%JOB%"]
    with pytest.raises(UsageError, match="--language_model"):
        submit.plan(args, [], tune=False, read_metadata=read_metadata)
    final, hparams = submit.plan(args + ["--language_model=word"], [], tune=False,
                                 read_metadata=read_metadata)
    assert hparams.job_dir == "gs://b/job/x-512-states-2-layers-word"
    assert "--job-dir=gs://b/job/x-512-states-2-layers-word" in final


def test_bad_trainer_flags_are_one_line_errors() -> None:
    with pytest.raises(UsageError, match="trainer flags after --"):
        submit.plan(["--no_such_flag=1"], [], tune=False, read_metadata=read_metadata)
    with pytest.raises(UsageError, match="--dropout"):
        submit.plan(["--dropout=2"], [], tune=False, read_metadata=read_metadata)


# --- requests --------------------------------------------------------------------------------------

def test_gpu_request_is_a_valid_custom_job(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    options = submit.SubmitOptions(**BASE, accelerator="NVIDIA_L4", machine_type="g2-standard-8",
                                   service_account="sa@my-project.iam.gserviceaccount.com")
    prepared = submit.prepare(options, _trainer_args(data_dir, prefix), str(tmp_path), read_metadata)
    job = _as_custom_job(prepared)
    assert _request_body(prepared)["parent"] == "projects/my-project/locations/us-central1"
    (pool,) = job.job_spec.worker_pool_specs
    machine = pool.machine_spec
    assert (machine.machine_type, machine.accelerator_type.name) == ("g2-standard-8", "NVIDIA_L4")
    assert pool.python_package_spec.package_uris == [prepared.package_uri]
    assert prepared.package_uri.startswith("gs://bucket/staging/packages/verne-0.1.0-")
    assert "--job-dir" in pool.python_package_spec.args
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://bucket/job/tiny-64-states-3-layers-char"
    assert job.job_spec.service_account == "sa@my-project.iam.gserviceaccount.com"
    assert job.display_name == "verne-tiny-64-states-3-layers-char"


def test_multi_worker_request(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    options = submit.SubmitOptions(**BASE, replicas=4, spot=True)
    prepared = submit.prepare(options, _trainer_args(data_dir, prefix), str(tmp_path), read_metadata)
    job = _as_custom_job(prepared)
    chief, workers = job.job_spec.worker_pool_specs
    assert (chief.replica_count, workers.replica_count) == (1, 3)
    assert chief.python_package_spec.args == workers.python_package_spec.args
    assert job.job_spec.scheduling.strategy.name == "SPOT"


def test_tpu_request(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    options = submit.SubmitOptions(**BASE, tpu="v5e")
    prepared = submit.prepare(options, _trainer_args(data_dir, prefix), str(tmp_path), read_metadata)
    job = _as_custom_job(prepared)
    machine = job.job_spec.worker_pool_specs[0].machine_spec
    assert (machine.machine_type, machine.tpu_topology) == ("ct5lp-hightpu-4t", "2x2")
    assert machine.accelerator_count == 0  # a TPU VM is named by its machine type
    image = job.job_spec.worker_pool_specs[0].python_package_spec.executor_image_uri
    assert image == submit.IMAGES["tpu"].replace("MY_PROJECT", options.project)


def test_flag_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    args = ["--language_model=char", "--job-dir=gs://b/j/%JOB%", "--data_dir=/none", "--data_prefix=x"]
    cases = [
        (dict(BASE, accelerator="NVIDIA_TESLA_T5"), "--accelerator=NVIDIA_TESLA_T5"),
        (dict(BASE, tpu="v9"), "--tpu=v9"),
        (dict(BASE, variant="tpu_v5e", accelerator_count=2), "--accelerator_count=2 needs --accelerator"),
        (dict(BASE, staging_bucket="/tmp/x"), "--staging_bucket"),
        (dict(BASE, project=""), "--project is missing"),
        (dict(BASE, tensorboard="my-tb"), "--tensorboard=my-tb"),
        (dict(BASE, config=str(tmp_path / "none.yaml")), "--config="),
    ]
    for options, message in cases:
        with pytest.raises(UsageError, match=message):
            submit.prepare(submit.SubmitOptions(**options), args, str(tmp_path), read_metadata)
    tensorboard = "projects/p/locations/us-central1/tensorboards/1"
    with pytest.raises(UsageError, match="drop --summary_dir"):
        submit.prepare(submit.SubmitOptions(**BASE, tensorboard=tensorboard),
                       args + ["--summary_dir=gs://b/tb"], str(tmp_path), read_metadata)


def test_tuning_request(tmp_path: Path) -> None:
    args = ["--data_dir=gs://b/data", "--data_prefix=x", "--job-dir=gs://b/job/%JOB%",
            "--language_model=char"]
    options = submit.SubmitOptions(**BASE, tune=True, max_trials=6, parallel_trials=2)
    prepared = submit.prepare(options, args, str(tmp_path), read_metadata)
    body = _request_body(prepared)["hyperparameterTuningJob"]
    job = HyperparameterTuningJob.from_json(json.dumps(body))
    assert (job.max_trial_count, job.parallel_trial_count) == (6, 2)
    assert [(m.metric_id, m.goal.name) for m in job.study_spec.metrics] == [("valid_loss", "MINIMIZE")]
    tuned = {p.parameter_id for p in job.study_spec.parameters}
    assert tuned == {"learning_rate", "lstm_state_size", "dropout"}
    assert tuned <= set(HParams.__dataclass_fields__)  # Vertex passes them as trainer flags
    # %JOB% stays for each trial's trainer: the state size changes the model's shape.
    assert "--job-dir=gs://b/job/%JOB%" in job.trial_job_spec.worker_pool_specs[0].python_package_spec.args
    with pytest.raises(UsageError, match="--parallel_trials"):
        tuning.make_tuning_job(None, "x", 2, 3, "p", "r")


# --- real submission through the SDK -----------------------------------------------------------------

@pytest.fixture
def gcs_client(tmp_path: Path) -> Any:
    emulator_module = pytest.importorskip("gcs.emulator", reason="tests/gcs emulator helpers missing")
    from google.cloud import storage

    emulator = emulator_module.Emulator(tmp_path / "gcs.log")
    emulator.start()
    try:
        client = storage.Client(project="my-project", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": emulator.url})
        client.create_bucket("bucket")
        yield client
    finally:
        emulator.stop()


def test_submit_sends_the_dry_run_request_and_stages_the_package(
        tmp_path: Path, make_data_dir, gcs_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    sent: list[tuple[str, CustomJob]] = []

    def create_custom_job(self: Any, parent: str, custom_job: CustomJob, timeout: Any = None,
                          **_: Any) -> CustomJob:
        sent.append((parent, CustomJob(custom_job)))
        created = CustomJob(custom_job)
        created.name = f"{parent}/customJobs/123"
        created.state = JobState.JOB_STATE_PENDING
        return created

    def get_custom_job(self: Any, name: str, **_: Any) -> CustomJob:
        created = CustomJob(sent[-1][1])
        created.name, created.state = name, JobState.JOB_STATE_RUNNING
        return created

    monkeypatch.setattr(JobServiceClient, "create_custom_job", create_custom_job)
    monkeypatch.setattr(JobServiceClient, "get_custom_job", get_custom_job)
    options = submit.SubmitOptions(**BASE, variant="multi_worker")
    out = tmp_path / "out"
    out.mkdir()
    prepared = submit.prepare(options, _trainer_args(data_dir, prefix), str(out), read_metadata)
    job = submit.submit(prepared, gcs_client, credentials=AnonymousCredentials())

    assert job.resource_name == "projects/my-project/locations/us-central1/customJobs/123"
    ((parent, request),) = sent
    assert parent == prepared.parent
    assert request == prepared.request  # --dry_run shows exactly this
    blob_name = prepared.package_uri.removeprefix("gs://bucket/")
    blob = gcs_client.bucket("bucket").get_blob(blob_name)
    staged = tmp_path / "staged" / "verne-0.1.0.tar.gz"
    staged.parent.mkdir()
    blob.download_to_filename(str(staged))
    names = tarfile.open(staged).getnames()
    for module in ("trainer/task.py", "trainer/submit.py", "preprocessing/contract.py", "setup.py"):
        if (REPO / module).exists():
            assert f"verne-0.1.0/{module}" in names
    # Staging again with an unchanged checkout uploads nothing new: same content, same name.
    assert submit.package_uri(staged, "gs://bucket/staging") == prepared.package_uri
    submit.upload(staged, prepared.package_uri, gcs_client)
    assert gcs_client.bucket("bucket").get_blob(blob_name).generation == blob.generation


# --- the command line ----------------------------------------------------------------------------

def test_dry_run_command_prints_a_custom_job_and_the_gcloud_command(tmp_path: Path) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "trainer.submit", "--project=p", "--region=europe-west4",
         "--staging_bucket=gs://b/staging", "--variant=multi_gpu", "--dry_run", "--",
         "--data_dir=gs://b/data", "--data_prefix=jules", "--language_model=char",
         "--job-dir=gs://b/job/%JOB%"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    request_text, gcloud = result.stdout.split("\n# The same job with gcloud:\n")
    job = CustomJob.from_json(json.dumps(json.loads(request_text)["customJob"]))
    assert job.job_spec.worker_pool_specs[0].machine_spec.accelerator_count == 4
    assert job.job_spec.worker_pool_specs[0].python_package_spec.args[-1] == (
        "--job-dir=gs://b/job/jules-512-states-2-layers-char")
    spec_yaml = gcloud.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    assert submit.parse_spec(yaml.safe_load(spec_yaml), "gcloud spec") == job.job_spec
    assert "gcloud ai custom-jobs create --project=p --region=europe-west4" in gcloud
    assert "created" not in result.stderr.lower()  # nothing claims a job exists

    bad = subprocess.run([sys.executable, "-m", "trainer.submit", "--region=r", "--dry_run"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: --project is missing: trainer.submit needs --project, --region, --staging_bucket")


# --- the Vertex environment inside the job ------------------------------------------------------

def test_flags_win_and_aip_dirs_fill_the_gaps() -> None:
    from trainer.cloud_env import apply_environment, model_export_dir

    env = {"AIP_MODEL_DIR": "gs://b/base/model/", "AIP_CHECKPOINT_DIR": "gs://b/base/checkpoints/",
           "AIP_TENSORBOARD_LOG_DIR": "gs://b/base/logs/"}
    given = HParams(job_dir="gs://b/job/%JOB%", summary_dir="gs://b/tb/%JOB%")
    assert apply_environment(given, env) == given
    filled = apply_environment(HParams(), env)
    assert (filled.job_dir, filled.summary_dir) == ("gs://b/base/checkpoints", "gs://b/base/logs")
    assert model_export_dir(filled, env) == "gs://b/base/model"
    assert model_export_dir(given, {}) == "gs://b/job/%JOB%/export"
    assert apply_environment(HParams(), {}) == HParams()


def test_each_tuning_trial_gets_its_own_job_dir() -> None:
    from trainer.cloud_env import apply_environment, trial_id

    spec = {"cluster": {"workerpool0": ["h:1"]}, "task": {"type": "workerpool0", "index": 0, "trial": "3"}}
    env = {"CLUSTER_SPEC": json.dumps(spec), "AIP_CHECKPOINT_DIR": "gs://b/base/3/checkpoints/",
           "AIP_TENSORBOARD_LOG_DIR": "gs://b/base/3/logs/"}
    assert trial_id(env) == "3" and trial_id({"CLOUD_ML_TRIAL_ID": "5"}) == "5" and trial_id({}) is None
    trial = apply_environment(HParams(job_dir="gs://b/job/%JOB%"), env)
    # %JOB% still resolves per trial (the trial's state size names it), then the trial id.
    assert trial.job_dir == "gs://b/job/%JOB%/3"
    assert trial.summary_dir == "gs://b/base/3/logs"  # where Vertex TensorBoard looks
    other = apply_environment(HParams(job_dir="gs://b/job/%JOB%"), {**env, "CLUSTER_SPEC": json.dumps(
        {**spec, "task": {**spec["task"], "trial": "4"}})})
    assert other.job_dir != trial.job_dir


def test_the_metric_is_reported_in_the_hypertune_format(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.cloud_env import report_metric

    assert not report_metric(1.0, 10, env={})  # off Vertex: nothing written anywhere
    metric_file = tmp_path / "hypertune" / "output.metrics"
    monkeypatch.setenv("CLOUD_ML_HP_METRIC_FILE", str(metric_file))
    monkeypatch.setenv("CLOUD_ML_TRIAL_ID", "4")
    assert report_metric(2.5, 100)
    assert report_metric(2.25, 200)
    lines = [json.loads(line) for line in metric_file.read_text().splitlines()]
    assert [(x["valid_loss"], x["global_step"], x["trial"]) for x in lines] == [
        ("2.5", "100", "4"), ("2.25", "200", "4")]
