"""The training curves the report draws: the reward and loss columns of each training stage's curve file.

Each training stage writes every logged step's figures to ``metrics/<stage>_curves.csv``
(:func:`qprobe.train.history.write_curves`), a DVC output that the evaluate stage depends on, so the
report's curves are those of the very models it evaluates, whatever the MLflow store holds.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

CURVES_SUFFIX = "_curves"


def stage_of(path: str | Path) -> str:
    """The stage a curve file belongs to: ``metrics/stage2_curves.csv`` -> ``stage2``."""
    return Path(path).stem.removesuffix(CURVES_SUFFIX)


def training_curves(paths: Sequence[str | Path]) -> pd.DataFrame | None:
    """The reward and loss columns of the curve files, long: ``stage``, ``metric``, ``step``, ``value``.

    ``None`` when there are none. A missing or unreadable file is logged and left out: curves are a
    nicety of the report, not a reason to fail (the pipeline declares them, so there they exist).
    """
    parts = []
    for path in map(Path, paths):
        try:
            wide = pd.read_csv(path)
        except (OSError, ValueError) as exc:
            log.warning("training curves of %s skipped: %s", path, str(exc).splitlines()[0][:200])
            continue
        if "step" not in wide.columns:
            log.warning("training curves of %s skipped: no step column", path)
            continue
        shown = [c for c in wide.columns if "reward" in c.lower() or c.lower().endswith("loss")]
        long = wide.melt(id_vars="step", value_vars=shown, var_name="metric", value_name="value").dropna()
        parts.append(long.assign(stage=stage_of(path)))
    if not parts:
        return None
    frame = pd.concat(parts, ignore_index=True)[["stage", "metric", "step", "value"]]
    return frame.sort_values(["stage", "metric", "step"], kind="stable").reset_index(drop=True) if len(frame) else None
