"""Train on Vertex AI: create a CustomJob that runs trainer.task in verne's own container image.

    python -m trainer.submit --project=P --region=us-central1 --staging_bucket=gs://B/staging \\
        [--config=config.yaml] [--variant=multi_worker] [--image=...] [--machine_type=...] \\
        [--accelerator=...] [--accelerator_count=N] [--replicas=N] [--tpu=v5e] [--spot] \\
        [--service_account=...] [--tensorboard=projects/P/locations/R/tensorboards/ID] \\
        [--dry_run] [--tune] \\
        -- --data_dir=gs://B/data --data_prefix=jules --job-dir=gs://B/job/%JOB% --layers=2 ...

Everything after `--` goes to trainer.task unchanged, except that `%JOB%` in --job-dir and
--summary_dir is resolved here exactly as the trainer resolves it (the flags through
trainer.flags, the data's metadata through trainer.checkpoints.resolve_hparams), so the printed
job dir is the one training will write; where the trainer itself decides the model's shape (a
tuning trial; --time_budget without the shape flags, trainer.choose) %JOB% is left for it to
resolve. Without trainer flags, the `args` of config.yaml are used.

Each worker pool runs a `containerSpec`: the image built from ./Dockerfile, which has verne
installed, with `python3 -m trainer.task ARGS`. Vertex's `pythonPackageSpec` must name one of
Vertex's prebuilt training images, and none of those has the Python 3.11 and TensorFlow 2.21
verne needs, so a spec using it is refused rather than sent to fail on the server.

The job spec starts from config.yaml (a camelCase CustomJobSpec, also usable with
`gcloud ai custom-jobs create --config`), flags override it, and the result is parsed by the
Vertex SDK's CustomJobSpec, which rejects unknown keys. `--dry_run` builds everything offline
and prints the exact request the SDK would send plus the equivalent gcloud command; nothing is
created and nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from absl import app, flags

from preprocessing import contract
from trainer.errors import UsageError, run_cli
from trainer.hparams import JOB_PLACEHOLDER, HParams, job_name

# --tpu name -> (machine type, topology). One TPU VM: TPUStrategy drives the chips of one host;
# multi-host slices would need a TPU pod runtime verne does not set up.
TPU_MACHINES = {"v5e": ("ct5lp-hightpu-4t", "2x2")}
# The image built from ./Dockerfile (docs/cloud.md). Its TensorFlow GPU build also runs on CPU-only
# machines; TPU VMs run the one built from ./Dockerfile.tpu by cloudbuild-tpu.yaml, on TensorFlow's
# TPU build (docs/cloud.md, "TPU"). MY_PROJECT becomes --project.
IMAGE_REPOSITORY = "us-central1-docker.pkg.dev/MY_PROJECT/verne/verne"
IMAGE = IMAGE_REPOSITORY + ":latest"
TPU_IMAGE = IMAGE_REPOSITORY + ":tpu"
# The Dockerfile sets no ENTRYPOINT (KFP gives pipeline steps their own command), so say it.
TRAINER_COMMAND = ["python3", "-m", "trainer.task"]
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
    check_containers(body, source)
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


def check_containers(body: dict[str, Any], source: str) -> None:
    """Every pool must run verne's container: the SDK accepts a pythonPackageSpec with any image,
    but Vertex runs one only on its prebuilt training images, none of which can install verne."""
    for i, pool in enumerate(body["workerPoolSpecs"]):
        if "pythonPackageSpec" in pool:
            raise UsageError(
                f"{source}: workerPoolSpecs[{i}] uses pythonPackageSpec, which runs only on Vertex's "
                "prebuilt images (none has Python 3.11 and TensorFlow 2.21); use containerSpec with "
                "the image built from ./Dockerfile (docs/cloud.md)")
        command = pool.get("containerSpec", {}).get("command")
        if command and list(command) != TRAINER_COMMAND:
            raise UsageError(f"{source}: workerPoolSpecs[{i}].containerSpec.command must be "
                             f"{TRAINER_COMMAND} (trainer.submit resolves trainer.task's flags)")


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


def chosen_there(args: Sequence[str], hparams: HParams) -> bool:
    """Whether the trainer will choose the model's shape for --time_budget (trainer.choose)."""
    from trainer.choose import chooses_shape
    from trainer.flags import define_hparams_flags, explicitly_set

    values = flags.FlagValues()
    define_hparams_flags(values)
    values(["trainer.task", *args])
    return chooses_shape(hparams, explicitly_set(values))


