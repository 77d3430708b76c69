"""A mount on a small disk (issue 15 §3): one limit for staging, queue and
cache; writers see backpressure, then ENOSPC; a full disk never kills the
daemon, ``rm`` of a partly written file works, and everything resumes
once there is room.  Real servers, a real mount, the node on a 64 MiB
tmpfs."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import Grid, Mount, gridfs, mounted, outside, pid_alive, wait_for  # noqa: E402
from .tmpfsutil import fill, small_tmpfs  # noqa: E402

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
MiB = 1 << 20


@pytest.fixture
def small_node(mount_grid: Grid, tmp_path: Path) -> Iterator[Path]:
    """A client node alone on a 64 MiB filesystem."""
    with small_tmpfs(tmp_path / "disk", "64m") as disk:
        yield mount_grid.new_node(disk)


def local(m: Mount) -> dict[str, Any]:
    """The mount's local-space status (gridfs status --json)."""
    out = gridfs("status", "--no-servers", "--json", "--node", m.node).stdout
    mounts = json.loads(out)["mounts"]
    assert len(mounts) == 1, out
    return dict(mounts[0]["local"])


def failed_flushes(m: Mount) -> int:
    out = gridfs("status", "--no-servers", "--json", "--node", m.node).stdout
    return int(json.loads(out)["mounts"][0]["failed_flushes"])


def write_fd(fd: int, most: int) -> tuple[int, int | None]:
    """Write ``fd`` in 1 MiB pieces until an error or ``most`` bytes:
    (bytes written, errno of the error)."""
    written = 0
    while written < most:
        try:
            written += os.write(fd, os.urandom(MiB))
        except OSError as e:
            return written, e.errno
    return written, None


