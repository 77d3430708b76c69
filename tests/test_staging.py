"""The mount's file-content state machine (daemon.staging), without FUSE: an
in-process client on a real grid, driven the way the FUSE adapter drives it."""

from __future__ import annotations

import contextlib
import errno
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from gridfs_daemon.files import OpenFile
from gridfs_daemon.segcache import SegmentCache
from gridfs_daemon.staging import Staging
from gridfs_daemon.view import View

from gridfs.client.grid import open_grid
from gridfs.client.session import TreeSession
from gridfs.config import NodeDir
from gridfs.dirnode import INLINE_MAX, Entry
from gridfs.localspace import LocalSpace

from .mountutil import mount_grid, mount_node  # noqa: F401 - fixtures

KiB, MiB = 1 << 10, 1 << 20


class FakeDaemon:
    """The daemon's part: flushes only when a test says so."""

    def __init__(self, node: Path) -> None:
        self.kicks = 0
        self.space = LocalSpace(node, limit=1 << 40)

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
        staging = Staging(FakeDaemon(node), session, view, SegmentCache(None, max_bytes=0), False)
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


async def uploaded(m: Mounted, name: str, data: bytes) -> None:
    of = await m.create(name)
    for off in range(0, len(data), MiB):
        await m.staging.write(of, off, data[off : off + MiB])
    await m.staging.release(of)
    await m.flush()


def upload_steps(m: Mounted) -> list[str]:
    return [s.kind for s in m.session.queue.pending() if s.kind.startswith("upload")]


def staged_bytes(of: OpenFile) -> int:
    """Disk the staging file of ``of`` takes."""
    assert of.staging is not None
    return os.fstat(of.staging).st_blocks * 512


def test_an_overwrite_stages_and_queues_only_the_range_written(mount_node: Path) -> None:  # noqa: F811
    data = bytearray(random.Random(2).randbytes(8 * MiB))

    async def main() -> None:
        with trio.fail_after(120):
            async with mounted(mount_node) as m:
                await uploaded(m, "big", bytes(data))
                of = await m.open("big")
                await m.staging.write(of, 3 * MiB + 10, b"x" * 4096)
                data[3 * MiB + 10 : 3 * MiB + 10 + 4096] = b"x" * 4096
                assert of.extents == [(3 * MiB + 10, 4096)]
                assert staged_bytes(of) <= 16 * KiB  # not a copy of the file
                assert await m.staging.read(of, 0, len(data)) == data  # the rest from the grid
                await m.staging.release(of)
                assert upload_steps(m) == ["upload_edit"]
                assert m.tempfile_bytes() <= 16 * KiB
                assert await m.contents("big") == data  # the queued edit over the grid's version
            async with mounted(mount_node) as m:  # (as after a crash: the queue resumes)
                assert await m.contents("big") == data
                await m.flush()
                assert upload_steps(m) == [] and await m.contents("big") == data

    trio.run(main)


def test_superseded_edits_fold_into_one_at_once(mount_node: Path) -> None:  # noqa: F811
    """200 small overwrites, each committed (fsync): one queued upload, whose
    tempfile holds about the ranges written, not 200 versions."""
    data = bytearray(random.Random(3).randbytes(4 * MiB))
    rng = random.Random(4)

    async def main() -> None:
        with trio.fail_after(120):
            async with mounted(mount_node) as m:
                await uploaded(m, "db", bytes(data))
                of = await m.open("db")
                for i in range(200):
                    off = MiB + rng.randrange(0, 64 * KiB)
                    chunk = i.to_bytes(4, "big") * 64
                    await m.staging.write(of, off, chunk)
                    data[off : off + len(chunk)] = chunk
                    await m.staging.commit(of)
                    assert len(upload_steps(m)) == 1
                assert m.tempfile_bytes() <= 128 * KiB
                [edit] = [s for s in m.session.queue.pending() if s.kind == "upload_edit"]
                assert sum(n for _, n in edit.args["extents"]) <= 64 * KiB + 256
                assert await m.staging.read(of, 0, len(data)) == data
                await m.staging.release(of)
                await m.flush()
                assert await m.contents("db") == data

    trio.run(main)


