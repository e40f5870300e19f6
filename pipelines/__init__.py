"""Kubeflow / Vertex AI pipelines chaining preprocess, train, evaluate and sample."""
