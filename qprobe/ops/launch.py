"""Run one DVC stage here or on a GPU cluster: ``qprobe launch TARGET STAGE``.

Every target runs the same thing, ``dvc repro --single-item STAGE``, so a stage run anywhere is
cached, pushed and recorded the way a local run is:

- ``local``: in this repository. With ``--accelerate-config`` the stage's own command (from
  ``dvc.yaml``) runs under ``accelerate launch`` instead, and ``dvc commit STAGE`` records its outputs.
- ``kubernetes``: renders ``infra/k8s/stage-job.yaml`` into a Job, checks it against a minimal schema
  of ``batch/v1`` Jobs, and applies it with ``kubectl apply -f -``; then waits for the Job and reads
  its log. ``--dry-run`` prints the manifest (pipe it to ``kubectl apply -f -`` yourself).
- ``skypilot``: renders ``infra/skypilot/stage.yaml`` and runs ``sky launch`` with the Python of a
  separate environment (``$SKYPILOT_PYTHON``: skypilot pins versions that conflict with this
  project's). ``--dry-run`` prints the task, checked by SkyPilot's own parser when that Python is set.

On a cluster the container runs ``infra/remote/run-stage.sh`` at the chosen commit: clone, check out,
``dvc pull`` the stage's inputs, ``dvc repro --single-item STAGE``, ``dvc push``, print ``dvc.lock``.
The launcher returns that ``dvc.lock``; ``--write-lock`` copies the stage's entry into the local one,
after which ``dvc pull STAGE`` fetches what the cluster computed.

The Job and the task are rendered and checked by :mod:`qprobe.ops.manifests`, from the templates in
the ``infra/`` folder of this source tree (a checkout or an editable install), not an installed wheel.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qprobe.config import ConfigError, build_parser, parse_config, repo_root
from qprobe.io import write_text_atomic
from qprobe.ops.manifests import (
    LaunchError,
    render_job,
    render_sky_task,
    sky_check,
    slug,
    validate_job,
    validate_sky_task,
)

log = logging.getLogger(__name__)

TARGETS = ("local", "kubernetes", "skypilot")
LOCK_BEGIN = "----- BEGIN dvc.lock -----"
LOCK_END = "----- END dvc.lock -----"
# What a remote stage may need from the launching shell, passed to SkyPilot as secrets (by name).
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN")
# `sky` without relying on where SkyPilot keeps its CLI module: its own console-script entry point.
_SKY_ENTRY = ("import sys; from importlib.metadata import entry_points; sys.argv[0] = 'sky'; "
              "sys.exit(entry_points(group='console_scripts')['sky'].load()())")


@dataclass
class LaunchConfig:
    """How and where to run a stage; the cluster fields fill the Job and SkyPilot templates."""

    dry_run: bool = field(default=False, metadata={
        "help": "render and validate, print the manifest or task, submit nothing (local: print the command)"})
    image: str = field(default="", metadata={
        "help": "container image with the project's dependencies (default: $QPROBE_IMAGE)"})
    repo: str = field(default="", metadata={"help": "git URL the cluster clones (default: this checkout's origin)"})
    commit: str = field(default="", metadata={"help": "commit to run (default: HEAD; it must be pushed)"})
    gpus: int = field(default=8, metadata={"help": "GPUs for the stage (0 for CPU-only stages)"})
    accelerator: str = field(default="H100", metadata={"help": "SkyPilot accelerator type (H100, A100-80GB, ...)"})
    cpus: int = field(default=8, metadata={"help": "CPU cores requested"})
    memory_gb: int = field(default=64, metadata={"help": "memory requested, GiB"})
    disk_size: int = field(default=256, metadata={"help": "SkyPilot: disk of the node, GB"})
    namespace: str = field(default="default", metadata={"help": "Kubernetes namespace of the Job"})
    aws_secret: str = field(default="qprobe-aws", metadata={
        "help": "Kubernetes secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL)"})
    mlflow_secret: str = field(default="qprobe-mlflow", metadata={
        "help": "Kubernetes secret with MLFLOW_TRACKING_URI (and credentials)"})
    install: str = field(default="python -m pip install --quiet --no-deps -e .", metadata={
        "help": "shell command run in the checkout before the stage (':' when the image has the code)"})
    wait: bool = field(default=True, metadata={"help": "kubernetes: wait for the Job and read dvc.lock from its log"})
    timeout: float = field(default=172800.0, metadata={"help": "kubernetes: seconds to wait for the Job"})
    write_lock: bool = field(default=False, metadata={
        "help": "copy the stage's entry of the remote dvc.lock into ./dvc.lock"})
    accelerate_config: str = field(default="", metadata={
        "help": "local: run the stage's command under `accelerate launch` with this config, then `dvc commit`"})
    num_processes: int = field(default=0, metadata={"help": "local: accelerate processes (0: from the config)"})
    skypilot_python: str = field(default="", metadata={
        "help": "python of an environment with skypilot (default: $SKYPILOT_PYTHON)"})
    cluster: str = field(default="", metadata={"help": "SkyPilot cluster name (default: qprobe-STAGE)"})
    infra: str = field(default="", metadata={"help": "SkyPilot --infra (k8s, aws, gcp/us-central1, ...)"})
    kubectl: str = field(default="kubectl", metadata={"help": "kubectl executable"})
    env: dict[str, str] = field(default_factory=dict, metadata={
        "help": "plain (non-secret) variables for the remote stage, e.g. QPROBE_PARENT_RUN_ID so its MLflow "
                "run nests under the pipeline's"})


@dataclass
class LaunchResult:
    """What a launch ran (or, with ``dry_run``, would run) and the ``dvc.lock`` it left."""

    target: str
    stage: str
    command: list[str]
    rendered: str | None = None
    lock: str | None = None


# --- dvc.lock ----------------------------------------------------------------------------------------


def extract_lock(text: str) -> str | None:
    """The ``dvc.lock`` that ``run-stage.sh`` printed between its markers (the last one), if any."""
    end = text.rfind(LOCK_END)
    begin = text.rfind(LOCK_BEGIN, 0, end) if end >= 0 else -1
    if begin < 0:
        return None
    return text[begin + len(LOCK_BEGIN):end].strip("\n") + "\n"


def merge_lock(path: str | Path, lock_text: str, stage: str) -> None:
    """Put ``stage``'s entry of ``lock_text`` into the ``dvc.lock`` at ``path``; other stages stay as they are."""
    remote = yaml.safe_load(lock_text) or {}
    entry = (remote.get("stages") or {}).get(stage)
    if entry is None:
        raise LaunchError(f"the remote dvc.lock has no entry for stage {stage!r}")
    path = Path(path)
    local = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {"schema": remote.get("schema", "2.0")}
    local.setdefault("stages", {})[stage] = entry
    write_text_atomic(path, yaml.safe_dump(local, sort_keys=False))


