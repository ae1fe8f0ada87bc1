"""Up to N calls in flight, their results in input order: how score and evaluate keep an endpoint busy.

An OpenAI-compatible server (vLLM, SGLang) batches every sequence it has in flight; a client that
sends one request at a time leaves it decoding one. A rollout spends nearly all its time waiting on
the server, so threads are enough. Each call runs whole in one thread, so a rollout's turns stay in
order; the results come back in the order of the inputs, whatever order they finish in, so the
output files of a run do not depend on the concurrency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], concurrency: int) -> Iterator[R]:
    """``fn`` over ``items``, at most ``concurrency`` calls at a time, yielded in input order.

    At 1 the calls run one after the other in the caller's thread (a local model: no thread to hand
    the GPU or the CPU's cores to, tracebacks and ^C as ever). An exception of ``fn`` is raised when
    its result's turn comes; then, as when the caller stops early (^C), calls not yet started never
    start, and those in flight finish their current request and are dropped.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if concurrency == 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="qprobe-inflight")
    try:
        # All submitted at once: a future is small, and the pool's N threads are what bound the work in flight.
        futures = [pool.submit(fn, item) for item in items]
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