def test_edits_of_a_version_still_queued_wait_for_its_upload(mount_node: Path) -> None:  # noqa: F811
    data = bytearray(random.Random(5).randbytes(3 * MiB))

    async def main() -> None:
        with trio.fail_after(120):
            async with mounted(mount_node) as m:
                of = await m.create("new")
                await m.staging.write(of, 0, bytes(data))
                await m.staging.commit(of)  # a whole file, queued
                await m.staging.write(of, 100, b"edit")
                data[100:104] = b"edit"
                await m.staging.release(of)
                assert upload_steps(m) == ["upload_chk", "upload_edit"]
                assert await m.contents("new") == data
                await m.flush()
                assert upload_steps(m) == [] and await m.contents("new") == data

    trio.run(main)


def test_edits_truncate_extend_and_punch_holes(mount_node: Path) -> None:  # noqa: F811
    data = random.Random(6).randbytes(6 * MiB)

    async def main() -> None:
        with trio.fail_after(120):
            async with mounted(mount_node) as m:
                await uploaded(m, "f", data)
                of = await m.open("f")
                await m.staging.resize(of, 2 * MiB)
                await m.staging.resize(of, 5 * MiB)
                await m.staging.write(of, 4 * MiB, b"tail")
                await m.staging.fallocate(of, 0x01 | 0x02, 100, MiB)  # punch, keep size
                await m.staging.fallocate(of, 0, 6 * MiB, 100)  # extend
                await m.staging.fallocate(of, 0x01, 0, 10 * MiB)  # keep size: nothing
                expected = bytearray(data[: 2 * MiB] + bytes(4 * MiB + 100))
                expected[4 * MiB : 4 * MiB + 4] = b"tail"
                expected[100 : 100 + MiB] = bytes(MiB)
                assert of.size == len(expected)
                assert await m.staging.read(of, 0, 8 * MiB) == expected
                assert staged_bytes(of) <= 16 * KiB  # the hole takes no disk
                for mode in (0x08, 0x10, 0x02):  # collapse, zero range, punch alone
                    with pytest.raises(OSError) as e:
                        await m.staging.fallocate(of, mode, 0, 4096)
                    assert e.value.errno == errno.EOPNOTSUPP
                await m.staging.release(of)
                assert await m.contents("f") == expected
                await m.flush()
                assert await m.contents("f") == expected

    trio.run(main)


def test_a_folded_edit_that_grows_a_truncated_file_reads_zeros(mount_node: Path) -> None:  # noqa: F811
    """Version 1 truncates the grid's version, version 2 extends it again:
    folded into one edit of the grid's version, the regrown range is zeros,
    not the grid's old bytes."""
    data = random.Random(7).randbytes(6 * MiB)

    async def main() -> None:
        with trio.fail_after(120):
            async with mounted(mount_node) as m:
                await uploaded(m, "f", data)
                of = await m.open("f")
                await m.staging.resize(of, 2 * MiB)
                await m.staging.commit(of)
                await m.staging.resize(of, 4 * MiB)
                await m.staging.write(of, 3 * MiB, b"new")
                await m.staging.release(of)
                assert upload_steps(m) == ["upload_edit"]  # folded
                expected = bytearray(data[: 2 * MiB] + bytes(2 * MiB))
                expected[3 * MiB : 3 * MiB + 3] = b"new"
                assert await m.contents("f") == expected
                await m.flush()
                assert await m.contents("f") == expected

    trio.run(main)