# --- targets -----------------------------------------------------------------------------------------


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise LaunchError(f"git {' '.join(args)}: {proc.stderr.strip() or 'failed'}")
    return proc.stdout.strip()


def _stage_cmd(root: Path, stage: str) -> str:
    """The command of ``stage`` in ``dvc.yaml`` (a foreach stage ``name@key`` is checked by name)."""
    path = root / "dvc.yaml"
    if not path.is_file():
        raise LaunchError(f"{path}: not found (run from the repository root)")
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
    spec = stages.get(stage.split("@")[0])
    if spec is None:
        raise LaunchError(f"{path}: no stage {stage!r} (stages: {', '.join(stages) or 'none'})")
    cmd = spec.get("cmd", "") if isinstance(spec, dict) else ""
    if isinstance(cmd, list):
        if len(cmd) != 1:
            raise LaunchError(f"stage {stage}: accelerate runs one command, the stage has {len(cmd)}")
        cmd = cmd[0]
    return str(cmd)


def _run(cmd: Sequence[str], cwd: Path, input_text: str | None = None) -> subprocess.CompletedProcess[str]:
    log.info("running: %s", shlex.join(cmd))
    # Stage commands (`qprobe ...`) and dvc resolve from this interpreter's environment, activated or not.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        return subprocess.run(list(cmd), cwd=cwd, input=input_text, text=True, check=True, env=env)
    except FileNotFoundError as exc:
        raise LaunchError(f"{cmd[0]}: not found") from exc
    except subprocess.CalledProcessError as exc:
        raise LaunchError(f"{shlex.join(cmd)}: exit status {exc.returncode}") from exc


