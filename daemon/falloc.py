"""fallocate(2) on the mount, which pyfuse3 does not pass on.

pyfuse3 (3.5, the newest) registers no ``fallocate`` operation with libfuse,
so the kernel answers EOPNOTSUPP to every fallocate on the mount, and
programs that punch holes or reserve space (databases, VM images, torrent
clients, ``fallocate -p``) fall back or fail.  libfuse copies the operation
table into the session when pyfuse3 creates it; this module finds that copy
(by matching it against pyfuse3's own table, located through its symbol
table) and fills in the ``fallocate`` slot with a callback that runs the
daemon's handler as a trio task and replies.  Anything unexpected (another
libfuse, a stripped pyfuse3) leaves the slot empty: fallocate then stays
unsupported, as before, and the reason is logged.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

log = logging.getLogger(__name__)

FALLOCATE_SLOT = 40
"""Index of ``fallocate`` in libfuse 3's ``struct fuse_lowlevel_ops`` (the
fields only ever get appended; 44 of them in 3.14)."""
SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"
OPS_SYMBOL = b"__pyx_v_7pyfuse3_fuse_ops"
SCAN = 1024
"""Bytes of ``struct fuse_session`` searched for the table."""

Handler = Callable[[int, int, int, int], Awaitable[None]]
_CALLBACK = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_void_p,
)
_installed: list[Any] = []
"""The callback (ctypes must keep it alive while libfuse may call it)."""


def _symbols(path: Path, names: set[bytes]) -> dict[bytes, int]:
    """Values of ``names`` in the ELF64 symbol table of ``path``."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return {}
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    found: dict[bytes, int] = {}
    for _, kind, _, _, offset, size, link, _, _, _ in sections:
        if kind != 2:  # SHT_SYMTAB
            continue
        strings = sections[link][4]
        for at in range(offset, offset + size, 24):
            name_at, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", data, at)
            start = strings + name_at
            name = data[start : data.index(b"\0", start)]
            if name in names:
                found[name] = value
    return found


def _load_base(path: Path) -> int | None:
    """Where the shared object ``path`` is mapped in this process."""
    real = str(path.resolve())
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real and int(fields[2], 16) == 0:
                return int(fields[0].split("-")[0], 16)
    return None


def _session_ops() -> int | None:
    """The address of the operation table in pyfuse3's libfuse session."""
    library = Path(pyfuse3.__file__)
    symbols = _symbols(library, {SESSION_SYMBOL, OPS_SYMBOL})
    base = _load_base(library)
    if base is None or len(symbols) != 2:
        log.info("fallocate: cannot find pyfuse3's session in %s", library)
        return None
    session = ctypes.c_void_p.from_address(base + symbols[SESSION_SYMBOL]).value
    if not session:
        return None
    known = ctypes.string_at(base + symbols[OPS_SYMBOL], FALLOCATE_SLOT * 8)
    memory = ctypes.string_at(session, SCAN)
    at = memory.find(known)
    if at < 0 or at % 8 or memory.find(known, at + 1) >= 0:
        log.info("fallocate: libfuse's session does not hold pyfuse3's operations")
        return None
    return int(session) + at


def install(handler: Handler) -> bool:
    """Serve fallocate with ``handler(inode, mode, offset, length)`` (an
    OSError or FUSEError answers its errno); call after pyfuse3.init(),
    inside the trio run that serves the mount.  Whether it could."""
    try:
        ops = _session_ops()
        libfuse = ctypes.CDLL("libfuse3.so.3")
    except OSError as e:
        log.info("fallocate: %s", e)
        return False
    if ops is None:
        return False
    reply = libfuse.fuse_reply_err
    reply.argtypes, reply.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int
    token = trio.lowlevel.current_trio_token()

    async def serve(req: int, ino: int, mode: int, offset: int, length: int) -> None:
        err = 0
        try:
            await handler(ino, mode, offset, length)
        except pyfuse3.FUSEError as e:
            err = e.errno
        except OSError as e:
            err = e.errno or errno.EIO
        except Exception:
            log.exception("fallocate failed")
            err = errno.EIO
        reply(req, err)

    def callback(req: int, ino: int, mode: int, offset: int, length: int, fi: int) -> None:
        try:
            token.run_sync_soon(
                lambda: trio.lowlevel.spawn_system_task(serve, req, ino, mode, offset, length)
            )
        except Exception:
            reply(req, errno.EIO)

    cb = _CALLBACK(callback)
    _installed.append(cb)
    ctypes.c_void_p.from_address(ops + FALLOCATE_SLOT * 8).value = ctypes.cast(
        cb, ctypes.c_void_p
    ).value
    log.info("fallocate: served")
    return True