def test_random_operations_match_a_local_file(mount_node: Path) -> None:  # noqa: F811
    """fsx-style: writes, truncations, extensions and punched holes at
    random, with commits, flushes and reopens between them, read back
    against a bytearray; then after a flush and in a new session."""
    rng = random.Random(8)
    model = bytearray(rng.randbytes(3 * MiB))

    async def main() -> None:
        nonlocal model
        with trio.fail_after(300):
            async with mounted(mount_node) as m:
                await uploaded(m, "f", bytes(model))
                of = await m.open("f")
                edited = 0
                for _ in range(300):
                    op = rng.choice(
                        ["write"] * 4
                        + ["truncate", "punch", "extend", "commit"] * 1
                        + ["flush", "reopen"]
                    )
                    if op == "write":
                        off = rng.randrange(0, len(model) + 64 * KiB)
                        data = rng.randbytes(rng.choice([1, 100, 4096, 70_000]))
                        await m.staging.write(of, off, data)
                        model.extend(bytes(max(0, off - len(model))))
                        model[off : off + len(data)] = data
                    elif op == "truncate":
                        size = rng.choice([rng.randrange(0, 20_000), rng.randrange(0, 4 * MiB)])
                        await m.staging.resize(of, size)
                        model = model[:size] + bytes(max(0, size - len(model)))
                    elif op == "punch" and model:
                        off = rng.randrange(0, len(model))
                        n = rng.randrange(1, 300_000)
                        await m.staging.fallocate(of, 0x03, off, n)
                        end = min(len(model), off + n)
                        model[off:end] = bytes(end - off)
                    elif op == "extend":
                        end = len(model) + rng.randrange(1, 200_000)
                        await m.staging.fallocate(of, 0, len(model) // 2, end - len(model) // 2)
                        model.extend(bytes(end - len(model)))
                    elif op == "commit":
                        await m.staging.commit(of)
                    elif op == "flush":
                        await m.staging.commit(of)
                        await m.flush()
                    elif op == "reopen":
                        await m.staging.release(of)
                        of = await m.open("f")
                    assert of.size == len(model), op
                    edited += of.extents is not None
                    off = rng.randrange(0, len(model) + 1)
                    n = rng.randrange(0, 200_000)
                    assert await m.staging.read(of, off, n) == model[off : off + n], op
                assert await m.staging.read(of, 0, len(model) + 1) == model
                assert edited > 50  # (staged as edits, not whole copies)
                await m.staging.release(of)
                assert await m.contents("f") == model
                await m.flush()
                assert await m.contents("f") == model
            async with mounted(mount_node) as m:
                assert await m.contents("f") == model

    trio.run(main)


def test_successive_edits_share_the_reader_of_their_base(mount_node: Path) -> None:  # noqa: F811
    """Each version a run of edits makes reads its unchanged ranges from
    the same version on the grid: through one reader (whose downloader has
    located the shares once), not a new one per version."""
    data = random.Random(9).randbytes(4 * MiB)

    async def main() -> None:
        with trio.fail_after(120):
            async with mounted(mount_node) as m:
                await uploaded(m, "f", data)
                of = await m.open("f")
                readers = []
                for i in range(4):
                    await m.staging.write(of, i * 4096, b"v" * 10)
                    assert await m.staging.read(of, MiB, 10) == data[MiB : MiB + 10]
                    origin = of.origin
                    base = getattr(origin, "base", origin)  # (a queued edit's base)
                    readers.append(getattr(base, "reader", None))
                    await m.staging.commit(of)
                assert readers[1] is not None and readers[1] is readers[2] is readers[3]
                await m.staging.release(of)

    trio.run(main)


def test_a_change_racing_the_cleanup_of_its_upload_still_lands(mount_node: Path) -> None:  # noqa: F811
    """A chmod of a file whose upload is stored and cleaned up while the chmod
    waits for the view: its queue step cannot name the ``local:`` upload any
    more, so it is made again with the cap the tree holds (it answered
    EAGAIN once in some 6 full test runs)."""
    data = random.Random(9).randbytes(3 * MiB)

    async def main() -> None:
        with trio.fail_after(120):
            async with mounted(mount_node) as m:
                of = await m.create("big")
                await m.staging.write(of, 0, data)
                await m.staging.release(of)
                entry = await m.view.lookup(("big",))
                assert entry is not None and entry.cap.startswith("local:")
                async with trio.open_nursery() as nursery, m.view.lock:
                    chmod = entry.with_(mode=0o600)
                    nursery.start_soon(m.staging.put_entry, ("big",), chmod, False)
                    await trio.sleep(0.1)  # it checked the upload, now waits
                    await m.session.queue.flush(m.session)  # stored, cleaned up
                await m.flush()
                fresh = await m.view.lookup(("big",))
                assert fresh is not None and fresh.mode & 0o777 == 0o600
                assert not fresh.cap.startswith("local:")
                assert await m.contents("big") == data

    trio.run(main)
