"""Run a CPU-heavy function over a stream of items on a few threads, in order.

zfec, AES and SHA-256 release the GIL on large buffers, so threads give real
parallelism; the window bounds how many items are in memory at once.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int | None = None, window: int | None = None
) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, at most ``window`` items in flight."""
    workers = workers or default_workers()
    window = window or 2 * workers
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="gridfs-cpu") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
