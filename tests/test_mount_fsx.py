"""fsx-style test (issue 15 §5): random writes, truncates, hole punches,
mmap reads and writes, reads, fsyncs and remounts of one file on the mount
and of a local file must leave both with the same size and bytes after every
step; and once the queue has drained, the grid holds at most 3 x the file's
size x n/k (plus a small fixed allowance): old versions are let go of, and
the current one is not stored bloated.

The node keeps no snapshot but the current tree (``snapshot_keep = 1``,
``snapshot_retention = 0``): with the default ten snapshots, what the grid
holds is bounded by the snapshot policy, not by how a file is stored.

Hole punching (``fallocate(PUNCH_HOLE | KEEP_SIZE)``) is compared only where
the mount supports it: while it answers EOPNOTSUPP, the step is skipped on
both sides, so the test gets stronger, not red, when the mount learns it."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import Grid, K, Mount, N, gridfs, mounted, outside  # noqa: E402

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

MiB = 1 << 20
LIMIT = 3 * MiB
"""Largest offset written or truncated to: a few 1 MiB segments (and chunks)."""
ALLOWANCE = 256 << 10
"""Grid bytes allowed beyond 3 x size x n/k.  Measured: the tree's root slot
(~300 B per server) and a small directory object (~360 B per share), with n
servers and shares each, take ~3.3 KiB, and every stored object (a file, a
chunk, a manifest) adds ~300 B of header and hash-tree proofs per share,
~1.5 KiB per object at n = 5.  256 KiB covers the directories and ~160
objects: a file of LIMIT + 256 KiB cut into chunks of ~20 KiB.  It is far
below one superseded version of a file of a few hundred KiB, which a version
that is not let go of would add."""
NAME = "f"
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE | KEEP_SIZE): zeros in [offset, offset + length)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def punch_local(fd: int, offset: int, length: int) -> None:
    """The same on the local file, by writing zeros where the local file
    system cannot punch (the bytes are what is compared)."""
    try:
        punch_hole(fd, offset, length)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        end = min(offset + length, os.fstat(fd).st_size)
        if end > offset:
            os.pwrite(fd, bytes(end - offset), offset)


def contents(fd: int) -> tuple[int, bytes]:
    size = os.fstat(fd).st_size
    return size, os.pread(fd, size + 1, 0)


def stored_on_grid(grid: Grid) -> int:
    """Bytes of every share and slot on the grid's servers (their files on disk)."""
    total = 0
    for d in grid.dir.glob("storage-*/storage"):
        for sub in ("shares", "slots"):
            for dirpath, _, names in os.walk(d / sub):
                total += sum(os.stat(os.path.join(dirpath, n)).st_size for n in names)
    return total


def flush(mount: Mount) -> None:
    gridfs("queue", "flush", "--node", mount.node, timeout=120)
    assert mount.queue_length() == 0


offsets = st.one_of(
    st.sampled_from([0, 1, 4095, 4096, 16_383, 16_384, MiB - 1, MiB, MiB + 1, 2 * MiB]),
    st.integers(0, LIMIT),
)
lengths = st.one_of(st.sampled_from([1, 4096, 65_536, MiB]), st.integers(1, 200_000))
blobs = st.tuples(st.integers(1, 200_000), st.randoms(use_true_random=False)).map(
    lambda t: t[1].randbytes(t[0])
)
small_blobs = st.binary(min_size=1, max_size=9000)


