"""Headless Chromium for the page tests: Debian's package, run with the network off.

CI needs the package: ``apt-get update && apt-get install -y chromium``; without it the tests that
use this skip with that line as the reason.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.is_file(),
    reason="Chromium is not installed at /usr/bin/chromium (apt-get update && apt-get install -y chromium)",
)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with ``args``; stderr carries the page's console.

    The network is off whatever the machine has: every http(s) request goes to a proxy that is not
    there and every host name fails to resolve, so a page that needs anything but its own file shows it.
    """
    command = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def console_lines(stderr: str) -> list[str]:
    """The page's console messages, uncaught exceptions and blocked loads in Chromium's log."""
    # Chromium 156 logs every console message of the page as INFO:CONSOLE:<line>, console.error
    # included (older builds: ERROR:CONSOLE or CONSOLE(<line>)).
    return [line for line in stderr.splitlines()
            if "Uncaught" in line or "CONSOLE" in line or "Not allowed to load" in line]
