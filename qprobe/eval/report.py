"""The evaluation report: one self-contained HTML page.

:func:`write_report` writes ``report.html``: tables of every metric with its bootstrap interval,
outcomes and parse failures, localisation, cost per image, the probes, the figures
(:mod:`qprobe.eval.figures`) and a gallery of the worst and best cases with the true (green) and
predicted (red) defect boxes and the regions the agent cropped (cyan). The page is
``templates/report.html.jinja`` (autoescaped, with the shared stylesheet). What it shows is inlined
(PNG and JPEG as base64 data URLs, CSS in the page, no script), so the file can be mailed, attached
to an MLflow run or opened offline; a gallery thumbnail opens its full-size image, with the same
boxes, from ``report_images/`` beside the page (:class:`qprobe.pages.Pictures`).
"""

from __future__ import annotations

import base64
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from markupsafe import Markup

from qprobe.draw import CROP, PREDICTION, TRUTH, Mark, legend
from qprobe.errors import QProbeError
from qprobe.eval.metrics import HEADLINE
from qprobe.eval.probes import ProbeResult
from qprobe.io import content_hash, load_image, write_text_atomic
from qprobe.pages import Picture, Pictures, render_page

log = logging.getLogger(__name__)

GALLERY_METHODS = ("qprobe", "piqe_patch")
LABELS = {"qprobe": "Q-Probe", "no_tool": "same model, tool disabled", "piqe": "PIQE (global)",
          "piqe_patch": "PIQE (worst tiles)", "ssim": "SSIM (full reference)"}
STAT_LABELS = {"srcc": "SRCC", "krcc": "KRCC", "plcc": "PLCC", "plcc_logistic": "PLCC (logistic)",
               "rmse": "RMSE", "rmse_logistic": "RMSE (logistic)"}


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


def method_label(method: str) -> str:
    """The name a method goes by in the report and its figures."""
    return LABELS.get(method, method)


def is_finite(value: Any) -> bool:
    """Whether ``value`` is a real number to show (not None, NaN, infinite or a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def number(value: Any, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, or a dash when it is not a finite number."""
    return f"{value:.{digits}f}" if is_finite(value) else "–"


def _count(value: Any) -> str:
    return str(round(value)) if is_finite(value) else "–"


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
    picture: Picture | None  # None when the image could not be read
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
    if not (is_finite(low) and is_finite(high)):
        return number(values.get(key))
    return Markup('{} <span class="ci">[{}, {}]</span>').format(number(values.get(key)), number(low), number(high))


