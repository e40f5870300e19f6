# The image verne runs in on Vertex AI: training jobs (config.yaml, trainer.submit) and the
# pipeline's steps alike, verne installed on TensorFlow's own image.
#
#   gcloud artifacts repositories create verne --repository-format=docker --location=REGION
#   gcloud builds submit --tag REGION-docker.pkg.dev/PROJECT/verne/verne:latest .
#   python -m trainer.submit --image REGION-docker.pkg.dev/PROJECT/verne/verne:latest ...
#   python -m pipelines.run --image REGION-docker.pkg.dev/PROJECT/verne/verne:latest ...
#
# The GPU build of TensorFlow runs on CPU-only machines too, so one image serves every job;
# `docker build --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0 .` makes a smaller CPU-only one.
# Not TPU VMs: they run Dockerfile.tpu's image, on TensorFlow's TPU build, which PyPI has only up
# to 2.20 (docs/cloud.md, "TPU").
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# g++ builds verne's native CPU recurrences on the machine that runs a CPU job (once per job, ~15 s,
# for that CPU); GPU jobs use TensorFlow's own kernels and never build them.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/verne
COPY setup.py constraints.txt ./
COPY preprocessing ./preprocessing
COPY trainer ./trainer
COPY pipelines ./pipelines

# The base image's TensorFlow (2.21, with CUDA) is the one verne runs on: install verne without
# a TensorFlow extra so pip keeps it, only the TensorBoard that goes with it (setup.py), with the
# same pins as CI for everything else.
RUN python3 -m pip install --no-cache-dir -c constraints.txt '.[tensorboard]' \
 && python3 -m pip check \
 && python3 -c "import tensorflow as tf, kfp, pipelines.steps; assert tf.__version__.startswith('2.21'), tf.__version__"

# No ENTRYPOINT: KFP gives each step its command (python3 -m kfp.dsl.executor_main ...) and each
# training pool's containerSpec says `python3 -m trainer.task`.
