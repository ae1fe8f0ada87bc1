"""What orchestration costs: the Prefect pipeline flow against plain ``dvc repro``, same stage, same cache.

In a clean clone of this repository (HEAD), for the ``bench`` stage of the embedded default:

* ``dvc repro --force --single-item bench`` (the work itself, as DVC runs it),
* the pipeline flow forcing the same stage (Prefect task + MLflow parent run + lineage tags),
* a no-op: plain ``dvc repro --single-item bench`` and the flow again, both finding it cached.

The flow runs in a child process, as a user runs it, so each figure includes the temporary Prefect
server a flow starts when no ``PREFECT_API_URL`` is set (``qprobe services up`` gives a persistent one).

    .venv/bin/python benchmarks/flow_overhead.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qprobe import offline

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**offline.environ(), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "qprobe"
        subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
        ENV["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        flow = [str(BIN / "python"), "-m", "flows.pipeline", "--stages", "bench"]
        dvc = [str(BIN / "dvc"), "repro", "--single-item", "bench"]
        timed(dvc, root)  # warm the page cache and DVC's own state
        rows = {
            "dvc repro (forced)": [timed([*dvc, "--force"], root) for _ in range(args.repeats)],
            "flow (forced)": [timed([*flow, "--force"], root) for _ in range(args.repeats)],
            "dvc repro (cached)": [timed(dvc, root) for _ in range(args.repeats)],
            "flow (cached)": [timed(flow, root) for _ in range(args.repeats)],
        }
    med = {name: statistics.median(values) for name, values in rows.items()}
    print(f"{'what':<22}{'median s':>10}   runs")
    for name, values in rows.items():
        print(f"{name:<22}{med[name]:>10.2f}   {', '.join(f'{v:.2f}' for v in values)}")
    print(f"\nflow overhead on a stage that runs: {med['flow (forced)'] - med['dvc repro (forced)']:+.2f} s "
          f"(ratio {med['flow (forced)'] / med['dvc repro (forced)']:.2f}x)")
    print(f"flow overhead when everything is cached: {med['flow (cached)'] - med['dvc repro (cached)']:+.2f} s "
          f"(ratio {med['flow (cached)'] / med['dvc repro (cached)']:.2f}x)")


if __name__ == "__main__":
    main()
