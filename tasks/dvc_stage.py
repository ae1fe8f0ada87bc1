"""Prefect task that runs one DVC stage, and the plain helpers it needs to read the stage graph.

A Prefect run and a plain ``dvc repro`` execute the very same command, ``dvc repro --single-item
STAGE``, in the same workspace, so they share one cache: after a flow run ``dvc status`` is clean and
``dvc repro`` is a no-op. DVC holds a lock on the workspace, so stages run one after the other;
parallelism belongs inside a stage.

What the stage prints streams live, each line prefixed with the stage's name, to the terminal and
to the Prefect task's log (:mod:`tasks.stage_output`).

DVC runs in a process group of its own, with the stage it starts and whatever that spawns: when the
flow is interrupted (or a timeout expires) the whole group is stopped, not only DVC.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import get_run_logger, task

from qprobe import offline
from qprobe.procs import stop_group
from qprobe.tracking import PARENT_ENV
from tasks.stage_output import StageOutput, child_env

log = logging.getLogger(__name__)

# Seconds a stopped stage has between SIGTERM and SIGKILL.
STOP_GRACE_S = 10.0


class StageError(RuntimeError):
    """A DVC stage that failed; carries the tail of its output."""


@dataclass
class StageResult:
    stage: str
    ran: bool
    seconds: float
    lock: dict[str, Any] = field(default_factory=dict)


def stage_order(root: str | Path) -> list[str]:
    """The stages of ``dvc.yaml`` in dependency order (DVC's graph), ties kept in file order."""
    import networkx as nx
    from dvc.repo import Repo

    path = Path(root) / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dvc.yaml (is this the repository root?)")
    names = list((yaml.safe_load(path.read_text()) or {}).get("stages") or {})
    position = {name: i for i, name in enumerate(names)}
    with Repo(str(root)) as repo:
        # Edges run from a stage to what it depends on; reversed, a topological sort runs inputs first.
        # Stage.addressing is relative to the working directory; the name is not.
        graph = nx.DiGraph((getattr(a, "name", None), getattr(b, "name", None)) for a, b in repo.index.graph.edges)
    graph.add_nodes_from(names)
    graph = graph.subgraph(names).reverse()
    return list(nx.lexicographical_topological_sort(graph, key=lambda name: position[name]))


def lock_entry(root: str | Path, stage: str) -> dict[str, Any]:
    """The stage's entry in ``dvc.lock`` (deps, params and outs with their md5), or {} if absent."""
    path = Path(root) / "dvc.lock"
    if not path.is_file():
        return {}
    return ((yaml.safe_load(path.read_text()) or {}).get("stages") or {}).get(stage, {})


def stage_env(parent_run_id: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a stage: offline defaults, the venv's bin first (so `qprobe`
    resolves without activation), the pipeline's MLflow run as the stage's parent."""
    env = {**offline.environ(), **(extra or {})}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    return env


@contextlib.contextmanager
def _dvc_process(args: list[str], root: str | Path, env: dict[str, str] | None,
                 **popen: Any) -> Iterator[subprocess.Popen]:
    """The DVC that lives beside this interpreter (the project's pinned one), started in a new process group.

    Whatever ends the wait early (an interruption, a timeout) stops the whole group before it propagates.
    """
    exe = Path(sys.executable).parent / "dvc"
    cmd = [str(exe) if exe.exists() else "dvc", *args]
    # A session of its own: the group can be stopped as one, and a terminal's Ctrl-C reaches the flow
    # alone, which then stops the group rather than leaving DVC and the stage to race it.
    with subprocess.Popen(cmd, cwd=root, env=env or stage_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          start_new_session=True, **popen) as proc:
        try:
            yield proc
        except BaseException:
            left = stop_group(proc.pid, STOP_GRACE_S, proc)
            if left:
                log.warning("dvc %s: processes %s survived SIGKILL", " ".join(args), left)
            raise


def dvc(args: list[str], root: str | Path, env: dict[str, str] | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run DVC (see :func:`_dvc_process`) to the end and return what it printed."""
    with _dvc_process(args, root, env, stderr=subprocess.PIPE, text=True) as proc:
        stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def dvc_live(args: list[str], root: str | Path, env: dict[str, str] | None, output: StageOutput) -> int:
    """Run DVC (see :func:`_dvc_process`), handing ``output`` what it prints as it prints it; the exit code.

    stderr joins stdout in one pipe, so the pieces keep the order they were printed in.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with _dvc_process(args, root, env, stderr=subprocess.STDOUT) as proc:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            output.feed(decoder.decode(chunk))
        output.feed(decoder.decode(b"", final=True))
        output.close()
        return proc.wait()


def status_verdict(root: str | Path) -> str:
    """What ``dvc status`` says of the workspace, in a few words: ``clean``, or which stages changed."""
    proc = dvc(["status", "--json"], root)
    if proc.returncode != 0:
        return "unknown (" + (proc.stderr.strip().splitlines() or ["dvc status failed"])[-1][:120] + ")"
    try:
        changed = json.loads(proc.stdout or "{}")
    except ValueError:
        return "unknown (dvc status printed no JSON)"
    if not changed:
        return "clean"
    names = sorted(key.rsplit(":", 1)[-1] for key in changed)
    return f"{len(names)} changed ({', '.join(names)}): `dvc repro` would run them"


def repro_stage(stage: str, root: str | Path, parent_run_id: str | None = None,
                extra_env: dict[str, str] | None = None, force: bool = False,
                log_line: Callable[[str], None] | None = None) -> StageResult:
    """``dvc repro --single-item STAGE``; ``ran`` is False when DVC found it up to date.

    What the stage prints reaches this process's stdout as it comes, and ``log_line`` line by line
    (:class:`~tasks.stage_output.StageOutput`).
    """
    args = ["repro", "--single-item", stage] + (["--force"] if force else [])
    output = StageOutput(stage, sys.stdout, log_line)
    start = time.perf_counter()
    code = dvc_live(args, root, stage_env(parent_run_id, {**child_env(sys.stdout), **(extra_env or {})}), output)
    seconds = time.perf_counter() - start
    if code != 0:
        # Progress bars and library warnings bury the one line that says what went wrong.
        lines = [line for line in output.tail
                 if "it/s]" not in line and "examples/s]" not in line and "warn" not in line.lower()]
        tail = "\n".join(lines[-12:])
        raise StageError(f"dvc repro of stage {stage!r} failed (exit {code}):\n{tail}")
    said = "\n".join(output.head)
    skipped = f"Stage '{stage}' didn't change, skipping" in said or "is cached - skipping" in said
    ran = not skipped and f"Running stage '{stage}'" in said
    return StageResult(stage=stage, ran=ran, seconds=seconds, lock=lock_entry(root, stage))


def _prefect_log() -> Callable[[str], None]:
    """Logs a line to the running Prefect task's log alone: the terminal shows the stage's output already, raw."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("qprobe.stage_output")
    if not logger.handlers:
        logger.addHandler(APILogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the root logger's console handler would print every line a second time
    return logger.info


@task(name="dvc-stage", task_run_name="dvc repro {stage}", retries=0)
def run_stage(stage: str, root: str, parent_run_id: str | None = None,
              extra_env: dict[str, str] | None = None, force: bool = False) -> StageResult:
    """Prefect task: run one DVC stage (see :func:`repro_stage`), its output live in the terminal and the task's log."""
    return repro_stage(stage, root, parent_run_id, extra_env, force, _prefect_log())


@task(name="launch-stage", task_run_name="launch {stage} on {target}")
def launch_stage(stage: str, target: str, root: str, parent_run_id: str | None = None,
                 options: dict[str, Any] | None = None) -> StageResult:
    """Run one stage on a cluster target through :func:`qprobe.ops.launch.launch`, then fetch its outputs.

    The remote run records its ``dvc.lock`` entry here (``write_lock``) and pushes its outputs; ``dvc
    pull`` brings them into this workspace so later local stages find them. ``QPROBE_PARENT_RUN_ID``
    travels with the job, so the stage's MLflow run nests under the pipeline's as a local one does.
    """
    from qprobe.config import from_dict
    from qprobe.ops.launch import LaunchConfig, launch

    options = dict(options or {})
    env = {**options.pop("env", {}), **({PARENT_ENV: parent_run_id} if parent_run_id else {})}
    cfg = from_dict(LaunchConfig, {**options, "write_lock": True, "env": env}, "launch_options")
    start = time.perf_counter()
    launch(stage, target, cfg, root)
    if target != "local":
        pulled = dvc(["pull", stage], root)
        if pulled.returncode != 0:
            raise StageError(f"dvc pull {stage} after the {target} run failed: {pulled.stderr.strip()[-500:]}")
    get_run_logger().info("stage %s ran on %s", stage, target)
    return StageResult(stage=stage, ran=True, seconds=time.perf_counter() - start, lock=lock_entry(root, stage))
