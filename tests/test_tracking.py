"""MLflow run ownership: a run records its process, an interrupted run ends KILLED, orphans are swept FAILED."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from qprobe.tracking import PARENT_ENV, PID_TAG, fail_orphaned_runs, stage_run, trainer_params

REPO = Path(__file__).resolve().parents[1]
# Opens a stage run (nested under $QPROBE_PARENT_RUN_ID when set), prints its id, then waits to be killed.
_HOLDER = ("import sys, time\nfrom qprobe.tracking import stage_run\n"
           "with stage_run('held', root=sys.argv[1]) as run:\n    print(run.info.run_id, flush=True)\n"
           "    time.sleep(600)\n")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A repository root whose own store ``ROOT/mlflow.db`` every run of the test uses."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


@pytest.fixture
def holders(root: Path) -> Iterator[list[subprocess.Popen]]:
    """Processes started by :func:`_hold`; whatever a test leaves alive is killed at the end."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _hold(root: Path, procs: list[subprocess.Popen], parent: str | None = None) -> tuple[subprocess.Popen, str]:
    """A real process holding a RUNNING stage run; returns it and the run id."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **({PARENT_ENV: parent} if parent else {})}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root)], env=env, stdout=subprocess.PIPE, text=True)
    procs.append(proc)
    run_id = proc.stdout.readline().strip()
    assert run_id, "the holder exited before starting its run"
    return proc, run_id


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _status(run_id: str) -> str:
    return mlflow.get_run(run_id).info.status


def test_a_run_records_its_owner(root: Path) -> None:
    with stage_run("demo", root=root) as run:
        tags = mlflow.get_run(run.info.run_id).data.tags
    assert tags["qprobe.host"] == socket.gethostname() and tags[PID_TAG] == str(os.getpid())
    assert tags["qprobe.root"] == str(root.resolve()) and tags["qprobe.pid_start"].isdigit()


def test_a_run_inside_a_run_nests_under_it_whatever_the_parent_variable_says(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An experiment's variant: its flow runs under the experiment's run (the variable), and the model it
    # registers runs inside the flow's pipeline run.
    with stage_run("experiment", root=root) as experiment:
        monkeypatch.setenv(PARENT_ENV, experiment.info.run_id)
        with stage_run("pipeline", root=root) as pipeline, stage_run("register", root=root) as register:
            pass
    tags = {r.info.run_name: r.data.tags.get("mlflow.parentRunId") for r in (
        mlflow.get_run(pipeline.info.run_id), mlflow.get_run(register.info.run_id))}
    assert tags == {"pipeline": experiment.info.run_id, "register": pipeline.info.run_id}


def test_interrupted_run_and_its_dead_children_end_killed(root: Path, holders: list[subprocess.Popen]) -> None:
    with pytest.raises(KeyboardInterrupt), stage_run("parent", root=root) as parent:
        dead, dead_id = _hold(root, holders, parent.info.run_id)
        _, live_id = _hold(root, holders, parent.info.run_id)
        _kill9(dead)
        raise KeyboardInterrupt
    assert _status(parent.info.run_id) == "KILLED"
    assert _status(dead_id) == "KILLED"
    assert _status(live_id) == "RUNNING"  # its process still runs: it ends its run itself


def test_failed_run_stays_failed(root: Path) -> None:
    with pytest.raises(ValueError), stage_run("broken", root=root) as run:
        raise ValueError("boom")
    assert _status(run.info.run_id) == "FAILED"


def test_orphaned_runs_are_marked_failed_and_only_they(root: Path, holders: list[subprocess.Popen],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    dead, dead_id = _hold(root, holders)
    _, live_id = _hold(root, holders)
    _kill9(dead)
    # Another host's run with the dead PID: this host cannot tell whether its process lives.
    with stage_run("elsewhere", root=root) as remote:
        client = mlflow.MlflowClient()
        client.set_tag(remote.info.run_id, "qprobe.host", "another-host")
        client.set_tag(remote.info.run_id, PID_TAG, str(dead.pid))
        with caplog.at_level(logging.WARNING, logger="qprobe.tracking"):
            assert fail_orphaned_runs(root) == [dead_id]
        assert _status(remote.info.run_id) == "RUNNING"
    assert _status(dead_id) == "FAILED" and _status(live_id) == "RUNNING"
    [line] = [r.getMessage() for r in caplog.records if r.name == "qprobe.tracking"]
    assert "1 MLflow run(s) FAILED" in line and dead_id in line and f"pid {dead.pid}" in line
    assert fail_orphaned_runs(root) == []  # already swept: nothing to say


def test_trainer_params_keep_qprobe_fields_and_only_the_trl_fields_that_differ() -> None:
    from trl import GRPOConfig

    from qprobe.train.stage1 import Stage1Config

    given = {"learning_rate": 2e-5, "adam_beta1": 0.9, "lora_r": 16}  # adam_beta1 and lora_r: the defaults
    params = trainer_params(Stage1Config, given)
    assert GRPOConfig.__dataclass_fields__["adam_beta1"].default == 0.9
    assert params["learning_rate"] == 2e-5 and "adam_beta1" not in params
    # A field the section leaves out takes the stage's default, which differs from trl's: kept.
    assert params["per_device_train_batch_size"] == 16 != GRPOConfig.__dataclass_fields__[
        "per_device_train_batch_size"].default
    # Q-Probe's own fields stay at any value; the protocol's limits are their own section's.
    assert params["lora_r"] == 16 and params["rewards"] == {"thurstone": 1.0, "format": 1.0}
    assert "protocol" not in params
    assert len(params) < 40 < len(GRPOConfig.__dataclass_fields__)


def test_a_stage_run_logs_what_it_was_given_not_what_trl_derived() -> None:
    from qprobe.config import parse_config
    from qprobe.train.stage1 import Stage1Config

    cfg = parse_config(Stage1Config, None, ["--learning-rate", "3e-5", "--max-crops", "2", "--use-cpu", "--no-bf16"])
    params = cfg.run_params()
    assert params["learning_rate"] == 3e-5 and params["protocol.max_crops"] == 2 and params["use_cpu"] is True
    # trl's __post_init__ rewrote report_to from its default ("none" became []): no change of the stage's.
    assert cfg.report_to == [] and "report_to" not in params


def test_more_than_a_batch_of_params_is_logged_in_full(root: Path) -> None:
    params = {f"section.key_{i:03d}": i for i in range(250)}  # MLflow takes at most 100 per request
    params["section.long"] = "x" * 7000  # and values of at most 6000 characters
    with stage_run("wide", params, root=root) as run:
        pass
    logged = mlflow.get_run(run.info.run_id).data.params
    assert len(logged) == 251 and logged["section.key_249"] == "249"
    assert len(logged["section.long"]) == 6000 and logged["section.long"].endswith("...")


@pytest.mark.slow
def test_a_moved_clone_keeps_its_runs_and_model_versions_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from repo_copy import copy_repo

    from qprobe.tracking import log_artifact, model_version, register_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the repository's own store, mlflow.db at its root
    before = copy_repo((tmp_path / "before").resolve())
    (before / "note.txt").write_text("logged before the move")
    checkpoint = before / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"tiny": true}')
    with stage_run("evaluate", root=before) as run:
        log_artifact(before / "note.txt")
    register_model(checkpoint, alias="champion", root=before)

    after = tmp_path / "elsewhere" / "after"
    after.parent.mkdir()
    before.rename(after)  # nothing is left at the old path to read from
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # as a new process in the moved clone (MLflow set it to the old store)
    with caplog.at_level(logging.WARNING, logger="qprobe.tracking"):
        version = model_version("champion", root=after)  # any use of the store re-points it
    assert f"the clone moved from {before}" in caplog.text
    note = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="note.txt",
                                               dst_path=str(tmp_path / "run"))
    assert Path(note).read_text() == "logged before the move"
    assert mlflow.get_run(run.info.run_id).info.artifact_uri.startswith(after.as_uri() + "/mlartifacts/")
    model = mlflow.artifacts.download_artifacts(f"models:/qprobe/{version.version}", dst_path=str(tmp_path / "m"))
    assert sorted(p.name for p in Path(model).rglob("config.json")) == ["config.json"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qprobe.tracking"), stage_run("again", root=after):
        pass
    assert "moved" not in caplog.text  # once re-pointed, the store is left alone
