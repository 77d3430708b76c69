"""This node's leases on the servers: renew them, and give them up.

Each request goes to every known server in batches of ``MAX_LEASES``, each
carrying that server's own secrets (:meth:`Server.lease_args`).  A server
that cannot be reached is skipped: its leases run out on their own.

Giving up leases takes a *fence* first: each server's lease generation
(``lease_fence`` from ``stats``),
read while no upload of this node is between storing and recording a cap
(see :mod:`gridfs.client.keeper`).  A cancel then spares any lease renewed at
or after the fence, so an upload racing with the unlink of the same
(deduplicated) file keeps its shares.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import trio

from ..errors import GridError
from ..protocol.schema import MAX_LEASES
from .broker import Server, StorageBroker

log = logging.getLogger(__name__)
TIMEOUT = 30.0

Fences = dict[bytes, int]
"""Server node id -> that server's lease generation when the fence was taken."""


@dataclass
class RenewReport:
    objects: int = 0
    """Storage indexes asked about."""
    servers: int = 0
    """Servers that answered."""
    leases: int = 0
    """Leases added or renewed (one per storage index per server holding it)."""
    unheld: list[bytes] = field(default_factory=list)
    """Storage indexes no answering server holds anything of."""
    failures: list[str] = field(default_factory=list)


@dataclass
class CancelReport:
    objects: int = 0
    servers: int = 0
    cancelled: int = 0
    """Leases given up (including those whose storage was freed)."""
    freed: int = 0
    """Storage indexes a server deleted because our lease was the last."""
    kept: int = 0
    """Leases spared because they were renewed after the fence."""
    referenced: int = 0
    """Objects not given up because something the node keeps uses them
    (set by Keeper.unlink)."""
    failures: list[str] = field(default_factory=list)


async def _on_servers(
    servers: Iterable[Server],
    job: Callable[[Server], Awaitable[None]],
    report: RenewReport | CancelReport,
) -> None:
    """Run ``job`` on every server at once; count those that succeed and
    note the others' failures (their leases simply run out)."""

    async def one(server: Server) -> None:
        try:
            await job(server)
        except GridError as e:
            report.failures.append(f"{server.name}: {e}")
            return
        report.servers += 1

    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(one, server)


T = TypeVar("T")
A = TypeVar("A")


async def _batched(request: Callable[[list[T]], Awaitable[list[A]]], items: list[T]) -> list[A]:
    """One lease request per batch of items; the answers, one per item."""
    answers: list[A] = []
    for i in range(0, len(items), MAX_LEASES):
        answers += await request(items[i : i + MAX_LEASES])
    return answers


async def renew(broker: StorageBroker, storage_indexes: Iterable[bytes]) -> RenewReport:
    """Add or renew this node's lease on each storage index at every server
    that holds something of it."""
    sis = sorted(set(storage_indexes))
    report = RenewReport(objects=len(sis))
    held: set[bytes] = set()

    async def job(server: Server) -> None:
        def add(batch: list[tuple[bytes, bytes, bytes]]) -> Awaitable[list[int]]:
            return server.calls.add_leases(batch, timeout=TIMEOUT)

        counts = await _batched(add, [(si, *server.lease_secrets(si)) for si in sis])
        for si, n in zip(sis, counts, strict=True):
            if n > 0:
                report.leases += 1
                held.add(si)

    if sis:
        await _on_servers(list(broker.servers.values()), job, report)
    report.unheld = [si for si in sis if si not in held]
    return report


async def take_fences(broker: StorageBroker) -> Fences:
    """Every reachable server's lease fence, now."""
    fences: Fences = {}

    async def one(server: Server) -> None:
        try:
            stats = await server.calls.stats(timeout=10.0)
        except GridError as e:
            log.info("no fence from %s: %s", server.name, e)
            return
        fence = stats.get("lease_fence")
        if isinstance(fence, int):
            fences[server.node_id] = fence

    async with trio.open_nursery() as nursery:
        for server in list(broker.servers.values()):
            nursery.start_soon(one, server)
    return fences


async def cancel(
    broker: StorageBroker, storage_indexes: Iterable[bytes], fences: Fences
) -> CancelReport:
    """Give up this node's lease on each storage index at every fenced server."""
    sis = sorted(set(storage_indexes))
    report = CancelReport(objects=len(sis))

    async def job(server: Server) -> None:
        fence = fences[server.node_id]

        def cancel(batch: list[tuple[bytes, bytes]]) -> Awaitable[list[str]]:
            return server.calls.cancel_leases(batch, fence, timeout=TIMEOUT)

        answers = await _batched(cancel, [(si, server.lease_secrets(si)[1]) for si in sis])
        report.cancelled += sum(a in ("cancelled", "deleted") for a in answers)
        report.freed += answers.count("deleted")
        report.kept += answers.count("kept")

    if sis:
        fenced = [broker.servers[i] for i in fences if i in broker.servers]
        await _on_servers(fenced, job, report)
    return report
