"""trainer.submit and config.yaml against the real Vertex SDK, offline.

The request checks parse what the SDK would send back into aiplatform_v1 types (unknown or
misspelt fields fail there); submission goes through the SDK with only the JobServiceClient's
two RPCs replaced, and the output bucket is checked against a local GCS emulator.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
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
    container = main.worker_pool_specs[0].container_spec
    assert container.command == submit.TRAINER_COMMAND
    assert container.image_uri == submit.IMAGE  # the one image the Dockerfile builds
    assert main.worker_pool_specs[0].machine_spec.accelerator_count == 1
    gpus = submit.parse_spec(submit.load_config(text, "c", "multi_gpu"), "c")
    assert gpus.worker_pool_specs[0].machine_spec.accelerator_count == 4
    workers = submit.parse_spec(submit.load_config(text, "c", "multi_worker"), "c")
    assert [p.replica_count for p in workers.worker_pool_specs] == [1, 3]
    assert workers.scheduling.strategy.name == "SPOT"
    tpu = submit.parse_spec(submit.load_config(text, "c", "tpu_v5e"), "c")
    assert tpu.worker_pool_specs[0].machine_spec.machine_type == "ct5lp-hightpu-4t"
    assert tpu.worker_pool_specs[0].machine_spec.tpu_topology == "2x2"
    assert tpu.worker_pool_specs[0].container_spec.image_uri == submit.TPU_IMAGE
    for spec in (main, gpus, workers, tpu):  # none uses a prebuilt image (they cannot run verne)
        assert all(not pool.python_package_spec.executor_image_uri for pool in spec.worker_pool_specs)


def test_a_typo_in_config_is_a_one_line_error_naming_the_file(tmp_path: Path) -> None:
    bad = CONFIG.read_text().replace("imageUri: us-", "imageUrl: us-", 1)
    with pytest.raises(UsageError, match=r"bad.yaml: .*imageUrl"):
        submit.load_config(bad, "bad.yaml")
    bad_variant = CONFIG.read_text().replace("#       machineType: ct5lp-hightpu-4t",
                                             "#       machineTyp: ct5lp-hightpu-4t")
    submit.load_config(bad_variant, "c.yaml")  # the main spec is untouched
    with pytest.raises(UsageError, match=r"variant tpu_v5e.*machineTyp"):
        submit.load_config(bad_variant, "c.yaml", "tpu_v5e")
    with pytest.raises(UsageError, match="--variant=nope"):
        submit.load_config(CONFIG.read_text(), "c.yaml", "nope")


def test_a_python_package_spec_is_refused_before_it_reaches_vertex() -> None:
    # The SDK accepts it with any image; Vertex would run it only on a prebuilt image, and no
    # prebuilt image has Python 3.11 + TF 2.21, so the job could only fail on the server.
    package = ("workerPoolSpecs:\n- machineSpec: {machineType: n1-standard-8}\n  replicaCount: 1\n"
               "  pythonPackageSpec: {executorImageUri: us-docker.pkg.dev/vertex-ai/training/"
               "tf-gpu.2-17.py310:latest, packageUris: [gs://b/verne.tar.gz], pythonModule: trainer.task}\n")
    submit.parse_spec(yaml.safe_load(package), "old.yaml")  # valid for the API ...
    with pytest.raises(UsageError, match=r"old.yaml: workerPoolSpecs\[0\] uses pythonPackageSpec"):
        submit.load_config(package, "old.yaml")  # ... but not something verne can run
    other = CONFIG.read_text().replace("command: [python3, -m, trainer.task]",
                                       "command: [python3, -m, trainer.babble]", 1)
    with pytest.raises(UsageError, match=r"containerSpec.command must be"):
        submit.load_config(other, "c.yaml")


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
    prepared = submit.prepare(options, _trainer_args(data_dir, prefix), read_metadata)
    job = _as_custom_job(prepared)
    assert _request_body(prepared)["parent"] == "projects/my-project/locations/us-central1"
    (pool,) = job.job_spec.worker_pool_specs
    machine = pool.machine_spec
    assert (machine.machine_type, machine.accelerator_type.name) == ("g2-standard-8", "NVIDIA_L4")
    container = pool.container_spec
    assert container.image_uri == "us-central1-docker.pkg.dev/my-project/verne/verne:latest"
    assert container.command == ["python3", "-m", "trainer.task"]
    assert container.args[container.args.index("--job-dir") + 1] == (
        "gs://bucket/job/tiny-64-states-3-layers-char")
    assert not pool.python_package_spec.package_uris  # nothing to stage: the image has verne
    assert job.job_spec.base_output_directory.output_uri_prefix == "gs://bucket/job/tiny-64-states-3-layers-char"
    assert job.job_spec.service_account == "sa@my-project.iam.gserviceaccount.com"
    assert job.display_name == "verne-tiny-64-states-3-layers-char"


def test_multi_worker_request(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    options = submit.SubmitOptions(**BASE, replicas=4, spot=True)
    prepared = submit.prepare(options, _trainer_args(data_dir, prefix), read_metadata)
    job = _as_custom_job(prepared)
    chief, workers = job.job_spec.worker_pool_specs
    assert (chief.replica_count, workers.replica_count) == (1, 3)
    assert chief.container_spec == workers.container_spec  # every worker runs the same command
    assert job.job_spec.scheduling.strategy.name == "SPOT"


def test_tpu_request(tmp_path: Path, make_data_dir) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    options = submit.SubmitOptions(**BASE, tpu="v5e")
    prepared = submit.prepare(options, _trainer_args(data_dir, prefix), read_metadata)
    job = _as_custom_job(prepared)
    machine = job.job_spec.worker_pool_specs[0].machine_spec
    assert (machine.machine_type, machine.tpu_topology) == ("ct5lp-hightpu-4t", "2x2")
    assert machine.accelerator_count == 0  # a TPU VM is named by its machine type
    image = job.job_spec.worker_pool_specs[0].container_spec.image_uri
    assert image == submit.TPU_IMAGE.replace("MY_PROJECT", options.project)
    own = submit.prepare(submit.SubmitOptions(**BASE, tpu="v5e", image="europe-docker.pkg.dev/p/r/v:tpu"),
                         _trainer_args(data_dir, prefix), read_metadata)
    assert _as_custom_job(own).job_spec.worker_pool_specs[0].container_spec.image_uri == (
        "europe-docker.pkg.dev/p/r/v:tpu")


def test_flag_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    args = ["--language_model=char", "--job-dir=gs://b/j/%JOB%", "--data_dir=/none", "--data_prefix=x"]
    cases = [
        (dict(BASE, accelerator="NVIDIA_TESLA_T5"), "--accelerator=NVIDIA_TESLA_T5"),
        (dict(BASE, tpu="v9"), "--tpu=v9"),
        (dict(BASE, variant="tpu_v5e", accelerator_count=2), "--accelerator_count=2 needs --accelerator"),
        (dict(BASE, staging_bucket="/tmp/x"), "--staging_bucket"),
        (dict(BASE, project=""), "--project is missing"),
        (dict(BASE, tensorboard="my-tb", service_account="sa@p.iam.gserviceaccount.com"),
         "--tensorboard=my-tb"),
        (dict(BASE, config=str(tmp_path / "none.yaml")), "--config="),
        # One TPU VM only: replicas would each train their own copy into the same job dir.
        (dict(BASE, tpu="v5e", replicas=2), r"^--tpu=v5e with --replicas=2: verne trains on one TPU VM"),
        (dict(BASE, variant="tpu_v5e", replicas=3), "a TPU machine in 3 replicas"),
        (dict(BASE, tpu="v5e", accelerator="NVIDIA_TESLA_T4"), "--tpu=v5e takes no --accelerator"),
    ]
    for options, message in cases:
        with pytest.raises(UsageError, match=message):
            submit.prepare(submit.SubmitOptions(**options), args, read_metadata)
    tensorboard = "projects/p/locations/us-central1/tensorboards/1"
    account = "sa@p.iam.gserviceaccount.com"
    with pytest.raises(UsageError, match="drop --summary_dir"):
        submit.prepare(submit.SubmitOptions(**BASE, tensorboard=tensorboard, service_account=account),
                       args + ["--summary_dir=gs://b/tb"], read_metadata)
    # Vertex TensorBoard uploads only as an attached service account.
    with pytest.raises(UsageError, match="^--tensorboard needs --service_account"):
        submit.prepare(submit.SubmitOptions(**BASE, tensorboard=tensorboard), args, read_metadata)
    with_account = submit.prepare(submit.SubmitOptions(**BASE, tensorboard=tensorboard,
                                                       service_account=account), args, read_metadata)
    assert _as_custom_job(with_account).job_spec.tensorboard == tensorboard
    assert submit.prepare(submit.SubmitOptions(**BASE, replicas=2), args, read_metadata)  # GPUs may


STUDY_TIME = datetime.datetime(2026, 11, 22, 8, 50, 52, tzinfo=datetime.UTC)
TUNE_ARGS = ["--data_dir=gs://b/data", "--data_prefix=x", "--job-dir=gs://b/job/%JOB%",
             "--language_model=char"]


def _tuning(now: datetime.datetime) -> tuple[submit.Prepared, HyperparameterTuningJob]:
    options = submit.SubmitOptions(**BASE, tune=True, max_trials=6, parallel_trials=2)
    prepared = submit.prepare(options, TUNE_ARGS, read_metadata, now=now)
    body = _request_body(prepared)["hyperparameterTuningJob"]
    return prepared, HyperparameterTuningJob.from_json(json.dumps(body))


def test_tuning_request() -> None:
    prepared, job = _tuning(STUDY_TIME)
    assert (job.max_trial_count, job.parallel_trial_count) == (6, 2)
    assert [(m.metric_id, m.goal.name) for m in job.study_spec.metrics] == [("valid_loss", "MINIMIZE")]
    tuned = {p.parameter_id for p in job.study_spec.parameters}
    assert tuned == {"learning_rate", "lstm_state_size", "dropout"}
    assert tuned <= set(HParams.__dataclass_fields__)  # Vertex passes them as trainer flags
    # %JOB% stays for each trial's trainer (the state size changes the model's shape); the
    # study id keeps this study's trials apart from any other's, the trainer appends the trial.
    args = job.trial_job_spec.worker_pool_specs[0].container_spec.args
    assert "--job-dir=gs://b/job/%JOB%/study-20261122-085052" in args
    assert job.trial_job_spec.base_output_directory.output_uri_prefix == (
        "gs://bucket/staging/jobs/verne-tuning/study-20261122-085052")
    with pytest.raises(UsageError, match="--parallel_trials"):
        tuning.make_tuning_job(None, "x", 2, 3, "p", "r")


def test_a_second_study_never_resumes_the_first_studys_trials() -> None:
    from trainer.cloud_env import apply_environment

    first, _ = _tuning(STUDY_TIME)
    second, _ = _tuning(STUDY_TIME + datetime.timedelta(seconds=1))
    assert first.base_output_dir != second.base_output_dir
    # What trial 3's trainer makes of each study's args under Vertex's CLUSTER_SPEC.
    env = {"CLUSTER_SPEC": json.dumps({"cluster": {"workerpool0": ["h:1"]},
                                       "task": {"type": "workerpool0", "index": 0, "trial": "3"}})}
    dirs = []
    for prepared in (first, second):
        args = list(prepared.request.trial_job_spec.worker_pool_specs[0].container_spec.args)
        dirs.append(apply_environment(submit.trainer_hparams(args), env).job_dir)
    assert dirs == ["gs://b/job/%JOB%/study-20261122-085052/3", "gs://b/job/%JOB%/study-20261122-085053/3"]


def test_tuning_dry_run_prints_an_equivalent_gcloud_hp_tuning_command() -> None:
    prepared, job = _tuning(STUDY_TIME)
    command = submit.gcloud_command(submit.gcloud_config(prepared), "my-project", "us-central1",
                                    prepared.display_name, tune=True)
    spec_yaml = command.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    config = yaml.safe_load(spec_yaml)
    # gcloud's --config for hp-tuning-jobs is the HyperparameterTuningJob itself.
    parsed = HyperparameterTuningJob.from_json(json.dumps({**config, "displayName": job.display_name}))
    assert parsed == job
    assert command.rstrip().splitlines()[-1] == (
        "gcloud ai hp-tuning-jobs create --project=my-project --region=us-central1 "
        "--display-name=verne-tuning --config=verne-tuning.yaml")


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


def _fake_vertex(monkeypatch: pytest.MonkeyPatch, refuse: Exception | None = None
                 ) -> list[tuple[str, CustomJob]]:
    """Replaces the JobServiceClient's two RPCs: records what is sent, or refuses it."""
    sent: list[tuple[str, CustomJob]] = []

    def create_custom_job(self: Any, parent: str, custom_job: CustomJob, timeout: Any = None,
                          **_: Any) -> CustomJob:
        if refuse is not None:
            raise refuse
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
    return sent


