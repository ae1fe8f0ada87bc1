"""``qprobe evaluate``: score labelled photos with Q-Probe and its baselines; metrics, probes, report.

For each evaluation set (any manifest with a ``mos`` column: the bench's test split, an imported
public IQA set, or a user's own labelled photos) every image is scored by

* ``qprobe``: the model, a full rollout (global view, crops at native resolution, answer);
* ``no_tool``: the same model with the tool disabled (``max_crops = 0``: one look at the global view);
* ``piqe`` and ``piqe_patch``: the classical no-reference baseline, globally and over its worst tiles
  at native resolution (:mod:`qprobe.eval.baselines`);

each baseline can be switched off. Per set and method it computes (:mod:`qprobe.eval.metrics`):
SRCC, KRCC, PLCC raw and after the 4-parameter logistic mapping, RMSE, their 95% bootstrap intervals
(paired across methods), the answer rate and the count of each outcome and parse failure; the same
per degradation type and per severity; localisation of defect boxes (mean Hungarian IoU, recall and
precision at IoU 0.5, false alarms on pristine images); and for the agents the cost per image: turns,
crops, visual and text tokens, seconds, and the visual-token ratio to one pass at full resolution.
Then the behavioural probes (:mod:`qprobe.eval.probes`): cropping bias on pristine images, bokeh on
shallow-depth-of-field photos, and repeatability under sampling.

Outputs (``--out DIR``): ``predictions.csv`` (one row per image and method), ``traces.jsonl`` (every
agent turn), ``probes.json``, ``plots/`` (DVC plot data, see :func:`write_tables`: predicted score
against MOS and the per-type and per-severity statistics per set, and the reward curves of the
training stages' MLflow runs when there are any; and the report's figures as PNG) and
``report.html``, a self-contained report (:mod:`qprobe.eval.report`). The metrics file (``metrics/evaluate.json``) is one flat JSON object,
``{"<set>.<method>.<metric>": value}``, undefined values as ``null``, so ``dvc metrics diff`` compares
two runs key by key. Everything is logged to the stage's MLflow run.

A model that answers out of protocol (the tiny random model does, nearly always) is evaluated all
the same: its images count as unanswered, by failure kind, and its correlations are undefined.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from qprobe.agent.backends import DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT, Backend
from qprobe.agent.crop import DEFAULT_CROP_MAX_PIXELS, DEFAULT_GLOBAL_MAX_PIXELS
from qprobe.agent.rollout import RolloutConfig
from qprobe.config import parse_config, to_flat_dict
from qprobe.data.manifest import image_path, read_manifest
from qprobe.errors import QProbeError
from qprobe.eval import probes
from qprobe.eval.baselines import AgentScorer, PiqeScorer, Prediction, Scorer
from qprobe.eval.metrics import NAN, group_metrics, localisation, recall_by_type, score_metrics
from qprobe.eval.report import ReportData, write_figures, write_report
from qprobe.io import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    check_out_vs_in,
    load_image,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

MODEL = "qprobe"
BASELINES = ("no_tool", "piqe", "piqe_patch")
AGENTS = ("qprobe", "no_tool")
BOX_METHODS = ("qprobe", "no_tool", "piqe_patch")  # methods that report defect boxes
COST_KEYS = ("turns", "crops", "global_visual_tokens", "crop_visual_tokens", "visual_tokens", "text_tokens",
             "generated_tokens", "full_resolution_visual_tokens", "visual_ratio", "seconds")
TRAINING_STAGES = ("stage1", "stage2", "stage3")


@dataclass
class EvaluateConfig:
    """Parameters of ``qprobe evaluate`` (the ``evaluate:`` section of ``params.yaml``)."""

    model: str = field(default="models/stage3", metadata={
        "help": "Qwen2.5-VL checkpoint folder, or the http(s):// base URL of an OpenAI-compatible server"})
    served_model: str | None = field(default=None, metadata={
        "help": "model name on the server (default: the first one it lists)"})
    connect_timeout: float = field(default=DEFAULT_CONNECT_TIMEOUT, metadata={
        "help": "seconds to wait for a connection to the endpoint, per attempt"})
    read_timeout: float = field(default=DEFAULT_READ_TIMEOUT, metadata={
        "help": "seconds to wait for the endpoint's answer to one request; a timed-out request is not retried"})
    data: list[str] = field(default_factory=lambda: ["data/bench"], metadata={
        "help": "manifests to evaluate on (files, or folders holding manifest.parquet), several after one --data; "
                "any manifest with a mos column"})
    split: str = field(default="test", metadata={"help": "manifest split to evaluate ('all': every row)"})
    limit: int | None = field(default=None, metadata={
        "help": "at most this many images per set (a seeded sample); null: all"})
    out: str = field(default="outputs/evaluate", metadata={"help": "output folder (report, predictions, plots)"})
    metrics: str = field(default="metrics/evaluate.json", metadata={"help": "DVC metrics file (flat JSON)"})
    global_max_pixels: int = field(default=DEFAULT_GLOBAL_MAX_PIXELS, metadata={
        "help": "pixel budget of the global view (smart_resize; 1280*28*28 as in the paper)"})
    crop_max_pixels: int = field(default=DEFAULT_CROP_MAX_PIXELS, metadata={"help": "pixel budget of each crop"})
    max_crops: int = field(default=3, metadata={"help": "crop calls allowed per image"})
    max_new_tokens: int = field(default=1024, metadata={
        "help": "tokens the model may generate per image, all turns"})
    temperature: float = field(default=0.0, metadata={
        "help": "sampling temperature of the scored runs; 0 is greedy"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, set limits and the bootstrap"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for the intervals (0: none)"})
    confidence: float = field(default=0.95, metadata={"help": "coverage of the bootstrap intervals"})
    iou_threshold: float = field(default=0.5, metadata={"help": "IoU at which a predicted box finds a true one"})
    baselines: list[str] = field(default_factory=lambda: list(BASELINES), metadata={
        "help": f"baselines to run beside the model: any of {', '.join(BASELINES)}"})
    piqe_tile: int = field(default=512, metadata={"help": "tile side of the PIQE patch probe, native pixels"})
    piqe_worst: int = field(default=3, metadata={"help": "worst tiles the PIQE patch probe pools"})
    crop_bias_images: int = field(default=2, metadata={
        "help": "pristine images of the sets for the cropping-bias probe (0: off)"})
    crop_bias_crops: int = field(default=4, metadata={"help": "tool crops per image in that probe (1-5)"})
    bokeh_dir: str | None = field(default=None, metadata={
        "help": "folder of the bokeh photos (e.g. ../shared/photos); null or missing: the probe is skipped"})
    bokeh_list: str | None = field(default=None, metadata={
        "help": "file naming the bokeh photos, one per line (default: the shipped qprobe/eval/bokeh.txt)"})
    bokeh_limit: int | None = field(default=None, metadata={
        "help": "at most this many bokeh photos (0: off); null: all"})
    repeat_images: int = field(default=2, metadata={"help": "images for the repeatability probe (0: off)"})
    repeat_runs: int = field(default=3, metadata={"help": "sampled runs per image in that probe"})
    repeat_temperature: float = field(default=0.7, metadata={"help": "sampling temperature of those runs"})
    gallery: int = field(default=4, metadata={"help": "worst and best cases shown in the report, each"})
    training_stages: list[str] = field(default_factory=lambda: list(TRAINING_STAGES), metadata={
        "help": "stages whose MLflow runs give the report's reward curves"})
    max_image_pixels: int = field(default=DEFAULT_MAX_PIXELS, metadata={
        "help": "refuse images with more pixels than this (decompression bombs)"})

    def __post_init__(self) -> None:
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown baseline {unknown[0]!r} (known: {', '.join(BASELINES)})")
        if not self.data:
            raise ValueError("data must name at least one manifest")
        for name in ("global_max_pixels", "crop_max_pixels", "max_new_tokens", "max_image_pixels", "piqe_tile",
                     "piqe_worst", "gallery"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_crops", "bootstrap", "crop_bias_images", "repeat_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bokeh_limit is not None and self.bokeh_limit < 0:
            raise ValueError(f"bokeh_limit must be >= 0 or null, got {self.bokeh_limit}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be at least 1 or null, got {self.limit}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0 < self.iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if not 1 <= self.crop_bias_crops <= 5:
            raise ValueError(f"crop_bias_crops must be 1 to 5, got {self.crop_bias_crops}")
        if self.repeat_images and self.repeat_runs < 2:
            raise ValueError(f"repeat_runs must be at least 2, got {self.repeat_runs}")
        if self.temperature < 0 or self.repeat_temperature < 0:
            raise ValueError("temperatures must be >= 0")
        if not (self.connect_timeout > 0 and self.read_timeout > 0):
            raise ValueError(f"timeouts must be > 0, got connect {self.connect_timeout}, read {self.read_timeout}")

    @property
    def methods(self) -> list[str]:
        return [MODEL, *[b for b in BASELINES if b in self.baselines]]

    def rollout(self, max_crops: int | None = None, temperature: float | None = None) -> RolloutConfig:
        return RolloutConfig(global_max_pixels=self.global_max_pixels, crop_max_pixels=self.crop_max_pixels,
                             max_crops=self.max_crops if max_crops is None else max_crops,
                             max_new_tokens=self.max_new_tokens,
                             temperature=self.temperature if temperature is None else temperature, seed=self.seed)


@dataclass
class EvalSet:
    """One manifest's rows to evaluate."""

    name: str
    manifest: Path
    rows: pd.DataFrame


