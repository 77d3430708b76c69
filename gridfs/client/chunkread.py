"""Reading chunked files: their manifests (verified, cached in memory) and
any byte range, fetching only the chunks it touches, a few at once; and the
stored objects behind a chunked cap, for leases (see :mod:`gridfs.client.chunked`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import trio

from ..aio import ordered_tasks
from ..caps import ChunkedCap, ReadCap, log_name, parse
from ..errors import FormatError, GridError, plain_grid_errors
from ..manifest import MAX_MANIFEST, Chunk, Element, Hole, Manifest, unpack
from .download import open_downloader
from .sharemap import ShareMap, open_share_map

if TYPE_CHECKING:
    from .grid import GridClient

log = logging.getLogger(__name__)
FETCHES = 8
"""Chunks fetched at once by a read of scattered chunks (an edit's base)."""
READ_AHEAD = 4
"""Chunks a sequential read fetches ahead: with their shares found for it
beforehand (:mod:`gridfs.client.sharemap`), a chunk takes one request per
share, so 4 keep the servers busy; 8 held 15 MiB more for no speed."""
ZERO_STEP = 1024 * 1024
"""Zeros of a hole are written this many at a time."""


async def load_manifest(grid: GridClient, cap: ChunkedCap) -> Manifest:
    """The manifest ``cap`` names, verified (and cached: it is immutable)."""
    cached = cached_manifest(cap)
    if cached is not None:
        return cached
    if cap.manifest.size > MAX_MANIFEST:
        raise FormatError(f"manifest of {cap.manifest.size} bytes (at most {MAX_MANIFEST})")
    parts: list[bytes] = []

    async def collect(data: bytes) -> None:
        parts.append(data)

    await grid.wait_for_servers(cap.manifest.k)
    with plain_grid_errors():  # (small: k+1 servers asked, each share read in one request)
        async with open_downloader(grid.broker, cap.manifest, lazy=True, whole=True) as downloader:
            await downloader.stream(collect)
    manifest = unpack(b"".join(parts), cap.size)
    remember(cap.manifest, manifest)
    return manifest


_manifests: OrderedDict[str, Manifest] = OrderedDict()
MANIFEST_CACHE = 1 << 18
"""Elements of the manifests kept in memory (some 256 GiB of files; lease
walks expand every chunked file the node keeps)."""


def cached_manifest(cap: ChunkedCap) -> Manifest | None:
    """The manifest of ``cap`` if this process has it in memory."""
    key = cap.manifest.to_string()
    cached = _manifests.get(key)
    if cached is not None:
        _manifests.move_to_end(key)
    return cached


def remember(cap: ReadCap, manifest: Manifest) -> None:
    """Keep a verified manifest in the process's cache (manifests are
    immutable), the least recently used going past MANIFEST_CACHE elements."""
    _manifests[cap.to_string()] = manifest
    _manifests.move_to_end(cap.to_string())
    while (
        sum(len(m.elements) for m in _manifests.values()) > MANIFEST_CACHE and len(_manifests) > 1
    ):
        _manifests.popitem(last=False)


async def read_range(grid: GridClient, cap: ReadCap, offset: int, length: int) -> bytes:
    parts: list[bytes] = []

    async def collect(data: bytes) -> None:
        parts.append(data)

    await grid.get(cap, collect, offset, length)
    data = b"".join(parts)
    if len(data) != length:
        raise GridError("a chunk was shorter than its cap says")
    return data


# -- reading ---------------------------------------------------------------


async def stream_chunked(
    grid: GridClient,
    cap: ChunkedCap,
    write: Callable[[bytes], Awaitable[None]],
    offset: int = 0,
    length: int | None = None,
) -> list[str]:
    """Call ``write`` with the bytes of [offset, offset+length) in order,
    fetching only the chunks the range touches, a few ahead; holes are
    zeros.  Returns the problems the chunks' downloads saw."""
    manifest = await load_manifest(grid, cap)
    end = cap.size if length is None else min(cap.size, offset + length)
    problems: list[str] = []
    spans = [
        (s, e, e.cap.storage_index if isinstance(e, Chunk) else b"")
        for s, e in manifest.spans(offset, end)
    ]

    def job(
        start: int, e: Element, si: bytes, shares: ShareMap
    ) -> Callable[[], Awaitable[tuple[Element, int, int, list[bytes]]]]:
        lo, hi = max(offset, start) - start, min(end, start + e.length) - start

        async def fetch() -> tuple[Element, int, int, list[bytes]]:
            if isinstance(e, Hole):
                return e, lo, hi, []
            parts: list[bytes] = []

            async def collect(data: bytes) -> None:
                parts.append(data)

            located = await shares.located(si, e.cap.k)
            whole = hi - lo == e.length  # (all of it: each share in one read)
            async with open_downloader(
                grid.broker, e.cap, lazy=True, located=located, whole=whole
            ) as downloader:
                await downloader.stream(collect, lo, hi - lo)
                problems.extend(downloader.problems)
            return e, lo, hi, parts

        return fetch

    k = max((e.cap.k for _, e, _ in spans if isinstance(e, Chunk)), default=0)
    if k:  # (the share map asks the servers known when it starts)
        await grid.wait_for_servers(k)
    send, recv = trio.open_memory_channel[tuple[Element, int, int, list[bytes]]](0)
    with plain_grid_errors():
        async with open_share_map(grid.broker, (si for _, _, si in spans if si)) as shares:
            jobs = (job(s, e, si, shares) for s, e, si in spans)
            await _deliver(jobs, send, recv, write)
    return problems


async def _deliver(
    jobs: Iterable[Callable[[], Awaitable[tuple[Element, int, int, list[bytes]]]]],
    send: trio.MemorySendChannel[tuple[Element, int, int, list[bytes]]],
    recv: trio.MemoryReceiveChannel[tuple[Element, int, int, list[bytes]]],
    write: Callable[[bytes], Awaitable[None]],
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ordered_tasks, jobs, READ_AHEAD, send)
        async with recv:
            async for e, lo, hi, parts in recv:
                if isinstance(e, Hole):
                    for off in range(lo, hi, ZERO_STEP):
                        await write(bytes(min(ZERO_STEP, hi - off)))
                for data in parts:
                    await write(data)


async def expand(grid: GridClient, caps: Iterable[str], strict: bool = True) -> set[str]:
    """The stored objects behind ``caps``: a chunked file's manifest and its
    chunks (by their CHK caps) besides the chunked cap itself.  A manifest
    that cannot be read raises (``strict``: nothing may be given up on a
    partial picture), else it is logged and skipped."""
    out = set(caps)
    chunked = [c for c in out if c.startswith("gridfs:chunked:")]
    limiter = trio.Semaphore(8)

    async def one(text: str) -> None:
        cap = parse(text)
        assert isinstance(cap, ChunkedCap)
        async with limiter:
            try:
                manifest = await load_manifest(grid, cap)
            except GridError as e:
                # (malformed: it names nothing that could be kept)
                if strict and not isinstance(e, FormatError):
                    raise
                log.warning("cannot read the manifest of %s: %s", log_name(text), e)
                return
        out.add(cap.manifest.to_string())
        out.update(c.to_string() for c in manifest.chunk_caps())

    with plain_grid_errors():
        async with trio.open_nursery() as nursery:
            for text in chunked:
                nursery.start_soon(one, text)
    return out
