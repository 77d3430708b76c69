"""A mount's control socket lies in its node directory, which may be any
path: deeper ones than a Unix socket's name can hold (108 bytes) work too."""

from __future__ import annotations

import socket
from pathlib import Path

from gridfs.fileutil import UNIX_PATH_MAX, unix_socket_path

from .mountutil import Grid, mounted

pytest_plugins = ["tests.mountutil"]


def deep(base: Path) -> Path:
    path = base / ("d" * 60) / ("e" * 60)
    path.mkdir(parents=True)
    return path


def test_a_deep_socket_path_binds_and_connects(tmp_path: Path) -> None:
    path = deep(tmp_path) / "1234.sock"
    assert len(str(path).encode()) > UNIX_PATH_MAX
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        with unix_socket_path(path) as name:
            server.bind(name)
        server.listen(1)
        assert path.exists()
        with unix_socket_path(path) as name:
            client.connect(name)
        conn, _ = server.accept()
        with conn:
            client.sendall(b"ok")
            assert conn.recv(2) == b"ok"


def test_a_node_in_a_deep_directory_mounts_and_answers_status(
    mount_grid: Grid, tmp_path: Path
) -> None:
    node = mount_grid.new_node(deep(tmp_path))
    assert len(str(node / "run" / "1234567.sock").encode()) > UNIX_PATH_MAX
    with mounted(node, tmp_path / "mnt") as m:
        (m.mountpoint / "f").write_bytes(b"x" * 100_000)
        m.flush()  # (through the control socket: the daemon flushes)
        status = m.status()
        assert "no mount of" not in status and str(m.mountpoint) in status, status
