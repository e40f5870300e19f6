"""Training, evaluation and generation of verne language models."""

import os

# TensorFlow's C++ start-up lines (oneDNN notices, CPU-feature hints, a spurious "oneDNN supports
# DT_INT32 only on platforms with AVX-512" error on CPUs that have AVX-512) bury verne's progress
# lines and mean nothing to a user. Set before any `import tensorflow`; real failures still reach
# the user as Python exceptions. TF_CPP_MIN_LOG_LEVEL=0 brings the lines back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