@dataclass
class Evaluation:
    """What :func:`evaluate` produced."""

    metrics: dict[str, float | None]
    predictions: pd.DataFrame
    probes: dict[str, dict[str, probes.ProbeResult]]
    report: Path
    seconds: float


def _set_name(path: Path, taken: set[str]) -> str:
    folder = path if path.is_dir() else path.parent
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", folder.name or "data").strip("-") or "data"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def load_sets(cfg: EvaluateConfig) -> list[EvalSet]:
    """The manifests of ``cfg.data``, filtered to ``cfg.split`` and sampled down to ``cfg.limit``."""
    sets, taken = [], set()
    for spec in cfg.data:
        path = Path(spec)
        frame = read_manifest(path)
        manifest = Path(frame.attrs["path"])
        if cfg.split != "all":
            present = sorted(set(frame["split"].astype(str)))
            frame = frame[frame["split"] == cfg.split]
            if frame.empty:
                raise QProbeError(f"{manifest}: no rows in split {cfg.split!r} (splits present: "
                                  f"{', '.join(present) or 'none'}); pass --split all to evaluate every row")
        frame = frame.sort_values("id").reset_index(drop=True)
        if cfg.limit is not None and len(frame) > cfg.limit:
            keep = np.random.default_rng(cfg.seed).choice(len(frame), size=cfg.limit, replace=False)
            frame = frame.iloc[np.sort(keep)].reset_index(drop=True)
        sets.append(EvalSet(name=_set_name(path, taken), manifest=manifest, rows=frame))
    return sets