def resolve_trainer_hparams(hparams: HParams, read_metadata: Callable[[str, str], Any]) -> HParams:
    """`hparams` with %JOB% resolved as the trainer will. With --language_model given that needs
    nothing else (and no network) — bpe/unigram also need --vocab_size, which is in the name;
    otherwise the data's metadata names it, when it can be read."""
    if hparams.language_model is not None and (hparams.vocab_size
                                               or hparams.language_model not in contract.SUBWORD_TOKENIZERS):
        return hparams.replace(job_dir=_resolved(hparams.job_dir, hparams),
                               summary_dir=_resolved(hparams.summary_dir, hparams))
    try:
        metadata = read_metadata(hparams.data_dir, hparams.data_prefix)
    except Exception as err:  # unreachable data of any kind (gs:// offline, no file) gets one advice
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"cannot name %JOB% from the data ({reason}); pass --language_model "
                         "(and --vocab_size for bpe/unigram) after -- or make --data_dir readable") from None
    from trainer.checkpoints import resolve_hparams  # the trainer's own resolution, checks included

    return resolve_hparams(hparams, metadata)


def _resolved(path: str, hparams: HParams) -> str:
    return path.replace(JOB_PLACEHOLDER, job_name(hparams))


def map_job_dirs(args: Sequence[str], change: Callable[[str], str]) -> list[str]:
    """`args` with `change` applied to the values of --job-dir/--job_dir/--summary_dir only."""
    out = list(args)
    for i, arg in enumerate(out):
        flag, has_value, value = arg.partition("=")
        if flag in _JOB_DIR_FLAGS and has_value:
            out[i] = f"{flag}={change(value)}"
        elif i > 0 and out[i - 1] in _JOB_DIR_FLAGS:
            out[i] = change(arg)
    return out


def substitute_job_dirs(args: Sequence[str], name: str) -> list[str]:
    """`args` with %JOB% replaced by `name` in the job and summary dirs (the trainer resolves it
    nowhere else)."""
    return map_job_dirs(args, lambda value: value.replace(JOB_PLACEHOLDER, name))


def study_id(now: datetime.datetime) -> str:
    """Names one tuning submission. Trial ids restart at 1 in every study, so without it a second
    study's trial 3 would resume the first study's trial-3 checkpoints."""
    return f"study-{now.astimezone(datetime.UTC):%Y%m%d-%H%M%S}"


# --- the job spec ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Overrides:
    """What the command line changes in the spec from config.yaml."""

    args: tuple[str, ...]
    base_output_dir: str
    machine_type: str = ""
    accelerator: str = ""
    accelerator_count: int = 0
    replicas: int = 0
    tpu: str = ""
    image: str = ""
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
    if o.tpu:
        if o.tpu not in TPU_MACHINES:
            raise UsageError(f"--tpu={o.tpu}: choose one of {', '.join(TPU_MACHINES)}")
        if o.accelerator or o.accelerator_count:
            raise UsageError(f"--tpu={o.tpu} takes no --accelerator/--accelerator_count: "
                             "the TPU machine type names its chips")
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
            machine_type, topology = TPU_MACHINES[o.tpu]
            machine.update(machineType=machine_type, tpuTopology=topology)
        container = pool.setdefault("containerSpec", {})
        image = o.image or (TPU_IMAGE if o.tpu else container.get("imageUri") or IMAGE)
        container.update(imageUri=image.replace("MY_PROJECT", o.project or "MY_PROJECT"),
                         command=list(TRAINER_COMMAND), args=list(o.args))
    check_single_tpu_host(pools, o)
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
    if spec.get("tensorboard") and not spec.get("serviceAccount"):
        # Vertex uploads to a TensorBoard instance only as an attached service account.
        raise UsageError("--tensorboard needs --service_account=SA@PROJECT.iam.gserviceaccount.com "
                         "(Vertex TensorBoard uploads as that account; docs/cloud.md, TensorBoard)")
    return spec


def check_single_tpu_host(pools: Sequence[dict[str, Any]], o: Overrides) -> None:
    """A TPU job runs on one TPU VM: more replicas would each start their own TPUStrategy and
    train separate copies that overwrite each other's checkpoints."""
    tpu_pools = [p for p in pools if p.get("machineSpec", {}).get("tpuTopology")]
    replicas = sum(int(p.get("replicaCount", 1)) for p in pools)
    if tpu_pools and replicas > 1:
        flag = f"--tpu={o.tpu} with --replicas={o.replicas}" if o.tpu and o.replicas else (
            f"a TPU machine in {replicas} replicas")
        raise UsageError(f"{flag}: verne trains on one TPU VM (multi-host TPU slices are not "
                         "supported); use one replica, or GPUs for several machines")


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


