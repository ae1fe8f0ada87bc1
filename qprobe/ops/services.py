"""Local services without docker: S3 (SeaweedFS), an MLflow server and a Prefect server.

A team runs these from ``infra/compose.yaml``. Where there is no container engine (a laptop, CI, a
GPU box), ``qprobe services up`` starts the same roles as local processes, each bound to 127.0.0.1,
detached in its own session (so they outlive the shell that started them), with its data and its log
under one folder (``.services/`` by default). What each role runs is :mod:`qprobe.ops.roles`.

Their PIDs go to ``.services/state.json``. ``up`` is idempotent: a healthy role is kept, one still
starting is waited for, a dead one (stale PID) is replaced, and one that is not healthy in time is
stopped and reported with the end of its log. ``status`` prints a table and exits 1 when a requested
role is not healthy; ``down`` stops each process group (SIGTERM, then SIGKILL) and forgets it. The
variables a client needs (``AWS_ENDPOINT_URL``, the dev credentials, ``MLFLOW_TRACKING_URI``,
``PREFECT_API_URL``, ...) are printed and written to ``.services/env`` for ``source``.

Process bookkeeping reads ``/proc``: this module runs on Linux.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qprobe.config import ConfigError, build_parser, parse_config
from qprobe.io import write_json_atomic, write_text_atomic
from qprobe.ops.roles import (
    COMMANDS,
    DEV_ACCESS_KEY,
    DEV_SECRET_KEY,
    GRPC_OFFSET,
    HOST,
    PROBES,
    REGION,
    ROLES,
    ServiceError,
    create_buckets,
    port_free,
    with_needs,
)
from qprobe.procs import group_members, is_running, proc_start, stop_group

STATE_FILE = "state.json"
ENV_FILE = "env"
_STOP_GRACE_S = 15.0


@dataclass
class ServicesConfig:
    """Which local services to manage, where their data lives and the ports they listen on."""

    roles: str = field(default="s3,mlflow,prefect",
                       metadata={"help": "comma-separated roles among s3, mlflow, prefect (up adds s3 for mlflow)"})
    dir: str = field(default=".services",
                     metadata={"help": "folder for the services' data, logs, state.json and env"})
    s3_port: int = field(default=8333, metadata={"help": "S3 API port (SeaweedFS also takes this + 10000 for gRPC)"})
    mlflow_port: int = field(default=5000, metadata={"help": "MLflow tracking server port"})
    prefect_port: int = field(default=4200, metadata={"help": "Prefect server port (API under /api)"})
    prefect_ui: bool = field(default=True, metadata={"help": "serve the Prefect UI (--no-prefect-ui starts faster)"})
    timeout: float = field(default=120.0, metadata={"help": "seconds each role may take to become healthy"})

    def __post_init__(self) -> None:
        names = [r.strip() for r in self.roles.split(",") if r.strip()]
        unknown = [r for r in names if r not in ROLES]
        if unknown or not names:
            raise ConfigError(f"roles: expected a comma-separated subset of {', '.join(ROLES)}, got {self.roles!r}")
        for role in ROLES:
            port = self.port(role)
            limit = 65535 - GRPC_OFFSET if role == "s3" else 65535
            if not 1024 <= port <= limit:
                raise ConfigError(f"{role}_port: expected a port in 1024..{limit}, got {port}")
        if self.timeout <= 0:
            raise ConfigError(f"timeout: expected a positive number of seconds, got {self.timeout}")

    @property
    def role_list(self) -> tuple[str, ...]:
        """The requested roles, in start order."""
        names = {r.strip() for r in self.roles.split(",")}
        return tuple(r for r in ROLES if r in names)

    @property
    def root(self) -> Path:
        return Path(self.dir).resolve()

    def port(self, role: str) -> int:
        return int(getattr(self, f"{role}_port"))

    def url(self, role: str) -> str:
        base = f"http://{HOST}:{self.port(role)}"
        return base + "/api" if role == "prefect" else base


@dataclass
class Service:
    """One running role, as recorded in ``state.json``."""

    role: str
    pid: int
    port: int
    url: str
    log: str
    started_at: float
    # Kernel start time of the process (clock ticks since boot): tells our process from a reused PID.
    proc_start: int | None = None
    startup_s: float | None = None
    internal_ports: dict[str, int] = field(default_factory=dict)

    def alive(self) -> bool:
        """The recorded process still runs (and is the one we started, not a reused PID)."""
        child = _CHILDREN.get(self.pid)
        if child is not None and child.poll() is not None:
            return False
        return is_running(self.pid) and (self.proc_start is None or proc_start(self.pid) == self.proc_start)

    def healthy(self) -> bool:
        return self.alive() and PROBES[self.role](self.url)

    def pids(self) -> list[int]:
        """Every live process of the service's process group (the server and the workers it forked)."""
        if is_running(self.pid) and not self.alive():
            return []  # the PID was reused by an unrelated process: nothing of ours is left
        return group_members(self.pid)

    def memory_mb(self) -> float:
        """Resident memory of the whole process group, in MiB."""
        return sum(_rss_kib(pid) for pid in self.pids()) / 1024


