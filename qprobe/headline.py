"""The headline metrics: the short, named set of figures each MLflow run logs, so runs compare at a glance.

MLflow's runs table and compare view show one column per metric; a run that logs every number it
has (hundreds) buries the few a user compares. So a run logs only these figures, and the full detail
goes to a JSON artifact on the run and to the stage's outputs:

* per evaluation set and method, the correlations with MOS (:data:`CORRELATIONS`); for the agents
  also :data:`AGENT_FIGURES` (how often they answer, and their visual tokens against one pass at
  full resolution);
* per training stage, :data:`STAGE_FIGURES` (stage 2's held-out rollout adherence, stage 3's reward
  and crop calls per rollout);
* on the pipeline's run, each stage's wall time (``seconds.<stage>``).

At most :data:`CAP` figures: past it (many evaluation sets), the lowest-ranked ones stay in the
artifact only (:func:`capped`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from qprobe.config import to_flat_dict
from qprobe.eval.config import AGENTS, MODEL

log = logging.getLogger(__name__)

CAP = 30
CORRELATIONS = ("srcc", "plcc", "krcc")
AGENT_FIGURES = ("answer_rate", "cost.visual_ratio_total")
# The training stages' figures, by stage, from their metrics files.
STAGE_FIGURES = {"stage2": ("rollout_adherence",), "stage3": ("reward", "tool_calls_per_rollout")}
EVALUATE_FIGURES = CORRELATIONS + AGENT_FIGURES


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def evaluate_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The headline figures among evaluate's metrics (nested ``{set: {method: ...}}`` or flat), best first.

    Ranked by method (Q-Probe before its baselines), then figure (:data:`EVALUATE_FIGURES` order), then
    set, so that a cap keeps every set's SRCC of Q-Probe before any baseline's. Undefined values are left out.
    """
    flat = to_flat_dict(metrics)
    ranked: list[tuple[tuple[int, int, int], str, float]] = []
    for set_rank, set_name in enumerate(dict.fromkeys(k.split(".", 1)[0] for k in flat)):
        methods = dict.fromkeys(k.split(".")[1] for k in flat if k.startswith(f"{set_name}.") and k.count(".") >= 2)
        for method in methods:
            figures = EVALUATE_FIGURES if method in AGENTS else CORRELATIONS
            for figure_rank, figure in enumerate(figures):
                key = f"{set_name}.{method}.{figure}"
                if _number(flat.get(key)):
                    ranked.append(((method != MODEL, figure_rank, set_rank), key, float(flat[key])))
    return {key: value for _, key, value in sorted(ranked, key=lambda item: item[0])}


def stage_figures(stage: str, metrics: Mapping[str, Any]) -> dict[str, float]:
    """The :data:`STAGE_FIGURES` of ``stage`` found in its metrics, as ``stage.figure``."""
    flat = to_flat_dict(metrics)
    return {f"{stage}.{key}": float(flat[key]) for key in STAGE_FIGURES.get(stage, ()) if _number(flat.get(key))}


def pipeline_figures(stage_metrics: Mapping[str, Mapping[str, Any]], seconds: Mapping[str, float]) -> dict[str, float]:
    """The pipeline run's headline, capped: wall time per stage, the stages' figures, evaluate's as ``evaluate.*``."""
    figures = {f"seconds.{stage}": round(float(value), 2) for stage, value in seconds.items()}
    for stage, metrics in stage_metrics.items():
        figures.update(stage_figures(stage, metrics))
    figures.update({f"evaluate.{k}": v for k, v in evaluate_figures(stage_metrics.get("evaluate") or {}).items()})
    return capped(figures)


def capped(figures: Mapping[str, float], cap: int = CAP) -> dict[str, float]:
    """The first ``cap`` of ``figures`` (ranked best first); says in one line how many were left to the artifact."""
    kept = dict(list(figures.items())[:cap])
    if len(figures) > cap:
        log.warning("headline: %d figures over the cap of %d are in the run's metrics JSON only (first: %s)",
                    len(figures) - cap, cap, next(k for k in figures if k not in kept))
    return kept