def make_scorers(cfg: EvaluateConfig, backend: Backend) -> dict[str, Scorer]:
    scorers: dict[str, Scorer] = {MODEL: AgentScorer(backend, cfg.rollout(), name=MODEL)}
    if "no_tool" in cfg.baselines:
        scorers["no_tool"] = AgentScorer(backend, cfg.rollout(max_crops=0), name="no_tool")
    if "piqe" in cfg.baselines:
        scorers["piqe"] = PiqeScorer("global")
    if "piqe_patch" in cfg.baselines:
        scorers["piqe_patch"] = PiqeScorer("patch", tile=cfg.piqe_tile, worst=cfg.piqe_worst)
    return scorers


def _true_defects(row: pd.Series) -> list[dict[str, Any]]:
    defects = row["defects"] if row["defects"] is not None else []
    return [{"type": str(d["type"]), "severity": int(d["severity"]), "bbox": [int(v) for v in d["bbox"]]}
            for d in defects]


def _has_defect(row: pd.Series) -> bool | None:
    value = row["has_defect"]
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else bool(value)


def _record(eval_set: EvalSet, row: pd.Series, path: Path, method: str, prediction: Prediction) -> dict[str, Any]:
    true = _true_defects(row)
    record = {
        "set": eval_set.name, "id": str(row["id"]), "image": str(path), "method": method,
        "mos": float(row["mos"]), "has_defect": _has_defect(row),
        "types": sorted({d["type"] for d in true}), "severity": max((d["severity"] for d in true), default=0),
        "true_defects": true, "score": prediction.score, "raw": prediction.raw, "outcome": prediction.outcome,
        "failure": prediction.failure, "defects": prediction.defects, "crops": prediction.crops,
        "error": prediction.error,
    }
    record.update({f"cost_{k}": prediction.cost.get(k) for k in COST_KEYS})
    return record


