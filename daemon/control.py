"""The control socket (the seed's RIControlClient): local commands to a mount.

A Unix socket ``run/<pid>.sock`` in the node directory (mode 0600), speaking
the same framed RPC as the grid without TLS: ``ctl_status``, ``ctl_flush``
(returns when the grid has everything), ``ctl_memory`` (VmPeak, VmSize,
VmData in bytes), ``ctl_upload`` (a local file → its cap) and
``ctl_download`` (a cap → a local file).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import trio

from gridfs.caps import parse_read_cap
from gridfs.client.keeper import RetainedSet, lease_lock
from gridfs.config import NodeDir
from gridfs.errors import UsageError
from gridfs.fileutil import atomic_output, unix_socket_path
from gridfs.net.rpc import serve_rpc


def control_dir(node: NodeDir) -> Path:
    return node.path / "run"


def memory_usage() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmPeak", "VmSize", "VmData", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


async def serve_control(daemon: Any, node: NodeDir) -> None:
    directory = control_dir(node)
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / f"{os.getpid()}.sock"
    path.unlink(missing_ok=True)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    with unix_socket_path(path) as name:
        await sock.bind(name)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def handle(method: str, args: dict[str, Any]) -> Any:
        if method == "ctl_status":
            return daemon.status()
        if method == "ctl_flush":
            await daemon.flush_queue()
            return daemon.status()
        if method == "ctl_memory":
            return memory_usage()
        if method == "ctl_upload":
            grid = daemon.session.grid
            async with lease_lock(grid.node):  # retained before any unlink's fence
                report = await grid.put(Path(args["path"]))
                retained = RetainedSet(grid.node)
                try:
                    retained.add([report.cap.to_string()])
                finally:
                    retained.close()
            return report.cap.to_string()
        if method == "ctl_download":
            cap = parse_read_cap(args["cap"])
            with atomic_output(Path(args["path"])) as f:

                async def write(data: bytes) -> None:
                    f.write(data)

                await daemon.session.grid.get(cap, write)
            return str(Path(args["path"]).absolute())
        raise UsageError(f"unknown control method {method}")

    hello = {"kind": "mount", "mountpoint": str(daemon.mountpoint), "pid": os.getpid()}

    async def connection(stream: trio.SocketStream) -> None:
        await serve_rpc(stream, handle, lambda: hello)

    try:
        await trio.serve_listeners(connection, [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
