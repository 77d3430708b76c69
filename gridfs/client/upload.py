"""Uploading an immutable file: the seed's IUploader over the grid.

1. Key and parameters: a convergent key needs one pass over the file.
2. Placement: servers in the file's permuted order are asked in parallel to
   take one share each; those that refuse, are full or unreachable are
   skipped; when servers run out, willing ones take more than one share.
3. Streaming: segments are read and encoded on worker threads and their
   blocks written to every bucket at once, a few segments' blocks per
   request and a few such batches in flight; a bucket whose server fails
   is dropped without stopping the others.
4. Finish: each share gets its head (header, extension block, chain) and
   record proofs, then ``close``.  Shares that failed are placed again on
   other servers and re-sent (encoding only those shares).
5. Happiness: the upload succeeds only if its shares sit on at least
   ``happy`` distinct servers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..aio import in_thread, ordered_tasks
from ..caps import LITERAL_MAX, ChunkedCap, LiteralCap, ReadCap
from ..codec import DEFAULT_K, DEFAULT_N, DEFAULT_SEGMENT_SIZE, params_for_size
from ..errors import GridError, plain_grid_errors
from ..fileutil import drop_cache
from ..hashes import convergence_key
from ..immutable import FileEncoder, FinishedFile, encode_shares
from ..offline import file_key
from ..protocol.schema import MAX_CHUNKS, MAX_WRITE
from .broker import Server, StorageBroker

log = logging.getLogger(__name__)
RESEND_ROUNDS = 3
SMALL_FILE = 256 * 1024
"""Below this, hashing and encoding run inline: a worker thread costs more."""
SMALL_SHARE = 1024 * 1024
"""Shares up to this size go in one put_share request each."""
Progress = Callable[[int], None]


Offer = Callable[[int, "Server"], Awaitable["Bucket | None"]]


class UnhappyError(GridError):
    """The shares could not be spread over enough distinct servers."""

    exit_code = 4


@dataclass(frozen=True)
class UploadParams:
    k: int = DEFAULT_K
    happy: int = 7
    n: int = DEFAULT_N
    segment_size: int = DEFAULT_SEGMENT_SIZE
    window: int = 2
    """Batches being written to the servers at once."""
    batch: int = 4
    """Segments whose blocks go to a server in one write request (within
    the wire's limits): a request costs each side about half a millisecond
    of Python, a 1 MiB segment's block of 3-of-10 is only 350 KB."""
    workers: int = 2
    """Threads encoding segments."""


@dataclass
class Bucket:
    """One share on its way to one server."""

    sharenum: int
    server: Server
    existing: bool = False
    """The server already held this share (a deduplicated upload)."""
    error: str | None = None

    def fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
            log.warning("share %d on %s failed: %s", self.sharenum, self.server.name, reason)


@dataclass
class UploadReport:
    cap: LiteralCap | ReadCap | ChunkedCap
    placements: dict[int, str] = field(default_factory=dict)
    """share number → server name"""
    servers: int = 0
    failures: list[str] = field(default_factory=list)


async def upload_file(
    broker: StorageBroker,
    path: Path,
    params: UploadParams = UploadParams(),
    secret: bytes | None = None,
    progress: Progress | None = None,
    drop: bool = False,
    digest: bytes | None = None,
    literal: bool = True,
) -> UploadReport:
    """Store the file at ``path`` on the grid.  ``drop``: the file is read
    once (a queue's tempfile), let the page cache go of it behind the reads.
    ``digest``: its plaintext hash (:class:`PlaintextHasher`) when the caller
    already knows it, which saves a pass over the file.  ``literal``: a
    file of at most LITERAL_MAX bytes becomes a literal cap (else a CHK
    object like any other: chunks and manifests are always stored)."""
    size = os.stat(path).st_size
    if size <= LITERAL_MAX and literal:
        return UploadReport(LiteralCap(Path(path).read_bytes()))
    codec = params_for_size(params.k, params.n, params.segment_size, size)
    if digest is not None and secret is not None:
        key = convergence_key(secret, codec.serialize(), digest)
    elif size <= SMALL_FILE:  # a thread costs more than hashing a small file
        key = file_key(path, secret, codec.serialize())
    else:
        key = await trio.to_thread.run_sync(file_key, path, secret, codec.serialize(), drop)
    encoder = FileEncoder(key, codec, size)
    if len(broker.servers) < params.happy:  # fail before storing anything
        raise UnhappyError(
            f"shares could be placed on only {len(broker.servers)} distinct servers, "
            f"{params.happy} needed ({len(broker.servers)} servers known)"
        )
    with plain_grid_errors():
        if encoder.geometry.share_size <= SMALL_SHARE:
            with open(path, "rb") as f:
                data = f.read()
            return await _Upload(broker, -1, encoder, params, progress).run_small(data)
        with open(path, "rb") as f:
            return await _Upload(broker, f.fileno(), encoder, params, progress, drop).run()


class _Upload:
    def __init__(
        self,
        broker: StorageBroker,
        fd: int,
        encoder: FileEncoder,
        params: UploadParams,
        progress: Progress | None,
        drop: bool = False,
    ) -> None:
        self.broker = broker
        self.fd = fd
        self.encoder = encoder
        self.params = params
        self.progress = progress
        self.si = encoder.storage_index
        self.geometry = encoder.geometry
        self.refused: set[bytes] = set()
        self.failures: list[str] = []
        self.drop = drop
        """let the page cache go of the file behind the reads"""

    async def run(self) -> UploadReport:
        n = self.params.n
        buckets = await self.place(list(range(n)), avoid=set())
        try:
            self._check_happy(buckets.values(), before=True)
            await self.stream(buckets, encode_all=True)
            finished = await trio.to_thread.run_sync(self.encoder.finish)
            await self.finish(finished, buckets)
            for _ in range(RESEND_ROUNDS):
                failed = [b.sharenum for b in buckets.values() if b.error]
                if not failed:
                    break
                self.failures += [
                    f"{b.server.name}: {b.error}" for b in buckets.values() if b.error
                ]
                good = {num: b for num, b in buckets.items() if not b.error}
                moved = await self.place(failed, avoid={b.server.node_id for b in good.values()})
                if not moved:
                    break
                await self.stream(moved, encode_all=False)
                await self.finish(finished, moved)
                buckets = good | moved
        except BaseException:
            await self._abort_all(buckets.values())
            raise
        good_buckets = [b for b in buckets.values() if not b.error]
        self._check_happy(good_buckets, before=False)
        return UploadReport(
            finished.cap,
            {b.sharenum: b.server.name for b in good_buckets},
            len({b.server.node_id for b in good_buckets}),
            self.failures,
        )

    def _check_happy(self, buckets: object, before: bool) -> None:
        placed = [b for b in buckets if not b.error]  # type: ignore[attr-defined]
        distinct = len({b.server.node_id for b in placed})
        if distinct < self.params.happy:
            when = "could be placed" if before else "were stored"
            known = len(self.broker.servers)
            why = f"; e.g. {self.failures[0]}" if self.failures else ""
            raise UnhappyError(
                f"shares {when} on only {distinct} distinct servers, {self.params.happy} needed "
                f"({known} servers known{why})"
            )

    # -- placement ----------------------------------------------------------
    async def place(
        self, sharenums: list[int], avoid: set[bytes], offer: Offer | None = None
    ) -> dict[int, Bucket]:
        """Find a server for each share: one share per server while fresh
        servers last, then more on the willing ones.  ``offer`` asks one
        server to take one share (default: allocate a bucket)."""
        offer = offer or self._allocate
        placed: dict[int, Bucket] = {}
        pending = list(sharenums)
        servers = [s for s in self.broker.permuted(self.si) if s.node_id not in avoid]
        while pending:
            usable = [s for s in servers if s.node_id not in self.refused]
            holding = {b.server.node_id for b in placed.values()}
            fresh = [s for s in usable if s.node_id not in holding]
            pool = fresh or usable
            if not pool:
                break
            results: dict[int, Bucket] = {}

            async def ask(num: int, server: Server, results: dict[int, Bucket]) -> None:
                try:
                    bucket = await offer(num, server)
                except GridError as e:
                    log.info("%s refused share %d: %s", server.name, num, e)
                    self.failures.append(f"{server.name}: {e}")
                    bucket = None
                if bucket is None:
                    self.refused.add(server.node_id)
                else:
                    results[num] = bucket

            async with trio.open_nursery() as nursery:
                for num, server in zip(pending, pool, strict=False):
                    nursery.start_soon(ask, num, server, results)
            placed |= results
            pending = [num for num in pending if num not in results]
            if not results and not fresh:
                break
        return placed

    async def _allocate(self, num: int, server: Server) -> Bucket | None:
        size, (renew, cancel) = self.geometry.share_size, server.lease_secrets(self.si)
        async for _ in _while_busy():
            allocation = await server.calls.allocate_buckets(self.si, [num], size, renew, cancel)
            if num in allocation.already:
                return Bucket(num, server, existing=True)
            if num in allocation.allocated:
                return Bucket(num, server)
        return None

    async def run_small(self, data: bytes) -> UploadReport:
        """A file whose shares fit in one request: encode it whole, then one
        ``put_share`` per server stores, checks and closes each share."""
        if len(data) > SMALL_FILE:
            encoded = await trio.to_thread.run_sync(encode_shares, self.encoder, data)
        else:
            encoded = encode_shares(self.encoder, data)
        finished, shares = encoded

        async def put(num: int, server: Server) -> Bucket | None:
            async for _ in _while_busy():
                renew, cancel = server.lease_secrets(self.si)
                put = await server.calls.put_share(self.si, num, shares[num], renew, cancel)
                if put.stored or put.already:
                    return Bucket(num, server, existing=put.already)
            return None

        buckets = await self.place(list(range(self.params.n)), set(), put)
        good = list(buckets.values())
        self._check_happy(good, before=False)
        if self.progress is not None:
            self.progress(self.geometry.size)
        return UploadReport(
            finished.cap,
            {b.sharenum: b.server.name for b in good},
            len({b.server.node_id for b in good}),
            self.failures,
        )

    # -- data ---------------------------------------------------------------
    async def stream(self, buckets: dict[int, Bucket], encode_all: bool) -> None:
        """Encode every segment and write its blocks to the buckets being written."""
        g = self.geometry
        writing = sorted(num for num, b in buckets.items() if not b.existing)
        if not writing and not encode_all:
            return
        seg = g.params.segment_size

        def job(j: int) -> Callable[[], dict[int, bytes]]:
            def encode() -> dict[int, bytes]:
                data = os.pread(self.fd, g.segment_size(j), j * seg)
                if len(data) != g.segment_size(j):
                    raise GridError("the file changed size while being uploaded")
                if self.drop:
                    drop_cache(self.fd, j * seg, len(data))
                if encode_all:
                    return dict(enumerate(self.encoder.encode_segment(j, data).blocks))
                return dict(zip(writing, self.encoder.blocks_for(j, data, writing), strict=True))

            return encode

        jobs = (in_thread(job(j)) for j in range(g.num_segments))
        send, recv = trio.open_memory_channel[dict[int, bytes]](0)
        window = trio.Semaphore(self.params.window)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ordered_tasks, jobs, self.params.workers, send)
            batch: list[tuple[int, dict[int, bytes]]] = []
            j = 0
            async with recv:
                async for blocks in recv:
                    batch.append((j, blocks))
                    j += 1
                    if len(batch) == self.params.batch or j == g.num_segments:
                        await window.acquire()
                        nursery.start_soon(self._send_batch, batch, buckets, window)
                        batch = []

    async def _send_batch(
        self,
        batch: list[tuple[int, dict[int, bytes]]],
        buckets: dict[int, Bucket],
        window: trio.Semaphore,
    ) -> None:
        """Write the blocks of some consecutive segments, each bucket's in
        as few requests as the wire's limits allow."""
        g = self.geometry
        offsets = [g.record_span(j)[0] + g.proof_size for j, _ in batch]
        try:
            async with trio.open_nursery() as nursery:
                for num, bucket in buckets.items():
                    if bucket.existing or bucket.error:
                        continue
                    chunks = [(off, b[num]) for off, (_, b) in zip(offsets, batch, strict=True)]
                    nursery.start_soon(self._write_all, bucket, chunks)
        finally:
            window.release()
        if self.progress is not None:
            self.progress(sum(g.segment_size(j) for j, _ in batch))

    async def _write_all(self, bucket: Bucket, chunks: list[tuple[int, bytes]]) -> None:
        for request in write_batches(chunks):
            await self._write(bucket, request)

    async def _write(self, bucket: Bucket, chunks: list[list[object]]) -> None:
        if bucket.error:
            return
        try:
            await bucket.server.calls.write(self.si, bucket.sharenum, chunks)
        except GridError as e:
            bucket.fail(str(e))

    async def finish(self, finished: FinishedFile, buckets: dict[int, Bucket]) -> None:
        """Write each share's head and proofs, then close it."""
        g = self.geometry

        async def one(bucket: Bucket) -> None:
            num = bucket.sharenum
            chunks = [(0, finished.head(num))]
            chunks += [
                (g.record_span(j)[0], finished.record_proofs(num, j)) for j in range(g.num_segments)
            ]
            await self._write_all(bucket, chunks)
            if bucket.error:
                return
            try:
                await bucket.server.calls.close(self.si, num)
            except GridError as e:
                bucket.fail(str(e))

        async with trio.open_nursery() as nursery:
            for bucket in buckets.values():
                if not bucket.existing and not bucket.error:
                    nursery.start_soon(one, bucket)

    async def _abort_all(self, buckets: object) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            for bucket in buckets:  # type: ignore[attr-defined]
                if not bucket.existing and bucket.server.connected:
                    with contextlib.suppress(GridError):
                        await bucket.server.calls.abort(self.si, bucket.sharenum, timeout=2)


async def _while_busy(patience: float = 30.0) -> AsyncIterator[None]:
    """Attempts at a share the server says someone else is writing right now
    (often the same file uploaded twice at once: convergent encryption); once
    that upload closes, the server answers "already"."""
    deadline = trio.current_time() + patience
    delay = 0.05
    yield
    while trio.current_time() < deadline:
        await trio.sleep(delay)
        delay = min(delay * 2, 1.0)
        yield


def write_batches(chunks: list[tuple[int, bytes]]) -> list[list[list[object]]]:
    """Group (offset, data) chunks into write requests within the wire limits."""
    out: list[list[list[object]]] = []
    batch: list[list[object]] = []
    size = 0
    for offset, data in chunks:
        if batch and (len(batch) >= MAX_CHUNKS or size + len(data) > MAX_WRITE):
            out.append(batch)
            batch, size = [], 0
        batch.append([offset, data])
        size += len(data)
    if batch:
        out.append(batch)
    return out