def score_sets(sets: Sequence[EvalSet], scorers: dict[str, Scorer], cfg: EvaluateConfig,
               traces: list[dict[str, Any]]) -> tuple[pd.DataFrame, Counter]:
    """Every image of every set through every scorer; unreadable images are counted and skipped."""
    records: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    for eval_set in sets:
        for _, row in tqdm(eval_set.rows.iterrows(), total=len(eval_set.rows), desc=f"evaluate {eval_set.name}",
                           unit="img", file=sys.stderr, disable=None):
            path = image_path(eval_set.manifest, str(row["image"]))
            try:
                image = load_image(path, max_pixels=cfg.max_image_pixels)
            except QProbeError as exc:
                log.warning("skipped: %s", exc)
                skipped[eval_set.name] += 1
                continue
            for method, scorer in scorers.items():
                prediction = scorer(image, seed=cfg.seed)
                records.append(_record(eval_set, row, path, method, prediction))
                if prediction.trace is not None:
                    traces.append({"set": eval_set.name, "id": str(row["id"]), "method": method,
                                   **prediction.trace})
    return pd.DataFrame.from_records(records), skipped


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


def _bokeh_photos(cfg: EvaluateConfig) -> list[tuple[str, Path]]:
    if cfg.bokeh_dir is None:
        return []
    folder = Path(cfg.bokeh_dir)
    if not folder.is_dir():
        log.warning("bokeh probe skipped: %s is not a folder", folder)
        return []
    names = probes.bokeh_list(cfg.bokeh_list)
    missing = [n for n in names
               if not (folder / n).is_file() or (folder / n).suffix.lower() not in IMAGE_EXTENSIONS]
    if missing:
        log.warning("bokeh probe: %d listed photos not in %s (%s)", len(missing), folder, ", ".join(missing[:5]))
    found = [(n, folder / n) for n in names if n not in missing]
    return found[: cfg.bokeh_limit] if cfg.bokeh_limit is not None else found


def run_probes(sets: Sequence[EvalSet], scorers: dict[str, Scorer], backend: Backend,
               cfg: EvaluateConfig) -> dict[str, dict[str, probes.ProbeResult]]:
    """Cropping bias, bokeh and repeatability, each for the methods it is meaningful for."""
    results: dict[str, dict[str, probes.ProbeResult]] = {}

    def load(named: Sequence[tuple[str, Path]]) -> list[tuple[str, Any]]:
        return [(name, load_image(path, max_pixels=cfg.max_image_pixels)) for name, path in named]

    pristine = [(f"{s.name}/{r['id']}", image_path(s.manifest, str(r["image"])))
                for s in sets for _, r in s.rows.iterrows() if _has_defect(r) is False]
    if cfg.crop_bias_images and pristine:
        images = load(pristine[: cfg.crop_bias_images])
        results["crop_bias"] = {
            name: probes.crop_bias(scorer, images, cfg.crop_bias_crops, cfg.global_max_pixels, cfg.crop_max_pixels,
                                   seed=cfg.seed)
            for name, scorer in scorers.items()}
    elif cfg.crop_bias_images:
        log.warning("cropping-bias probe skipped: no image marked pristine (has_defect false) in the sets")

    photos = _bokeh_photos(cfg)
    if photos:
        images = load(photos)
        results["bokeh"] = {name: probes.bokeh(scorer, images, seed=cfg.seed) for name, scorer in scorers.items()}

    if cfg.repeat_images:
        first = [(f"{s.name}/{r['id']}", image_path(s.manifest, str(r["image"])))
                 for s in sets for _, r in s.rows.iterrows()][: cfg.repeat_images]
        sampled = AgentScorer(backend, cfg.rollout(temperature=cfg.repeat_temperature), name=MODEL)
        results["repeat"] = {MODEL: probes.repeatability(sampled, load(first), cfg.repeat_runs, seed=cfg.seed)}
    return results


