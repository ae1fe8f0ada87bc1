"""The Q-Probe pipeline flow: every stage of ``dvc.yaml``, in dependency order, under one MLflow parent run.

Each stage runs as ``dvc repro --single-item STAGE`` (see :mod:`tasks.dvc_stage`), so a flow run and a
plain ``dvc repro`` share one cache: run the flow twice and the second run does no stage work; after
it ``dvc status`` is clean. The MLflow parent run carries the profile, the git commit, ``dvc.lock``,
``params.yaml`` in force as params (:func:`_params_in_force`), the headline figures as metrics
(:mod:`qprobe.headline`: wall time per stage, correlations, answer rate, ...) and every stage's
metrics file in one JSON artifact (``metrics.json``); each stage's own run nests under it (the
parent's id reaches the stage through ``QPROBE_PARENT_RUN_ID``), so MLflow's compare view shows
what differs between whole pipeline runs;
the parent run also links the Prefect flow run (id and UI link) and carries the evaluation report and
the version of the final model it registered (``models/stage3`` as a new version of ``qprobe``).

SIGINT or SIGTERM stops the running stage's process group, ends the parent run and the stage's run
KILLED, stops Prefect's temporary server and exits 128 + the signal number. After a SIGKILL nothing
could do that: the next run marks FAILED the runs its dead predecessor left RUNNING.

Run it::

    python -m flows.pipeline                      # all stages, embedded default profile
    python -m flows.pipeline --stages bench       # a subset, in dvc.yaml order
    python -m flows.pipeline --profile paper      # switch params.yaml to configs/paper.yaml first
    python -m flows.pipeline --profile paper --target kubernetes --image ghcr.io/ORG/qprobe:TAG
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from qprobe.config import PARAMS_FILE, command_parser, load_params, repo_root, to_flat_dict
from qprobe.eval.config import TRAINING_STAGES
from qprobe.headline import pipeline_figures
from qprobe.profiles import apply_profile
from qprobe.tracking import (
    MODEL_NAME,
    fail_orphaned_runs,
    register_model,
    stage_run,
    tracking_uri,
    trainer_params,
)
from tasks.dvc_stage import StageResult, launch_stage, run_stage, stage_order, status_verdict

# The stages that want accelerators; with a cluster target they run there, the rest run here.
GPU_STAGES = ("stage1", "stage2", "stage3")
# The pipeline's final model and the stage that writes it (dvc.yaml): registered after each run that has it.
FINAL_STAGE, FINAL_MODEL = "stage3", "models/stage3"
# The evaluate stage's report (its `out` in params.yaml).
REPORT = Path("outputs/evaluate/report.html")


def _metrics_of(root: Path, result: StageResult) -> dict[str, Any]:
    """The stage's DVC metrics files, as written (nested), merged into one mapping."""
    metrics: dict[str, Any] = {}
    for out in result.lock.get("outs", []):
        path = root / out.get("path", "")
        if path.suffix == ".json" and path.parent.name == "metrics" and path.is_file():
            metrics.update(json.loads(path.read_text()))
    return metrics


def _params_in_force(root: Path) -> dict[str, Any]:
    """``params.yaml`` flattened as ``section.key``, the training sections as their runs log them.

    A training section holds Q-Probe's fields and only those of trl's that differ from trl's
    defaults (:func:`qprobe.tracking.trainer_params`): two runs differ in MLflow where their
    experiments differ, not in trl's ~200 defaults.
    """
    flat: dict[str, Any] = {}
    for section, values in load_params(root / PARAMS_FILE).items():
        if section in TRAINING_STAGES:
            from qprobe.train.common import stage_config  # trl: loaded only here

            values = trainer_params(stage_config(section), values or {})
        flat.update(to_flat_dict(values or {}, prefix=f"{section}."))
    return flat


def _tag_stage_runs(parent_id: str, results: list[StageResult]) -> None:
    """Put each stage's DVC hashes on its own MLflow run (lineage a stage cannot know while running)."""
    import mlflow

    client = mlflow.MlflowClient()
    for result in results:
        if not result.ran:
            continue
        runs = mlflow.search_runs(
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and tags.`qprobe.stage` = '{result.stage}'",
            output_format="list",
        )
        for run in runs:
            for kind in ("deps", "outs"):
                for entry in result.lock.get(kind, []):
                    digest = entry.get("md5") or entry.get("etag")
                    if digest:
                        client.set_tag(run.info.run_id, f"dvc.{kind}.{entry['path']}", digest)


