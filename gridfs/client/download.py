"""Downloading an immutable file: the seed's IDownloader over the grid.

Servers are asked for the file's shares in parallel; each share's head is
checked against the cap as it arrives, and work starts as soon as k shares
are usable, while the other answers keep coming in as spares.  A segment
needs one read per share (a record holds the block and its proofs), and a
sequential read takes the records of a few segments in one (they are
contiguous in a share).  Every block is verified before decoding, and a
server that errs, times out or serves corrupt data loses that share for the
rest of the download and is reported.  Segments stream in order with a
bounded number in flight, and any byte range can be read without fetching
the rest.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from ..aio import ordered_tasks
from ..caps import ReadCap, VerifyCap
from ..errors import CorruptShareError, GridError, NotEnoughSharesError
from ..immutable import DecodedSegment, FileDecoder, ForeignShareError, VerifiedBlock
from ..layout import HEADER
from ..net.calls import BadReplyError
from ..protocol.schema import MAX_READ
from .broker import Server, StorageBroker

log = logging.getLogger(__name__)
T = TypeVar("T")
HEAD_GUESS = 4096
LOCATE_TIMEOUT = 15.0
READ_TIMEOUT = 20.0
BATCH = 4
"""Segments a sequential read takes from each share in one request (a
request costs both sides about as much as a 350 KB record)."""
WHOLE_MAX = 4 * 1024 * 1024
"""(``whole``) A share up to this size is read in one request, head and records."""


@dataclass
class Source:
    """One share on one server."""

    server: Server
    sharenum: int
    size: int
    bad: str | None = None
    busy: int = 0
    data: bytes | None = None
    """(``whole``) the share's bytes, read with its head"""


@dataclass(frozen=True)
class Located:
    """Where one object's shares are, as a search for several objects at once
    found them (:mod:`gridfs.client.sharemap`): (server, share number, size)
    of each share, and the servers that search did not hear from, to be
    asked only if those shares do not serve."""

    shares: tuple[tuple[Server, int, int], ...]
    unasked: tuple[Server, ...]


@contextlib.asynccontextmanager
async def open_downloader(
    broker: StorageBroker,
    cap: ReadCap | VerifyCap,
    window: int = 4,
    lazy: bool = False,
    located: Located | None = None,
    whole: bool = False,
) -> AsyncIterator[Downloader]:
    """A downloader whose share search runs (in the background) while it lives.
    ``lazy``: ask the first k+1 servers in the file's order where its shares
    are and read the heads of k+1 shares only, asking and reading the others
    when those fail (a small file, such as a chunk, whose reads cost little
    beside the search).  ``located``: where the shares are, already known
    (lazy: no server is asked unless those fail; the heads of k shares are
    read, primary shares first).  ``whole``: read each share of at most
    WHOLE_MAX bytes in one request with its head (for reading all of a small
    file: one request per share instead of two)."""
    downloader = Downloader(broker, cap, window, lazy, whole, located)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(downloader._locate)
            try:
                yield downloader
            finally:
                nursery.cancel_scope.cancel()
    finally:
        downloader.release()


