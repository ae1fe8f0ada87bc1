"""``qprobe experiments list|run|report``: the paper's comparisons, one command each.

Examples::

    qprobe experiments list
    qprobe experiments run table4                       # embedded default, on this machine
    qprobe experiments run table3 --profile paper --target kubernetes
    qprobe experiments report table4                    # the table again, from the saved DVC experiments
"""

from __future__ import annotations

from collections.abc import Sequence

from qprobe.config import command_parser, repo_root
from qprobe.experiments.registry import exp_name, experiment, experiments

REPORTS_HELP = "writes outputs/experiments/NAME/report.md and report.html"


def _list() -> None:
    for exp in experiments(repo_root()).values():
        print(f"{exp.name}: {exp.reproduces}")
        for variant in exp.variants:
            overrides = ", ".join(f"{k}={v}" for k, v in variant.overrides.items())
            stages = f"  (stages: {' '.join(variant.stages)})" if variant.stages else ""
            print(f"  {exp_name(exp.name, variant.name):<26} {variant.label}: {overrides}{stages}")
        for note in exp.notes:
            print(f"  {note}")


def _report(name: str) -> None:
    from qprobe.experiments.report import write_report
    from qprobe.experiments.runner import EXPERIMENT_TAG, REPORTS
    from qprobe.tracking import log_artifact, stage_run

    root = repo_root()
    exp = experiment(name, root)
    with stage_run("experiment report", {"experiment": name}, tags={EXPERIMENT_TAG: name}, root=root):
        md, html, text = write_report(root, exp, root / REPORTS / name)
        log_artifact(md)
        log_artifact(html)
    print(text)
    print(f"report: {md}  {html}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = command_parser("qprobe experiments", __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="every experiment, the paper's figure it reproduces, its variants")
    run = commands.add_parser("run", help=f"run every variant as a DVC experiment and an MLflow run; {REPORTS_HELP}")
    run.add_argument("name", help="an experiment of `qprobe experiments list`")
    run.add_argument("--profile", help="apply configs/PROFILE.yaml under each variant's overrides (e.g. paper)")
    run.add_argument("--target", default="local", choices=["local", "kubernetes", "skypilot"],
                     help="where the training stages run (the flow's --target; image from $QPROBE_IMAGE)")
    report = commands.add_parser("report", help=f"the table from the saved DVC experiments; {REPORTS_HELP}")
    report.add_argument("name", help="an experiment of `qprobe experiments list`")
    args = parser.parse_args(argv)
    if args.command == "list":
        _list()
    elif args.command == "report":
        _report(args.name)
    else:
        from qprobe.experiments.runner import REPORTS, run_experiment

        root = repo_root()
        exp = experiment(args.name, root)
        for note in exp.notes:
            print(note)
        print(run_experiment(exp, root, args.profile, args.target))
        print(f"report: {root / REPORTS / exp.name}/report.md and report.html; `dvc exp show` lists the variants")
    return 0
