"""Train on Vertex AI: stage this checkout's sdist and create a CustomJob running trainer.task.

    python -m trainer.submit --project=P --region=us-central1 --staging_bucket=gs://B/staging \\
        [--config=config.yaml] [--variant=multi_worker] [--machine_type=...] [--accelerator=...] \\
        [--accelerator_count=N] [--replicas=N] [--tpu=v5e] [--spot] [--service_account=...] \\
        [--tensorboard=projects/P/locations/R/tensorboards/ID] [--dry_run] [--tune] \\
        -- --data_dir=gs://B/data --data_prefix=jules --job-dir=gs://B/job/%JOB% --layers=2 ...

Everything after `--` goes to trainer.task unchanged, except that `%JOB%` in --job-dir and
--summary_dir is resolved here exactly as the trainer resolves it (the flags through
trainer.flags, the data's metadata through trainer.checkpoints.resolve_hparams), so the printed
job dir is the one training will write. Without trainer flags, the `args` of config.yaml are used.

The job spec starts from config.yaml (a camelCase CustomJobSpec, also usable with
`gcloud ai custom-jobs create --config`), flags override it, and the result is parsed by the
Vertex SDK's CustomJobSpec, which rejects unknown keys. `--dry_run` builds everything offline
(the sdist too, to name it by content) and prints the exact request the SDK would send plus the
equivalent gcloud command; nothing is uploaded or created.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from absl import app, flags

from trainer.errors import UsageError, run_cli
from trainer.hparams import JOB_PLACEHOLDER, HParams, job_name

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_NAME = "verne"
TPU_MACHINES = {"v5e": "ct5lp-hightpu-4t"}
# The image built from ./Dockerfile (docs/pipelines.md). Vertex's prebuilt TensorFlow training
# images lag behind (Python 3.10, TF <= 2.17) and cannot install verne. The GPU build also runs on
# CPU-only machines; TPU VMs take the TPU build. MY_PROJECT becomes --project.
IMAGE_REPOSITORY = "us-central1-docker.pkg.dev/MY_PROJECT/verne/verne"
IMAGES = {"gpu": IMAGE_REPOSITORY + ":gpu", "tpu": IMAGE_REPOSITORY + ":tpu"}
_VARIANT_MARK = re.compile(r"^# ---- variant: (\w+) ----\s*$")
_JOB_DIR_FLAGS = ("--job-dir", "--job_dir", "--summary_dir")
_TENSORBOARD_NAME = re.compile(r"^projects/[^/]+/locations/[^/]+/tensorboards/[^/]+$")


# --- config.yaml -------------------------------------------------------------------------------

def config_variants(text: str) -> dict[str, str]:
    """The commented variants of a config file, uncommented: {name: YAML text}."""
    variants: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        mark = _VARIANT_MARK.match(line)
        if mark:
            current = variants.setdefault(mark.group(1), [])
        elif current is not None:
            if not line.startswith("#"):
                current = None  # a variant ends at the first uncommented line
            else:
                current.append(line[2:] if line.startswith("# ") else line[1:])
    return {name: "\n".join(lines) + "\n" for name, lines in variants.items()}


def load_config(text: str, source: str, variant: str | None = None) -> dict[str, Any]:
    """The spec (or one variant) of a config file as a camelCase dict, checked by the SDK."""
    if variant:
        variants = config_variants(text)
        if variant not in variants:
            raise UsageError(f"--variant={variant}: {source} has variants {sorted(variants) or 'none'}")
        text, source = variants[variant], f"{source} (variant {variant})"
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UsageError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(body, dict):
        raise UsageError(f"{source}: expected a CustomJobSpec mapping with workerPoolSpecs")
    parse_spec(body, source)
    return body


def parse_spec(body: dict[str, Any], source: str) -> Any:
    """camelCase dict -> aiplatform_v1 CustomJobSpec; a typo is a UsageError naming `source`."""
    from google.cloud.aiplatform_v1.types import CustomJobSpec
    from google.protobuf.json_format import ParseError

    try:
        spec = CustomJobSpec.from_json(json.dumps(body))
    except ParseError as err:
        # The SDK's message names the field and where it is; its list of valid names follows.
        raise UsageError(f"{source}: {str(err).split(' Available')[0].strip()}") from None
    if not spec.worker_pool_specs:
        raise UsageError(f"{source}: no workerPoolSpecs")
    return spec


# --- trainer arguments and %JOB% ---------------------------------------------------------------

def trainer_hparams(args: Sequence[str]) -> HParams:
    """The HParams trainer.task would build from `args` (its own flag definitions, parsed apart)."""
    from trainer.flags import define_hparams_flags, hparams_from_flags

    values = flags.FlagValues()
    define_hparams_flags(values)
    try:
        values(["trainer.task", *args])
        return hparams_from_flags(values)
    except (flags.Error, ValueError) as err:
        raise UsageError(f"trainer flags after --: {err}") from None


def resolve_trainer_hparams(hparams: HParams, read_metadata: Callable[[str, str], Any]) -> HParams:
    """`hparams` with %JOB% resolved as the trainer will. With --language_model given that needs
    nothing else (and no network); otherwise the data's metadata names it, when it can be read."""
    if hparams.language_model is not None:
        return hparams.replace(job_dir=_resolved(hparams.job_dir, hparams),
                               summary_dir=_resolved(hparams.summary_dir, hparams))
    try:
        metadata = read_metadata(hparams.data_dir, hparams.data_prefix)
    except Exception as err:  # unreachable data of any kind (gs:// offline, no file) gets one advice
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"cannot name %JOB% from the data ({reason}); pass --language_model "
                         "after -- or make --data_dir readable") from None
    from trainer.checkpoints import resolve_hparams  # the trainer's own resolution, checks included

    return resolve_hparams(hparams, metadata)


