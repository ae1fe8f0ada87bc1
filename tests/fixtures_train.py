"""Helpers for the training-stage tests: the latest MLflow run, a run killed after checkpoint-2 (in process),
and a stage run as `qprobe train` in a subprocess, whole or SIGKILLed once a checkpoint is complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import yaml

from qprobe.agent.protocol_config import ProtocolLimits
from qprobe.bench.config import BenchConfig
from qprobe.bench.synthesize import synthesize
from qprobe.train import common
from qprobe.trajectories.build import TrajectoriesConfig, build

REPO = Path(__file__).resolve().parents[1]


def repo_protocol() -> dict[str, Any]:
    """The embedded default's ``protocol:`` section: a test's own params file carries it beside its stage's."""
    return dict(yaml.safe_load((REPO / "params.yaml").read_text())["protocol"])


def bench_and_trajectories(root: Path, num_images: int, sft_size: int, rl_size: int,
                           pristine_fraction: float = 0.15) -> Path:
    """A bench of ``num_images`` from the bundled photos under ``root/bench``, its sets under ``root/traj``."""
    synthesize(BenchConfig(source="skimage", out=str(root / "bench"), metrics=str(root / "bench.json"),
                           num_images=num_images, contact_sheet_size=0, pristine_fraction=pristine_fraction),
               progress=False)
    build(TrajectoriesConfig(bench=str(root / "bench"), out=str(root / "traj"), metrics=str(root / "t.json"),
                             sft_size=sft_size, rl_size=rl_size, protocol=ProtocolLimits(**repo_protocol())))
    return root


def latest_run() -> Any:
    return mlflow.search_runs(experiment_names=["qprobe"], order_by=["start_time DESC"], output_format="list")[0]


class KilledAfterStep2(common.MlflowLogCallback):
    """The MLflow callback, and a kill right after checkpoint-2 is written (a preempted node, Ctrl-C)."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 2:
            raise KeyboardInterrupt


def stage_process(stage: str, params: Path, log: Path) -> subprocess.Popen[bytes]:
    """`qprobe train <stage> --params <params>` in a subprocess of this checkout, on one torch thread (so that
    two runs of one config compute alike), its output to ``log``. MLflow's store is this test's (environment)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "qprobe.cli", "train", stage, "--params", str(params)],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def train(stage: str, params: Path, log: Path) -> None:
    """Run the stage to its end; fails with its output if it does not exit 0."""
    code = stage_process(stage, params, log).wait()
    assert code == 0, f"qprobe train {stage} exited {code}:\n{log.read_text()[-4000:]}"


def complete_checkpoint(checkpoints: Path) -> Path | None:
    """A checkpoint under ``checkpoints/<fingerprint>/`` whose trainer_state.json (written last) is whole."""
    for state in checkpoints.glob("*/checkpoint-*/trainer_state.json"):
        try:
            json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        return state.parent
    return None


def train_killed(stage: str, params: Path, checkpoints: Path, log: Path) -> None:
    """Run the stage and SIGKILL it (a preempted node: no handler runs) once a checkpoint is complete."""
    process = stage_process(stage, params, log)
    while process.poll() is None and complete_checkpoint(checkpoints) is None:
        time.sleep(0.02)
    assert process.poll() is None, f"qprobe train {stage} ended before it was killed:\n{log.read_text()[-4000:]}"
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
