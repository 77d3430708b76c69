"""The mount's segment cache: decoded, verified segments, in memory and on disk.

Reads fetch whole segments (verified against the cap before they get here),
so the cache holds segments by (cap, segment index).  A small in-memory LRU
sits in front of a bounded directory, ``NODE/cache/segments/``, that
survives remounts: one file per segment, named by a hash of the cap (the cap
itself, which holds the read key, never appears in a file name), holding a
tag and the CRC-32 of the data, then the data.  A file that is torn,
truncated or damaged fails that check and counts as a miss.  (A checksum,
not a cryptographic hash, as JuiceFS checks its cache blocks: whoever could
alter these files could read the node's keys beside them; SHA-256 cost three
times the CPU of the rest of a cache write.)  The least recently used files
are deleted to stay under ``max_bytes``.  Files are read, checked and
written in a worker thread (a new segment is in memory at once, on disk a
moment later), so the event loop that answers FUSE requests never waits on
them.  Each file's writeback starts when it is written, and its pages leave
the page cache one file later, or as soon as it is read back (the kernel
caches what the mount serves anyway): a long read then reuses a few pages
instead of claiming fresh ones.

A scan does not go to disk: a file larger than a quarter of the cache (of
at most DISK_BYTES of it, however large the node's local limit), read
sequentially, would push out everything else kept there (a 1 GiB copy
empties a 1 GiB cache), and writing it back costs about as much CPU as
fetching it.  Its sequential segments stay in memory only, as PostgreSQL
keeps a large sequential scan out of its shared buffers; the segments read
before it turns sequential (its head: file managers, ``file``) and those
read at random still go to disk.  ``keep_scans`` (``-o cache_scans``) keeps
scans too.

The cache shares the node's local space with the files being written and
uploaded (``gridfs.localspace``): it gives way first, evicting for them
(:meth:`SegmentCache.shrink`), and writes a file only where it fits
(:attr:`SegmentCache.admit`).

The directory is as private as the staging files of the mount (mode 0700,
inside the node directory): it holds plaintext, like them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import trio

from gridfs.fileutil import drop_cache, start_writeback

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def _cap_id(cap: str) -> str:
    """The name of a cap's files (asked for each segment a read touches)."""
    return hashlib.sha256(cap.encode()).hexdigest()[:40]


Key = tuple[str, int]
MEMORY_BYTES = 64 << 20
DISK_BYTES = 1 << 30
SCAN_SHARE = 4
"""A sequential read of a file larger than 1/SCAN_SHARE of the disk cache is a scan."""
_HEAD = struct.Struct(">4sI")
"""A cache file's head: a tag and the CRC-32 of the data after it."""
_TAG = b"gsc1"


