"""Test-only: on PYTHONPATH of the subprocesses tests start against the GCS emulator
(tests/gcs/server.py `GcsServer.subprocess_env`), never in the package or a user's environment.
Python imports `sitecustomize` at start-up; this one arranges for Beam's GcsIO to be adapted to
the emulator when (and only if) the process imports it. See tests/gcs/beam_patches.py.
"""

import importlib.util
import pathlib
import sys

_PATH = pathlib.Path(__file__).resolve().parent.parent / "beam_patches.py"
_SPEC = importlib.util.spec_from_file_location("_verne_test_beam_patches", _PATH)
assert _SPEC is not None and _SPEC.loader is not None
_MODULE = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = _MODULE
_SPEC.loader.exec_module(_MODULE)
_MODULE.install_import_hook()
