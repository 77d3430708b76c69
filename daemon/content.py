"""A version of a file's bytes, readable at any offset, wherever they are.

Inline in its directory entry, in a queue tempfile (a whole file, or an
edit: the changed ranges of a sparse file over the version it changes), or
on the grid (read segment by segment, with read-ahead, through
:class:`~daemon.files.CapReader`).  An open :class:`Content` keeps its local
files open, so it stays readable after the queue uploaded and removed them.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

import trio

from gridfs.caps import ChunkedCap, LiteralCap, ReadCap, SliceCap, parse_read_cap
from gridfs.client.session import TreeSession
from gridfs.dirnode import Entry
from gridfs.errors import GridError
from gridfs.extents import Extents, pieces
from gridfs.workqueue import PENDING, QueuedEdit, is_local

from .chunkreader import Reader, open_reader
from .segcache import SegmentCache


class Content(Protocol):
    size: int

    async def read(self, offset: int, size: int) -> bytes: ...

    def close(self) -> None: ...


class Inline:
    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    async def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]

    def close(self) -> None:
        return None


class LocalFile:
    """A whole file in a queue tempfile (held open: see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self.fd).st_size

    async def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


class Remote:
    """A version on the grid, through a reader that :class:`Readers` shares."""

    def __init__(self, readers: Readers, key: str, reader: Reader) -> None:
        self.readers, self.key, self.reader, self.size = readers, key, reader, reader.size
        self._closed = False

    async def read(self, offset: int, size: int) -> bytes:
        return await self.reader.read(offset, size, self.readers.nursery)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.readers.release(self.key)


class Readers:
    """One segment reader per version on the grid, shared by every open
    Content of it.  The base of a queued edit stays open a while once
    unused (its downloader too): each version a run of edits makes reads
    its unchanged ranges from the same base, and a new reader would first
    locate its shares again (a round trip to the servers).  Other readers
    close with their last user, as a file's reader did."""

    KEEP_IDLE = 8
    """Unused bases kept open, the most recently used."""

    def __init__(self, session: TreeSession, cache: SegmentCache, nursery: trio.Nursery) -> None:
        self.session, self.cache, self.nursery = session, cache, nursery
        self._open: dict[str, tuple[Reader, int]] = {}
        self._idle: dict[str, Reader] = {}
        self._keep: set[str] = set()

    def get(self, cap: ReadCap | SliceCap | ChunkedCap, keep: bool = False) -> Remote:
        """A reader of ``cap``; ``keep``: stays open a while once unused."""
        key = cap.to_string()
        reader = self._idle.pop(key, None)
        if reader is None:
            reader, users = self._open.get(key, (None, 0))
            if reader is None:
                reader = open_reader(self.session, cap, self.cache)
        else:
            users = 0
        self._open[key] = (reader, users + 1)
        if keep:
            self._keep.add(key)
        return Remote(self, key, reader)

    def release(self, key: str) -> None:
        reader, users = self._open.pop(key)
        if users > 1:
            self._open[key] = (reader, users - 1)
            return
        if key not in self._keep:
            reader.close()
            return
        self._keep.discard(key)
        self._idle[key] = reader
        while len(self._idle) > self.KEEP_IDLE:
            self._idle.pop(next(iter(self._idle))).close()

    def close(self) -> None:
        for reader in self._idle.values():
            reader.close()
        self._idle.clear()


async def read_patched(
    fd: int, extents: Extents, size: int, base: Content | None, limit: int, offset: int, n: int
) -> bytes:
    """Bytes [offset, offset + n) of a file of ``size`` bytes whose
    ``extents`` are in the sparse file ``fd`` and whose other bytes below
    ``limit`` are those of ``base``; zeros elsewhere."""
    end = min(size, offset + n)
    parts: list[bytes] = []
    for at, length, inside in pieces(extents, offset, max(0, end - offset)):
        if inside:
            data = os.pread(fd, length, at)
        else:
            stop = min(at + length, limit)
            data = await base.read(at, stop - at) if base is not None and at < stop else b""
        parts.append(data + bytes(length - len(data)))
    return b"".join(parts)


class Patched:
    """A queued edit: its changed ranges from its tempfile, the rest from the
    version it changes."""

    def __init__(self, edit: QueuedEdit, base: Content) -> None:
        self.fd = os.open(edit.tempfile, os.O_RDONLY)
        self.extents, self.size, self.base = edit.extents, edit.size, base

    async def read(self, offset: int, size: int) -> bytes:
        return await read_patched(
            self.fd, self.extents, self.size, self.base, self.base.size, offset, size
        )

    def close(self) -> None:
        os.close(self.fd)
        self.base.close()


async def open_content(
    readers: Readers, entry: Entry, overlay_get: Callable[[str], Awaitable[bytes]]
) -> Content:
    """The bytes of the file ``entry`` (GridError if a queued upload it names is gone)."""
    if entry.data is not None:
        return Inline(entry.data)
    return await _open_cap(readers, entry.cap, overlay_get)


async def _open_cap(
    readers: Readers,
    cap: str,
    overlay_get: Callable[[str], Awaitable[bytes]],
    keep: bool = False,
) -> Content:
    for _ in range(3):  # (a tempfile may go between finding it and opening it)
        if not is_local(cap):
            break
        local = readers.session.queue.resolve_local(cap)
        try:
            if isinstance(local, Path):
                return LocalFile(local)
            if isinstance(local, QueuedEdit):
                base = await _open_cap(readers, local.base_ref, overlay_get, keep=True)
                try:
                    return Patched(local, base)
                except BaseException:
                    base.close()
                    raise
        except FileNotFoundError:
            continue
        cap = local
    if is_local(cap):
        raise GridError(f"the queued upload of {cap} is gone")
    if cap.startswith(PENDING):
        return Inline(bytes(await overlay_get(cap)))
    parsed = parse_read_cap(cap)
    if isinstance(parsed, LiteralCap):
        return Inline(parsed.data)
    return readers.get(parsed, keep)
