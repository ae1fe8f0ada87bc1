"""What ``qprobe evaluate`` writes besides the report: the metrics file, tables, plot data, traces.

* every metric (``metrics_full.json`` in the output folder, :func:`flat_metrics`): one flat JSON
  object, ``{"<set>.<method>.<metric>": value}`` and ``{"probes.<probe>.<method>.<metric>": value}``,
  undefined values as ``null``;
* the DVC metrics file (``metrics/evaluate.json``, :func:`summary_metrics`): its summary, nested
  ``{set: {method: {metric: value}}}``, small enough for ``dvc metrics show`` and ``dvc exp show``
  to stay readable, and the same key by key across runs, so ``dvc metrics diff`` compares them;
* ``predictions.csv`` and the DVC plot data under ``plots/`` (:func:`write_tables`);
* ``traces.jsonl``, every agent turn (:func:`write_traces`), and ``probes.json``, each probe's
  summary and per-image rows (:func:`write_probes`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from qprobe.config import to_flat_dict
from qprobe.eval.probes import ProbeResult
from qprobe.headline import EVALUATE_FIGURES
from qprobe.io import write_json_atomic, write_text_atomic

FULL_METRICS = "metrics_full.json"
# Every name `qprobe evaluate` writes in its output folder (the report included).
OUTPUT_NAMES = ("report.html", "report_images", "predictions.csv", "plots", "traces.jsonl", "probes.json",
                FULL_METRICS)
# What the DVC metrics file keeps of each method on each set: the headline, SRCC's and PLCC's intervals,
# the image count, the boxes' mean IoU and the visual tokens per image (the experiment tables read them
# from the file as each DVC experiment saved it).
SUMMARY = (*EVALUATE_FIGURES, "n", "srcc_low", "srcc_high", "plcc_low", "plcc_high", "loc.mean_iou",
           "cost.visual_tokens")


def flat_metrics(nested: dict[str, dict[str, dict]], probe_results: dict[str, dict[str, ProbeResult]],
                 extra: dict[str, float]) -> dict[str, float | None]:
    """The metrics file: ``{"set.method.metric": value}``, ``None`` where a value is undefined."""
    summaries = {probe: {method: result.summary for method, result in methods.items()}
                 for probe, methods in probe_results.items()}
    flat = {**to_flat_dict(nested), **to_flat_dict(summaries, prefix="probes."), **extra}
    return {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v))
            for k, v in sorted(flat.items())}


def summary_metrics(flat: Mapping[str, float | None], sets: Sequence[str]) -> dict[str, Any]:
    """The DVC metrics file from :func:`flat_metrics`' output: the run's seconds and, per set in ``sets``,
    its image and source-photo counts and each method's :data:`SUMMARY` figures, nested ``{set: {method: {metric: value}}}``."""
    summary: dict[str, Any] = {"seconds": flat.get("seconds")}
    for key, value in flat.items():
        set_name, _, rest = key.partition(".")
        if set_name not in sets:
            continue
        method, _, metric = rest.partition(".")
        if rest in ("images", "sources", "skipped"):
            summary.setdefault(set_name, {})[rest] = value
        elif metric in SUMMARY:
            summary.setdefault(set_name, {}).setdefault(method, {})[metric] = value
    return summary


def _json_list(values: Any) -> str:
    return json.dumps(values, separators=(",", ":"))


def write_tables(frame: pd.DataFrame, nested: dict[str, dict[str, dict]], methods: Sequence[str],
                 out: Path) -> None:
    """``predictions.csv`` (long: one row per image and method) and the DVC plot data under ``plots/``.

    Plot data is wide, one series per column, the shape ``dvc plots`` draws without a custom
    template: ``scatter_<set>.csv`` (``id, mos, has_defect`` and one score column per method; x
    ``mos``, y the methods) and ``groups_<set>.csv`` (``by, group, n`` and ``<method>_srcc`` /
    ``<method>_mae``). The training curves are the training stages' own plot files.
    """
    table = frame.copy()
    for column in ("types", "true_defects", "defects", "crops"):
        table[column] = table[column].map(_json_list)
    write_text_atomic(out / "predictions.csv", table.to_csv(index=False))
    plots = out / "plots"
    for set_name, results in nested.items():
        part = frame[frame["set"] == set_name]
        present = [m for m in methods if m in results]
        scores = part.pivot(index="id", columns="method", values="score")[present]
        wide = part.drop_duplicates("id").set_index("id")[["mos", "has_defect"]].join(scores).reset_index()
        write_text_atomic(plots / f"scatter_{set_name}.csv", wide.to_csv(index=False))
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for method in present:
            for key, value in results[method].items():
                match = re.fullmatch(r"(type|severity)\.(.+)\.(n|srcc|mae)", key)
                if match:
                    row = rows.setdefault((match[1], match[2]), {"by": match[1], "group": match[2]})
                    # No dot in column names: Vega-Lite (dvc plots) reads "a.b" as a nested field.
                    row["n" if match[3] == "n" else f"{method}_{match[3]}"] = value
        write_text_atomic(plots / f"groups_{set_name}.csv", pd.DataFrame(list(rows.values())).to_csv(index=False))


def write_traces(traces: Sequence[dict[str, Any]], path: Path) -> None:
    """``traces.jsonl``: one line per image and agent method, its rollout turn by turn."""
    write_text_atomic(path, "".join(json.dumps(t) + "\n" for t in traces))


def write_probes(probe_results: dict[str, dict[str, ProbeResult]], path: Path) -> None:
    """``probes.json``: ``{probe: {method: {summary, rows}}}``."""
    rows = {p: {m: asdict(r) for m, r in methods.items()} for p, methods in probe_results.items()}
    # Undefined numbers (nan) become null: the file stays valid JSON for any reader.
    write_json_atomic(path, json.loads(json.dumps(rows, default=float), parse_constant=lambda _: None))
