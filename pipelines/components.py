"""KFP v2 lightweight components for preprocess → train → evaluate → sample/publish.

Each component is a few lines that move values between typed KFP artifacts and
`pipelines.steps`, which calls verne's own entry points. KFP ships a component's *source* to the
container and runs it there, so every import happens inside the function body and the
container must have verne installed: on Vertex AI that is the image built from `Dockerfile`
(`build_components(image)` names it); under kfp.local it is the current environment.

No `from __future__ import annotations` here: KFP reads the annotations as live types.
"""

import dataclasses
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def preprocess(corpus: str, data_prefix: str, tokenizer: str, preprocess_args: list,
               dataset: Output[Dataset]):
    """Raw books → shards + vocabulary + metadata (preprocessing.run)."""
    from pipelines import steps

    output_dir = steps.location(dataset.uri, dataset.path)
    dataset.metadata.update(steps.preprocess(corpus, data_prefix, tokenizer, list(preprocess_args),
                                             output_dir))


def train(dataset: Input[Dataset], cell: str, layers: int, lstm_state_size: int,
          embedding_size: int, unroll_steps: int, batch_size: int, epochs: int, max_steps: int,
          time_budget: str, learning_rate: float, seed: int, hparams: dict, train_cpu_limit: str,
          train_memory_limit: str, train_accelerator_type: str, train_accelerator_limit: int,
          accelerated: bool, model: Output[Model]):
    """Trains a model whose job dir is the `model` artifact (trainer.runner.train).

    The machine's parameters are here only to be checked: a run that asks for an accelerator
    from a spec compiled without one fails with a reason instead of training on CPUs. (Not
    named cpu_limit, accelerator_type, …: the KFP compiler adds task inputs of those names for
    the resource placeholders, and they would overwrite ours.)
    """
    from pipelines import steps

    steps.check_run_machine(train_cpu_limit, train_memory_limit, train_accelerator_type,
                            train_accelerator_limit, accelerated)
    values = dict(hparams, cell=cell, layers=layers, lstm_state_size=lstm_state_size,
                  embedding_size=embedding_size, unroll_steps=unroll_steps, batch_size=batch_size,
                  epochs=epochs, max_steps=max_steps, time_budget=time_budget,
                  learning_rate=learning_rate, seed=seed)
    config = steps.build_hparams(steps.location(dataset.uri, dataset.path),
                                 dataset.metadata["data_prefix"],
                                 steps.location(model.uri, model.path), values)
    model.metadata.update(steps.train(config, steps.given_fields(hparams, values)))


def evaluate(model: Input[Model], split: str, best: bool, metrics: Output[Metrics]) -> NamedTuple(
        "Evaluation", [("loss", float), ("perplexity", float), ("bpc", float)]):
    """Loss, perplexity and bpc over a whole split (trainer.evaluate), as Metrics and values."""
    from collections import namedtuple

    from pipelines import steps

    result = steps.evaluate(steps.location(model.uri, model.path), split, best)
    for name, value in sorted(result.items()):
        metrics.log_metric(name, value)
    metrics.metadata["split"] = split
    evaluation = namedtuple("Evaluation", ["loss", "perplexity", "bpc"])
    return evaluation(result["loss"], result["perplexity"], result["bpc"])


def sample(model: Input[Model], num_samples: int, length: int, temperature: float, prime: str,
           seed: int, best: bool, loss: float, perplexity: float, bpc: float, samples: Output[Markdown]):
    """Generated texts from the trained model, as a Markdown page."""
    from pipelines import steps

    job_dir = steps.location(model.uri, model.path)
    texts = steps.sample(job_dir, num_samples, length, temperature, prime, seed, best)
    scores = {"loss": loss, "perplexity": perplexity, "bpc": bpc}
    steps.write_text(samples.path, steps.samples_markdown(texts, job_dir, scores))
    samples.metadata["num_samples"] = len(texts)


def publish(model: Input[Model], publish_uri: str, run_name: str, best: bool, loss: float,
            perplexity: float, bpc: float, published: Output[Model]):
    """Copies the job dir and its SavedModel to PUBLISH_URI/JOB_NAME/RUN_NAME; `published`
    points at the copy."""
    from pipelines import steps

    destination = steps.publish_destination(publish_uri, model.metadata["job_name"], run_name)
    scores = {"loss": loss, "perplexity": perplexity, "bpc": bpc}
    published.metadata.update(steps.publish(steps.location(model.uri, model.path), destination,
                                            scores, best))
    # Vertex AI and kfp.local record the artifact where the component says it is.
    published.uri = destination


def not_published(model: Input[Model], metric: str, value: float, threshold: float,
                  report: Output[Markdown]):
    """The quality gate's Else branch: records why the model was not published."""
    from pipelines import steps

    job_dir = steps.location(model.uri, model.path)
    steps.write_text(report.path, steps.rejection_markdown(metric, value, threshold, job_dir))
    report.metadata.update({"metric": metric, "value": value, "threshold": threshold})


@dataclasses.dataclass(frozen=True)
class Components:
    preprocess: object
    train: object
    evaluate: object
    sample: object
    publish: object
    not_published: object


def build_components(image: str) -> Components:
    """The components, to run in `image` (the verne image on Vertex AI; ignored by kfp.local).

    install_kfp_package=False: the image already has the pinned kfp, and under kfp.local a
    pip install would change the running environment.
    """
    def component(func):
        return dsl.component(func, base_image=image, install_kfp_package=False)

    return Components(
        preprocess=component(preprocess), train=component(train), evaluate=component(evaluate),
        sample=component(sample), publish=component(publish),
        not_published=component(not_published))
