"""A throw-away certificate authority for the TLS proxy, made with the `openssl` command.

TensorFlow's gs:// filesystem only speaks HTTPS to www.googleapis.com and
storage.googleapis.com. The proxy presents a certificate for those names, signed by a CA that
exists only for one test session; TensorFlow trusts it because `CURL_CA_BUNDLE` points at
`ca_bundle`. Elliptic-curve keys because they take milliseconds to generate.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import subprocess

from .proxy import GOOGLE_HOSTS

_KEY_ARGS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclasses.dataclass(frozen=True)
class Certificates:
    ca_cert: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    # The CA alone: everything TF talks to over HTTPS goes through the proxy.
    ca_bundle: pathlib.Path


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the gs:// tests need the `openssl` command; install it (apt-get install openssl)")
    result = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def make_certificates(directory: pathlib.Path, hosts: tuple[str, ...] = GOOGLE_HOSTS) -> Certificates:
    """Creates a CA and a server certificate for `hosts` in `directory` (which must exist)."""
    _openssl("req", "-x509", *_KEY_ARGS, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=verne test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
    _openssl("req", *_KEY_ARGS, "-keyout", "server.key", "-out", "server.csr",
             "-subj", f"/CN={hosts[0]}", cwd=directory)
    san = ",".join(f"DNS:{host}" for host in hosts)
    (directory / "server.ext").write_text(
        f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
             cwd=directory)
    return Certificates(ca_cert=directory / "ca.pem", server_cert=directory / "server.pem",
                        server_key=directory / "server.key", ca_bundle=directory / "ca.pem")
