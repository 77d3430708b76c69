"""The mount's file-content state machine (daemon.staging), without FUSE: an
in-process client on a real grid, driven the way the FUSE adapter drives it."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import trio
from gridfs_daemon.files import OpenFile
from gridfs_daemon.segcache import SegmentCache
from gridfs_daemon.staging import Staging
from gridfs_daemon.view import View

from gridfs.client.grid import open_grid
from gridfs.client.session import TreeSession
from gridfs.config import NodeDir
from gridfs.dirnode import INLINE_MAX, Entry

from .mountutil import mount_grid, mount_node  # noqa: F401 - fixtures

KiB, MiB = 1 << 10, 1 << 20


class FakeDaemon:
    """The daemon's part: flushes only when a test says so."""

    def __init__(self) -> None:
        self.kicks = 0

    def kick(self) -> None:
        self.kicks += 1

    async def wait_synced(self) -> None:
        raise AssertionError("not with sync=False")


class Mounted:
    """A Staging, as a mount has it, plus what a test needs around it."""

    def __init__(self, staging: Staging) -> None:
        self.staging = staging
        self.session = staging.session
        self.view = staging.view
        self._ino = 100

    async def create(self, name: str) -> OpenFile:
        entry = Entry("file", "", 0, 0o644, 1, 1, data=b"")
        await self.staging.put_entry((name,), entry, sync=False)
        self._ino += 1
        return await self.staging.create(self._ino, (name,), entry)

    async def open(self, name: str, truncate: bool = False) -> OpenFile:
        entry = await self.view.lookup((name,))
        assert entry is not None, name
        ino = next((i for i, of in self.staging.open_files.items() if of.path == (name,)), None)
        if ino is None:
            self._ino += 1
            ino = self._ino
        return await self.staging.open(ino, (name,), entry, truncate)

    async def flush(self) -> None:
        await self.session.queue.flush(self.session)
        await self.view.rebuild()

    async def contents(self, name: str) -> bytes:
        of = await self.open(name)
        try:
            return await self.staging.read(of, 0, of.size + 1)
        finally:
            await self.staging.release(of)

    def tempfile_bytes(self) -> int:
        """Bytes the queue's tempfiles take on disk (allocated blocks)."""
        return sum(p.stat().st_blocks * 512 for p in self.session.queue.tempfiles.iterdir())


@contextlib.asynccontextmanager
async def mounted(node: Path) -> AsyncIterator[Mounted]:
    async with open_grid(NodeDir(node)) as grid:
        await grid.wait_for_servers()
        session = TreeSession(grid, "grid")
        view = View(session)
        await view.rebuild()
        staging = Staging(FakeDaemon(), session, view, SegmentCache(None, max_bytes=0), False)
        async with trio.open_nursery() as nursery:
            staging.nursery = nursery
            yield Mounted(staging)
            nursery.cancel_scope.cancel()
        session.queue.close()


def test_writes_commit_and_read_back_across_sessions(mount_node: Path) -> None:  # noqa: F811
    small, big = b"tiny", random.Random(1).randbytes(3 * MiB + 5)

    async def main() -> None:
        with trio.fail_after(120):
            async with mounted(mount_node) as m:
                for name, data in (("small", small), ("big", big)):
                    of = await m.create(name)
                    for off in range(0, len(data), 128 * KiB):
                        await m.staging.write(of, off, data[off : off + 128 * KiB])
                    assert await m.staging.read(of, 0, len(data)) == data
                    await m.staging.release(of)
                entry = await m.view.lookup(("big",))
                assert entry is not None and entry.cap.startswith("local:")
                assert await m.contents("big") == big  # from the queue's tempfile
                await m.flush()
                assert len(m.session.queue) == 0
            async with mounted(mount_node) as m:
                entry = await m.view.lookup(("big",))
                assert entry is not None and not entry.cap.startswith("local:")
                assert await m.contents("big") == big
                assert await m.contents("small") == small

    trio.run(main)


def test_truncate_and_extend_read_zeros_beyond_the_old_end(mount_node: Path) -> None:  # noqa: F811
    data = os.urandom(INLINE_MAX * 4)

    async def main() -> None:
        with trio.fail_after(120):
            async with mounted(mount_node) as m:
                of = await m.create("f")
                await m.staging.write(of, 0, data)
                await m.staging.release(of)
                await m.flush()
                of = await m.open("f")
                await m.staging.resize(of, 1000)
                await m.staging.resize(of, 5000)
                await m.staging.write(of, 6000, b"end")
                expected = data[:1000] + bytes(5000) + b"end"
                assert await m.staging.read(of, 0, 10_000) == expected
                await m.staging.release(of)
                assert await m.contents("f") == expected
                await m.flush()
                assert await m.contents("f") == expected
                of = await m.open("f", truncate=True)
                assert of.size == 0 and await m.staging.read(of, 0, 100) == b""
                await m.staging.release(of)
                await m.flush()
                assert await m.contents("f") == b""

    trio.run(main)
