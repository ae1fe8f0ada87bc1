"""The pipeline for real: `dvc repro` in a copy of the repository, and the Prefect flow over it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from repo_copy import copy_repo

from flows.pipeline import pipeline
from qprobe.headline import CAP
from tasks.dvc_stage import dvc, lock_entry, stage_order

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("repo"), {"bench": {"num_images": 6, "workers": 1},
                                                       "trajectories": {"sft_size": 6, "rl_size": 3}})


@pytest.fixture(scope="module")
def tracking(repo_copy: Path):
    uri = f"sqlite:///{repo_copy / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


def test_stage_order_runs_every_stage_after_its_inputs(repo_copy: Path) -> None:
    order = stage_order(repo_copy)
    stages = yaml.safe_load((repo_copy / "dvc.yaml").read_text())["stages"]
    assert sorted(order) == sorted(stages) and order[0] == "bench"
    produced_by = {out if isinstance(out, str) else next(iter(out)): name
                   for name, stage in stages.items() for out in stage.get("outs", [])}
    for name, stage in stages.items():
        for dep in stage.get("deps", []):
            if dep in produced_by:
                assert order.index(produced_by[dep]) < order.index(name), (dep, name)


def test_flow_runs_stages_then_is_a_no_op(repo_copy: Path, tracking: str, prefect_harness: None) -> None:
    first = pipeline(stages=["bench"], root=str(repo_copy))
    assert first["stages"] == {"bench": True}
    assert (repo_copy / "data/bench/manifest.parquet").is_file()
    assert lock_entry(repo_copy, "bench")["outs"][0]["path"] == "data/bench"

    # One parent run, the stage's run nested under it with its DVC hashes as tags.
    parent = mlflow.get_run(first["run_id"])
    assert parent.data.tags["stage.bench"] == "ran"
    assert parent.data.metrics["seconds.bench"] > 0
    children = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{first['run_id']}'",
                                  search_all_experiments=True, output_format="list")
    assert [c.data.tags["qprobe.stage"] for c in children] == ["bench"]
    assert children[0].data.tags["dvc.outs.data/bench"].endswith(".dir")

    second = pipeline(stages=["bench"], root=str(repo_copy))
    assert second["stages"] == {"bench": False}
    assert not mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{second['run_id']}'",
                                  search_all_experiments=True, output_format="list")

    # Only bench ran here (the rest is the full pipeline's business): it is clean, and so a plain
    # `dvc repro bench` has nothing to do.
    status = dvc(["status", "bench", "--json"], repo_copy)
    assert status.returncode == 0 and status.stdout.strip() in ("{}", ""), status.stdout
    plain = dvc(["repro", "bench"], repo_copy)
    assert plain.returncode == 0
    assert "Running stage" not in plain.stdout


def test_pipeline_run_logs_the_params_in_force_and_a_capped_headline(repo_copy: Path, tracking: str,
                                                                      prefect_harness: None) -> None:
    result = pipeline(stages=["bench"], root=str(repo_copy))
    run = mlflow.get_run(result["run_id"])
    params = run.data.params
    # params.yaml in force, every section flattened, whichever stages ran.
    for section in ("bench", "trajectories", "stage3"):
        assert any(k.startswith(f"{section}.") for k in params), section
    assert params["bench.num_images"] == "6" and params["trajectories.planner.strategy"] == "context_aware"
    # A training section: Q-Probe's fields, and trl's only where they differ from trl's defaults.
    assert params["stage3.reward_mode"] == "decoupled" and params["stage3.beta"] == "0.04"
    assert "stage3.adam_beta1" not in params and "stage3.report_to" not in params
    assert len(params) < 250
    # The headline, under the cap; the stages' metrics files in full as one artifact.
    assert set(run.data.metrics) == set(result["metrics"]) == {"seconds.bench"}
    assert len(run.data.metrics) <= CAP
    detail = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/metrics.json")
    assert detail["bench"]["images"] == 6


def test_dvc_repro_of_the_trajectories_stage(repo_copy: Path, tracking: str) -> None:
    repro = dvc(["repro", "--single-item", "trajectories"], repo_copy)
    assert repro.returncode == 0, repro.stderr[-2000:]
    assert "Running stage 'trajectories'" in repro.stdout
    for name in ("stage1", "sft", "rl"):
        assert (repo_copy / "data" / "trajectories" / name / "dataset_info.json").is_file()
    assert lock_entry(repo_copy, "trajectories")["outs"][0]["path"] == "data/trajectories"
    again = dvc(["status", "trajectories", "--json"], repo_copy)
    assert again.stdout.strip() in ("{}", ""), again.stdout


def test_params_change_reruns_stage(repo_copy: Path, tracking: str) -> None:
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["bench"]["seed"] = params["bench"].get("seed", 0) + 1
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc(["status", "bench"], repo_copy)
    assert "params.yaml" in status.stdout and "modified" in status.stdout and "bench" in status.stdout
    repro = dvc(["repro", "--single-item", "bench"], repo_copy)
    assert repro.returncode == 0, repro.stderr
    assert "Running stage 'bench'" in repro.stdout


def test_cli_entry_point_runs_flow_module(repo_copy: Path) -> None:
    help_text = subprocess.run([sys.executable, "-m", "flows.pipeline", "--help"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
    assert "--stages" in help_text and "--profile" in help_text


def test_stage_order_is_dependency_order_whatever_the_file_order(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc(["init", "-q"], tmp_path).returncode == 0
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  report: {cmd: cat b > c, deps: [b], outs: [c]}\n"
        "  first: {cmd: echo x > a, outs: [a]}\n"
        "  middle: {cmd: cat a > b, deps: [a], outs: [b]}\n"
        "  lonely: {cmd: echo y > d, outs: [d]}\n")
    # Ready stages go in file order: report (file position 0) is ready before lonely (3).
    assert stage_order(tmp_path) == ["first", "middle", "report", "lonely"]
