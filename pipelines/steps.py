"""What each pipeline step does, as plain functions that the KFP components call.

The components (pipelines/components.py) only move values between KFP artifacts and these
functions; these functions only translate between the pipeline's parameters and the real entry
points (`preprocessing.run`, `trainer.runner`, `trainer.evaluate`, `trainer.babble`). Nothing
here trains, evaluates or generates by itself, so a pipeline run and a command-line run give the
same results. Heavy imports (TensorFlow, Beam) happen inside the functions: a step pays only
for what it uses.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import posixpath
import re
from typing import Any

from trainer.errors import UsageError
from trainer.hparams import HParams

# Written last into a published model directory: readers trust a directory only when it is there.
PUBLISHED_MANIFEST = "PUBLISHED.json"
# The pipeline decides where data and checkpoints go; users choose everything else (a
# --summary_dir too, e.g. gs://… for Vertex AI TensorBoard; by default it is JOB_DIR/tensorboard).
PIPELINE_OWNED_HPARAMS = ("data_dir", "data_prefix", "job_dir", "vocab_size")
GATE_METRICS = ("loss", "perplexity", "bpc")
EVALUATION_NUMBERS = ("loss", "perplexity", "bpc", "bits_per_token", "loss_per_char", "bits_per_char",
                      "tokens", "step")


# The size of Vertex AI's default machine for a step (e2-standard-4): what the train step gets
# unless a run asks for more.
DEFAULT_CPU_LIMIT = "4"
DEFAULT_MEMORY_LIMIT = "16G"
# KFP's own rules for these strings (kfp.dsl.PipelineTask.set_cpu_limit / set_memory_limit); KFP
# checks only constants, and ours reach it as pipeline parameters, so they are checked here.
_CPU = re.compile(r"([0-9]*[.])?[0-9]+m?")
_MEMORY = re.compile(r"[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?")


def check_machine(cpu_limit: str, memory_limit: str, accelerator_type: str,
                  accelerator_limit: int, accelerated: bool) -> None:
    """A ValueError naming the flag when the machine is not one KFP and Vertex AI accept.

    `accelerated` says whether the compiled spec asks for an accelerator: a spec without one
    cannot get one from its parameters, so asking for one there is refused rather than ignored.
    """
    if not _CPU.fullmatch(cpu_limit):
        raise ValueError(f"--train_cpu_limit={cpu_limit!r}: give a number of CPUs, e.g. 8 or 500m")
    if not _MEMORY.fullmatch(memory_limit):
        raise ValueError(f"--train_memory_limit={memory_limit!r}: give a size, e.g. 32G or 8Gi")
    if accelerator_limit < 0:
        raise ValueError(f"--train_accelerator_limit={accelerator_limit}: must be ≥ 0")
    if accelerator_limit and not accelerator_type:
        raise ValueError("--train_accelerator_limit needs --train_accelerator_type "
                         "(e.g. NVIDIA_TESLA_T4)")
    if accelerator_type and not accelerated:
        raise ValueError(f"train_accelerator_type={accelerator_type!r}: this pipeline spec was "
                         "compiled without an accelerator; compile it with "
                         "--train_accelerator_type to let runs choose one")
    if accelerated and not accelerator_type:
        raise ValueError("train_accelerator_type is empty, but this pipeline spec asks for an "
                         "accelerator; give one (e.g. NVIDIA_L4) or compile without "
                         "--train_accelerator_type")
    if accelerated and accelerator_limit < 1:
        raise ValueError(f"--train_accelerator_limit={accelerator_limit}: this pipeline spec asks "
                         "for an accelerator; give at least 1")


def check_run_machine(cpu_limit: str, memory_limit: str, accelerator_type: str,
                      accelerator_limit: int, accelerated: bool) -> None:
    """check_machine on a run's parameter values (JSON: the count may arrive as a float)."""
    try:
        check_machine(cpu_limit, memory_limit, accelerator_type, int(accelerator_limit),
                      accelerated)
    except ValueError as err:
        raise UsageError(str(err)) from None


def location(uri: str, path: str) -> str:
    """Where a step reads or writes an artifact.

    On Vertex AI an artifact's `uri` is gs://… and its `path` the same object through a GCS
    FUSE mount (/gcs/…); TensorFlow and Beam speak gs:// natively and faster than FUSE, so they
    get the uri. Locally (kfp.local) both are the same directory.
    """
    return uri if uri.startswith("gs://") else path


def preprocess_argv(corpus: str, data_prefix: str, tokenizer: str, extra_args: list[str],
                    output_dir: str) -> list[str]:
    """The `python -m preprocessing.run` command line of the preprocess step."""
    return ["--input", corpus, "--output_dir", output_dir, "--data_prefix", data_prefix,
            "--tokenizer", tokenizer, *extra_args]


