"""How much stage 2's held-out figures depend on the seed: the same stage, several seeds, one table.

The embedded default checks the tiny model on two held-out scenes of five near-identical variants
each, so one run moves ``format_adherence`` and ``tool_call_rate`` in steps of about 50 points and a
single figure says little. This runs ``qprobe train stage2`` (the ``stage2:`` section of
``params.yaml``, on the DVC outputs it depends on: run ``dvc repro stage1 trajectories`` first) once
per seed, each into a temporary folder and its own MLflow store, ``--parallel`` at a time with one
torch thread each, and prints every run's held-out metrics, their mean, minimum and maximum, and the
seconds each run took::

    .venv/bin/python benchmarks/stage2_seeds.py --seeds 0 1 2 --parallel 2
    .venv/bin/python benchmarks/stage2_seeds.py --seeds 0 1 -- --max-steps 400   # extra stage-2 flags
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qprobe import offline

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEYS = ("format_adherence", "tool_call_rate", "rollout_adherence", "answer_first_rate",
        "format_adherence_low_res", "answer_first_rate_low_res")


def run_seed(stage: str, seed: int, extra: list[str], scratch: Path) -> tuple[dict[str, float], float]:
    folder = scratch / f"seed-{seed}"
    env = {**offline.environ(), "OMP_NUM_THREADS": "1",
           # Each run its own store: parallel runs logging the same dataset to one sqlite store collide.
           "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    folder.mkdir(parents=True)
    cmd = ["qprobe", "train", stage, "--seed", str(seed), "--resume", "never", "--out", str(folder / "model"),
           "--metrics", str(folder / "metrics.json"), "--output-dir", str(folder / "checkpoints"), *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"seed {seed}: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((folder / "metrics.json").read_text()), time.perf_counter() - start


def main(stage: str = "stage2", keys: tuple[str, ...] = KEYS, description: str | None = __doc__) -> None:
    """Run ``qprobe train STAGE`` once per seed and print ``keys`` of each run's metrics (benchmarks/stage3_seeds.py
    runs stage 3 through it)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--keep", type=Path, help="write each seed's model, metrics and MLflow store under "
                        "this folder (seed-N/) to inspect afterwards; by default they go to a temporary folder")
    parser.add_argument("extra", nargs="*", help=f"flags passed to `qprobe train {stage}` (after --)")
    args = parser.parse_args()
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        sys.exit(f"--keep {args.keep}: the folder is not empty")
    with tempfile.TemporaryDirectory(prefix=f"{stage}-seeds-") as scratch, \
            ThreadPoolExecutor(max_workers=args.parallel) as pool:
        root = args.keep or Path(scratch)
        results = list(pool.map(lambda s: run_seed(stage, s, args.extra, root), args.seeds))
    print(f"{'seed':>6} " + " ".join(f"{k:>26}" for k in keys) + f" {'seconds':>8}")
    for seed, (metrics, seconds) in zip(args.seeds, results, strict=True):
        print(f"{seed:>6} " + " ".join(f"{metrics[k]:>26.2f}" for k in keys) + f" {seconds:>8.0f}")
    for name, fn in (("mean", statistics.fmean), ("min", min), ("max", max)):
        print(f"{name:>6} " + " ".join(f"{fn([m[k] for m, _ in results]):>26.2f}" for k in keys))


if __name__ == "__main__":
    main()