def mlflow_link(uri: str, experiment_id: str, run_id: str) -> str:
    """How to open a run in the MLflow UI: its URL on a tracking server; for a local store, the command that
    serves it, then the URL."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    return (f"`{Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri {uri}`, "
            f"then open http://127.0.0.1:5000/{page}")


def _summary_markdown(results: list[StageResult], figures: dict[str, float], run: Any, uri: str,
                      report: Path) -> str:
    """The flow run's artifact: links to the MLflow run and the report, each stage's time, the headline figures."""
    link = mlflow_link(uri, run.info.experiment_id, run.info.run_id)
    lines = [f"# Q-Probe pipeline run `{run.info.run_id}`", "", f"- MLflow run: {link}",
             f"- Report: `{report}`" if report.is_file() else "- Report: none yet (the evaluate stage writes it)",
             "", "| stage | ran | seconds |", "|---|---|---|"]
    lines += [f"| {r.stage} | {'yes' if r.ran else 'cached'} | {r.seconds:.1f} |" for r in results]
    shown = {k: v for k, v in figures.items() if not k.startswith("seconds.")}  # the table above has them
    if shown:
        lines += ["", "| headline | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in shown.items()]
    return "\n".join(lines)


def _log_model_and_report(root: Path, selected: list[str], parent_id: str) -> str | None:
    """Register :data:`FINAL_MODEL` as a new version (one per run that includes its stage); link the report.

    Both go on the parent run: the version as a tag, the evaluation report as an artifact.
    """
    import mlflow

    if (root / REPORT).is_file():
        mlflow.log_artifact(str(root / REPORT))
    if FINAL_STAGE not in selected:
        return None
    version = register_model(root / FINAL_MODEL, tags={"pipeline_run": parent_id}, root=root)
    mlflow.set_tag("model.version", f"{MODEL_NAME}/{version}")
    return version


@flow(name="qprobe-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, profile: str | None = None, force: bool = False,
             root: str | None = None, target: str = "local", cluster_stages: list[str] | None = None,
             launch_options: dict[str, Any] | None = None, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``stages`` (default: all of dvc.yaml) in dependency order under one MLflow parent run.

    ``tags`` go on that parent run (``qprobe experiments run`` names the experiment and variant there).

    ``target`` ``kubernetes`` or ``skypilot`` sends ``cluster_stages`` (default: the training stages)
    to that cluster through ``qprobe launch`` (``launch_options``: fields of
    :class:`qprobe.ops.launch.LaunchConfig`, e.g. image and gpus); every other stage runs here.
    """
    logger = get_run_logger()
    root_path = Path(root) if root else repo_root()
    # The stages and this parent run must write to the same store, whatever the working directory.
    stage_env = {"MLFLOW_TRACKING_URI": tracking_uri(root_path)}
    if profile:
        changed = apply_profile(profile, root_path)
        logger.info("profile %s applied to params.yaml (%d values changed)", profile, changed)
    load_params(root_path / PARAMS_FILE)  # a misspelt section fails here, before any stage runs
    order = stage_order(root_path)
    unknown = sorted(set(stages or []) - set(order))
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; dvc.yaml has: {', '.join(order)}")
    selected = [s for s in order if stages is None or s in stages]

    import mlflow

    fail_orphaned_runs(root_path)
    results: list[StageResult] = []
    with stage_run("pipeline", {"stages": ",".join(selected), "profile": profile or "params.yaml",
                                "force": force, **_params_in_force(root_path)},
                   tags={**(tags or {}), "prefect.flow_run_id": str(flow_run.get_id() or ""),
                         # the flow run in Prefect's UI, where one is served (not the temporary server)
                         **({"prefect.flow_run_url": url} if (url := flow_run.get_flow_run_ui_url()) else {})},
                   root=root_path) as parent:
        parent_id = parent.info.run_id
        link = mlflow_link(tracking_uri(root_path), parent.info.experiment_id, parent_id)
        logger.info("MLflow run %s: %s", parent_id, link)
        remote = set(cluster_stages or GPU_STAGES) if target != "local" else set()
        for i, stage in enumerate(selected, 1):
            where = f"on {target}" if stage in remote else "here"
            logger.info("stage %s (%d/%d): started %s", stage, i, len(selected), where)
            if stage in remote:
                result = launch_stage(stage, target, str(root_path), parent_id, launch_options)
            else:
                result = run_stage(stage, str(root_path), parent_id, stage_env, force=force)
            logger.info("stage %s (%d/%d): %s, %.1f s", stage, i, len(selected), "ran" if result.ran else "cached",
                        result.seconds)
            results.append(result)
        stage_metrics = {r.stage: _metrics_of(root_path, r) for r in results}
        figures = pipeline_figures(stage_metrics, {r.stage: r.seconds for r in results})
        mlflow.log_metrics(figures)
        mlflow.log_dict(stage_metrics, "metrics.json")  # the full detail behind the headline
        mlflow.set_tags({f"stage.{r.stage}": "ran" if r.ran else "cached" for r in results})
        if (root_path / "dvc.lock").is_file():
            mlflow.log_artifact(str(root_path / "dvc.lock"))
        _tag_stage_runs(parent_id, results)
        model_version = _log_model_and_report(root_path, selected, parent_id)
    summary = _summary_markdown(results, figures, parent, stage_env["MLFLOW_TRACKING_URI"], root_path / REPORT)
    create_markdown_artifact(summary, key="qprobe-pipeline-summary")
    return {"run_id": parent_id, "mlflow": link, "stages": {r.stage: r.ran for r in results}, "metrics": figures,
            "model_version": model_version}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so every ``with`` and ``finally`` on the way out runs.

    A KeyboardInterrupt, like Ctrl-C's own. While the flow runs, Prefect's SIGTERM handler raises its
    TerminationSignal instead (the stage is stopped, the runs end KILLED: any interruption does that);
    once the flow has ended Prefect sends the signal again to the handler it replaced, this one.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("python -m flows.pipeline", __doc__)
    parser.add_argument("--stages", nargs="+", help="stages to run (default: all, in dvc.yaml order)")
    parser.add_argument("--profile", help="apply configs/PROFILE.yaml to params.yaml first (e.g. paper)")
    parser.add_argument("--force", action="store_true", help="re-run stages even when DVC finds them up to date")
    parser.add_argument("--target", default="local", choices=["local", "kubernetes", "skypilot"],
                        help="where the training stages run (the others always run here)")
    parser.add_argument("--image", help="container image for a cluster target (default: $QPROBE_IMAGE)")
    parser.add_argument("--gpus", type=int, help="GPUs per training stage on a cluster target")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                        help="a tag of the pipeline's MLflow run (repeatable)")
    args = parser.parse_args(argv)
    bad = [tag for tag in args.tag if "=" not in tag]
    if bad:
        parser.error(f"--tag {bad[0]!r}: expected KEY=VALUE")
    options = {k: v for k, v in {"image": args.image, "gpus": args.gpus}.items() if v is not None}
    # Python's default SIGTERM ends the process on the spot: no cleanup, and Prefect's temporary
    # server, which stops at interpreter exit, would outlive it. Exiting through main does it all.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_interrupted)
    try:
        result = pipeline(stages=args.stages, profile=args.profile, force=args.force, target=args.target,
                          launch_options=options, tags=dict(tag.split("=", 1) for tag in args.tag))
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"python -m flows.pipeline: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    root = repo_root()
    print()
    print(f"Pipeline run {result['run_id']} finished: " +
          ", ".join(f"{s} {'ran' if ran else 'cached'}" for s, ran in result["stages"].items()))
    print(f"  outputs:  {root / 'data'}  {root / 'models'}  (DVC-tracked; `dvc status`: {status_verdict(root)})")
    print(f"  metrics:  {root / 'metrics'}  (`dvc metrics show`, `dvc plots show`)")
    report = root / REPORT
    if report.is_file():
        print(f"  report:   {report}")
    print(f"  MLflow:   {result['mlflow']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
