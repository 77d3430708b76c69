"""Storing many small CHK objects at once: a chunked file's chunks.

Each chunk is an ordinary CHK object whose shares go where a lone upload
would put them (share j on the j-th server of the chunk's permuted order),
but each server gets the shares of several chunks in one ``put_shares``
request, stored with one lease transaction: a server's cost per chunk was
most of a chunked upload's (one request, two lease transactions and a
thread hop per share), against one request per server for a whole file.

Anything short of every share stored or already held (a server that
refuses, fails, is busy with the same share, or is missing) leaves that
chunk to the caller, who stores it alone through the ordinary upload, with
its placement, retries and happiness rule.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..caps import ReadCap
from ..codec import params_for_size
from ..errors import GridError
from ..hashes import convergence_key
from ..immutable import FileEncoder, encode_share_parts
from ..protocol.frames import Blob
from ..protocol.schema import MAX_PUT_SHARES, MAX_WRITE
from .broker import Server

if TYPE_CHECKING:
    from .grid import GridClient

log = logging.getLogger(__name__)
ENCODERS = 2
"""Chunks encoded at once (zfec, AES and SHA-256 release the GIL)."""


@dataclass(frozen=True)
class _Put:
    """One share bound for one server."""

    obj: int
    storage_index: bytes
    sharenum: int
    data: Blob


async def put_objects(grid: GridClient, items: list[tuple[bytes, bytes]]) -> list[ReadCap | None]:
    """Store each (data, plaintext digest) as one CHK object under its
    convergent key; a cap per item, or None for those not stored whole
    this way (left to a lone upload)."""
    p = grid.params
    servers = list(grid.broker.servers.values())
    if len(servers) < p.n or not items:
        return [None] * len(items)
    limiter = trio.CapacityLimiter(ENCODERS)
    caps: list[ReadCap | None] = [None] * len(items)
    plan: dict[bytes, list[_Put]] = {s.node_id: [] for s in servers}

    async def encode(i: int, data: bytes, digest: bytes) -> None:
        codec = params_for_size(p.k, p.n, p.segment_size, len(data))
        key = convergence_key(grid.secret, codec.serialize(), digest)
        encoder = FileEncoder(key, codec, len(data))
        if encoder.geometry.share_size > MAX_WRITE:
            return  # streamed by a lone upload
        finished, shares = await trio.to_thread.run_sync(
            encode_share_parts, encoder, data, limiter=limiter
        )
        caps[i] = finished.cap
        si = encoder.storage_index
        for num, server in enumerate(grid.broker.permuted(si)[: p.n]):
            plan[server.node_id].append(_Put(i, si, num, Blob(shares[num])))

    async with trio.open_nursery() as nursery:
        for i, (data, digest) in enumerate(items):
            nursery.start_soon(encode, i, data, digest)
    held: list[set[int]] = [set() for _ in items]

    async def send(server: Server, puts: list[_Put]) -> None:
        # The shares leave memory as they are sent: ``puts`` is the last
        # reference to them but the request's own.
        while puts:
            n = _request_size(puts)
            sent = [(put.obj, put.sharenum) for put in puts[:n]]
            try:
                answers = await server.calls.put_shares(_take(server, puts, n))
            except GridError as e:
                log.info("%s: put_shares failed: %s", server.name, e)
                return
            for (obj, num), answer in zip(sent, answers, strict=True):
                if answer.stored or answer.already:
                    held[obj].add(num)
                elif answer.error:
                    log.info("%s refused a share: %s", server.name, answer.error)

    by_id = {s.node_id: s for s in servers}
    async with trio.open_nursery() as nursery:
        while plan:
            node_id, puts = plan.popitem()
            nursery.start_soon(send, by_id[node_id], puts)
            del puts
    return [cap if len(held[i]) == p.n else None for i, cap in enumerate(caps)]


def _take(
    server: Server, puts: list[_Put], n: int
) -> list[tuple[bytes, int, bytes | Blob, bytes, bytes]]:
    """The first ``n`` of ``puts`` as ``put_shares`` items, out of ``puts``."""
    items: list[tuple[bytes, int, bytes | Blob, bytes, bytes]] = []
    for put in puts[:n]:
        renew, cancel = server.lease_secrets(put.storage_index)
        items.append((put.storage_index, put.sharenum, put.data, renew, cancel))
    del puts[:n]
    return items


def _request_size(puts: list[_Put]) -> int:
    """How many of the first ``puts`` one request carries (the wire's limits)."""
    size = 0
    for n, put in enumerate(puts):
        if n == MAX_PUT_SHARES or (n and size + len(put.data) > MAX_WRITE):
            return n
        size += len(put.data)
    return len(puts)
