"""Prefect tasks: run or launch one DVC stage, pull and version data, registry decisions."""

from qprobe import offline

offline.apply()  # before Prefect, MLflow or DVC is imported
