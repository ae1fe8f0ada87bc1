"""Where the data stages run their shards: in this process, a local process pool, or on Ray.

Bench synthesis (one shard per source photo), trajectory generation (one per sample) and
evaluation with a local model (one per image) hand their shards to :func:`map_shards`, which
yields the results in input order whatever ran them, so a stage's output does not depend on the
executor or the number of workers:

``local``  ``workers`` 1 runs the shards here, one after another; more runs them in a pool of
           spawned processes (spawn, not fork: the parent may hold MLflow/boto3 state and threads
           that must not be forked).
``ray``    Ray tasks, one CPU each. ``ray_address`` None starts a local Ray on this machine with
           ``workers`` CPUs (no dashboard, no usage stats: :mod:`qprobe.offline`); ``auto`` joins
           the cluster this machine belongs to and ``ray://HOST:10001`` one reached through the Ray
           client (the KubeRay cluster of ``infra/k8s/raycluster.yaml``). A Ray already started in
           this process (a test's, a benchmark's) is used as it is. A shard whose worker process
           dies is run again, up to ``max_retries`` times; the other shards are not redone. An
           exception the stage raises is not retried: it is the stage's answer.

Both keep at most ``2 * workers`` shards in flight, so a source of thousands of photos never has
all of its shards queued (or their results held) at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from qprobe import offline
from qprobe.errors import QProbeError

S = TypeVar("S")
R = TypeVar("R")

EXECUTORS = ("local", "ray")
# A killed worker costs its shard this many more tries before the stage fails.
MAX_RETRIES = 3


class ExecutorError(QProbeError, RuntimeError):
    """An executor that cannot be started or reached."""


@dataclass
class ExecutorArgs:
    """Where a data stage runs its shards: the fields the bench, trajectories and evaluate configs share."""

    executor: Literal["local", "ray"] = field(default="local", metadata={
        "help": "where the shards run: 'local' (this machine, --workers processes) or 'ray'"})
    ray_address: str | None = field(default=None, metadata={
        "help": "with --executor ray: null starts a local Ray with --workers CPUs; 'auto' or ray://HOST:10001 "
                "joins a cluster"})
    workers: int = field(default=1, metadata={
        "help": "worker processes (local; 1: no pool), or the CPUs of a local Ray; twice this many shards are "
                "kept in flight"})

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")

    def map(self, fn: Callable[[S], R], shards: Sequence[S]) -> Iterator[R]:
        """:func:`map_shards` with these settings."""
        return map_shards(fn, shards, executor=self.executor, workers=self.workers, ray_address=self.ray_address)


def map_shards(fn: Callable[[S], R], shards: Sequence[S], *, executor: str = "local", workers: int = 1,
               ray_address: str | None = None, max_retries: int = MAX_RETRIES) -> Iterator[R]:
    """``fn(shard)`` for every shard, yielded in the order of ``shards`` (see the module docstring).

    ``fn`` and the shards must pickle unless everything runs here (``local``, one worker).
    """
    if executor == "ray":
        return _windowed(_ray_submitter(fn, workers, ray_address, max_retries), shards, 2 * workers)
    if workers == 1 or len(shards) <= 1:
        return map(fn, shards)
    return _pooled(fn, shards, workers)


def _exit_with_parent(parent: int, poll: float = 0.5) -> None:
    """Pool worker initializer: end the worker once ``parent`` is gone. A parent killed with SIGKILL runs no
    shutdown, and its idle workers would otherwise wait on their queue for good, holding their memory."""
    import os
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _pooled(fn: Callable[[S], R], shards: Sequence[S], workers: int) -> Iterator[R]:
    import multiprocessing
    import os

    pool = ProcessPoolExecutor(max_workers=min(workers, len(shards)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))
    try:
        yield from _windowed(functools.partial(pool.submit, fn), shards, 2 * workers)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _windowed(submit: Callable[[S], Future], shards: Sequence[S], window: int) -> Iterator[R]:
    """Submit shards as earlier ones finish, at most ``window`` in flight, and yield results in order.

    A finished shard waits in ``done`` until those before it are yielded; the window also stops
    submitting more than ``window`` shards ahead of the oldest unyielded one, so ``done`` stays small.
    """
    running: dict[Future, int] = {}
    done: dict[int, Any] = {}
    submitted = yielded = 0
    while yielded < len(shards):
        while len(running) < window and submitted < min(len(shards), yielded + 2 * window):
            running[submit(shards[submitted])] = submitted
            submitted += 1
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            done[running.pop(future)] = future.result()
        while yielded in done:
            yield done.pop(yielded)
            yielded += 1


# --- Ray -------------------------------------------------------------------------------------------

# The stage function this worker process last fetched from the object store, by object id: a worker
# deserialises a stage's function (and the model or settings it carries) once, not once per shard.
_WORKER_FN: dict[str, Callable[[Any], Any]] = {}


def _run_shard(fn_box: list[Any], shard: Any) -> Any:
    """The Ray task: ``fn(shard)``, with ``fn`` fetched once per worker (boxed, so Ray passes the reference)."""
    import ray

    key = fn_box[0].hex()
    if key not in _WORKER_FN:
        _WORKER_FN.clear()
        _WORKER_FN[key] = ray.get(fn_box[0])
    return _WORKER_FN[key](shard)


def _ray_submitter(fn: Callable[[S], R], workers: int, address: str | None,
                   max_retries: int) -> Callable[[S], Future]:
    ray = start_ray(workers, address)
    task = ray.remote(_run_shard).options(num_cpus=1, max_retries=max_retries, retry_exceptions=False)
    fn_box = [ray.put(fn)]
    return lambda shard: task.remote(fn_box, shard).future()


def start_ray(workers: int = 1, address: str | None = None) -> Any:
    """The ``ray`` module, connected: to the Ray already started here, else to ``address``, else a new local one."""
    offline.apply()  # before Ray is imported: no usage stats from this process or the workers it starts
    try:
        import ray
    except ImportError as exc:
        raise ExecutorError("--executor ray: Ray is not installed (pip install -e '.[ray]')") from exc
    if ray.is_initialized():
        return ray
    try:
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, configure_logging=False)
        else:
            ray.init(address=address, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExecutorError(f"--ray-address {address or '(local)'}: cannot start or reach Ray: {first}") from exc
    return ray