def accelerate_command(stage_cmd: str, config: str, num_processes: int = 0) -> list[str]:
    """``accelerate launch`` around a stage command: ``qprobe ARGS``, ``python -m MOD ARGS`` or ``python FILE ARGS``."""
    words = shlex.split(stage_cmd)
    if words[:1] == ["qprobe"]:
        target = ["-m", "qprobe.cli", *words[1:]]
    elif words[:1] in (["python"], ["python3"]) and len(words) > 1:
        target = words[1:]
    else:
        raise LaunchError(f"cannot run {stage_cmd!r} under accelerate: expected `qprobe ...` or `python ...`")
    launch_args = ["--config_file", config] + (["--num_processes", str(num_processes)] if num_processes else [])
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args, *target]


def _local(stage: str, cfg: LaunchConfig, root: Path) -> LaunchResult:
    dvc = [sys.executable, "-m", "dvc"]
    if cfg.accelerate_config:
        config = Path(cfg.accelerate_config)
        if not (root / config).is_file() and not config.is_file():
            raise LaunchError(f"{config}: accelerate config not found")
        commands = [accelerate_command(_stage_cmd(root, stage), str(config), cfg.num_processes),
                    [*dvc, "commit", "--force", stage]]
    else:
        _stage_cmd(root, stage)
        commands = [[*dvc, "repro", "--single-item", stage]]
    if not cfg.dry_run:
        for cmd in commands:
            _run(cmd, cwd=root)
    lock_path = root / "dvc.lock"
    lock = lock_path.read_text() if lock_path.is_file() and not cfg.dry_run else None
    return LaunchResult("local", stage, commands[0], rendered="\n".join(shlex.join(c) for c in commands), lock=lock)


def _origin(root: Path, cfg: LaunchConfig) -> tuple[str, str]:
    try:
        repo = cfg.repo or _git(root, "remote", "get-url", "origin")
    except LaunchError as exc:
        raise LaunchError("pass --repo: the git URL the cluster clones (this checkout has no 'origin')") from exc
    commit = _git(root, "rev-parse", cfg.commit or "HEAD")
    if not cfg.commit and _git(root, "status", "--porcelain", "--untracked-files=no"):
        log.warning("uncommitted changes: the cluster runs commit %s, not your working tree", commit[:12])
    return repo, commit


def _image(cfg: LaunchConfig, target: str) -> str:
    image = cfg.image or os.environ.get("QPROBE_IMAGE", "")
    if not image:
        raise LaunchError(f"{target}: pass --image (or set QPROBE_IMAGE): the image with the project's dependencies")
    return image


def _kubernetes(stage: str, cfg: LaunchConfig, root: Path) -> LaunchResult:
    _stage_cmd(root, stage)
    cfg = dataclasses.replace(cfg, image=_image(cfg, "kubernetes"))
    repo, commit = _origin(root, cfg)
    manifest = render_job(stage, cfg, repo, commit)
    doc = validate_job(manifest)
    apply = [cfg.kubectl, "apply", "-f", "-"]
    result = LaunchResult("kubernetes", stage, apply, rendered=manifest)
    if cfg.dry_run:
        return result
    kubectl = shutil.which(cfg.kubectl)
    if kubectl is None:
        raise LaunchError(f"{cfg.kubectl}: not found (install kubectl, or use --dry-run and apply the manifest)")
    _run([kubectl, *apply[1:]], cwd=root, input_text=manifest)
    if not cfg.wait:
        return result
    name, namespace = doc["metadata"]["name"], doc["metadata"].get("namespace", "default")
    status = _wait_job(kubectl, name, namespace, cfg.timeout, root)
    logs = subprocess.run([kubectl, "logs", f"job/{name}", "-n", namespace, "--tail=-1"], cwd=root,
                          capture_output=True, text=True, timeout=300).stdout
    if status != "succeeded":
        tail = "\n".join(logs.strip().splitlines()[-20:])
        raise LaunchError(f"job {name} {status}; last log lines:\n{tail}")
    result.lock = extract_lock(logs)
    if result.lock is None:
        raise LaunchError(f"job {name} succeeded but its log holds no dvc.lock (`kubectl logs job/{name}`)")
    return result


def _wait_job(kubectl: str, name: str, namespace: str, timeout: float, root: Path) -> str:
    """Poll the Job until it succeeds or fails ("succeeded", "failed" or "timed out")."""
    deadline = time.monotonic() + timeout
    query = [kubectl, "get", "job", name, "-n", namespace, "-o", "jsonpath={.status.succeeded},{.status.failed}"]
    while time.monotonic() < deadline:
        out = subprocess.run(query, cwd=root, capture_output=True, text=True, timeout=60).stdout.strip()
        succeeded, _, failed = out.partition(",")
        if succeeded.isdigit() and int(succeeded) > 0:
            return "succeeded"
        if failed.isdigit() and int(failed) > 0:
            return "failed"
        time.sleep(10)
    return f"timed out after {timeout:.0f} s"


