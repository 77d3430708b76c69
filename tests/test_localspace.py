"""gridfs.localspace on a real, small filesystem (a tmpfs), and the work
queue on a disk that fills up: one limit for staging, queue and cache;
the cache gives way first, writers wait for the queue, then ENOSPC; a full
disk never leaves the queue half-recorded."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from gridfs_daemon.segcache import SegmentCache

from gridfs.config import NodeConfig
from gridfs.dirnode import Entry
from gridfs.errors import GridError, UsageError
from gridfs.localspace import (
    LocalDiskError,
    LocalSpace,
    LocalSpaceError,
    default_limit,
    disk_errno,
    keep_free,
)
from gridfs.workqueue import QueueError, WorkQueue

from .tmpfsutil import fill, small_tmpfs

MiB = 1 << 20


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Path]:
    """A node directory on a 64 MiB filesystem of its own."""
    with small_tmpfs(tmp_path / "fs", "64m") as fs:
        (fs / "node" / "queues" / "q" / "tempfiles").mkdir(parents=True)
        (fs / "node" / "queues" / "q" / "staging").mkdir()
        yield fs / "node"


def write(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(nbytes))


def test_defaults_follow_the_disk() -> None:
    assert keep_free(64 * MiB) == 4 * MiB  # at least 4 MiB
    assert keep_free(80 << 30) == 1 << 30  # 1/50, at most 1 GiB
    assert default_limit(free=30 << 30, ours=10 << 30) == 20 << 30  # half of what it could use
    assert default_limit(free=10 << 40, ours=0) == 100 << 30
    assert default_limit(free=0, ours=0) == 16 * MiB


def test_staging_and_queue_are_measured_by_what_they_hold(node: Path) -> None:
    q = node / "queues" / "q"
    write(q / "staging" / "a", 3 * MiB)
    write(q / "tempfiles" / "b", 2 * MiB)
    with open(q / "staging" / "sparse", "wb") as f:
        f.truncate(1 << 30)  # a hole takes no room
    space = LocalSpace(node, limit=40 * MiB)
    u = space.usage()
    assert (u.staging, u.queue, u.cache) == (3 * MiB, 2 * MiB, 0)
    assert u.limit == 40 * MiB and 0 < u.disk_free < 64 * MiB and u.problem == ""
    assert (node / "cache" / "reserve").stat().st_size == space.ballast_size > 0


def test_the_cache_gives_way_to_writers(node: Path) -> None:
    async def main() -> None:
        space = LocalSpace(node, limit=20 * MiB)
        cache = SegmentCache(node / "cache" / "segments", space.limit)
        cache.admit = space.admit_cache
        space.attach_cache(cache)
        for i in range(16):
            await cache.put((f"cap{i}", 0), os.urandom(MiB))
        assert cache.disk_bytes >= 15 * MiB
        await space.reserve(12 * MiB)  # the oldest segments go
        assert cache.disk_bytes <= 8 * MiB + 4096
        assert ("cap15", 0) in cache and await cache.get(("cap0", 0)) is not None  # (memory)
        assert not (node / "cache" / "segments" / cache._name(("cap0", 0))).exists()
        # Staging grew meanwhile: a new segment takes the room of older ones...
        write(node / "queues" / "q" / "staging" / "big", 14 * MiB)
        space.measure()
        await cache.put(("new", 0), os.urandom(2 * MiB))
        assert (node / "cache" / "segments" / cache._name(("new", 0))).exists()
        assert space.used <= space.limit
        # ...and is not written at all where pending writes hold the room.
        write(node / "queues" / "q" / "staging" / "bigger", 6 * MiB)
        space.measure()
        await cache.put(("newer", 0), os.urandom(2 * MiB))
        assert not (node / "cache" / "segments" / cache._name(("newer", 0))).exists()
        assert await cache.get(("newer", 0)) is not None  # (in memory)

    trio.run(main)


def test_a_write_beyond_the_limit_with_nothing_queued_gets_enospc(node: Path) -> None:
    async def main() -> None:
        write(node / "queues" / "q" / "staging" / "a", 6 * MiB)
        space = LocalSpace(node, limit=8 * MiB, wait=60)
        await space.reserve(MiB)
        with pytest.raises(LocalSpaceError, match="local limit reached") as info:
            await space.reserve(3 * MiB)  # nothing queued could free room: no wait
        assert info.value.errno == errno.ENOSPC
        assert space.refused == 1 and "local limit reached" in space.usage().problem

    trio.run(main)


def test_a_writer_waits_for_the_queue_to_free_room(node: Path) -> None:
    tempfile = node / "queues" / "q" / "tempfiles" / "t"
    write(tempfile, 6 * MiB)
    kicked: list[bool] = []

    async def main() -> None:
        space = LocalSpace(node, limit=8 * MiB, wait=60, on_pressure=lambda: kicked.append(True))
        done = trio.Event()

        async def writer() -> None:
            await space.reserve(4 * MiB)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.sleep(1.2)  # (several measures: still no room)
            assert not done.is_set() and kicked and space.waits == 1
            tempfile.unlink()  # the queue uploaded it
            space.changed()
            with trio.fail_after(10):
                await done.wait()
        assert space.refused == 0

    trio.run(main)


def test_a_writer_gives_up_when_the_queue_makes_no_progress(node: Path) -> None:
    write(node / "queues" / "q" / "tempfiles" / "t", 6 * MiB)

    async def main() -> None:
        space = LocalSpace(node, limit=8 * MiB, wait=1.0)
        with pytest.raises(LocalSpaceError):
            await space.reserve(4 * MiB)

    trio.run(main)


def test_the_disk_bounds_writes_whatever_the_limit(node: Path) -> None:
    async def main() -> None:
        space = LocalSpace(node, limit=1 << 40)
        fill(node.parent / "filler")
        with pytest.raises(LocalSpaceError, match="local disk full"):
            await space.reserve(MiB)
        assert space.usage().problem.startswith("local disk full: ")
        assert "writes get ENOSPC" in space.usage().problem

    trio.run(main)


def test_sqlite_and_os_disk_errors_are_recognised(node: Path) -> None:
    db = sqlite3.connect(node / "x.sqlite", isolation_level=None)
    db.execute("CREATE TABLE t (x BLOB)")
    fill(node.parent / "filler")
    with pytest.raises(sqlite3.OperationalError) as info:
        db.execute("INSERT INTO t VALUES (?)", (os.urandom(MiB),))
    assert disk_errno(info.value) == errno.ENOSPC
    assert disk_errno(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert disk_errno(OSError(errno.EIO, "bad")) == errno.EIO
    assert (
        disk_errno(ExceptionGroup("g", [ValueError(), OSError(errno.EDQUOT, "q")])) == errno.ENOSPC
    )
    assert disk_errno(OSError(errno.ENOENT, "gone")) is None
    assert disk_errno(sqlite3.OperationalError("no such table: x")) is None


def test_the_ballast_lets_a_journal_change_through_a_full_disk(node: Path) -> None:
    queue = WorkQueue(node / "queues" / "q")
    space = LocalSpace(node, limit=1 << 40)
    assert (node / "cache" / "reserve").exists()
    fill(node.parent / "filler")
    big = "/".join(["x" * 200] * 1300)  # (a path of many pages of journal)

    def rm() -> int:
        return queue.add_deletepath("/partial-" + big)

    space.metadata(rm)  # the disk is full: the ballast goes, and it is done
    assert not (node / "cache" / "reserve").exists()
    assert [s.kind for s in queue.pending()] == ["deletepath"]
    assert "local disk full" in space.usage().problem
    # No ballast left: the next one gets a clear ENOSPC, and nothing half-recorded.
    fill(node.parent / "filler")
    with pytest.raises(LocalDiskError) as info:
        space.metadata(
            lambda: queue.add_file(None, "/b-" + big, Entry("file", "", 0, 0o644, 1, 1, data=b""))
        )
    assert info.value.errno == errno.ENOSPC
    assert [s.kind for s in queue.pending()] == ["deletepath"]
    (node.parent / "filler").unlink()  # room again: the ballast comes back
    space.metadata(lambda: queue.add_deletepath("/c"))
    space.ensure_ballast()
    assert (node / "cache" / "reserve").exists() and space.usage().problem == ""
    assert len(queue) == 2


class FailingExecutor:
    """An executor whose uploads fail (a server away), on a full disk."""

    tree = None

    async def upload(self, path: Path) -> str:
        raise GridError("no servers")

    def writing(self):  # type: ignore[no-untyped-def]
        import contextlib

        @contextlib.asynccontextmanager
        async def held():  # type: ignore[no-untyped-def]
            yield

        return held()


def test_recording_a_failure_on_a_full_disk_raises_the_failure(node: Path) -> None:
    """The issue's daemon died of `database or disk is full` in
    WorkQueue._record_failure: the step's own error is what must come out."""
    queue = WorkQueue(node / "queues" / "q")
    write(queue.tempfile_path("t"), 1000)
    entry = Entry("file", "", 1000, 0o644, 1, 1)
    queue.add_file(queue.tempfile_path("t"), "/f", entry)
    before = [(s.id, s.kind, s.args) for s in queue.pending()]
    fill(node.parent / "filler")
    with pytest.raises(QueueError, match="no servers"):
        trio.run(queue.flush, FailingExecutor())
    assert [(s.id, s.kind, s.args) for s in queue.pending()] == before
    (node.parent / "filler").unlink()
    with pytest.raises(QueueError, match="no servers"):
        trio.run(queue.flush, FailingExecutor())
    assert queue.pending()[0].attempts == 1  # recorded once there was room


