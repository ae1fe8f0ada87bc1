"""The infra/ templates render and validate, and the launcher runs a stage for real where it can.

kubectl, sky and docker do not run on these machines: the Job and the SkyPilot task are rendered
and checked (by SkyPilot's own parser too when ``$SKYPILOT_PYTHON`` names an environment with it),
the compose file is parsed, and the `kubernetes` target is driven through a stand-in kubectl that
records what it is given. The `local` target runs `dvc repro` (and `accelerate launch`) for real.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
from pathlib import Path

import pytest
import yaml
from fixtures_dvc import STAGE, dvc, make_dvc_repo

from qprobe.config import ConfigError
from qprobe.ops import launch as L
from qprobe.ops import manifests as M

INFRA = Path(__file__).resolve().parent.parent / "infra"
REPO = "https://git.example.com/team/qprobe.git"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cfg(**kw: object) -> L.LaunchConfig:
    return L.LaunchConfig(image="registry.example.com/qprobe:1", **kw)


def _container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


# --- Kubernetes Job ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gpus", [8, 0])
def test_job_template_renders_a_valid_job(gpus: int) -> None:
    doc = M.validate_job(M.render_job("train_stage1", _cfg(gpus=gpus), REPO, COMMIT))
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "Job"
    assert doc["spec"]["backoffLimit"] == 0
    assert re.fullmatch(r"qprobe-train-stage1-01234567-[0-9a-z]+", doc["metadata"]["name"])
    box = _container(doc)
    assert box["image"] == "registry.example.com/qprobe:1"
    env = {e["name"]: e["value"] for e in box["env"]}
    assert env["QPROBE_COMMIT"] == COMMIT and env["QPROBE_STAGE"] == "train_stage1" and env["QPROBE_REPO"] == REPO
    assert [s["secretRef"]["name"] for s in box["envFrom"]] == ["qprobe-aws", "qprobe-mlflow"]
    resources = box["resources"]
    spec = doc["spec"]["template"]["spec"]
    if gpus:
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 8
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in resources["limits"] and "tolerations" not in spec
    script = box["args"][0]
    steps = ["git clone", 'git checkout --quiet --detach "$QPROBE_COMMIT"', "pip install",
             'dvc pull --with-deps --allow-missing "$QPROBE_STAGE"', 'dvc repro --single-item "$QPROBE_STAGE"',
             'dvc push "$QPROBE_STAGE"', "cat dvc.lock"]
    positions = [script.index(step) for step in steps]
    assert positions == sorted(positions)
    assert box["command"] == ["/bin/bash", "-c"]


def test_job_validation_names_the_broken_field() -> None:
    doc = yaml.safe_load(M.render_job("bench", _cfg(gpus=0), REPO, COMMIT))
    broken = json.loads(json.dumps(doc))
    broken["kind"] = "Deployment"
    with pytest.raises(M.LaunchError, match="kind"):
        M.validate_job(broken)
    broken = json.loads(json.dumps(doc))
    del _container(broken)["resources"]
    with pytest.raises(M.LaunchError, match="resources"):
        M.validate_job(broken)
    broken = json.loads(json.dumps(doc))
    broken["metadata"]["name"] = "Not_A_DNS_Label"
    with pytest.raises(M.LaunchError, match=r"metadata\.name"):
        M.validate_job(broken)
    broken = json.loads(json.dumps(doc))
    _container(broken)["resources"] = {"requests": {"nvidia.com/gpu": 2}, "limits": {"nvidia.com/gpu": 1}}
    with pytest.raises(M.LaunchError, match="request and limit differ"):
        M.validate_job(broken)
    with pytest.raises(M.LaunchError, match="image"):
        M.validate_job(M.render_job("bench", L.LaunchConfig(gpus=0), REPO, COMMIT))


# --- KubeRay RayCluster (the data stages' --executor ray) -------------------------------------------


def test_raycluster_template_renders_a_valid_cluster() -> None:
    from qprobe import offline

    doc = M.validate_raycluster(M.render_raycluster("registry.example.com/qprobe:1", workers=3, cpus=8,
                                                    memory_gb=32, ray_version="2.60.0"))
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["spec"]["rayVersion"] == "2.60.0"
    head = doc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # shards run on the workers only
    head_box = head["template"]["spec"]["containers"][0]
    assert {"containerPort": 10001, "name": "client"} in head_box["ports"]  # --ray-address ray://HEAD:10001
    (group,) = doc["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    box = group["template"]["spec"]["containers"][0]
    assert box["image"] == head_box["image"] == "registry.example.com/qprobe:1"
    assert box["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    for container in (head_box, box):
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env == offline.OFFLINE_ENV and env["RAY_USAGE_STATS_ENABLED"] == "0"
        assert [s["secretRef"]["name"] for s in container["envFrom"]] == ["qprobe-aws"]


def test_raycluster_validation_names_the_broken_field() -> None:
    doc = yaml.safe_load(M.render_raycluster("registry.example.com/qprobe:1", ray_version="2.60.0"))
    broken = json.loads(json.dumps(doc))
    broken["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # KubeRay takes strings only
    with pytest.raises(M.LaunchError, match=r"headGroupSpec\.rayStartParams\.num-cpus"):
        M.validate_raycluster(broken)
    broken = json.loads(json.dumps(doc))
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = 5
    with pytest.raises(M.LaunchError, match="outside"):
        M.validate_raycluster(broken)
    broken = json.loads(json.dumps(doc))
    del broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
    with pytest.raises(M.LaunchError, match="image"):
        M.validate_raycluster(broken)
    with pytest.raises(M.LaunchError, match="rayVersion"):
        M.validate_raycluster(M.render_raycluster("registry.example.com/qprobe:1", ray_version="latest"))


def test_job_names_are_dns_labels() -> None:
    name = M.job_name("stage_with_a_very_long_name_that_goes_on@and_on_and_on_and_on", COMMIT)
    assert len(name) <= 63 and re.fullmatch(M.DNS_LABEL, name)
    assert M.slug("Train_Stage1@KonIQ") == "train-stage1-koniq"


def test_prefect_base_job_template_is_accepted_by_prefect_and_yields_a_valid_job() -> None:
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    template = json.loads((INFRA / "k8s" / "prefect-base-job-template.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    validate_base_job_template(template)  # what the Prefect server runs on `work-pool create`
    properties = template["variables"]["properties"]
    assert {"image", "namespace", "gpu_count", "aws_secret", "mlflow_secret", "env"} <= set(properties)
    values = {k: v["default"] for k, v in properties.items() if "default" in v}
    values.update(command="prefect flow-run execute", gpu_count=8)
    manifest = apply_values(template["job_configuration"], values)["job_manifest"]
    # The kubernetes worker turns the env mapping into a list and the command into args, then names the Job.
    box = _container(manifest)
    box["env"] = [{"name": k, "value": v} for k, v in box["env"].items()]
    box["args"] = shlex.split(box["args"])
    manifest["metadata"]["name"] = manifest["metadata"].pop("generateName") + "abcde"
    M.validate_job(manifest)
    assert box["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert [s["secretRef"]["name"] for s in box["envFrom"]] == ["qprobe-aws", "qprobe-mlflow"]


# --- SkyPilot ----------------------------------------------------------------------------------------


def test_skypilot_task_renders_with_secrets_by_name_only(tmp_path: Path) -> None:
    task = M.render_sky_task("train_stage3", _cfg(), REPO, COMMIT, ["AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_URI"])
    doc = M.validate_sky_task(task)
    assert doc["resources"]["accelerators"] == "H100:8"
    assert doc["resources"]["image_id"] == "docker:registry.example.com/qprobe:1"
    assert doc["envs"]["QPROBE_STAGE"] == "train_stage3" and doc["envs"]["QPROBE_COMMIT"] == COMMIT
    assert doc["secrets"] == {"AWS_ACCESS_KEY_ID": None, "MLFLOW_TRACKING_URI": None}
    assert 'dvc repro --single-item "$QPROBE_STAGE"' in doc["run"]
    assert set(doc) <= {"name", "resources", "num_nodes", "envs", "secrets", "run"}
    python = os.environ.get("SKYPILOT_PYTHON")
    if python:  # SkyPilot's own schema, in its own environment
        path = tmp_path / "task.yaml"
        path.write_text(task)
        M.sky_check(python, path)
    with pytest.raises(M.LaunchError, match="accelerators"):
        M.validate_sky_task(M.render_sky_task("x", _cfg(gpus=0), REPO, COMMIT))


# --- accelerate and DeepSpeed ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind", "processes", "zero"), [
    ("single_process", "NO", 1, None), ("ddp", "MULTI_GPU", 8, None),
    ("zero2", "DEEPSPEED", 8, 2), ("zero3", "DEEPSPEED", 8, 3),
])
def test_accelerate_configs(name: str, kind: str, processes: int, zero: int | None) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    path = INFRA / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys fail here
    assert config.distributed_type.value == kind and config.num_processes == processes
    if zero is None:
        return
    # With a DeepSpeed file accelerate refuses mixed_precision in its own config: precision is in the JSON.
    assert "mixed_precision" not in yaml.safe_load(path.read_text())
    ds_file = config.deepspeed_config["deepspeed_config_file"]
    assert ds_file == f"infra/deepspeed/zero{zero}.json"
    ds = HfDeepSpeedConfig(str(INFRA.parent / ds_file))
    assert ds.get_value("zero_optimization.stage") == zero and ds.is_zero3() == (zero == 3)
    assert config.deepspeed_config["zero3_init_flag"] == (zero == 3)


# --- compose -----------------------------------------------------------------------------------------

_VAR = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")
_SECRET = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|_URI$|CONNECTION_URL")


def test_compose_file() -> None:
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "s3", "buckets", "mlflow", "prefect"}
    weed = " ".join(services["s3"]["command"])
    assert "weed server" in weed and " -s3 " in weed and "seaweedfs" in services["s3"]["image"]
    published = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
            published[name] = port
        if name != "buckets":
            assert svc["healthcheck"]["test"], name
    assert set(published) == {"s3", "mlflow", "prefect"}
    assert "postgresql://" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://qprobe-mlflow"
    assert "postgresql+asyncpg://" in services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    # No secret is written in the file: every credential-like value comes from a variable.
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if _SECRET.search(key) and key != "MLFLOW_ARTIFACTS_DESTINATION":
                assert _VAR.search(str(value)), f"{name}.{key} is hard-coded"
    text = (INFRA / "compose.yaml").read_text()
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(_VAR.findall(text)) <= set(example), "every variable of compose.yaml is in .env.example"
    assert all(example[k] == "change-me" for k in example if _SECRET.search(k))
    assert (INFRA / "postgres" / "create-prefect-db.sh").stat().st_mode & stat.S_IXUSR


# --- dvc.lock ----------------------------------------------------------------------------------------


def test_extract_and_merge_lock(tmp_path: Path) -> None:
    remote = "schema: '2.0'\nstages:\n  train:\n    cmd: qprobe train\n    outs:\n    - path: models/x\n      md5: abc\n"
    log = f"noise\n{L.LOCK_BEGIN}\n{remote}{L.LOCK_END}\nmore noise\n"
    assert L.extract_lock(log) == remote
    assert L.extract_lock("no markers here") is None
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  bench:\n    cmd: qprobe bench\n")
    L.merge_lock(lock, remote, "train")
    merged = yaml.safe_load(lock.read_text())
    assert set(merged["stages"]) == {"bench", "train"} and merged["stages"]["train"]["outs"][0]["md5"] == "abc"
    with pytest.raises(M.LaunchError, match="no entry"):
        L.merge_lock(lock, remote, "evaluate")


# --- the launcher ------------------------------------------------------------------------------------


def test_local_target_runs_dvc_repro(tmp_path: Path) -> None:
    repo = make_dvc_repo(tmp_path / "repo")
    dry = L.launch(STAGE, "local", L.LaunchConfig(dry_run=True), root=repo)
    assert dry.command[-3:] == ["repro", "--single-item", STAGE] and not (repo / "out.txt").exists()
    result = L.launch(STAGE, "local", L.LaunchConfig(), root=repo)
    assert (repo / "out.txt").read_text() == "HELLO DVC\n"
    assert STAGE in yaml.safe_load(result.lock)["stages"]
    assert "up to date" in dvc(repo, "status")
    with pytest.raises(M.LaunchError, match="no stage 'nope'"):
        L.launch("nope", "local", L.LaunchConfig(), root=repo)
    with pytest.raises(ConfigError, match="target"):
        L.launch(STAGE, "slurm", L.LaunchConfig(), root=repo)


@pytest.mark.slow
def test_local_target_under_accelerate_then_dvc_commit(tmp_path: Path) -> None:
    repo = make_dvc_repo(tmp_path / "repo")
    cfg = L.LaunchConfig(accelerate_config=str(INFRA / "accelerate" / "single_process.yaml"))
    result = L.launch(STAGE, "local", cfg, root=repo)
    assert result.command[1:3] == ["-m", "accelerate.commands.launch"] and result.command[-1] == "make.py"
    assert (repo / "out.txt").read_text() == "HELLO DVC\n"
    assert STAGE in yaml.safe_load(result.lock)["stages"]
    assert "up to date" in dvc(repo, "status")  # `dvc commit` recorded what accelerate produced


def test_accelerate_command_wraps_stage_commands() -> None:
    cmd = L.accelerate_command("qprobe train stage1 --lr 1e-5", "c.yaml", 2)
    assert cmd[3:] == ["--config_file", "c.yaml", "--num_processes", "2", "-m", "qprobe.cli", "train", "stage1",
                       "--lr", "1e-5"]
    assert L.accelerate_command("python -m qprobe.cli evaluate", "c.yaml")[-3:] == ["-m", "qprobe.cli", "evaluate"]
    with pytest.raises(M.LaunchError, match="under accelerate"):
        L.accelerate_command("make all", "c.yaml")


def _fake_kubectl(folder: Path, lock: str, outcome: str = "1,") -> Path:
    """A kubectl stand-in: records each call (and stdin of `apply`), answers `get job` and `logs`."""
    (folder / "job.log").write_text(f"Running stage...\n{L.LOCK_BEGIN}\n{lock}{L.LOCK_END}\n")
    script = folder / "kubectl"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {folder}/calls
case "$1" in
  apply) cat > {folder}/applied.yaml ;;
  get) printf '%s' '{outcome}' ;;
  logs) cat {folder}/job.log ;;
esac
""")
    script.chmod(0o755)
    return script


