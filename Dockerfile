# The image the pipeline's steps run in on Vertex AI: verne on TensorFlow's own image.
#
#   gcloud artifacts repositories create verne --repository-format=docker --location=REGION
#   gcloud builds submit --tag REGION-docker.pkg.dev/PROJECT/verne/verne:latest .
#   python -m pipelines.run --image REGION-docker.pkg.dev/PROJECT/verne/verne:latest ...
#
# The GPU build of TensorFlow runs on CPU-only machines too, so one image serves every step;
# `docker build --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0 .` makes a smaller CPU-only one.
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/verne
COPY setup.py constraints.txt ./
COPY preprocessing ./preprocessing
COPY trainer ./trainer
COPY pipelines ./pipelines

# The base image's TensorFlow (2.21, with CUDA) is the one verne runs on: install verne without
# a TensorFlow extra so pip keeps it, with the same pins as CI for everything else.
RUN python3 -m pip install --no-cache-dir -c constraints.txt . \
 && python3 -m pip check \
 && python3 -c "import tensorflow as tf, kfp, pipelines.steps; assert tf.__version__.startswith('2.21'), tf.__version__"

# No ENTRYPOINT: KFP gives each step its command (python3 -m kfp.dsl.executor_main ...).
