"""Local disk space of a client node: one limit for staging, queue and cache.

A mount keeps three kinds of files on the node's disk: the staging files of
files being written, the work queue (its tempfiles waiting for upload, its
SQLite journal and boxes) under ``NODE/queues/``, and the segment cache in
``NODE/cache/segments/``.  They share one limit (``-o cache_size=``, else
``[client] local_limit``, else :func:`default_limit`), as rclone's VFS cache
counts dirty and clean files against ``--vfs-cache-max-size``:

* the segment cache gives way first: a writer short of room evicts cached
  segments, and a segment is cached on disk only where it fits;
* then a writer waits (backpressure) while the queue uploads and deletes its
  tempfiles, for as long as uploads progress and at most ``wait`` seconds
  without progress;
* then it gets ENOSPC (:class:`LocalSpaceError`).

Whatever the limit, gridfs never takes the last :func:`keep_free` bytes of
the filesystem: they belong to the rest of the system, and to the queue's
journal.  For the case where something else fills the disk anyway, a small
*ballast* file (``NODE/cache/reserve``, as CockroachDB keeps one) is given up
when a change to the queue's journal fails for lack of space, and the change
is tried again (:meth:`LocalSpace.metadata`): ``rm`` of a partly written
file, and the queue recording its own progress, still work on a full disk.
The ballast comes back once the disk has room again.

Usage is measured, not tracked write by write: the files under
``NODE/queues/`` are summed by their allocated blocks (a sparse staging file
counts what it holds, not its size) at start, when a writer nears the limit,
and every :data:`POLL` seconds while one waits; in between, bytes reserved by
writers are added to the last measure.  So callers only say how many bytes
they are about to write (:meth:`LocalSpace.reserve`), whoever moves or
deletes the files.

:func:`disk_errno` classifies the errors a full or failing disk raises
(``OSError`` ENOSPC/EDQUOT/EIO, SQLite's ``database or disk is full`` and
``disk I/O error``), so the daemon answers them with an errno and carries on
instead of exiting.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from .errors import GridError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_SHARE = 2
"""The default limit is 1/DEFAULT_SHARE of the space gridfs could use at start."""
DEFAULT_MAX = 100 << 30
"""...and at most this (JuiceFS's default cache size)."""
DEFAULT_MIN = 16 << 20
KEEP_FREE_SHARE = 50
"""gridfs leaves 1/KEEP_FREE_SHARE of the filesystem free..."""
KEEP_FREE_MIN, KEEP_FREE_MAX = 4 << 20, 1 << 30
"""...but at least and at most these."""
BALLAST_BYTES = 8 << 20
BALLAST_SHARE = 32
"""The ballast is BALLAST_BYTES, and at most 1/BALLAST_SHARE of the filesystem."""
WAIT = 30.0
"""Seconds a writer waits for room without the queue making progress."""
POLL = 0.5
"""Seconds between measures while a writer waits."""
WATCH = 2.0
"""Seconds between looks at the disk by :meth:`LocalSpace.watch`."""
STAGING, TEMPFILES = "staging", "tempfiles"
"""Directory names under NODE/queues/ counted as staging, and as uploads pending."""


class LocalSpaceError(GridError):
    """No room on the node's disk, or under its local limit, for a write."""

    errno = errno.ENOSPC


class LocalDiskError(GridError):
    """The node's disk failed a write the daemon needed (full or I/O error)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.errno = code


class Cache(Protocol):
    """What the space needs of the segment cache."""

    @property
    def disk_bytes(self) -> int: ...

    def shrink(self, nbytes: int) -> int:
        """Evict least recently used files until ``nbytes`` are freed; the bytes freed."""


def disk_errno(exc: BaseException) -> int | None:
    """ENOSPC or EIO if ``exc`` says the local disk is full or failing, else
    None (an exception group: if one of its errors says so)."""
    if isinstance(exc, BaseExceptionGroup):
        codes = [disk_errno(e) for e in exc.exceptions]
        return next((c for c in codes if c is not None), None)
    if isinstance(exc, LocalDiskError | LocalSpaceError):
        return exc.errno
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return errno.ENOSPC
        return errno.EIO if exc.errno == errno.EIO else None
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError):
        text = str(exc).lower()
        if "full" in text:  # "database or disk is full"
            return errno.ENOSPC
        if "disk i/o error" in text:
            return errno.EIO
    return None


def as_grid_error(exc: BaseException) -> LocalDiskError:
    """A disk error (see :func:`disk_errno`) as a GridError, with its errno."""
    code = disk_errno(exc)
    assert code is not None
    return LocalDiskError(f"local disk: {_first_disk_error(exc)}", code)


def _first_disk_error(exc: BaseException) -> BaseException:
    if isinstance(exc, BaseExceptionGroup):
        return next(_first_disk_error(e) for e in exc.exceptions if disk_errno(e) is not None)
    return exc


@contextlib.contextmanager
def tolerate_disk_errors(what: str) -> Iterator[None]:
    """Go on without a write that is only bookkeeping (e.g. a failed step's
    error count) when the disk is full or failing: it is logged and lost."""
    try:
        yield
    except (OSError, sqlite3.Error) as e:
        if disk_errno(e) is None:
            raise
        log.warning("could not record %s: %s", what, e)


def keep_free(total: int) -> int:
    """Bytes of a filesystem of ``total`` bytes gridfs never uses."""
    return min(KEEP_FREE_MAX, max(KEEP_FREE_MIN, total // KEEP_FREE_SHARE))


def default_limit(free: int, ours: int) -> int:
    """The limit when none is set: half of what gridfs could use at start
    (the free space plus what its files already take), within
    [DEFAULT_MIN, DEFAULT_MAX]."""
    return min(DEFAULT_MAX, max(DEFAULT_MIN, (free + ours) // DEFAULT_SHARE))


def ballast_size(total: int) -> int:
    return min(BALLAST_BYTES, total // BALLAST_SHARE)


def format_size(n: int) -> str:
    """``1.5 GiB``, ``300 MiB``, ``0 B``: sizes as status shows them."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@dataclass(frozen=True)
class Usage:
    """One look at the node's local space."""

    limit: int
    staging: int
    queue: int
    cache: int
    disk_free: int
    disk_total: int
    keep_free: int
    problem: str
    """one line naming what is wrong, or empty"""
    waits: int
    """writers that waited for room so far"""
    refused: int
    """writes refused with ENOSPC so far"""

    @property
    def used(self) -> int:
        return self.staging + self.queue + self.cache

    def to_json(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "used": self.used,
            "staging": self.staging,
            "queue": self.queue,
            "cache": self.cache,
            "disk_free": self.disk_free,
            "disk_total": self.disk_total,
            "keep_free": self.keep_free,
            "problem": self.problem,
            "waits": self.waits,
            "refused": self.refused,
        }


def describe(u: dict[str, Any]) -> str:
    """The status line of a :meth:`Usage.to_json`."""
    return (
        f"local disk: {format_size(u['used'])} used of limit {format_size(u['limit'])} "
        f"(staging {format_size(u['staging'])}, queue {format_size(u['queue'])}, "
        f"cache {format_size(u['cache'])}); {format_size(u['disk_free'])} free on disk"
    )


def measure_queues(queues: Path) -> tuple[int, int, int]:
    """Bytes allocated under ``queues``: (staging, queue, of which tempfiles)."""
    staging = queue = tempfiles = 0
    stack = [(queues, "")]
    while stack:
        directory, kind = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    sub = e.name if e.name in (STAGING, TEMPFILES) else kind
                    stack.append((Path(e.path), sub))
                    continue
                size = e.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue  # (deleted meanwhile)
            if kind == STAGING:
                staging += size
            else:
                queue += size
                tempfiles += size if kind == TEMPFILES else 0
    return staging, queue, tempfiles


class LocalSpace:
    """The local space of one node, as one mount uses it."""

    def __init__(
        self,
        node_path: Path,
        limit: int | None = None,
        wait: float = WAIT,
        progress: Callable[[], int] | None = None,
        on_pressure: Callable[[], None] | None = None,
    ) -> None:
        """``limit`` None: :func:`default_limit`.  ``progress`` tells how
        many bytes the queue has uploaded so far (a waiting writer waits
        on while it grows); ``on_pressure`` is called when a writer starts
        waiting (to start the queue at once)."""
        self.root = Path(node_path)
        self.queues = self.root / "queues"
        self.ballast = self.root / "cache" / "reserve"
        self._has_ballast = self.ballast.exists()
        self.wait = wait
        self.progress = progress or (lambda: 0)
        self.on_pressure = on_pressure or (lambda: None)
        self.cache: Cache | None = None
        self.error = ""
        """the last disk error met (cleared by :meth:`ok`)"""
        self.error_code: int | None = None
        self.waits = self.refused = 0
        self.refused_why = ""
        """why the last write was refused, until one gets room again"""
        self._unmeasured = 0
        self._staging = self._queue = self._tempfiles = 0
        self._changed = trio.Event()
        self.measure()
        free, total = self.disk()
        self.keep_free = keep_free(total)
        self.ballast_size = ballast_size(total)
        ours = self._staging + self._queue
        self.limit = limit if limit is not None else default_limit(free, ours)
        self.ensure_ballast()

    # -- measuring ------------------------------------------------------------
    def attach_cache(self, cache: Cache) -> None:
        self.cache = cache

    def measure(self) -> None:
        """Sum the files under NODE/queues/ again (forgetting reservations:
        what they reserved is written by now, or was not needed)."""
        self._staging, self._queue, self._tempfiles = measure_queues(self.queues)
        self._unmeasured = 0

    def disk(self) -> tuple[int, int]:
        """(free, total) bytes of the node's filesystem, for an unprivileged user."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    @property
    def cache_bytes(self) -> int:
        return self.cache.disk_bytes if self.cache is not None else 0

    @property
    def used(self) -> int:
        return self._staging + self._queue + self._unmeasured + self.cache_bytes

    def floor(self) -> int:
        """Free bytes writers leave on the disk: keep_free, and the ballast's
        room while it is given up (that room is the journal's)."""
        return self.keep_free + (0 if self._has_ballast else self.ballast_size)

    def shortfall(self, nbytes: int) -> int:
        """Bytes to free before ``nbytes`` more fit (0: they fit)."""
        free, _ = self.disk()
        return max(0, self.used + nbytes - self.limit, self.floor() - (free - nbytes))

    # -- writers ---------------------------------------------------------------
    async def reserve(self, nbytes: int) -> None:
        """Make room for ``nbytes`` about to be written to staging: evict
        cached segments, wait for the queue, or raise LocalSpaceError."""
        if nbytes <= 0:
            return
        if self.shortfall(nbytes) and not self._make_room(nbytes):
            await self._wait_for_room(nbytes)
        self._unmeasured += nbytes
        self.refused_why = ""

    def _make_room(self, nbytes: int) -> bool:
        """Measure again, then evict cached segments: whether ``nbytes`` fit now."""
        self.measure()
        need = self.shortfall(nbytes)
        if need and self.cache is not None:
            self.cache.shrink(need)
            need = self.shortfall(nbytes)
        return not need

    async def _wait_for_room(self, nbytes: int) -> None:
        """Wait while the queue uploads what it holds; LocalSpaceError once
        it holds nothing more, or after ``wait`` seconds without progress."""
        self.waits += 1
        self.on_pressure()
        last_progress = (self.progress(), self._tempfiles)
        deadline = trio.current_time() + self.wait
        logged = False
        while True:
            if not self._tempfiles or trio.current_time() >= deadline:
                self.refused += 1
                self.refused_why = self.refusal(nbytes)
                raise LocalSpaceError(self.refused_why)
            if not logged:
                log.info("a write waits for room: %s", self.refusal(nbytes))
                logged = True
            with trio.move_on_after(POLL):
                await self._changed.wait()
            if self._make_room(nbytes):
                return
            now_progress = (self.progress(), self._tempfiles)
            if now_progress != last_progress:
                last_progress = now_progress
                deadline = trio.current_time() + self.wait

    def refusal(self, nbytes: int) -> str:
        free, total = self.disk()
        if free - nbytes < self.floor():
            return f"local disk full: {format_size(free)} free of {format_size(total)}"
        return f"local limit reached: {format_size(self.used)} used of {format_size(self.limit)}"

    def changed(self) -> None:
        """Wake waiting writers to measure again (space may have been freed)."""
        self._changed.set()
        self._changed = trio.Event()

    # -- the segment cache --------------------------------------------------------
    def admit_cache(self, nbytes: int) -> bool:
        """Whether a cache file of ``nbytes`` may be written, evicting older
        ones for it where the cache itself holds the room."""
        need = self.shortfall(nbytes)
        if need and self.cache is not None and need <= self.cache.disk_bytes:
            self.cache.shrink(need)
            need = self.shortfall(nbytes)
        return not need

    # -- disk errors ---------------------------------------------------------------
    def note(self, exc: BaseException) -> None:
        """Remember a disk error for status (and log it once)."""
        text = str(exc)
        if text != self.error:
            log.warning("local disk: %s", text)
        self.error, self.error_code = text, disk_errno(exc)

    def ok(self) -> None:
        """The daemon wrote what it needed again: forget the last disk error."""
        self.error, self.error_code = "", None

    def metadata(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (a transaction of the queue); if the disk is full, give
        up the ballast and run it once more.  Other disk errors become
        LocalDiskError (with ENOSPC or EIO)."""
        try:
            result = fn()
            if self.error:
                self.ok()  # (the journal takes changes again)
            return result
        except (OSError, sqlite3.Error) as e:
            code = disk_errno(e)
            if code is None:
                raise
            self.note(e)
            if code != errno.ENOSPC or not self.drop_ballast():
                raise as_grid_error(e) from None
        try:
            return fn()
        except (OSError, sqlite3.Error) as e:
            if disk_errno(e) is None:
                raise
            self.note(e)
            raise as_grid_error(e) from None

    def drop_ballast(self) -> bool:
        """Give up the ballast; False if it was not there."""
        self._has_ballast = False
        try:
            self.ballast.unlink()
        except FileNotFoundError:
            return False
        log.warning("local disk full: gave up the %s reserve", format_size(self.ballast_size))
        return True

    def ensure_ballast(self) -> None:
        """Make the ballast if it is missing and the disk has room for it."""
        self._has_ballast = self.ballast.exists()
        if self.ballast_size <= 0 or self._has_ballast:
            return
        free, _ = self.disk()
        if free - self.ballast_size < self.keep_free + self.ballast_size:
            return
        tmp = self.ballast.with_suffix(".tmp")
        try:
            self.ballast.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.ballast_size)
            finally:
                os.close(fd)
            os.replace(tmp, self.ballast)
            self._has_ballast = True
        except OSError as e:
            log.info("no room for the local disk reserve yet: %s", e)
            with contextlib.suppress(OSError):
                tmp.unlink()

    async def watch(self, on_room: Callable[[], None]) -> None:
        """Look at the disk now and then: once it has room again after being
        full (or after a disk error), take the ballast back, wake waiting
        writers and call ``on_room`` (the queue carries on)."""
        short = False
        while True:
            await trio.sleep(WATCH)
            try:
                free, _ = self.disk()
            except OSError as e:
                self.note(e)
                continue
            if free < self.floor() + (0 if self._has_ballast else self.ballast_size):
                short = True
                continue
            self.ensure_ballast()
            if short or self.error_code == errno.ENOSPC:
                short = False
                self.refused_why = ""
                self.ok()
                self.measure()
                self.changed()
                on_room()

    # -- status ---------------------------------------------------------------
    def usage(self) -> Usage:
        self.measure()
        free, total = self.disk()
        return Usage(
            limit=self.limit,
            staging=self._staging,
            queue=self._queue,
            cache=self.cache_bytes,
            disk_free=free,
            disk_total=total,
            keep_free=self.keep_free,
            problem=self.problem(free, total),
            waits=self.waits,
            refused=self.refused,
        )

    def problem(self, free: int, total: int) -> str:
        """One line naming what is wrong with the local space, or ''."""
        if free < self.floor():
            return (
                f"local disk full: {format_size(free)} free of {format_size(total)}; "
                "writes get ENOSPC"
            )
        if self.refused_why:
            return f"{self.refused_why}; writes get ENOSPC"
        if self.used >= self.limit:
            return (
                f"local limit reached: {format_size(self.used)} used of "
                f"{format_size(self.limit)}; writes wait for uploads, then get ENOSPC"
            )
        if self.error:
            return f"local disk error: {self.error}"
        return ""


def snapshot_usage(node_path: Path, limit: int | None) -> dict[str, Any]:
    """The node's local space without a mount (for ``gridfs status``)."""
    staging, queue, _ = measure_queues(Path(node_path) / "queues")
    cache = 0
    with contextlib.suppress(OSError):
        for e in os.scandir(Path(node_path) / "cache" / "segments"):
            with contextlib.suppress(OSError):
                cache += e.stat().st_blocks * 512
    st = os.statvfs(node_path)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return {
        "limit": limit if limit is not None else default_limit(free, staging + queue),
        "used": staging + queue + cache,
        "staging": staging,
        "queue": queue,
        "cache": cache,
        "disk_free": free,
        "disk_total": total,
        "keep_free": keep_free(total),
        "problem": "",
        "waits": 0,
        "refused": 0,
        "at": time.time(),
    }
