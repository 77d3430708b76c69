"""Checking, verifying and repairing a chunked file: its manifest, then
every chunk, each an ordinary CHK object (:mod:`gridfs.client.check`,
:mod:`gridfs.client.repair`).  The file is as healthy as its least healthy
part, and one result says so: that part's shares, every part's corrupt
shares (named by the part), and how many parts there are.

A chunked verify cap checks the manifest alone: the chunks' caps are in the
manifest's plaintext, which only the read cap decrypts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ..caps import ChunkedCap, ChunkedVerifyCap, ReadCap, VerifyCap
from ..errors import plain_grid_errors
from .check import CheckResult, check_file
from .chunkread import load_manifest
from .repair import repair_file

if TYPE_CHECKING:
    from .grid import GridClient

CONCURRENCY = 4


async def check_chunked(
    grid: GridClient,
    cap: ChunkedCap | ChunkedVerifyCap,
    verify: bool = False,
    repair: bool = False,
) -> CheckResult:
    """Check (``verify``: every block; ``repair``: verify and re-create
    what is missing) the manifest and each distinct chunk of ``cap``."""

    async def one(part: ReadCap | VerifyCap) -> CheckResult:
        if repair:
            return await repair_file(grid.broker, part)
        return await check_file(grid.broker, part, verify)

    first = await one(cap.manifest)
    parts: list[tuple[str, CheckResult]] = [("manifest", first)]
    if isinstance(cap, ChunkedCap) and first.recoverable:
        manifest = await load_manifest(grid, cap)
        chunks = list(dict.fromkeys(manifest.chunk_caps()))
        results: dict[int, CheckResult] = {}
        limiter = trio.Semaphore(CONCURRENCY)

        async def chunk(i: int, part: ReadCap) -> None:
            async with limiter:
                results[i] = await one(part)

        with plain_grid_errors():
            async with trio.open_nursery() as nursery:
                for i, part in enumerate(chunks):
                    nursery.start_soon(chunk, i, part)
        parts += [(f"chunk {i}", results[i]) for i in range(len(chunks))]
    return combine(cap.to_string(), parts, verify or repair)


def combine(cap: str, parts: list[tuple[str, CheckResult]], verified: bool) -> CheckResult:
    """One result for a file of several stored parts: the worst part's
    shares, everyone's corrupt shares, ``parts`` counted."""
    worst = min(parts, key=lambda p: (p[1].recoverable, p[1].healthy, p[1].good_shares))[1]
    out = CheckResult(cap, worst.needed, worst.total, verified=verified, parts=len(parts))
    out.good = dict(worst.good)
    out.servers = dict(worst.servers)
    out.unreachable = worst.unreachable
    for name, r in parts:
        out.corrupt += [(server, num, f"{name}: {why}") for server, num, why in r.corrupt]
    return out
