"""The evaluation report's figures (matplotlib, Agg), as PNG files that ``dvc plots`` can show too.

:func:`write_figures` draws predicted score against MOS per set and method with the fitted logistic
mapping, SRCC per degradation type and MAE per severity, and the reward curves of the training
stages from their curve files; :func:`qprobe.eval.report.write_report` inlines them in the page.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qprobe.eval.metrics import fit_logistic
from qprobe.eval.report import ReportData, is_finite, method_label, number
from qprobe.io import write_bytes_atomic

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
# A group without a value says so in the tick labels' size, dark on the white axes (contrast ~12:1).
NA_LABEL = {"fontsize": 7, "color": "#333333"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _scatter(data: ReportData, set_name: str, path: Path) -> Path:
    frame = data.predictions[data.predictions["set"] == set_name]
    methods = [m for m in data.methods if (frame["method"] == m).any()]
    fig = _figure(3.2 * len(methods), 3.2)
    axes = fig.subplots(1, len(methods), squeeze=False)[0]
    for ax, method in zip(axes, methods, strict=True):
        part = frame[(frame["method"] == method) & frame["score"].notna()]
        ax.set_title(method_label(method), fontsize=9)
        ax.set_xlabel("predicted score (1-5)", fontsize=8)
        ax.set_ylabel("MOS", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0.8, 5.2)
        if part.empty:
            ax.set_xlim(0.8, 5.2)
            unanswered = int((frame["method"] == method).sum())
            ax.text(3, 3, f"no scores\n({unanswered} unanswered)", ha="center", va="center", fontsize=9,
                    color="grey")
            continue
        x, y = part["score"].to_numpy(float), part["mos"].to_numpy(float)
        pristine = part["has_defect"].eq(False).to_numpy()
        ax.scatter(x[~pristine], y[~pristine], s=14, alpha=0.75, color=COLOURS[0], label="with defects")
        ax.scatter(x[pristine], y[pristine], s=14, alpha=0.75, color=COLOURS[2], label="pristine")
        fit = fit_logistic(x, y)
        if fit is not None:
            grid = np.linspace(x.min(), x.max(), 200)
            ax.plot(grid, fit(grid), color=COLOURS[3], lw=1.2, label="logistic fit")
        srcc = data.nested[set_name][method].get("srcc")
        ax.text(0.03, 0.97, f"SRCC {number(srcc)}\nn = {len(part)}", transform=ax.transAxes, va="top", fontsize=8)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(f"{set_name}: predicted score against MOS", fontsize=10)
    return _save(fig, path)


def _bars(ax: Any, table: dict[str, dict[str, float]], methods: Sequence[str], title: str, ylabel: str) -> None:
    groups = sorted({g for values in table.values() for g in values}, key=lambda g: (not g.isdigit(), g))
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if not groups:
        ax.text(0.5, 0.5, "no groups", transform=ax.transAxes, ha="center", color="grey")
        return
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        values = [table.get(method, {}).get(g, np.nan) for g in groups]
        positions = np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width
        ax.bar(positions, np.nan_to_num(values, nan=0.0), width, color=COLOURS[i % len(COLOURS)],
               label=method_label(method))
        for x, v in zip(positions, values, strict=True):
            if not is_finite(v):
                ax.text(x, 0, "n/a", ha="center", va="bottom", rotation=90, **NA_LABEL)
    ax.set_xticks(np.arange(len(groups)), groups, fontsize=7)
    ax.axhline(0, color="black", lw=0.6)
    ax.legend(fontsize=6)


def _groups(data: ReportData, set_name: str, path: Path) -> Path:
    methods = list(data.nested[set_name])
    srcc: dict[str, dict[str, float]] = {}
    mae: dict[str, dict[str, float]] = {}
    for method, values in data.nested[set_name].items():
        for key, value in values.items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "type" and parts[2] == "srcc":
                srcc.setdefault(method, {})[parts[1]] = value
            if len(parts) == 3 and parts[0] == "severity" and parts[2] == "mae":
                mae.setdefault(method, {})[parts[1]] = value
    fig = _figure(10, 3.2)
    left, right = fig.subplots(1, 2)
    _bars(left, srcc, methods, "SRCC by degradation type", "SRCC")
    _bars(right, mae, methods, "MAE by severity (worst defect of the image)", "MAE")
    fig.suptitle(f"{set_name}: by degradation type and severity", fontsize=10)
    return _save(fig, path)


def _curves(curves: pd.DataFrame, path: Path) -> Path:
    stages = list(dict.fromkeys(curves["stage"]))
    fig = _figure(4 * len(stages), 3)
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, stage in zip(axes, stages, strict=True):
        part = curves[curves["stage"] == stage]
        # The total reward, then each reward function's mean, then losses; spreads (std) stay in the CSV.
        shown = [m for m in set(part["metric"]) if "std" not in m.lower()]
        metrics = sorted(shown, key=lambda m: (not m.lower().endswith("reward"), "reward" not in m.lower(), m))[:6]
        for i, metric in enumerate(metrics):
            series = part[part["metric"] == metric]
            ax.plot(series["step"], series["value"], color=COLOURS[i % len(COLOURS)], lw=1.2, label=metric)
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle("Training curves (each stage's curve file)", fontsize=10)
    return _save(fig, path)


def write_figures(data: ReportData, folder: Path) -> dict[str, Path]:
    """The report's figures as PNG files in ``folder``; returns them by name."""
    figures = {}
    for set_name in data.sets:
        if set_name not in data.nested or not data.nested[set_name]:
            continue
        figures[f"scatter_{set_name}"] = _scatter(data, set_name, folder / f"scatter_{set_name}.png")
        figures[f"groups_{set_name}"] = _groups(data, set_name, folder / f"groups_{set_name}.png")
    if data.curves is not None and len(data.curves):
        figures["reward_curves"] = _curves(data.curves, folder / "reward_curves.png")
    return figures
