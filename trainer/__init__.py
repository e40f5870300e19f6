"""Training, evaluation and generation of verne language models."""

import os

# TensorFlow's C++ start-up lines (oneDNN notices, CPU-feature hints, a spurious "oneDNN supports
# DT_INT32 only on platforms with AVX-512" error on CPUs that have AVX-512) bury verne's progress
# lines and mean nothing to a user. Set before any `import tensorflow`; real failures still reach
# the user as Python exceptions. TF_CPP_MIN_LOG_LEVEL=0 brings the lines back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# XLA's clustering flags: TensorFlow reads TF_XLA_FLAGS once per process, when it first sets up its
# devices (any device query or eager op), so they are set here, before verne touches TensorFlow.
# They change nothing until `--xla fusion` turns clustering on (trainer.xla.fusion): then the CPU
# clusters only elementwise ops, and the matmuls stay on TensorFlow's oneDNN kernels.
# The persistent compile cache (trainer/cache_dirs.py): a transformer's compiled step costs 5-8 s
# to compile, a second run of the same model loads it in ~1 s instead.
from trainer import cache_dirs  # noqa: E402  (pure Python: no TensorFlow yet)

_GIVEN_XLA_FLAGS = os.environ.get("TF_XLA_FLAGS", "")
os.environ["TF_XLA_FLAGS"] = " ".join([_GIVEN_XLA_FLAGS, *(
    flag for flag in ("--tf_xla_cpu_global_jit", "--tf_xla_ops_to_cluster=FUSIBLE")
    if flag not in _GIVEN_XLA_FLAGS), cache_dirs.xla_cache_flag(_GIVEN_XLA_FLAGS)]).strip()
