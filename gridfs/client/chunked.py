"""Chunked files: a large file as content-defined chunks and a manifest.

A file larger than :data:`CHUNKED_MIN_SIZE` is cut by FastCDC (the
``pyfastcdc`` library: FastCDC 2020, normalized chunking) into chunks of
:data:`CHUNK_MIN` .. :data:`CHUNK_MAX` bytes, about 4 MiB on average; each
chunk is stored as an ordinary CHK object under its convergent key, and a
manifest (:mod:`gridfs.manifest`) listing the chunks' caps and the file's
holes is stored as one more; the file's cap names the manifest.  Cut points
follow the content, so an edit, an insert or an append changes only the
chunks around it, and the same bytes in another file or another version
make the same chunks, which are not stored again: the node's chunk index
(:mod:`gridfs.client.chunkindex`) knows their caps, a lease renewal
confirms the servers still hold them, and a chunk the index does not know
still finds the servers answering "already have" to its upload.

Holes stay holes: the ranges ``SEEK_HOLE`` reports are never read, and a
chunk that is all zeros is recorded as a hole, never uploaded.

:func:`put_file` uploads a local file; :func:`put_edit` makes a new version
of a stored file from the ranges that changed, re-reading (verified) only
the base chunks those ranges touch; :func:`stream_chunked` reads any range,
fetching only the chunks it touches.  The chunker and the chunk store are
in :mod:`gridfs.client.chunkstore`, reading in :mod:`gridfs.client.chunkread`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..caps import ChunkedCap, LiteralCap, ReadCap, SliceCap, parse_read_cap
from ..errors import UsageError, plain_grid_errors
from ..manifest import Chunk, Element, Hole, Manifest
from .chunkread import FETCHES, ZERO_STEP, expand, load_manifest, read_range, stream_chunked
from .chunkstore import (
    CHUNK_AVG,
    CHUNK_MAX,
    CHUNK_MIN,
    CHUNKED_MIN_SIZE,
    ChunkStore,
    Content,
    FileContent,
    data_runs,
    store_manifest,
)
from .upload import Progress

if TYPE_CHECKING:
    from .grid import GridClient  # which imports this module

__all__ = [
    "CHUNKED_MIN_SIZE",
    "CHUNK_AVG",
    "CHUNK_MAX",
    "CHUNK_MIN",
    "expand",
    "load_manifest",
    "put_chunked",
    "put_edit",
    "put_file",
    "stream_chunked",
]
log = logging.getLogger(__name__)

# -- uploading a file ------------------------------------------------------


async def put_chunked(
    grid: GridClient, source: Path, progress: Progress | None = None, drop: bool = False
) -> ChunkedCap:
    """Store ``source`` as a chunked file (whatever its size)."""
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        store = ChunkStore(grid, progress)
        try:
            elements = await store.region(FileContent(f.fileno(), drop), 0, size)
        finally:
            store.close()
    log.info(
        "stored %s as %d chunks: %d uploaded, %d reused",
        source.name,
        store.uploaded + store.reused,
        store.uploaded,
        store.reused,
    )
    return await store_manifest(grid, elements)


async def put_file(
    grid: GridClient,
    source: Path,
    progress: Progress | None = None,
    drop: bool = False,
    digest: bytes | None = None,
) -> str:
    """Upload a local file; return its cap: chunked when larger than
    :data:`CHUNKED_MIN_SIZE`, else one CHK object (or a literal cap).
    Chunks the grid already holds are not stored again."""
    report = await grid.put(source, progress, drop=drop, digest=digest)
    return report.cap.to_string()


# -- editing a stored file -------------------------------------------------


class EditContent(Content):
    """A new version of a chunked file: ``extents`` from the sparse file
    ``fd``, the rest from the base (whose bytes the edit needs are fetched
    beforehand into ``base_bytes``, by element start), zeros past its end."""

    def __init__(
        self,
        fd: int,
        extents: list[tuple[int, int]],
        base: Manifest,
        base_bytes: dict[int, bytes],
    ) -> None:
        self.fd, self.extents, self.base, self.base_bytes = fd, extents, base, base_bytes

    def _pieces(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """[start, end) as (a, b, from_source) in order."""
        out, at = [], start
        for a, b in self.extents:
            if b <= at or a >= end:
                continue
            if a > at:
                out.append((at, a, False))
            out.append((max(a, at), min(b, end), True))
            at = min(b, end)
        if at < end:
            out.append((at, end, False))
        return out

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        for a, b, from_source in self._pieces(offset, offset + length):
            if from_source:
                data = os.pread(self.fd, b - a, a)
                parts.append(data + bytes(b - a - len(data)))  # past its end: zeros
            else:
                parts.append(self._base(a, b))
        return b"".join(parts)

    def _base(self, a: int, b: int) -> bytes:
        parts = []
        for start, e in self.base.spans(a, b):
            lo, hi = max(a, start) - start, min(b, start + e.length) - start
            if isinstance(e, Hole):
                parts.append(bytes(hi - lo))
            else:
                parts.append(self.base_bytes[start][lo:hi])
        got = sum(map(len, parts))
        return b"".join(parts) + bytes(b - a - got)  # past the base's end: zeros

    def runs(self, start: int, end: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        for a, b, from_source in self._pieces(start, end):
            if from_source:
                runs += data_runs(self.fd, a, b)
            else:
                runs += [
                    (max(a, s), min(b, s + e.length))
                    for s, e in self.base.spans(a, b)
                    if isinstance(e, Chunk)
                ]
        merged: list[tuple[int, int]] = []
        for a, b in runs:
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return merged


def edit_regions(
    base: Manifest, extents: list[tuple[int, int]], size: int
) -> list[tuple[int, int]]:
    """The [start, end) ranges of the new version to chunk again: each
    changed range widened to the base's element boundaries around it (and
    to one element more, where content-defined cuts can move), merged.
    Outside them the base's elements are kept as they are."""
    windows = [(a, min(a + n, size)) for a, n in extents if n > 0 and a < size]
    if size < base.size and size > 0:
        windows.append((size - 1, size))  # the element the new end cuts
    if size > base.size:
        windows.append((base.size, size))
    regions: list[tuple[int, int]] = []
    for a, b in sorted(windows):
        if a < base.size:
            i = base.index_at(a)
            start = base.starts[i]
        else:  # past the base: from its end, or its last chunk if that is small
            start = base.size
            last = base.elements[-1] if base.elements else None
            if isinstance(last, Chunk) and last.length < CHUNK_MIN:
                start = base.starts[-1]
        if b < base.size:
            j = base.index_at(b - 1)
            if j + 1 < len(base.elements) and isinstance(base.elements[j + 1], Chunk):
                j += 1  # a cut point may move into the next chunk
            end = min(size, base.starts[j] + base.elements[j].length)
        else:
            end = size
        if regions and start <= regions[-1][1]:
            regions[-1] = (regions[-1][0], max(end, regions[-1][1]))
        else:
            regions.append((start, end))
    return regions


