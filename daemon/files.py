"""Open files: their state, and verified segment reads of their grid bytes.

One :class:`OpenFile` per inode, shared by all its handles, so a write through
one descriptor is seen by reads through another (what writes and commits do
to it: :mod:`daemon.staging`).  Reads of bytes on the grid fetch only the
segments they touch, through a bounded cache, and read ahead when access is
sequential.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from gridfs.caps import ReadCap, SliceCap, b32encode
from gridfs.client.download import Downloader, open_downloader
from gridfs.client.session import TreeSession
from gridfs.client.transfers import Transfer
from gridfs.dirnode import Entry
from gridfs.errors import GridError
from gridfs.hashes import PlaintextHasher
from gridfs.immutable import DecodedSegment
from gridfs.pack import open_slice

from .segcache import SegmentCache

if TYPE_CHECKING:
    from .content import Content

log = logging.getLogger(__name__)
SEGMENT_SIZE_KEY = -1
"""The cache entry (cap, -1) holds a file's segment size (8 bytes, big-endian)."""
READAHEAD = 8
"""Segments fetched ahead of a sequential reader, in runs of READ_RUN."""
READ_RUN = 4
"""Segments read ahead together, one request per share (downloader.segments)."""
READAHEAD_BYTES = 16 << 20
"""...and at most this many bytes of them (segments can be up to 64 MiB)."""


