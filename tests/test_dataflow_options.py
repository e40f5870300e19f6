"""preprocessing.run on Dataflow, offline: the user's exact command line becomes DataflowRunner
options, and Beam's own DataflowRunner builds the job (pipeline proto, environment, staged
package from --setup_file) up to the point of submission. Beam's `dry_run` test option stops it
there; it is set by the test, not on the command line, so the command is the one users type."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _command(books: Path) -> list[str]:
    return ["--input", f"{books}/*.txt", "--output_dir", "gs://my-bucket/data", "--data_prefix", "jules",
            "--tokenizer", "char",
            "--runner", "DataflowRunner", "--project", "my-project", "--region", "europe-west1",
            "--temp_location", "gs://my-bucket/tmp", "--setup_file", "./setup.py"]


def test_dataflow_job_is_built_with_verne_staged_from_setup_py(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    run = pytest.importorskip("preprocessing.run", reason="preprocessing/run.py not written yet")
    import apache_beam as beam
    from apache_beam.options.pipeline_options import (
        GoogleCloudOptions,
        SetupOptions,
        StandardOptions,
        TestOptions,
    )
    from apache_beam.portability.api import beam_runner_api_pb2

    monkeypatch.chdir(REPO)  # --setup_file ./setup.py, as in the README
    books = tmp_path / "books"
    books.mkdir()
    for name in ("a", "b"):
        (books / f"{name}.txt").write_text("First Citizen:\nBefore we proceed any further, hear me.\n" * 20)

    options, beam_args = run.parse_args(_command(books))
    beam_options, runner = run.pipeline_options(beam_args)
    assert runner is None  # Beam picks the runner named in the options
    assert beam_options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = beam_options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region, cloud.temp_location) == (
        "my-project", "europe-west1", "gs://my-bucket/tmp")
    assert beam_options.view_as(SetupOptions).setup_file == "./setup.py"

    beam_options.view_as(TestOptions).dry_run = True  # everything but the submission
    pipeline = beam.Pipeline(options=beam_options)
    run.build_pipeline(pipeline, run.match_inputs(options), options, "gs://my-bucket/data/.jules.tmp")
    result = pipeline.run()
    job = result.job

    assert type(pipeline.runner).__name__ == "DataflowRunner"
    assert job.proto.type_.name == "JOB_TYPE_BATCH"
    transforms = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
    assert {"Survey", "Encode", "Writetrain", "WriteStats"} <= {n.split("/")[0] for n in transforms}

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