def _resolved(path: str, hparams: HParams) -> str:
    return path.replace(JOB_PLACEHOLDER, job_name(hparams))


def substitute_job_dirs(args: Sequence[str], name: str) -> list[str]:
    """`args` with %JOB% replaced by `name` in the values of --job-dir/--job_dir/--summary_dir only
    (the trainer resolves it nowhere else)."""
    out = list(args)
    for i, arg in enumerate(out):
        flag = arg.split("=", 1)[0]
        owned = flag in _JOB_DIR_FLAGS and "=" in arg
        follows = i > 0 and out[i - 1] in _JOB_DIR_FLAGS
        if owned or follows:
            out[i] = arg.replace(JOB_PLACEHOLDER, name)
    return out


# --- the job spec ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Overrides:
    """What the command line changes in the spec from config.yaml."""

    package_uri: str
    args: tuple[str, ...]
    base_output_dir: str
    machine_type: str = ""
    accelerator: str = ""
    accelerator_count: int = 0
    replicas: int = 0
    tpu: str = ""
    tpu_topology: str = "2x2"
    executor_image: str = ""
    spot: bool = False
    service_account: str = ""
    tensorboard: str = ""
    project: str = ""


def apply_overrides(body: dict[str, Any], o: Overrides) -> dict[str, Any]:
    """A new camelCase spec: `body` with the command line's choices applied."""
    from google.cloud.aiplatform_v1.types import AcceleratorType

    spec = copy.deepcopy(body)
    pools = spec["workerPoolSpecs"]
    if o.replicas:
        if o.replicas < 1:
            raise UsageError(f"--replicas={o.replicas}: must be at least 1")
        chief = {**pools[0], "replicaCount": 1}
        workers = [{**copy.deepcopy(chief), "replicaCount": o.replicas - 1}] if o.replicas > 1 else []
        pools = [chief, *workers]
    if o.accelerator and o.accelerator not in AcceleratorType.__members__:
        names = ", ".join(n for n in AcceleratorType.__members__ if n.startswith("NVIDIA"))
        raise UsageError(f"--accelerator={o.accelerator}: not a Vertex accelerator; one of {names}")
    if o.tpu and o.tpu not in TPU_MACHINES:
        raise UsageError(f"--tpu={o.tpu}: choose one of {', '.join(TPU_MACHINES)}")
    for pool in pools:
        machine = pool.setdefault("machineSpec", {})
        if o.machine_type:
            machine["machineType"] = o.machine_type
        if o.accelerator:
            machine["acceleratorType"] = o.accelerator
            machine["acceleratorCount"] = o.accelerator_count or machine.get("acceleratorCount") or 1
        elif o.accelerator_count:
            if not machine.get("acceleratorType"):
                raise UsageError(f"--accelerator_count={o.accelerator_count} needs --accelerator "
                                 "(e.g. NVIDIA_TESLA_T4): the spec's machine has none")
            machine["acceleratorCount"] = o.accelerator_count
        if o.tpu:
            machine.pop("acceleratorType", None)
            machine.pop("acceleratorCount", None)
            machine.update(machineType=TPU_MACHINES[o.tpu], tpuTopology=o.tpu_topology)
        package = pool.setdefault("pythonPackageSpec", {})
        package["packageUris"] = [o.package_uri]
        package["pythonModule"] = "trainer.task"
        package["args"] = list(o.args)
        image = o.executor_image or (IMAGES["tpu"] if o.tpu else package.get("executorImageUri", ""))
        package["executorImageUri"] = image.replace("MY_PROJECT", o.project or "MY_PROJECT")
    spec["workerPoolSpecs"] = pools
    spec["baseOutputDirectory"] = {"outputUriPrefix": o.base_output_dir}
    if o.spot:
        spec.setdefault("scheduling", {})["strategy"] = "SPOT"
    if o.service_account:
        spec["serviceAccount"] = o.service_account
    if o.tensorboard:
        if not _TENSORBOARD_NAME.match(o.tensorboard):
            raise UsageError(f"--tensorboard={o.tensorboard}: give the resource name "
                             "projects/P/locations/R/tensorboards/ID (gcloud ai tensorboards list)")
        spec["tensorboard"] = o.tensorboard
    return spec


