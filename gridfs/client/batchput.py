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
from ..immutable import FileEncoder, encode_shares
from ..protocol.schema import MAX_PUT_SHARES, MAX_WRITE
from .broker import Server

if TYPE_CHECKING:
    from .grid import GridClient

log = logging.getLogger(__name__)
ENCODERS = 2
"""Chunks encoded at once (zfec, AES and SHA-256 release the GIL)."""


@dataclass(frozen=True)
class _Encoded:
    cap: ReadCap
    storage_index: bytes
    shares: list[bytes]


@dataclass(frozen=True)
class _Put:
    """One share bound for one server."""

    obj: int
    storage_index: bytes
    sharenum: int
    data: bytes


async def put_objects(grid: GridClient, items: list[tuple[bytes, bytes]]) -> list[ReadCap | None]:
    """Store each (data, plaintext digest) as one CHK object under its
    convergent key; a cap per item, or None for those not stored whole
    this way (left to a lone upload)."""
    p = grid.params
    servers = list(grid.broker.servers.values())
    if len(servers) < p.n or not items:
        return [None] * len(items)
    limiter = trio.CapacityLimiter(ENCODERS)
    encoded: list[_Encoded | None] = [None] * len(items)

    async def encode(i: int, data: bytes, digest: bytes) -> None:
        codec = params_for_size(p.k, p.n, p.segment_size, len(data))
        key = convergence_key(grid.secret, codec.serialize(), digest)
        encoder = FileEncoder(key, codec, len(data))
        if encoder.geometry.share_size > MAX_WRITE:
            return  # streamed by a lone upload
        finished, shares = await trio.to_thread.run_sync(
            encode_shares, encoder, data, limiter=limiter
        )
        encoded[i] = _Encoded(finished.cap, encoder.storage_index, shares)

    async with trio.open_nursery() as nursery:
        for i, (data, digest) in enumerate(items):
            nursery.start_soon(encode, i, data, digest)

    plan: dict[bytes, list[_Put]] = {}
    by_id = {s.node_id: s for s in servers}
    for i, e in enumerate(encoded):
        if e is None:
            continue
        for num, server in enumerate(grid.broker.permuted(e.storage_index)[: p.n]):
            plan.setdefault(server.node_id, []).append(_Put(i, e.storage_index, num, e.shares[num]))
    held: list[set[int]] = [set() for _ in items]

    async def send(server: Server, puts: list[_Put]) -> None:
        for request in _requests(puts):
            try:
                answers = await server.calls.put_shares([_wire(server, put) for put in request])
            except GridError as e:
                log.info("%s: put_shares failed: %s", server.name, e)
                return
            for put, answer in zip(request, answers, strict=True):
                if answer.stored or answer.already:
                    held[put.obj].add(put.sharenum)
                elif answer.error:
                    log.info("%s refused a share: %s", server.name, answer.error)

    async with trio.open_nursery() as nursery:
        for node_id, puts in plan.items():
            nursery.start_soon(send, by_id[node_id], puts)
    return [e.cap if e is not None and len(held[i]) == p.n else None for i, e in enumerate(encoded)]


def _wire(server: Server, put: _Put) -> tuple[bytes, int, bytes, bytes, bytes]:
    renew, cancel = server.lease_secrets(put.storage_index)
    return (put.storage_index, put.sharenum, put.data, renew, cancel)


def _requests(puts: list[_Put]) -> list[list[_Put]]:
    """``puts`` in requests within the wire's limits."""
    out: list[list[_Put]] = []
    size = 0
    for put in puts:
        if not out or len(out[-1]) >= MAX_PUT_SHARES or size + len(put.data) > MAX_WRITE:
            out.append([])
            size = 0
        out[-1].append(put)
        size += len(put.data)
    return out