def write_until_enospc(path: Path, most: int) -> tuple[int, int | None]:
    """Write ``path`` (then close it) in 1 MiB pieces until an error or
    ``most`` bytes: (bytes written, errno of the error)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written, code = write_fd(fd, most)
        if code is not None:
            return written, code
    finally:
        try:
            os.close(fd)
        except OSError as e:
            return written, e.errno
    return written, None


def test_a_full_disk_gives_enospc_and_the_mount_carries_on(
    mount_grid: Grid, small_node: Path, tmp_path: Path
) -> None:
    disk = small_node.parent
    with mounted(small_node, tmp_path / "mnt", "refresh=1,space_wait=5") as m:
        keep = os.urandom(3 * MiB)
        (m.mountpoint / "keep").write_bytes(keep)
        m.flush()
        # The default limit is half the disk: the writer is stopped there
        # (and keeps its file open, as a writer that handles ENOSPC would).
        fd = os.open(m.mountpoint / "big", os.O_WRONLY | os.O_CREAT, 0o644)
        written, code = write_fd(fd, 200 * MiB)
        assert code == errno.ENOSPC and 8 * MiB <= written < 40 * MiB
        st = local(m)
        assert st["limit"] < 40 * MiB and "writes get ENOSPC" in st["problem"]
        assert pid_alive(m.pid or 0)
        # Now something else fills the disk: the mount still answers.
        fill(disk / "filler")
        assert (m.mountpoint / "keep").read_bytes() == keep
        assert (m.mountpoint / "keep").stat().st_size == len(keep)
        assert sorted(os.listdir(m.mountpoint)) == ["big", "keep"]
        # (The servers are paused: were the queue to upload "big" meanwhile,
        # the writer would rightly wait for that room and get it.)
        servers = list(mount_grid.storage_pids().values())
        for pid in servers:
            os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(OSError) as info:
                (m.mountpoint / "more").write_bytes(os.urandom(2 * MiB))
        finally:
            for pid in servers:
                os.kill(pid, signal.SIGCONT)
        assert info.value.errno == errno.ENOSPC
        status = m.status()
        assert "local disk full: " in status and "writes get ENOSPC" in status, status
        assert "of limit" in status
        # rm of the partly written file works on the full disk.
        (m.mountpoint / "big").unlink()
        os.close(fd)
        (m.mountpoint / "more").unlink(missing_ok=True)
        assert sorted(os.listdir(m.mountpoint)) == ["keep"]
        assert pid_alive(m.pid or 0)
        # Room again: writes and the queue resume by themselves.
        (disk / "filler").unlink()
        after = os.urandom(5 * MiB)
        (m.mountpoint / "after").write_bytes(after)
        wait_for(lambda: m.queue_length() == 0, timeout=60, what="the queue to drain")
        assert outside(mount_grid, small_node, "cat", "t:/after") == after
        assert b"big" not in outside(mount_grid, small_node, "ls", "t:/")
        wait_for(lambda: local(m)["problem"] == "", timeout=30, what="the problem to clear")
    out = gridfs("status", "--no-servers", "--node", small_node).stdout  # (no mount)
    assert "no mount of" in out and "local disk: " in out and " free on disk" in out


def test_a_failure_recorded_on_a_full_disk_does_not_kill_the_daemon(
    mount_grid: Grid, small_node: Path, tmp_path: Path
) -> None:
    """The issue: `database or disk is full` in WorkQueue._record_failure
    ended the daemon, and every program on the mount got ENOTCONN."""
    disk = small_node.parent
    with mounted(small_node, tmp_path / "mnt") as m:
        (m.mountpoint / "first").write_bytes(b"1" * 300_000)
        m.flush()
        assert (m.mountpoint / "first").read_bytes() == b"1" * 300_000  # (cached)
        mount_grid.kill_servers(1, 2, 3)  # 2 of 5 left: every upload fails
        try:
            data = os.urandom(2 * MiB)
            (m.mountpoint / "pending").write_bytes(data)
            wait_for(lambda: failed_flushes(m) >= 1, timeout=60, what="the upload to fail")
            fill(disk / "filler")
            # The flusher tries again, fails, and cannot record the failure.
            before = failed_flushes(m)
            wait_for(lambda: failed_flushes(m) > before, timeout=60, what="another failure")
            assert pid_alive(m.pid or 0), m.log()
            assert (m.mountpoint / "first").read_bytes() == b"1" * 300_000
            assert (m.mountpoint / "pending").read_bytes() == data
            assert "local disk full" in m.status()
        finally:
            mount_grid.start()
        (disk / "filler").unlink()
        wait_for(lambda: m.queue_length() == 0, timeout=90, what="the queue to drain")
        assert outside(mount_grid, small_node, "cat", "t:/pending") == data
        assert pid_alive(m.pid or 0)


def test_cache_size_evicts_the_cache_then_holds_writers_back(
    mount_grid: Grid, mount_node: Path, tmp_path: Path
) -> None:
    options = "refresh=1,cache_size=24M,cache_scans,space_wait=300"
    with mounted(mount_node, tmp_path / "mnt", options) as m:
        data = os.urandom(14 * MiB)
        (m.mountpoint / "read").write_bytes(data)
        m.flush()
        m.remount()  # (the next open reads from the grid, through the cache)
        assert (m.mountpoint / "read").read_bytes() == data
        # (a chunk fetched ahead goes to the cache just after its reader has it)
        wait_for(lambda: local(m)["cache"] >= 12 * MiB, timeout=30, what="the cache to fill")
        assert local(m)["limit"] == 24 * MiB
        assert "of limit 24 MiB" in m.status()
        # A write needs the room: the cache gives way.  (The servers are
        # paused: nothing uploads.)
        servers = list(mount_grid.storage_pids().values())
        for pid in servers:
            os.kill(pid, signal.SIGSTOP)
        result: list[tuple[int, int | None]] = []
        try:
            written, code = write_until_enospc(m.mountpoint / "w1", 14 * MiB)
            assert (written, code) == (14 * MiB, None)
            st = local(m)
            assert st["cache"] <= 10 * MiB and st["queue"] >= 14 * MiB
            # A second writer waits for the queue...
            writer = threading.Thread(
                target=lambda: result.append(write_until_enospc(m.mountpoint / "w2", 14 * MiB))
            )
            writer.start()
            wait_for(lambda: local(m)["waits"] >= 1, timeout=60, what="the writer to wait")
            assert not result and writer.is_alive()
        finally:
            for pid in servers:  # ...which uploads once the servers are back
                os.kill(pid, signal.SIGCONT)
        writer.join(timeout=120)
        assert result == [(14 * MiB, None)], m.log()
        assert local(m)["refused"] == 0
        # More than the limit at once, with nothing queued: ENOSPC at once.
        m.flush()
        written, code = write_until_enospc(m.mountpoint / "huge", 64 * MiB)
        assert code == errno.ENOSPC and written < 24 * MiB
        (m.mountpoint / "huge").unlink()
        m.flush()
        assert (m.mountpoint / "w2").stat().st_size == 14 * MiB
