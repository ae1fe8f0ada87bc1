"""A `dvc repro` of the bench stage killed part-way resumes: it redoes only the missing images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fixtures_dvc import tool_env
from repo_copy import copy_repo

from qprobe import cli

pytestmark = pytest.mark.slow

IMAGES = 30


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _repro(repo: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dvc", "repro", "bench"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_killed_dvc_repro_resumes_and_matches_an_uninterrupted_run(tmp_path, tiny_photos, monkeypatch):
    bench = {"source": str(tiny_photos), "num_images": IMAGES, "workers": 1, "min_size": 200,
             "contact_sheet_size": 4}
    (tmp_path / "repo").mkdir()
    repo = copy_repo(tmp_path / "repo", {"bench": bench})
    assert yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["bench"]["outs"] == [
        {"data/bench": {"persist": True}}]
    env = tool_env({"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    records = repo / "data/bench/records"

    proc = _repro(repo, env)
    while proc.poll() is None and len(list(records.glob("*.json"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the qprobe bench it runs, mid-stage
    proc.wait()
    assert not (repo / "data/bench/manifest.parquet").exists(), "the stage finished before it was killed"
    done = {p.name: p.stat().st_mtime_ns for p in (repo / "data/bench/images").iterdir() if not p.name.startswith(".")}
    assert 3 <= len(done) < IMAGES

    second = _repro(repo, env)
    output = second.communicate(timeout=300)[0]
    assert second.returncode == 0, output
    metrics = json.loads((repo / "metrics/bench.json").read_text())
    assert metrics["images"] == IMAGES and metrics["images_new"] == IMAGES - metrics["images_resumed"]
    assert metrics["images_resumed"] >= len(done) - 1  # the kill may land between an image and its record
    kept = {name for name, t in done.items() if (repo / "data/bench/images" / name).stat().st_mtime_ns == t}
    assert len(kept) == metrics["images_resumed"]

    monkeypatch.chdir(tmp_path)
    reference = tmp_path / "reference"
    argv = ["bench", "--params", str(repo / "params.yaml"), "--out", str(reference), "--metrics", str(tmp_path / "m.json")]
    assert cli.main(argv) == 0
    assert _files(repo / "data/bench") == _files(reference)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "bench", "--json"], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.strip() in ("{}", ""), status.stdout
