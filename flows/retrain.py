"""Scheduled retraining: new photos in, a challenger trained, and the champion replaced only if beaten.

Each run of the ``qprobe-retrain`` flow:

1. mirrors the photos under the S3 prefix ``incoming`` into the bench's photo folder (boto3);
2. records the folder as a new DVC data version (``dvc add``) and writes its md5 into
   ``params.yaml`` (``bench.source_version``), so the bench stage, and everything after it, re-runs,
   and the run's ``dvc.lock`` names the data it was trained on;
3. runs the pipeline flow (all stages, ``dvc repro`` underneath);
4. gives the alias ``challenger`` to the version of ``qprobe`` the pipeline run registered (or registers
   ``model`` when it is another folder), evaluates it and
   the registered ``champion`` on the same fixed sets (the ``evaluate:`` params), and moves
   ``champion`` only if the challenger wins on ``metric`` by at least ``margin``.

The decision and its table are a Prefect markdown artifact and tags on the MLflow parent run.

Serve it on a schedule (weekly by default) with a ``process`` work pool::

    prefect work-pool create qprobe --type process
    prefect deploy --all                 # prefect.yaml: the cron schedule and parameters
    prefect worker start --pool qprobe

or without a work pool: ``python -m flows.retrain --serve`` (``flow.serve`` with the same cron).
One run now: ``python -m flows.retrain --incoming s3://bucket/incoming/``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import FINAL_MODEL, pipeline
from qprobe.config import command_parser, from_dict, load_params, repo_root
from qprobe.profiles import update_params
from qprobe.tracking import set_alias, stage_run
from tasks.data import pull_new_photos, version_data
from tasks.registry import Decision, champion_model, decide, evaluate_model, register


@dataclass
class RetrainConfig:
    incoming: str | None = field(default=None, metadata={
        "help": "S3 prefix of new photos (s3://bucket/prefix/); null: retrain on what is there"})
    photos: str = field(default="data/photos", metadata={
        "help": "DVC-tracked photo folder the bench reads (bench.source is set to it)"})
    model: str = field(default=FINAL_MODEL, metadata={
        "help": "model folder the challenger is; the pipeline's final model is the version its run registered"})
    metric: str = field(default="bench.qprobe.srcc", metadata={
        "help": "key of the evaluate metrics that decides (any of metrics_full.json; higher is better)"})
    margin: float = field(default=0.01, metadata={"help": "how much the challenger must win by"})
    stages: list[str] | None = field(default=None, metadata={"help": "pipeline stages (null: all)"})
    evaluate_args: list[str] = field(default_factory=list, metadata={
        "help": "extra `qprobe evaluate` flags for both models (e.g. [--limit, '100'])"})
    cron: str = field(default="0 3 * * 1", metadata={"help": "schedule of the deployment (weekly, Monday 03:00)"})


def load_config(root: Path, overrides: dict[str, Any]) -> RetrainConfig:
    params = load_params(root / "params.yaml").get("retrain") or {}
    return from_dict(RetrainConfig, {**params, **{k: v for k, v in overrides.items() if v is not None}},
                     f"{root / 'params.yaml'}:retrain")


def _table(decision: Decision, metric: str, versions: dict[str, str | None], data_version: str | None) -> str:
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    return "\n".join([
        "# Q-Probe retraining decision", "",
        f"**{'Promoted' if decision.promote else 'Kept the champion'}**: {decision.reason}.", "",
        f"| model | registry version | {metric} |", "|---|---|---|",
        f"| challenger | {versions['challenger']} | {fmt(decision.challenger)} |",
        f"| champion | {versions['champion'] or '-'} | {fmt(decision.champion)} |", "",
        f"Data version: `{data_version or 'unchanged'}`",
    ])


@flow(name="qprobe-retrain", log_prints=True)
def retrain(incoming: str | None = None, margin: float | None = None, metric: str | None = None,
            stages: list[str] | None = None, root: str | None = None) -> dict[str, Any]:
    """Pull new photos, retrain through the pipeline, and promote the challenger if it wins."""
    logger = get_run_logger()
    root_path = Path(root) if root else repo_root()
    cfg = load_config(root_path, {"incoming": incoming, "margin": margin, "metric": metric, "stages": stages})
    data_version = None
    if cfg.incoming:
        new = pull_new_photos(cfg.incoming, cfg.photos, str(root_path))
        if new or not (root_path / f"{cfg.photos}.dvc").is_file():
            data_version = version_data(cfg.photos, str(root_path))
            update_params({"bench": {"source": cfg.photos, "source_version": data_version}}, root_path, "retrain")
    result = pipeline(stages=cfg.stages, root=str(root_path))

    with stage_run("retrain", {k: str(v) for k, v in asdict(cfg).items()}, root=root_path) as run:
        challenger = register(cfg.model, str(root_path), {"pipeline_run": result["run_id"],
                                                          "data_version": data_version or ""},
                              result["model_version"] if cfg.model == FINAL_MODEL else None)
        champion, champion_dir = champion_model(str(root_path))
        scores = {"challenger": evaluate_model(cfg.model, "challenger", str(root_path), cfg.evaluate_args,
                                               run.info.run_id)}
        if champion_dir:
            scores["champion"] = evaluate_model(champion_dir, "champion", str(root_path), cfg.evaluate_args,
                                                run.info.run_id)
        decision = decide(scores["challenger"].get(cfg.metric),
                          scores.get("champion", {}).get(cfg.metric), cfg.margin)
        if decision.promote:
            set_alias("champion", challenger, root=root_path)
        mlflow.set_tags({"decision": "promoted" if decision.promote else "kept", "decision.reason": decision.reason,
                         "challenger.version": challenger, "champion.version": champion or ""})
        mlflow.log_metrics({f"{label}.{cfg.metric}": s[cfg.metric] for label, s in scores.items()
                            if isinstance(s.get(cfg.metric), int | float)})
    versions = {"challenger": challenger, "champion": champion}
    create_markdown_artifact(_table(decision, cfg.metric, versions, data_version), key="qprobe-retrain-decision")
    logger.info("retrain: %s (%s)", "promoted" if decision.promote else "kept the champion", decision.reason)
    return {"promoted": decision.promote, "reason": decision.reason, "challenger": challenger,
            "champion": champion, "data_version": data_version, "pipeline_run": result["run_id"]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("python -m flows.retrain", __doc__)
    parser.add_argument("--incoming", help="S3 prefix of new photos (default: retrain.incoming in params.yaml)")
    parser.add_argument("--margin", type=float, help="how much the challenger must win by")
    parser.add_argument("--serve", action="store_true",
                        help="serve the flow on its cron schedule (flow.serve) instead of running it once")
    args = parser.parse_args(argv)
    if args.serve:
        cfg = load_config(repo_root(), {})
        retrain.serve(name="qprobe-retrain-weekly", cron=cfg.cron,
                      parameters={"incoming": args.incoming or cfg.incoming})
        return 0
    result = retrain(incoming=args.incoming, margin=args.margin)
    print(f"retrain: {'promoted' if result['promoted'] else 'kept the champion'} ({result['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
