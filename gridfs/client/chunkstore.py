"""Storing a file's bytes as chunks: the chunker, what it reads, and the
chunk store that skips chunks the grid holds (see :mod:`gridfs.client.chunked`).

FastCDC (the ``pyfastcdc`` library: FastCDC 2020, normalized chunking) cuts
each data run of the file into chunks of :data:`CHUNK_MIN` ..
:data:`CHUNK_MAX` bytes, about 4 MiB on average; each is stored as an
ordinary CHK object under its convergent key.  Holes (``SEEK_HOLE``) are
never read, a chunk of zeros is recorded as a hole.  The node's chunk index
(:mod:`gridfs.client.chunkindex`) knows the caps of chunks stored before;
a lease renewal at ``happy`` servers confirms they still hold one before it
is reused, and a chunk the index does not know still finds the servers
answering "already have" to its upload.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import trio
from pyfastcdc import FastCDC

from ..caps import ChunkedCap, ReadCap, parse
from ..codec import params_for_size
from ..errors import GridError, plain_grid_errors
from ..hashes import PlaintextHasher, convergence_key
from ..manifest import Chunk, Element, Hole, Manifest, pack
from ..protocol.schema import MAX_WRITE
from .batchput import put_objects
from .broker import Server
from .chunkindex import ChunkIndex
from .chunkread import remember
from .upload import Progress, upload_file

if TYPE_CHECKING:
    from .grid import GridClient

CHUNK_MIN = 1024 * 1024
CHUNK_AVG = 3 * 1024 * 1024
"""pyfastcdc's ``avg_size``: its chunks average about ``avg + min`` bytes,
here ~4 MiB (measured over 256 MiB of random data: mean 3,855 KiB, median
3,572 KiB, largest 6,821 KiB).  Each chunk costs every server a share
file: on a local grid of 10, a put of ~2 MiB chunks ran ~15 % below one
CHK object, one of ~4 MiB chunks within 10 % (docs/formats.md §16.2)."""
CHUNK_MAX = 8 * 1024 * 1024
NORMALIZATION: Literal[2] = 2
"""FastCDC's normalized chunking level: chunk sizes bunch near the
average, so no edit rewrites much more than one average chunk."""
CHUNKED_MIN_SIZE = 2 * 1024 * 1024
"""Files up to this size are one CHK object (they would be one chunk)."""
BATCH = 4
"""Chunks looked up in the index (and renewed) together."""
PUT_BYTES = 16 * 1024 * 1024
"""Most chunk bytes encoded and sent together, in as few ``put_shares``
requests per server as MAX_WRITE allows (see :func:`put_group_bytes`)."""
UPLOADS = 6
"""Chunks of a batch uploaded alone at once: those the batch did not store whole."""
WINDOW = 2
"""Batches being stored at once (the next one's lookups overlap the uploads)."""


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

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""
        buf[:] = self.read(offset, len(buf))

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

    def readinto(self, offset: int, buf: memoryview) -> None:
        # (straight into the chunker's buffer, without the GIL)
        if os.preadv(self.fd, [buf], offset) != len(buf):
            raise GridError("the file changed size while being uploaded")
        if self.drop:
            os.posix_fadvise(self.fd, offset, len(buf), os.POSIX_FADV_DONTNEED)

    def runs(self, start: int, end: int) -> list[tuple[int, int]]:
        return data_runs(self.fd, start, end)


class _Reader:
    """[start, end) of a :class:`Content` as a stream, for the chunker."""

    def __init__(self, content: Content, start: int, end: int) -> None:
        self.content, self.at, self.end = content, start, end

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), self.end - self.at, 8 << 20)
        if n <= 0:
            return 0
        self.content.readinto(self.at, buf[:n])
        self.at += n
        return n


ZERO_BLOCK = 4096
ZERO_RUN = 16
"""Zero blocks in a row (64 KiB) that a chunk stores as a hole."""
_ZEROS = bytes(ZERO_BLOCK)


def _no_zero_run(data: bytes) -> bool:
    """Whether ``data`` surely has no run of ZERO_RUN zero blocks: every
    such run holds a block whose index is a multiple of ZERO_RUN, and these
    are nonzero (each comparison stops at its first nonzero byte, so random
    data costs a few bytes a block, not a scan of the chunk)."""
    for at in range(0, len(data), ZERO_RUN * ZERO_BLOCK):
        n = min(ZERO_BLOCK, len(data) - at)
        if data.startswith(_ZEROS if n == ZERO_BLOCK else _ZEROS[:n], at):
            return False
    return True


