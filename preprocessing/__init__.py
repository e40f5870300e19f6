"""Raw books to TFRecord shards (Apache Beam), plus the data contract the trainer reads."""

import os

# As in trainer/__init__.py: TensorFlow's C++ start-up lines mean nothing to a user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
