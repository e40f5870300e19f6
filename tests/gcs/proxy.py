"""An HTTPS proxy that lets TensorFlow's own gs:// filesystem talk to the local emulator.

TensorFlow has no GCS endpoint setting: it always calls https://www.googleapis.com (JSON API,
uploads) and https://storage.googleapis.com (object reads). It does honour `https_proxy` and
`CURL_CA_BUNDLE`, so this proxy accepts `CONNECT`, terminates TLS with a test-CA certificate
for those two hosts, and replays each HTTP/1.1 request against fake-gcs-server over plain HTTP.

What the replay has to fix, found by running TF against the emulator:
- TF sends `Transfer-Encoding: identity` (and sometimes chunked bodies or
  `Expect: 100-continue`); fake-gcs-server answers 501 to any transfer-encoding. We read the
  whole body, drop those headers and send a Content-Length instead.
- fake-gcs-server serves `Host: storage.googleapis.com` as the public XML-style object endpoint
  (`/BUCKET/OBJECT`), so that Host is kept; JSON-API requests get the emulator's own Host.
- Resumable-upload `Location` headers point at the emulator's plain-HTTP URL; rewriting them to
  https://www.googleapis.com keeps the follow-up PUTs on this proxy.
- Renaming a directory, TF first asks `GET /storage/v1/b/BUCKET/storageLayout` whether the
  bucket has a hierarchical namespace; fake-gcs-server 404s (TF then fails the rename), so the
  proxy answers as GCS does for an ordinary bucket and TF renames object by object.

Faults, for tests of what verne does when Cloud Storage misbehaves: `POST /faults` (plain HTTP to
the proxy itself, a JSON list of rules) makes the next requests whose "METHOD HOST TARGET" matches
a rule's `match` regex fail, `times` times each: with HTTP `status` (e.g. 503), or by a `stall`
of that many seconds and then a closed connection (a timeout for a client that waits less).
`GET /faults` returns the rules with how often each fired (`fired`).

It runs as its own process (`python proxy.py --emulator_port N --cert C --key K`, printing its
port on stdout): some TF calls (e.g. opening a TFRecordWriter) hold the GIL while curl waits
for the answer, so a proxy thread inside the process running TF would deadlock. Standard
library only, so it starts in milliseconds and needs no package imports.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import re
import socket
import socketserver
import ssl
import sys
import threading
import time
from typing import BinaryIO

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
_LOG = logging.getLogger("gcs_proxy")
_MAX_LINE = 65536
# Hop-by-hop or body-framing headers: the proxy re-frames every body with Content-Length.
_DROP_REQUEST = {"transfer-encoding", "expect", "connection", "keep-alive", "proxy-connection",
                 "proxy-authorization", "content-length", "host", "te", "trailer", "upgrade"}
_DROP_RESPONSE = {"transfer-encoding", "connection", "keep-alive", "content-length"}
_STORAGE_LAYOUT = re.compile(r"/storage/v1/b/([^/?]+)/storageLayout(\?.*)?")


def _read_chunked(rfile: BinaryIO) -> bytes:
    parts = []
    while True:
        size = int(rfile.readline(_MAX_LINE).split(b";")[0].strip(), 16)
        if size == 0:
            while rfile.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                pass  # trailers carry nothing the emulator needs
            return b"".join(parts)
        parts.append(rfile.read(size))
        rfile.readline(_MAX_LINE)


class _Request:
    def __init__(self, method: str, target: str, headers: http.client.HTTPMessage, body: bytes):
        self.method, self.target, self.headers, self.body = method, target, headers, body


def _read_request(rfile: BinaryIO, wfile: BinaryIO) -> _Request | None:
    """Reads one request (None at end of stream), answering `Expect: 100-continue` itself."""
    line = rfile.readline(_MAX_LINE)
    while line in (b"\r\n", b"\n"):  # RFC 9112 2.2: ignore blank lines before a request
        line = rfile.readline(_MAX_LINE)
    if not line:
        return None
    method, target, _version = line.decode("latin-1").split(None, 2)
    headers = http.client.parse_headers(rfile)
    _LOG.debug("request %s %s %s", method, target, dict(headers))
    if headers.get("Expect", "").lower() == "100-continue":
        wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        wfile.flush()
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = _read_chunked(rfile)
    else:
        body = rfile.read(int(headers.get("Content-Length", "0")))
    return _Request(method, target, headers, body)


def _storage_layout(bucket: str) -> tuple[int, str, list[tuple[str, str]], bytes]:
    body = json.dumps({"kind": "storage#storageLayout", "bucket": bucket, "location": "US-CENTRAL1",
                       "locationType": "region", "hierarchicalNamespace": {"enabled": False}}).encode()
    return 200, "OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body


class Faults:
    """The injected faults (see the module docstring); shared by the proxy's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[dict] = []

    def set(self, rules: list[dict]) -> None:
        with self._lock:
            self._rules = [{**rule, "fired": 0} for rule in rules]

    def report(self) -> list[dict]:
        with self._lock:
            return [dict(rule) for rule in self._rules]

    def take(self, request: str) -> dict | None:
        """The rule that fires for `request` ("METHOD HOST TARGET"), counted; None if none does."""
        with self._lock:
            for rule in self._rules:
                if rule["fired"] < rule.get("times", 1) and re.search(rule["match"], request):
                    rule["fired"] += 1
                    _LOG.warning("gcs proxy: fault %s for %s", rule, request)
                    return rule
        return None


