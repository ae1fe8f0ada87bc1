"""Local services for tests: free ports, and a teardown that proves nothing was left running."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qprobe.ops import roles as R
from qprobe.ops import services as S


def services_config(folder: Path, roles: str) -> S.ServicesConfig:
    taken: set[int] = set()
    ports = []
    for with_grpc in (True, False, False):
        port = R.free_port(with_grpc=with_grpc, exclude=frozenset(taken))
        taken |= {port, port + R.GRPC_OFFSET}
        ports.append(port)
    return S.ServicesConfig(roles=roles, dir=str(folder), s3_port=ports[0], mlflow_port=ports[1],
                            prefect_port=ports[2], prefect_ui=False, timeout=180)


def stop_and_check(cfg: S.ServicesConfig) -> None:
    every = dataclasses.replace(cfg, roles=",".join(R.ROLES))
    recorded = S.load_state(every).values()
    S.stop_services(every)
    for service in recorded:
        assert not service.pids(), f"{service.role} left processes {service.pids()}"
    assert not (cfg.root / S.STATE_FILE).exists()
