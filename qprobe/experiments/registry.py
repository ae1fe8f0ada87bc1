"""The paper's experiments as plain data: each a list of variants, each variant a set of param overrides.

An override is a dotted ``params.yaml`` key and the value that replaces it whole (a mapping is not
merged), as ``dvc exp run -S`` sets it. A value ``@KEY`` stands for the value ``params.yaml`` holds
for ``KEY`` once the profile is applied: ``@stage1.model`` is the model stage 1 starts from, the
tiny random model of the embedded default, Qwen2.5-VL-7B-Instruct at paper scale.

``stages`` names the DVC stages a variant runs (default: all of ``dvc.yaml``); a variant that leaves
a later stage out keeps that stage's previous outputs and ``dvc.lock`` entry (``dvc exp show`` then
says it changed), rather than training a model no row of its table looks at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qprobe.errors import QProbeError

BASE = "@stage1.model"  # the model the curriculum starts from
# The stages up to stage 2 and the evaluation: the variants that evaluate stage 2's model skip stage 3.
THROUGH_STAGE2 = ("bench", "model", "trajectories", "stage1", "stage2", "evaluate")
PUBLIC_DIR = "data/public"  # where `qprobe data import NAME --out data/public/NAME` puts a set


@dataclass(frozen=True)
class Variant:
    """One row of an experiment's table: a DVC experiment named ``<experiment>-<name>``."""

    name: str
    label: str  # the row as the paper names it
    overrides: dict[str, Any] = field(default_factory=dict)
    stages: tuple[str, ...] | None = None  # None: every stage of dvc.yaml


@dataclass(frozen=True)
class Experiment:
    """An experiment of the paper: what it reproduces and its variants, run in this order."""

    name: str
    reproduces: str
    variants: tuple[Variant, ...]
    notes: tuple[str, ...] = ()  # shown by `qprobe experiments list` (e.g. the sets not imported)


def exp_name(experiment: str, variant: str) -> str:
    """The DVC experiment a variant is saved as."""
    return f"{experiment}-{variant}"


def _stages() -> Experiment:
    return Experiment("stages", "the curriculum ablation (which of the three training stages matter)", (
        Variant("base", "base model", {"evaluate.model": BASE}),
        Variant("s1", "+ stage 1", {"evaluate.model": "@stage1.out"}),
        Variant("s2", "+ stage 2", {"stage2.model": BASE, "evaluate.model": "@stage2.out"}, THROUGH_STAGE2),
        Variant("s12", "+ stages 1-2", {"stage2.model": "@stage1.out", "evaluate.model": "@stage2.out"},
                THROUGH_STAGE2),
        Variant("s23", "+ stages 2-3", {"stage2.model": BASE, "evaluate.model": "@stage3.out"}),
        Variant("s123", "all three stages", {"stage2.model": "@stage1.out", "evaluate.model": "@stage3.out"}),
    ))


def _table3() -> Experiment:
    return Experiment("table3", "Table 3: the stage-3 reward (decoupled 0.728 SRCC, coupled, no R_loc 0.698)", (
        Variant("decoupled", "decoupled reward", {"stage3.reward_mode": "decoupled"}),
        Variant("coupled", "coupled reward R_acc (1 + R_loc) R_format", {"stage3.reward_mode": "joint"}),
        # The weights of params.yaml and configs/paper.yaml, less localization's.
        Variant("no_loc", "without R_loc", {"stage3.reward_mode": "decoupled",
                                            "stage3.rewards": {"accuracy": 1.0, "format": 0.5}}),
    ))


def _table4() -> Experiment:
    return Experiment("table4", "Table 4: the crops of the trajectories (degradation-only 0.510 SRCC, "
                                "context-aware 0.728)", (
        Variant("degradation_only", "degradation-only crops", {"trajectories.planner.strategy": "degradation_only"}),
        Variant("context_aware", "context-aware crops", {"trajectories.planner.strategy": "context_aware"}),
    ))


def imported_sets(root: Path) -> tuple[list[str], list[str]]:
    """The public sets imported under ``root/data/public`` (their folders), and the known ones that are not."""
    from qprobe.data.public import LOADERS

    found = sorted(p.parent.name for p in (root / PUBLIC_DIR).glob("*/manifest.parquet"))
    return found, [name for name in LOADERS if name not in found]


def import_line(name: str) -> str:
    return f"qprobe data import {name} --root DIR --out {PUBLIC_DIR}/{name}"


def _datasets(root: Path) -> Experiment:
    found, missing = imported_sets(root)
    data = ["data/bench", *(f"{PUBLIC_DIR}/{name}" for name in found)]
    notes = tuple(f"not imported: {name} (`{import_line(name)}`)" for name in missing)
    return Experiment("datasets", "cross-dataset results: one model on every imported public set (SPAQ 0.892, ...)",
                      (Variant("all", "the final model", {"evaluate.data": data}),), notes)


def experiments(root: Path) -> dict[str, Experiment]:
    """Every experiment, by name; ``datasets`` depends on what is imported under ``root``."""
    return {e.name: e for e in (_stages(), _table3(), _table4(), _datasets(root))}


def experiment(name: str, root: Path) -> Experiment:
    known = experiments(root)
    if name not in known:
        raise QProbeError(f"unknown experiment {name!r} (known: {', '.join(known)})")
    return known[name]


def resolve(overrides: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with every ``@KEY`` value replaced by the value of ``KEY`` in ``params`` (nested)."""
    out = {}
    for key, value in overrides.items():
        if isinstance(value, str) and value.startswith("@"):
            node: Any = params
            for part in value[1:].split("."):
                if not isinstance(node, dict) or part not in node:
                    raise QProbeError(f"params.yaml: no {value[1:]!r} for the experiment override {key}={value}")
                node = node[part]
            value = node
        out[key] = value
    return out