def split_zeros(data: bytes) -> list[tuple[int, int, bool]]:
    """``data`` as (offset, length, all_zeros) parts: its runs of at least
    ZERO_RUN zero blocks (of ZERO_BLOCK bytes from its start, the last one
    possibly short) are parts of their own, so that zeros written out in a
    file are holes as much as those it leaves unwritten."""
    if len(data) >= ZERO_RUN * ZERO_BLOCK and _no_zero_run(data):  # (fast)
        return [(0, len(data), False)]
    if data.count(0) == len(data):
        return [(0, len(data), True)]
    parts: list[tuple[int, int]] = []
    run_start, at = -1, 0
    for at in range(0, len(data), ZERO_BLOCK):
        block = data[at : at + ZERO_BLOCK]
        zero = block == _ZEROS[: len(block)]
        if zero and run_start < 0:
            run_start = at
        elif not zero and run_start >= 0:
            _cut(parts, run_start, at)
            run_start = -1
    if run_start >= 0:
        _cut(parts, run_start, len(data))
    out: list[tuple[int, int, bool]] = []
    pos = 0
    for a, b in parts:
        if a > pos:
            out.append((pos, a - pos, False))
        out.append((a, b - a, True))
        pos = b
    if pos < len(data):
        out.append((pos, len(data) - pos, False))
    return out


def _cut(parts: list[tuple[int, int]], a: int, b: int) -> None:
    if b - a >= ZERO_RUN * ZERO_BLOCK:
        parts.append((a, b))


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
        """An element per piece, in order: holes for zeros, chunks stored.
        The bytes of each piece are let go of once it is stored."""
        sizes = [len(p.data) for p in pieces]
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
        _let_go(pieces, caps)
        missing = [i for i in keys if i not in caps]
        most = put_group_bytes(self.grid.params.k)
        for group in _groups(missing, sizes, most):
            batched = await put_objects(
                self.grid, [(pieces[i].data, pieces[i].digest or b"") for i in group]
            )
            caps |= {i: cap for i, cap in zip(group, batched, strict=True) if cap is not None}
            _let_go(pieces, caps)
        limiter = trio.Semaphore(UPLOADS)

        async def upload(i: int) -> None:
            async with limiter:
                caps[i] = await upload_data(self.grid, pieces[i].data, pieces[i].digest)

        with plain_grid_errors():
            async with trio.open_nursery() as nursery:
                for i in missing:
                    if i not in caps:  # not stored whole by the batch: alone
                        nursery.start_soon(upload, i)
        self.uploaded += len(missing)
        await trio.to_thread.run_sync(self.index.add, {keys[i]: caps[i].to_string() for i in keys})
        if self.progress is not None:
            self.progress(sum(sizes))
        return [Chunk(caps[i]) if i in caps else Hole(sizes[i]) for i in range(len(pieces))]

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
        send, recv = trio.open_memory_channel[_Piece | None](1)

        def cut() -> None:
            # A closed channel: the store gave up (its error is the one raised).
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                _cut_into(send)

        def _cut_into(send: trio.MemorySendChannel[_Piece | None]) -> None:
            for ch in chunker().cut_stream(_Reader(content, start, end)):
                data = bytes(ch.data)
                for at, length, zero in split_zeros(data):
                    part = data[at : at + length] if length < len(data) else data
                    digest = None
                    if not zero:
                        hasher = PlaintextHasher()
                        hasher.update(part)
                        digest = hasher.digest()
                    piece = _Piece(start + ch.offset + at, part, digest)
                    trio.from_thread.run(send.send, piece)
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


def _let_go(pieces: list[_Piece], stored: dict[int, ReadCap]) -> None:
    """Drop the bytes of the pieces stored (a batch holds megabytes)."""
    for i in stored:
        if pieces[i].data:
            pieces[i] = _Piece(pieces[i].offset, b"", pieces[i].digest)


def put_group_bytes(k: int) -> int:
    """Chunk bytes to store together: what makes one ``put_shares`` per
    server (a share is a k-th of its chunk, plus its hashes), at most
    PUT_BYTES (memory)."""
    return min(PUT_BYTES, k * MAX_WRITE * 15 // 16)


def _groups(indexes: list[int], sizes: list[int], most: int) -> list[list[int]]:
    """``indexes`` in order, in groups of at most ``most`` bytes (or one)."""
    groups: list[list[int]] = []
    total = 0
    for i in indexes:
        if not groups or total + sizes[i] > most:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += sizes[i]
    return groups


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
