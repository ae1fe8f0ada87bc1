"""An experiment's table, the paper's way: one row per variant (and evaluation set), read from DVC's experiments.

Each variant was saved as the DVC experiment ``<experiment>-<variant>`` (a git ref under
``refs/exps``); its ``params.yaml`` and metrics files are read from that commit, so the table can be
written at any time after the runs, and says "not run" for a variant that has none. Where a name was
saved on several baselines (commits), the newest wins.

Columns: SRCC and PLCC with their bootstrap intervals, answer rate and visual tokens per image of the
evaluated model on each set, and stage 2's rollout adherence on held-out scenes (the share of whole
rollouts that keep the protocol). The headline keys are read by :func:`figures` alone.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qprobe.config import to_flat_dict
from qprobe.eval.report import number
from qprobe.experiments.registry import Experiment, Variant, exp_name
from qprobe.io import write_text_atomic
from qprobe.pages import render_page

MODEL = "qprobe"  # the evaluated model's method name in evaluate's metrics
COLUMNS = ("SRCC [95% CI]", "PLCC [95% CI]", "answer rate", "visual tokens / image", "rollout adherence")
# What the table reads of the evaluated model in evaluate's metrics file (outputs.SUMMARY keeps them).
FIGURE_KEYS = ("srcc", "srcc_low", "srcc_high", "plcc", "plcc_low", "plcc_high", "answer_rate", "cost.visual_tokens")


@dataclass(frozen=True)
class Row:
    variant: str
    label: str
    dataset: str | None  # None: the variant has not been run
    cells: tuple[str, ...]
    exp: str  # the DVC experiment's name and commit


def _git(root: Path, *args: str) -> str | None:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def exp_ref(root: Path, name: str) -> str | None:
    """The newest ``refs/exps/.../NAME`` (DVC experiment ``name`` on any baseline), or None."""
    refs = _git(root, "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps") or ""
    return next((ref for ref in refs.split() if ref.rsplit("/", 1)[-1] == name), None)


def _json_at(root: Path, ref: str, path: str | None) -> dict[str, Any]:
    text = _git(root, "show", f"{ref}:{path}") if path else None
    return json.loads(text) if text else {}


def figures(evaluate: Mapping[str, Any], stage2: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
    """``{set: (srcc, low, high, plcc, low, high, answer rate, visual tokens, rollout adherence)}`` of the
    evaluated model, from the metrics files of evaluate and stage 2 (flat or nested)."""
    flat, heldout = to_flat_dict(dict(evaluate)), to_flat_dict(dict(stage2))
    sets = sorted({key.split(f".{MODEL}.")[0] for key in flat if f".{MODEL}.srcc" in key})
    return {name: (*(flat.get(f"{name}.{MODEL}.{k}") for k in FIGURE_KEYS), heldout.get("rollout_adherence"))
            for name in sets}


def _cells(values: tuple[Any, ...]) -> tuple[str, ...]:
    srcc, srcc_low, srcc_high, plcc, plcc_low, plcc_high, answered, tokens, adherence = values
    return (f"{number(srcc)} [{number(srcc_low)}, {number(srcc_high)}]",
            f"{number(plcc)} [{number(plcc_low)}, {number(plcc_high)}]",
            number(answered, 2), number(tokens, 0), number(adherence, 2))


def _empty_row(variant: Variant, why: str, exp: str) -> Row:
    return Row(variant.name, variant.label, None, (why,) + ("",) * (len(COLUMNS) - 1), exp)


def collect(root: Path, exp: Experiment) -> list[Row]:
    """The table's rows: each variant's sets in its saved experiment, or one "not run" row."""
    rows = []
    for variant in exp.variants:
        name = exp_name(exp.name, variant.name)
        ref = exp_ref(root, name)
        if ref is None:
            rows.append(_empty_row(variant, "not run", name))
            continue
        params = yaml.safe_load(_git(root, "show", f"{ref}:params.yaml") or "") or {}
        evaluate = _json_at(root, ref, params.get("evaluate", {}).get("metrics"))
        stage2 = _json_at(root, ref, params.get("stage2", {}).get("metrics"))
        commit = (_git(root, "rev-parse", "--short", ref) or "").strip()
        sets = figures(evaluate, stage2)
        if not sets:
            rows.append(_empty_row(variant, "no evaluate metrics", f"{name} ({commit})"))
        for dataset, values in sets.items():
            rows.append(Row(variant.name, variant.label, dataset, _cells(values), f"{name} ({commit})"))
    return rows


def markdown(exp: Experiment, rows: list[Row]) -> str:
    heads = ("variant", "set", *COLUMNS, "DVC experiment")
    lines = [f"## {exp.name}: {exp.reproduces}", "", "| " + " | ".join(heads) + " |",
             "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join((r.label, r.dataset or "", *r.cells, r.exp)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(root: Path, exp: Experiment, out: Path) -> tuple[Path, Path, str]:
    """Write ``out/report.md`` and ``out/report.html``; returns both paths and the markdown."""
    rows = collect(root, exp)
    text = markdown(exp, rows)
    md, html = out / "report.md", out / "report.html"
    write_text_atomic(md, text)
    write_text_atomic(html, render_page("experiment.html.jinja", title=f"Q-Probe experiment {exp.name}",
                                        exp=exp, columns=COLUMNS, rows=rows))
    return md, html, text
