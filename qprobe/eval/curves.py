"""The training curves the report draws: reward and loss histories of the training stages' MLflow runs."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import pandas as pd

log = logging.getLogger(__name__)


def training_curves(stages: Sequence[str]) -> pd.DataFrame | None:
    """Reward (and loss) histories of the latest MLflow run of each training stage; ``None`` if there are none.

    Looks in the tracking store and experiment the stage runs use (:mod:`qprobe.tracking`); a store
    that cannot be read is logged and treated as empty: curves are a nicety, not a reason to fail.
    """
    from qprobe.tracking import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, tracking_uri

    if not stages:
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri())
        experiment = client.get_experiment_by_name(os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))
        if experiment is None:
            return None
        rows = []
        for stage in stages:
            runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`qprobe.stage` = '{stage}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
            if not runs:
                continue
            run = runs[0]
            for key in sorted(run.data.metrics):
                if "reward" not in key.lower() and not key.lower().endswith("loss"):
                    continue
                history = client.get_metric_history(run.info.run_id, key)
                rows.extend({"stage": stage, "run_id": run.info.run_id, "metric": key, "step": m.step,
                             "value": m.value} for m in history)
    except Exception as exc:  # any store trouble (locked sqlite, unreachable server) only costs the curves
        log.warning("training curves skipped: cannot read MLflow (%s)", str(exc).splitlines()[0][:200])
        return None
    frame = pd.DataFrame(rows)
    return frame.sort_values(["stage", "metric", "step"]).reset_index(drop=True) if len(frame) else None
