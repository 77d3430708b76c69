"""Small trio helpers for pipelines: run jobs concurrently, deliver in order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class _Future(Generic[T]):
    __slots__ = ("error", "event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: T | None = None
        self.error: BaseException | None = None


async def ordered_tasks(
    jobs: Iterable[Callable[[], Awaitable[T]]], limit: int, send: trio.MemorySendChannel[T]
) -> None:
    """Run ``jobs`` with at most ``limit`` running at once; send results in
    job order.  Memory is bounded by ``limit`` plus the channel's buffer."""
    async with send, trio.open_nursery() as nursery:
        fut_send, fut_recv = trio.open_memory_channel[_Future[T]](max(0, limit - 1))

        async def run(job: Callable[[], Awaitable[T]], fut: _Future[T]) -> None:
            try:
                fut.value = await job()
            except Exception as e:
                fut.error = e
            fut.event.set()

        async def submit() -> None:
            async with fut_send:
                for job in jobs:
                    fut: _Future[T] = _Future()
                    await fut_send.send(fut)
                    nursery.start_soon(run, job, fut)

        nursery.start_soon(submit)
        async with fut_recv:
            async for fut in fut_recv:
                await fut.event.wait()
                if fut.error is not None:
                    raise fut.error
                await send.send(fut.value)  # type: ignore[arg-type]


def in_thread(fn: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    """A job that runs a CPU-heavy ``fn`` on a worker thread."""

    async def job() -> T:
        return await trio.to_thread.run_sync(fn)

    return job
