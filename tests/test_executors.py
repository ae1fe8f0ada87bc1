"""The local process pool behind ``--workers``: what is left of it when its command is killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every purpose but its process-table entry.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_a_killed_command_leaves_no_pool_worker_behind(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(textwrap.dedent("""
        import os, time
        from pathlib import Path

        def shard(n):
            Path(os.environ["PIDS"], str(os.getpid())).touch()
            time.sleep(60)
            return n
    """))
    pids = tmp_path / "pids"
    pids.mkdir()
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import slow; from qprobe.executors import map_shards; "
              "list(map_shards(slow.shard, range(4), workers=2))")
    command = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env={**os.environ, "PIDS": str(pids)})
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(p.name) for p in pids.iterdir()]
        assert len(workers) == 2 and all(_alive(w) for w in workers)
        command.send_signal(signal.SIGKILL)  # no shutdown runs: the workers must notice by themselves
        command.wait()
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers)
    finally:
        command.kill()
        for p in pids.iterdir():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p.name), signal.SIGKILL)
