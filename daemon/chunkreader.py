"""Reads of a chunked file: only the chunks a read touches, and the next
ones ahead of a sequential reader.

A chunked file (:mod:`gridfs.client.chunked`) is a verified manifest and
chunks, each an ordinary CHK object; each chunk is read through its own
:class:`~daemon.files.CapReader` (verified segments, the shared segment
cache: a chunk shared by two files or versions is cached once), and so is
the manifest.  A few
chunk readers stay open, the least recently used are closed.  Holes read as
zeros without asking anyone.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import trio

from gridfs.caps import ChunkedCap, ReadCap, SliceCap
from gridfs.client.chunkread import cached_manifest, remember
from gridfs.client.session import TreeSession
from gridfs.errors import GridError
from gridfs.manifest import Chunk, Hole, Manifest, unpack

from .files import CapReader
from .segcache import SegmentCache

OPEN_CHUNKS = 16
"""Chunk readers (each with its share search done) kept open per file."""
AHEAD_CHUNKS = 4
"""Chunks a sequential reader fetches ahead (about 8 MiB)."""


class ChunkedReader:
    """Random-access reads of one chunked file (CapReader's interface)."""

    def __init__(self, session: TreeSession, cap: ChunkedCap, cache: SegmentCache) -> None:
        self.session = session
        self.cap = cap
        self.size = cap.size
        self.cache = cache
        self._manifest: Manifest | None = None
        self._readers: OrderedDict[int, CapReader] = OrderedDict()
        self._last = -2
        """the element the last read ended in"""
        self._ahead: set[int] = set()
        """elements fetched ahead already"""
        self._closed = False

    async def manifest(self, nursery: trio.Nursery) -> Manifest:
        """The file's manifest: from memory, else read (and verified) like
        any CHK file through the segment cache, which keeps it across
        remounts."""
        if self._manifest is None:
            self._manifest = cached_manifest(self.cap)
        if self._manifest is None:
            reader = CapReader(self.session, self.cap.manifest, self.cache)
            try:
                data = await reader.read(0, self.cap.manifest.size, nursery)
            finally:
                reader.close()
            self._manifest = unpack(data, self.cap.size)
            remember(self.cap.manifest, self._manifest)
        return self._manifest

    def _reader(self, i: int, chunk: Chunk) -> CapReader:
        reader = self._readers.get(i)
        if reader is None:
            reader = self._readers[i] = CapReader(self.session, chunk.cap, self.cache, lazy=True)
            while len(self._readers) > OPEN_CHUNKS:
                _, old = self._readers.popitem(last=False)
                old.close()
        self._readers.move_to_end(i)
        return reader

    async def read(self, offset: int, size: int, nursery: trio.Nursery) -> bytes:
        end = min(self.size, offset + size)
        if offset >= end:
            return b""
        manifest = await self.manifest(nursery)
        first = manifest.index_at(offset)
        parts: list[bytes] = []
        i = first
        for start, e in manifest.spans(offset, end):
            i = manifest.index_at(start)
            lo, hi = max(offset, start) - start, min(end, start + e.length) - start
            if isinstance(e, Hole):
                parts.append(bytes(hi - lo))
            else:
                parts.append(await self._reader(i, e).read(lo, hi - lo, nursery))
        if first in (self._last, self._last + 1):
            self._read_ahead(manifest, i, nursery)
        self._last = i
        return b"".join(parts)

    def _read_ahead(self, manifest: Manifest, i: int, nursery: trio.Nursery) -> None:
        """Fetch the chunks after element ``i`` into the segment cache."""
        for j in range(i + 1, min(len(manifest.elements), i + 1 + AHEAD_CHUNKS)):
            e = manifest.elements[j]
            if j in self._ahead or not isinstance(e, Chunk):
                continue
            self._ahead.add(j)
            reader = self._reader(j, e)

            async def fetch(reader: CapReader = reader, length: int = e.length) -> None:
                if not self._closed:
                    with contextlib.suppress(GridError):  # a read fetches it itself
                        await reader.read(0, length, nursery)

            nursery.start_soon(fetch)

    def close(self) -> None:
        self._closed = True
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


Reader = CapReader | ChunkedReader


def open_reader(
    session: TreeSession, cap: ReadCap | SliceCap | ChunkedCap, cache: SegmentCache
) -> Reader:
    """The reader for a stored file of any kind."""
    if isinstance(cap, ChunkedCap):
        return ChunkedReader(session, cap, cache)
    return CapReader(session, cap, cache)
