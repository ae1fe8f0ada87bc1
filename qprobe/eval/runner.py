"""``qprobe evaluate``: score labelled photos with Q-Probe and its baselines; metrics, probes, report.

For each evaluation set (any manifest with a ``mos`` column: the bench's test split, an imported
public IQA set, or a user's own labelled photos; :func:`qprobe.eval.scoring.load_sets`) every image
is scored by

* ``qprobe``: the model, a full rollout (global view, crops at native resolution, answer);
* ``no_tool``: the same model with the tool disabled (``max_crops = 0``: one look at the global view);
* ``piqe`` and ``piqe_patch``: the classical no-reference baseline, globally and over its worst tiles
  at native resolution (:mod:`qprobe.eval.baselines`);
* ``ssim``: the full-reference yardstick, SSIM against the image's pristine original where its set
  has one (the bench does: its photo's defect-free image; public sets do not): how well a method that
  sees the defects, and nothing of the content, ranks the set;

each baseline can be switched off (:mod:`qprobe.eval.config`). The predictions table
(:mod:`qprobe.eval.scoring`) gives, per set and method (:mod:`qprobe.eval.summary`, the statistics
in :mod:`qprobe.eval.metrics`): SRCC, KRCC, PLCC raw and after the 4-parameter logistic mapping,
RMSE, their 95% bootstrap intervals (paired across methods), the answer rate and the count of each
outcome and parse failure; the same per degradation type and per severity; localisation of defect
boxes (mean Hungarian IoU, recall and precision at IoU 0.5, false alarms on pristine images); and
for the agents the cost per image: turns, crops, visual and text tokens, seconds, and the
visual-token ratio to one pass at full resolution. Then the behavioural probes
(:mod:`qprobe.eval.probes`): cropping bias on pristine images, bokeh on shallow-depth-of-field
photos, and repeatability under sampling. The reward curves of the training stages come from the
curve files each stage writes beside its metrics (:mod:`qprobe.eval.curves`).

Outputs (``--out DIR``, :mod:`qprobe.eval.outputs`): ``predictions.csv`` (one row per image and
method), ``traces.jsonl`` (every agent turn), ``probes.json``, ``plots/`` (DVC plot data: predicted
score against MOS and the per-type and per-severity statistics per set, and the training curves;
and the report's figures as PNG, :mod:`qprobe.eval.figures`) and ``report.html``, a self-contained report
(:mod:`qprobe.eval.report`) whose gallery opens full-size images in ``report_images/``, and
``metrics_full.json``, every metric as one flat JSON object,
``{"<set>.<method>.<metric>": value}``, undefined values as ``null``. The metrics file
(``metrics/evaluate.json``) is its summary, nested (:func:`qprobe.eval.outputs.summary_metrics`), so
``dvc metrics show`` stays readable. The stage's MLflow run logs the headline figures
(:mod:`qprobe.headline`) as metrics, and the files as artifacts.

A model that answers out of protocol (the tiny random model does, nearly always) is evaluated all
the same: its images count as unanswered, by failure kind, and its correlations are undefined.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from qprobe.agent.backends import Backend
from qprobe.agent.protocol_config import ProtocolLimits, check_limits
from qprobe.config import parse_config, to_flat_dict
from qprobe.errors import QProbeError
from qprobe.eval.config import MODEL, EvaluateConfig
from qprobe.eval.curves import stage_of, training_curves
from qprobe.eval.figures import write_figures
from qprobe.eval.outputs import (
    FULL_METRICS,
    OUTPUT_NAMES,
    flat_metrics,
    summary_metrics,
    write_probes,
    write_tables,
    write_traces,
)
from qprobe.eval.probes import ProbeResult, run_probes
from qprobe.eval.report import ReportData, write_report
from qprobe.eval.scoring import load_sets, make_scorers, score_sets
from qprobe.eval.summary import all_metrics
from qprobe.io import check_out_vs_in, check_owned, mark_owned, write_json_atomic
from qprobe.pages import pictures_folder


@dataclass
class Evaluation:
    """What :func:`evaluate` produced."""

    metrics: dict[str, float | None]  # every metric, flat (``metrics_full.json``)
    summary: dict[str, Any]  # the DVC metrics file's nested summary
    predictions: pd.DataFrame
    probes: dict[str, dict[str, ProbeResult]]
    report: Path
    seconds: float


def evaluate(cfg: EvaluateConfig, backend: Backend | None = None) -> Evaluation:
    """Run the whole evaluation of ``cfg`` (see the module docstring); ``backend`` replaces ``cfg.model``."""
    start = time.perf_counter()
    # Evaluate prunes its own plots in its folder: the folder must be one this command wrote.
    check_owned(cfg.out, "evaluate", known=OUTPUT_NAMES)
    sets = load_sets(cfg)  # bad manifests fail before the model loads
    if backend is None:
        check_limits(cfg.model, cfg.protocol, ProtocolLimits.BUDGETS)
        backend = cfg.backend(cfg.model)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mark_owned(out, "evaluate")
    shutil.rmtree(out / "plots", ignore_errors=True)  # no figure of an earlier run survives into this one
    scorers = make_scorers(cfg, backend)
    traces: list[dict[str, Any]] = []
    frame, skipped = score_sets(sets, scorers, cfg, traces, concurrency=cfg.in_flight(backend))
    if frame.empty:
        raise QProbeError(f"no readable image in {', '.join(str(s.manifest) for s in sets)}")
    nested = all_metrics(frame, sets, cfg)
    probe_results = run_probes(sets, scorers, backend, cfg)
    curves = training_curves(cfg.curves)
    seconds = time.perf_counter() - start
    extra = {f"{s.name}.images": float(len(s.rows) - skipped[s.name]) for s in sets}
    extra.update({f"{s.name}.skipped": float(skipped[s.name]) for s in sets})
    # Images of one photo are not independent: how many photos the intervals rest on.
    extra.update({f"{s.name}.sources": float(s.rows["source"].nunique()) for s in sets})
    extra["seconds"] = round(seconds, 2)
    flat = flat_metrics(nested, probe_results, extra)

    write_tables(frame, nested, cfg.methods, out)
    write_traces(traces, out / "traces.jsonl")
    write_probes(probe_results, out / "probes.json")
    data = ReportData(
        title="Q-Probe evaluation", model=backend.name, config=to_flat_dict(cfg), sets=[s.name for s in sets],
        methods=cfg.methods, nested=nested, predictions=frame, probes=probe_results, curves=curves,
        gallery=cfg.gallery, stages=[stage_of(p) for p in cfg.curves], seconds=seconds,
    )
    figures = write_figures(data, out / "plots")
    report = write_report(data, figures, out / "report.html")
    write_json_atomic(out / FULL_METRICS, flat)
    summary = summary_metrics(flat, [s.name for s in sets])
    write_json_atomic(cfg.metrics, summary)
    return Evaluation(metrics=flat, summary=summary, predictions=frame, probes=probe_results, report=report, seconds=seconds)


def parse_args(argv: Sequence[str] | None = None) -> EvaluateConfig:
    """The config of ``qprobe evaluate ARGV``: ``params.yaml``'s ``evaluate:`` section, then the flags."""
    return parse_config(EvaluateConfig, "evaluate", argv, prog="qprobe evaluate", description=main.__doc__)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate a model and its baselines on labelled photos; write metrics, plots and an HTML report.

    The steps (:func:`evaluate`): read the sets (manifests with a ``mos`` column), score every image
    with the model, the model without its crop tool, PIQE (globally and patch-wise) and SSIM against
    the image's pristine original; compute each method's correlations with MOS and their bootstrap
    intervals, per-type and per-severity statistics, box localisation and cost; run the cropping-bias,
    bokeh and repeatability probes; read the training stages' curve files; write the tables, plot
    data, report, every metric (``OUT/metrics_full.json``) and their summary (the metrics file).

    With no options it runs the ``evaluate:`` section of ``params.yaml`` (what ``dvc repro evaluate`` runs)::

        qprobe evaluate
        qprobe evaluate --model models/stage3 --data data/bench --out outputs/evaluate
        qprobe evaluate --model http://localhost:8000/v1 --data data/koniq data/spaq --split all --limit 500
        qprobe evaluate --model models/stage3 --data my_photos/manifest.parquet --split all --baselines piqe no_tool

    Writes ``OUT/report.html``, ``OUT/predictions.csv``, ``OUT/traces.jsonl``, ``OUT/probes.json``,
    ``OUT/metrics_full.json``, ``OUT/plots/``, ``OUT/report_images/`` and the metrics file (``metrics/evaluate.json``).
    """
    from qprobe.headline import capped, evaluate_figures
    from qprobe.tracking import log_artifact, log_dataset, log_metrics, stage_run

    cfg = parse_args(argv)
    manifest_folders = [p if p.is_dir() else p.parent for p in map(Path, cfg.data)]
    check_out_vs_in(cfg.out, *manifest_folders, cfg.model if Path(cfg.model).is_dir() else None, what="--out")
    with stage_run("evaluate", to_flat_dict(cfg)):
        for spec in cfg.data:
            log_dataset(spec, name=f"eval:{spec}", context="input")
        result = evaluate(cfg)
        # A user's manifest may name sets with characters MLflow refuses in metric names.
        figures = capped({"seconds": round(result.seconds, 2), **evaluate_figures(result.summary)})
        log_metrics({re.sub(r"[^\w\-. :/]", "_", k): v for k, v in figures.items()})
        out = Path(cfg.out)
        for path in (result.report, Path(cfg.metrics), out / FULL_METRICS, out / "predictions.csv",
                     out / "probes.json"):
            log_artifact(path)
        for folder in (out / "plots", pictures_folder(result.report)):
            for path in sorted(folder.glob("*")):
                log_artifact(path, artifact_path=folder.name)
    for name in dict.fromkeys(result.predictions["set"]):
        srcc, answered = (result.metrics.get(f"{name}.{MODEL}.{k}") for k in ("srcc", "answer_rate"))
        print(f"evaluate {name}: SRCC {_fmt(srcc)}, answer rate {_fmt(answered)}")
    print(f"evaluate: {result.seconds:.0f} s; report {result.report}, metrics {cfg.metrics}")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
