"""Processes as Linux's ``/proc`` sees them: liveness that tells a reused PID apart, process groups, stopping one.

Shared by the local services (:mod:`qprobe.ops.services`), the pipeline's stage subprocesses
(``tasks/dvc_stage.py``) and the MLflow orphan sweep (:mod:`qprobe.tracking`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name: [state, ppid, pgrp, ...]; None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def is_running(pid: int) -> bool:
    """The PID belongs to a live process (a zombie has exited: it only waits to be reaped)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def proc_start(pid: int) -> int | None:
    """Kernel start time of the process (clock ticks since boot): tells a process from a reused PID."""
    fields = stat_fields(pid)
    return int(fields[19]) if fields else None


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return sorted(members)


def stop_group(pgid: int, grace: float, child: subprocess.Popen | None = None) -> list[int]:
    """SIGTERM process group ``pgid``, SIGKILL what is left after ``grace`` seconds; return the survivors.

    ``child``: the group leader when this interpreter started it; polling it reaps it once it exits
    (else it lingers as a zombie).
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not group_members(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if child is not None:
                child.poll()
            if not group_members(pgid):
                break
            time.sleep(0.1)
    if child is not None:
        child.poll()
    return group_members(pgid)
