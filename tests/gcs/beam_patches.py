"""Test-only adaptations of Apache Beam's GcsIO to fake-gcs-server. Never used by the package.

- fake-gcs-server's batch endpoint answers with an empty body, so Beam's batched copy/delete
  (used by every file sink's FinalizeWrite) fails with `Bad response: not multi-part`. Here
  they run one object at a time through the same client, returning what the batch calls return.
- Beam looks up application-default credentials with retries (~20 s) before going anonymous;
  the emulator needs no credentials, so the lookup is answered "none" at once.

Standalone (no package imports) so that subprocess_site/sitecustomize.py can load it by path.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

_GCSIO = "apache_beam.io.gcp.gcsio"


def _error_code(err: Exception) -> int:
    return int(getattr(err, "code", None) or 500)


def _copy_batch(self: Any, src_dest_pairs: list[tuple[str, str]]) -> list[tuple[str, str, int | None]]:
    from google.api_core.exceptions import GoogleAPICallError

    results: list[tuple[str, str, int | None]] = []
    for src, dest in src_dest_pairs:
        try:
            self.copy(src, dest)
            results.append((src, dest, None))
        except GoogleAPICallError as err:
            results.append((src, dest, _error_code(err)))
    return results


def _delete_batch(self: Any, paths: Any) -> list[tuple[str, int | None]]:
    from apache_beam.io.gcp.gcsio import parse_gcs_path
    from google.api_core.exceptions import GoogleAPICallError, NotFound

    results: list[tuple[str, int | None]] = []
    for path in list(paths):
        bucket_name, blob_name = parse_gcs_path(path)
        try:
            self.client.bucket(bucket_name).delete_blob(blob_name)
            results.append((path, None))
        except NotFound:
            results.append((path, None))  # as in Beam's delete_batch: already gone is success
        except GoogleAPICallError as err:
            results.append((path, _error_code(err)))
    return results


def patches() -> list[tuple[object, str, object]]:
    """(target, attribute, value) triples; importing Beam's GCS modules is the caller's cost."""
    from apache_beam.internal.gcp import auth
    from apache_beam.io.gcp import gcsio

    return [
        (gcsio.GcsIO, "copy_batch", _copy_batch),
        (gcsio.GcsIO, "delete_batch", _delete_batch),
        # get_service_credentials returns the cached value once _credentials_init is set.
        (auth._Credentials, "_credentials", None),
        (auth._Credentials, "_credentials_init", True),
    ]


def apply() -> None:
    for target, name, value in patches():
        setattr(target, name, value)


class _ApplyAfterImport(importlib.abc.MetaPathFinder):
    """Applies the patches right after Beam's gcsio module is first imported, so processes
    that never touch Beam (the trainer) do not pay for importing it."""

    def find_spec(self, fullname: str, path: Any,
                  target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _GCSIO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        load = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            load(module)
            apply()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_import_hook() -> None:
    if _GCSIO in sys.modules:
        apply()
    elif not any(isinstance(finder, _ApplyAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ApplyAfterImport())