def test_kubernetes_target_applies_waits_and_returns_the_lock(tmp_path: Path) -> None:
    repo = make_dvc_repo(tmp_path / "repo")
    lock = f"schema: '2.0'\nstages:\n  {STAGE}:\n    cmd: python make.py\n"
    kubectl = _fake_kubectl(tmp_path, lock)
    cfg = _cfg(repo=REPO, gpus=8, kubectl=str(kubectl), write_lock=True)

    dry = L.launch(STAGE, "kubernetes", L.LaunchConfig(**{**cfg.__dict__, "dry_run": True}), root=repo)
    assert not (tmp_path / "calls").exists() and M.validate_job(dry.rendered)

    result = L.launch(STAGE, "kubernetes", cfg, root=repo)
    applied = M.validate_job((tmp_path / "applied.yaml").read_text())
    name = applied["metadata"]["name"]
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "apply -f -"
    assert calls[1].startswith(f"get job {name} -n default -o jsonpath=")
    assert calls[2] == f"logs job/{name} -n default --tail=-1"
    assert result.lock == lock
    assert {e["value"] for e in _container(applied)["env"]} >= {REPO, STAGE}
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"][STAGE]["cmd"] == "python make.py"

    failing = _fake_kubectl(tmp_path, lock, outcome=",1")
    with pytest.raises(M.LaunchError, match="failed; last log lines"):
        L.launch(STAGE, "kubernetes", L.LaunchConfig(**{**cfg.__dict__, "kubectl": str(failing)}), root=repo)
    with pytest.raises(M.LaunchError, match="--image"):
        L.launch(STAGE, "kubernetes", L.LaunchConfig(repo=REPO, dry_run=True), root=repo)


