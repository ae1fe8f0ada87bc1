"""A killed pipeline leaves no debris: `python -m flows.pipeline` for real, signalled while a stage runs.

The stage is a stand-in on the real path (flow -> task -> `dvc repro --single-item` -> a process with
a nested MLflow stage run -> a worker it spawns) that holds until it is killed, so the signal always
lands mid-stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from repo_copy import copy_repo

from qprobe.tracking import fail_orphaned_runs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

_HOLD = """import subprocess, sys, time
from pathlib import Path
from qprobe.tracking import stage_run

with stage_run("hold"):
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(sys.argv[1]).write_text(str(worker.pid))
    time.sleep(600)
"""


@dataclass
class Flow:
    """A running `python -m flows.pipeline --stages hold`, and the processes under it once the stage holds."""

    proc: subprocess.Popen
    root: Path
    tree: list[psutil.Process]
    commands: list[str]
    server: psutil.Process  # Prefect's temporary server
    stage_group: int


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "repo").mkdir()
    root = copy_repo(tmp_path / "repo")
    (root / "hold.py").write_text(_HOLD)
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc_yaml["stages"]["hold"] = {"cmd": "python hold.py ../held", "deps": ["hold.py"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    return root


@pytest.fixture
def flow(repo: Path, tmp_path: Path) -> Iterator[Flow]:
    marker = repo.parent / "held"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)  # the flow starts Prefect's temporary server itself
    proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--stages", "hold"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if not marker.exists():
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the stage never started (exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
    tree = psutil.Process(proc.pid).children(recursive=True)
    commands = [" ".join(p.cmdline()) for p in tree]
    [server] = [p for p, cmd in zip(tree, commands, strict=True) if "prefect.server.api.server:create_app" in cmd]
    stage = next(p for p, cmd in zip(tree, commands, strict=True) if "hold.py" in cmd)
    running = Flow(proc, repo, tree, commands, server, os.getpgid(stage.pid))
    yield running
    proc.kill()
    for p in _alive(running.tree):  # what a failed test left behind
        p.kill()
    proc.communicate(timeout=60)


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """The processes still running (a zombie has exited; it only waits for its parent to reap it)."""
    alive = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def _runs(root: Path) -> dict[str, str]:
    """Run name -> status in the repository's store."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qprobe")
    return {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_stage_marks_runs_killed_and_stops_the_server(flow: Flow, sig: signal.Signals) -> None:
    assert any("repro --single-item hold" in c for c in flow.commands)
    assert any("time.sleep(600)" in c for c in flow.commands)  # the stage's worker
    assert _runs(flow.root) == {"pipeline": "RUNNING", "hold": "RUNNING"}

    flow.proc.send_signal(sig)
    _, err = flow.proc.communicate(timeout=120)
    assert flow.proc.returncode == 128 + sig
    assert f"python -m flows.pipeline: interrupted by {sig.name}" in err.splitlines()
    assert not _alive(flow.tree), [p.cmdline() for p in _alive(flow.tree)]
    assert _runs(flow.root) == {"pipeline": "KILLED", "hold": "KILLED"}


def test_after_sigkill_the_orphaned_runs_are_swept_failed(flow: Flow, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    flow.proc.kill()
    flow.proc.wait()  # not communicate: the processes it left behind hold its output pipes open
    # Nothing could clean up; say the rest died too (a machine's OOM killer, a node lost).
    os.killpg(flow.stage_group, signal.SIGKILL)
    flow.server.kill()
    deadline = time.monotonic() + 30
    while _alive(flow.tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _runs(flow.root) == {"pipeline": "RUNNING", "hold": "RUNNING"}

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{flow.root / 'mlflow.db'}")
    with caplog.at_level(logging.WARNING, logger="qprobe.tracking"):
        assert len(fail_orphaned_runs(flow.root)) == 2
    assert _runs(flow.root) == {"pipeline": "FAILED", "hold": "FAILED"}
    [line] = [r.getMessage() for r in caplog.records if r.name == "qprobe.tracking"]
    assert "marked 2 MLflow run(s) FAILED" in line and "pipeline" in line and "hold" in line
