"""The TPU image (Dockerfile.tpu, cloudbuild-tpu.yaml) and its Python environment, with no TPU.

No TPU exists here, and TPUStrategy cannot run on CPU devices, so this checks what can be:
- `.venv-tpu`, which `make test` builds from the requirements the image installs
  (constraints-tpu.txt and setup.py's `tpu` extra), imports tensorflow (the TPU build), libtpu and
  trainer.task, and `python -m trainer.task --help` runs there;
- TensorFlow loads that libtpu.so with the image's PJRT settings on a host that says it is a v5e
  (the variables Vertex's metadata server would give; the runtime then finds no chip and
  TensorFlow carries on): a libtpu without TensorFlow's TPU API aborts the import (libtpu 0.0.52
  does), and the plugin's PJRT C API version must be TensorFlow's own;
- Cloud Build pushes the image that `trainer.submit --tpu` and config.yaml's TPU variant name.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from trainer import submit

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile.tpu"
CLOUDBUILD = REPO / "cloudbuild-tpu.yaml"
# What Vertex's metadata server tells libtpu on a v5e VM with 4 chips; without it libtpu queries
# the metadata server for minutes before giving up.
PRETEND_V5E = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_ID": "0",
               "TPU_WORKER_HOSTNAMES": "localhost"}
PJRT_VERSIONS = re.compile(r"PJRT plugin has PJRT API version (\S+)\. "
                           r"The framework PJRT API version is (\S+)\.")
PROBE = """
import json
from importlib import metadata
import tensorflow as tf, libtpu, trainer.task
print(json.dumps({"tensorflow": tf.__version__, "tensorflow-tpu": metadata.version("tensorflow-tpu"),
                  "libtpu": metadata.version("libtpu"),
                  "devices": sorted({d.device_type for d in tf.config.list_physical_devices()})}))
"""


def dockerfile_env(text: str) -> dict[str, str]:
    """The variables a Dockerfile's ENV lines set (one-line `ENV A=1 B=2` form)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))
    return env


def pinned(constraints: Path, name: str) -> str:
    for line in constraints.read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==")[1].strip()
    raise AssertionError(f"{constraints.name} pins no {name}")


@pytest.fixture(scope="module")
def tpu_python() -> Path:
    """The TPU environment's interpreter; `make test` passes it, so there it never skips."""
    given = os.environ.get("VERNE_TPU_PYTHON")
    path = Path(given) if given else REPO / ".venv-tpu" / "bin" / "python"
    if not path.exists():
        if given:
            pytest.fail(f"VERNE_TPU_PYTHON={given} does not exist")
        pytest.skip("no TPU image environment: `make test` builds .venv-tpu")
    return path


@pytest.fixture(scope="module")
def image_env(tpu_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The process environment of a job in the image on a (pretend) v5e: Dockerfile.tpu's ENV, with
    its /lib/libtpu.so made here as it is there, a symlink to the libtpu package's library."""
    env = dockerfile_env(DOCKERFILE.read_text())
    library = subprocess.run([str(tpu_python), "-c", "import libtpu; print(libtpu.get_library_path())"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    link = tmp_path_factory.mktemp("lib") / Path(env["TF_PLUGGABLE_DEVICE_LIBRARY_PATH"]).name
    link.symlink_to(library)
    env["TF_PLUGGABLE_DEVICE_LIBRARY_PATH"] = str(link)
    # TF_CPP_MIN_LOG_LEVEL=0: the PJRT version line is an INFO log.
    return {**os.environ, **env, **PRETEND_V5E, "TF_CPP_MIN_LOG_LEVEL": "0"}


def test_the_image_sets_the_pjrt_runtime_up() -> None:
    text = DOCKERFILE.read_text()
    env = dockerfile_env(text)
    assert env["NEXT_PLUGGABLE_DEVICE_USE_C_API"] == "true"
    assert env["TF_PLUGGABLE_DEVICE_LIBRARY_PATH"] == "/lib/libtpu.so"  # where Vertex looks for it
    assert re.search(r"ln -s \"\$\(python3 -c 'import libtpu; print\(libtpu.get_library_path\(\)\)'\)\" "
                     r"/lib/libtpu.so", text)
    # The environment tested below is built from the same requirements as the image.
    install = re.search(r"pip install --no-cache-dir -c (\S+) '\.\[(\w+)\]'", text)
    assert install and install.groups() == ("constraints-tpu.txt", "tpu")
    assert "$(call make_venv,$(VENV_TPU),constraints-tpu.txt,tpu)" in (REPO / "Makefile").read_text()


def test_the_tpu_environment_imports_and_loads_libtpu(tpu_python: Path, image_env: dict[str, str]) -> None:
    run = subprocess.run([str(tpu_python), "-c", PROBE], env=image_env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["tensorflow"] == found["tensorflow-tpu"] == "2.20.0"
    assert found["libtpu"] == pinned(REPO / "constraints-tpu.txt", "libtpu")
    # libtpu's TensorFlow API registered the TPU system device (no chip behind it here).
    assert found["devices"] == ["CPU", "TPU_SYSTEM"]
    versions = PJRT_VERSIONS.search(run.stderr)
    assert versions, "TensorFlow did not load libtpu.so as its PJRT plugin:\n" + run.stderr[-3000:]
    plugin, framework = versions.groups()
    assert plugin == framework, f"libtpu's PJRT C API is {plugin}, TensorFlow's {framework}"


def test_the_trainer_starts_in_the_tpu_environment(tpu_python: Path, image_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    # From elsewhere than the checkout: the installed verne answers, as in the image.
    run = subprocess.run([str(tpu_python), "-m", "trainer.task", "--help"], env=image_env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]  # absl's --help exits 1
    assert "--steps_per_execution" in run.stdout and "--precision" in run.stdout


def test_cloud_build_pushes_the_image_trainer_submit_names() -> None:
    from google.cloud.devtools.cloudbuild_v1 import Build

    build = Build.from_json(json.dumps(yaml.safe_load(CLOUDBUILD.read_text())))  # unknown keys fail
    (step,) = build.steps
    args = list(step.args)
    assert args[0] == "build" and args[-1] == "." and "--file=Dockerfile.tpu" in args
    # Cloud Build's own substitutions: the project, and _REGION's default.
    values = {"PROJECT_ID": "my-project", **build.substitutions}

    def substituted(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], text)

    expected = submit.TPU_IMAGE.replace("MY_PROJECT", "my-project")
    assert [substituted(a.removeprefix("--tag=")) for a in args if a.startswith("--tag=")] == [expected]
    assert [substituted(image) for image in build.images] == [expected]
    variant = submit.load_config((REPO / "config.yaml").read_text(), "config.yaml", "tpu_v5e")
    assert variant["workerPoolSpecs"][0]["containerSpec"]["imageUri"] == submit.TPU_IMAGE
