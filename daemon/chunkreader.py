"""Reads of a chunked file: only the chunks a read touches, and the next
ones ahead of a sequential reader.

A chunked file (:mod:`gridfs.client.chunked`) is a verified manifest and
chunks, each an ordinary CHK object; a chunk read at random is read through
its own :class:`~daemon.files.CapReader` (verified segments, the shared
segment cache: a chunk shared by two files or versions is cached once), and
so is the manifest.  A few chunk readers stay open, the least recently used
are closed.  Ahead of a sequential reader, whole chunks are fetched with
their shares found many at once (:mod:`daemon.chunkahead`).  Holes read as
zeros without asking anyone.
"""

from __future__ import annotations

from collections import OrderedDict

import trio

from gridfs.caps import ChunkedCap, ReadCap, SliceCap
from gridfs.client.chunkread import cached_manifest, remember
from gridfs.client.session import TreeSession
from gridfs.manifest import Chunk, Hole, Manifest, unpack

from .chunkahead import ChunkAhead
from .files import CapReader
from .segcache import SegmentCache

OPEN_CHUNKS = 16
"""Chunk readers (each with its share search done) kept open per file."""


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
        self._ahead: ChunkAhead | None = None
        """the chunks fetched ahead, once the reader reads sequentially"""

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
        first, last = manifest.index_at(offset), manifest.index_at(end - 1)
        if first in (self._last, self._last + 1):
            if self._ahead is None:
                scan = self.cache.is_scan(self.size)
                self._ahead = ChunkAhead(self.session, manifest, self.cache, scan)
            self._ahead.advance(first, last, nursery)
        self._last = last
        parts: list[bytes | memoryview] = []
        for start, e in manifest.spans(offset, end):
            lo, hi = max(offset, start) - start, min(end, start + e.length) - start
            if isinstance(e, Hole):
                parts.append(bytes(hi - lo))
                continue
            i = manifest.index_at(start)
            ahead = await self._ahead.take(i, lo, hi) if self._ahead is not None else None
            if ahead is not None:
                parts.extend(ahead)
            else:
                parts.append(await self._reader(i, e).read(lo, hi - lo, nursery))
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
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
