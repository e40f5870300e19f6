"""Where verne keeps what it builds once per machine: the native ops and XLA's compiled steps.

Pure Python, no TensorFlow: trainer/__init__ reads it before TensorFlow starts (TensorFlow reads
its XLA flags, the compile cache's directory among them, once per process).

    $VERNE_CACHE_DIR, else $XDG_CACHE_HOME/verne, else ~/.cache/verne
        ops/   the native recurrences, keyed by source, compiler, TensorFlow and CPU (kernels/native)
        xla/<key>/   compiled training steps (--xla step and fusion), keyed by TensorFlow, CPU, XLA_FLAGS

`VERNE_XLA_CACHE=0` turns the XLA cache off.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import tempfile
from collections.abc import Mapping

from trainer.hparams import cpu_flags, cpu_model

XLA_CACHE_SWITCH = "VERNE_XLA_CACHE"
# TensorFlow's own flag: compiled XLA executables are written there (each to a temporary name,
# then renamed) and loaded instead of compiling again when a later process traces the same
# computation (TensorFlow compares the whole HLO module before using an entry).
PERSISTENT_CACHE_FLAG = "--tf_xla_persistent_cache_directory"
_TENSORFLOW_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-tpu", "tf-nightly")


def root(environ: Mapping[str, str] = os.environ) -> pathlib.Path:
    base = environ.get("VERNE_CACHE_DIR") or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "verne")
    return pathlib.Path(base)


def _tensorflow_version() -> str:
    for name in _TENSORFLOW_DISTRIBUTIONS:
        try:
            return f"{name}-{importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def xla_dir(environ: Mapping[str, str] = os.environ, flags: frozenset[str] | None = None,
            tensorflow: str | None = None, model: str | None = None) -> pathlib.Path:
    """The XLA cache of this TensorFlow on this CPU (its `flags` and `model`, cpu_model) with these
    XLA_FLAGS. XLA compiles for the CPU it runs on, so a cache on a home directory shared by
    machines of different CPUs must not hand one machine's code to another (an AVX-512 instruction
    on a CPU without it kills the process; code tuned for another generation with the same flags
    runs, but XLA logs an error that it "could lead to ... SIGILL" at each load of such an entry:
    seen with an AMD Zen 5's entries on a Zen 4); and TensorFlow's key for an entry is the
    computation, not the compiler options, so an entry compiled under other XLA_FLAGS (another dot
    library, say) would be loaded as if it were this."""
    key = hashlib.sha256()
    for part in (tensorflow or _tensorflow_version(), environ.get("XLA_FLAGS", ""),
                 cpu_model() if model is None else model, *sorted(cpu_flags() if flags is None else flags)):
        key.update(part.encode() + b"\0")
    return root(environ) / "xla" / key.hexdigest()[:16]


def _writable(directory: pathlib.Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            return True
    except OSError:
        return False


# Compiled steps are 0.1-10 MB each and every new shape adds one: past this size the least
# recently written entries are deleted at start-up, down to half of it.
XLA_CACHE_BYTES = 2 * 2**30


def prune(directory: pathlib.Path, max_bytes: int = XLA_CACHE_BYTES) -> int:
    """Deletes the oldest files of `directory` while it holds more than `max_bytes`, down to half of
    that; returns the bytes freed. A file another process removes meanwhile is skipped."""
    entries = []
    for path in directory.iterdir():
        try:
            stat = path.stat()
        except OSError:
            continue
        entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    if total <= max_bytes:
        return 0
    freed = 0
    for _, size, path in sorted(entries):
        if total - freed <= max_bytes // 2:
            break
        try:
            path.unlink()
            freed += size
        except OSError:
            continue
    return freed


def onednn_fusions_asked(xla_flags: str) -> bool:
    """Whether XLA_FLAGS hands XLA's CPU ops to oneDNN fusions (what Intel's guides suggest for
    Xeons). TensorFlow 2.21 with such an XLA_FLAGS and a persistent cache dies of a segmentation
    fault at the first compiled call, even with an empty cache (AMD EPYC, 2026-12-07); either
    flag alone, or the cache off, compiles and runs."""
    values = dict(flag.partition("=")[::2] for flag in xla_flags.split())
    return (values.get("--xla_cpu_use_onednn", "").lower() in ("true", "1")
            and bool(values.get("--xla_cpu_experimental_onednn_fusion_type")))


def xla_cache_flag(given_flags: str, environ: Mapping[str, str] = os.environ) -> str:
    """The persistent-cache flag to add to TF_XLA_FLAGS, or "" for none: when the user set their
    own, turned it off, asked XLA for oneDNN fusions (onednn_fusions_asked), or the directory
    cannot be written (TensorFlow would then fail the first compiled step instead of compiling
    without a cache)."""
    if (PERSISTENT_CACHE_FLAG in given_flags or environ.get(XLA_CACHE_SWITCH, "1") == "0"
            or onednn_fusions_asked(environ.get("XLA_FLAGS", ""))):
        return ""
    directory = xla_dir(environ)
    if not _writable(directory):
        return ""
    prune(directory)
    return f"{PERSISTENT_CACHE_FLAG}={directory}"


def flag_directory(tf_xla_flags: str) -> str | None:
    """The persistent cache's directory in a TF_XLA_FLAGS value, None without one."""
    for flag in tf_xla_flags.split():
        name, _, value = flag.partition("=")
        if name == PERSISTENT_CACHE_FLAG and value:
            return value
    return None