def _agreement(data: ReportData, figures: dict[str, Path]) -> list[Block]:
    parts: list[Block] = []
    for set_name in data.sets:
        methods = data.nested.get(set_name, {})
        if not methods:
            continue
        rows = [[method_label(m), _count(v.get("n")), _count(v.get("answered")), number(v.get("answer_rate")),
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
            rows.append([set_name, method_label(method), outcomes, failures or "–"])
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
                cells.append(f"{number(values.get(prefix + 'srcc'))} / {number(values.get(prefix + 'mae'))}")
            first = next(iter(methods.values()))
            rows.append([kind, group, _count(first.get(f"{kind}.{group}.n")), *cells])
        parts.append(Heading(set_name))
        parts.append(Table(["by", "group", "images", *(f"{method_label(m)}: SRCC / MAE" for m in methods)], rows))
        if f"groups_{set_name}" in figures:
            parts.append(_png(figures[f"groups_{set_name}"], f"{set_name} groups"))
    return parts or [Paragraph("No set has known defects (has_defect) to group by.")]


def _localisation(data: ReportData) -> list[Block]:
    rows = []
    for set_name, methods in data.nested.items():
        for method, v in methods.items():
            if "loc.mean_iou" not in v:
                continue
            by_type = ", ".join(f"{k.rsplit('.', 1)[1]} {number(x, 2)}" for k, x in v.items()
                                if k.startswith("loc.recall."))
            rows.append([set_name, method_label(method), number(v["loc.mean_iou"]),
                         number(v.get("loc.recall")), number(v.get("loc.precision")),
                         number(v.get("loc.false_alarm_rate")), _count(v.get("loc.true_boxes")),
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
            rows.append([set_name, method_label(method),
                         *(number(v.get(f"cost.{k}"), 3 if k == "visual_ratio_total" else 2 if k == "seconds" else 1)
                           for k in keys)])
    return [Table(["set", "method", *heads], rows, caption="means per image")]


def _probes(data: ReportData) -> list[Block]:
    parts: list[Block] = [Heading("Cropping bias")]
    crop = data.probes.get("crop_bias")
    if crop:
        rows = [[method_label(m), _count(r.summary["images"]),
                 f"{_count(r.summary['answered_pairs'])} / {_count(r.summary['pairs'])}",
                 f"{number(r.summary['mean_shift'])} ± {number(r.summary['shift_sem'])}",
                 number(r.summary["mean_abs_shift"])]
                for m, r in crop.items()]
        parts.append(Paragraph("Pristine photos scored whole, then as crops cut by the crop tool; "
                               "the mean shift (crop minus photo) should be near zero."))
        parts.append(Table(["method", "photos", "answered pairs", "mean shift ± s.e.", "mean |shift|"], rows))
    else:
        parts.append(Paragraph("Not run (no pristine image in the sets, or switched off)."))
    parts.append(Heading("Bokeh"))
    bokeh = data.probes.get("bokeh")
    if bokeh:
        rows = [[method_label(m), _count(r.summary["photos"]), _count(r.summary["answered"]),
                 number(r.summary["flag_rate"]), number(r.summary["blur_defect_rate"]),
                 number(r.summary["low_score_rate"]), number(r.summary["mean_score"])] for m, r in bokeh.items()]
        parts.append(Paragraph("Pristine photos with a shallow depth of field; a blur defect or a score "
                               "below 3 counts as a false flag."))
        parts.append(Table(["method", "photos", "answered", "flag rate", "blur-defect rate", "low-score rate",
                            "mean score"], rows))
        names = [row["image"] for row in next(iter(bokeh.values())).rows]
        flagged = Markup('{} <span class="flag">flagged</span>')
        detail = [[name, *(flagged.format(number(row["score"], 2)) if row["flagged"] else number(row["score"], 2)
                           for row in (result.rows[i] for result in bokeh.values()))]
                  for i, name in enumerate(names)]
        parts.append(Table(["photo", *(method_label(m) for m in bokeh)], detail, caption="score per photo"))
    else:
        parts.append(Paragraph("Not run (no bokeh photo folder given, or it is missing)."))
    repeat = data.probes.get("repeat")
    if repeat:
        rows = [[method_label(m), _count(r.summary["images"]), _count(r.summary["runs"]),
                 number(r.summary["answer_rate"]), number(r.summary["mean_std"]), number(r.summary["max_std"])]
                for m, r in repeat.items()]
        temperature = data.config.get("repeat_temperature")
        parts.append(Heading("Repeatability"))
        parts.append(Paragraph(f"Each image scored several times, sampling at temperature {temperature}; "
                               "the standard deviation of its scores."))
        parts.append(Table(["method", "images", "runs", "answer rate", "mean std", "max std"], rows))
    return parts


def _picture(row: pd.Series, pictures: Pictures) -> Picture | None:
    try:
        image = load_image(row["image"])
    except QProbeError as exc:
        log.warning("gallery: %s", exc)
        return None
    return pictures.add(image, f"{row['method']}_{row['set']}_{row['id']}",
                        [*(Mark(crop, CROP) for crop in row["crops"]),
                         *(Mark(d["bbox"], TRUTH) for d in row["true_defects"]),
                         *(Mark(d["bbox"], PREDICTION, d["type"]) for d in row["defects"])])


def _card(row: pd.Series, pictures: Pictures) -> Card:
    if row["score"] is not None and is_finite(row["score"]):
        verdict = f"predicted {number(row['score'], 2)}, error {number(abs(row['score'] - row['mos']), 2)}"
    else:
        reason = f"{row['outcome']}" + (f": {row['failure']}" if isinstance(row["failure"], str) else "")
        verdict = f"no score ({reason})"
    true = ", ".join(f"{d['type']} s{d['severity']}" for d in row["true_defects"]) or "none"
    predicted = ", ".join(d["type"] for d in row["defects"]) or "none"
    return Card(str(row["id"]), _picture(row, pictures), number(row["mos"], 2), verdict, true, predicted)


def _gallery(data: ReportData, pictures: Pictures) -> list[Block]:
    parts: list[Block] = [Legend(legend(TRUTH, PREDICTION, CROP))]
    frame = data.predictions
    for method in (m for m in GALLERY_METHODS if m in data.methods):
        for set_name in data.sets:
            part = frame[(frame["set"] == set_name) & (frame["method"] == method)]
            if part.empty:
                continue
            answered = part[part["score"].notna()].copy()
            title = f"{method_label(method)} on {set_name}"
            if answered.empty:
                shown = part.head(data.gallery)
                parts.append(Gallery(f"{title}: unanswered", [_card(r, pictures) for _, r in shown.iterrows()]))
                continue
            answered["error"] = (answered["score"].astype(float) - answered["mos"]).abs()
            ranked = answered.sort_values("error", ascending=False)
            worst = ranked.head(data.gallery)
            best = ranked.iloc[len(worst):].tail(data.gallery).iloc[::-1]
            parts.append(Gallery(f"{title}: worst", [_card(r, pictures) for _, r in worst.iterrows()]))
            if len(best):
                parts.append(Gallery(f"{title}: best", [_card(r, pictures) for _, r in best.iterrows()]))
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


def _mlflow_run_id() -> str:
    """The active MLflow run's id (the evaluate stage's), without importing MLflow where nothing uses it."""
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    return run.info.run_id if run is not None else "none"


def write_report(data: ReportData, figures: dict[str, Path], path: Path) -> Path:
    """Write the HTML report to ``path`` and its gallery's full-size images beside it; returns ``path``."""
    from qprobe.tracking import git_commit

    commit = git_commit() or "unknown"
    model = Path(data.model)
    # The commit says which code ran; the model's content hash says which weights (the same one the
    # training stages tag their runs with), and the run id where the figures are logged.
    model_hash = content_hash(model)[:12] if model.exists() else "none (an endpoint)"
    images = int(data.predictions[["set", "id"]].drop_duplicates().shape[0]) if len(data.predictions) else 0
    sections = [
        ("agreement", "Agreement with MOS", _agreement(data, figures)),
        ("outcomes", "Outcomes and parse failures", _outcomes(data)),
        ("groups", "By degradation type and severity", _groups_html(data, figures)),
        ("localisation", "Localisation of defects", _localisation(data)),
        ("cost", "Cost per image", _cost(data)),
        ("probes", "Probes", _probes(data)),
        ("training", "Training curves", _training(data, figures)),
        ("gallery", "Gallery: worst and best cases", _gallery(data, Pictures(path))),
        ("config", "Configuration", [Table(["parameter", "value"], [[k, str(v)] for k, v in data.config.items()])]),
    ]
    page = render_page("report.html.jinja", title=data.title, data=data, sections=sections, images=images,
                       notes=NOTES, methods=", ".join(method_label(m) for m in data.methods), commit=commit[:12],
                       run_id=_mlflow_run_id(), model_hash=model_hash, when=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    write_text_atomic(path, page)
    return path
