"""`qprobe experiments`: the registry's overrides are real params, and a run in a repository copy makes each
variant a DVC experiment and a tagged MLflow run, writes the table and leaves the workspace as it was."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from repo_copy import copy_repo

from qprobe.cli import main as cli_main
from qprobe.config import load_params
from qprobe.eval.outputs import summary_metrics
from qprobe.experiments.registry import Experiment, Variant, experiments, resolve
from qprobe.experiments.report import FIGURE_KEYS, figures
from qprobe.experiments.runner import restore, run_experiment, snapshot
from qprobe.profiles import set_params

REPO = Path(__file__).resolve().parents[1]


def _has(params: dict, key: str) -> bool:
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("profile", [None, "paper"])
def test_every_override_names_a_param_and_every_stage_a_dvc_stage(profile: str | None, tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    if profile:
        shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
        shutil.copytree(REPO / "configs", tmp_path / "configs")
        from qprobe.profiles import apply_profile

        apply_profile(profile, tmp_path)
        params = load_params(tmp_path / "params.yaml")
    stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    registry = experiments(REPO)
    assert {"stages", "table3", "table4", "datasets"} <= set(registry)
    for exp in registry.values():
        assert len({v.name for v in exp.variants}) == len(exp.variants) >= 1, exp.name
        for variant in exp.variants:
            resolved = resolve(variant.overrides, params)
            assert all(_has(params, key) for key in resolved), (exp.name, variant.name)
            assert not any(isinstance(v, str) and v.startswith("@") for v in resolved.values())
            assert set(variant.stages or ()) <= stages
    base = resolve(registry["stages"].variants[0].overrides, params)["evaluate.model"]
    assert base == params["stage1"]["model"]  # the tiny model here, the 7B at paper scale


def test_set_params_replaces_a_mapping_whole_and_keeps_comments(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("stage3:  # the RL stage\n  rewards: {accuracy: 1.0, localization: 0.5}"
                                          "\n  reward_mode: decoupled   # or joint\n")
    changed = set_params({"stage3.rewards": {"accuracy": 1.0}, "stage3.reward_mode": "joint",
                          "stage3.beta": 0.1}, tmp_path)
    text = (tmp_path / "params.yaml").read_text()
    assert changed == 3 and "# the RL stage" in text and "# or joint" in text
    assert yaml.safe_load(text)["stage3"] == {"rewards": {"accuracy": 1.0}, "reward_mode": "joint", "beta": 0.1}
    assert set_params({"stage3.reward_mode": "joint"}, tmp_path) == 0


def test_datasets_evaluates_the_imported_sets_and_names_the_import_of_the_rest(tmp_path: Path) -> None:
    (tmp_path / "data/public/spaq").mkdir(parents=True)
    (tmp_path / "data/public/spaq/manifest.parquet").write_bytes(b"")
    (tmp_path / "data/public/half").mkdir()  # an interrupted import: no manifest
    exp = experiments(tmp_path)["datasets"]
    assert exp.variants[0].overrides == {"evaluate.data": ["data/bench", "data/public/spaq"]}
    assert not any("spaq" in note for note in exp.notes)
    assert any("qprobe data import koniq10k --root DIR --out data/public/koniq10k" in note for note in exp.notes)


def test_the_metrics_file_keeps_every_figure_the_tables_show() -> None:
    flat = {f"bench.{method}.{key}": 0.5 for method in ("qprobe", "piqe") for key in (*FIGURE_KEYS, "rmse")}
    summary = summary_metrics({**flat, "bench.images": 30.0}, ["bench"])
    [row] = figures(summary, {"rollout_adherence": 0.75}).values()
    assert None not in row and "rmse" not in summary["bench"]["qprobe"]  # all it shows, and a summary


def test_figures_read_the_evaluated_model_of_every_set_flat_or_nested() -> None:
    flat = {"bench.qprobe.srcc": 0.5, "bench.qprobe.srcc_low": 0.4, "bench.qprobe.srcc_high": 0.6,
            "bench.no_tool.srcc": 0.1, "spaq.qprobe.srcc": None, "spaq.qprobe.answer_rate": 0.25}
    nested = {"bench": {"qprobe": {"srcc": 0.5, "srcc_low": 0.4, "srcc_high": 0.6}, "no_tool": {"srcc": 0.1}},
              "spaq": {"qprobe": {"srcc": None, "answer_rate": 0.25}}}
    for metrics in (flat, nested):
        rows = figures(metrics, {"rollout_adherence": 0.75})
        assert sorted(rows) == ["bench", "spaq"]
        assert rows["bench"][:3] == (0.5, 0.4, 0.6) and rows["bench"][-1] == 0.75
        assert rows["spaq"][6] == 0.25


def test_cli_list_names_every_experiment_and_what_it_reproduces(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["experiments", "list"]) == 0
    out = capsys.readouterr().out
    assert "table4-degradation_only" in out and "Table 4" in out and "table3-coupled" in out
    assert cli_main(["experiments", "run", "table5"]) == 2
    assert "unknown experiment 'table5'" in capsys.readouterr().err


# --- a real run: two variants that differ in evaluate only, in a copy of the repository --------------

PROBE = Experiment("probe", "a test: evaluate's bootstrap", (
    Variant("as_is", "as the workspace has it", {}, ("bench", "evaluate")),
    Variant("boot", "fewer bootstrap resamples", {"evaluate.bootstrap": 7}, ("bench", "evaluate")),
))


def _dvc(root: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _workspace(root: Path) -> tuple[bytes, bytes, str, str, bytes]:
    return ((root / "params.yaml").read_bytes(), (root / "dvc.lock").read_bytes(), _dvc(root, "status", "--json"),
            subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout,
            (root / "metrics/evaluate.json").read_bytes())


@pytest.mark.slow
def test_run_makes_each_variant_a_dvc_experiment_and_a_tagged_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    root = copy_repo(tmp_path / "repo", {
        "bench": {"num_images": 8},
        "evaluate": {"baselines": [], "max_new_tokens": 16, "bootstrap": 20, "crop_bias_images": 0,
                     "bokeh_limit": 0, "repeat_images": 0, "gallery": 1, "curves": []}})
    # Evaluate's inputs from the training stages: a tiny model and empty curve files stand in for them, as
    # plain inputs of a pipeline of bench and evaluate alone.
    shutil.copytree(tiny_model_dir, root / "models/stage3")
    for stage in ("stage1", "stage2", "stage3"):
        (root / "metrics").mkdir(exist_ok=True)
        (root / f"metrics/{stage}_curves.csv").write_text("step\n")
    graph = yaml.safe_load((root / "dvc.yaml").read_text())
    graph["stages"] = {name: graph["stages"][name] for name in ("bench", "evaluate")}
    (root / "dvc.yaml").write_text(yaml.safe_dump(graph, sort_keys=False))
    subprocess.run(["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-qam", "bench and "
                    "evaluate"], cwd=root, check=True)
    _dvc(root, "repro", "--single-item", "bench")
    _dvc(root, "repro", "--single-item", "evaluate")
    before = _workspace(root)

    text = run_experiment(PROBE, root)

    assert _workspace(root) == before  # params, dvc.lock, `dvc status`, git and the metrics as they were
    lines = text.splitlines()
    assert any(line.startswith("| as the workspace has it | bench |") and "probe-as_is" in line for line in lines)
    assert any(line.startswith("| fewer bootstrap resamples | bench |") for line in lines)
    html = (root / "outputs/experiments/probe/report.html").read_text()
    assert "fewer bootstrap resamples" in html and "<table>" in html

    shown = json.loads(_dvc(root, "exp", "show", "--json", "--no-fetch"))
    names = {exp["name"] for baseline in shown for exp in (baseline.get("experiments") or [])}
    assert {"probe-as_is", "probe-boot"} <= names, names

    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`qprobe.experiment` = 'probe'")
    top = [r for r in runs if r.data.tags["qprobe.stage"] == "experiment"]
    assert len(top) == 1 and top[0].info.status == "FINISHED"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(top[0].info.run_id)}
    assert {"report.md", "report.html"} <= artifacts
    variants = {r.data.tags["qprobe.variant"]: r for r in runs if r.data.tags["qprobe.stage"] == "pipeline"}
    assert set(variants) == {"as_is", "boot"}
    assert all(r.data.tags["mlflow.parentRunId"] == top[0].info.run_id for r in variants.values())
    # DVC's cache: the unchanged variant ran nothing; the other re-ran evaluate only, its run nested.
    assert variants["as_is"].data.tags["stage.evaluate"] == "cached"
    assert variants["boot"].data.tags["stage.evaluate"] == "ran"
    assert variants["boot"].data.tags["stage.bench"] == "cached"
    nested = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.mlflow.parentRunId = '{variants['boot'].info.run_id}'")
    assert [r.data.tags["qprobe.stage"] for r in nested] == ["evaluate"]
    assert nested[0].data.params["bootstrap"] == "7"

    _dvc(root, "exp", "apply", "probe-boot")  # brings the variant back
    assert yaml.safe_load((root / "params.yaml").read_text())["evaluate"]["bootstrap"] == 7
    assert _dvc(root, "status", "--json").strip() in ("{}", "")


@pytest.mark.slow
def test_restoring_a_fresh_clone_removes_what_the_variants_made_and_keeps_the_committed_lock(tmp_path: Path) -> None:
    root = copy_repo(tmp_path / "repo", {"bench": {"num_images": 2, "workers": 1}})
    graph = yaml.safe_load((root / "dvc.yaml").read_text())
    graph["stages"] = {"bench": graph["stages"]["bench"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(graph, sort_keys=False))
    _dvc(root, "repro", "--single-item", "bench")
    subprocess.run(["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-qm", "baseline"],
                   cwd=root, check=True)
    # A fresh clone of that commit: the lock names outputs that neither the workspace nor the cache holds.
    shutil.rmtree(root / "data/bench")
    shutil.rmtree(root / ".dvc/cache")
    lock = (root / "dvc.lock").read_bytes()
    snap = snapshot(root)
    assert "data/bench" in snap.absent_outs
    set_params({"bench.seed": 1}, root)  # a variant
    _dvc(root, "repro", "--single-item", "bench")

    restore(root, snap, ["bench"])

    assert not (root / "data/bench").exists() and (root / "dvc.lock").read_bytes() == lock
    assert subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout == ""


def test_cli_report_of_variants_never_run_says_so_and_logs_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("QPROBE_ROOT", str(tmp_path))
    assert cli_main(["experiments", "report", "table4"]) == 0
    out = capsys.readouterr().out
    assert "| degradation-only crops |  | not run |" in out and "| context-aware crops |  | not run |" in out
    assert "not run" in (tmp_path / "outputs/experiments/table4/report.html").read_text()
    run = mlflow.search_runs(search_all_experiments=True, output_format="list",
                             filter_string="tags.`qprobe.experiment` = 'table4'")[0]
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)} == {"report.md", "report.html"}
