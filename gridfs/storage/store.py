"""The storage server's share store: closed shares on disk, uploads in progress.

Layout under ``root`` (``si`` is the storage index in lowercase base32, ``p``
its first two characters, ``n`` the share number in decimal)::

    shares/p/si/n     a closed share: complete, structurally checked, fsynced
    incoming/si.n     a share being uploaded; wiped whenever a store opens

A share reaches ``shares/`` only by fsync and rename, so a crash at any moment
leaves every closed share and no partial one.  The store checks a share's
structure (its header names this storage index, share number and size) but
cannot check its hashes: only a reader holding the cap can.

The store is synchronous and may be called from several threads, as long as
one bucket is driven by one thread at a time.
"""

from __future__ import annotations

import bisect
import contextlib
import errno as _errno
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gridfs.caps import b32encode
from gridfs.errors import FormatError, GridError, UsageError
from gridfs.fileutil import DROP_LAG, drop_cache, fsync_dir, start_writeback
from gridfs.hashes import STORAGE_INDEX_SIZE
from gridfs.layout import HEADER, ShareHeader

MAX_SHARENUM = 255
_FILE_MODE = 0o600


class StoreError(GridError):
    """The share store could not do what was asked (a disk error by default)."""

    errno = _errno.EIO


class NoSpaceError(StoreError):
    """The request would cross the free space the server keeps in reserve."""

    errno = _errno.ENOSPC


class ShareTooLargeError(StoreError):
    """The share is larger than this server accepts."""

    errno = _errno.EFBIG


class BadWriteError(StoreError):
    """A write outside the share, over bytes already written, or after the end."""

    errno = _errno.EINVAL


class IncompleteShareError(StoreError):
    """A share closed with bytes missing or whose header does not match it."""

    errno = _errno.EINVAL


class NoSuchShareError(StoreError):
    """No closed share with that storage index and number is stored here."""

    errno = _errno.ENOENT


@dataclass(frozen=True)
class StoreLimits:
    """What a server promises itself about its disk."""

    reserved_space: int = 1 << 30
    """Bytes of free disk space never to promise to uploaders."""
    max_share_size: int = 1 << 40
    client_quota: int = 0
    """Most bytes one member may have charged here (0: no limit); see
    :mod:`gridfs.storage.leases` for what is charged to whom."""


