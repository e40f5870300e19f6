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

# verne pins tensorflow-cpu for laptops and CI; here the base image's TensorFlow (same version,
# with CUDA) takes its place, so that one requirement is left out and pip check may name only it.
RUN python3 -m pip install --no-cache-dir --no-deps . \
 && python3 -c "from importlib.metadata import requires; print('\n'.join(r for r in requires('verne') if 'extra ==' not in r and not r.lower().startswith('tensorflow-cpu')))" > /tmp/requirements.txt \
 && grep -v -i '^tensorflow[-_]cpu==' constraints.txt > /tmp/constraints.txt \
 && python3 -m pip install --no-cache-dir -r /tmp/requirements.txt -c /tmp/constraints.txt \
 && ! (python3 -m pip check | grep -v -i -e 'requires tensorflow-cpu' -e '^No broken' | grep .) \
 && python3 -c "import tensorflow as tf, kfp, pipelines.steps; assert tf.__version__.startswith('2.21'), tf.__version__"

# No ENTRYPOINT: KFP gives each step its command (python3 -m kfp.dsl.executor_main ...).