class _Stalled(Exception):
    """An injected stall: the tunnel closes without an answer."""


class GoogleApisProxy:
    """Threaded CONNECT proxy on 127.0.0.1; `url` is what `https_proxy` takes."""

    def __init__(self, emulator_port: int, cert: str, key: str) -> None:
        self.faults = Faults()
        self.emulator_port = emulator_port
        self.emulator_url = f"http://127.0.0.1:{emulator_port}"
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.connection, self.rfile, self.wfile, context)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.allow_reuse_address = True
        self._server.server_bind()
        self._server.server_activate()
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def _handle(self, connection: socket.socket, rfile: BinaryIO, wfile: BinaryIO,
                context: ssl.SSLContext) -> None:
        line = rfile.readline(_MAX_LINE).decode("latin-1")
        headers = http.client.parse_headers(rfile)
        parts = line.split()
        if len(parts) == 3 and parts[1] == "/faults":
            self._control(parts[0], rfile, wfile, headers)
            return
        host = parts[1].rsplit(":", 1)[0] if len(parts) == 3 else ""
        if parts[:1] != ["CONNECT"] or host not in GOOGLE_HOSTS:
            # Anything else would mean a test is about to reach the real internet.
            wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            _LOG.error("gcs proxy refused %r", line.strip())
            return
        # "100 Continue" and the answer go out as separate small writes: without NODELAY, Nagle
        # holds the second until curl's delayed ACK, adding 40 ms to every request.
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        wfile.flush()
        try:
            with (context.wrap_socket(connection, server_side=True) as tls,
                  tls.makefile("rb") as tls_in, tls.makefile("wb") as tls_out):
                self._serve_tunnel(host, tls_in, tls_out)
        except (ssl.SSLError, ConnectionError, TimeoutError, _Stalled) as err:
            _LOG.info("gcs proxy: tunnel to %s closed: %s", host, err)

    def _control(self, method: str, rfile: BinaryIO, wfile: BinaryIO,
                 headers: http.client.HTTPMessage) -> None:
        if method == "POST":
            self.faults.set(json.loads(rfile.read(int(headers.get("Content-Length", "0")))))
        body = json.dumps(self.faults.report()).encode()
        wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def _serve_tunnel(self, host: str, rfile: BinaryIO, wfile: BinaryIO) -> None:
        upstream = http.client.HTTPConnection("127.0.0.1", self.emulator_port, timeout=120)
        try:
            while (request := _read_request(rfile, wfile)) is not None:
                fault = self.faults.take(f"{request.method} {host} {request.target}")
                if fault and "stall" in fault:
                    time.sleep(fault["stall"])
                    raise _Stalled(f"stalled {fault['stall']} s")
                if fault:
                    body = json.dumps({"error": {"code": fault["status"], "message": "injected"}}).encode()
                    status, reason = fault["status"], "Injected"
                    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
                else:
                    status, reason, headers, body = self._forward(upstream, host, request)
                head = [f"HTTP/1.1 {status} {reason}"]
                head += [f"{name}: {value}" for name, value in headers]
                wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
                wfile.flush()
        finally:
            _LOG.debug("tunnel to %s ends", host)
            upstream.close()

    def _forward(self, upstream: http.client.HTTPConnection, host: str,
                 request: _Request) -> tuple[int, str, list[tuple[str, str]], bytes]:
        if request.method == "GET" and (layout := _STORAGE_LAYOUT.fullmatch(request.target)):
            return _storage_layout(layout.group(1))
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST]
        emulator_host = f"127.0.0.1:{self.emulator_port}"
        headers.append(("Host", host if host == "storage.googleapis.com" else emulator_host))
        if request.body or request.method in ("POST", "PUT", "PATCH"):
            headers.append(("Content-Length", str(len(request.body))))
        for attempt in (1, 2):
            try:
                upstream.putrequest(request.method, request.target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    upstream.putheader(name, value)
                upstream.endheaders(request.body or None)
                response = upstream.getresponse()
                body = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The emulator closed an idle keep-alive connection; every GCS call TF makes
                # here is safe to resend once.
                upstream.close()
                if attempt == 2:
                    raise
        out = []
        for name, value in response.getheaders():
            lower = name.lower()
            if lower == "location":
                value = value.replace(self.emulator_url, "https://www.googleapis.com")
            if lower not in _DROP_RESPONSE:
                out.append((name, value))
        if request.method == "HEAD" or response.status in (204, 304):
            length = response.getheader("Content-Length")
            if length is not None:
                out.append(("Content-Length", length))
        else:
            out.append(("Content-Length", str(len(body))))
        _LOG.debug("%s %s %s -> %d", host, request.method, request.target, response.status)
        return response.status, response.reason, out, body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--emulator_port", type=int, required=True)
    parser.add_argument("--cert", required=True, help="PEM server certificate for GOOGLE_HOSTS")
    parser.add_argument("--key", required=True, help="PEM private key of --cert")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(threadName)s %(message)s")
    proxy = GoogleApisProxy(args.emulator_port, args.cert, args.key)
    # The parent reads this line to learn the port: binding port 0 here avoids a race.
    sys.stdout.write(f"{proxy.port}\n")
    sys.stdout.flush()
    proxy.serve_forever()


if __name__ == "__main__":
    main()
