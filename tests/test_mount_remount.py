"""Unmount and mount again at once (issue 15 §4): ``gridfs umount`` returns
only once the daemon has drained or journaled its queue and exited, so the
tree's lock is free for the next mount, by ``gridfs mount`` or ``mount -t``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import (  # noqa: E402
    GRIDFS,
    Grid,
    Mount,
    gridfs,
    is_mounted,
    pid_alive,
    run,
    wait_dead,
)

pytest_plugins = ["tests.mountutil"]


def wake_all(servers: dict[int, int]) -> None:
    for p in servers.values():
        os.kill(p, signal.SIGCONT)


def umount_while_draining(grid: Grid, m: Mount, name: str, data: bytes, tty: bool = False) -> None:
    """Write ``name`` with the servers stopped, let them go on 3 s later, and
    ``gridfs umount`` meanwhile: it must return with the daemon gone (and,
    with stderr a ``tty``, say what it waits for)."""
    servers = grid.storage_pids()
    for p in servers.values():
        os.kill(p, signal.SIGSTOP)
    resume = threading.Timer(3.0, wake_all, [servers])
    try:
        (m.mountpoint / name).write_bytes(data)
        resume.start()
        pid = m.pid
        assert pid is not None
        m._disarm()
        master, slave = os.openpty() if tty else (-1, subprocess.PIPE)
        try:
            proc = subprocess.run(
                [GRIDFS, "umount", str(m.mountpoint)],
                stdout=subprocess.PIPE,
                stderr=slave,
                text=True,
                timeout=90,
            )
            if tty:
                os.close(slave)
                try:
                    err = os.read(master, 1 << 16).decode()
                except OSError:  # EIO: nothing was written
                    err = ""
        finally:
            if tty:
                os.close(master)
        if not tty:
            err = proc.stderr
        assert proc.returncode == 0, err
        if tty:
            assert re.search(r"^uploading \d+ queued changes…", err, re.M), err
        else:
            assert err == ""  # no progress lines when stderr is not a tty
        assert not pid_alive(pid), "gridfs umount returned before the daemon exited"
        assert not is_mounted(m.mountpoint)
        m.pid = None
    finally:
        resume.cancel()
        wake_all(servers)


def test_umount_then_mount_at_once(mount_grid: Grid, mount_node: Path, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    m = Mount(tmp_path / "mnt", mount_node)
    try:
        m.mount()
        umount_while_draining(mount_grid, m, "big", data)
        m.mount()  # at once: the old daemon must not hold the tree's lock any more
        assert (m.mountpoint / "big").read_bytes() == data
    finally:
        m.unmount()


def test_umount_then_mount_t_gridfs(mount_grid: Grid, mount_node: Path, tmp_path: Path) -> None:
    gridfs("install-mount-helper")
    data = os.urandom(3 << 20)
    m = Mount(tmp_path / "mnt", mount_node)
    try:
        m.mount()
        umount_while_draining(mount_grid, m, "big", data, tty=True)
        run(["mount", "-t", "gridfs", "grid", str(m.mountpoint), "-o", f"node={mount_node}"])
        assert is_mounted(m.mountpoint)
        pid = re.search(r"pid (\d+)", m.status())
        assert pid, m.status()
        m.adopt(int(pid.group(1)))
        assert (m.mountpoint / "big").read_bytes() == data
    finally:
        m.unmount()
    assert m.pid is None or wait_dead(m.pid, 1)


def test_umount_of_what_is_not_mounted(tmp_path: Path) -> None:
    proc = gridfs("umount", tmp_path, check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"gridfs: error: {tmp_path} is not a gridfs mount"]


def test_mount_waits_for_a_daemon_still_draining(
    mount_grid: Grid, mount_node: Path, tmp_path: Path
) -> None:
    """``fusermount3 -u M && gridfs mount M``: the unmount returns at once,
    and the new mount waits for the old daemon, saying so."""
    data = os.urandom(3 << 20)
    m = Mount(tmp_path / "mnt", mount_node)
    servers = mount_grid.storage_pids()
    try:
        m.mount()
        old = m.pid
        assert old is not None
        for p in servers.values():
            os.kill(p, signal.SIGSTOP)
        (m.mountpoint / "big").write_bytes(data)
        resume = threading.Timer(3.0, wake_all, [servers])
        resume.start()
        m._disarm()
        run(["fusermount3", "-u", str(m.mountpoint)])
        assert pid_alive(old)  # still draining
        m.pid = None
        proc = gridfs("mount", m.mountpoint, "--node", mount_node, "-o", "refresh=1")
        assert "waiting for the daemon of the last mount" in proc.stderr, proc.stderr
        assert not pid_alive(old)
        pid = re.search(r"\(pid (\d+);", proc.stdout)
        assert pid, proc.stdout
        m.adopt(int(pid.group(1)))
        assert (m.mountpoint / "big").read_bytes() == data
    finally:
        wake_all(servers)
        m.unmount()
