"""The mount's reader: a sequential reader's read-ahead takes runs of
segments, one request per share for each run (against a real in-process grid)."""

from __future__ import annotations

import random
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
