"""Small durability primitives: atomic replace of a file, directory fsync;
and the page-cache hints for bytes written or read once."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sqlite3
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import UsageError


def fsync_dir(path: Path) -> None:
    """Make a rename or create in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; others must not be silenced
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(dest: Path, mode: int = 0o644, durable: bool = True) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``dest``; on success rename it into
    place (after an fsync when ``durable``), on any error remove it so nothing
    is left at ``dest``."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, dest)
        if durable:
            fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and its parents) if missing and make it 0700: a node
    directory holds keys, aliases and logs that only its owner may read.  An
    existing directory with a looser mode is tightened (one made by an older
    gridfs, or by hand)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    if stat.S_IMODE(os.stat(path).st_mode) != PRIVATE_DIR_MODE:
        os.chmod(path, PRIVATE_DIR_MODE)
    return path


def open_private_log(path: Path) -> BinaryIO:
    """Open ``path`` for appending, created 0600 whatever the umask, and an
    existing file tightened to 0600: logs name servers, paths and errors
    that are nobody else's business."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def check_private_file(path: Path) -> None:
    """Refuse a secret file that someone else could read or replace: owned
    by another user, or open to group or others: one UsageError saying
    what is wrong and how to fix it."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}") from None
    if st.st_uid not in (os.getuid(), 0):
        raise UsageError(f"{path} belongs to another user (uid {st.st_uid})")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise UsageError(
            f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it"
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without
    waiting (Linux sync_file_range): a later fsync then finds little left
    to do, instead of the whole file at once."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


DROP_LAG = 8 * 1024 * 1024
"""How far behind the newest write pages are let go of: by then the
writeback started for them has (nearly always) finished."""


def drop_cache(fd: int, offset: int, length: int) -> None:
    """Let the page cache go of bytes [offset, offset + length) that are on
    disk (pages still dirty or under writeback stay); nothing if length <= 0.

    For bytes written or read once -- a server's shares, the mount's staging
    files and the uploads read from them: caching them would only push out
    more useful pages (Hadoop's DataNode offers the same drop-behind for its
    blocks), and the next transfer reuses the freed pages instead of
    claiming fresh memory, which on a VM whose memory is backed lazily costs
    several times the copy itself (figures: docs/operations.md §6)."""
    if length > 0:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def written_once(fd: int, offset: int, length: int, start: int = 0) -> None:
    """Bytes [offset, offset + length) were just appended to a file written
    once and not read back soon: start their writeback, and let the pages
    from ``start`` to DROP_LAG behind them leave the page cache."""
    start_writeback(fd, offset, length)
    drop_cache(fd, start, offset + length - DROP_LAG - start)


class WriteBehind:
    """Appends to a file written once, in order, and not read back soon (a
    download's output): each write starts its writeback and the pages
    DROP_LAG behind the newest write leave the page cache, like
    ``dd oflag=nocache``.  A large download then neither pushes other files
    out of memory nor claims fresh memory for every page it writes (the cost
    :func:`drop_cache` describes).  Anything but a regular file (a pipe, a
    terminal) is written plainly."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
        self.start: int | None = None
        """Where the first write landed (the end of the file with O_APPEND)."""

    def write(self, data: bytes) -> None:
        self.f.write(data)
        if not self.regular:
            return
        self.f.flush()
        fd = self.f.fileno()
        end = os.lseek(fd, 0, os.SEEK_CUR)
        if self.start is None:
            self.start = end - len(data)
        written_once(fd, end - len(data), len(data), self.start)


UNIX_PATH_MAX = 107
"""Bytes of a Unix socket's path that bind(2) and connect(2) take (sun_path
is 108 bytes with its NUL)."""


@contextlib.contextmanager
def unix_socket_path(path: Path) -> Iterator[str]:
    """A name for the Unix socket ``path`` that bind/connect accept however
    deep ``path`` lies: itself when short enough, else the same file through
    an open descriptor of its directory (``/proc/self/fd/N/NAME``), valid
    until the block ends (a node directory may be any path)."""
    text = str(path)
    if len(os.fsencode(text)) <= UNIX_PATH_MAX:
        yield text
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def open_private_db(path: Path, schema: str, threads: bool = False) -> sqlite3.Connection:
    """A node-private SQLite database at ``path`` (0600 in a 0700
    directory: it holds caps), in WAL mode with NORMAL sync (a crash loses
    at most the last commits of a cache, never its consistency), with
    ``schema`` applied.  ``threads``: used from worker threads too (the
    caller serializes its users)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=not threads)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(schema)
    return db
