"""The one pipeline factory: preprocess → train → evaluate → (quality gate) → sample + publish.

`create_pipeline(...)` takes what must be fixed when the pipeline is compiled (the image, whether
the train step asks for an accelerator, which metric the gate reads); everything a user changes
from run to run is a pipeline parameter, the train step's CPUs, memory and accelerator type and
count included. The local runner (kfp.local) and the Vertex AI runner use the same
pipeline and differ only in where things go (pipelines/run.py).

No `from __future__ import annotations` here: KFP reads the pipeline's annotations as live types.
"""

import dataclasses
from typing import Any

from kfp import dsl

from pipelines.components import Components, build_components
from pipelines.steps import DEFAULT_CPU_LIMIT, DEFAULT_MEMORY_LIMIT, GATE_METRICS, check_machine
from trainer.hparams import HParams

PIPELINE_NAME = "verne-train"
DEFAULT_IMAGE = "verne:latest"
_DEFAULTS = HParams()


@dataclasses.dataclass(frozen=True)
class Resources:
    """The train step's machine on Vertex AI (kfp.local ignores it).

    Each value is the default of a pipeline parameter (train_cpu_limit, train_memory_limit,
    train_accelerator_type, train_accelerator_limit), so one compiled spec serves runs on
    different machines. Whether the spec asks for an accelerator at all is fixed when compiling,
    by a non-empty accelerator_type: KFP cannot leave an accelerator out at run time (an empty
    type is not a documented Vertex AI value, and choosing between two train tasks with
    dsl.If + dsl.OneOf does not run under kfp.local 2.17). accelerator_type takes Vertex's names,
    e.g. NVIDIA_TESLA_T4, NVIDIA_L4, TPU_V5_LITEPOD.
    """

    cpu_limit: str = DEFAULT_CPU_LIMIT
    memory_limit: str = DEFAULT_MEMORY_LIMIT
    accelerator_type: str = ""
    accelerator_limit: int = 0

    @property
    def accelerated(self) -> bool:
        return bool(self.accelerator_type)

    def validate(self) -> "Resources":
        """Checked, with the count a type implies (one accelerator unless told otherwise)."""
        limit = self.accelerator_limit or (1 if self.accelerated else 0)
        resources = dataclasses.replace(self, accelerator_limit=limit)
        check_machine(resources.cpu_limit, resources.memory_limit, resources.accelerator_type,
                      resources.accelerator_limit, accelerated=resources.accelerated)
        return resources


def apply_resources(task: dsl.PipelineTask, machine: dict[str, Any],
                    accelerated: bool) -> dsl.PipelineTask:
    """Asks for the machine through the pipeline parameters in `machine`, so a run may change it."""
    task.set_cpu_limit(machine["train_cpu_limit"])
    task.set_memory_limit(machine["train_memory_limit"])
    if accelerated:
        task.set_accelerator_type(machine["train_accelerator_type"])
        task.set_accelerator_limit(machine["train_accelerator_limit"])
    return task


def add_quality_gate(components: Components, model: Any, scores: dict[str, Any],
                     gate_metric: str, quality_threshold: Any, sample_args: dict[str, Any],
                     publish_uri: Any, best: Any) -> None:
    """Sample and publish only when the evaluated `gate_metric` is below the threshold.

    Lower is better for every gate metric (loss, perplexity, bits per token). The Else branch
    writes a report saying why nothing was published, so a run always explains itself.
    """
    value = scores[gate_metric]
    with dsl.If(value < quality_threshold, name="quality-passed"):
        components.sample(model=model, best=best, **sample_args, **scores)
        components.publish(model=model, publish_uri=publish_uri, best=best,
                           run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, **scores)
    with dsl.Else(name="quality-failed"):
        components.not_published(model=model, metric=gate_metric, value=value,
                                 threshold=quality_threshold)


