"""Sparse local files: allocate, punch holes, copy only the data.

The mount's staging files and the queue's edit tempfiles hold only the
ranges an edit changed; everything else is a hole, which takes no disk.
Linux's fallocate(2) is not in the os module (only posix_fallocate, mode 0),
so it is called through libc.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _load_fallocate()


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError with its errno on failure."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset + length)`` of ``fd`` a hole (reads give
    zeros, no disk is used), the size unchanged.  Where the filesystem
    cannot punch, zeros are written instead."""
    if length <= 0:
        return
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        end = min(offset + length, os.fstat(fd).st_size)
        zeros = bytes(1 << 20)
        for at in range(offset, end, len(zeros)):
            os.pwrite(fd, zeros[: min(len(zeros), end - at)], at)


def data_ranges(fd: int, offset: int, length: int) -> Iterator[tuple[int, int]]:
    """The ``(offset, length)`` runs of ``[offset, offset + length)`` in
    ``fd`` that hold data (not holes), by SEEK_DATA/SEEK_HOLE."""
    end = min(offset + length, os.fstat(fd).st_size)
    at = offset
    while at < end:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here on
                return
            raise
        if start >= end:
            return
        stop = min(end, os.lseek(fd, start, os.SEEK_HOLE))
        yield start, stop - start
        at = stop


def copy_ranges(src: int, dst: int, ranges: list[tuple[int, int]]) -> None:
    """Copy ``ranges`` of ``src`` to the same offsets of ``dst``, holes as
    holes: the range is punched in ``dst`` first, then only its data copied."""
    for offset, length in ranges:
        punch_hole(dst, offset, length)
        for at, n in data_ranges(src, offset, length):
            done = 0
            while done < n:
                copied = os.copy_file_range(src, dst, n - done, at + done, at + done)
                if copied == 0:
                    break
                done += copied


def allocated(fd: int) -> int:
    """Bytes of disk ``fd``'s file takes (its blocks, not its size)."""
    return os.fstat(fd).st_blocks * 512