class SegmentCache:
    """Decoded segments by (cap, index): memory first, then disk."""

    def __init__(
        self,
        directory: Path | None = None,
        max_bytes: int = DISK_BYTES,
        memory_bytes: int = MEMORY_BYTES,
        keep_scans: bool = False,
    ) -> None:
        self.memory_bytes = memory_bytes
        self.keep_scans = keep_scans
        self._memory: OrderedDict[Key, bytes] = OrderedDict()
        self._memory_size = 0
        self.directory = directory if max_bytes > 0 else None
        self.max_bytes = max_bytes
        self._files: OrderedDict[str, int] = OrderedDict()
        """On-disk entries, least recently used first: file name → size."""
        self._disk_size = 0
        self._last_written: str | None = None
        self.hits = {"memory": 0, "disk": 0, "miss": 0}
        self.admit: Callable[[int], bool] = lambda nbytes: True
        """Asked before a file of ``nbytes`` is written: the node's local
        space (gridfs.localspace) lets it in, evicting others, or not."""
        if self.directory is not None:
            self._open_directory(self.directory)

    def _open_directory(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        entries = []
        for e in os.scandir(directory):
            if e.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)  # a write a crash interrupted
                continue
            st = e.stat()
            entries.append((st.st_mtime_ns, e.name, st.st_size))
        for _, name, size in sorted(entries):
            self._files[name] = size
            self._disk_size += size
        self._evict()

    @staticmethod
    def _name(key: Key) -> str:
        cap, index = key
        return f"{_cap_id(cap)}.{index}"

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached (without reading it)."""
        if key in self._memory:
            return True
        return isinstance(key, tuple) and self._name(key) in self._files

    async def get(self, key: Key) -> bytes | None:
        data = self._memory.get(key)
        if data is not None:
            self._memory.move_to_end(key)
            self.hits["memory"] += 1
            return data
        name = self._name(key)
        if self.directory is None or name not in self._files:
            self.hits["miss"] += 1
            return None
        # Reading and hashing a segment takes a thread, not the event loop
        # (every FUSE request waits on it).
        data = await trio.to_thread.run_sync(_read_checked, self.directory / name)
        if data is None:
            self._drop(name)
            self.hits["miss"] += 1
            return None
        if name in self._files:
            self._files.move_to_end(name)
        self.hits["disk"] += 1
        self._remember(key, data)
        return data

    def is_scan(self, file_size: int) -> bool:
        """Whether a sequential read of a file this large keeps its segments
        in memory only (see the module's docstring)."""
        room = min(self.max_bytes, DISK_BYTES)  # (the node's whole local limit may be larger)
        return not self.keep_scans and file_size > room // SCAN_SHARE

    async def put(self, key: Key, data: bytes, disk: bool = True) -> None:
        """Keep a segment in memory and (unless not ``disk``) on disk."""
        if key in self._memory:
            return
        self._remember(key, data)
        name = self._name(key)
        if (
            not disk
            or self.directory is None
            or len(data) + _HEAD.size > self.max_bytes
            or name in self._files
            or not self.admit(len(data) + _HEAD.size)
        ):
            return
        before, self._last_written = self._last_written, name
        if not await trio.to_thread.run_sync(_write_checked, self.directory, name, data, before):
            return
        if name not in self._files:  # (written twice at once: counted once)
            self._files[name] = len(data) + _HEAD.size
            self._disk_size += len(data) + _HEAD.size
            self._evict()

    def _remember(self, key: Key, data: bytes) -> None:
        self._memory[key] = data
        self._memory_size += len(data)
        while self._memory_size > self.memory_bytes and self._memory:
            _, old = self._memory.popitem(last=False)
            self._memory_size -= len(old)

    def _evict(self) -> None:
        while self._disk_size > self.max_bytes and self._files:
            self._drop(next(iter(self._files)))

    def shrink(self, nbytes: int) -> int:
        """Evict the least recently used files until ``nbytes`` are freed
        (writers need the room); the bytes freed."""
        freed = 0
        while freed < nbytes and self._files:
            name = next(iter(self._files))
            freed += self._files[name]
            self._drop(name)
        return freed

    def _drop(self, name: str) -> None:
        assert self.directory is not None
        with contextlib.suppress(OSError):
            os.unlink(self.directory / name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        size = self._files.pop(name, 0)
        self._disk_size -= size

    @property
    def disk_bytes(self) -> int:
        return self._disk_size


def _read_checked(path: Path) -> bytes | None:
    """A cache file's data, or None if it is gone, unreadable or damaged.
    Its pages then leave the page cache: the kernel caches what the mount
    serves."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, _HEAD.size, 0)
        data = os.pread(fd, size - _HEAD.size, _HEAD.size) if size >= _HEAD.size else b""
        drop_cache(fd, 0, size)
    except OSError:
        return None
    finally:
        os.close(fd)
    if head != _HEAD.pack(_TAG, zlib.crc32(data)):
        log.warning("cache file %s is damaged; fetching the segment again", path.name)
        return None
    return data


def _write_checked(directory: Path, name: str, data: bytes, before: str | None = None) -> bool:
    """Write a cache file (its head, then the data) and start its
    writeback, and let the pages of the file written ``before`` go; False
    if it cannot be written."""
    tmp = directory / f"{name}.tmp"
    try:
        # No fsync: a cache entry lost in a crash is fetched again, and a
        # torn one fails its check.
        with open(tmp, "wb") as f:
            f.write(_HEAD.pack(_TAG, zlib.crc32(data)))
            f.write(data)
            f.flush()
            start_writeback(f.fileno(), 0, 0)
        os.replace(tmp, directory / name)
        if before is not None:
            with contextlib.suppress(FileNotFoundError), open(directory / before, "rb") as f:
                drop_cache(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as e:
        log.warning("cannot write the segment cache: %s", e)
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True