# --- packaging ---------------------------------------------------------------------------------

def build_sdist(out_dir: str, root: Path = REPO_ROOT) -> Path:
    """Builds this checkout's sdist into out_dir (the package Vertex pip-installs)."""
    if not (root / "setup.py").exists():
        raise UsageError(f"{root}/setup.py not found: run trainer.submit from a verne checkout")
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", out_dir],
                            cwd=root, capture_output=True, text=True)
    if result.returncode:
        raise UsageError(f"python setup.py sdist failed in {root}: {result.stderr.strip()[-300:]}")
    built = sorted(Path(out_dir).glob(f"{PACKAGE_NAME}-*.tar.gz"))
    if len(built) != 1:
        raise UsageError(f"python setup.py sdist left {len(built)} archives in {out_dir}, expected 1")
    return built[0]


def package_uri(sdist: Path, staging_bucket: str) -> str:
    """gs:// name of the staged sdist, keyed by content: a rerun never replaces the package of a
    job that is still starting, and an unchanged checkout uploads nothing new."""
    digest = hashlib.sha256()
    # The files, not the archive: gzip and tar stamp build times into the bytes.
    with tarfile.open(sdist) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            content = archive.extractfile(member) if member.isfile() else None
            digest.update(member.name.encode() + b"\0" + (content.read() if content else b"") + b"\0")
    stem = sdist.name.removesuffix(".tar.gz")
    return f"{staging_bucket.rstrip('/')}/packages/{stem}-{digest.hexdigest()[:12]}.tar.gz"


def upload(sdist: Path, uri: str, client: Any) -> None:
    """Uploads `sdist` to `uri` with google-cloud-storage unless that exact object is there."""
    bucket_name, _, blob_name = uri.removeprefix("gs://").partition("/")
    blob = client.bucket(bucket_name).blob(blob_name)
    if blob.exists():
        return
    blob.upload_from_filename(str(sdist), content_type="application/gzip")


# --- requests ----------------------------------------------------------------------------------

