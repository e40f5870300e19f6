"""preprocessing.run on Dataflow, offline.

- Mistakes in a DataflowRunner command line (a missing --project/--region/--temp_location, local
  inputs or outputs the workers cannot see, no way to ship verne to them) end in one line naming
  the flag, before anything is read, staged or submitted.
- A correct command line becomes DataflowRunner options, and Beam's own DataflowRunner builds the
  job (pipeline proto, environment, staged package from --setup_file) up to the point of
  submission, with the books on a local GCS emulator. Beam's `dry_run` test option stops it
  there; it is set by the test, not on the command line, so the command is the one users type.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from gcs.server import GcsServer

from preprocessing import run

REPO = Path(__file__).resolve().parents[1]
GOOD = {"--input": "gs://my-bucket/books/*.txt", "--output_dir": "gs://my-bucket/data",
        "--data_prefix": "jules", "--tokenizer": "char", "--runner": "DataflowRunner",
        "--project": "my-project", "--region": "europe-west1", "--temp_location": "gs://my-bucket/tmp",
        "--setup_file": "./setup.py"}


def _command(**changes: str | None) -> list[str]:
    """GOOD with flags replaced (--flag_name="value") or dropped (None)."""
    flags = {**GOOD, **{f"--{k}": v for k, v in changes.items()}}
    return [part for flag, value in flags.items() if value is not None for part in (flag, value)]


@pytest.fixture
def no_default_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither $CLOUDSDK_COMPUTE_REGION nor a gcloud configuration (an empty one) names a region."""
    monkeypatch.delenv("CLOUDSDK_COMPUTE_REGION", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"project": None}, "needs --project PROJECT_ID"),
    ({"region": None}, "needs --region REGION"),
    ({"temp_location": None}, "needs --temp_location gs://"),
    ({"temp_location": "/tmp/beam"}, "--temp_location /tmp/beam: Dataflow needs a gs:// location"),
    ({"input": "books/*.txt"}, "--input 'books/*.txt' is local"),
    ({"input": None, "train": "gs://my-bucket/t.txt", "valid": "v.txt"}, "--valid 'v.txt' is local"),
    ({"output_dir": "data"}, "--output_dir data is local"),
    ({"setup_file": None}, "needs --setup_file ./setup.py"),
    ({"setup_file": "./no-setup.py"}, "--setup_file ./no-setup.py: no such file"),
])
def test_dataflow_mistakes_are_one_line_errors_naming_the_flag(
        changes: dict[str, str | None], message: str, no_default_region: None,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # where ./setup.py exists
    with pytest.raises(SystemExit) as exit_info:
        run.main(_command(**changes))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("preprocessing.run: error:") and message in err, err


def test_complete_dataflow_options_pass_the_checks(no_default_region: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)

    def check(command: list[str]) -> None:
        options, beam_args = run.parse_args(command)
        run.check_dataflow_options(options, run.pipeline_options(beam_args)[0])

    check(_command())
    check(_command(setup_file=None, sdk_container_image="europe-docker.pkg.dev/p/verne:1"))
    check(_command(temp_location=None, staging_location="gs://my-bucket/staging"))  # Beam uses it for both
    check(_command(input="books/*.txt", runner="DirectRunner"))  # local runs may read local files
    monkeypatch.setenv("CLOUDSDK_COMPUTE_REGION", "us-central1")  # Beam's default region
    check(_command(region=None))


@pytest.mark.slow
def test_beams_own_validation_errors_are_one_line(gcs_in_process: GcsServer, gcs_bucket: str,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """What only Beam checks (here: a project number given as --project) is one line as well."""
    monkeypatch.chdir(REPO)
    gcs_in_process.storage_client().bucket(gcs_bucket.removeprefix("gs://")).blob("books/a.txt") \
        .upload_from_string("First Citizen:\nBefore we proceed any further, hear me.\n")
    with pytest.raises(SystemExit) as exit_info:
        run.main(_command(input=f"{gcs_bucket}/books/*.txt", output_dir=f"{gcs_bucket}/data",
                          temp_location=f"{gcs_bucket}/tmp", project="123456789"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("preprocessing.run: error: Invalid Project ID (123456789)."), err


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_dataflow_job_is_built_with_verne_staged_from_setup_py(
        monkeypatch: pytest.MonkeyPatch, gcs_in_process: GcsServer, gcs_bucket: str, tokenizer: str) -> None:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import (
        GoogleCloudOptions,
        SetupOptions,
        StandardOptions,
        TestOptions,
    )
    from apache_beam.portability.api import beam_runner_api_pb2

    monkeypatch.chdir(REPO)  # --setup_file ./setup.py, as in the README
    bucket = gcs_in_process.storage_client().bucket(gcs_bucket.removeprefix("gs://"))
    for name in ("a", "b"):  # Dataflow workers read the books from Cloud Storage
        bucket.blob(f"books/{name}.txt").upload_from_string(
            "First Citizen:\nBefore we proceed any further, hear me.\n" * 20)

    options, beam_args = run.parse_args(_command(input=f"{gcs_bucket}/books/*.txt",
                                                 output_dir=f"{gcs_bucket}/data",
                                                 temp_location=f"{gcs_bucket}/tmp", tokenizer=tokenizer))
    beam_options, runner = run.pipeline_options(beam_args)
    run.check_dataflow_options(options, beam_options)
    assert runner is None  # Beam picks the runner named in the options
    assert beam_options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = beam_options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == (
        "my-project", "europe-west1", f"{gcs_bucket}/tmp")
    assert beam_options.view_as(SetupOptions).setup_file == "./setup.py"

    beam_options.view_as(TestOptions).dry_run = True  # everything but the submission
    pipeline = beam.Pipeline(options=beam_options)
    files = run.match_inputs(options)
    assert [f.path.rsplit("/", 1)[-1] for f in files] == ["a.txt", "b.txt"]
    run.build_pipeline(pipeline, files, options, f"{gcs_bucket}/data/.jules.tmp")
    result = pipeline.run()
    job = result.job

    assert type(pipeline.runner).__name__ == "DataflowRunner"
    assert job.proto.type_.name == "JOB_TYPE_BATCH"
    transforms = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    steps = {n.split("/")[0] for n in transforms}
    assert {"Survey", "Encode", "WritePartstrain", "JoinPartstrain", "WriteStats"} <= steps
    if tokenizer == "bpe":  # a bounded sample of the training split goes to one learning step
        assert {"SampleBlocks", "BoundedSample", "Learn"} <= {n.split("/")[0] for n in transforms}

    staged = {}
    for environment in job.proto_pipeline.components.environments.values():
        for artifact in environment.dependencies:
            path = beam_runner_api_pb2.ArtifactFilePayload.FromString(artifact.type_payload).path
            role = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(artifact.role_payload)
            staged[role.staged_name] = path
    # Dataflow workers pip-install `workflow.tar.gz`: the sdist Beam built from our setup.py.
    assert "workflow.tar.gz" in staged
    with tarfile.open(staged["workflow.tar.gz"]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for module in ("setup.py", "preprocessing/run.py", "preprocessing/contract.py",
                   "trainer/task.py", "trainer/hparams.py", "pipelines/__init__.py"):
        assert module in names, module