# Processes started by this interpreter: polling them reaps them once they exit (else they linger as zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


# --- /proc bookkeeping -------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --- state -------------------------------------------------------------------------------------------


def load_state(cfg: ServicesConfig) -> dict[str, Service]:
    """The services recorded in ``state.json`` (alive or not)."""
    path = cfg.root / STATE_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {role: Service(**entry) for role, entry in raw.get("services", {}).items()}
    except (ValueError, TypeError) as exc:
        raise ServiceError(f"{path}: unreadable state ({exc}); stop stray processes and delete the file") from exc


def _save_state(cfg: ServicesConfig, services: Mapping[str, Service]) -> None:
    path = cfg.root / STATE_FILE
    if services:
        write_json_atomic(path, {"services": {r: dataclasses.asdict(s) for r, s in services.items()}})
    else:
        path.unlink(missing_ok=True)


def service_env(cfg: ServicesConfig) -> dict[str, str]:
    """The variables a client exports to use the requested roles (``source .services/env`` sets them)."""
    env: dict[str, str] = {}
    roles = cfg.role_list
    if "s3" in roles:
        s3 = cfg.url("s3")
        env.update({"AWS_ENDPOINT_URL": s3, "AWS_ACCESS_KEY_ID": DEV_ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": DEV_SECRET_KEY, "AWS_DEFAULT_REGION": REGION,
                    # Read by MLflow clients that write artifacts to S3 themselves (not via the server).
                    "MLFLOW_S3_ENDPOINT_URL": s3})
    if "mlflow" in roles:
        env["MLFLOW_TRACKING_URI"] = cfg.url("mlflow")
    if "prefect" in roles:
        env["PREFECT_API_URL"] = cfg.url("prefect")
    return env