def request_body(resource: Any) -> dict[str, Any]:
    """A job resource as the REST API's camelCase JSON, only the fields that are set."""
    return json.loads(type(resource).to_json(resource, use_integers_for_enums=False,
                                             always_print_fields_with_no_presence=False))


def request_json(parent: str, resource: Any) -> str:
    body = request_body(resource)
    kind = "customJob" if "jobSpec" in body else "hyperparameterTuningJob"
    return json.dumps({"parent": parent, kind: body}, indent=1)


def gcloud_command(config_body: dict[str, Any], project: str, region: str, display_name: str,
                   tune: bool = False) -> str:
    """Shell lines that make the same job with gcloud, its --config written by a here-document:
    a CustomJobSpec for custom-jobs, the HyperparameterTuningJob itself for hp-tuning-jobs."""
    group, spec_file = ("hp-tuning-jobs", "verne-tuning.yaml") if tune else (
        "custom-jobs", "verne-job.yaml")
    text = yaml.safe_dump(config_body, sort_keys=False)
    create = shlex.join(["gcloud", "ai", group, "create", f"--project={project}",
                         f"--region={region}", f"--display-name={display_name}",
                         f"--config={spec_file}"])
    return f"cat > {spec_file} <<'EOF'\n{text}EOF\n{create}\n"


def gcloud_config(prepared: Prepared) -> dict[str, Any]:
    """What gcloud's --config takes for the prepared job (--display-name is given apart)."""
    if "trialJobSpec" not in (body := request_body(prepared.request)):
        return prepared.spec_body
    # The trial spec as built (plain numbers), not as JSON-encoded (int64s become strings).
    return {**{key: value for key, value in body.items() if key != "displayName"},
            "trialJobSpec": prepared.spec_body}


# --- command line ------------------------------------------------------------------------------

def _define_flags() -> None:
    flags.DEFINE_string("config", "config.yaml", "CustomJobSpec YAML to start from (gcloud's format).")
    flags.DEFINE_string("variant", None, "One of the commented variants in --config (e.g. multi_gpu).")
    flags.DEFINE_boolean("check_config", False, "Only check --config and all its variants, then exit.")
    flags.DEFINE_string("project", None, "Google Cloud project id.")
    flags.DEFINE_string("region", None, "Vertex AI region, e.g. us-central1.")
    flags.DEFINE_string("staging_bucket", None,
                        "gs:// prefix for the SDK and for job outputs when --job-dir names none.")
    flags.DEFINE_string("display_name", None, "Job name in the console (default: verne-%JOB%).")
    flags.DEFINE_string("image", None, "Container image with verne installed (default: the config's; "
                        f"with --tpu {TPU_IMAGE}).")
    flags.DEFINE_string("machine_type", None, "e.g. n1-standard-8, a2-highgpu-1g, g2-standard-8.")
    flags.DEFINE_string("accelerator", None, "e.g. NVIDIA_TESLA_T4, NVIDIA_L4, NVIDIA_TESLA_A100.")
    flags.DEFINE_integer("accelerator_count", None, "Accelerators per machine.")
    flags.DEFINE_integer("replicas", None, "Machines in total (more than 1: multi-worker training).")
    flags.DEFINE_string("tpu", None, f"Train on one TPU VM: {', '.join(TPU_MACHINES)}.")
    flags.DEFINE_boolean("spot", False, "Use Spot VMs (cheaper; preempted jobs restart and resume).")
    flags.DEFINE_string("service_account", None, "Service account the job runs as.")
    flags.DEFINE_string("tensorboard", None, "Vertex TensorBoard: projects/P/locations/R/tensorboards/ID "
                        "(needs --service_account).")
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
         read_metadata: Callable[[str, str], Any], study: str = "") -> tuple[list[str], HParams]:
    """The trainer's final args and the hparams they make. %JOB% is resolved unless tuning (trials
    change the model's shape, so each trial's trainer names its own dir); a tuning study's job
    and summary dirs get `/<study>` so no trial resumes another study's checkpoints."""
    args = list(trainer_args or config_args)
    if tune:
        if not study:
            raise ValueError("tuning needs a study id")
        args = map_job_dirs(args, lambda value: f"{value.rstrip('/')}/{study}")
    hparams = trainer_hparams(args)
    # --time_budget without the shape: the trainer chooses it on its machine (trainer.choose), so
    # it names %JOB% too, as a tuning trial does.
    if tune or JOB_PLACEHOLDER not in hparams.job_dir + hparams.summary_dir or chosen_there(args, hparams):
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
    image: str = ""
    machine_type: str = ""
    accelerator: str = ""
    accelerator_count: int = 0
    replicas: int = 0
    tpu: str = ""
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
    parent: str
    request: Any
    make_target: Callable[[Any], Any]
    launch: Callable[[Any], None]


