"""What ``qprobe launch`` submits to a cluster: the Kubernetes Job and the SkyPilot task.

Both are rendered from the templates in this source tree's ``infra/`` folder (Jinja2, a placeholder
without a value is an error) and checked before anything is submitted: the Job against
:data:`JOB_SCHEMA`, the part of the ``batch/v1`` schema a typo in a template breaks; the task for
the keys the launcher relies on, and by SkyPilot's own parser in its own environment
(:func:`sky_check`). :class:`LaunchError` is here, the lowest module that raises it; the targets
that submit these are :mod:`qprobe.ops.launch`. The KubeRay RayCluster the data stages'
``--executor ray`` reaches (:func:`render_raycluster`) is rendered and checked the same way.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from qprobe.errors import QProbeError

if TYPE_CHECKING:  # launch.py imports this module: its config class is needed for annotations only
    from qprobe.ops.launch import LaunchConfig

INFRA = Path(__file__).resolve().parents[2] / "infra"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class LaunchError(QProbeError, RuntimeError):
    """A stage that cannot be rendered, submitted or run, or that failed."""


# --- rendering ---------------------------------------------------------------------------------------


def _jinja() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(INFRA)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)


def render_template(template: str, /, **params: Any) -> str:
    """Render ``infra/TEMPLATE`` with ``params``; a placeholder without a value is an error."""
    import jinja2

    try:
        return _jinja().get_template(template).render(**params)
    except jinja2.TemplateNotFound as exc:
        raise LaunchError(f"{INFRA / template}: template not found") from exc
    except jinja2.UndefinedError as exc:
        raise LaunchError(f"{INFRA / template}: {exc}") from exc


def slug(text: str, limit: int = 63) -> str:
    """``text`` as a DNS-1123 label (lowercase alphanumerics and '-'), at most ``limit`` characters."""
    out = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return out[:limit].rstrip("-") or "x"


def render_script(install: str) -> str:
    return render_template("remote/run-stage.sh", install=install)


def job_name(stage: str, commit: str) -> str:
    """Unique per launch: a Job's spec is immutable, so a re-run needs a new name."""
    suffix = format(int(time.time() * 10) % 36**5, "x")
    return f"{slug('qprobe-' + stage, 63 - 10 - len(suffix))}-{commit[:8]}-{suffix}"


def render_job(stage: str, cfg: LaunchConfig, repo: str, commit: str, name: str | None = None) -> str:
    """The Kubernetes Job manifest (YAML) that runs ``stage`` at ``commit``."""
    return render_template(
        "k8s/stage-job.yaml", name=name or job_name(stage, commit), namespace=cfg.namespace, stage=stage,
        stage_label=slug(stage), image=cfg.image, repo=repo, commit=commit, gpus=cfg.gpus, cpus=cfg.cpus,
        memory_gb=cfg.memory_gb, aws_secret=cfg.aws_secret, mlflow_secret=cfg.mlflow_secret,
        script=render_script(cfg.install), env=cfg.env)


def render_sky_task(stage: str, cfg: LaunchConfig, repo: str, commit: str,
                    secrets: Sequence[str] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")) -> str:
    """The SkyPilot task (YAML) that runs ``stage`` at ``commit``; ``secrets`` are declared by name only."""
    return render_template(
        "skypilot/stage.yaml", name=slug(f"qprobe-{stage}"), stage=stage, image=cfg.image, repo=repo,
        commit=commit, accelerator=cfg.accelerator, gpus=cfg.gpus, cpus=cfg.cpus, memory_gb=cfg.memory_gb,
        disk_size=cfg.disk_size, infra=cfg.infra, secrets=list(secrets), script=render_script(cfg.install),
        env=cfg.env)


# --- checks --------------------------------------------------------------------------------------

_QUANTITIES = {"type": "object", "additionalProperties": {"type": ["string", "integer"]}}
_STRINGS = {"type": "array", "items": {"type": "string"}}
# The part of the batch/v1 Job schema that a typo in a template breaks; the API server checks the rest.
JOB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "batch/v1"},
        "kind": {"const": "Job"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "maxLength": 63, "pattern": DNS_LABEL},
                           "namespace": {"type": "string", "pattern": DNS_LABEL},
                           "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}}},
        },
        "spec": {
            "type": "object",
            "required": ["template"],
            "properties": {
                "backoffLimit": {"type": "integer", "minimum": 0},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "template": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {"spec": {
                        "type": "object",
                        "required": ["containers", "restartPolicy"],
                        "properties": {
                            "restartPolicy": {"enum": ["Never", "OnFailure"]},
                            "containers": {"type": "array", "minItems": 1, "items": {
                                "type": "object",
                                "required": ["name", "image", "resources"],
                                "properties": {
                                    "name": {"type": "string", "pattern": DNS_LABEL},
                                    "image": {"type": "string", "minLength": 1},
                                    "command": _STRINGS,
                                    "args": _STRINGS,
                                    "env": {"type": "array", "items": {
                                        "type": "object", "required": ["name"],
                                        "properties": {"name": {"type": "string", "minLength": 1},
                                                       "value": {"type": "string"}}}},
                                    "envFrom": {"type": "array"},
                                    "resources": {"type": "object", "additionalProperties": False,
                                                  "properties": {"requests": _QUANTITIES, "limits": _QUANTITIES}},
                                },
                            }},
                        },
                    }},
                },
            },
        },
    },
}


def _checked(manifest: str | Mapping[str, Any], schema: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """Parse (if text) and check a manifest against ``schema``; the first error names where it is."""
    import jsonschema

    doc = yaml.safe_load(manifest) if isinstance(manifest, str) else dict(manifest)
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path) or "(document)"
        raise LaunchError(f"invalid {kind} at {where}: {first.message}")
    return doc