def _skypilot(stage: str, cfg: LaunchConfig, root: Path) -> LaunchResult:
    _stage_cmd(root, stage)
    cfg = dataclasses.replace(cfg, image=_image(cfg, "skypilot"))
    repo, commit = _origin(root, cfg)
    # Declared by name only; `--secret NAME` hands SkyPilot the value from this environment.
    secrets = [n for n in SECRET_NAMES if os.environ.get(n)] or ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    task = render_sky_task(stage, cfg, repo, commit, secrets)
    validate_sky_task(task)
    python = cfg.skypilot_python or os.environ.get("SKYPILOT_PYTHON", "")
    cluster = cfg.cluster or slug(f"qprobe-{stage}")
    with tempfile.TemporaryDirectory(prefix="qprobe-sky-") as tmp:
        task_path = Path(tmp) / "stage.yaml"
        task_path.write_text(task)
        cmd = [python or "$SKYPILOT_PYTHON", "-c", _SKY_ENTRY, "launch", "--yes", "--down", "--cluster", cluster,
               *(a for n in secrets for a in ("--secret", n)), *(["--infra", cfg.infra] if cfg.infra else []),
               str(task_path)]
        result = LaunchResult("skypilot", stage, cmd, rendered=task)
        if python:
            sky_check(python, task_path)
        if cfg.dry_run:
            return result
        if not python:
            raise LaunchError("skypilot: set SKYPILOT_PYTHON (or --skypilot-python) to the python of an "
                              "environment with skypilot installed (it cannot share this one)")
        output = _stream(cmd, root)
    result.lock = extract_lock(output)
    if result.lock is None:
        raise LaunchError(f"sky launch finished but printed no dvc.lock (`sky logs {cluster}`)")
    return result


def _stream(cmd: Sequence[str], cwd: Path) -> str:
    """Run ``cmd``, echo its output as it comes, and return it."""
    log.info("running: %s", shlex.join(cmd))
    lines = []
    with subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
    if proc.returncode != 0:
        raise LaunchError(f"{cmd[0]} ... launch: exit status {proc.returncode}")
    return "".join(lines)


_RUNNERS = {"local": _local, "kubernetes": _kubernetes, "skypilot": _skypilot}


def launch(stage: str, target: str, cfg: LaunchConfig, root: str | Path | None = None) -> LaunchResult:
    """Run ``stage`` on ``target`` (``local``, ``kubernetes`` or ``skypilot``) from the repository ``root``.

    Remote targets return the ``dvc.lock`` their run printed; with ``cfg.write_lock`` the stage's entry
    is merged into ``root/dvc.lock``.
    """
    if target not in _RUNNERS:
        raise ConfigError(f"target: expected one of {', '.join(TARGETS)}, got {target!r}")
    root = Path(root) if root is not None else repo_root()
    result = _RUNNERS[target](stage, cfg, root)
    if cfg.write_lock and target != "local" and result.lock is not None:
        merge_lock(root / "dvc.lock", result.lock, stage)
        log.info("dvc.lock: entry of %s updated; `dvc pull %s` fetches its outputs", stage, stage)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run one DVC stage here or on a cluster.

    Example::

        qprobe launch local bench
        qprobe launch kubernetes train_stage1 --image ghcr.io/ORG/qprobe:TAG --gpus 8 --dry-run
        SKYPILOT_PYTHON=~/.venvs/sky/bin/python qprobe launch skypilot train_stage1 --image ... --write-lock
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "qprobe launch {" + ",".join(TARGETS) + "} STAGE"
    if len(argv) < 2 or argv[0] in ("-h", "--help") or argv[1].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            build_parser(LaunchConfig, prog, __doc__).print_help()
            return 0
        raise ConfigError(f"usage: {prog} [options] (`qprobe launch --help` lists them)")
    target, stage = argv[0], argv[1]
    cfg = parse_config(LaunchConfig, None, argv[2:], prog=f"qprobe launch {target} {stage}")
    result = launch(stage, target, cfg)
    if cfg.dry_run:
        print(result.rendered)
    elif result.lock is not None and target != "local":
        print(result.lock, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