def prepare(o: SubmitOptions, trainer_args: Sequence[str], read_metadata: Callable[[str, str], Any],
            now: datetime.datetime | None = None) -> Prepared:
    """Builds the job and records the request the SDK would send; `now` names a tuning study."""
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
    config_args = body["workerPoolSpecs"][0].get("containerSpec", {}).get("args", [])
    study = study_id(now or datetime.datetime.now(datetime.UTC)) if o.tune else ""
    args, hparams = plan(trainer_args, config_args, o.tune, read_metadata, study)
    if o.tensorboard and hparams.summary_dir:
        raise UsageError("--tensorboard uploads only AIP_TENSORBOARD_LOG_DIR: drop --summary_dir "
                         "from the trainer flags (the trainer then writes there)")
    job_dir_known = bool(hparams.job_dir) and JOB_PLACEHOLDER not in hparams.job_dir
    default_name = hparams.job_dir.rstrip("/").split("/")[-1] if job_dir_known and not o.tune else (
        "tuning" if o.tune else "train")
    display_name = o.display_name or f"verne-{default_name}"
    # Vertex's AIP_* dirs land inside the job dir (model/, logs/), next to the checkpoints.
    base_output_dir = hparams.job_dir if job_dir_known else "/".join(
        filter(None, [f"{staging}/jobs/{display_name}", study]))
    overrides = Overrides(
        args=tuple(args), base_output_dir=base_output_dir, machine_type=o.machine_type,
        accelerator=o.accelerator, accelerator_count=o.accelerator_count, replicas=o.replicas,
        tpu=o.tpu, image=o.image, spot=o.spot, service_account=o.service_account,
        tensorboard=o.tensorboard, project=o.project)
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
    return Prepared(spec_body, display_name, base_output_dir, parent, request, make_target, launch)


@contextlib.contextmanager
def google_errors(project: str) -> Iterator[None]:
    """Turns what Google's clients raise for a fixable set-up problem (no or stale credentials,
    no permission, a missing bucket or project) into one UsageError line with the fix."""
    from google.api_core import exceptions as api
    from google.auth import exceptions as auth

    login = "run `gcloud auth application-default login`"
    try:
        yield
    except auth.DefaultCredentialsError:
        raise UsageError(f"no Google Cloud credentials: {login} (or set "
                         "GOOGLE_APPLICATION_CREDENTIALS to a key file)") from None
    except auth.RefreshError as err:
        raise UsageError(f"the credentials were refused ({_first_line(err)}): {login} again") from None
    except api.Forbidden as err:
        raise UsageError(f"permission denied ({_first_line(err)}): the account needs "
                         f"roles/aiplatform.user and access to the bucket in project {project}, "
                         "and the Vertex AI API enabled (docs/cloud.md, step 1)") from None
    except api.NotFound as err:
        raise UsageError(f"not found ({_first_line(err)}): check --project={project}, --region "
                         "and the image name") from None
    except api.GoogleAPICallError as err:
        raise UsageError(f"Google Cloud refused the request: {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def check_bucket(uri: str, storage_client: Any, region: str) -> None:
    """The job writes under `uri`; a missing bucket would fail it only after the machines start."""
    bucket = uri.removeprefix("gs://").split("/", 1)[0]
    if storage_client.lookup_bucket(bucket) is None:
        raise UsageError(f"gs://{bucket} does not exist: create it with "
                         f"`gcloud storage buckets create gs://{bucket} --location={region}`")


def submit(prepared: Prepared, storage_client: Any, region: str, credentials: Any = None) -> Any:
    """Checks the output bucket and creates the job for real; returns the SDK job object."""
    check_bucket(prepared.base_output_dir, storage_client, region)
    target = prepared.make_target(credentials)  # None: application-default credentials
    prepared.launch(target)
    return target


def submit_with_default_credentials(prepared: Prepared, project: str, region: str) -> Any:
    """`submit` with the application-default credentials, set-up problems as one-line errors."""
    from google.cloud import storage

    with google_errors(project):
        return submit(prepared, storage.Client(project=project), region)


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
    prepared = prepare(options, argv[1:], _read_metadata)
    if flags.FLAGS.dry_run:
        print(request_json(prepared.parent, prepared.request))
        command = gcloud_command(gcloud_config(prepared), options.project, options.region,
                                 prepared.display_name, tune=options.tune)
        print("\n# The same job with gcloud:\n" + command)
        return
    target = submit_with_default_credentials(prepared, options.project, options.region)
    print(f"created {target.resource_name}\njob dir: {prepared.base_output_dir}")


if __name__ == "__main__":
    _define_flags()
    app.run(run_cli(main))
