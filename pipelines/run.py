"""Compile, run locally, or submit to Vertex AI the verne pipeline.

    python -m pipelines.run --compile pipeline.yaml
    python -m pipelines.run --local --corpus 'training-data/shakespeare/*.txt' --data_prefix shakespeare \\
        --layers 1 --lstm_state_size 128 --max_steps 200
    python -m pipelines.run --project P --region us-central1 --pipeline_root gs://B/pipeline-root \\
        --image us-central1-docker.pkg.dev/P/verne/verne:latest --corpus 'gs://B/books/*.txt' \\
        [--service_account SA] [--labels team=nlp,env=dev] [--dry_run]

Model hyperparameters take the same flags as `python -m trainer.task` (the pipeline chooses the
data and job dirs). Local and Vertex runs use the same compiled pipeline and differ only in where
things go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from absl import app, flags

from pipelines import steps
from pipelines.pipeline import DEFAULT_IMAGE, PIPELINE_NAME, Resources, create_pipeline
from pipelines.steps import DEFAULT_CPU_LIMIT, DEFAULT_MEMORY_LIMIT, GATE_METRICS
from preprocessing.contract import SPLITS, TOKENIZERS
from trainer import errors
from trainer import flags as trainer_flags
from trainer.errors import UsageError, run_cli

# The runner's own flags live apart from absl's global FLAGS: trainer.babble, trainer.evaluate and
# trainer.submit define some of the same names (--prime, --project, ...) there, and tests import
# them all into one process.
RUN_FLAGS = flags.FlagValues()
LOCAL_PIPELINE_ROOT = "pipeline-root"
# What `make demo` and `python -m preprocessing.corpora shakespeare --dest training-data` fetch;
# a local run fetches it too when it is missing.
DEFAULT_CORPUS_DEST = "training-data"
DEFAULT_LOCAL_CORPUS = f"{DEFAULT_CORPUS_DEST}/shakespeare/*.txt"


def define_flags(fv: flags.FlagValues = RUN_FLAGS) -> None:
    """The runner's flags plus every trainer hyperparameter flag. Safe to call twice."""
    if "compile" in fv:
        return
    string = functools.partial(flags.DEFINE_string, flag_values=fv)
    boolean = functools.partial(flags.DEFINE_boolean, flag_values=fv)
    integer = functools.partial(flags.DEFINE_integer, flag_values=fv)
    real = functools.partial(flags.DEFINE_float, flag_values=fv)
    enum = functools.partial(flags.DEFINE_enum, flag_values=fv)
    # Where to run.
    string("compile", None, "Write the pipeline spec (YAML) to this path.")
    boolean("local", False, "Run the whole pipeline on this machine with kfp.local.")
    string("project", None, "Google Cloud project: submit a Vertex AI PipelineJob.")
    string("region", "us-central1", "Vertex AI region for --project.")
    string("pipeline_root", None, "Where artifacts go: a gs:// URI on Vertex AI, a local dir with "
           f"--local (default: {LOCAL_PIPELINE_ROOT}).")
    string("service_account", None, "Service account the Vertex AI run acts as.")
    string("labels", "", "Labels of the Vertex AI run: k=v,k2=v2.")
    string("display_name", None, "Name of the run in the console (default verne-PREFIX).")
    boolean("enable_caching", False, "Let Vertex AI reuse results of identical earlier steps.")
    boolean("dry_run", False, "Print the Vertex AI request instead of submitting it (offline).")
    string("image", DEFAULT_IMAGE, "Container image with verne installed (see Dockerfile); the "
           "steps run in it on Vertex AI. kfp.local runs them in this environment instead.")
    # What to run.
    string("corpus", None, "Input books: a file pattern, local or gs://, comma-separated. With "
           f"--local the default is the Shakespeare corpus, {DEFAULT_LOCAL_CORPUS!r}.")
    enum("tokenizer", "char", list(TOKENIZERS), "Tokenizer for preprocessing.run.")
    flags.DEFINE_multi_string("preprocess_arg", [], "One more preprocessing.run argument, e.g. "
                              "--preprocess_arg=--min_count=2. Repeat for more.", flag_values=fv)
    enum("eval_split", "test", list(SPLITS), "Split the evaluate step scores.")
    boolean("eval_best", False, "Evaluate the best checkpoint instead of the latest.")
    enum("gate_metric", "bpc", list(GATE_METRICS),
         "Metric of the quality gate (lower is better); fixed when compiling.")
    real("quality_threshold", 4.0, "Sample and publish only when the evaluated --gate_metric is "
         "below this. 4 bits per character is about what a unigram model of English gets.")
    integer("num_samples", 3, "Texts the sample step generates.")
    integer("generate_length", 500, "Tokens per generated text.")
    real("temperature", 0.8, "Sampling temperature of the sample step.")
    string("prime", "", "Text the generated samples start from.")
    string("publish_uri", None,
           "Where a model that passes the gate is copied (default PIPELINE_ROOT/models).")
    # The train step's machine on Vertex AI: pipeline parameters, defaults of the compiled spec.
    string("train_cpu_limit", DEFAULT_CPU_LIMIT, "CPU limit of the train step, e.g. 8 "
           "(the default is the size of Vertex AI's default machine).")
    string("train_memory_limit", DEFAULT_MEMORY_LIMIT, "Memory limit of the train step, e.g. 32G.")
    string("train_accelerator_type", "",
           "Accelerator of the train step, e.g. NVIDIA_TESLA_T4, NVIDIA_L4, TPU_V5_LITEPOD. A spec "
           "compiled with one lets each run choose the type and count; one compiled without "
           "asks for none.")
    integer("train_accelerator_limit", 0, "Number of accelerators (default 1 with a type).")
    trainer_flags.define_hparams_flags(fv)


