"""The mount's segment cache on its own: memory, disk, bounds, damage."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from gridfs_daemon.segcache import SegmentCache

from .helpers import filesystem_type, resident_pages

CAP = "gridfs:chk:" + "a" * 52 + ":" + "b" * 52 + ":3:10:5000000"


async def test_segments_come_back_from_memory_then_from_disk(tmp_path: Path) -> None:
    cache = SegmentCache(tmp_path / "c", max_bytes=10 << 20, memory_bytes=1 << 20)
    data = [os.urandom(300_000) for _ in range(6)]
    for j, d in enumerate(data):
        await cache.put((CAP, j), d)
    assert await cache.get((CAP, 5)) == data[5]
    assert cache.hits["memory"] == 1
    assert await cache.get((CAP, 0)) == data[0]  # evicted from memory, found on disk
    assert cache.hits["disk"] == 1
    assert await cache.get((CAP, 9)) is None and cache.hits["miss"] == 1
    # The cap (it holds the read key) never appears in a file name.
    assert all(CAP[11:30] not in p.name for p in (tmp_path / "c").iterdir())


async def test_the_disk_cache_survives_a_restart_and_stays_bounded(tmp_path: Path) -> None:
    cache = SegmentCache(tmp_path / "c", max_bytes=1_000_000, memory_bytes=0)
    for j in range(10):
        await cache.put((CAP, j), bytes([j]) * 200_000)
    assert cache.disk_bytes <= 1_000_000
    on_disk = sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    assert on_disk == cache.disk_bytes
    again = SegmentCache(tmp_path / "c", max_bytes=1_000_000, memory_bytes=0)
    assert await again.get((CAP, 9)) == bytes([9]) * 200_000  # the newest survive
    assert await again.get((CAP, 0)) is None  # the oldest were evicted
    smaller = SegmentCache(tmp_path / "c", max_bytes=300_000, memory_bytes=0)
    assert smaller.disk_bytes <= 300_000  # a lower bound applies at once


async def test_a_damaged_or_torn_file_is_a_miss(tmp_path: Path) -> None:
    cache = SegmentCache(tmp_path / "c", max_bytes=10 << 20, memory_bytes=0)
    await cache.put((CAP, 0), b"x" * 1000)
    await cache.put((CAP, 1), b"y" * 1000)
    files = sorted((tmp_path / "c").iterdir())
    blob = bytearray(files[0].read_bytes())
    blob[-1] ^= 1
    files[0].write_bytes(bytes(blob))
    files[1].write_bytes(files[1].read_bytes()[:500])
    (tmp_path / "c" / "leftover.tmp").write_bytes(b"half")
    again = SegmentCache(tmp_path / "c", max_bytes=10 << 20, memory_bytes=0)
    assert await again.get((CAP, 0)) is None and await again.get((CAP, 1)) is None
    assert list((tmp_path / "c").iterdir()) == []  # damaged files and leftovers removed


async def test_size_zero_keeps_nothing_on_disk(tmp_path: Path) -> None:
    cache = SegmentCache(tmp_path / "c", max_bytes=0)
    await cache.put((CAP, 0), b"z" * 100)
    assert await cache.get((CAP, 0)) == b"z" * 100  # memory only
    assert not (tmp_path / "c").exists()


async def test_files_of_another_format_are_misses(tmp_path: Path) -> None:
    """A file with the former SHA-256 head, or too short for a head, is
    fetched again, not served."""
    cache = SegmentCache(tmp_path / "c", max_bytes=10 << 20, memory_bytes=0)
    await cache.put((CAP, 0), b"x" * 1000)
    await cache.put((CAP, 1), b"y" * 1000)
    first, second = sorted((tmp_path / "c").iterdir(), key=lambda p: p.name)
    first.write_bytes(hashlib.sha256(b"x" * 1000).digest() + b"x" * 1000)
    second.write_bytes(b"gsc")
    again = SegmentCache(tmp_path / "c", max_bytes=10 << 20, memory_bytes=0)
    assert await again.get((CAP, 0)) is None and await again.get((CAP, 1)) is None


async def test_written_files_leave_the_page_cache_one_file_later(tmp_path: Path) -> None:
    """A long read writes many segments once: their pages are let go of
    (behind the newest) instead of filling the page cache."""
    if filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("a memory filesystem keeps its pages: they are the data")
    cache = SegmentCache(tmp_path / "c", max_bytes=100 << 20, memory_bytes=0)
    segments = [os.urandom(1 << 20) for _ in range(3)]
    for j, data in enumerate(segments):
        await cache.put(("cap", j), data)
        os.sync()  # (its writeback done, as it nearly always is one file later)
    residency = sorted(resident_pages(f) for f in (tmp_path / "c").iterdir())
    assert len(residency) == 3 and residency[:2] == [0, 0]  # (the newest may stay)
    assert [await cache.get(("cap", j)) for j in range(3)] == segments  # back from disk
    # A file read back leaves the page cache too: the mount's pages hold it now.
    assert [resident_pages(f) for f in (tmp_path / "c").iterdir()] == [0, 0, 0]


async def test_what_is_kept_in_memory_only_never_reaches_the_disk(tmp_path: Path) -> None:
    cache = SegmentCache(tmp_path / "c", max_bytes=4 << 20)
    assert cache.is_scan((1 << 20) + 1) and not cache.is_scan(1 << 20)  # a quarter of the cache
    assert not SegmentCache(tmp_path / "k", max_bytes=4 << 20, keep_scans=True).is_scan(1 << 30)
    await cache.put((CAP, 0), b"scan" * 1000, disk=False)
    await cache.put((CAP, 1), b"kept" * 1000)
    assert await cache.get((CAP, 0)) == b"scan" * 1000  # from memory
    assert sorted(p.name.rsplit(".", 1)[1] for p in (tmp_path / "c").iterdir()) == ["1"]