def _write_env(cfg: ServicesConfig, running: Mapping[str, Service]) -> Path:
    path = cfg.root / ENV_FILE
    if not running:
        path.unlink(missing_ok=True)
        return path
    # The ports the services run on, which need not be this call's (another role may have other flags).
    live = dataclasses.replace(cfg, roles=",".join(running), **{f"{r}_port": s.port for r, s in running.items()})
    lines = [f"# qprobe services ({', '.join(running)}): source {path}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in service_env(live).items()]
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


# --- start and stop ----------------------------------------------------------------------------------


def _log_tail(path: str | Path, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def _spawn(cfg: ServicesConfig, role: str) -> Service:
    port = cfg.port(role)
    wanted = [port, port + GRPC_OFFSET] if role == "s3" else [port]
    # A server that has just exited can hold its listening socket for a moment longer.
    deadline = time.monotonic() + 5.0
    while (busy := [p for p in wanted if not port_free(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if busy:
        raise ServiceError(f"{role}: port {busy[0]} on {HOST} is in use by another program "
                           f"(choose another with --{role}-port)")
    cmd, env, internal = COMMANDS[role](cfg)
    log_path = cfg.root / "logs" / f"{role}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        # A new session: the service survives the terminal that started it and is stopped as one group.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cfg.root, env=env, start_new_session=True)
    _CHILDREN[proc.pid] = proc
    return Service(role=role, pid=proc.pid, port=port, url=cfg.url(role), log=str(log_path),
                   started_at=time.time(), proc_start=proc_start(proc.pid), internal_ports=internal)


def _stop(service: Service, grace: float = _STOP_GRACE_S) -> None:
    """SIGTERM the service's process group, SIGKILL what is left after ``grace`` seconds, reap."""
    left = stop_group(service.pid, grace, _CHILDREN.get(service.pid)) if service.pids() else []
    _CHILDREN.pop(service.pid, None)
    if left:
        raise ServiceError(f"{service.role}: processes {left} survived SIGKILL")
    if service.role == "s3":
        _remove_weed_sockets(service)


def _remove_weed_sockets(service: Service) -> None:
    """SeaweedFS leaves a unix socket per server port in the temp folder (``seaweedfs-ROLE-PORT.sock``)."""
    tmp = Path(os.environ.get("TMPDIR") or "/tmp")
    for port in (service.port, *service.internal_ports.values()):
        for p in (port, port + GRPC_OFFSET):
            for sock in tmp.glob(f"seaweedfs-*-{p}.sock"):
                sock.unlink(missing_ok=True)


def start_services(cfg: ServicesConfig) -> dict[str, Service]:
    """Start the requested roles (and the ones they need); return every requested role, healthy.

    A role already recorded, alive and healthy is kept; a dead one is replaced; one that does not
    become healthy within ``cfg.timeout`` is stopped and raises :class:`ServiceError` with the end
    of its log. The roles start together and are health-checked in one loop.
    """
    roles = with_needs(cfg.role_list)
    # Owner only: the folder holds the dev credentials (env, s3.json) and the services' databases.
    cfg.root.mkdir(parents=True, exist_ok=True)
    cfg.root.chmod(0o700)
    state = load_state(cfg)
    pending: dict[str, Service] = {}
    for role in roles:
        known = state.get(role)
        if known is not None and known.alive():
            if known.port != cfg.port(role):
                raise ServiceError(f"{role} already runs on port {known.port}; `qprobe services down --roles "
                                   f"{role} --dir {cfg.dir}` first to move it to {cfg.port(role)}")
            pending[role] = known
            continue
        if known is not None:
            _stop(known)  # the leader died: stop what it left in its group
        pending[role] = state[role] = _spawn(cfg, role)
        _save_state(cfg, state)  # recorded at once, so `down` can stop it even if this call is interrupted
    deadline = {role: time.monotonic() + cfg.timeout for role in pending}
    ready: dict[str, Service] = {}
    while pending:
        for role, service in list(pending.items()):
            if service.healthy():
                if service.startup_s is None:
                    service.startup_s = round(time.time() - service.started_at, 2)
                if role == "s3":
                    create_buckets(service.url)
                ready[role] = pending.pop(role)
            elif not service.alive() or time.monotonic() > deadline[role]:
                why = f"was not healthy after {cfg.timeout:.0f} s" if service.alive() else "exited"
                _stop(service)
                state.pop(role, None)
                _save_state(cfg, state)
                raise ServiceError(f"{role} {why} (log {service.log}):\n{_log_tail(service.log)}")
        if pending:
            time.sleep(0.25)
    _save_state(cfg, state)
    _write_env(cfg, {r: state[r] for r in ROLES if r in state})
    return {role: ready[role] for role in roles}


def stop_services(cfg: ServicesConfig) -> list[str]:
    """Stop the requested roles (in reverse start order) and forget them; returns the roles stopped."""
    state = load_state(cfg)
    stopped = []
    for role in reversed(cfg.role_list):
        service = state.pop(role, None)
        if service is None:
            continue
        _stop(service)
        stopped.append(role)
    _save_state(cfg, state)
    _write_env(cfg, state)
    return stopped


def service_status(cfg: ServicesConfig) -> dict[str, Service | None]:
    """Each requested role's recorded service, or ``None`` when none is recorded."""
    state = load_state(cfg)
    return {role: state.get(role) for role in cfg.role_list}


# --- command line ------------------------------------------------------------------------------------


def format_table(services: Mapping[str, Service | None]) -> str:
    rows = [("role", "pid", "port", "url", "healthy", "startup_s", "mem_mb")]
    for role, svc in services.items():
        if svc is None:
            rows.append((role, "-", "-", "-", "no", "-", "-"))
            continue
        healthy = svc.healthy()
        rows.append((role, str(svc.pid), str(svc.port), svc.url, "yes" if healthy else "no",
                     "-" if svc.startup_s is None else f"{svc.startup_s:.1f}",
                     f"{svc.memory_mb():.0f}" if svc.alive() else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


_ACTIONS = ("up", "down", "status")
_DESCRIPTION = """\
actions:
  up      start the roles (idempotent), print the table and the variables to export
  down    stop the roles and forget them
  status  print the table; exit 1 when a requested role is not healthy

Data, logs (logs/ROLE.log), state.json and env live in --dir; `source .services/env` afterwards."""


def main(argv: Sequence[str] | None = None) -> int:
    """Manage the local services.

    Example::

        qprobe services up                          # S3 :8333, MLflow :5000, Prefect :4200
        source .services/env                        # AWS_*, MLFLOW_TRACKING_URI, PREFECT_API_URL
        qprobe services status --roles s3,mlflow
        qprobe services down
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "qprobe services {" + ",".join(_ACTIONS) + "}"
    if not argv or argv[0] not in _ACTIONS:
        parser = build_parser(ServicesConfig, prog, _DESCRIPTION)
        if argv and argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0
        raise ConfigError(f"expected an action ({', '.join(_ACTIONS)}), got {argv[0] if argv else 'none'!r}")
    action, rest = argv[0], argv[1:]
    cfg = parse_config(ServicesConfig, None, rest, prog=f"qprobe services {action}", description=_DESCRIPTION)
    if action == "up":
        services = start_services(cfg)
        print(format_table(services))
        env_path = cfg.root / ENV_FILE
        print(f"\n# use them in this shell: source {env_path}")
        for key, value in service_env(dataclasses.replace(cfg, roles=",".join(services))).items():
            print(f"export {key}={shlex.quote(value)}")
        return 0
    if action == "down":
        stopped = stop_services(cfg)
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
        return 0
    status = service_status(cfg)
    print(format_table(status))
    return 0 if all(s is not None and s.healthy() for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
