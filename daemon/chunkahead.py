"""Whole chunks fetched ahead of a sequential reader of a chunked file.

A chunk read through its own :class:`~daemon.files.CapReader` first asks
k+1 servers where its shares are, reads k+1 heads, then its records a
segment or a run at a time: some seventeen requests for a 3 MiB chunk, and
a sequential reader of a large file spent more time on them than on the
bytes.  Ahead of a sequential reader, :class:`ChunkAhead` instead finds the
shares of the file's chunks with one ``get_buckets_many`` per server for
64 chunks at once (:class:`~gridfs.client.sharemap.ShareMap`; a server is
asked only about the chunks it is among the first k+1 servers of, as a
chunk's own search would ask it: each lookup is a directory read on its
disk) and reads k
shares of each chunk whole, one request each (``whole``), as ``gridfs
get`` does.  Every share is still verified against the chunk's cap before
its bytes are decoded; the answer of the search proves nothing.

The window grows as the reader goes on, as the kernel's read-ahead does:
a read at random that happens to follow another fetches a chunk or two,
and a long sequential read keeps AHEAD_BYTES in flight or ready (FETCHES
chunks fetched at once).  Fetched chunks are held until the reader is past
them, and put in the segment cache too, so another reader of the same
chunk, or this file after a remount, finds them there; unless the file is
a scan (:meth:`~daemon.segcache.SegmentCache.is_scan`): held here until
read, a scan's chunks would only push the segments other readers use out of
the cache's memory (and the kernel's page cache keeps what the mount
served).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from gridfs.client.download import open_downloader
from gridfs.client.session import TreeSession
from gridfs.client.sharemap import ShareMap, open_share_map
from gridfs.errors import GridError
from gridfs.manifest import Chunk, Manifest

from .files import SEGMENT_SIZE_KEY
from .segcache import SegmentCache

log = logging.getLogger(__name__)
AHEAD_START = 8 << 20
"""Bytes of chunks fetched ahead when a read first follows the one before."""
AHEAD_BYTES = 32 << 20
"""...doubling with each chunk the reader goes on into, up to this many."""
AHEAD_CHUNKS = 2
"""...and at least this many chunks, however large."""
FETCHES = 4
"""Chunks fetched at once (each takes k requests, one per share)."""


@dataclass
class _Fetch:
    """One chunk fetched whole: its segments, once there."""

    chunk: Chunk
    done: trio.Event = field(default_factory=trio.Event)
    segments: list[bytes] | None = None
    """None once done: not fetched (failed, or all in the cache already)"""
    segment_size: int = 0

    def slice(self, lo: int, hi: int) -> list[memoryview]:
        """Views of bytes [lo, hi) of the chunk (no copy)."""
        assert self.segments is not None
        size = self.segment_size
        out = []
        for j in range(lo // size, (hi - 1) // size + 1):
            start = j * size
            out.append(memoryview(self.segments[j])[max(lo, start) - start : hi - start])
        return out


class ChunkAhead:
    """The chunks fetched ahead of one sequential reader of a chunked file."""

    def __init__(
        self, session: TreeSession, manifest: Manifest, cache: SegmentCache, scan: bool
    ) -> None:
        self.session = session
        self.manifest = manifest
        self.cache = cache
        self.scan = scan
        """a scan: its chunks stay out of the segment cache"""
        self._fetches: dict[int, _Fetch] = {}
        self._inflight = 0
        self._pos = -1
        """the element the reader is in"""
        self._window = AHEAD_START
        self._nursery: trio.Nursery | None = None
        self._shares: ShareMap | None = None
        self._running = False
        self._stop = trio.Event()

    async def take(self, i: int, lo: int, hi: int) -> list[memoryview] | None:
        """Bytes [lo, hi) of element ``i`` if it was fetched ahead (waiting
        for its fetch), else None: the caller reads it itself."""
        fetch = self._fetches.get(i)
        if fetch is None:
            return None
        await fetch.done.wait()
        return fetch.slice(lo, hi) if fetch.segments is not None else None

    def advance(self, first: int, i: int, nursery: trio.Nursery) -> None:
        """The reader reads on sequentially, elements ``first`` to ``i``:
        let go of the chunks behind them and fetch those ahead."""
        if self._running and i == self._pos + 1:
            self._window = min(AHEAD_BYTES, self._window * 2)
        elif self._running and i != self._pos:  # a seek: start small again
            self._window = AHEAD_START
        self._pos = i
        for j in [j for j in self._fetches if j < first]:
            del self._fetches[j]  # (one still under way lets its bytes go when done)
        if not self._running:
            self._running = True
            nursery.start_soon(self._run)
        else:
            self._pump()

    async def _run(self) -> None:
        """Hold the share map and the fetches until :meth:`close`."""
        if self._stop.is_set():
            return
        chunks = [e.cap for e in self.manifest.elements if isinstance(e, Chunk)]
        sis = [c.storage_index for c in chunks]
        spread = max((c.k for c in chunks), default=0) + 1
        async with (
            trio.open_nursery() as nursery,
            open_share_map(self.session.grid.broker, sis, spread) as shares,
        ):
            self._nursery, self._shares = nursery, shares
            self._pump()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def _pump(self) -> None:
        """Start the fetches of the window after the reader, in order."""
        if self._nursery is None or self._stop.is_set():
            return
        elements = self.manifest.elements
        ahead = count = 0
        for j in range(self._pos + 1, len(elements)):
            if self._inflight >= FETCHES or (ahead >= self._window and count >= AHEAD_CHUNKS):
                return
            e = elements[j]
            if not isinstance(e, Chunk):
                continue
            ahead, count = ahead + e.length, count + 1
            if j not in self._fetches:
                self._fetches[j] = fetch = _Fetch(e)
                self._inflight += 1
                self._nursery.start_soon(self._fetch, fetch)

    async def _fetch(self, fetch: _Fetch) -> None:
        try:
            if not await self._cached(fetch.chunk):
                await self._download(fetch)
        except GridError as e:  # (the reader's own read tries again, and says why)
            log.info("fetching a chunk ahead: %s", e)
        finally:
            fetch.done.set()
            self._inflight -= 1
            self._pump()
        if fetch.segments is not None and not self.scan:
            # Shielded: the reader that had the last chunk may close the
            # file at once, which cancels the fetches; the cache still gets
            # the chunk (a few local writes), for the next reader.
            with trio.CancelScope(shield=True):
                key = fetch.chunk.cap.to_string()
                size = fetch.segment_size.to_bytes(8, "big")
                await self.cache.put((key, SEGMENT_SIZE_KEY), size)
                for j, data in enumerate(fetch.segments):
                    await self.cache.put((key, j), data)

    async def _cached(self, chunk: Chunk) -> bool:
        """Whether the cache has every segment of ``chunk`` (read there, then)."""
        key = chunk.cap.to_string()
        known = await self.cache.get((key, SEGMENT_SIZE_KEY))
        if known is None:
            return False
        size = int.from_bytes(known, "big")
        return all((key, j) in self.cache for j in range(-(-chunk.length // size)))

    async def _download(self, fetch: _Fetch) -> None:
        """Fetch and verify the chunk, k shares each read whole."""
        assert self._shares is not None
        cap = fetch.chunk.cap
        located = await self._shares.located(cap.storage_index, cap.k)
        parts: list[bytes] = []

        async def collect(data: bytes) -> None:
            parts.append(data)

        broker = self.session.grid.broker
        async with open_downloader(broker, cap, lazy=True, located=located, whole=True) as d:
            await d.stream(collect)
            geometry = d.decoder.geometry
        assert geometry is not None
        size = geometry.params.segment_size
        count = -(-cap.size // size)
        if len(parts) != count or any(len(p) != size for p in parts[:-1]):
            data = b"".join(parts)  # (written otherwise than segment by segment)
            parts = [data[j * size : (j + 1) * size] for j in range(count)]
        fetch.segments, fetch.segment_size = parts, size

    def close(self) -> None:
        """Stop the fetches and let go of what they fetched."""
        self._stop.set()
        self._fetches.clear()
