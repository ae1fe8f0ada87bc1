"""``qprobe <command>``: one entry point; every ``dvc.yaml`` stage is one of these commands.

Each command lives in its own module as ``main(argv) -> int``; this file only dispatches, so that
``qprobe --help`` stays fast and a command imports just what it needs (no torch for ``bench``).
Errors of the :class:`~qprobe.errors.QProbeError` family become one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from qprobe import offline
from qprobe.errors import QProbeError

# command -> (module, help). A command with sub-commands maps "command sub".
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("qprobe.bench.synthesize", "synthesise Vista-Bench: local wavelet-domain degradations with boxes and MOS"),
    "model init-tiny": ("qprobe.models.tiny", "build the tiny random Qwen2.5-VL (offline) for CPU runs"),
    "score": ("qprobe.agent.score", "score photos the Q-Probe way: global look, crops at native resolution, answer"),
    "data import": ("qprobe.data.public", "import a public IQA dataset (KonIQ-10k, SPAQ, KADID-10k, ...) as a manifest"),
    "trajectories": ("qprobe.trajectories.build", "build Probe-CoT (SFT) and Probe-RL datasets from the bench"),
    "train stage1": ("qprobe.train.stage1", "stage 1: GRPO with the Thurstone ranking reward on global views"),
    "train stage2": ("qprobe.train.stage2", "stage 2: SFT on hybrid-resolution tool-use trajectories"),
    "train stage3": ("qprobe.train.stage3", "stage 3: GRPO with multi-turn crop-tool rollouts, decoupled reward"),
    "evaluate": ("qprobe.eval.runner", "SRCC/PLCC, localisation, bias probes, cost and the HTML report"),
    "launch": ("qprobe.ops.launch", "run one DVC stage here or on a GPU cluster (kubernetes, skypilot)"),
    "profile": ("qprobe.profiles", "switch params.yaml to a profile in configs/ (e.g. paper)"),
    "experiments": ("qprobe.experiments.cli", "the paper's comparisons: list, run (DVC experiments, MLflow) and report"),
    "services": ("qprobe.ops.services", "start, stop or check the local MLflow / S3 / Prefect services"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _available() -> dict[str, tuple[str, str]]:
    """Commands whose module is installed (the training ones need the optional training extras)."""
    return {cmd: (mod, hlp) for cmd, (mod, hlp) in COMMANDS.items() if _installed(mod)}


def _usage() -> str:
    lines = ["usage: qprobe <command> [options]", "", "commands:"]
    for cmd, (_, hlp) in _available().items():
        lines.append(f"  {cmd:<16} {hlp}")
    lines.append("")
    lines.append("`qprobe <command> --help` lists a command's options.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    offline.apply()  # before any library that phones home is imported
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(f"qprobe {importlib.metadata.version('qprobe')}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    available = _available()
    command = " ".join(argv[:2]) if " ".join(argv[:2]) in available else argv[0]
    if command not in available:
        print(f"qprobe: unknown command {' '.join(argv[:2])!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    rest = argv[len(command.split()):]
    logging.basicConfig(level=os.environ.get("QPROBE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("great_expectations", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    module = importlib.import_module(available[command][0])
    try:
        return int(module.main(rest) or 0)
    except QProbeError as exc:
        print(f"qprobe {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qprobe {command}: interrupted; finished outputs are kept and a re-run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
