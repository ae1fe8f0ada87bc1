"""Prefect tasks around the model registry: evaluate a model, register it, and decide on promotion."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task

from qprobe import tracking
from qprobe.eval.outputs import FULL_METRICS
from tasks.dvc_stage import StageError, stage_env


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger: float | None
    champion: float | None


def decide(challenger: float | None, champion: float | None, margin: float) -> Decision:
    """Promote when there is no champion, or when the challenger beats it by at least ``margin``."""
    if challenger is None or not math.isfinite(challenger):
        return Decision(False, "the challenger has no score on the fixed sets", challenger, champion)
    if champion is None or not math.isfinite(champion):
        return Decision(True, "no champion yet", challenger, champion)
    if challenger >= champion + margin:
        return Decision(True, f"challenger beats champion by {challenger - champion:+.4f} >= {margin}",
                        challenger, champion)
    return Decision(False, f"challenger {challenger - champion:+.4f} against champion, below the margin {margin}",
                    challenger, champion)


@task(name="evaluate-model", task_run_name="evaluate {label}")
def evaluate_model(model: str, label: str, root: str, extra_args: list[str] | None = None,
                   parent_run_id: str | None = None) -> dict[str, float]:
    """Run ``qprobe evaluate`` on ``model`` with the evaluate params (the fixed sets); returns every metric, flat.

    Every metric (the output folder's ``metrics_full.json``), not the summary of the metrics file, so
    that the deciding metric may be any of them.
    """
    out = Path(root) / "outputs" / f"evaluate-{label}"
    # Its metrics file goes beside the output folder (a given --out takes it along), not into metrics/.
    cmd = [str(Path(sys.executable).parent / "qprobe"), "evaluate", "--model", model, "--out", str(out),
           *(extra_args or [])]
    proc = subprocess.run(cmd, cwd=root, env=stage_env(parent_run_id), capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageError(f"evaluating {label} ({model}) failed: {(proc.stdout + proc.stderr).strip()[-800:]}")
    get_run_logger().info("evaluated %s: %s", label, out / FULL_METRICS)
    return json.loads((out / FULL_METRICS).read_text())


@task(name="register-model")
def register(model_dir: str, root: str, tags: dict[str, str], version: str | None = None) -> str:
    """Give the ``challenger`` alias to ``version`` (already registered), else to ``model_dir`` registered anew."""
    if version is None:
        return tracking.register_model(Path(root) / model_dir, alias="challenger", tags=tags, root=root)
    for key, value in tags.items():
        tracking.tag_version(version, key, value, root=root)
    tracking.set_alias("challenger", version, root=root)
    return version


@task(name="champion")
def champion_model(root: str) -> tuple[str | None, str | None]:
    """(version, local folder) of the current champion, or (None, None) before the first promotion."""
    version = tracking.model_version("champion", root=root)
    if version is None:
        return None, None
    folder = tracking.download_version(version, Path(root) / "outputs" / f"champion-v{version.version}")
    return str(version.version), str(folder)
