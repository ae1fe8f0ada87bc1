"""Prefect flows: the pipeline (every stage) and scheduled retraining."""

from qprobe import offline

offline.apply()  # before Prefect, MLflow or DVC is imported
