"""A throwaway git + DVC repository with one trivial stage, for launcher and S3 remote tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from qprobe import offline

STAGE = "make"
MAKE_PY = """\
import pathlib
pathlib.Path("out.txt").write_text(pathlib.Path("input.txt").read_text().upper())
"""


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment with this interpreter's bin folder first on PATH (``dvc``, ``python``)."""
    env = offline.environ()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.update(extra or {})
    return env


def run(cmd: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(list(cmd), cwd=cwd, env=tool_env(env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def dvc(cwd: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    return run([sys.executable, "-m", "dvc", *args], cwd, env)


def make_dvc_repo(path: Path, remote: str | None = None, endpoint: str | None = None) -> Path:
    """A committed git + DVC repo at ``path`` whose stage ``make`` upper-cases input.txt into out.txt.

    With ``remote`` (an ``s3://`` URL) it is the default DVC remote, at ``endpoint`` when given.
    """
    path.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q", "-b", "main"], path)
    run(["git", "config", "user.email", "test@example.com"], path)
    run(["git", "config", "user.name", "test"], path)
    dvc(path, "init", "-q")
    (path / "input.txt").write_text("hello dvc\n")
    (path / "make.py").write_text(MAKE_PY)
    (path / "dvc.yaml").write_text(
        f"stages:\n  {STAGE}:\n    cmd: python make.py\n    deps: [make.py, input.txt]\n    outs: [out.txt]\n")
    if remote:
        dvc(path, "remote", "add", "-d", "s3", remote)
        if endpoint:
            dvc(path, "remote", "modify", "s3", "endpointurl", endpoint)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-q", "-m", "a trivial stage"], path)
    return path