def training_curves(stages: Sequence[str]) -> pd.DataFrame | None:
    """Reward (and loss) histories of the latest MLflow run of each training stage; ``None`` if there are none.

    Looks in the tracking store and experiment the stage runs use (:mod:`qprobe.tracking`); a store
    that cannot be read is logged and treated as empty: curves are a nicety, not a reason to fail.
    """
    from qprobe.tracking import DEFAULT_EXPERIMENT, EXPERIMENT_ENV, tracking_uri

    if not stages:
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri())
        experiment = client.get_experiment_by_name(os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT))
        if experiment is None:
            return None
        rows = []
        for stage in stages:
            runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`qprobe.stage` = '{stage}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
            if not runs:
                continue
            run = runs[0]
            for key in sorted(run.data.metrics):
                if "reward" not in key.lower() and not key.lower().endswith("loss"):
                    continue
                history = client.get_metric_history(run.info.run_id, key)
                rows.extend({"stage": stage, "run_id": run.info.run_id, "metric": key, "step": m.step,
                             "value": m.value} for m in history)
    except Exception as exc:  # any store trouble (locked sqlite, unreachable server) only costs the curves
        log.warning("training curves skipped: cannot read MLflow (%s)", str(exc).splitlines()[0][:200])
        return None
    frame = pd.DataFrame(rows)
    return frame.sort_values(["stage", "metric", "step"]).reset_index(drop=True) if len(frame) else None


def flatten(nested: dict[str, dict[str, dict]], probe_results: dict[str, dict[str, probes.ProbeResult]],
            extra: dict[str, float]) -> dict[str, float | None]:
    """The metrics file: ``{"set.method.metric": value}``, ``None`` where a value is undefined."""
    flat: dict[str, float | None] = {}
    for set_name, methods in nested.items():
        for method, values in methods.items():
            for key, value in values.items():
                flat[f"{set_name}.{method}.{key}"] = value
    for probe, methods in probe_results.items():
        for method, result in methods.items():
            for key, value in result.summary.items():
                flat[f"probes.{probe}.{method}.{key}"] = value
    flat.update(extra)
    return {k: (None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v))
            for k, v in sorted(flat.items())}


def _json_list(values: Any) -> str:
    return json.dumps(values, separators=(",", ":"))


