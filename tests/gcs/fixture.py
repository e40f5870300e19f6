"""pytest fixtures for gs:// tests against a local emulator (see server.py for the plumbing).

- `gcs_server` (session): the running emulator + TLS proxy, a `GcsServer`. Started on first use,
  stopped at the end of the session. For subprocesses (the recommended way to run verne's entry
  points): `subprocess.run([...], env=gcs_server.subprocess_env())`.
- `gcs_bucket` (function): a fresh, empty bucket for this test; its "gs://NAME" URL.
- `gcs_in_process` (function): for code that talks to gs:// inside the pytest process. Sets
  `gcs_server.env()` in os.environ and applies the Beam adaptations, both undone after the test.
  TensorFlow reads the routing variables (https_proxy, CURL_CA_BUNDLE, the test token) per
  request, so this works even if TF was imported earlier; its retry/timeout settings may already
  be fixed by then, which only matters when something fails.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from .beam_patches import patches as beam_patches
from .server import GcsServer


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    work_dir = tmp_path_factory.mktemp("gcs")
    with GcsServer(work_dir) as server:
        yield server


@pytest.fixture
def gcs_bucket(gcs_server: GcsServer) -> str:
    # Bucket names: 3-63 lowercase letters, digits and dashes; one per test keeps tests independent.
    return gcs_server.create_bucket(f"verne-test-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def gcs_in_process(gcs_server: GcsServer, monkeypatch: pytest.MonkeyPatch) -> GcsServer:
    for name, value in gcs_server.env().items():
        monkeypatch.setenv(name, value)
    for target, name, value in beam_patches():
        monkeypatch.setattr(target, name, value)
    return gcs_server