def test_a_commit_that_fails_leaves_no_transaction_open(node: Path) -> None:
    queue = WorkQueue(node / "queues" / "q")
    fill(node.parent / "filler")
    with pytest.raises(sqlite3.OperationalError), queue.transaction():
        for i in range(64):
            queue.add_deletepath(f"/{i}-" + "y" * (64 << 10))
    assert not queue.db.in_transaction and len(queue) == 0
    (node.parent / "filler").unlink()
    with queue.transaction():
        queue.add_deletepath("/after")
    assert len(queue) == 1


def test_local_limit_is_a_size_or_auto() -> None:
    assert NodeConfig("client").local_limit_bytes() is None  # "auto"
    config = NodeConfig("client", local_limit="10G")
    assert config.local_limit_bytes() == 10 << 30
    again = NodeConfig.from_toml(config.to_toml())
    assert again.local_limit_bytes() == 10 << 30
    assert NodeConfig("client", local_limit=512 * MiB).local_limit_bytes() == 512 * MiB
    for bad in ("lots", 0, -1, "0", 1.5):
        with pytest.raises(UsageError, match="local_limit must be a size"):
            NodeConfig("client", local_limit=bad)  # type: ignore[arg-type]


def test_a_large_limit_does_not_make_a_long_copy_go_to_the_cache() -> None:
    """With the cache inside a 20 GiB local limit, a 1 GiB sequential read
    still stays in memory (its disk writes cost a cold read 15-20 %)."""
    cache = SegmentCache(None, 20 << 30)
    assert cache.is_scan(1 << 30) and cache.is_scan(300 * MiB)
    assert not cache.is_scan(200 * MiB)
    assert SegmentCache(None, 64 * MiB).is_scan(17 * MiB)