def create_pipeline(image: str = DEFAULT_IMAGE, resources: Resources = Resources(),
                    gate_metric: str = "bpc", name: str = PIPELINE_NAME) -> Any:
    """Returns the pipeline function (compile it, run it under kfp.local, or submit it)."""
    if gate_metric not in GATE_METRICS:
        raise ValueError(f"--gate_metric={gate_metric!r}: choose one of {', '.join(GATE_METRICS)}")
    resources = resources.validate()
    components = build_components(image)

    @dsl.pipeline(name=name, description="verne: preprocess → train → evaluate → sample/publish")
    def verne_pipeline(
        corpus: str,
        publish_uri: str,
        data_prefix: str = "corpus",
        tokenizer: str = "char",
        preprocess_args: list = [],  # noqa: B006 - KFP reads defaults from the signature
        cell: str = _DEFAULTS.cell,
        layers: int = _DEFAULTS.layers,
        lstm_state_size: int = _DEFAULTS.lstm_state_size,
        embedding_size: int = _DEFAULTS.embedding_size,
        unroll_steps: int = _DEFAULTS.unroll_steps,
        batch_size: int = _DEFAULTS.batch_size,
        epochs: int = _DEFAULTS.epochs,
        max_steps: int = _DEFAULTS.max_steps,
        time_budget: str = _DEFAULTS.time_budget,  # e.g. "1h": the train step's wall clock
        learning_rate: float = _DEFAULTS.learning_rate,
        hparams: dict = {},  # noqa: B006 - any other HParams field, e.g. {"dropout": 0.2}
        eval_split: str = "test",
        eval_best: bool = False,
        quality_threshold: float = 4.0,
        num_samples: int = 3,
        sample_length: int = 500,
        temperature: float = 0.8,
        prime: str = "",
        seed: int = 1,
        train_cpu_limit: str = resources.cpu_limit,
        train_memory_limit: str = resources.memory_limit,
        train_accelerator_type: str = resources.accelerator_type,
        train_accelerator_limit: int = resources.accelerator_limit,
    ):
        data = components.preprocess(corpus=corpus, data_prefix=data_prefix, tokenizer=tokenizer,
                                     preprocess_args=preprocess_args)
        machine = {"train_cpu_limit": train_cpu_limit, "train_memory_limit": train_memory_limit,
                   "train_accelerator_type": train_accelerator_type,
                   "train_accelerator_limit": train_accelerator_limit}
        # The step gets its machine's parameters too, to refuse one the spec cannot give it.
        training = apply_resources(components.train(
            dataset=data.outputs["dataset"], cell=cell, layers=layers,
            lstm_state_size=lstm_state_size, embedding_size=embedding_size,
            unroll_steps=unroll_steps, batch_size=batch_size, epochs=epochs, max_steps=max_steps,
            time_budget=time_budget, learning_rate=learning_rate, seed=seed, hparams=hparams, **machine,
            accelerated=resources.accelerated), machine, resources.accelerated)
        model = training.outputs["model"]
        evaluation = components.evaluate(model=model, split=eval_split, best=eval_best)
        sample_args = {"num_samples": num_samples, "length": sample_length,
                       "temperature": temperature, "prime": prime, "seed": seed}
        scores = {name: evaluation.outputs[name] for name in GATE_METRICS}
        add_quality_gate(components, model, scores, gate_metric, quality_threshold,
                         sample_args, publish_uri, eval_best)

    return verne_pipeline


def create_gate_pipeline(image: str = DEFAULT_IMAGE, gate_metric: str = "bpc") -> Any:
    """The quality gate alone, on an existing job dir and given scores.

    Re-runs the gate of a finished run with another threshold without retraining (and lets the
    tests drive both branches cheaply); `add_quality_gate` is the same code the full pipeline uses.
    """
    components = build_components(image)

    @dsl.pipeline(name=f"{PIPELINE_NAME}-gate")
    def gate_pipeline(job_dir: str, job_name: str, publish_uri: str, loss: float,
                      perplexity: float, bpc: float, quality_threshold: float,
                      num_samples: int = 3, sample_length: int = 500, temperature: float = 0.8,
                      prime: str = "", seed: int = 1, best: bool = False):
        model = dsl.importer(artifact_uri=job_dir, artifact_class=dsl.Model, reimport=False,
                             metadata={"job_name": job_name}).output
        scores = {"loss": loss, "perplexity": perplexity, "bpc": bpc}
        sample_args = {"num_samples": num_samples, "length": sample_length,
                       "temperature": temperature, "prime": prime, "seed": seed}
        add_quality_gate(components, model, scores, gate_metric, quality_threshold,
                         sample_args, publish_uri, best)

    return gate_pipeline
