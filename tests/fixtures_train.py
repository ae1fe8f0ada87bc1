"""Helpers for the training-stage tests: the latest MLflow run, and a run killed after checkpoint-2."""

from __future__ import annotations

from typing import Any

import mlflow

from qprobe.train import common


def latest_run() -> Any:
    return mlflow.search_runs(experiment_names=["qprobe"], order_by=["start_time DESC"], output_format="list")[0]


class KilledAfterStep2(common.MlflowLogCallback):
    """The MLflow callback, and a kill right after checkpoint-2 is written (a preempted node, Ctrl-C)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 2:
            raise KeyboardInterrupt