async def put_edit(
    grid: GridClient,
    base_cap: str,
    source: Path,
    extents: list[tuple[int, int]],
    size: int,
    progress: Progress | None = None,
) -> str:
    """A new version of the file ``base_cap`` whose bytes in each
    ``(offset, length)`` of ``extents`` are those of the sparse file
    ``source`` at the same offsets (its holes and its end read as zeros),
    truncated or extended (with a hole) to ``size``.  Only the chunks
    around the changed ranges are read back (verified), cut again and
    stored, unless the grid holds them already; the others keep their caps.
    Returns the new version's cap (a chunked cap when larger than
    :data:`CHUNKED_MIN_SIZE`, else as :func:`put_file` stores it)."""
    base = parse_read_cap(base_cap)
    extents = sorted((a, n) for a, n in extents if n > 0)
    if any(a < 0 for a, _ in extents) or size < 0:
        raise UsageError("put_edit: negative offset or size")
    merged: list[tuple[int, int]] = []
    for a, n in extents:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], a + n))
        else:
            merged.append((a, a + n))
    if not isinstance(base, ChunkedCap) or size <= CHUNKED_MIN_SIZE:
        return await _rewrite_whole(grid, base, source, merged, size, progress)
    manifest = await load_manifest(grid, base)
    regions = edit_regions(manifest, [(a, b - a) for a, b in merged], size)
    elements: list[Element] = []
    at = 0
    with open(source, "rb") as f:
        content = EditContent(f.fileno(), merged, manifest, {})
        store = ChunkStore(grid, progress)
        try:
            for r0, r1 in regions:  # (the base bytes of one region at a time in memory)
                needed = {
                    s: e
                    for s, e in manifest.spans(r0, r1)
                    if isinstance(e, Chunk) and not _covered(merged, s, s + e.length)
                }
                content.base_bytes = await _fetch_all(grid, needed)
                elements += _keep(manifest, at, r0)
                elements += await store.region(content, r0, r1)
                at = r1
        finally:
            store.close()
    elements += _keep(manifest, at, size)
    log.info("edit: %d chunks uploaded, %d reused", store.uploaded, store.reused)
    return (await store_manifest(grid, elements)).to_string()


