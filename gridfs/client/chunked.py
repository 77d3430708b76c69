"""Chunked files: a large file as content-defined chunks and a manifest.

A file larger than :data:`CHUNKED_MIN_SIZE` is cut by FastCDC (the
``pyfastcdc`` library: FastCDC 2020, normalized chunking) into chunks of
:data:`CHUNK_MIN` .. :data:`CHUNK_MAX` bytes, about 1 MiB on average; each
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
fetching only the chunks it touches.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import trio
from pyfastcdc import FastCDC

from ..aio import ordered_tasks
from ..caps import ChunkedCap, LiteralCap, ReadCap, SliceCap, log_name, parse, parse_read_cap
from ..codec import params_for_size
from ..errors import GridError, UsageError, plain_grid_errors
from ..hashes import PlaintextHasher, convergence_key
from ..manifest import Chunk, Element, Hole, Manifest, pack, unpack
from .broker import Server
from .chunkindex import ChunkIndex
from .download import open_downloader
from .upload import Progress, upload_file

if TYPE_CHECKING:
    from .grid import GridClient  # which imports this module

log = logging.getLogger(__name__)

CHUNK_MIN = 256 * 1024
CHUNK_AVG = 768 * 1024
"""pyfastcdc's ``avg_size``: its chunks average about ``avg + min`` bytes,
here 1 MiB (measured: 964 KiB over 128 MiB of random data)."""
CHUNK_MAX = 2 * 1024 * 1024
NORMALIZATION: Literal[2] = 2
"""FastCDC's normalized chunking level: chunk sizes bunch near the
average, so no edit rewrites much more than 1 MiB."""
CHUNKED_MIN_SIZE = CHUNK_MAX
"""Files up to this size are one CHK object (they would be one chunk)."""
BATCH = 8
"""Chunks looked up in the index (and renewed) together."""
UPLOADS = 6
"""Chunks of a batch uploaded at once (a 1 MiB chunk is one request per server)."""
WINDOW = 2
"""Batches being stored at once (the next one's lookups overlap the uploads)."""
FETCHES = 8
"""Chunks a sequential read fetches ahead."""
ZERO_STEP = 1024 * 1024


def chunker() -> FastCDC:
    """The chunker every gridfs node uses (a change of parameters moves
    every cut point, and so costs the dedup of everything stored before)."""
    return FastCDC(
        CHUNK_AVG, min_size=CHUNK_MIN, max_size=CHUNK_MAX, normalized_chunking=NORMALIZATION
    )


# -- what to chunk ---------------------------------------------------------


def data_runs(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The [a, b) ranges of [start, end) of ``fd`` that may hold data: the
    rest are holes (SEEK_DATA/SEEK_HOLE; a filesystem without them reports
    no holes)."""
    runs: list[tuple[int, int]] = []
    at = start
    while at < end:
        try:
            a = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole up to the end
                break
            raise
        if a >= end:
            break
        b = min(os.lseek(fd, a, os.SEEK_HOLE), end)
        runs.append((a, b))
        at = b
    return runs


class Content:
    """The bytes of the file being stored, read by offset (in a thread)."""

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def runs(self, start: int, end: int) -> list[tuple[int, int]]:
        """Ranges of [start, end) that may hold data (the rest are zeros)."""
        raise NotImplementedError


class FileContent(Content):
    """A local file (sparse or not)."""

    def __init__(self, fd: int, drop: bool = False) -> None:
        self.fd = fd
        self.drop = drop

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise GridError("the file changed size while being uploaded")
        if self.drop:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        return data

    def runs(self, start: int, end: int) -> list[tuple[int, int]]:
        return data_runs(self.fd, start, end)


class _Reader:
    """[start, end) of a :class:`Content` as a stream, for the chunker."""

    def __init__(self, content: Content, start: int, end: int) -> None:
        self.content, self.at, self.end = content, start, end

    def read(self, n: int) -> bytes:
        n = min(n, self.end - self.at, 8 << 20)
        if n <= 0:
            return b""
        data = self.content.read(self.at, n)
        self.at += n
        return data


@dataclass(frozen=True)
class _Piece:
    offset: int
    data: bytes
    digest: bytes | None
    """its plaintext hash; None when it is all zeros (a hole)"""


# -- storing chunks --------------------------------------------------------


class ChunkStore:
    """Stores chunks for one upload: the index first, the servers' leases
    as the proof, an upload otherwise."""

    def __init__(self, grid: GridClient, progress: Progress | None = None) -> None:
        self.grid = grid
        self.progress = progress
        self.index = ChunkIndex.of_node(grid.node.private)
        self.uploaded = 0
        """Chunks stored by an upload (the others were reused)."""
        self.reused = 0

    def close(self) -> None:
        self.index.close()

    def _key(self, piece: _Piece) -> bytes:
        p = self.grid.params
        codec = params_for_size(p.k, p.n, p.segment_size, len(piece.data))
        assert piece.digest is not None
        return convergence_key(self.grid.secret, codec.serialize(), piece.digest)

    async def store(self, pieces: list[_Piece]) -> list[Element]:
        """An element per piece, in order: holes for zeros, chunks stored."""
        keys = {i: self._key(p) for i, p in enumerate(pieces) if p.digest is not None}
        known = self.index.lookup(keys.values())
        hints = {key: cap for key, text in known.items() if isinstance(cap := parse(text), ReadCap)}
        held = await self._held([cap.storage_index for cap in hints.values()])
        caps: dict[int, ReadCap] = {}
        for i, key in keys.items():
            hint = hints.get(key)
            if hint is not None and held.get(hint.storage_index, 0) >= self.grid.params.happy:
                caps[i] = hint
        self.reused += len(caps)
        missing = [i for i in keys if i not in caps]
        limiter = trio.Semaphore(UPLOADS)

        async def upload(i: int) -> None:
            async with limiter:
                caps[i] = await self._upload(pieces[i])

        with plain_grid_errors():
            async with trio.open_nursery() as nursery:
                for i in missing:
                    nursery.start_soon(upload, i)
        self.uploaded += len(missing)
        await trio.to_thread.run_sync(self.index.add, {keys[i]: caps[i].to_string() for i in keys})
        if self.progress is not None:
            self.progress(sum(len(p.data) for p in pieces))
        return [Chunk(caps[i]) if i in caps else Hole(len(p.data)) for i, p in enumerate(pieces)]

    async def _held(self, sis: list[bytes]) -> dict[bytes, int]:
        """How many servers hold something of each storage index, renewing
        this node's lease there (which a concurrent unlink's fence spares)."""
        counts: dict[bytes, int] = {}
        if not sis:
            return counts

        async def one(server: Server) -> None:
            try:
                answers = await server.calls.add_leases(
                    [(si, *server.lease_secrets(si)) for si in sis]
                )
            except GridError:
                return
            for si, n in zip(sis, answers, strict=True):
                if n > 0:
                    counts[si] = counts.get(si, 0) + 1

        async with trio.open_nursery() as nursery:
            for server in list(self.grid.broker.servers.values()):
                nursery.start_soon(one, server)
        return counts

    async def _upload(self, piece: _Piece) -> ReadCap:
        cap = await upload_data(self.grid, piece.data, piece.digest)
        return cap

    async def region(self, content: Content, start: int, end: int) -> list[Element]:
        """Store [start, end) of ``content``: its holes as holes, its data
        cut into chunks (each data run on its own)."""
        elements: list[Element] = []
        at = start
        runs = await trio.to_thread.run_sync(content.runs, start, end)
        for a, b in runs:
            if a > at:
                elements.append(Hole(a - at))
                if self.progress is not None:
                    self.progress(a - at)
            elements += await self._run(content, a, b)
            at = b
        if end > at:
            elements.append(Hole(end - at))
            if self.progress is not None:
                self.progress(end - at)
        return elements

    async def _run(self, content: Content, start: int, end: int) -> list[Element]:
        send, recv = trio.open_memory_channel[_Piece | None](BATCH)

        def cut() -> None:
            for ch in chunker().cut_stream(_Reader(content, start, end)):
                data = bytes(ch.data)
                zero = data.count(0) == len(data)
                digest = None
                if not zero:
                    hasher = PlaintextHasher()
                    hasher.update(data)
                    digest = hasher.digest()
                trio.from_thread.run(send.send, _Piece(start + ch.offset, data, digest))
            trio.from_thread.run(send.send, None)

        elements: list[Element] = []
        with plain_grid_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, cut)
                elements = await self._collect(recv)
        return elements

    async def _collect(self, recv: trio.MemoryReceiveChannel[_Piece | None]) -> list[Element]:
        """Store the pieces the chunker sends, a batch at a time, until None."""
        done: dict[int, list[Element]] = {}
        window = trio.Semaphore(WINDOW)

        async def store(i: int, batch: list[_Piece]) -> None:
            try:
                done[i] = await self.store(batch)
            finally:
                window.release()

        batch: list[_Piece] = []
        started = 0
        with plain_grid_errors():
            async with trio.open_nursery() as nursery, recv:
                async for piece in recv:
                    if piece is not None:
                        batch.append(piece)
                    if batch and (piece is None or len(batch) == BATCH):
                        await window.acquire()
                        nursery.start_soon(store, started, batch)
                        started, batch = started + 1, []
                    if piece is None:
                        break
        return [e for i in sorted(done) for e in done[i]]


async def upload_data(grid: GridClient, data: bytes, digest: bytes | None = None) -> ReadCap:
    """Store bytes in memory as one CHK object (never a literal cap)."""
    fd = os.memfd_create("gridfs-chunk")
    try:
        os.write(fd, data)
        report = await upload_file(
            grid.broker,
            Path(f"/proc/self/fd/{fd}"),
            grid.params,
            grid.secret,
            digest=digest,
            literal=False,
        )
    finally:
        os.close(fd)
    assert isinstance(report.cap, ReadCap)
    return report.cap


async def store_manifest(grid: GridClient, elements: Iterable[Element]) -> ChunkedCap:
    manifest = Manifest.of(elements)
    cap = await upload_data(grid, pack(manifest))
    remember(cap, manifest)
    return ChunkedCap(cap, manifest.size)


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


async def load_manifest(grid: GridClient, cap: ChunkedCap) -> Manifest:
    """The manifest ``cap`` names, verified (and cached: it is immutable)."""
    cached = cached_manifest(cap)
    if cached is not None:
        return cached
    parts: list[bytes] = []

    async def collect(data: bytes) -> None:
        parts.append(data)

    await grid.get(cap.manifest, collect)
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
    needed = {
        s: e
        for r0, r1 in regions
        for s, e in manifest.spans(r0, r1)
        if isinstance(e, Chunk) and not _covered(merged, s, s + e.length)
    }
    fetched = await _fetch_all(grid, needed)
    elements: list[Element] = []
    at = 0
    with open(source, "rb") as f:
        content = EditContent(f.fileno(), merged, manifest, fetched)
        store = ChunkStore(grid, progress)
        try:
            for r0, r1 in regions:
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

    def job(start: int, e: Element) -> Callable[[], Awaitable[tuple[Element, int, int, bytes]]]:
        lo, hi = max(offset, start) - start, min(end, start + e.length) - start

        async def fetch() -> tuple[Element, int, int, bytes]:
            if isinstance(e, Hole):
                return e, lo, hi, b""
            parts: list[bytes] = []

            async def collect(data: bytes) -> None:
                parts.append(data)

            await grid.wait_for_servers(e.cap.k)
            async with open_downloader(grid.broker, e.cap, lazy=True) as downloader:
                await downloader.stream(collect, lo, hi - lo)
                problems.extend(downloader.problems)
            return e, lo, hi, b"".join(parts)

        return fetch

    jobs = (job(s, e) for s, e in manifest.spans(offset, end))
    send, recv = trio.open_memory_channel[tuple[Element, int, int, bytes]](0)
    with plain_grid_errors():
        await _deliver(jobs, send, recv, write)
    return problems


async def _deliver(
    jobs: Iterable[Callable[[], Awaitable[tuple[Element, int, int, bytes]]]],
    send: trio.MemorySendChannel[tuple[Element, int, int, bytes]],
    recv: trio.MemoryReceiveChannel[tuple[Element, int, int, bytes]],
    write: Callable[[bytes], Awaitable[None]],
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ordered_tasks, jobs, FETCHES, send)
        async with recv:
            async for e, lo, hi, data in recv:
                if isinstance(e, Hole):
                    for off in range(lo, hi, ZERO_STEP):
                        await write(bytes(min(ZERO_STEP, hi - off)))
                else:
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
                if strict:
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
