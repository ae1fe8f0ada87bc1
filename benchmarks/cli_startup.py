"""How long each `qprobe` command takes to answer --help (what a user waits for on a typo).

Each command's help runs in a fresh interpreter, several times; the median is printed, with the modules the
command imported that a fast answer cannot afford (torch, transformers, great_expectations, trl).

    .venv/bin/python benchmarks/cli_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from qprobe import offline
from qprobe.cli import COMMANDS

HEAVY = ("torch", "transformers", "great_expectations", "trl")
PROBE = """
import sys
from qprobe.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("\\n" + __import__("json").dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr)
"""


def measure(command: str, repeat: int) -> tuple[float, list[str]]:
    seconds, heavy = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=[*command.split(), "--help"], heavy=HEAVY)],
                              capture_output=True, text=True, env=offline.environ(), check=False)
        seconds.append(time.perf_counter() - start)
        heavy = json.loads(proc.stderr.strip().splitlines()[-1])
    return statistics.median(seconds), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'command':<16} {'--help (s)':>10}  heavy imports")
    for command in COMMANDS:
        median, heavy = measure(command, args.repeat)
        print(f"{command:<16} {median:>10.2f}  {', '.join(heavy) or '-'}")


if __name__ == "__main__":
    main()