# Typed pipeline parameters, visible one by one in the Vertex AI console; any other
# hyperparameter the user sets travels in the `hparams` dict parameter.
TYPED_HPARAMS = ("cell", "layers", "lstm_state_size", "embedding_size", "unroll_steps",
                 "batch_size", "epochs", "max_steps", "time_budget", "learning_rate", "seed")
# --data_prefix is a pipeline parameter of its own; the rest of these the pipeline decides.
_PIPELINE_OWNED = tuple(set(steps.PIPELINE_OWNED_HPARAMS) - {"data_prefix"})
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")


def parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` → dict, checked against Vertex AI's label rules before anything is sent."""
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
            raise UsageError(f"--labels: {item!r} is not key=value with lowercase letters, digits, "
                             "- or _ (key starting with a letter, each at most 63 characters)")
        labels[key] = value
    return labels


def pipeline_arguments(flag_values: flags.FlagValues = RUN_FLAGS,
                       pipeline_root: str = "") -> dict[str, Any]:
    """Flags → the pipeline's parameter values (the same values for a local and a Vertex run)."""
    given = trainer_flags.explicitly_set(flag_values)
    owned = sorted(given & set(_PIPELINE_OWNED))
    if owned:
        raise UsageError(f"--{owned[0]}: the pipeline chooses where data and checkpoints go; drop it")
    corpus = flag_values.corpus or (DEFAULT_LOCAL_CORPUS if flag_values.local else "")
    if not corpus:
        raise UsageError("--corpus: give the books to train on, e.g. 'gs://BUCKET/books/*.txt'")
    default_prefix = "shakespeare" if corpus == DEFAULT_LOCAL_CORPUS else "corpus"
    try:
        hparams = trainer_flags.hparams_from_flags(flag_values)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if (flag_values["lr_decay"].present or flag_values["decay_rate"].present
            or hparams.time_budget):  # the schedule the flags resolved (a budget decays)
        given.add("lr_schedule")
    other = sorted(given - set(TYPED_HPARAMS) - {"data_prefix"})
    publish_uri = flag_values.publish_uri or f"{pipeline_root.rstrip('/')}/models"
    machine = resources_from_flags(flag_values)
    return {
        "corpus": corpus,
        "publish_uri": publish_uri,
        "data_prefix": hparams.data_prefix or default_prefix,
        "tokenizer": flag_values.tokenizer,
        "preprocess_args": list(flag_values.preprocess_arg),
        **{name: getattr(hparams, name) for name in TYPED_HPARAMS},
        "hparams": {name: getattr(hparams, name) for name in other},
        "eval_split": flag_values.eval_split,
        "eval_best": flag_values.eval_best,
        "quality_threshold": flag_values.quality_threshold,
        "num_samples": flag_values.num_samples,
        "sample_length": flag_values.generate_length,
        "temperature": flag_values.temperature,
        "prime": flag_values.prime,
        "train_cpu_limit": machine.cpu_limit,
        "train_memory_limit": machine.memory_limit,
        "train_accelerator_type": machine.accelerator_type,
        "train_accelerator_limit": machine.accelerator_limit,
    }


def resources_from_flags(flag_values: flags.FlagValues = RUN_FLAGS) -> Resources:
    """The train step's machine, checked, with the accelerator count a type implies."""
    try:
        return Resources(cpu_limit=flag_values.train_cpu_limit,
                         memory_limit=flag_values.train_memory_limit,
                         accelerator_type=flag_values.train_accelerator_type,
                         accelerator_limit=flag_values.train_accelerator_limit).validate()
    except ValueError as err:
        raise UsageError(str(err)) from None


def pipeline_from_flags(flag_values: flags.FlagValues = RUN_FLAGS) -> Any:
    resources = resources_from_flags(flag_values)
    try:
        return create_pipeline(image=flag_values.image, resources=resources,
                               gate_metric=flag_values.gate_metric)
    except ValueError as err:
        raise UsageError(str(err)) from None


def compile_pipeline(pipeline_func: Any, path: str) -> str:
    """Writes the pipeline spec through a temporary name, so a failed compile leaves no YAML."""
    from kfp import compiler

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"--compile: directory {directory} does not exist")
    fd, temporary = tempfile.mkstemp(suffix=".yaml", dir=directory)
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline_func, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


# --- kfp.local -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LocalArtifact:
    task: str
    name: str
    uri: str
    metadata: dict[str, Any]


def run_local(pipeline_func: Any, arguments: dict[str, Any], pipeline_root: str) -> str:
    """Runs the pipeline with kfp.local in this Python environment; returns the run's directory."""
    from kfp import local

    root = os.path.abspath(pipeline_root)
    os.makedirs(os.path.join(root, ".tmp"), exist_ok=True)
    before = set(os.listdir(root))
    # use_venv=False: the steps import verne from this environment; never pip-install into it.
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root)
    with _scratch_tmpdir(os.path.join(root, ".tmp")), warnings.catch_warnings():
        # kfp.local warns that the Vertex image is not a python:* image, and that it ignores the
        # train step's machine: both are for Vertex AI, and neither is used here.
        warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner",
                                category=UserWarning)
        try:
            pipeline_func(**arguments)
        except RuntimeError as err:
            # kfp.local has printed the failing step's log (and its traceback) above.
            raise UsageError(f"the local run failed: {err}; the step's log above says why") from None
    # kfp.local names a run PIPELINE-NAME-YYYY-MM-DD-…; other new entries (models/) are not runs.
    run_name = re.compile(re.escape(pipeline_func.name) + r"-\d{4}-\d\d-\d\d-")
    new = sorted(name for name in set(os.listdir(root)) - before if run_name.match(name))
    if len(new) != 1:
        raise RuntimeError(f"expected one new run directory in {root}, found {new}")
    return os.path.join(root, new[0])


@contextlib.contextmanager
def _scratch_tmpdir(parent: str) -> Iterator[str]:
    """TMPDIR for one run: each step writes its program there (`mktemp -d`); removed afterwards."""
    scratch = tempfile.mkdtemp(prefix="run-", dir=parent)
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = scratch
    tempfile.tempdir = None  # tempfile caches the directory it chose
    try:
        yield scratch
    finally:
        if previous is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = previous
        tempfile.tempdir = None
        shutil.rmtree(scratch, ignore_errors=True)


def local_artifacts(run_dir: str) -> list[LocalArtifact]:
    """Every output artifact of a kfp.local run, read from each step's executor_output.json."""
    found = []
    for path in sorted(glob.glob(os.path.join(run_dir, "**", "executor_output.json"), recursive=True)):
        task = os.path.relpath(os.path.dirname(path), run_dir)
        with open(path, encoding="utf-8") as f:
            output = json.load(f)
        for name, entry in sorted(output.get("artifacts", {}).items()):
            for artifact in entry.get("artifacts", []):
                found.append(LocalArtifact(task, name, artifact["uri"], artifact.get("metadata", {})))
    return found


def check_preprocess_args(arguments: dict[str, Any]) -> None:
    """Bad --preprocess_arg values fail here, in one line, not minutes later inside a step."""
    from preprocessing import run as preprocessing_run

    argv = steps.preprocess_argv(arguments["corpus"], arguments["data_prefix"],
                                 arguments["tokenizer"], arguments["preprocess_args"], "OUTPUT_DIR")
    try:
        preprocessing_run.parse_args(argv)
    except preprocessing_run.UsageError as err:
        raise UsageError(f"--preprocess_arg / --corpus / --data_prefix: {err}") from None


def check_local_corpus(corpus: str) -> None:
    """Every local pattern must match a file before the run starts.

    The default corpus is fetched when it is missing, so `python -m pipelines.run --local` works
    on a fresh checkout; any other pattern that matches nothing is the user's to fix.
    """
    if corpus == DEFAULT_LOCAL_CORPUS and not glob.glob(corpus):
        fetch_default_corpus()
    for pattern in corpus.split(","):
        if "://" not in pattern and not glob.glob(pattern):
            raise UsageError(f"--corpus: no file matches {pattern!r}")


def fetch_default_corpus() -> None:
    from pathlib import Path

    from preprocessing import corpora

    print(f"--corpus: {DEFAULT_LOCAL_CORPUS} is missing; fetching the Shakespeare corpus into "
          f"{DEFAULT_CORPUS_DEST}/ (once)", file=sys.stderr, flush=True)
    try:
        corpora.fetch("shakespeare", Path(DEFAULT_CORPUS_DEST))
    except corpora.CorpusError as err:
        raise UsageError(f"--corpus: cannot fetch the default corpus: {err}") from None


def check_sample_args(arguments: dict[str, Any]) -> None:
    """Bad sample settings fail here, in one line, not after training, with trainer.babble's limits
    (the checks `generate_from_job` makes in the sample step)."""
    from trainer import babble

    babble.check_counts(arguments["sample_length"], arguments["num_samples"],
                        length_flag="--generate_length")
    babble.sampling_options(temperature=arguments["temperature"], seed=arguments["seed"])


def check_arguments(arguments: dict[str, Any]) -> None:
    """Everything about a run's values that can be checked before anything runs.

    The sample check comes last: trainer.babble imports TensorFlow, whose start-up lines on
    stderr would precede a mistake the other checks report in one line.
    """
    check_preprocess_args(arguments)
    check_sample_args(arguments)


def warn_unpullable_image(flag_values: flags.FlagValues) -> None:
    """A spec compiled without --image names verne:latest, which Vertex AI cannot pull.

    A warning, not an error: such a spec still serves kfp.local, a cluster that has the image
    loaded under that name, or a look at the spec.
    """
    if flag_values.compile and not flag_values["image"].present:
        print(f"warning: --compile without --image: the spec names image {DEFAULT_IMAGE}, which "
              "Vertex AI cannot pull, so it is only usable locally; pass --image "
              "REGION-docker.pkg.dev/PROJECT/verne/verne:TAG", file=sys.stderr, flush=True)


# --- Vertex AI -----------------------------------------------------------------------------------

def build_job(template_path: str, arguments: dict[str, Any], project: str, region: str,
              pipeline_root: str, labels: dict[str, str], display_name: str,
              enable_caching: bool, credentials: Any = None) -> Any:
    """A Vertex AI PipelineJob from the compiled spec; building it touches no network."""
    from google.cloud import aiplatform

    aiplatform.init(project=project, location=region, credentials=credentials)
    return aiplatform.PipelineJob(display_name=display_name, template_path=template_path,
                                  pipeline_root=pipeline_root, parameter_values=arguments,
                                  labels=labels or None, enable_caching=enable_caching)


def submission_request(job: Any, service_account: str | None) -> dict[str, Any]:
    """What `job.submit(service_account=…)` sends: the PipelineJob with the run-as account."""
    body = job.to_dict()
    if service_account:
        body["serviceAccount"] = service_account
    return {"parent": f"projects/{job.project}/locations/{job.location}", "pipelineJobId": job.job_id,
            "pipelineJob": body}


def vertex_root(flag_values: flags.FlagValues) -> str:
    root = flag_values.pipeline_root or ""
    if not root.startswith("gs://"):
        raise UsageError("--pipeline_root: Vertex AI needs a gs:// URI, e.g. gs://BUCKET/pipeline-root")
    if not flag_values["image"].present and not flag_values.dry_run:
        raise UsageError("--image: give the verne image built with Cloud Build, e.g. "
                         "REGION-docker.pkg.dev/PROJECT/verne/verne:latest (see docs/pipelines.md)")
    return root


def submission_credentials(dry_run: bool) -> Any:
    """Application default credentials, looked up now so that a missing login is one clear line
    (and never credentials an earlier aiplatform.init in this process left behind)."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import DefaultCredentialsError

    if dry_run:
        # Offline: the SDK wants credentials to build a job, not to print it.
        return AnonymousCredentials()
    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except DefaultCredentialsError:
        raise UsageError("no Google Cloud credentials: run `gcloud auth application-default login` "
                         "(or add --dry_run to print the request offline)") from None
    return credentials


def submit(flag_values: flags.FlagValues, pipeline_func: Any) -> None:
    root = vertex_root(flag_values)
    arguments = pipeline_arguments(flag_values, root)
    check_arguments(arguments)
    labels = parse_labels(flag_values.labels)
    display_name = flag_values.display_name or f"verne-{arguments['data_prefix']}"
    credentials = submission_credentials(flag_values.dry_run)
    with tempfile.TemporaryDirectory() as scratch:
        template = flag_values.compile or os.path.join(scratch, f"{PIPELINE_NAME}.yaml")
        compile_pipeline(pipeline_func, template)
        job = build_job(template, arguments, flag_values.project, flag_values.region, root, labels,
                        display_name, flag_values.enable_caching, credentials)
        if flag_values.dry_run:
            print(json.dumps(submission_request(job, flag_values.service_account), indent=1))
            return
        job.submit(service_account=flag_values.service_account)
    print(f"submitted {job.resource_name}")


# --- entry point ---------------------------------------------------------------------------------

def parse_flags(argv: Sequence[str]) -> flags.FlagValues:
    """Parses argv (program name first) into RUN_FLAGS; a bad flag is a UsageError."""
    define_flags()
    if any(arg in ("-h", "--help", "--helpfull", "-?") for arg in argv[1:]):
        print(__doc__ + "\n" + RUN_FLAGS.get_help())
        sys.exit(0)
    if RUN_FLAGS.is_parsed():  # a second call in one process (tests) starts from the defaults
        RUN_FLAGS.unparse_flags()
    try:
        rest = RUN_FLAGS(list(argv))
    except flags.Error as err:
        raise UsageError(f"{err} (python -m pipelines.run --help lists the flags)") from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]}; flags look like --name=value")
    return RUN_FLAGS


def main(argv: Sequence[str]) -> None:
    """Compiles, runs locally or submits, as the flags in argv (program name first) say."""
    fv = parse_flags(argv)
    if fv.local and fv.project:
        raise UsageError("--local and --project: choose one (this machine or Vertex AI)")
    if not (fv.compile or fv.local or fv.project):
        raise UsageError("nothing to do: give --compile PATH, --local, or --project/--pipeline_root")
    pipeline_func = pipeline_from_flags(fv)
    warn_unpullable_image(fv)
    if fv.project:
        submit(fv, pipeline_func)
        return
    if fv.compile:
        print(f"pipeline spec: {compile_pipeline(pipeline_func, fv.compile)}")
    if fv.local:
        if "://" in (fv.pipeline_root or ""):
            raise UsageError("--pipeline_root: --local needs a local directory")
        root = os.path.abspath(fv.pipeline_root or LOCAL_PIPELINE_ROOT)
        arguments = pipeline_arguments(fv, root)
        check_local_corpus(arguments["corpus"])
        check_arguments(arguments)
        with errors.writing(f"--pipeline_root={root}"):
            os.makedirs(os.path.join(root, ".tmp"), exist_ok=True)
        run_dir = run_local(pipeline_func, arguments, root)
        print(f"\nrun: {run_dir}")
        for artifact in local_artifacts(run_dir):
            print(f"{artifact.task}/{artifact.name}: {artifact.uri}")
            for key, value in sorted(artifact.metadata.items()):
                if key != "display_name":
                    print(f"    {key}: {value}")


def _absl_flags_only(argv: list[str]) -> list[str]:
    # absl's own machinery (logging) wants the global FLAGS parsed; ours are parsed in main.
    flags.FLAGS(argv[:1])
    return argv


if __name__ == "__main__":
    app.run(run_cli(main), flags_parser=_absl_flags_only)
