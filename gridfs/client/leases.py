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
from collections.abc import Iterable
from dataclasses import dataclass, field

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
    failures: list[str] = field(default_factory=list)


def _batches(items: list[bytes]) -> Iterable[list[bytes]]:
    for i in range(0, len(items), MAX_LEASES):
        yield items[i : i + MAX_LEASES]


async def renew(broker: StorageBroker, storage_indexes: Iterable[bytes]) -> RenewReport:
    """Add or renew this node's lease on each storage index at every server
    that holds something of it."""
    sis = sorted(set(storage_indexes))
    report = RenewReport(objects=len(sis))
    held: set[bytes] = set()

    async def one(server: Server) -> None:
        try:
            for batch in _batches(sis):
                leases = [[si, *server.lease_secrets(si)] for si in batch]
                counts = await server.call("add_leases", {"leases": leases}, TIMEOUT)
                if not isinstance(counts, list) or len(counts) != len(batch):
                    raise GridError("malformed add_leases answer")
                for si, n in zip(batch, counts, strict=True):
                    if isinstance(n, int) and n > 0:
                        report.leases += 1
                        held.add(si)
        except GridError as e:
            report.failures.append(f"{server.name}: {e}")
            return
        report.servers += 1

    if sis:
        async with trio.open_nursery() as nursery:
            for server in list(broker.servers.values()):
                nursery.start_soon(one, server)
    report.unheld = [si for si in sis if si not in held]
    return report


async def take_fences(broker: StorageBroker) -> Fences:
    """Every reachable server's lease fence, now."""
    fences: Fences = {}

    async def one(server: Server) -> None:
        try:
            stats = await server.call("stats", {}, 10.0)
        except GridError as e:
            log.info("no fence from %s: %s", server.name, e)
            return
        fence = stats.get("lease_fence") if isinstance(stats, dict) else None
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

    async def one(server: Server, fence: int) -> None:
        try:
            for batch in _batches(sis):
                leases = [[si, server.lease_secrets(si)[1]] for si in batch]
                args = {"leases": leases, "renewed_before": fence}
                answers = await server.call("cancel_leases", args, TIMEOUT)
                if not isinstance(answers, list) or len(answers) != len(batch):
                    raise GridError("malformed cancel_leases answer")
                report.cancelled += sum(a in ("cancelled", "deleted") for a in answers)
                report.freed += answers.count("deleted")
                report.kept += answers.count("kept")
        except GridError as e:
            report.failures.append(f"{server.name}: {e}")
            return
        report.servers += 1

    if sis:
        async with trio.open_nursery() as nursery:
            for node_id, fence in fences.items():
                server = broker.servers.get(node_id)
                if server is not None:
                    nursery.start_soon(one, server, fence)
    return report