def preprocess(corpus: str, data_prefix: str, tokenizer: str, extra_args: list[str],
               output_dir: str) -> dict[str, Any]:
    """Runs the Beam job exactly as `python -m preprocessing.run` would; returns artifact metadata."""
    from preprocessing.run import run_preprocessing

    metadata = run_preprocessing(preprocess_argv(corpus, data_prefix, tokenizer, extra_args,
                                                 output_dir))
    return {
        "data_prefix": data_prefix,
        "tokenizer": metadata.tokenizer,
        "vocab_size": metadata.vocab_size,
        "documents": metadata.documents,
        **{f"{split}_tokens": stats.tokens for split, stats in metadata.splits.items()},
    }


def coerce_hparams(values: dict[str, Any]) -> dict[str, Any]:
    """Pipeline values (JSON: every number may arrive as a float) typed as HParams declares them.

    Unknown names and pipeline-owned names are a UsageError naming them.
    """
    fields = {f.name: f for f in dataclasses.fields(HParams)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UsageError(f"hparams: unknown hyperparameters {unknown}; see python -m trainer.task --help")
    owned = sorted(set(values) & set(PIPELINE_OWNED_HPARAMS))
    if owned:
        raise UsageError(f"hparams: {owned} are set by the pipeline; drop them")
    typed = {}
    for name, value in values.items():
        default = fields[name].default
        typed[name] = _coerce(name, value, type(default) if default is not None else str)
    return typed


def _coerce(name: str, value: Any, kind: type) -> Any:
    if value is None:
        return None
    if kind is bool:
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes")
        return bool(value)
    if kind is int:
        if float(value) != int(float(value)):
            raise UsageError(f"hparams: {name}={value!r} must be a whole number")
        return int(float(value))
    return kind(value)


def build_hparams(data_dir: str, data_prefix: str, job_dir: str, values: dict[str, Any]) -> HParams:
    """The HParams a `python -m trainer.task` run with the same flags would get."""
    try:
        return HParams(**coerce_hparams(values), data_dir=data_dir, data_prefix=data_prefix,
                       job_dir=job_dir).validate()
    except ValueError as err:
        raise UsageError(str(err)) from None


def given_fields(hparams: dict[str, Any], values: dict[str, Any]) -> frozenset[str]:
    """The HParams fields a run sets itself, as trainer.flags.explicitly_set says of the command
    line: every name in its `hparams` dict, and each pipeline parameter in `values` that differs
    from HParams' default. (The pipeline's parameters always carry a value, so one left at its
    default cannot be told from one given as the default; it counts as not given, which lets
    --time_budget choose the model.)"""
    defaults = HParams()
    return frozenset(hparams) | {name for name, value in values.items()
                                 if hasattr(defaults, name) and value != getattr(defaults, name)}


def train(hparams: HParams, given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Trains into hparams.job_dir with the trainer's own runner; returns artifact metadata.
    With --time_budget the model is chosen as trainer.task chooses it, `given` (given_fields)
    kept as set.

    A run stopped by SIGTERM (preemption) raises, so the step fails and is retried (resuming
    from the job dir) rather than handing a half-trained model to evaluation.
    """
    from trainer import budget, checkpoints, choose, runner
    from trainer.hparams import job_name

    chooser = choose.ForBudget(given) if hparams.time_budget else None
    # --time_budget counts from the start of the step's process (KFP runs one per step).
    result = runner.train(hparams, started=budget.process_start(), choose=chooser)
    print(runner.describe(result), flush=True)
    if result.stopped != "finished":
        raise RuntimeError(f"training {result.stopped} at step {result.step}; rerun to resume")
    saved = checkpoints.saved_hparams(result.job_dir)
    return {"job_name": job_name(saved), "language_model": result.language_model,
            "step": result.step, "epoch": result.epoch, "cell": saved.cell,
            "layers": saved.layers, "vocab_size": saved.vocab_size,
            "tokens_per_second": round(result.tokens_per_second, 1)}


def evaluate(job_dir: str, split: str, best: bool) -> dict[str, float]:
    """trainer.evaluate's numbers for a whole split, plus `bpc` for the quality gate.

    trainer.evaluate names the bits `bpc` for char/byte models and `bits_per_token` for word
    models; the gate reads one name, so `bpc` carries bits per token whatever the token is.
    """
    from trainer.evaluate import evaluate as run_evaluation

    # write=False: the job dir is the train step's artifact, which this step only reads; the
    # scores go into this step's own Metrics artifact.
    result = run_evaluation(job_dir, split=split, best=best, write=False)
    numbers = {name: float(result[name]) for name in EVALUATION_NUMBERS if name in result}
    numbers.setdefault("bpc", numbers.get("bits_per_token", math.nan))
    missing = [name for name in GATE_METRICS if math.isnan(numbers.get(name, math.nan))]
    if missing:
        raise RuntimeError(f"trainer.evaluate gave no {missing} for {job_dir}: {sorted(result)}")
    return numbers


def sample(job_dir: str, num_samples: int, length: int, temperature: float, prime: str,
           seed: int, best: bool = False) -> list[str]:
    """num_samples texts from the job dir's latest (or best) checkpoint: exactly what
    `python -m trainer.babble` with the same settings generates, checks included."""
    from trainer.babble import generate_from_job

    return generate_from_job(job_dir, prime=prime, length=int(length),
                             num_samples=int(num_samples), temperature=temperature,
                             seed=int(seed), best=best)


def samples_markdown(samples: list[str], job_dir: str, metrics: dict[str, float]) -> str:
    """The samples as a Markdown page (the Vertex AI console renders Markdown artifacts)."""
    scores = ", ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items()))
    lines = [f"# Samples from `{job_dir}`", "", f"Evaluation: {scores}", ""]
    for number, text in enumerate(samples, 1):
        # A fence longer than any run of backticks in the text keeps the text verbatim.
        fence = "`" * max(3, _longest_backtick_run(text) + 1)
        lines += [f"## Sample {number}", "", fence + "text", text, fence, ""]
    return "\n".join(lines)


def _longest_backtick_run(text: str) -> int:
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return longest


def rejection_markdown(metric: str, value: float, threshold: float, job_dir: str) -> str:
    """Why the quality gate kept a model from being published."""
    return (f"# Not published\n\nThe evaluated {metric} {value:.6g} of `{job_dir}` does not beat "
            f"the quality threshold {threshold:.6g} (publishing needs {metric} < {threshold:.6g}).\n")


def publish_destination(publish_uri: str, model_name: str, run_name: str) -> str:
    if not publish_uri:
        raise UsageError("publish_uri is empty; give --publish_uri (default PIPELINE_ROOT/models)")
    return "/".join([publish_uri.rstrip("/"), model_name, run_name])


def publish(job_dir: str, destination: str, metrics: dict[str, float],
            best: bool = False) -> dict[str, Any]:
    """Copies the job dir to `destination` with a SavedModel of the evaluated checkpoint in it,
    then writes PUBLISHED.json as the commit marker.

    The SavedModel is the one training exported (JOB_DIR/export, or export-best for `best`);
    a job dir without one gets it from trainer.export. A copy that dies half-way leaves no
    manifest, so nothing trusts it; an existing manifest is never overwritten (a published
    model is immutable).
    """
    import tensorflow as tf

    from trainer import export

    manifest_path = posixpath.join(destination, PUBLISHED_MANIFEST)
    if tf.io.gfile.exists(manifest_path):
        raise UsageError(f"{destination} is already a published model; publish to a new place")
    files = _copy_tree(job_dir, destination)
    saved_model = export.BEST_EXPORT_DIR if best else export.EXPORT_DIR
    if not tf.io.gfile.exists(posixpath.join(job_dir, saved_model, "saved_model.pb")):
        export.export_job(job_dir, best=best, export_dir=posixpath.join(destination, saved_model))
        files = sorted(set(files) | set(_list_tree(posixpath.join(destination, saved_model), saved_model)))
    manifest = {"source": job_dir, "saved_model": saved_model, "files": files, "metrics": metrics,
                "published": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    temporary = manifest_path + ".tmp"
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tf.io.gfile.rename(temporary, manifest_path, overwrite=True)
    return {"source": job_dir, "saved_model": posixpath.join(destination, saved_model),
            "files": len(files), **metrics}


def _list_tree(root: str, prefix: str = "") -> list[str]:
    """Relative paths of every file under `root` (local or gs://), each starting with `prefix`."""
    import tensorflow as tf

    root = root.rstrip("/")
    found = []
    for directory, _, names in tf.io.gfile.walk(root):
        relative_dir = posixpath.join(prefix, directory.rstrip("/")[len(root):].lstrip("/"))
        found += [posixpath.normpath(posixpath.join(relative_dir, name)) for name in names]
    return sorted(found)


def _copy_tree(source: str, destination: str) -> list[str]:
    import tensorflow as tf

    files = _list_tree(source)
    for relative in files:
        target = posixpath.join(destination, relative)
        tf.io.gfile.makedirs(posixpath.dirname(target))
        tf.io.gfile.copy(posixpath.join(source.rstrip("/"), relative), target, overwrite=True)
    return files


def write_text(path: str, text: str) -> None:
    """Writes a file artifact (a local path, or GCS FUSE on Vertex) through a temporary name."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)
