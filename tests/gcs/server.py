"""One local stand-in for Google Cloud Storage: emulator + TLS proxy + test CA, and the
environment each kind of client needs to use it.

    with GcsServer(tmp_dir) as gcs:
        gcs.create_bucket("b")
        subprocess.run([sys.executable, "-m", "trainer.task", "--job-dir", "gs://b/job"],
                       env=gcs.subprocess_env())

`env()` holds the variables that route every client here:
- google-cloud-storage, Beam's GcsIO, gcsfs: STORAGE_EMULATOR_HOST (plain HTTP to the emulator);
- TensorFlow's gs:// filesystem: https_proxy + CURL_CA_BUNDLE (through the TLS proxy),
  GOOGLE_AUTH_TOKEN_FOR_TESTING (skips the metadata-server token lookup), and retry/timeout
  settings so a broken test fails in seconds instead of minutes of retries.
`subprocess_env()` adds PYTHONPATH with a test-only sitecustomize that adapts Beam to the
emulator (see beam_patches.py); in-process users call `beam_patches.apply()` instead.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from . import proxy as proxy_module
from .certs import Certificates, make_certificates
from .emulator import Emulator, die_with_parent

if TYPE_CHECKING:
    from google.cloud import storage

SUBPROCESS_SITE_DIR = pathlib.Path(__file__).resolve().parent / "subprocess_site"


class ProxyProcess:
    """proxy.py in its own interpreter (see its docstring for why not a thread)."""

    def __init__(self, emulator_port: int, certificates: Certificates, log_path: pathlib.Path) -> None:
        self.emulator_port = emulator_port
        self.certificates = certificates
        self.log_path = log_path
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, proxy_module.__file__, "--emulator_port", str(self.emulator_port),
                 "--cert", str(self.certificates.server_cert), "--key", str(self.certificates.server_key)]
                + (["--verbose"] if os.environ.get("VERNE_GCS_PROXY_VERBOSE") else []),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True,
                preexec_fn=die_with_parent)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.strip().isdigit():
            self.stop()
            log = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"gcs proxy did not start: {log}")
        self.url = f"http://127.0.0.1:{int(line)}"

    def faults(self, rules: list[dict] | None = None) -> list[dict]:
        """Sets the injected faults (see proxy.py) when `rules` is given; returns them with how
        often each fired."""
        import http.client
        import json

        connection = http.client.HTTPConnection("127.0.0.1", int(self.url.rsplit(":", 1)[1]), timeout=30)
        try:
            body = None if rules is None else json.dumps(rules)
            connection.request("GET" if rules is None else "POST", "/faults", body=body)
            return json.loads(connection.getresponse().read())
        finally:
            connection.close()

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None


class GcsServer:
    """Starts the emulator, a per-session CA and the proxy under `work_dir`; stops them on exit."""

    def __init__(self, work_dir: pathlib.Path) -> None:
        self.work_dir = work_dir
        self.emulator = Emulator(work_dir / "fake-gcs-server.log")
        self.certificates: Certificates | None = None
        self.proxy: ProxyProcess | None = None
        self.startup_seconds = 0.0

    def start(self) -> None:
        began = time.monotonic()
        self.certificates = make_certificates(self.work_dir)
        self.emulator.start()
        try:
            self.proxy = ProxyProcess(self.emulator.port, self.certificates, self.work_dir / "gcs-proxy.log")
            self.proxy.start()
        except BaseException:
            self.emulator.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self.emulator.stop()

    def __enter__(self) -> GcsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def emulator_url(self) -> str:
        return self.emulator.url

    def env(self) -> dict[str, str]:
        """Variables that point every GCS client in the stack at this server."""
        assert self.proxy is not None and self.certificates is not None, "call start() first"
        return {
            "STORAGE_EMULATOR_HOST": self.emulator.url,
            "https_proxy": self.proxy.url,
            "HTTPS_PROXY": self.proxy.url,
            # The emulator itself must be reached directly, whatever proxy the machine has.
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",
            "CURL_CA_BUNDLE": str(self.certificates.ca_bundle),
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
            "GCS_RETRY_CONFIG_MAX_RETRIES": "2",
            # TF waits this long for a silent connection before retrying; its default is minutes.
            "GCS_REQUEST_IDLE_TIMEOUT_SECS": "30",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # Any stray lookup of application-default credentials or the project fails fast.
            "GOOGLE_CLOUD_PROJECT": "verne-test",
            "NO_GCE_CHECK": "True",
        }

    def subprocess_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) + env() + the test-only Beam adaptations on PYTHONPATH."""
        merged = dict(os.environ if base is None else base)
        merged.update(self.env())
        path = [str(SUBPROCESS_SITE_DIR)] + [p for p in merged.get("PYTHONPATH", "").split(os.pathsep) if p]
        merged["PYTHONPATH"] = os.pathsep.join(path)
        return merged

    def storage_client(self) -> storage.Client:
        """A google-cloud-storage client on the emulator, whatever this process's environment."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="verne-test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.emulator.url})

    def create_bucket(self, name: str) -> str:
        """Creates bucket `name` in the emulator; returns "gs://name"."""
        self.storage_client().create_bucket(name)
        return f"gs://{name}"
