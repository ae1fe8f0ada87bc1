"""The pipeline against the real services: its MLflow runs through the server (REST and the UI in a
browser), and a flow run recorded by a Prefect server, as a team runs it after `qprobe services up`."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from fixtures_services import services_config, stop_and_check
from repo_copy import copy_repo

from qprobe.ops import services as S

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.slow


def _bench_params(tmp_path: Path) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text("bench: {num_images: 2, contact_sheet_size: 4}\n")
    return params


def test_stage_runs_answer_through_the_mlflow_server_and_its_ui(mlflow_server: S.ServicesConfig,
                                                                 aws_env: dict[str, str], tmp_path: Path) -> None:
    url = mlflow_server.url("mlflow")
    env = {**aws_env, "MLFLOW_TRACKING_URI": url, "MLFLOW_EXPERIMENT_NAME": "qprobe-live"}
    run = subprocess.run([str(Path(sys.executable).parent / "qprobe"), "bench", "--params",
                          str(_bench_params(tmp_path)), "--out", str(tmp_path / "bench"),
                          "--metrics", str(tmp_path / "bench.json")],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]

    experiment = requests.get(f"{url}/api/2.0/mlflow/experiments/get-by-name",
                              params={"experiment_name": "qprobe-live"}, timeout=30).json()["experiment"]
    found = requests.post(f"{url}/api/2.0/mlflow/runs/search", timeout=30, json={
        "experiment_ids": [experiment["experiment_id"]], "filter": "tags.`qprobe.stage` = 'bench'"}).json()
    [stage_run] = found["runs"]
    assert stage_run["info"]["status"] == "FINISHED"
    assert stage_run["inputs"]["dataset_inputs"]  # the source and output datasets, with their digests
    artifacts = requests.get(f"{url}/api/2.0/mlflow/artifacts/list", timeout=30,
                             params={"run_id": stage_run["info"]["run_id"]}).json()
    assert any(f["path"].endswith("contact_sheet.jpg") for f in artifacts.get("files", []))

    if not CHROMIUM.is_file():
        pytest.skip("Chromium is not installed at /usr/bin/chromium: the UI page load is not checked")
    page = subprocess.run([
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        "--virtual-time-budget=15000", "--dump-dom", f"{url}/#/experiments/{experiment['experiment_id']}",
    ], capture_output=True, text=True, timeout=180)
    assert page.returncode == 0 and "<html" in page.stdout.lower()
    assert "mlflow" in page.stdout.lower()
    assert not [line for line in page.stderr.splitlines() if "Uncaught" in line], page.stderr[-2000:]


def test_a_flow_run_is_recorded_by_the_prefect_server(tmp_path: Path, tmp_path_factory) -> None:
    cfg = dataclasses.replace(services_config(tmp_path / "services", "prefect"), prefect_ui=False)
    S.start_services(cfg)
    try:
        api = cfg.url("prefect")
        repo = copy_repo(tmp_path_factory.mktemp("live-repo"), {"bench": {"num_images": 2, "workers": 1}})
        env = {**os.environ, "PREFECT_API_URL": api,
               "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        run = subprocess.run([sys.executable, "-m", "flows.pipeline", "--stages", "bench"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        runs = requests.post(f"{api}/flow_runs/filter", json={"limit": 10}, timeout=30).json()
        flows = {f["id"]: f["name"] for f in requests.post(f"{api}/flows/filter", json={}, timeout=30).json()}
        assert any(flows.get(r["flow_id"]) == "qprobe-pipeline" and r["state_type"] == "COMPLETED" for r in runs)
    finally:
        stop_and_check(cfg)