class Downloader:
    """Reads one immutable file; get one from :func:`open_downloader`."""

    def __init__(
        self,
        broker: StorageBroker,
        cap: ReadCap | VerifyCap,
        window: int = 4,
        lazy: bool = False,
        whole: bool = False,
        located: Located | None = None,
    ) -> None:
        self.broker = broker
        self.lazy = lazy or located is not None
        self.whole = whole
        self.located = located
        """where the shares are, known before (see :func:`open_downloader`)"""
        self._unread: list[Source] = []
        """(lazy) shares found whose heads are not read yet"""
        self._heads = 0
        """heads being read by the share search"""
        self._unasked: list[Server] = []
        """(lazy) servers not asked yet where their shares are"""
        self._ask: Callable[[Server], Awaitable[None]] | None = None
        self.cap = cap
        self.window = window
        self.decoder = FileDecoder(cap)
        self.sources: dict[int, list[Source]] = {}
        self.problems: list[str] = []
        self._changed = trio.Event()
        self._locating = True
        self._asking = 0
        """Lazy asks of the servers not asked at first, in progress (another
        segment's fetch may have started them)."""
        self.servers_asked = 0
        self.servers_answered = 0

    def release(self) -> None:
        """Let go of the shares read whole now, not when the garbage
        collector finds the downloader (its search closure refers to it)."""
        for srcs in self.sources.values():
            for source in srcs:
                source.data = None
        self._unread.clear()
        self._ask = None

    # -- finding shares -----------------------------------------------------
    def _usable(self) -> dict[int, list[Source]]:
        return {
            n: [s for s in srcs if not s.bad]
            for n, srcs in self.sources.items()
            if any(not s.bad for s in srcs)
        }

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def report(self, source: Source, reason: str) -> None:
        if source.bad is None:
            source.bad, source.data = reason, None
            msg = f"server {source.server.name}, share {source.sharenum}: {reason}"
            self.problems.append(msg)
            log.warning("%s", msg)
            self._wake()

    async def _locate(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ask every server; report ready once k shares are usable (or all answered)."""
        started = False

        def maybe_ready() -> None:
            nonlocal started
            if not started and len(self._usable()) >= self.cap.k:
                started = True
                task_status.started()

        async def ask(server: Server) -> None:
            try:
                with trio.fail_after(LOCATE_TIMEOUT):
                    shares = await server.calls.get_buckets(self.decoder.storage_index)
            except (GridError, trio.TooSlowError) as e:
                log.info("%s: %s", server.name, e)
                return
            self.servers_answered += 1
            for num, size in shares:
                if self.lazy and len(self._usable()) + self._heads > self.cap.k:
                    self._unread.append(Source(server, num, size))
                    continue
                self._heads += 1
                try:
                    await self._add_source(Source(server, num, size))
                finally:
                    self._heads -= 1
                maybe_ready()

        self._ask = ask
        if self.located is not None:
            await self._adopt(self.located)
            self._locating = False
            self._wake()
            started = True  # (asks made later, lazily, must not start it again)
            task_status.started()
            return
        servers = self.broker.permuted(self.decoder.storage_index)
        if self.lazy:  # the first k+1 in the file's order hold shares, normally
            servers, self._unasked = servers[: self.cap.k + 1], servers[self.cap.k + 1 :]
        try:
            async with trio.open_nursery() as nursery:
                for server in servers:
                    self.servers_asked += 1
                    nursery.start_soon(ask, server)
            if len(self._usable()) < self.cap.k and self._unasked:
                await self._ask_rest()
        finally:
            self._locating = False
            self._wake()
        if not started:
            started = True  # (asks made later, lazily, must not start it again)
            task_status.started()

    async def _adopt(self, located: Located) -> None:
        """Take shares found before: read the heads of k distinct shares
        (primary shares first), keep the others to read if those fail."""
        k = self.cap.k
        first: dict[int, Source] = {}
        rest: list[Source] = []
        for server, num, size in sorted(located.shares, key=lambda s: (s[1] >= k, s[1])):
            source = Source(server, num, size)
            if num not in first and len(first) < k:
                first[num] = source
            else:
                rest.append(source)
        self._unread = sorted(rest, key=lambda s: s.sharenum in first)  # new shares first
        self._unasked = list(located.unasked)
        async with trio.open_nursery() as nursery:
            for source in first.values():
                nursery.start_soon(self._add_source, source)

    async def _ask_rest(self) -> None:
        """(lazy) Ask the servers not asked yet where their shares are."""
        assert self._ask is not None
        servers, self._unasked = self._unasked, []
        self._asking += 1
        try:
            async with trio.open_nursery() as nursery:
                for server in servers:
                    self.servers_asked += 1
                    nursery.start_soon(self._ask, server)
        finally:
            self._asking -= 1
            self._wake()

    async def _add_source(self, source: Source) -> None:
        try:
            with trio.fail_after(READ_TIMEOUT):
                if self.whole and source.size <= WHOLE_MAX:
                    source.data = await self._read(source, 0, source.size)
                head = bytes(await self._part(source, 0, min(source.size, HEAD_GUESS)))
                length = FileDecoder.head_length(head[: HEADER.size])
                if length > len(head):
                    head += await self._part(source, len(head), length - len(head))
            num = self.decoder.accept_head(head[:length])
        except ForeignShareError:
            self.report(source, "holds a share of another file under this storage index")
            return
        except (GridError, trio.TooSlowError) as e:
            self.report(source, str(e) or "timed out")
            return
        if num != source.sharenum:
            self.report(source, f"share {source.sharenum} claims to be share {num}")
            return
        self.sources.setdefault(num, []).append(source)
        self._wake()

    async def _part(self, source: Source, offset: int, length: int) -> bytes | memoryview:
        """Bytes of a share: from what was read of it with its head (a view,
        not a copy) or, if nothing was, from its server."""
        if source.data is None:
            return await self._read(source, offset, length)
        data = memoryview(source.data)[offset : offset + length]
        if len(data) != length:
            raise CorruptShareError(source.sharenum, "share shorter than its head says")
        return data

    async def _read(self, source: Source, offset: int, length: int) -> bytes:
        si, num = self.decoder.storage_index, source.sharenum
        try:
            data = await source.server.calls.read(si, num, offset, length)
        except BadReplyError as e:
            raise CorruptShareError(num, str(e)) from None
        if len(data) != length:
            raise CorruptShareError(source.sharenum, "server returned a short or malformed read")
        return data

    async def _read_heads(self, count: int) -> None:
        """(lazy) Read the heads of ``count`` more shares found before."""
        batch, self._unread = self._unread[:count], self._unread[count:]
        async with trio.open_nursery() as nursery:
            for source in batch:
                nursery.start_soon(self._add_source, source)

    async def wait_located(self) -> None:
        """Wait until every server has answered (or timed out) about its shares."""
        while self._locating:
            await self._changed.wait()

    # -- segments -----------------------------------------------------------
    async def segment(self, j: int, have: dict[int, VerifiedBlock] | None = None) -> DecodedSegment:
        """Fetch, verify and decode segment j (``have``: blocks of it already
        verified, by share number, which need not be fetched again)."""
        k = self.cap.k
        blocks: dict[int, VerifiedBlock] = dict(have or {})
        offset, length = self.decoder.record_span(j)

        def verify(sharenum: int, data: bytes | memoryview) -> VerifiedBlock:
            return self.decoder.verify_record(sharenum, j, memoryview(data))

        while len(blocks) < k:
            choice = self._choose(k - len(blocks), exclude=set(blocks))
            if not choice and self._unread:
                await self._read_heads(k - len(blocks))
                continue
            if not choice and self._unasked:
                await self._ask_rest()
                continue
            if not choice:
                if self._locating or self._asking:
                    await self._changed.wait()
                    continue
                raise NotEnoughSharesError(
                    f"segment {j}: only {len(blocks) + len(self._usable()) - len(blocks)} "
                    f"usable shares, {k} needed"
                )
            blocks |= await self._fetch(choice, offset, length, verify)
        return await self._decode(j, [blocks[n] for n in sorted(blocks)[:k]])

    async def segments(self, first: int, count: int) -> list[DecodedSegment]:
        """Segments ``first`` .. ``first + count - 1``: from each of k shares,
        their records in one read.  A share whose source fails (bad, slow or
        gone) is replaced by another share's records, read the same way;
        what the good sources gave is kept.  When no whole share is left to
        read, the segments are finished one at a time, with fail-over."""
        k = self.cap.k
        choice = self._choose(k, exclude=set())
        if count == 1 or len(choice) < k:
            return [await self.segment(j) for j in range(first, first + count)]
        start = self.decoder.record_span(first)[0]
        last_offset, last_length = self.decoder.record_span(first + count - 1)
        span = last_offset + last_length - start

        def verify(sharenum: int, data: bytes | memoryview) -> list[VerifiedBlock]:
            view = memoryview(data)  # records and blocks are views of it, not copies
            out = []
            for j in range(first, first + count):
                offset, length = self.decoder.record_span(j)
                record = view[offset - start : offset - start + length]
                out.append(self.decoder.verify_record(sharenum, j, record))
            return out

        records = await self._fetch(choice, start, span, verify)
        while len(records) < k:
            choice = self._choose(k - len(records), exclude=set(records))
            if not choice:
                return [
                    await self.segment(j, {num: got[i] for num, got in records.items()})
                    for i, j in enumerate(range(first, first + count))
                ]
            records |= await self._fetch(choice, start, span, verify)
        nums = sorted(records)[:k]
        return [
            await self._decode(j, [records[n][i] for n in nums])
            for i, j in enumerate(range(first, first + count))
        ]

    async def _fetch(
        self,
        sources: list[Source],
        offset: int,
        length: int,
        verify: Callable[[int, bytes | memoryview], T],
    ) -> dict[int, T]:
        """Read the same bytes of several shares at once and check each
        (``verify(sharenum, data)``, in a thread): share number → result,
        for the sources that neither erred, timed out nor served bad data
        (those are reported)."""
        results: dict[int, T] = {}

        async def one(source: Source) -> None:
            source.busy += 1
            try:
                with trio.fail_after(READ_TIMEOUT):
                    data = await self._part(source, offset, length)
                results[source.sharenum] = await trio.to_thread.run_sync(
                    verify, source.sharenum, data
                )
            except trio.TooSlowError:
                self.report(source, "timed out")
            except GridError as e:
                self.report(source, str(e))
            finally:
                source.busy -= 1

        async with trio.open_nursery() as nursery:
            for source in sources:
                nursery.start_soon(one, source)
        return results

    async def _decode(self, j: int, chosen: list[VerifiedBlock]) -> DecodedSegment:
        decoded = await trio.to_thread.run_sync(self.decoder.decode_segment, j, chosen)
        self._report_proofs(decoded)
        return decoded

    def _report_proofs(self, decoded: DecodedSegment) -> None:
        for num in decoded.bad_proofs:
            for source in self.sources.get(num, []):
                self.report(source, f"bad ciphertext proof in record {decoded.index}")

    def _choose(self, count: int, exclude: set[int]) -> list[Source]:
        """``count`` sources of distinct shares: primary shares first (they
        decode for free), then the least busy server."""
        options = []
        for num, srcs in self._usable().items():
            if num not in exclude:
                best = min(srcs, key=lambda s: s.busy)
                options.append((num >= self.cap.k, best.busy, num, best))
        options.sort(key=lambda o: o[:3])
        return [o[3] for o in options[:count]]

    # -- whole file and ranges ---------------------------------------------
    async def stream(
        self, write: Callable[[bytes], Awaitable[None]], offset: int = 0, length: int | None = None
    ) -> None:
        """Call ``write`` with the bytes of [offset, offset+length) in order."""
        size = self.cap.size
        end = size if length is None else min(size, offset + length)
        if offset >= end:
            return
        while self.decoder.geometry is None and (self._unread or self._unasked):
            if self._unread:  # (lazy) the heads read failed
                await self._read_heads(self.cap.k)
            else:
                await self._ask_rest()
        if self.decoder.geometry is None:
            raise NotEnoughSharesError(
                f"no usable share found: {self.servers_answered} of {self.servers_asked} "
                f"servers answered, {len(self.problems)} shares were bad"
            )
        params = self.decoder.geometry.params
        seg = params.segment_size
        first, last = offset // seg, (end - 1) // seg
        record = self.decoder.geometry.proof_size + params.block_size
        batch = max(1, min(BATCH, MAX_READ // record))

        async def emit(run: list[DecodedSegment]) -> None:
            for decoded in run:
                start = decoded.index * seg
                lo = max(offset, start) - start
                hi = min(end, start + len(decoded.data)) - start
                await write(decoded.data[lo:hi])

        if self.whole:
            run = await self._whole_run(first, last + 1 - first)
            if run is not None:
                await emit(run)
                return

        def job(j: int) -> Callable[[], Awaitable[list[DecodedSegment]]]:
            return lambda: self.segments(j, min(batch, last + 1 - j))

        jobs = (job(j) for j in range(first, last + 1, batch))
        send, recv = trio.open_memory_channel[list[DecodedSegment]](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ordered_tasks, jobs, max(2, self.window // batch), send)
            async with recv:
                async for decoded_run in recv:
                    await emit(decoded_run)

    async def _whole_run(self, first: int, count: int) -> list[DecodedSegment] | None:
        """(whole) Segments ``first`` .. ``first + count - 1`` from k shares
        read whole: every record verified and every segment decoded in one
        thread, not one per share and segment.  None when fewer than k such
        shares are usable or one fails (it is reported, and the caller reads
        as usual, choosing other shares)."""
        wholes = [(s, s.data) for s in self._choose(self.cap.k, exclude=set()) if s.data]
        if len(wholes) < self.cap.k:
            return None
        segments = range(first, first + count)

        def verify(source: Source, data: bytes) -> list[VerifiedBlock]:
            view, out = memoryview(data), []
            for j in segments:
                offset, length = self.decoder.record_span(j)
                if offset + length > len(view):
                    raise CorruptShareError(source.sharenum, "share shorter than its head says")
                out.append(
                    self.decoder.verify_record(source.sharenum, j, view[offset : offset + length])
                )
            return out

        def work() -> tuple[list[DecodedSegment], list[tuple[Source, str]]]:
            blocks, failed = {}, []
            for source, data in wholes:
                try:
                    blocks[source.sharenum] = verify(source, data)
                except GridError as e:
                    failed.append((source, str(e)))
            if failed:
                return [], failed
            nums = sorted(blocks)
            decoded = [
                self.decoder.decode_segment(j, [blocks[n][i] for n in nums])
                for i, j in enumerate(segments)
            ]
            return decoded, []

        decoded, failed = await trio.to_thread.run_sync(work)
        for source, why in failed:
            self.report(source, why)
        for segment in decoded:
            self._report_proofs(segment)
        return None if failed else decoded

    async def read(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []

        async def collect(data: bytes) -> None:
            parts.append(data)

        await self.stream(collect, offset, length)
        return b"".join(parts)