def make_machine(
    grid: Grid, mount: Mount, local_base: Path, baseline: int, seen: dict[str, int]
) -> type[RuleBasedStateMachine]:
    class FsxMatchesLocal(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            name = f"x-{uuid.uuid4().hex[:8]}"
            self.rel = f"{name}/{NAME}"
            self.mnt_dir, self.local_dir = mount.mountpoint / name, local_base / name
            self.mnt_dir.mkdir()
            self.local_dir.mkdir()
            self.fds: dict[str, int] = {}
            self.open(os.O_CREAT)

        def open(self, flags: int = 0) -> None:
            for key, d in (("mnt", self.mnt_dir), ("local", self.local_dir)):
                self.fds[key] = os.open(d / NAME, os.O_RDWR | flags, 0o644)

        def close(self) -> None:
            for fd in self.fds.values():
                os.close(fd)
            self.fds = {}

        def teardown(self) -> None:
            """Every example ends with the queue drained and a remount: the
            file must have come through both; then, once it is removed and
            the queue flushed, the grid must be back to where it started
            (nothing of any version left behind)."""
            self.check_drained()
            self.remount_now()
            self.same_size_and_bytes()
            self.close()
            (self.mnt_dir / NAME).unlink()
            self.mnt_dir.rmdir()
            flush(mount)
            left = stored_on_grid(grid) - baseline
            assert left <= ALLOWANCE, f"{left} bytes left on the grid after rm and flush"

        def remount_now(self) -> None:
            self.close()
            mount.remount()
            self.open()
            seen["remount"] = seen.get("remount", 0) + 1

        def check_drained(self) -> None:
            """Drain the queue: the grid then holds the file as it is here,
            and not much more than it."""
            self.both("fsync")
            flush(mount)
            size, data = contents(self.fds["local"])
            assert outside(grid, mount.node, "cat", f"t:/{self.rel}") == data
            stored = stored_on_grid(grid) - baseline
            bound = 3 * size * N / K + ALLOWANCE
            assert stored <= bound, f"{stored} bytes on the grid for a file of {size}"
            seen["drain"] = seen.get("drain", 0) + 1

        def both(self, op: str, *args: int | bytes) -> None:
            for key in ("local", "mnt"):
                getattr(os, op)(self.fds[key], *args)

        @rule(offset=offsets, data=blobs)
        def write(self, offset: int, data: bytes) -> None:
            self.both("pwrite", data, offset)

        @rule(offset=offsets, data=small_blobs)
        def write_small(self, offset: int, data: bytes) -> None:
            self.both("pwrite", data, offset)

        @rule(size=offsets)
        def truncate(self, size: int) -> None:
            self.both("ftruncate", size)

        @rule(offset=offsets, length=lengths)
        def punch(self, offset: int, length: int) -> None:
            try:
                punch_hole(self.fds["mnt"], offset, length)
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                seen["punch unsupported"] = seen.get("punch unsupported", 0) + 1
                return  # not yet supported by the mount: the local file is left alone too
            seen["punch"] = seen.get("punch", 0) + 1
            punch_local(self.fds["local"], offset, length)

        def mapped(self, key: str) -> mmap.mmap:
            return mmap.mmap(self.fds[key], os.fstat(self.fds[key]).st_size)

        @precondition(lambda self: os.fstat(self.fds["local"]).st_size > 0)
        @rule(offset=offsets, data=small_blobs)
        def mmap_write(self, offset: int, data: bytes) -> None:
            for key in ("local", "mnt"):
                with self.mapped(key) as m:
                    at = offset % len(m)
                    piece = data[: len(m) - at]
                    m[at : at + len(piece)] = piece
                    m.flush()
            seen["mmap write"] = seen.get("mmap write", 0) + 1

        @precondition(lambda self: os.fstat(self.fds["local"]).st_size > 0)
        @rule(offset=offsets, length=lengths)
        def mmap_read(self, offset: int, length: int) -> None:
            got = []
            for key in ("local", "mnt"):
                with self.mapped(key) as m:
                    at = offset % len(m)
                    got.append(m[at : at + length])
            assert got[1] == got[0]

        @rule(offset=offsets, length=lengths)
        def read(self, offset: int, length: int) -> None:
            expected = os.pread(self.fds["local"], length, offset)
            assert os.pread(self.fds["mnt"], length, offset) == expected

        @rule()
        def fsync(self) -> None:
            self.both("fsync")

        @rule()
        def reopen(self) -> None:
            """Close (the mount commits the file) and open again."""
            self.close()
            self.open()

        @rule(dice=st.integers(0, 3))
        def remount(self, dice: int) -> None:
            """Now and then, unmount and mount the same tree again: what is
            read afterwards comes from the grid (or the node's queue)."""
            if dice == 0:
                self.remount_now()

        @rule(dice=st.integers(0, 3))
        def drain(self, dice: int) -> None:
            if dice == 0:
                self.check_drained()

        @invariant()
        def same_size_and_bytes(self) -> None:
            size, data = contents(self.fds["local"])
            assert os.stat(self.mnt_dir / NAME).st_size == size
            got_size, got = contents(self.fds["mnt"])
            assert got_size == size
            assert got == data

    return FsxMatchesLocal


@pytest.fixture
def lean_mount(mount_grid: Grid, tmp_path: Path) -> Iterator[Mount]:
    """A fresh tree on a node that keeps no snapshot but the current tree."""
    node = mount_grid.new_node(tmp_path)
    config = node / "gridfs.toml"
    text, n = re.subn(
        r"(?m)^snapshot_retention = .*$", "snapshot_retention = 0.0", config.read_text()
    )
    text, m = re.subn(r"(?m)^snapshot_keep = .*$", "snapshot_keep = 1", text)
    assert n == m == 1, text
    config.write_text(text)
    with mounted(node, tmp_path / "mnt") as mount:
        yield mount


def test_fsx_against_a_local_file(mount_grid: Grid, lean_mount: Mount, tmp_path: Path) -> None:
    flush(lean_mount)
    baseline = stored_on_grid(mount_grid)
    local = tmp_path / "local"
    local.mkdir()
    seen: dict[str, int] = {}
    run_state_machine_as_test(
        make_machine(mount_grid, lean_mount, local, baseline, seen),
        settings=settings(
            max_examples=int(os.environ.get("GRIDFS_FSX_EXAMPLES", "6")),
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print(f"fsx steps: {seen}")  # (pytest -s shows what was exercised)
    assert seen["remount"] > 0 and seen["drain"] > 0  # (every example ends with both)
