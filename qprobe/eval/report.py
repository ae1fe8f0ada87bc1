"""The evaluation report: figures (matplotlib, Agg) and one self-contained HTML page.

:func:`write_figures` draws the plots as PNG files (``dvc plots`` can show them too):
predicted score against MOS per set and method with the fitted logistic mapping, SRCC per
degradation type and MAE per severity, and the reward curves of the training stages when their
curve files exist. :func:`write_report` writes ``report.html``: tables of every metric with its bootstrap
interval, outcomes and parse failures, localisation, cost per image, the probes, those figures and a
gallery of the worst and best cases with the true (green) and predicted (red) defect boxes and the
regions the agent cropped (cyan). The page is ``templates/report.html.jinja`` (autoescaped, with the
shared stylesheet). Everything is inlined (PNG and JPEG as base64 data URLs, CSS in the page, no
script), so the file can be mailed, attached to an MLflow run or opened offline.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from markupsafe import Markup

from qprobe.draw import CROP, PREDICTION, TRUTH, Mark, css_colour, draw_marks, fit
from qprobe.errors import QProbeError
from qprobe.eval.metrics import HEADLINE, fit_logistic
from qprobe.eval.probes import ProbeResult
from qprobe.io import load_image, write_bytes_atomic, write_text_atomic
from qprobe.pages import render_page

log = logging.getLogger(__name__)

THUMB_SIDE = 400
GALLERY_METHODS = ("qprobe", "piqe_patch")
LABELS = {"qprobe": "Q-Probe", "no_tool": "same model, tool disabled", "piqe": "PIQE (global)",
          "piqe_patch": "PIQE (worst tiles)"}
STAT_LABELS = {"srcc": "SRCC", "krcc": "KRCC", "plcc": "PLCC", "plcc_logistic": "PLCC (logistic)",
               "rmse": "RMSE", "rmse_logistic": "RMSE (logistic)"}
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


@dataclass
class ReportData:
    """Everything the report shows; built by :func:`qprobe.eval.runner.evaluate`."""

    title: str
    model: str
    config: dict[str, Any]
    sets: list[str]
    methods: list[str]
    nested: dict[str, dict[str, dict[str, float]]]  # set -> method -> metric -> value
    predictions: pd.DataFrame  # one row per set, image and method (see runner._record)
    probes: dict[str, dict[str, ProbeResult]]
    curves: pd.DataFrame | None
    gallery: int
    stages: list[str]
    seconds: float


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "–"


def _count(value: Any) -> str:
    return str(round(value)) if _finite(value) else "–"


# ---------------------------------------------------------------------------------------------------
# Figures


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
        ax.set_title(_label(method), fontsize=9)
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
        ax.text(0.03, 0.97, f"SRCC {_num(srcc)}\nn = {len(part)}", transform=ax.transAxes, va="top", fontsize=8)
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
               label=_label(method))
        for x, v in zip(positions, values, strict=True):
            if not _finite(v):
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=5, rotation=90, color="grey")
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


# ---------------------------------------------------------------------------------------------------
# HTML: the sections are lists of blocks that templates/report.html.jinja renders. Text is escaped
# there; a cell or paragraph that holds markup on purpose is a markupsafe.Markup built with
# Markup.format, which escapes what goes into it.


@dataclass(frozen=True)
class Heading:
    text: str
    kind: ClassVar[str] = "heading"


@dataclass(frozen=True)
class Paragraph:
    text: str
    kind: ClassVar[str] = "paragraph"


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    kind: ClassVar[str] = "table"


@dataclass(frozen=True)
class Plot:
    src: str  # a data URL
    alt: str
    kind: ClassVar[str] = "plot"


@dataclass(frozen=True)
class Card:
    id: str
    src: str  # a data URL, or "" when the image could not be read
    mos: str
    verdict: str
    true: str
    predicted: str


@dataclass(frozen=True)
class Gallery:
    title: str
    cards: Sequence[Card]
    kind: ClassVar[str] = "gallery"


@dataclass(frozen=True)
class Legend:
    entries: Sequence[tuple[str, str]]  # (CSS colour, what it marks)
    kind: ClassVar[str] = "legend"


Block = Heading | Paragraph | Table | Plot | Gallery | Legend


def _png(path: Path, alt: str) -> Plot:
    return Plot("data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"), alt)


def _interval(values: dict[str, float], key: str) -> str:
    low, high = values.get(f"{key}_low"), values.get(f"{key}_high")
    if not (_finite(low) and _finite(high)):
        return _num(values.get(key))
    return Markup('{} <span class="ci">[{}, {}]</span>').format(_num(values.get(key)), _num(low), _num(high))


def _agreement(data: ReportData, figures: dict[str, Path]) -> list[Block]:
    parts: list[Block] = []
    for set_name in data.sets:
        methods = data.nested.get(set_name, {})
        if not methods:
            continue
        rows = [[_label(m), _count(v.get("n")), _count(v.get("answered")), _num(v.get("answer_rate")),
                 *(_interval(v, k) for k in HEADLINE)] for m, v in methods.items()]
        parts.append(Heading(set_name))
        parts.append(Table(["method", "images", "answered", "answer rate", *(STAT_LABELS[k] for k in HEADLINE)],
                           rows, caption="bootstrap intervals in brackets"))
        if f"scatter_{set_name}" in figures:
            parts.append(_png(figures[f"scatter_{set_name}"], f"{set_name} scatter"))
    return parts


def _outcomes(data: ReportData) -> list[Block]:
    rows = []
    for set_name, methods in data.nested.items():
        for method, values in methods.items():
            outcomes = ", ".join(f"{k.split('.', 1)[1]} {_count(v)}" for k, v in values.items()
                                 if k.startswith("outcome."))
            failures = ", ".join(f"{k.split('.', 1)[1]} {_count(v)}" for k, v in sorted(
                ((k, v) for k, v in values.items() if k.startswith("failure.")), key=lambda kv: -kv[1]))
            rows.append([set_name, _label(method), outcomes, failures or "–"])
    return [Table(["set", "method", "outcomes", "parse failures"], rows)]


def _groups_html(data: ReportData, figures: dict[str, Path]) -> list[Block]:
    parts: list[Block] = []
    for set_name, methods in data.nested.items():
        names = sorted({k.split(".")[1] for v in methods.values() for k in v if k.startswith("type.")})
        severities = sorted({k.split(".")[1] for v in methods.values() for k in v if k.startswith("severity.")})
        if not names and not severities:
            continue
        rows = []
        for kind, group in [("type", n) for n in names] + [("severity", s) for s in severities]:
            cells = []
            for values in methods.values():
                prefix = f"{kind}.{group}."
                cells.append(f"{_num(values.get(prefix + 'srcc'))} / {_num(values.get(prefix + 'mae'))}")
            first = next(iter(methods.values()))
            rows.append([kind, group, _count(first.get(f"{kind}.{group}.n")), *cells])
        parts.append(Heading(set_name))
        parts.append(Table(["by", "group", "images", *(f"{_label(m)}: SRCC / MAE" for m in methods)], rows))
        if f"groups_{set_name}" in figures:
            parts.append(_png(figures[f"groups_{set_name}"], f"{set_name} groups"))
    return parts or [Paragraph("No set has known defects (has_defect) to group by.")]


def _localisation(data: ReportData) -> list[Block]:
    rows = []
    for set_name, methods in data.nested.items():
        for method, v in methods.items():
            if "loc.mean_iou" not in v:
                continue
            by_type = ", ".join(f"{k.rsplit('.', 1)[1]} {_num(x, 2)}" for k, x in v.items()
                                if k.startswith("loc.recall."))
            rows.append([set_name, _label(method), _num(v["loc.mean_iou"]),
                         _num(v.get("loc.recall")), _num(v.get("loc.precision")),
                         _num(v.get("loc.false_alarm_rate")), _count(v.get("loc.true_boxes")),
                         _count(v.get("loc.predicted_boxes")), by_type or "–"])
    if not rows:
        return [Paragraph("No method reported boxes on a set with known defects.")]
    threshold = data.config.get("iou_threshold", 0.5)
    return [Table(["set", "method", "mean IoU (Hungarian)", f"recall @ IoU {threshold}", "precision",
                   "false-alarm rate (pristine)", "true boxes", "predicted boxes", "recall by type"], rows)]


def _cost(data: ReportData) -> list[Block]:
    keys = ("turns", "crops", "global_visual_tokens", "crop_visual_tokens", "text_tokens", "generated_tokens",
            "seconds", "full_resolution_visual_tokens", "visual_ratio_total")
    heads = ("turns", "crops", "global visual tokens", "crop visual tokens", "text tokens", "generated tokens",
             "seconds", "full-resolution visual tokens", "visual tokens / full resolution")
    rows = []
    for set_name, methods in data.nested.items():
        for method, v in methods.items():
            rows.append([set_name, _label(method),
                         *(_num(v.get(f"cost.{k}"), 3 if k == "visual_ratio_total" else 2 if k == "seconds" else 1)
                           for k in keys)])
    return [Table(["set", "method", *heads], rows, caption="means per image")]


def _probes(data: ReportData) -> list[Block]:
    parts: list[Block] = [Heading("Cropping bias")]
    crop = data.probes.get("crop_bias")
    if crop:
        rows = [[_label(m), _count(r.summary["images"]),
                 f"{_count(r.summary['answered_pairs'])} / {_count(r.summary['pairs'])}",
                 f"{_num(r.summary['mean_shift'])} ± {_num(r.summary['shift_sem'])}",
                 _num(r.summary["mean_abs_shift"])]
                for m, r in crop.items()]
        parts.append(Paragraph("Pristine photos scored whole, then as crops cut by the crop tool; "
                               "the mean shift (crop minus photo) should be near zero."))
        parts.append(Table(["method", "photos", "answered pairs", "mean shift ± s.e.", "mean |shift|"], rows))
    else:
        parts.append(Paragraph("Not run (no pristine image in the sets, or switched off)."))
    parts.append(Heading("Bokeh"))
    bokeh = data.probes.get("bokeh")
    if bokeh:
        rows = [[_label(m), _count(r.summary["photos"]), _count(r.summary["answered"]),
                 _num(r.summary["flag_rate"]), _num(r.summary["blur_defect_rate"]),
                 _num(r.summary["low_score_rate"]), _num(r.summary["mean_score"])] for m, r in bokeh.items()]
        parts.append(Paragraph("Pristine photos with a shallow depth of field; a blur defect or a score "
                               "below 3 counts as a false flag."))
        parts.append(Table(["method", "photos", "answered", "flag rate", "blur-defect rate", "low-score rate",
                            "mean score"], rows))
        names = [row["image"] for row in next(iter(bokeh.values())).rows]
        flagged = Markup('{} <span class="flag">flagged</span>')
        detail = [[name, *(flagged.format(_num(row["score"], 2)) if row["flagged"] else _num(row["score"], 2)
                           for row in (result.rows[i] for result in bokeh.values()))]
                  for i, name in enumerate(names)]
        parts.append(Table(["photo", *(_label(m) for m in bokeh)], detail, caption="score per photo"))
    else:
        parts.append(Paragraph("Not run (no bokeh photo folder given, or it is missing)."))
    repeat = data.probes.get("repeat")
    if repeat:
        rows = [[_label(m), _count(r.summary["images"]), _count(r.summary["runs"]),
                 _num(r.summary["answer_rate"]), _num(r.summary["mean_std"]), _num(r.summary["max_std"])]
                for m, r in repeat.items()]
        temperature = data.config.get("repeat_temperature")
        parts.append(Heading("Repeatability"))
        parts.append(Paragraph(f"Each image scored several times, sampling at temperature {temperature}; "
                               "the standard deviation of its scores."))
        parts.append(Table(["method", "images", "runs", "answer rate", "mean std", "max std"], rows))
    return parts


def _thumbnail(row: pd.Series) -> str:
    try:
        image = load_image(row["image"])
    except QProbeError as exc:
        log.warning("gallery: %s", exc)
        return ""
    thumb, scale = fit(image, THUMB_SIDE)
    draw_marks(thumb, [*(Mark(crop, CROP) for crop in row["crops"]),
                       *(Mark(d["bbox"], TRUTH) for d in row["true_defects"]),
                       *(Mark(d["bbox"], PREDICTION, d["type"]) for d in row["defects"])], scale=scale)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _card(row: pd.Series) -> Card:
    if row["score"] is not None and _finite(row["score"]):
        verdict = f"predicted {_num(row['score'], 2)}, error {_num(abs(row['score'] - row['mos']), 2)}"
    else:
        reason = f"{row['outcome']}" + (f": {row['failure']}" if isinstance(row["failure"], str) else "")
        verdict = f"no score ({reason})"
    true = ", ".join(f"{d['type']} s{d['severity']}" for d in row["true_defects"]) or "none"
    predicted = ", ".join(d["type"] for d in row["defects"]) or "none"
    return Card(str(row["id"]), _thumbnail(row), _num(row["mos"], 2), verdict, true, predicted)


def _gallery(data: ReportData) -> list[Block]:
    parts: list[Block] = [Legend([(css_colour(TRUTH), "true defect"), (css_colour(PREDICTION), "predicted defect"),
                                  (css_colour(CROP), "region the agent cropped")])]
    frame = data.predictions
    for method in (m for m in GALLERY_METHODS if m in data.methods):
        for set_name in data.sets:
            part = frame[(frame["set"] == set_name) & (frame["method"] == method)]
            if part.empty:
                continue
            answered = part[part["score"].notna()].copy()
            title = f"{_label(method)} on {set_name}"
            if answered.empty:
                shown = part.head(data.gallery)
                parts.append(Gallery(f"{title}: unanswered", [_card(r) for _, r in shown.iterrows()]))
                continue
            answered["error"] = (answered["score"].astype(float) - answered["mos"]).abs()
            ranked = answered.sort_values("error", ascending=False)
            worst = ranked.head(data.gallery)
            best = ranked.iloc[len(worst):].tail(data.gallery).iloc[::-1]
            parts.append(Gallery(f"{title}: worst", [_card(r) for _, r in worst.iterrows()]))
            if len(best):
                parts.append(Gallery(f"{title}: best", [_card(r) for _, r in best.iterrows()]))
    return parts


def _training(data: ReportData, figures: dict[str, Path]) -> list[Block]:
    if "reward_curves" in figures:
        return [_png(figures["reward_curves"], "training curves")]
    stages = ", ".join(data.stages) or "none"
    return [Paragraph(f"No curve file of the training stages ({stages}) was found; no curves.")]


NOTES = (
    "SRCC and KRCC measure agreement in order, PLCC and RMSE in value; the logistic columns map each method's "
    "scores onto the MOS with the VQEG 4-parameter logistic first, so methods on other scales (PIQE: 0-100, "
    "lower is better, shown here as 5 - PIQE/25) compare fairly. Intervals: percentile bootstrap over images, "
    "the same resamples for every method. Correlations use the images a method scored; the answer rate says "
    "how many that was. Localisation matches boxes one-to-one (Hungarian, on IoU) in original pixels; an image "
    "without an answer predicted no box. NIQE and BRISQUE are absent: their fitted parameters are not "
    "available offline (scikit-image ships neither)."
)


def write_report(data: ReportData, figures: dict[str, Path], path: Path) -> Path:
    """Write the self-contained HTML report to ``path``; returns it."""
    from qprobe.tracking import git_commit

    commit = git_commit() or "unknown"
    images = int(data.predictions[["set", "id"]].drop_duplicates().shape[0]) if len(data.predictions) else 0
    sections = [
        ("agreement", "Agreement with MOS", _agreement(data, figures)),
        ("outcomes", "Outcomes and parse failures", _outcomes(data)),
        ("groups", "By degradation type and severity", _groups_html(data, figures)),
        ("localisation", "Localisation of defects", _localisation(data)),
        ("cost", "Cost per image", _cost(data)),
        ("probes", "Probes", _probes(data)),
        ("training", "Training curves", _training(data, figures)),
        ("gallery", "Gallery: worst and best cases", _gallery(data)),
        ("config", "Configuration", [Table(["parameter", "value"], [[k, str(v)] for k, v in data.config.items()])]),
    ]
    page = render_page("report.html.jinja", title=data.title, data=data, sections=sections, images=images,
                       notes=NOTES, methods=", ".join(_label(m) for m in data.methods), commit=commit[:12],
                       when=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    write_text_atomic(path, page)
    return path
