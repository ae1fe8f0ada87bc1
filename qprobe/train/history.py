"""What a stage's trainer logged, step by step: its last values (the metrics file) and its curves (a DVC plot).

A resumed run's ``log_history`` holds the steps before its checkpoint too (the Trainer restores it), so
both cover the whole run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qprobe.io import write_text_atomic


def logged_steps(history: Iterable[Mapping[str, Any]]) -> list[dict[str, float]]:
    """One row per logged step: ``step`` and every numeric key the trainer logged there (not its final summary)."""
    rows: dict[int, dict[str, float]] = {}
    for entry in history:
        if "train_runtime" in entry or "step" not in entry:
            continue
        row = rows.setdefault(int(entry["step"]), {"step": int(entry["step"])})
        row.update({k: float(v) for k, v in entry.items()
                    if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)})
    return [rows[step] for step in sorted(rows)]


def last_logged(history: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The last value of every numeric key the trainer logged during training (not its final summary)."""
    latest: dict[str, float] = {}
    for row in logged_steps(history):
        latest.update({k: v for k, v in row.items() if k != "step"})
    return latest


def write_curves(history: Iterable[Mapping[str, Any]], path: str | Path) -> None:
    """The stage's curves as CSV: ``step``, then one column per logged key (empty where a step lacks it)."""
    import pandas as pd

    write_text_atomic(path, pd.DataFrame(logged_steps(history)).to_csv(index=False))