def test_submit_sends_the_dry_run_request(tmp_path: Path, make_data_dir, gcs_client: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    sent = _fake_vertex(monkeypatch)
    options = submit.SubmitOptions(**BASE, variant="multi_worker")
    prepared = submit.prepare(options, _trainer_args(data_dir, prefix), read_metadata)
    job = submit.submit(prepared, gcs_client, "us-central1", credentials=AnonymousCredentials())

    assert job.resource_name == "projects/my-project/locations/us-central1/customJobs/123"
    ((parent, request),) = sent
    assert parent == prepared.parent
    assert request == prepared.request  # --dry_run shows exactly this


def test_a_missing_output_bucket_is_refused_before_the_job_is_created(
        tmp_path: Path, make_data_dir, gcs_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir, prefix, _ = make_data_dir(tmp_path)
    sent = _fake_vertex(monkeypatch)
    args = [arg.replace("gs://bucket/", "gs://no-such-bucket/") for arg in _trainer_args(data_dir, prefix)]
    prepared = submit.prepare(submit.SubmitOptions(**BASE), args, read_metadata)
    with pytest.raises(UsageError, match=r"^gs://no-such-bucket does not exist: create it with "
                                         r"`gcloud storage buckets create gs://no-such-bucket"):
        submit.submit(prepared, gcs_client, "us-central1", credentials=AnonymousCredentials())
    assert sent == []  # no job that would fail after its machines start


def test_cloud_set_up_problems_are_one_line_errors(tmp_path: Path, gcs_client: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["--language_model=char", "--job-dir=gs://bucket/j/%JOB%", "--data_dir=/none",
            "--data_prefix=x"]
    prepared = submit.prepare(submit.SubmitOptions(**BASE), args, read_metadata)
    # Vertex refusing the job (no role on the project) comes from the SDK's own RPC.
    _fake_vertex(monkeypatch, refuse=api_exceptions.PermissionDenied("aiplatform.customJobs.create denied"))
    with pytest.raises(UsageError, match=r"^permission denied \(403 aiplatform.customJobs.create "
                                         r"denied\): the account needs roles/aiplatform.user"):
        with submit.google_errors("my-project"):
            submit.submit(prepared, gcs_client, "us-central1", credentials=AnonymousCredentials())
    # No application-default credentials: the storage client is the first to look for them.
    import google.auth

    def no_credentials(*_: Any, **__: Any) -> Any:
        raise auth_exceptions.DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.setattr(google.auth, "default", no_credentials)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)  # which would skip the lookup
    with pytest.raises(UsageError, match=r"^no Google Cloud credentials: run `gcloud auth "
                                         r"application-default login`"):
        submit.submit_with_default_credentials(prepared, "my-project", "us-central1")
    for error, message in [
            (auth_exceptions.RefreshError("Reauthentication is needed."), "^the credentials were refused"),
            (api_exceptions.NotFound("Project my-projekt not found"), r"^not found .*--project=my-project"),
            (api_exceptions.ServiceUnavailable("try later"), "^Google Cloud refused the request: 503")]:
        with pytest.raises(UsageError, match=message):
            with submit.google_errors("my-project"):
                raise error
    with pytest.raises(KeyError):  # a bug in verne keeps its traceback
        with submit.google_errors("my-project"):
            raise KeyError("bug")


# --- the command line ----------------------------------------------------------------------------

def _checkout_outputs() -> dict[str, int]:
    """mtimes of what a `setup.py sdist` in the checkout would write."""
    out = {}
    for name in ("verne.egg-info", "dist", "build"):
        for path in [REPO / name, *(REPO / name).rglob("*")]:
            if path.exists():
                out[str(path)] = path.stat().st_mtime_ns
    return out


def test_dry_run_command_prints_a_custom_job_and_writes_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    before = _checkout_outputs()
    result = subprocess.run(
        [sys.executable, "-m", "trainer.submit", "--project=p", "--region=europe-west4",
         "--staging_bucket=gs://b/staging", f"--config={CONFIG}", "--variant=multi_gpu",
         "--dry_run", "--", "--data_dir=gs://b/data", "--data_prefix=jules",
         "--language_model=char", "--job-dir=gs://b/job/%JOB%"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == [] and _checkout_outputs() == before  # a dry run writes nothing
    request_text, gcloud = result.stdout.split("\n# The same job with gcloud:\n")
    job = CustomJob.from_json(json.dumps(json.loads(request_text)["customJob"]))
    assert job.job_spec.worker_pool_specs[0].machine_spec.accelerator_count == 4
    assert job.job_spec.worker_pool_specs[0].container_spec.args[-1] == (
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


def test_broken_cluster_json_is_a_one_line_error_naming_the_variable() -> None:
    from trainer.cloud_env import apply_environment, trial_id

    for name in ("CLUSTER_SPEC", "TF_CONFIG"):
        with pytest.raises(UsageError, match=f"^environment variable {name} is not valid JSON "
                                             r"\('\{\"cluster\": \['\); unset or fix it$"):
            apply_environment(HParams(job_dir="gs://b/j"), {name: '{"cluster": ['})
    assert trial_id({"TF_CONFIG": "[]"}) is None  # valid JSON of another shape: no trial