def test_skypilot_target_dry_run_and_missing_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_dvc_repo(tmp_path / "repo")
    monkeypatch.delenv("SKYPILOT_PYTHON", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id-from-the-shell")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-from-the-shell")
    dry = L.launch(STAGE, "skypilot", _cfg(repo=REPO, dry_run=True), root=repo)
    assert "secret-from-the-shell" not in dry.rendered and "id-from-the-shell" not in dry.rendered
    assert dry.command[dry.command.index("--secret") + 1] == "AWS_ACCESS_KEY_ID"
    assert "launch" in dry.command and dry.command[-1].endswith("stage.yaml")
    with pytest.raises(M.LaunchError, match="SKYPILOT_PYTHON"):
        L.launch(STAGE, "skypilot", _cfg(repo=REPO), root=repo)

    # A stand-in for SkyPilot's python: it accepts the task and "runs" it, printing the pod's log.
    lock = f"schema: '2.0'\nstages:\n  {STAGE}:\n    cmd: python make.py\n"
    (tmp_path / "job.log").write_text(f"(stage1, pid=1) ...\n{L.LOCK_BEGIN}\n{lock}{L.LOCK_END}\n")
    fake = tmp_path / "sky-python"
    fake.write_text(f"""#!/bin/sh
printf '%s\\n' "$*" >> {tmp_path}/sky-calls
case "$*" in *" launch "*) cat {tmp_path}/job.log ;; esac
""")
    fake.chmod(0o755)
    result = L.launch(STAGE, "skypilot", _cfg(repo=REPO, skypilot_python=str(fake), write_lock=True), root=repo)
    assert result.lock == lock
    check, launched = (tmp_path / "sky-calls").read_text().splitlines()
    assert "sky.Task.from_yaml" in check
    assert "launch --yes --down --cluster qprobe-make --secret AWS_ACCESS_KEY_ID --secret AWS_SECRET_ACCESS_KEY" in launched
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"][STAGE]["cmd"] == "python make.py"


def test_cli_prints_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    repo = make_dvc_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    monkeypatch.setenv("QPROBE_ROOT", str(repo))
    assert L.main(["kubernetes", STAGE, "--image", "img:1", "--repo", REPO, "--gpus", "0", "--dry-run"]) == 0
    M.validate_job(capsys.readouterr().out)
    with pytest.raises(ConfigError, match="usage"):
        L.main(["kubernetes"])
