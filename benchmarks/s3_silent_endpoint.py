"""How long an S3 listing takes to fail against an endpoint that accepts connections and never answers.

The endpoint is a socket on 127.0.0.1 (``tests/fixtures_silent.py``); ``AWS_ENDPOINT_URL`` points
at it and ``qprobe.storage`` runs with the limits the environment sets (the defaults when
``QPROBE_S3_*`` are unset). Prints the seconds to the error, the connections the endpoint saw (one
per try) and the worst case the limits allow; the target is under 60 s at the defaults.

    .venv/bin/python benchmarks/s3_silent_endpoint.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures_silent import SilentEndpoint

from qprobe import storage


def main() -> None:
    endpoint = SilentEndpoint()
    os.environ.update({"AWS_ENDPOINT_URL": endpoint.url, "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    limits = storage.limits()
    start = time.perf_counter()
    try:
        list(storage.list_objects("s3://photos/raw"))
        message = "listed (the endpoint answered?)"
    except storage.StorageError as exc:
        message = str(exc)
    seconds = time.perf_counter() - start
    print(f"limits: {limits}")
    print(f"failed after {seconds:.1f} s, {len(endpoint.accepted)} connections; worst case allowed "
          f"{limits.worst_case_s():.0f} s")
    print(f"error: {message}")
    endpoint.close()


if __name__ == "__main__":
    main()