def write_tables(frame: pd.DataFrame, nested: dict[str, dict[str, dict]], curves: pd.DataFrame | None,
                 methods: Sequence[str], out: Path) -> None:
    """``predictions.csv`` (long: one row per image and method) and the DVC plot data under ``plots/``.

    Plot data is wide, one series per column, the shape ``dvc plots`` draws without a custom
    template: ``scatter_<set>.csv`` (``id, mos, has_defect`` and one score column per method; x
    ``mos``, y the methods), ``groups_<set>.csv`` (``by, group, n`` and ``<method>_srcc`` /
    ``<method>_mae``) and ``curves_<stage>.csv`` (``step`` and one column per logged metric).
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
    if curves is not None:
        for stage, part in curves.groupby("stage", sort=False):
            wide = part.pivot_table(index="step", columns="metric", values="value", aggfunc="last").reset_index()
            write_text_atomic(plots / f"curves_{stage}.csv", wide.to_csv(index=False))


def evaluate(cfg: EvaluateConfig, backend: Backend | None = None) -> Evaluation:
    """Run the whole evaluation of ``cfg`` (see the module docstring); ``backend`` replaces ``cfg.model``."""
    from qprobe.agent.backends import make_backend

    start = time.perf_counter()
    sets = load_sets(cfg)  # bad manifests fail before the model loads
    if backend is None:
        backend = make_backend(cfg.model, served_model=cfg.served_model, connect_timeout=cfg.connect_timeout,
                               read_timeout=cfg.read_timeout)
    out = Path(cfg.out)
    shutil.rmtree(out / "plots", ignore_errors=True)  # no figure of an earlier run survives into this one
    scorers = make_scorers(cfg, backend)
    traces: list[dict[str, Any]] = []
    frame, skipped = score_sets(sets, scorers, cfg, traces)
    if frame.empty:
        raise QProbeError(f"no readable image in {', '.join(str(s.manifest) for s in sets)}")
    nested = all_metrics(frame, sets, cfg)
    probe_results = run_probes(sets, scorers, backend, cfg)
    curves = training_curves(cfg.training_stages)
    seconds = time.perf_counter() - start
    extra = {f"{s.name}.images": float(len(s.rows) - skipped[s.name]) for s in sets}
    extra.update({f"{s.name}.skipped": float(skipped[s.name]) for s in sets})
    extra["seconds"] = round(seconds, 2)
    flat = flatten(nested, probe_results, extra)

    write_tables(frame, nested, curves, cfg.methods, out)
    write_text_atomic(out / "traces.jsonl", "".join(json.dumps(t) + "\n" for t in traces))
    probe_rows = {p: {m: asdict(r) for m, r in methods.items()} for p, methods in probe_results.items()}
    # Undefined numbers (nan) become null: the file stays valid JSON for any reader.
    write_json_atomic(out / "probes.json", json.loads(json.dumps(probe_rows, default=float),
                                                      parse_constant=lambda _: None))
    data = ReportData(
        title="Q-Probe evaluation", model=backend.name, config=to_flat_dict(cfg), sets=[s.name for s in sets],
        methods=cfg.methods, nested=nested, predictions=frame, probes=probe_results, curves=curves,
        gallery=cfg.gallery, stages=list(cfg.training_stages), seconds=seconds,
    )
    figures = write_figures(data, out / "plots")
    report = write_report(data, figures, out / "report.html")
    write_json_atomic(cfg.metrics, flat)
    return Evaluation(metrics=flat, predictions=frame, probes=probe_results, report=report, seconds=seconds)


def parse_args(argv: Sequence[str] | None = None) -> EvaluateConfig:
    """The config of ``qprobe evaluate ARGV``: ``params.yaml``'s ``evaluate:`` section, then the flags.

    ``--data`` takes several manifests after one flag (``--data a b c``) as well as a YAML list.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data", nargs="+", action="extend")
    known, rest = pre.parse_known_args(argv)
    if known.data:
        single_list = len(known.data) == 1 and known.data[0].lstrip().startswith("[")
        rest += ["--data", known.data[0] if single_list else json.dumps(known.data)]
    return parse_config(EvaluateConfig, "evaluate", rest, prog="qprobe evaluate", description=main.__doc__)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate a model and its baselines on labelled photos; write metrics, plots and an HTML report.

    With no options it runs the ``evaluate:`` section of ``params.yaml`` (what ``dvc repro evaluate`` runs)::

        qprobe evaluate
        qprobe evaluate --model models/stage3 --data data/bench --out outputs/evaluate
        qprobe evaluate --model http://localhost:8000/v1 --data data/koniq data/spaq --split all --limit 500
        qprobe evaluate --model models/stage3 --data my_photos/manifest.parquet --split all --baselines "[piqe]"

    Writes ``OUT/report.html``, ``OUT/predictions.csv``, ``OUT/traces.jsonl``, ``OUT/probes.json``,
    ``OUT/plots/`` and the metrics file (``metrics/evaluate.json``).
    """
    from qprobe.tracking import log_artifact, log_dataset, log_metrics, stage_run

    cfg = parse_args(argv)
    manifest_folders = [p if p.is_dir() else p.parent for p in map(Path, cfg.data)]
    check_out_vs_in(cfg.out, *manifest_folders, cfg.model if Path(cfg.model).is_dir() else None, what="--out")
    with stage_run("evaluate", to_flat_dict(cfg)):
        for spec in cfg.data:
            log_dataset(spec, name=f"eval:{spec}", context="input")
        result = evaluate(cfg)
        # A user's manifest may name defect types with characters MLflow refuses in metric names.
        log_metrics({re.sub(r"[^\w\-. :/]", "_", k): v for k, v in result.metrics.items() if v is not None})
        out = Path(cfg.out)
        for path in (result.report, Path(cfg.metrics), out / "predictions.csv", out / "probes.json"):
            log_artifact(path)
        for path in sorted((out / "plots").glob("*")):
            log_artifact(path, artifact_path="plots")
    for name in dict.fromkeys(result.predictions["set"]):
        srcc, answered = (result.metrics.get(f"{name}.{MODEL}.{k}") for k in ("srcc", "answer_rate"))
        print(f"evaluate {name}: SRCC {_fmt(srcc)}, answer rate {_fmt(answered)}")
    print(f"evaluate: {result.seconds:.0f} s; report {result.report}, metrics {cfg.metrics}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
