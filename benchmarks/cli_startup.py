"""How long each `qprobe` command takes to answer --help (what a user waits for on a typo), and how long it is.

Each command's help runs in a fresh interpreter, several times; the median is printed, with the modules the
command imported that a fast answer cannot afford (torch, transformers, great_expectations, trl), the help's
length in lines and the line of its first option. Target: under 2 s for every command that does not subclass a
trl config (the training stages import trl to list its options; their help shows their own options first and
trl's behind --help-all).

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


def measure(command: str, repeat: int) -> tuple[float, list[str], list[str]]:
    """Median seconds to answer ``command --help``, the heavy modules it imported, and its lines."""
    seconds, heavy, lines = [], [], []
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=[*command.split(), "--help"], heavy=HEAVY)],
                              capture_output=True, text=True, env=offline.environ(), check=False)
        seconds.append(time.perf_counter() - start)
        heavy = json.loads(proc.stderr.strip().splitlines()[-1])
        lines = proc.stdout.splitlines()
    return statistics.median(seconds), heavy, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'command':<16} {'--help (s)':>10} {'lines':>6} {'1st option':>10}  heavy imports")
    for command in COMMANDS:
        median, heavy, lines = measure(command, args.repeat)
        first = next((i + 1 for i, line in enumerate(lines) if line.startswith("  --") and "--help" not in line
                      and "--params" not in line), 0)
        print(f"{command:<16} {median:>10.2f} {len(lines):>6} {first:>10}  {', '.join(heavy) or '-'}")


if __name__ == "__main__":
    main()
