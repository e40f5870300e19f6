"""Training, evaluation and generation of verne language models."""