def _keep(base: Manifest, start: int, end: int) -> list[Element]:
    """The base's elements of [start, end), which lies on its element
    boundaries except where the base ends (a hole then extends it)."""
    out: list[Element] = [e for s, e in base.spans(start, end)]
    if end > max(start, base.size):
        out.append(Hole(end - max(start, base.size)))
    return out


def _covered(ranges: list[tuple[int, int]], a: int, b: int) -> bool:
    return any(x <= a and b <= y for x, y in ranges)


async def _fetch_all(grid: GridClient, needed: dict[int, Chunk]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    limiter = trio.Semaphore(FETCHES)

    async def one(start: int, chunk: Chunk) -> None:
        async with limiter:
            out[start] = await read_range(grid, chunk.cap, 0, chunk.length)

    with plain_grid_errors():
        async with trio.open_nursery() as nursery:
            for start, chunk in needed.items():
                nursery.start_soon(one, start, chunk)
    return out


async def _rewrite_whole(
    grid: GridClient,
    base: LiteralCap | ReadCap | SliceCap | ChunkedCap,
    source: Path,
    extents: list[tuple[int, int]],
    size: int,
    progress: Progress | None,
) -> str:
    """An edit of a file that is not chunked (or will not be): the new
    version built whole in a sparse tempfile beside ``source``, then put."""
    with tempfile.NamedTemporaryFile(dir=source.parent, prefix=".edit-") as tmp:
        out = tmp.fileno()
        keep = min(size, base.size)
        at = 0

        async def copy(data: bytes) -> None:
            nonlocal at
            if data.count(0) != len(data):  # zeros stay a hole
                os.pwrite(out, data, at)
            at += len(data)

        if keep and not _covered(extents, 0, keep):
            await grid.get(base, copy, 0, keep)
        with open(source, "rb") as f:
            for a, b in extents:
                b = min(b, size)
                for s, e in data_runs(f.fileno(), a, b):
                    for off in range(s, e, 8 << 20):
                        data = os.pread(f.fileno(), min(8 << 20, e - off), off)
                        os.pwrite(out, data, off)
                if a < b:  # the source's holes in an extent: zeros here too
                    _punch(out, a, b, data_runs(f.fileno(), a, b))
        os.ftruncate(out, size)
        report = await grid.put(Path(tmp.name), progress)
        return report.cap.to_string()


def _punch(fd: int, a: int, b: int, data: list[tuple[int, int]]) -> None:
    """Zero the parts of [a, b) outside ``data`` (holes of the source)."""
    at = a
    for s, e in [*data, (b, b)]:
        if s > at:
            for off in range(at, s, ZERO_STEP):
                os.pwrite(fd, bytes(min(ZERO_STEP, s - off)), off)
        at = max(at, e)