class ShareStore:
    """The shares of one storage server, under one root directory.

    Only one store may use a root at a time: opening a store discards every
    upload that was in progress there.
    """

    def __init__(self, root: Path, limits: StoreLimits = StoreLimits()) -> None:
        self.root = Path(root)
        self.limits = limits
        self._shares = self.root / "shares"
        self._incoming = self.root / "incoming"
        self._lock = threading.Lock()
        self._open: dict[tuple[bytes, int], BucketWriter] = {}
        self._used: int | None = None  # computed on first use, then kept up to date
        self._count = 0  # closed shares, likewise
        self._shares.mkdir(parents=True, exist_ok=True)
        if self._incoming.exists():
            shutil.rmtree(self._incoming)  # partial shares are never kept
        self._incoming.mkdir()

    def capacity(self) -> dict[str, int]:
        """Disk space in bytes, as a server advertises it to clients."""
        with self._lock:
            st, free = self._free_locked()
            if self._used is None:
                sizes = [f.stat().st_size for f in self._shares.glob("*/*/*")]
                self._used, self._count = sum(sizes), len(sizes)
            used, count = self._used, self._count
        return {
            "total": st.f_blocks * st.f_frsize,
            "free": max(0, free),
            "reserved": self.limits.reserved_space,
            "available": max(0, free - self.limits.reserved_space),
            "max_share_size": self.limits.max_share_size,
            "used": used,
            "shares": count,
        }

    def allocate(
        self, storage_index: bytes, sharenums: Iterable[int], share_size: int
    ) -> tuple[set[int], dict[int, BucketWriter]]:
        """Open buckets to upload ``sharenums`` of ``storage_index``.

        Returns the share numbers already stored here and a writer for each
        share that is neither stored nor being uploaded by someone else (those
        are skipped, so two uploaders never write one file).  All or nothing:
        if the new shares are too large or would not fit, nothing is opened.
        """
        _check_si(storage_index)
        nums = set(sharenums)
        for n in nums:
            _check_sharenum(n)
        if not isinstance(share_size, int) or share_size < 1:
            raise UsageError(f"share size must be a positive integer, not {share_size!r}")
        with self._lock, _disk_errors("allocate"):
            have = nums & set(self._closed(storage_index))
            new = sorted(n for n in nums - have if (storage_index, n) not in self._open)
            if not new:
                return have, {}
            if share_size > self.limits.max_share_size:
                raise ShareTooLargeError(
                    f"share size {share_size} exceeds this server's {self.limits.max_share_size}"
                )
            if self._free_locked()[1] - self.limits.reserved_space < share_size * len(new):
                raise NoSpaceError(f"no room for {len(new)} shares of {share_size} bytes")
            buckets: dict[int, BucketWriter] = {}
            try:
                for n in new:
                    buckets[n] = BucketWriter(self, storage_index, n, share_size)
            except BaseException:
                for b in buckets.values():
                    _unlink_quiet(b._path)
                raise
            for n, b in buckets.items():
                self._open[storage_index, n] = b
        return have, buckets

    def check_room(self, nbytes: int) -> None:
        """NoSpaceError unless ``nbytes`` more fit above the reserved space
        (for what is written outside buckets: slots)."""
        with self._lock, _disk_errors("statvfs"):
            if self._free_locked()[1] - self.limits.reserved_space < nbytes:
                raise NoSpaceError(f"no room for {nbytes} bytes")

    def shares(self, storage_index: bytes) -> dict[int, int]:
        """The closed shares of ``storage_index`` here: share number -> size."""
        _check_si(storage_index)
        return self._closed(storage_index)

    def read(self, storage_index: bytes, sharenum: int, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes of a closed share from ``offset`` (fewer at its end)."""
        path = self._share_path(storage_index, sharenum)
        if offset < 0 or length < 0:
            raise UsageError(f"bad read of {length} bytes at {offset}")
        with _disk_errors("read"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise NoSuchShareError(f"no share {sharenum} here") from None
            try:
                data = _pread_full(fd, offset, length)
                drop_cache(fd, offset, len(data))  # its reader keeps what it needs
                return data
            finally:
                os.close(fd)

    def quarantine(self, storage_index: bytes, sharenum: int) -> Path:
        """Move a share that failed verification out of service (kept for a
        human to look at, never served again)."""
        path = self._share_path(storage_index, sharenum)
        qdir = self.root / "quarantine"
        with self._lock, _disk_errors("quarantine"):
            qdir.mkdir(exist_ok=True)
            dest = qdir / f"{b32encode(storage_index)}.{sharenum}.{time.time_ns()}"
            self._take_out_locked(path, sharenum, lambda p: os.rename(p, dest))
            _rmdir_quiet(path.parent)
            fsync_dir(qdir)
        return dest

    def delete_share(self, storage_index: bytes, sharenum: int) -> None:
        """Remove a closed share (garbage collection, quarantine)."""
        path = self._share_path(storage_index, sharenum)
        with self._lock, _disk_errors("delete"):
            self._take_out_locked(path, sharenum, Path.unlink)
            _rmdir_quiet(path.parent)
            _rmdir_quiet(path.parent.parent)
        with _disk_errors("delete"):
            # The deepest directory left is the one whose entry went last.
            fsync_dir(next(d for d in path.parents[:3] if d.exists()))

    def _take_out_locked(self, path: Path, sharenum: int, remove: Callable[[Path], object]) -> None:
        """Remove a closed share's file from shares/ (``remove`` deletes or
        moves it) and take it out of the use figures; the lock is held."""
        try:
            size = path.stat().st_size
            remove(path)
        except FileNotFoundError:
            raise NoSuchShareError(f"no share {sharenum} here") from None
        if self._used is not None:
            self._used -= size
            self._count -= 1

    def delete_all(self, storage_index: bytes) -> int:
        """Remove every closed share of ``storage_index`` (its last lease went);
        returns how many there were."""
        nums = list(self.shares(storage_index))
        for n in nums:
            with contextlib.suppress(NoSuchShareError):
                self.delete_share(storage_index, n)
        return len(nums)

    def open_buckets(self) -> int:
        """How many uploads are in progress."""
        with self._lock:
            return len(self._open)

    def _share_path(self, storage_index: bytes, sharenum: int) -> Path:
        """Where share ``sharenum`` of ``storage_index`` lives once closed."""
        _check_si(storage_index)
        _check_sharenum(sharenum)
        name = b32encode(storage_index)
        return self._shares / name[:2] / name / str(sharenum)

    def _free_locked(self) -> tuple[os.statvfs_result, int]:
        """statvfs, and the free bytes left once open buckets write what they
        were promised (negative if the disk filled up meanwhile)."""
        st = os.statvfs(self.root)
        promised = sum(b.share_size - b.written for b in self._open.values())
        return st, st.f_bavail * st.f_frsize - promised

    def _closed(self, storage_index: bytes) -> dict[int, int]:
        si_dir = self._share_path(storage_index, 0).parent
        with _disk_errors("list shares"):
            try:
                entries = list(os.scandir(si_dir))
            except FileNotFoundError:
                return {}
            return {int(e.name): e.stat().st_size for e in entries if e.name.isdigit()}

    def close_whole(self, items: list[tuple[BucketWriter, bytes]]) -> list[StoreError | None]:
        """Write and close fresh buckets each in one piece, as :meth:`BucketWriter.write`
        then :meth:`BucketWriter.close` would one by one, with the costly
        part shared: every share's writeback starts before the first fsync,
        and each directory the renames touched is fsynced once.  An error
        per bucket (that bucket aborted, or not durable if it came after the
        rename), None for each one stored."""
        errors: list[StoreError | None] = [None] * len(items)
        fds: dict[int, int] = {}
        try:
            for i, (bucket, data) in enumerate(items):
                try:
                    with _disk_errors("write"):
                        bucket._check_whole(data)
                        fds[i] = fd = os.open(bucket._path, os.O_WRONLY)
                        _pwrite_full(fd, data, 0)
                        start_writeback(fd, 0, len(data))
                except StoreError as e:
                    errors[i] = e
            for i, fd in fds.items():
                if errors[i] is None:
                    try:
                        with _disk_errors("close"):
                            os.fsync(fd)
                            drop_cache(fd, 0, items[i][0].share_size)
                    except StoreError as e:
                        errors[i] = e
        finally:
            for fd in fds.values():
                os.close(fd)
        dirs: dict[Path, list[int]] = {}
        for i, (bucket, _) in enumerate(items):
            if errors[i] is not None:
                bucket.abort()
                continue
            try:
                with _disk_errors("close"):
                    _, sync = self._publish(bucket)
            except StoreError as e:
                errors[i] = e
                bucket.abort()
                continue
            bucket.written, bucket.closed = bucket.share_size, True
            for d in sync:
                dirs.setdefault(d, []).append(i)
        for d, users in dirs.items():
            try:
                with _disk_errors("close"):
                    fsync_dir(d)
            except StoreError as e:
                for i in users:
                    errors[i] = errors[i] or e
        return errors

    def _publish(self, bucket: BucketWriter) -> tuple[Path, list[Path]]:
        """Rename a checked, fsynced bucket into shares/ and forget it; return
        its path and the directories whose fsync makes that durable (a new
        directory's parent too, and no more)."""
        final = self._share_path(bucket.storage_index, bucket.sharenum)
        with self._lock:
            sync = [final.parent]
            for d in final.parents[:2]:
                if d.exists():
                    break
                sync.append(d.parent)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(bucket._path, final)
            del self._open[bucket.storage_index, bucket.sharenum]
            if self._used is not None:
                self._used += bucket.share_size
                self._count += 1
        return final, sync

    def _forget(self, bucket: BucketWriter) -> None:
        with self._lock:
            if self._open.get((bucket.storage_index, bucket.sharenum)) is bucket:
                del self._open[bucket.storage_index, bucket.sharenum]


class BucketWriter:
    """One share being uploaded; made by :meth:`ShareStore.allocate`.

    Writes may come in any order but never overlap; :meth:`close` publishes
    the share once every byte is there, :meth:`abort` throws it away.
    """

    def __init__(self, store: ShareStore, storage_index: bytes, sharenum: int, size: int) -> None:
        self.storage_index = storage_index
        self.sharenum = sharenum
        self.share_size = size
        self._path = store._incoming / f"{b32encode(storage_index)}.{sharenum}"
        self.written = 0
        self.closed = False
        self.aborted = False
        self.last_activity = time.monotonic()
        self._store = store
        self._starts: list[int] = []  # disjoint, non-adjacent written intervals [start, end)
        self._ends: list[int] = []
        self._dropped = 0
        """Bytes below this have been let go of (where written)."""
        os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE))

    def __repr__(self) -> str:
        return f"<bucket for share {self.sharenum} of {b32encode(self.storage_index)}>"

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``: inside the share, over no byte written before."""
        self.write_all([(offset, data)])

    def write_all(self, chunks: Iterable[tuple[int, bytes]]) -> None:
        """:meth:`write` each (offset, data) in turn, with one open of the
        file and one writeback hint for the lot (a hint may cost a VM exit)."""
        if self.closed or self.aborted:
            raise BadWriteError(f"write to a finished {self!r}")
        low, high = self.share_size, 0
        with _disk_errors("write"):
            fd = os.open(self._path, os.O_WRONLY)
            try:
                for offset, data in chunks:
                    end = offset + len(data)
                    i = self._fresh_slot(offset, end)
                    if not data:
                        continue
                    _pwrite_full(fd, data, offset)
                    self._add_interval(i, offset, end)
                    self.written += len(data)
                    low, high = min(low, offset), max(high, end)
            finally:
                if high > low:
                    start_writeback(fd, low, high - low)
                    self._drop_behind(fd, low - DROP_LAG)
                os.close(fd)
        self.last_activity = time.monotonic()

    def _drop_behind(self, fd: int, limit: int) -> None:
        """Let the page cache go of the bytes written below ``limit``: a share
        is written once and rarely read soon.  Only written intervals are
        dropped, and DONTNEED keeps the pages they share with a gap: the
        gaps are the records' proofs and the header, written at the end,
        and a write into a page no longer cached would first read it back
        from disk (a 1 GiB upload's last phase did 1 024 such reads per
        share).  Each call covers what became droppable since the last,
        and the last window again (pages then still being written back)."""
        start = max(0, self._dropped - DROP_LAG)
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self._starts) and self._starts[i] < limit:
            low, high = max(start, self._starts[i]), min(limit, self._ends[i])
            drop_cache(fd, low, high - low)
            i += 1
        self._dropped = max(self._dropped, limit)

    def _fresh_slot(self, offset: int, end: int) -> int:
        """Where [offset, end) goes among the written intervals; BadWriteError
        if it leaves the share or overlaps bytes written before."""
        if offset < 0 or end > self.share_size:
            raise BadWriteError(f"write of [{offset}, {end}) outside [0, {self.share_size})")
        i = bisect.bisect_right(self._starts, offset)
        before = i > 0 and self._ends[i - 1] > offset
        after = i < len(self._starts) and self._starts[i] < end
        if offset < end and (before or after):
            raise BadWriteError(f"write of [{offset}, {end}) overlaps bytes already written")
        return i

    def close(self) -> None:
        """Check the share is whole and names this bucket, then make it durable
        and visible.  A failure before it is visible aborts the bucket."""
        if self.closed or self.aborted:
            raise BadWriteError(f"close of a finished {self!r}")
        try:
            if self.written != self.share_size:
                missing = self.share_size - self.written
                raise IncompleteShareError(f"{self!r} closed with {missing} bytes missing")
            with _disk_errors("close"):
                self._check_and_sync()
                _, sync = self._store._publish(self)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        with _disk_errors("close"):
            for d in sync:
                fsync_dir(d)

    def abort(self) -> None:
        """Throw the upload away; harmless if already aborted or closed."""
        if self.closed or self.aborted:
            return
        self.aborted = True
        try:
            with _disk_errors("abort"):
                _unlink_quiet(self._path)
        finally:
            self._store._forget(self)

    def _check_head(self, head: bytes) -> None:
        """IncompleteShareError unless ``head`` (the share's first bytes) is
        the header of this share, of this size."""
        try:
            header = ShareHeader.unpack(head[: HEADER.size])
        except FormatError as e:
            raise IncompleteShareError(f"{self!r} is not a share: {e}") from None
        if header.storage_index != self.storage_index or header.sharenum != self.sharenum:
            raise IncompleteShareError(f"{self!r} holds another share's header")
        if header.geometry.share_size != self.share_size:
            raise IncompleteShareError(f"{self!r} is not the size its header says")

    def _check_whole(self, data: bytes) -> None:
        """Whether ``data`` can be this fresh bucket's share, whole."""
        if self.closed or self.aborted or self.written:
            raise BadWriteError(f"a whole share written to a used {self!r}")
        if len(data) != self.share_size:
            raise BadWriteError(f"{len(data)} bytes for {self!r} of {self.share_size}")
        self._check_head(data)

    def _check_and_sync(self) -> None:
        fd = os.open(self._path, os.O_RDWR)
        try:
            self._check_head(_pread_full(fd, 0, HEADER.size))
            os.fsync(fd)
            drop_cache(fd, 0, self.share_size)
        finally:
            os.close(fd)

    def _add_interval(self, i: int, start: int, end: int) -> None:
        """Record [start, end) written, merging it with the neighbours it touches."""
        left = i > 0 and self._ends[i - 1] == start
        right = i < len(self._starts) and self._starts[i] == end
        if left and right:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif left:
            self._ends[i - 1] = end
        elif right:
            self._starts[i] = start
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)


def _check_si(storage_index: bytes) -> None:
    if not isinstance(storage_index, bytes) or len(storage_index) != STORAGE_INDEX_SIZE:
        raise UsageError(f"a storage index is {STORAGE_INDEX_SIZE} bytes")


def _check_sharenum(sharenum: int) -> None:
    if not isinstance(sharenum, int) or not 0 <= sharenum <= MAX_SHARENUM:
        raise UsageError(f"share number must be in 0..{MAX_SHARENUM}, not {sharenum!r}")


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    """Report an OSError from the disk as a StoreError a server can pass on."""
    try:
        yield
    except OSError as e:
        cls = NoSpaceError if e.errno in (_errno.ENOSPC, _errno.EDQUOT) else StoreError
        raise cls(f"{what}: {e.strerror or e}") from e


def _pread_full(fd: int, offset: int, length: int) -> bytes:
    """Read ``length`` bytes at ``offset``, fewer only at end of file."""
    parts = []
    while length > 0:
        chunk = os.pread(fd, min(length, 1 << 30), offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def _pwrite_full(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _rmdir_quiet(path: Path) -> None:
    """Remove ``path`` if it is an empty directory."""
    with contextlib.suppress(OSError):
        path.rmdir()