def validate_job(manifest: str | Mapping[str, Any]) -> dict[str, Any]:
    """Parse (if text) and check a Job manifest against :data:`JOB_SCHEMA`; returns the document."""
    doc = _checked(manifest, JOB_SCHEMA, "Kubernetes Job")
    for container in doc["spec"]["template"]["spec"]["containers"]:
        limits, requests = container["resources"].get("limits", {}), container["resources"].get("requests", {})
        if "nvidia.com/gpu" in requests and requests["nvidia.com/gpu"] != limits.get("nvidia.com/gpu"):
            # Kubernetes refuses extended resources whose request differs from the limit.
            raise LaunchError(f"container {container['name']}: nvidia.com/gpu request and limit differ")
    return doc


def validate_sky_task(text: str) -> dict[str, Any]:
    """Check the keys the launcher relies on in a rendered SkyPilot task; returns the document."""
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise LaunchError("SkyPilot task: not a mapping")
    missing = [k for k in ("name", "resources", "envs", "run") if k not in doc]
    if missing:
        raise LaunchError(f"SkyPilot task: missing {', '.join(missing)}")
    accelerators = str(doc["resources"].get("accelerators", ""))
    if not re.fullmatch(r"[A-Za-z0-9-]+:[1-9][0-9]*", accelerators):
        raise LaunchError(f"SkyPilot task: resources.accelerators must be TYPE:COUNT, got {accelerators!r}")
    if not str(doc["resources"].get("image_id", "")).startswith("docker:") or doc["resources"]["image_id"] == "docker:":
        raise LaunchError("SkyPilot task: resources.image_id must be docker:IMAGE (pass --image)")
    for key in ("QPROBE_REPO", "QPROBE_COMMIT", "QPROBE_STAGE", "QPROBE_WORKDIR"):
        if not doc["envs"].get(key):
            raise LaunchError(f"SkyPilot task: envs.{key} is empty")
    return doc


def sky_check(python: str, task_path: Path) -> None:
    """Parse the task with SkyPilot itself (schema, resources) in its own environment."""
    code = "import sys, sky; print(sky.Task.from_yaml(sys.argv[1]))"
    proc = subprocess.run([python, "-c", code, str(task_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"})
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise LaunchError(f"SkyPilot rejects the task: {' / '.join(tail)}")


# --- KubeRay ---------------------------------------------------------------------------------------

_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}  # KubeRay: map[string]string


def _pod_template(container_name: str) -> dict[str, Any]:
    return {"type": "object", "required": ["spec"], "properties": {"spec": {
        "type": "object", "required": ["containers"], "properties": {"containers": {
            "type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "image", "resources"],
                "properties": {"name": {"const": container_name}, "image": {"type": "string", "minLength": 1},
                               "env": {"type": "array", "items": {
                                   "type": "object", "required": ["name", "value"],
                                   "properties": {"name": {"type": "string", "minLength": 1},
                                                  "value": {"type": "string"}}}},
                               "resources": {"type": "object", "additionalProperties": False,
                                             "properties": {"requests": _QUANTITIES, "limits": _QUANTITIES}}}}}}}}}


# The part of KubeRay's ray.io/v1 RayCluster schema that a typo in the template breaks.
RAYCLUSTER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": JOB_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
            "properties": {
                "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"], "properties": {
                    "rayStartParams": _START_PARAMS, "template": _pod_template("ray-head")}},
                "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["groupName", "replicas", "rayStartParams", "template"],
                    "properties": {"groupName": {"type": "string", "pattern": DNS_LABEL},
                                   "replicas": {"type": "integer", "minimum": 1},
                                   "minReplicas": {"type": "integer", "minimum": 0},
                                   "maxReplicas": {"type": "integer", "minimum": 1},
                                   "rayStartParams": _START_PARAMS, "template": _pod_template("ray-worker")}}},
            },
        },
    },
}


def render_raycluster(image: str, workers: int = 2, cpus: int = 4, memory_gb: int = 16, name: str = "qprobe-ray",
                      namespace: str = "default", aws_secret: str = "qprobe-aws", ray_version: str | None = None) -> str:
    """The KubeRay RayCluster (YAML) the data stages reach with ``--ray-address ray://HEAD:10001``.

    ``workers`` pods of ``cpus`` CPUs each run the shards; their environment is the offline one every
    Q-Probe process runs with (:mod:`qprobe.offline`). ``ray_version`` defaults to the Ray installed here,
    the one the driver runs: the Ray client needs the same version on both sides.
    """
    from importlib.metadata import PackageNotFoundError, version

    from qprobe import offline

    if ray_version is None:
        try:
            ray_version = version("ray")
        except PackageNotFoundError as exc:
            raise LaunchError("RayCluster: Ray is not installed here (pip install -e '.[ray]'); "
                              "pass ray_version") from exc
    return render_template("k8s/raycluster.yaml", name=name, namespace=namespace, image=image, workers=workers,
                           cpus=cpus, memory_gb=memory_gb, aws_secret=aws_secret, ray_version=ray_version,
                           env=offline.OFFLINE_ENV)


def validate_raycluster(manifest: str | Mapping[str, Any]) -> dict[str, Any]:
    """Parse (if text) and check a RayCluster against :data:`RAYCLUSTER_SCHEMA`; returns the document."""
    doc = _checked(manifest, RAYCLUSTER_SCHEMA, "RayCluster")
    for group in doc["spec"]["workerGroupSpecs"]:
        low, high = group.get("minReplicas", group["replicas"]), group.get("maxReplicas", group["replicas"])
        if not low <= group["replicas"] <= high:
            raise LaunchError(f"RayCluster worker group {group['groupName']}: replicas {group['replicas']} "
                              f"outside [minReplicas {low}, maxReplicas {high}]")
    return doc
