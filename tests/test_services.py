"""The local services for real: SeaweedFS S3, an MLflow server with S3 artifacts, a Prefect server.

One SeaweedFS (and, for the MLflow tests, one MLflow server beside it) serves the whole session, on
free ports, in a temporary folder; the CLI cycle and the Prefect test start their own. Every test
leaves no process behind: the fixture's teardown checks that `down` ended each process group.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from fixtures_dvc import STAGE, dvc, make_dvc_repo, run
from fixtures_services import services_config, stop_and_check

from qprobe.config import ConfigError
from qprobe.ops import roles as R
from qprobe.ops import services as S

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process bookkeeping reads /proc")


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="roles"):
        S.ServicesConfig(roles="s3,redis")
    with pytest.raises(ConfigError, match="s3_port"):
        S.ServicesConfig(s3_port=60000)  # its gRPC port (+10000) would not exist
    assert S.ServicesConfig(roles="prefect, s3").role_list == ("s3", "prefect")
    port = R.free_port(with_grpc=True)
    assert R.port_free(port) and R.port_free(port + R.GRPC_OFFSET)


def test_s3_is_up_with_buckets_and_env_file(s3: S.ServicesConfig) -> None:
    status = S.service_status(s3)
    assert status["s3"] is not None and status["s3"].healthy()
    buckets = {b["Name"] for b in R.s3_client(s3.url("s3")).list_buckets()["Buckets"]}
    assert set(R.BUCKETS) <= buckets
    env_file = (s3.root / S.ENV_FILE).read_text()
    assert f"export AWS_ENDPOINT_URL={s3.url('s3')}" in env_file
    assert s3.root.stat().st_mode & 0o077 == 0  # env and s3.json hold the (dev) secret: owner only
    # Loopback only: nothing of SeaweedFS listens on another address.
    assert S.service_status(s3)["s3"].url.startswith("http://127.0.0.1:")


def test_boto3_round_trip_through_qprobe_storage(aws_env: dict[str, str], tmp_path: Path) -> None:
    from qprobe import storage

    source = tmp_path / "photo.bin"
    source.write_bytes(os.urandom(300_000))
    uri = f"s3://{R.DVC_BUCKET}/tests/{uuid.uuid4().hex}/photo.bin"
    storage.upload_file(source, uri)
    assert storage.download_bytes(uri) == source.read_bytes()
    assert [o.key for o in storage.list_objects(uri.rsplit("/", 1)[0] + "/")] == [uri.split("/", 3)[3]]
    with pytest.raises(storage.StorageError, match=r"no such object|not found"):
        storage.download_bytes(uri + ".missing")


def test_dvc_push_pull_round_trip(s3: S.ServicesConfig, aws_env: dict[str, str], tmp_path: Path) -> None:
    remote = f"s3://{R.DVC_BUCKET}/tests/{uuid.uuid4().hex}"
    repo = make_dvc_repo(tmp_path / "repo", remote=remote, endpoint=s3.url("s3"))
    (repo / "data.bin").write_bytes(os.urandom(50_000))
    dvc(repo, "add", "data.bin")
    dvc(repo, "push")
    expected = (repo / "data.bin").read_bytes()
    (repo / "data.bin").unlink()
    run(["rm", "-rf", ".dvc/cache"], repo)
    dvc(repo, "pull", "data.bin")
    assert (repo / "data.bin").read_bytes() == expected
    keys = [o["Key"] for o in R.s3_client(s3.url("s3")).list_objects_v2(
        Bucket=R.DVC_BUCKET, Prefix=remote.split("/", 3)[3])["Contents"]]
    assert keys and all("/files/md5/" in k for k in keys)


@pytest.mark.slow
def test_the_cluster_script_runs_a_stage_like_a_pod(s3: S.ServicesConfig, aws_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    """The container command of the rendered Job, run here: clone, pull, repro, push, print dvc.lock."""
    from qprobe.ops import launch as L
    from qprobe.ops import manifests as M

    remote = f"s3://{R.DVC_BUCKET}/tests/{uuid.uuid4().hex}"
    repo = make_dvc_repo(tmp_path / "repo", remote=remote)  # the endpoint comes from AWS_ENDPOINT_URL
    origin = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(repo), str(origin)], tmp_path)
    commit = run(["git", "rev-parse", "HEAD"], repo).strip()
    cfg = L.LaunchConfig(image="unused:here", gpus=0, install=":")
    job = M.validate_job(M.render_job(STAGE, cfg, str(origin), commit))
    box = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in box["env"]} | aws_env  # envFrom: the secrets
    env["QPROBE_WORKDIR"] = str(tmp_path / "pod" / "qprobe")
    output = run([*box["command"], *box["args"]], tmp_path, env)
    lock = L.extract_lock(output)
    assert lock is not None and yaml.safe_load(lock)["stages"][STAGE]["outs"][0]["path"] == "out.txt"
    # Back on the workstation: record the stage's lock entry and fetch what the "cluster" computed.
    L.merge_lock(repo / "dvc.lock", lock, STAGE)
    dvc(repo, "pull", STAGE)
    assert (repo / "out.txt").read_text() == "HELLO DVC\n"
    assert "up to date" in dvc(repo, "status")


def test_cli_cycle_idempotent_up_stale_pid_and_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = services_config(tmp_path / "svc", "s3")
    flags = ["--roles", "s3", "--dir", cfg.dir, "--s3-port", str(cfg.s3_port)]
    assert S.main(["up", *flags]) == 0
    out = capsys.readouterr().out
    assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{cfg.s3_port}" in out and "yes" in out
    first = S.load_state(cfg)["s3"]
    assert S.main(["up", *flags]) == 0  # idempotent: the healthy server is kept
    assert S.load_state(cfg)["s3"].pid == first.pid
    with pytest.raises(R.ServiceError, match="already runs on port"):
        S.start_services(dataclasses.replace(cfg, s3_port=R.free_port(with_grpc=True)))
    assert S.main(["status", *flags]) == 0
    assert S.main(["status", "--roles", "s3,prefect", "--dir", cfg.dir]) == 1  # prefect is not running
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["role", "pid", "port", "url", "healthy", "startup_s", "mem_mb"]
    assert table[-1].split()[:5] == ["prefect", "-", "-", "-", "no"]

    os.kill(first.pid, signal.SIGKILL)  # a crash: the recorded PID is stale
    deadline = time.monotonic() + 10
    while first.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert S.main(["status", *flags]) == 1
    second = S.start_services(cfg)["s3"]
    assert second.pid != first.pid and second.healthy() and not first.pids()

    assert S.main(["down", *flags]) == 0
    assert "stopped: s3" in capsys.readouterr().out
    assert not second.pids()
    deadline = time.monotonic() + 5  # the kernel closes an exited server's socket a moment later
    while not R.port_free(cfg.s3_port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert R.port_free(cfg.s3_port)
    assert not (cfg.root / S.STATE_FILE).exists() and not (cfg.root / S.ENV_FILE).exists()
    assert S.main(["status", *flags]) == 1
    with pytest.raises(ConfigError, match="action"):
        S.main(["restart"])


@pytest.mark.slow
def test_mlflow_server_stores_artifacts_in_s3(mlflow_server: S.ServicesConfig, monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    from mlflow import MlflowClient

    assert S.service_status(mlflow_server)["mlflow"].healthy()
    # Through the server's REST API only: the client holds no S3 credentials.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url("mlflow"))
    client = MlflowClient(mlflow_server.url("mlflow"))
    experiment = client.create_experiment(f"services-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment).info.run_id
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"srcc": 0.91}))
    client.log_param(run_id, "stage", "evaluate")
    client.log_artifact(run_id, str(report), artifact_path="eval")
    client.set_terminated(run_id)
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    (tmp_path / "back").mkdir()
    local = client.download_artifacts(run_id, "eval/report.json", str(tmp_path / "back"))
    assert json.loads(Path(local).read_text()) == {"srcc": 0.91}
    keys = [o["Key"] for o in R.s3_client(mlflow_server.url("s3")).list_objects_v2(
        Bucket=R.MLFLOW_BUCKET)["Contents"]]
    assert any(k.endswith(f"{run_id}/artifacts/eval/report.json") for k in keys)


@pytest.mark.slow
def test_credentials_never_become_mlflow_params_or_tags(mlflow_server: S.ServicesConfig,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from qprobe import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url("mlflow"))
    env = S.service_env(mlflow_server)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    params = {**dataclasses.asdict(mlflow_server), **env, "db_password": "hunter2", "hf_token": "hf_x"}
    with tracking.stage_run("services-check", params=params) as active:
        tracking.log_metrics({"ok": 1.0})
    data = mlflow.MlflowClient(mlflow_server.url("mlflow")).get_run(active.info.run_id).data
    recorded = json.dumps({"params": data.params, "tags": data.tags})
    for secret in (R.DEV_SECRET_KEY, R.DEV_ACCESS_KEY, "hunter2", "hf_x"):
        assert secret not in recorded
    assert data.params["s3_port"] == str(mlflow_server.s3_port)  # the rest is there
    # Nor do the servers write them to their logs.
    for log in (mlflow_server.root / "logs").glob("*.log"):
        assert R.DEV_SECRET_KEY not in log.read_text(errors="replace"), log.name


@pytest.mark.slow
def test_prefect_server_role(tmp_path: Path) -> None:
    """A Prefect server (10-40 s cold); it accepts the Kubernetes work-pool template of infra/."""
    cfg = services_config(tmp_path / "svc", "prefect")
    try:
        started = S.start_services(cfg)["prefect"]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(cfg.url("prefect") + "/health", timeout=10) as response:
            assert response.status == 200 and json.loads(response.read()) is True
        template = json.loads((Path(__file__).resolve().parent.parent / "infra" / "k8s" /
                               "prefect-base-job-template.json").read_text())
        body = json.dumps({"name": "qprobe-k8s", "type": "kubernetes", "base_job_template": template}).encode()
        request = urllib.request.Request(cfg.url("prefect") + "/work_pools/", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with opener.open(request, timeout=30) as response:
            assert response.status == 201
            assert json.loads(response.read())["base_job_template"]["variables"]["properties"]["gpu_count"]
        assert started.memory_mb() > 50 and started.startup_s is not None
    finally:
        stop_and_check(cfg)