class CapReader:
    """Random-access reads of one immutable file, segment by segment (a file
    in a pack: its range of the pack, whose segments its neighbours share)."""

    def __init__(
        self, session: TreeSession, cap: ReadCap | SliceCap, cache: SegmentCache, lazy: bool = False
    ) -> None:
        self.session = session
        self.lazy = lazy
        """read only the shares' heads it needs (a chunk: see open_downloader)"""
        self.slice = cap if isinstance(cap, SliceCap) else None
        self.cap = cap.pack if isinstance(cap, SliceCap) else cap
        """the stored file read"""
        self.size = cap.size
        self.key = self.cap.to_string()
        self.cache = cache
        self._downloader: Downloader | None = None
        self._fetching: dict[int, trio.Event] = {}
        self._last = -2
        self._held: dict[int, bytes] = {}
        """Segments a scan fetched ahead and has not read yet, held here until
        the reader is past them: in the shared memory cache alone, the
        windows of other readers could push them out before they are read."""
        self._users = 0
        """reads and read-aheads under way: the downloader goes when the last
        of them ends after close() (another handle may still be reading)"""
        self._closed = False
        self._opening: trio.Event | None = None
        """set once a downloader being opened is there (concurrent reads open one)"""
        # Named by storage index: the cap holds the read key, which no status may show.
        self._name = "si:" + b32encode(cap.storage_index)[:16]
        self._transfer = Transfer("download", self._name, self.cap.size)
        """Counted in the client's transfers while the downloader is open."""

    async def _dl(self, nursery: trio.Nursery) -> Downloader:
        """The downloader, opened by the first user that needs it (only ever
        called by a counted user: see _users)."""
        while self._opening is not None:
            await self._opening.wait()
        if self._downloader is None:
            self._opening = opening = trio.Event()
            ready = trio.Event()

            async def hold(
                *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
            ) -> None:
                async with open_downloader(self.session.grid.broker, self.cap, lazy=self.lazy) as d:
                    self._downloader = d
                    task_status.started()
                    await ready.wait()  # held until the file is closed

            self._release = ready
            try:
                await nursery.start(hold)
                self._transfer = self.session.grid.transfers.start(
                    "download", self._name, self.cap.size
                )
            finally:
                self._opening = None
                opening.set()
        assert self._downloader is not None
        return self._downloader

    async def segment(self, j: int, nursery: trio.Nursery, disk: bool = True) -> bytes:
        """Segment ``j``, from the cache or fetched (and cached: on disk
        too when ``disk``)."""
        held = self._held.get(j)
        if held is not None:
            return held
        cached = await self.cache.get((self.key, j))
        if cached is not None:
            return cached
        if j in self._fetching:
            await self._fetching[j].wait()
            cached = self._held.get(j) or await self.cache.get((self.key, j))
            if cached is not None:
                return cached
        done = self._fetching[j] = trio.Event()
        try:
            decoded = await (await self._dl(nursery)).segment(j)
            await self._keep(decoded, disk)
            return decoded.data
        finally:
            done.set()
            self._fetching.pop(j, None)

    async def read(self, offset: int, size: int, nursery: trio.Nursery) -> bytes:
        end = min(self.size, offset + size)
        if offset >= end:
            return b""
        self._users += 1
        try:
            if self.slice is None:
                return await self._read(offset, end, nursery)
            base = self.slice.offset
            data = await self._read(base + offset, base + end, nursery)
            return open_slice(self.slice, offset, data)
        finally:
            self._user_done()

    async def _read(self, offset: int, end: int, nursery: trio.Nursery) -> bytes:
        """Bytes [offset, end) of the stored file."""
        segsize = await self._segment_size(nursery)
        stop = self.slice.offset + self.slice.length if self.slice else self.cap.size
        num_segments = -(-stop // segsize)  # (no further: the rest are a slice's neighbours)
        first, last = offset // segsize, (end - 1) // segsize
        sequential = first in (self._last, self._last + 1)
        # A scan (SegmentCache.is_scan): what it fetches stays in memory.
        scanning = sequential and self.cache.is_scan(self.size)
        for j in [j for j in self._held if j < first or not scanning]:
            del self._held[j]  # read, or left behind by a seek
        if sequential:  # read ahead
            count = max(1, min(READAHEAD, READAHEAD_BYTES // segsize))
            ahead = range(last + 1, min(last + 1 + count, num_segments))
            missing = [j for j in ahead if j not in self._held and (self.key, j) not in self.cache]
            for run in _runs([j for j in missing if j not in self._fetching], READ_RUN):
                # Whole runs (fewer requests) unless soon needed or at the end.
                if len(run) == READ_RUN or run[0] <= last + READ_RUN or run[-1] == num_segments - 1:
                    self._start_run(run, nursery, disk=not scanning)
        self._last = last
        parts = []
        for j in range(first, last + 1):
            data = await self.segment(j, nursery, disk=not scanning)
            lo = max(offset, j * segsize) - j * segsize
            hi = min(end, (j + 1) * segsize) - j * segsize
            parts.append(data[lo:hi])
        return b"".join(parts)

    async def _segment_size(self, nursery: trio.Nursery) -> int:
        """From the cache when it has the file (a read then needs no server),
        else from the file's verified extension block."""
        known = await self.cache.get((self.key, SEGMENT_SIZE_KEY))
        if known is not None:
            return int.from_bytes(known, "big")
        geometry = (await self._dl(nursery)).decoder.geometry
        assert geometry is not None
        size = geometry.params.segment_size
        await self.cache.put((self.key, SEGMENT_SIZE_KEY), size.to_bytes(8, "big"))
        return size

    async def _keep(self, decoded: DecodedSegment, disk: bool) -> None:
        """Count a fetched segment and cache it: on disk too when ``disk``,
        else in memory only, and then this reader holds it until it is read."""
        self._transfer.add(len(decoded.data))
        if not disk:
            self._held[decoded.index] = decoded.data
        await self.cache.put((self.key, decoded.index), decoded.data, disk)

    def _start_run(self, run: list[int], nursery: trio.Nursery, disk: bool) -> None:
        """Fetch consecutive segments ``run`` into the cache in the
        background (on disk too when ``disk``)."""
        events = {j: trio.Event() for j in run}
        self._fetching.update(events)
        self._users += 1

        async def fetch() -> None:
            try:
                if self._closed:
                    return
                downloader = await self._dl(nursery)
                for decoded in await downloader.segments(run[0], len(run)):
                    await self._keep(decoded, disk)
            except GridError:
                pass  # (a reader that needs one of them fetches it itself)
            finally:
                for j, event in events.items():
                    event.set()
                    if self._fetching.get(j) is event:
                        del self._fetching[j]
                self._user_done()

        nursery.start_soon(fetch)

    def close(self) -> None:
        """Let the downloader go, once the reads under way have ended
        (another handle's read may still be using this reader)."""
        self._closed = True
        self._held.clear()
        if not self._users:
            self._release_downloader()

    def _user_done(self) -> None:
        self._users -= 1
        if self._closed and not self._users:
            self._release_downloader()

    def _release_downloader(self) -> None:
        if self._downloader is not None:
            self._release.set()
            self._downloader = None
            self.session.grid.transfers.finish(self._transfer)


def _runs(indexes: list[int], most: int) -> list[list[int]]:
    """Ascending ``indexes`` cut into runs of consecutive ones, each at most ``most`` long."""
    runs: list[list[int]] = []
    for j in indexes:
        if runs and runs[-1][-1] == j - 1 and len(runs[-1]) < most:
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs


@dataclass
class OpenFile:
    """One inode's open state."""

    ino: int
    path: tuple[str, ...]
    entry: Entry
    handles: int = 0
    staging: int | None = None
    """fd of the staging file, when the file is being written"""
    buffer: bytearray | None = None
    """instead of a staging file: the bytes of a file being written while they
    fit inside its directory (at most INLINE_MAX), in memory"""
    staging_name: str | None = None
    extents: list[tuple[int, int]] | None = None
    """an edit: the ranges the staging file holds (the rest is a hole, its
    bytes those of ``origin``); None: the staging file holds every byte"""
    origin: Content | None = None
    """an edit: the version it changes"""
    origin_size: int = 0
    """an edit: bytes of ``origin`` not truncated away since (past them,
    outside ``extents``: zeros)"""
    origin_ref: tuple[str | None, str | None] | None = None
    """an edit: its base, (cap, None) or (None, box of its queued upload)"""
    dirty: bool = False
    size: int = 0
    unlinked: bool = False
    base: str | None = None
    """the cap the file had when this mount began changing it: its commit
    keeps another writer's version, found there instead, beside it (None:
    not checked, e.g. while the version it started from is still uploading)"""
    content: Content | None = None
    content_key: tuple[str, bytes | None] | None = None
    """the (cap, data) of the entry ``content`` was opened for: while the
    entry names it, a read goes straight to it (resolving the cap again, a
    parse and a base32 decode, was some 4 % of the event loop in a long read)"""
    mtime_set: bool = False
    """mtime was set explicitly (utime) after the last write: commit keeps it"""
    hasher: PlaintextHasher | None = None
    """the plaintext hash of bytes [0, hashed), fed by writes from an empty
    file on, in order; None once a write or truncate breaks the sequence"""
    hashed: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def staged(self) -> bool:
        """Being written: the bytes are in the buffer or the staging file."""
        return self.buffer is not None or self.staging is not None

    def hash_write(self, offset: int, data: bytes) -> None:
        """Feed a write to the plaintext hash: a file written from empty to
        end in order has its convergent key's hash ready when committed,
        and its upload skips a pass over the staging file."""
        if self.size == 0:
            self.hasher, self.hashed = PlaintextHasher(), 0
        if self.hasher is None:
            return
        if offset == self.hashed:
            self.hasher.update(data)
            self.hashed += len(data)
        else:
            self.hasher = None

    def plaintext_digest(self) -> bytes | None:
        """The hash of the whole file, if :meth:`hash_write` saw all of it."""
        if self.hasher is None or self.hashed != self.size:
            return None
        return self.hasher.digest()

    def close(self) -> None:
        self.buffer = None
        if self.staging is not None:
            os.close(self.staging)
            self.staging = None
        for content in (self.content, self.origin):
            if content is not None:
                content.close()
        self.content = self.origin = None
