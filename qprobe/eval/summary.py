"""From the predictions table to numbers: each method's metrics on each set.

Per set and method (:func:`method_metrics`, the statistics themselves in :mod:`qprobe.eval.metrics`):
SRCC, KRCC, PLCC raw and after the logistic mapping, RMSE and their bootstrap intervals, the answer
rate and the count of each outcome and parse failure; the same per defect type (and ``pristine``)
and per severity where the set says which images are pristine; box localisation for the methods
that report boxes; and the mean cost per image (for the agents, also the visual-token ratio to
one pass at full resolution over the whole set).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd

from qprobe.eval.config import AGENTS, BOX_METHODS, EvaluateConfig
from qprobe.eval.metrics import NAN, group_metrics, localisation, recall_by_type, score_metrics
from qprobe.eval.scoring import COST_KEYS, EvalSet


def _scores(frame: pd.DataFrame) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in frame["score"]], dtype=np.float64)


def method_metrics(frame: pd.DataFrame, method: str, cfg: EvaluateConfig) -> dict[str, float]:
    """The metrics of one method on one set (``frame``: that set's rows of that method, in image order)."""
    pred, mos = _scores(frame), frame["mos"].to_numpy(dtype=np.float64)
    out = score_metrics(pred, mos, samples=cfg.bootstrap, seed=cfg.seed, level=cfg.confidence)
    for outcome, count in Counter(frame["outcome"]).items():
        out[f"outcome.{outcome}"] = float(count)
    for failure, count in Counter(f for f in frame["failure"] if isinstance(f, str)).items():
        out[f"failure.{failure}"] = float(count)

    known = frame["has_defect"].notna().to_numpy()
    if known.any():
        part = frame[known]
        groups = {"pristine": ~part["has_defect"].astype(bool).to_numpy()}
        for kind in sorted({t for types in part["types"] for t in types}):
            groups[kind] = part["types"].map(lambda types, k=kind: k in types).to_numpy()
        for name, values in group_metrics(pred[known], mos[known], groups).items():
            out.update({f"type.{name}.{k}": v for k, v in values.items()})
        severities = {str(s): (part["severity"] == s).to_numpy() for s in sorted(set(part["severity"])) if s > 0}
        for name, values in group_metrics(pred[known], mos[known], severities).items():
            out.update({f"severity.{name}.{k}": v for k, v in values.items()})
        if method in BOX_METHODS:
            predicted = [[d["bbox"] for d in defects] for defects in part["defects"]]
            true = [[d["bbox"] for d in defects] for defects in part["true_defects"]]
            loc = localisation(predicted, true, cfg.iou_threshold)
            out.update({f"loc.{k}": v for k, v in loc.items()})
            types = [[d["type"] for d in defects] for defects in part["true_defects"]]
            out.update({f"loc.recall.{k}": v
                        for k, v in recall_by_type(predicted, true, types, cfg.iou_threshold).items()})

    cost = frame[[f"cost_{k}" for k in COST_KEYS]].astype(float)
    if method in AGENTS:
        for key in COST_KEYS:
            out[f"cost.{key}"] = float(cost[f"cost_{key}"].mean())
        full = cost["cost_full_resolution_visual_tokens"].sum()
        out["cost.visual_ratio_total"] = float(cost["cost_visual_tokens"].sum() / full) if full else NAN
    else:
        out["cost.seconds"] = float(cost["cost_seconds"].mean())
    return out


def all_metrics(frame: pd.DataFrame, sets: Sequence[EvalSet], cfg: EvaluateConfig) -> dict[str, dict[str, dict]]:
    """``{set: {method: metrics}}`` for every set and method that has rows."""
    out: dict[str, dict[str, dict]] = {}
    for eval_set in sets:
        out[eval_set.name] = {}
        for method in cfg.methods:
            part = frame[(frame["set"] == eval_set.name) & (frame["method"] == method)]
            if len(part):
                out[eval_set.name][method] = method_metrics(part.reset_index(drop=True), method, cfg)
    return out
