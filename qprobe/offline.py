"""The environment every Q-Probe process runs with: no telemetry, no hub downloads, patient startup.

The one home of these settings. These machines have no internet, and some telemetry calls hang
rather than fail; a Hugging Face cache miss must fail at once instead of retrying a network that is
not there; and a temporary Prefect server takes longer than its 20 s default to start on 2 cores.
Each value is a default: a variable the user set (``HF_HUB_OFFLINE=0`` to download a model) wins.

:func:`apply` sets them in this process, before the libraries that read them are imported (the
CLI, the flows and the tests call it first); :func:`environ` is the environment for a child process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

OFFLINE_ENV: dict[str, str] = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TOKENIZERS_PARALLELISM": "false",
    # Ray (--executor ray) reports usage to its makers unless told not to; workers inherit it.
    "RAY_USAGE_STATS_ENABLED": "0",
}


def apply() -> None:
    """Set every offline default this process's environment does not already set."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the offline defaults it lacks."""
    return {**OFFLINE_ENV, **(os.environ if base is None else base)}
