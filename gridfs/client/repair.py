"""Repairing an immutable file: re-create missing or corrupt shares elsewhere.

The repairer needs only the verify cap.  It verifies every share it can
find (``check --verify``), decodes the ciphertext from k good shares, re-encodes
the shares that are missing or corrupt, checks the rebuilt hash trees
against the cap's extension block, and uploads the new shares to servers that
hold none of this file's good shares yet — up to n shares in all.
"""

from __future__ import annotations

import logging

import trio

from ..caps import ReadCap, VerifyCap
from ..errors import GridError, NotEnoughSharesError
from ..immutable import ShareRegenerator
from .broker import Server, StorageBroker
from .check import CheckResult, _verify_all
from .download import open_downloader
from .upload import write_batches

log = logging.getLogger(__name__)


async def repair_file(broker: StorageBroker, cap: ReadCap | VerifyCap) -> CheckResult:
    """Bring the file back to n good shares if it can; return the check after."""
    vcap = cap.verify_cap() if isinstance(cap, ReadCap) else cap
    before = CheckResult(cap.to_string(), cap.k, cap.n, verified=True)
    async with open_downloader(broker, vcap) as downloader:
        await downloader.wait_located()
        await _verify_all(downloader.decoder, downloader.sources, before)
        missing = [i for i in range(cap.n) if i not in before.good]
        if not missing:
            return before
        if before.good_shares < cap.k:
            raise NotEnoughSharesError(
                f"only {before.good_shares} good shares left, {cap.k} needed: cannot repair"
            )
        holders = {name for names in before.good.values() for name in names}
        targets = [s for s in broker.permuted(vcap.storage_index) if s.name not in holders]
        decoder = downloader.decoder
        assert decoder.geometry is not None
        geometry = decoder.geometry
        regen = ShareRegenerator(decoder, missing)
        placed = await _allocate(targets, vcap.storage_index, missing, geometry.share_size)
        if not placed:
            raise GridError("no server could take a repaired share")
        for j in range(geometry.num_segments):
            ciphertext = (await downloader.segment(j)).data
            blocks = regen.blocks(j, ciphertext)
            offset = geometry.record_span(j)[0] + geometry.proof_size
            async with trio.open_nursery() as nursery:
                for num, server in placed.items():
                    nursery.start_soon(
                        _write, server, vcap.storage_index, num, [[offset, blocks[num]]]
                    )
        finished = regen.finish()
        async with trio.open_nursery() as nursery:
            for num, server in placed.items():
                head, proofs = finished[num]
                chunks = [(0, head)] + [
                    (geometry.record_span(j)[0], p) for j, p in enumerate(proofs)
                ]
                nursery.start_soon(_finish, server, vcap.storage_index, num, chunks)
        for num, server in placed.items():
            log.info("repaired share %d onto %s", num, server.name)
            before.good.setdefault(num, []).append(server.name)
    return before


async def _allocate(
    servers: list[Server], si: bytes, missing: list[int], share_size: int
) -> dict[int, Server]:
    """One missing share per server, in the file's server order."""
    placed: dict[int, Server] = {}
    pending = list(missing)
    for server in servers:
        if not pending:
            break
        num = pending[0]
        try:
            renew, cancel = server.lease_secrets(si)
            allocation = await server.calls.allocate_buckets(si, [num], share_size, renew, cancel)
        except GridError as e:
            log.info("%s cannot take share %d: %s", server.name, num, e)
            continue
        if num in allocation.allocated:
            placed[num] = server
            pending.pop(0)
    return placed


async def _write(server: Server, si: bytes, num: int, chunks: list[list[object]]) -> None:
    await server.calls.write(si, num, chunks)


async def _finish(server: Server, si: bytes, num: int, chunks: list[tuple[int, bytes]]) -> None:
    for batch in write_batches(chunks):
        await _write(server, si, num, batch)
    await server.calls.close(si, num)