class _Recorder:
    """Stands in for the SDK's JobServiceClient: keeps the request and echoes it back as created,
    so `--dry_run` prints what the SDK itself would have sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []

    def _create(self, parent: str, job: Any, collection: str) -> Any:
        from google.cloud.aiplatform_v1.types import JobState

        self.requests.append((parent, type(job)(job)))
        created = type(job)(job)
        created.name = f"{parent}/{collection}/dry-run"
        created.state = JobState.JOB_STATE_SUCCEEDED  # so the SDK's wait returns at once
        self._created = created
        return created

    def create_custom_job(self, parent: str, custom_job: Any, timeout: Any = None) -> Any:
        return self._create(parent, custom_job, "customJobs")

    def create_hyperparameter_tuning_job(self, parent: str, hyperparameter_tuning_job: Any,
                                         timeout: Any = None) -> Any:
        return self._create(parent, hyperparameter_tuning_job, "hyperparameterTuningJobs")

    def get_custom_job(self, name: str, retry: Any = None) -> Any:
        return self._created

    get_hyperparameter_tuning_job = get_custom_job


def submit_kwargs(spec: Any) -> dict[str, Any]:
    """The parts of a CustomJobSpec the SDK takes at submit time rather than construction."""
    kwargs: dict[str, Any] = {}
    if spec.service_account:
        kwargs["service_account"] = spec.service_account
    if spec.tensorboard:
        kwargs["tensorboard"] = spec.tensorboard
    if spec.network:
        kwargs["network"] = spec.network
    if spec.enable_web_access:
        kwargs["enable_web_access"] = True
    if spec.scheduling.strategy:
        kwargs["scheduling_strategy"] = spec.scheduling.strategy
    return kwargs


def make_custom_job(spec: Any, display_name: str, project: str, region: str, staging_bucket: str,
                    credentials: Any = None) -> Any:
    from google.cloud import aiplatform

    return aiplatform.CustomJob(
        display_name=display_name, worker_pool_specs=list(spec.worker_pool_specs),
        base_output_dir=spec.base_output_directory.output_uri_prefix, project=project,
        location=region, credentials=credentials, staging_bucket=staging_bucket)


def record_request(job: Any, launch: Callable[[Any], None]) -> tuple[str, Any]:
    """(parent, resource) that `launch(job)` makes the SDK send, with no network."""
    recorder = _Recorder()
    real = job.api_client
    job.api_client = recorder
    # The SDK logs "created" and console links for the echoed job: true only for a real one.
    logging.disable(logging.INFO)
    try:
        launch(job)
    finally:
        job.api_client = real
        logging.disable(logging.NOTSET)
    if len(recorder.requests) != 1:
        raise RuntimeError(f"expected one create request, the SDK made {len(recorder.requests)}")
    return recorder.requests[0]


def check_carried(sent_spec: Any, wanted_spec: Any, source: str) -> None:
    """The SDK carries only some CustomJobSpec fields; refuse rather than drop the others."""
    sent, wanted = type(sent_spec).to_dict(sent_spec), type(wanted_spec).to_dict(wanted_spec)
    lost = sorted(k for k in wanted if wanted[k] != sent.get(k))
    if lost:
        raise UsageError(f"{source}: trainer.submit cannot send {', '.join(lost)}; "
                         "remove them or use gcloud ai custom-jobs create --config")


def request_json(parent: str, resource: Any) -> str:
    body = json.loads(type(resource).to_json(resource, use_integers_for_enums=False,
                                             always_print_fields_with_no_presence=False))
    kind = "customJob" if "jobSpec" in body else "hyperparameterTuningJob"
    return json.dumps({"parent": parent, kind: body}, indent=1)


def gcloud_command(spec_body: dict[str, Any], project: str, region: str, display_name: str,
                   spec_file: str = "verne-job.yaml") -> str:
    """Shell lines that make the same job with gcloud (the spec written next to it)."""
    text = yaml.safe_dump(spec_body, sort_keys=False)
    create = shlex.join(["gcloud", "ai", "custom-jobs", "create", f"--project={project}",
                         f"--region={region}", f"--display-name={display_name}", f"--config={spec_file}"])
    return f"cat > {spec_file} <<'EOF'\n{text}EOF\n{create}\n"


# --- command line ------------------------------------------------------------------------------

def _define_flags() -> None:
    flags.DEFINE_string("config", "config.yaml", "CustomJobSpec YAML to start from (gcloud's format).")
    flags.DEFINE_string("variant", None, "One of the commented variants in --config (e.g. multi_gpu).")
    flags.DEFINE_boolean("check_config", False, "Only check --config and all its variants, then exit.")
    flags.DEFINE_string("project", None, "Google Cloud project id.")
    flags.DEFINE_string("region", None, "Vertex AI region, e.g. us-central1.")
    flags.DEFINE_string("staging_bucket", None, "gs:// prefix where the sdist and job outputs go.")
    flags.DEFINE_string("display_name", None, "Job name in the console (default: verne-%JOB%).")
    flags.DEFINE_string("machine_type", None, "e.g. n1-standard-8, a2-highgpu-1g, g2-standard-8.")
    flags.DEFINE_string("accelerator", None, "e.g. NVIDIA_TESLA_T4, NVIDIA_L4, NVIDIA_TESLA_A100.")
    flags.DEFINE_integer("accelerator_count", None, "Accelerators per machine.")
    flags.DEFINE_integer("replicas", None, "Machines in total (more than 1: multi-worker training).")
    flags.DEFINE_string("tpu", None, f"Train on a TPU VM: {', '.join(TPU_MACHINES)}.")
    flags.DEFINE_string("tpu_topology", "2x2", "TPU slice topology (v5e 4 chips: 2x2).")
    flags.DEFINE_string("executor_image", None, "Prebuilt training image (default: config's).")
    flags.DEFINE_boolean("spot", False, "Use Spot VMs (cheaper; preempted jobs restart and resume).")
    flags.DEFINE_string("service_account", None, "Service account the job runs as.")
    flags.DEFINE_string("tensorboard", None, "Vertex TensorBoard: projects/P/locations/R/tensorboards/ID.")
    flags.DEFINE_boolean("dry_run", False, "Print the request and the gcloud command; send nothing.")
    flags.DEFINE_boolean("tune", False, "Hyperparameter tuning over trainer.tuning.SEARCH_SPACE.")
    flags.DEFINE_integer("max_trials", 12, "--tune: trials in total.")
    flags.DEFINE_integer("parallel_trials", 3, "--tune: trials at a time.")


def check_config_file(path: Path) -> list[str]:
    """Parses a config and every variant; returns their names ('' for the main spec)."""
    text = _read_config(path)
    load_config(text, str(path))
    variants = sorted(config_variants(text))
    for name in variants:
        load_config(text, str(path), name)
    return ["", *variants]


def _read_config(path: Path) -> str:
    if not path.is_file():
        raise UsageError(f"--config={path}: no such file; run from the verne checkout or pass --config")
    return path.read_text()


def _require(name: str, value: str | None) -> str:
    if not value:
        raise UsageError(f"--{name} is missing: trainer.submit needs --project, --region, --staging_bucket")
    return value


def plan(trainer_args: Sequence[str], config_args: Sequence[str], tune: bool,
         read_metadata: Callable[[str, str], Any]) -> tuple[list[str], HParams]:
    """The trainer's final args and the hparams they make, %JOB% resolved unless tuning (trials
    change the model's shape, so each trial's trainer names its own dir)."""
    args = list(trainer_args or config_args)
    hparams = trainer_hparams(args)
    if tune or JOB_PLACEHOLDER not in hparams.job_dir + hparams.summary_dir:
        return args, hparams
    resolved = resolve_trainer_hparams(hparams, read_metadata)
    return substitute_job_dirs(args, job_name(resolved)), resolved


@dataclasses.dataclass(frozen=True)
class SubmitOptions:
    """trainer.submit's own flags (the trainer's go after `--`)."""

    project: str = ""
    region: str = ""
    staging_bucket: str = ""
    config: str = "config.yaml"
    variant: str = ""
    display_name: str = ""
    machine_type: str = ""
    accelerator: str = ""
    accelerator_count: int = 0
    replicas: int = 0
    tpu: str = ""
    tpu_topology: str = "2x2"
    executor_image: str = ""
    spot: bool = False
    service_account: str = ""
    tensorboard: str = ""
    tune: bool = False
    max_trials: int = 12
    parallel_trials: int = 3


@dataclasses.dataclass
class Prepared:
    """Everything decided before anything is sent: the request is recorded, not yet made."""

    spec_body: dict[str, Any]
    display_name: str
    base_output_dir: str
    sdist: Path
    package_uri: str
    parent: str
    request: Any
    make_target: Callable[[Any], Any]
    launch: Callable[[Any], None]


def prepare(o: SubmitOptions, trainer_args: Sequence[str], out_dir: str,
            read_metadata: Callable[[str, str], Any]) -> Prepared:
    """Builds the sdist into out_dir and the job, and records the request the SDK would send."""
    from google.auth.credentials import AnonymousCredentials

    from trainer import tuning

    for name in ("project", "region", "staging_bucket"):
        _require(name, getattr(o, name))
    staging = o.staging_bucket.rstrip("/")
    if not staging.startswith("gs://"):
        raise UsageError(f"--staging_bucket={staging}: must be a gs:// path")
    config_path = Path(o.config)
    source = f"{config_path}" + (f" (variant {o.variant})" if o.variant else "")
    body = load_config(_read_config(config_path), str(config_path), o.variant or None)
    config_args = body["workerPoolSpecs"][0].get("pythonPackageSpec", {}).get("args", [])
    args, hparams = plan(trainer_args, config_args, o.tune, read_metadata)
    if o.tensorboard and hparams.summary_dir:
        raise UsageError("--tensorboard uploads only AIP_TENSORBOARD_LOG_DIR: drop --summary_dir "
                         "from the trainer flags (the trainer then writes there)")
    job_dir_known = bool(hparams.job_dir) and JOB_PLACEHOLDER not in hparams.job_dir
    default_name = hparams.job_dir.rstrip("/").split("/")[-1] if job_dir_known else (
        "tuning" if o.tune else "train")
    display_name = o.display_name or f"verne-{default_name}"
    # Vertex's AIP_* dirs land inside the job dir (model/, logs/), next to the checkpoints.
    base_output_dir = hparams.job_dir if job_dir_known else f"{staging}/jobs/{display_name}"

    sdist = build_sdist(out_dir)
    uri = package_uri(sdist, staging)
    overrides = Overrides(
        package_uri=uri, args=tuple(args), base_output_dir=base_output_dir,
        machine_type=o.machine_type, accelerator=o.accelerator, accelerator_count=o.accelerator_count,
        replicas=o.replicas, tpu=o.tpu, tpu_topology=o.tpu_topology, executor_image=o.executor_image,
        spot=o.spot, service_account=o.service_account, tensorboard=o.tensorboard, project=o.project)
    spec_body = apply_overrides(body, overrides)
    spec = parse_spec(spec_body, f"{source} with the command line's flags")
    kwargs = submit_kwargs(spec)

    def make_target(credentials: Any) -> Any:
        job = make_custom_job(spec, display_name, o.project, o.region, staging, credentials)
        if not o.tune:
            return job
        return tuning.make_tuning_job(job, display_name, o.max_trials, o.parallel_trials,
                                      o.project, o.region, credentials)

    def launch(job: Any) -> None:
        # A tuning job has no submit(): run() creates it, then follows it until it ends
        # (Ctrl-C stops following, not the job).
        if o.tune:
            job.run(sync=True, **kwargs)
        else:
            job.submit(**kwargs)

    # The SDK's own code path, recorded offline: what --dry_run prints is what gets sent.
    parent, request = record_request(make_target(AnonymousCredentials()), launch)
    check_carried(request.trial_job_spec if o.tune else request.job_spec, spec, source)
    return Prepared(spec_body, display_name, base_output_dir, sdist, uri, parent, request,
                    make_target, launch)


def submit(prepared: Prepared, storage_client: Any, credentials: Any = None) -> Any:
    """Stages the sdist and creates the job for real; returns the SDK job object."""
    upload(prepared.sdist, prepared.package_uri, storage_client)
    print(f"staged {prepared.package_uri}", flush=True)
    target = prepared.make_target(credentials)  # None: application-default credentials
    prepared.launch(target)
    return target


def options_from_flags(values: flags.FlagValues) -> SubmitOptions:
    names = [f.name for f in dataclasses.fields(SubmitOptions)]
    given = {name: values[name].value for name in names if values[name].value is not None}
    return SubmitOptions(**given)


def _read_metadata(data_dir: str, prefix: str) -> Any:
    from trainer import data  # deferred: TensorFlow loads only when %JOB% needs the data

    return data.read_metadata(data_dir, prefix)


def main(argv: list[str]) -> None:
    if flags.FLAGS.check_config:
        names = check_config_file(Path(flags.FLAGS.config))
        print(f"{flags.FLAGS.config}: the spec and variants {', '.join(n for n in names if n)} parse")
        return
    options = options_from_flags(flags.FLAGS)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(options, argv[1:], tmp, _read_metadata)
        if flags.FLAGS.dry_run:
            print(request_json(prepared.parent, prepared.request))
            if not options.tune:
                command = gcloud_command(prepared.spec_body, options.project, options.region,
                                         prepared.display_name)
                print("\n# The same job with gcloud:\n" + command)
            return
        from google.cloud import storage

        target = submit(prepared, storage.Client(project=options.project))
    print(f"created {target.resource_name}\njob dir: {prepared.base_output_dir}")


if __name__ == "__main__":
    _define_flags()
    app.run(run_cli(main))
