"""Edits through a real mount cost what they change locally: only the
ranges written are staged and queued, superseded versions fold at once,
fallocate punches holes; all of it survives kill -9 and a remount."""

from __future__ import annotations

import errno
import os
import random
import re
from pathlib import Path

import pytest

from gridfs.sparse import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import Grid, K, Mount, N, gridfs  # noqa: E402

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
KiB, MiB = 1 << 10, 1 << 20
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def queued_bytes(node: Path) -> int:
    """Disk the node's queue tempfiles and staging files take (allocated blocks)."""
    total = 0
    for d in [*node.glob("queues/*/tempfiles"), *node.glob("queues/*/staging")]:
        for p in d.iterdir():
            total += p.stat().st_blocks * 512
    return total


def upload_steps(node: Path) -> int:
    out = gridfs("queue", "--node", node).stdout
    return len(re.findall(r"^\S+: +\d+ upload_", out, re.M))


def stored_bytes(grid: Grid) -> int:
    """Bytes the storage servers hold (shares, leases, everything)."""
    return sum(p.stat().st_size for p in grid.dir.glob("storage-*/storage/**/*") if p.is_file())


def uploaded(m: Mount, name: str, data: bytes) -> Path:
    path = m.mountpoint / name
    path.write_bytes(data)
    m.flush()
    return path


def fsynced_write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_an_overwrite_queues_only_the_change_and_survives_kill9(fresh_mount: Mount) -> None:
    data = bytearray(random.Random(1).randbytes(16 * MiB))
    path = uploaded(fresh_mount, "big", bytes(data))
    fsynced_write(path, 5 * MiB + 7, b"e" * 4096)
    data[5 * MiB + 7 : 5 * MiB + 7 + 4096] = b"e" * 4096
    fresh_mount.kill9()  # at once: the edit is queued, not uploaded
    assert "upload_edit" in fresh_mount.pending_kinds()
    assert queued_bytes(fresh_mount.node) <= 64 * KiB  # not a 16 MiB copy
    fresh_mount.mount()  # resumes the queue
    assert path.read_bytes() == data
    fresh_mount.flush()
    fresh_mount.remount()
    assert path.read_bytes() == data


def test_fsynced_overwrites_fold_into_one_pending_edit(
    mount_grid: Grid, fresh_mount: Mount
) -> None:
    """200 small overwrites of a file, each fsynced: the queue keeps about
    one dirty range of tempfile bytes, and the servers receive a few
    versions, not 200."""
    size = 4 * MiB
    data = bytearray(random.Random(2).randbytes(size))
    path = uploaded(fresh_mount, "db", bytes(data))
    before = stored_bytes(mount_grid)
    rng = random.Random(3)
    fd = os.open(path, os.O_RDWR)
    try:
        for i in range(200):
            off = MiB + rng.randrange(0, 64 * KiB)
            chunk = i.to_bytes(4, "big") * 64
            os.pwrite(fd, chunk, off)
            os.fsync(fd)
            data[off : off + len(chunk)] = chunk
    finally:
        os.close(fd)
    fresh_mount.kill9()
    assert queued_bytes(fresh_mount.node) <= 512 * KiB
    assert upload_steps(fresh_mount.node) <= 2
    fresh_mount.mount()
    assert path.read_bytes() == data
    fresh_mount.flush()
    assert path.read_bytes() == data
    # Every version uploaded costs size * N / K on the servers: a few, not 200.
    assert stored_bytes(mount_grid) - before <= 20 * size * N // K


def test_fallocate_extends_keeps_size_and_punches_holes(fresh_mount: Mount) -> None:
    data = bytearray(random.Random(4).randbytes(8 * MiB))
    path = uploaded(fresh_mount, "img", bytes(data))
    fd = os.open(path, os.O_RDWR)
    try:
        fallocate(fd, 0, 9 * MiB, MiB)  # allocate past the end: extends
        data += bytes(2 * MiB)
        assert os.fstat(fd).st_size == 10 * MiB
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 20 * MiB)
        assert os.fstat(fd).st_size == 10 * MiB
        fallocate(fd, PUNCH, 2 * MiB, 3 * MiB)
        data[2 * MiB : 5 * MiB] = bytes(3 * MiB)
        assert os.pread(fd, 4 * MiB, MiB) == data[MiB : 5 * MiB]
        for mode in (0x08, FALLOC_FL_PUNCH_HOLE):  # collapse range; punch without keep-size
            with pytest.raises(OSError) as e:
                fallocate(fd, mode, 0, 4096)
            assert e.value.errno == errno.EOPNOTSUPP
        os.fsync(fd)
    finally:
        os.close(fd)
    fresh_mount.kill9()
    assert queued_bytes(fresh_mount.node) <= 64 * KiB  # the hole and the extension take nothing
    fresh_mount.mount()
    assert path.read_bytes() == data
    fresh_mount.flush()
    fresh_mount.remount()
    assert path.read_bytes() == data


def test_edits_while_renamed_unlinked_or_truncated(fresh_mount: Mount) -> None:
    mp = fresh_mount.mountpoint
    a = bytearray(random.Random(5).randbytes(3 * MiB))
    b = random.Random(6).randbytes(3 * MiB)
    uploaded(fresh_mount, "a", bytes(a))
    uploaded(fresh_mount, "b", b)
    uploaded(fresh_mount, "c", b)
    with open(mp / "a", "r+b") as f:  # renamed while open and edited
        f.seek(MiB)
        f.write(b"before")
        os.rename(mp / "a", mp / "renamed")
        f.seek(2 * MiB)
        f.write(b"after")
        f.truncate(2 * MiB + 100)
    a[MiB : MiB + 6] = b"before"
    a[2 * MiB : 2 * MiB + 5] = b"after"
    del a[2 * MiB + 100 :]
    with open(mp / "b", "r+b") as f:  # unlinked while open: still readable, never uploaded
        f.write(b"gone")
        os.unlink(mp / "b")
        f.seek(0)
        assert f.read(8) == b"gone" + b[4:8]
    with open(mp / "c", "wb") as f:  # O_TRUNC of an uploaded file
        f.write(b"short")
    fresh_mount.flush()
    fresh_mount.remount()
    assert sorted(os.listdir(mp)) == ["c", "renamed"]
    assert (mp / "renamed").read_bytes() == a
    assert (mp / "c").read_bytes() == b"short"
