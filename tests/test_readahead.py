"""The mount's reader: a sequential reader's read-ahead takes runs of
segments, one request per share for each run (against a real in-process grid)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import trio
from gridfs_daemon.files import CapReader, _runs
from gridfs_daemon.segcache import SegmentCache

from gridfs.caps import ReadCap
from gridfs.client.transfers import Transfers
from gridfs.client.upload import UploadParams

from .gridutil import open_broker, open_grid, upload_bytes

MiB = 1 << 20
K, N = 3, 10


def test_runs_are_consecutive_and_bounded() -> None:
    assert _runs([1, 2, 3, 4, 5, 7, 8, 10], 4) == [[1, 2, 3, 4], [5], [7, 8], [10]]
    assert _runs([], 4) == []


async def test_a_sequential_reader_reads_ahead_in_runs(tmp_path: Path, secret: bytes) -> None:
    data = random.Random(5).randbytes(16 * MiB)  # 16 segments
    with trio.fail_after(60):
        async with open_grid(tmp_path / "grid") as grid:
            async with open_broker(grid.addresses) as broker:
                params = UploadParams(K, 7, N, segment_size=MiB)
                report = await upload_bytes(broker, data, tmp_path, params, secret)
                cap = report.cap
                assert isinstance(cap, ReadCap)
                for node in grid.nodes:
                    node.behaviour.reads.clear()
                session: Any = SimpleNamespace(
                    grid=SimpleNamespace(broker=broker, transfers=Transfers())
                )
                reader = CapReader(session, cap, SegmentCache(None, max_bytes=0))
                async with trio.open_nursery() as nursery:  # (the reader's tasks live here)
                    try:
                        parts = [
                            await reader.read(off, MiB, nursery) for off in range(0, len(data), MiB)
                        ]
                    finally:
                        reader.close()
            assert b"".join(parts) == data
            reads = [r for node in grid.nodes for r in node.record_reads(cap.storage_index)]
            # segment by segment: 16 * K record reads; in runs of READ_RUN, far fewer
            assert len(reads) <= 16 * K // 2, len(reads)


@contextlib.asynccontextmanager
async def stored(
    tmp_path: Path, secret: bytes, data: bytes, segment_size: int
) -> AsyncIterator[tuple[Any, Any, ReadCap]]:
    """A real in-process grid holding ``data``: the grid, a session as a
    CapReader needs one, and the file's cap."""
    async with open_grid(tmp_path / "grid") as grid, open_broker(grid.addresses) as broker:
        params = UploadParams(K, 7, N, segment_size=segment_size)
        cap = (await upload_bytes(broker, data, tmp_path, params, secret)).cap
        assert isinstance(cap, ReadCap)
        yield grid, SimpleNamespace(grid=SimpleNamespace(broker=broker, transfers=Transfers())), cap


async def test_a_scan_stays_out_of_the_disk_cache(tmp_path: Path, secret: bytes) -> None:
    """A sequential read of a file larger than a quarter of the disk cache
    keeps what it fetches in memory, except the head read before it turned
    sequential; reads at random go to disk; keep_scans keeps everything.
    What a scan fetched ahead is never fetched again before it is read, even
    when the memory cache cannot hold the read-ahead window."""
    seg = 256 << 10
    data = random.Random(6).randbytes(16 * seg)  # 4 MiB: a scan for an 8 MiB cache
    with trio.fail_after(60):
        async with stored(tmp_path, secret, data, seg) as (grid, session, cap):

            async def run(
                keep_scans: bool, reads: list[tuple[int, int]], memory: int = 0
            ) -> tuple[set[int], int]:
                """The segments on disk after ``reads`` (offset, size) by a
                new reader, and the record reads the servers served."""
                for node in grid.nodes:
                    node.behaviour.reads.clear()
                directory = tmp_path / f"cache-{keep_scans}-{reads[1]}-{memory}"
                cache = SegmentCache(directory, 8 << 20, memory, keep_scans=keep_scans)
                reader = CapReader(session, cap, cache)
                async with trio.open_nursery() as nursery:
                    try:
                        for off, size in reads:
                            assert await reader.read(off, size, nursery) == data[off : off + size]
                    finally:
                        reader.close()
                segments = {int(p.name.rsplit(".", 1)[1]) for p in directory.iterdir()}
                served = [r for node in grid.nodes for r in node.record_reads(cap.storage_index)]
                return segments - {-1}, len(served)  # (-1: the segment size)

            sequential = [(j * seg, seg) for j in range(16)]
            assert (await run(False, sequential))[0] == {0}
            assert (await run(True, sequential))[0] == set(range(16))
            middles = [(j * seg + seg // 2, 100) for j in (9, 3, 12)]
            assert (await run(False, middles))[0] == {3, 9, 12}
            small_reads = [(off, 64 << 10) for off in range(0, len(data), 64 << 10)]
            _, kept = await run(True, small_reads, memory=seg)
            _, held = await run(False, small_reads, memory=seg)  # memory for one segment
            assert held <= kept, (held, kept)


async def test_a_reader_closed_during_a_read_lets_it_finish_then_lets_go(
    tmp_path: Path, secret: bytes
) -> None:
    """The mount closes a reader made for a version its file no longer names
    while another handle may still be reading through it: that read ends
    with the right bytes (also when it had not opened its downloader yet),
    the read-ahead it started ends too, and only then does the downloader go
    (one opened after close was kept, with its task, for good)."""
    seg = 256 << 10
    data = random.Random(7).randbytes(8 * seg)

    async def close_while(session: Any, cap: ReadCap, state: str) -> tuple[bytes, CapReader]:
        reader = CapReader(session, cap, SegmentCache(None, max_bytes=0))
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def read(off: int, size: int) -> None:
                got.append(await reader.read(off, size, nursery))

            if state == "reading ahead":  # two reads in order: it reads ahead
                await read(0, seg)
                await read(seg, seg)
                assert reader._fetching, "no read-ahead under way"
            else:
                nursery.start_soon(read, 0, len(data))
                await trio.sleep(0)  # the read is under way
                while state == "open" and reader._downloader is None:
                    await trio.sleep(0.001)
            reader.close()
        return b"".join(got), reader

    with trio.fail_after(60):
        async with stored(tmp_path, secret, data, seg) as (_, session, cap):
            for state in ("opening", "open", "reading ahead"):
                got, reader = await close_while(session, cap, state)
                assert got and got == data[: len(got)], state
                assert reader._downloader is None, state
