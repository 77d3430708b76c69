"""The mount's file contents: what open, write, truncate, flush, fsync and
release do to a file's bytes, apart from FUSE.

One :class:`~daemon.files.OpenFile` per inode, shared by all its handles.
Writes go to a memory buffer while the file is small enough to live inside
its directory, else to a staging file in the queue's ``staging/``; a commit
(flush, fsync, release, a rename of an open dirty file) hands the staged
bytes to the work queue and shows the new version in the view at once, with
a placeholder cap until its upload has run.  Nothing here imports pyfuse3:
errors are OSErrors with an errno (the FUSE adapter, :mod:`daemon.fs`,
passes them on), so the state machine runs in unit tests without a mount.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from gridfs.caps import ReadCap, SliceCap
from gridfs.client.session import TreeSession
from gridfs.dirnode import DIR_INLINE_BUDGET, INLINE_MAX, Entry
from gridfs.errors import GridError
from gridfs.fileutil import written_once
from gridfs.tree import Delete, Move, Put, empty_dir_cap
from gridfs.workqueue import PENDING, is_local, is_placeholder, local_box

from .files import CapReader, OpenFile, content_source
from .segcache import SegmentCache
from .view import View

Path_ = tuple[str, ...]


class Daemon(Protocol):
    """What the state machine needs of the daemon running the queue."""

    def kick(self) -> None:
        """Start a background flush soon."""

    async def wait_synced(self) -> None:
        """Return once the grid has every queued change (-o sync)."""


class Staging:
    """The open files of one mount and the queue steps their changes become."""

    def __init__(
        self, daemon: Daemon, session: TreeSession, view: View, cache: SegmentCache, sync: bool
    ) -> None:
        self.daemon = daemon
        self.session = session
        self.queue = session.queue
        self.view = view
        self.cache = cache
        self.sync = sync
        self.open_files: dict[int, OpenFile] = {}
        self.staging_dir = self.queue.fresh_staging()
        """Files being written; the queue never sees (or cleans) them until handed over."""
        self.nursery: trio.Nursery | None = None
        """Where readers fetch segments (set once the mount runs)."""
        self._sync_lock = trio.Lock()

    # -- queueing changes -----------------------------------------------------
    async def change(self, enqueue: Callable[[], Any], change: Put | Delete | Move) -> None:
        """Queue a change (durably), then show it in the view."""
        async with self.view.lock:
            enqueue()
            await self.view.apply(change)
        self.daemon.kick()

    def queued(
        self, path: Path_, entry: Entry, sync: bool = True, base: str | None = None
    ) -> Callable[[], Any]:
        """The queue step that stores ``entry`` (as the view holds it) at ``path``
        (``sync``: see WorkQueue.transaction; ``base``: see tree.Put)."""
        text = "/" + "/".join(path)
        if is_local(entry.cap):
            box = local_box(entry.cap)

            def enqueue() -> Any:  # decided under the view lock, with the step added
                filled = self.queue.read_box(box)
                if filled is not None:  # uploaded: the box may be cleaned up any time
                    return self.queue.add_file(None, text, entry.with_(cap=filled.decode()))
                if not self.queue.uploading(box):  # a path step on it could never run
                    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
                return self.queue.add_addpath(box, text, entry.with_(cap=""))

            return enqueue
        if entry.cap.startswith(PENDING):
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))  # rare: wait for the flush
        return lambda: self.queue.add_file(None, text, entry, base, sync=sync)

    async def put_entry(self, path: Path_, entry: Entry, sync: bool = True) -> None:
        if entry.is_dir:
            # The view's cap of a directory may be stale (committed since, or
            # changed by another writer); put with the empty cap, a directory
            # that exists keeps its contents and takes only the attributes.
            entry = entry.with_(cap=empty_dir_cap(), size=0)
        elif is_local(entry.cap):
            box = local_box(entry.cap)
            if self.queue.read_box(box) is None and not self.queue.uploading(box):
                entry = await self._settled(path, entry)  # uploaded and cleaned up
        # A file as this mount last saw it: should another writer have put
        # another version there since, the commit keeps theirs beside it.
        base = _base_of(entry)
        await self.change(self.queued(path, entry, sync, base), Put(path, entry, base))

    async def _settled(self, path: Path_, entry: Entry) -> Entry:
        """``entry``, whose ``local:`` upload the queue has finished and cleaned
        up since the view was built, with the cap the tree holds for it now."""
        await self.view.rebuild()
        fresh = await self.view.lookup(path)
        if (
            fresh is None
            or is_local(fresh.cap)
            or (fresh.size, fresh.mtime_ns) != (entry.size, entry.mtime_ns)
        ):
            raise GridError(f"the queued upload of /{'/'.join(path)} is gone")
        return entry.with_(cap=fresh.cap, data=fresh.data)

    async def source(self, of: OpenFile) -> bytes | Path | ReadCap | SliceCap:
        """Where the bytes of ``of`` are (see :func:`content_source`).  The
        queue's tempfile of an open file is kept open, so that it stays
        readable after the queue uploaded and removed it (also unlinked)."""
        if of.pinned is not None:
            return Path(f"/proc/self/fd/{of.pinned}")
        get = self.view.overlay.get_bytes
        try:
            source = await content_source(self.session, of.entry, get)
        except GridError:
            if not is_local(of.entry.cap) or of.unlinked:
                raise
            of.entry = await self._settled(of.path, of.entry)
            source = await content_source(self.session, of.entry, get)
        if isinstance(source, Path):  # (no checkpoint since it was found)
            of.pinned = os.open(source, os.O_RDONLY)
            return Path(f"/proc/self/fd/{of.pinned}")
        return source

    # -- open files --------------------------------------------------------
    async def open_for(self, ino: int, path: Path_, entry: Entry) -> OpenFile:
        """The inode's open state; an open after another writer's change
        (close-to-open, as on NFS) takes the version the view shows now,
        unless the file is being written here."""
        of = self.open_files.get(ino)
        if of is None:
            of = OpenFile(ino, path, entry, size=entry.size)
            self.open_files[ino] = of
        elif entry != of.entry and not (of.staged or of.dirty or of.unlinked or of.lock.locked()):
            if of.pinned is not None and entry.cap != of.entry.cap:
                os.close(of.pinned)  # our queued version's bytes: not the current ones
                of.pinned = None
            of.entry, of.size, of.base = entry, entry.size, None
        return of

    async def open(self, ino: int, path: Path_, entry: Entry, truncate: bool = False) -> OpenFile:
        """One more handle on ``ino`` (at ``path``, now ``entry``); emptied
        with ``truncate`` (O_TRUNC).  Each open is matched by a release."""
        of = await self.open_for(ino, path, entry)
        of.handles += 1
        try:
            if not of.staged and is_local(of.entry.cap):
                await self.source(of)  # pins the queue's tempfile while open
            if truncate:
                await self.resize(of, 0)
        except BaseException:
            await self.abandon(of)
            raise
        return of

    async def create(self, ino: int, path: Path_, entry: Entry) -> OpenFile:
        """A handle on a file just made at ``path`` as ``entry`` (already
        queued: see :meth:`put_entry`); a file open there before stays
        readable through its own handles."""
        old = self.open_files.get(ino)
        if old is not None:
            old.unlinked = True
            del self.open_files[ino]
        of = await self.open_for(ino, path, entry)
        of.handles += 1
        async with of.lock:
            await self.stage(of, keep=False)
        return of

    async def release(self, of: OpenFile) -> None:
        """One handle on ``of`` fewer: the last one commits it and lets it go."""
        of.handles -= 1
        if of.handles == 0:
            await self.commit(of)
            of.dirty = False
            await self.drop_if_unused(of)

    async def abandon(self, of: OpenFile) -> None:
        """Take back a handle whose open failed (nothing is committed)."""
        of.handles -= 1
        await self.drop_if_unused(of)

    async def drop_if_unused(self, of: OpenFile) -> None:
        if of.handles == 0 and not of.dirty:
            if of.staging is not None and not of.handed_over and of.staging_name is not None:
                # committed inline (or unlinked): the queue never needs it
                (self.staging_dir / of.staging_name).unlink(missing_ok=True)
            of.close()
            if self.open_files.get(of.ino) is of:
                del self.open_files[of.ino]

    async def resize(self, of: OpenFile, size: int, changes: dict[str, Any] | None = None) -> None:
        """Truncate or extend ``of`` to ``size`` (ftruncate, open with
        O_TRUNC), with ``changes`` to its attributes (which then stay at
        commit); dirty until committed."""
        async with of.lock:
            await self.stage(of, keep=size > 0)
            self.truncate(of, size)
            of.dirty = True
            if changes is not None:
                of.entry = of.entry.with_(**changes)
                of.mtime_set = True

    async def stage(self, of: OpenFile, keep: bool) -> None:
        """Make sure ``of`` has a private buffer or staging file (holding its
        current bytes when ``keep``) before it is written."""
        if of.buffer is not None or (of.staging is not None and not of.handed_over):
            return
        if of.base is None:
            of.base = _base_of(of.entry)
        of.hasher = None  # (restarted by a write to the file while empty)
        if not keep or (of.staging is None and of.entry.size <= INLINE_MAX):
            if keep and of.entry.size:
                source = await self.source(of)
                if not isinstance(source, bytes):
                    source = await self._read_small(of, source)
                of.buffer = bytearray(source[: of.entry.size])
            else:
                of.buffer = bytearray()
            if of.staging is not None:  # handed over: the queue's now
                os.close(of.staging)
                of.staging, of.staging_name = None, None
            of.handed_over = False
            of.size = len(of.buffer)
            return
        await self._stage_file(of, keep)

    async def _read_small(self, of: OpenFile, source: Path | ReadCap | SliceCap) -> bytes:
        if isinstance(source, Path):
            with open(source, "rb") as f:
                return f.read(INLINE_MAX + 1)
        assert self.nursery is not None
        reader = CapReader(self.session, source, self.cache)
        try:
            return await reader.read(0, source.size, self.nursery)
        finally:
            reader.close()

    def truncate(self, of: OpenFile, size: int) -> None:
        """Set the size of a staged file."""
        if of.buffer is not None and size > INLINE_MAX:
            self._spill(of)
        if of.buffer is not None:
            if size < len(of.buffer):
                del of.buffer[size:]
            else:
                of.buffer.extend(bytes(size - len(of.buffer)))
        else:
            assert of.staging is not None
            os.ftruncate(of.staging, size)
        of.size = size
        if size != of.hashed:
            of.hasher = None

    def _spill(self, of: OpenFile) -> None:
        """Move the buffer of ``of``, about to grow past INLINE_MAX, to a staging file."""
        assert of.buffer is not None and of.staging is None
        name = uuid.uuid4().hex
        fd = os.open(self.staging_dir / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.pwrite(fd, of.buffer, 0)
        except BaseException:
            os.close(fd)
            os.unlink(self.staging_dir / name)
            raise
        of.staging, of.staging_name, of.handed_over, of.buffer = fd, name, False, None

    async def _stage_file(self, of: OpenFile, keep: bool) -> None:
        name = uuid.uuid4().hex
        fd = os.open(self.staging_dir / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if keep and of.staging is not None:  # copy-on-write after a hand-over
                await trio.to_thread.run_sync(_copy_fd, of.staging, fd, of.size)
            elif keep and of.entry.size:
                await self._fill(of, fd)
        except BaseException:
            os.close(fd)
            os.unlink(self.staging_dir / name)
            raise
        if of.staging is not None:
            os.close(of.staging)
        of.staging, of.staging_name, of.handed_over = fd, name, False
        of.size = os.fstat(fd).st_size

    async def _fill(self, of: OpenFile, fd: int) -> None:
        source = await self.source(of)
        if isinstance(source, bytes):
            os.pwrite(fd, source, 0)
        elif isinstance(source, Path):
            with open(source, "rb") as src:
                size = os.fstat(src.fileno()).st_size
                await trio.to_thread.run_sync(_copy_fd, src.fileno(), fd, size)
        else:
            assert self.nursery is not None
            reader = CapReader(self.session, source, self.cache)
            try:
                step = 4 << 20
                for off in range(0, source.size, step):
                    os.pwrite(fd, await reader.read(off, step, self.nursery), off)
            finally:
                reader.close()

    async def read(self, of: OpenFile, off: int, size: int) -> bytes:
        """Bytes [off, off + size) of ``of`` as this mount sees them."""
        if of.buffer is not None:
            return bytes(of.buffer[off : off + size])
        if of.staging is not None:
            return os.pread(of.staging, size, off)
        if of.entry.kind != "file":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        assert self.nursery is not None
        if of.reader is not None and of.reader_cap == of.entry.cap:
            return await of.reader.read(off, size, self.nursery)
        source = await self.source(of)
        if isinstance(source, bytes):
            return source[off : off + size]
        if isinstance(source, Path):
            with open(source, "rb") as f:
                return os.pread(f.fileno(), size, off)
        if of.reader is not None:  # made for a version the entry no longer names
            of.reader.close()
        of.reader, of.reader_cap = CapReader(self.session, source, self.cache), of.entry.cap
        return await of.reader.read(off, size, self.nursery)

    async def write(self, of: OpenFile, off: int, buf: bytes) -> None:
        """Stage ``buf`` at ``off`` of ``of``."""
        async with of.lock:
            await self.stage(of, keep=True)
            end = off + len(buf)
            of.hash_write(off, buf)
            if of.buffer is not None and end > INLINE_MAX:
                self._spill(of)
            if of.buffer is not None:
                if off > len(of.buffer):  # a hole
                    of.buffer.extend(bytes(off - len(of.buffer)))
                of.buffer[off:end] = buf
            else:
                assert of.staging is not None
                os.pwrite(of.staging, buf, off)
                if off >= of.size:  # appending: staged once, read once by the upload
                    written_once(of.staging, off, len(buf))
            of.size = max(of.size, end)
            of.dirty, of.mtime_set = True, False

    async def commit(self, of: OpenFile, wait: bool = True) -> None:
        """Hand a dirty file to the work queue: durable when this returns
        (and, with -o sync and ``wait``, on the grid)."""
        async with of.lock:
            if not of.dirty or not of.staged:
                return
            of.dirty = False
            if of.unlinked:
                return
            now = time.time_ns()
            base, of.base = of.base, None
            mtime = of.entry.mtime_ns if of.mtime_set else now  # tar: futimens, then close
            entry = of.entry.with_(size=of.size, mtime_ns=mtime, ctime_ns=now, cap="", data=None)
            text = "/" + "/".join(of.path)
            if of.size <= INLINE_MAX and of.size <= DIR_INLINE_BUDGET:
                if of.buffer is not None:
                    data = bytes(of.buffer)
                else:
                    assert of.staging is not None
                    data = os.pread(of.staging, of.size, 0)
                entry = entry.with_(data=data)
                await self.change(self.queued(of.path, entry, base=base), Put(of.path, entry, base))
            else:
                assert of.staging is not None, "a buffer never holds more than INLINE_MAX"
                await trio.to_thread.run_sync(os.fsync, of.staging)
                name = of.staging_name
                assert name is not None
                # The queue takes the staging file over: it moves among its
                # tempfiles (the open descriptor keeps reading it).
                tempfile = self.queue.adopt(self.staging_dir / name)
                digest = of.plaintext_digest()
                if digest is not None:
                    self.session.digests.add(tempfile, digest)
                async with self.view.lock:
                    box = self.queue.add_file(tempfile, text, entry, base)
                    assert box is not None
                    view_entry = entry.with_(cap=self.queue.placeholder(box, tempfile))
                    await self.view.apply(Put(of.path, view_entry, base))
                self.daemon.kick()
                entry = view_entry
                of.handed_over = True
            of.entry = entry
        if self.sync and wait:
            await self.daemon.wait_synced()

    async def sync_queue(self) -> None:
        """Make the queued steps durable, fsyncing in a thread (the event loop
        serves other requests meanwhile).  One at a time: a second caller
        must not return while the first one's fsync is still running."""
        async with self._sync_lock:
            if self.queue.unsynced:
                await trio.to_thread.run_sync(self.queue.sync)


def _copy_fd(src: int, dst: int, size: int) -> None:
    off = 0
    while off < size:
        n = os.copy_file_range(src, dst, size - off, off, off)
        if n == 0:
            break
        off += n


def _base_of(entry: Entry) -> str | None:
    """The cap a change of ``entry`` names as the version it started from
    (tree.Put's base), or None where it cannot be told: a directory (its
    entry is put with the empty cap), a version still queued here (its cap is
    not known yet), and a small file inside its directory (no cap of its own:
    its commit may give it one, and its own next change would then look like
    another writer's)."""
    if entry.is_dir or not entry.cap or is_placeholder(entry.cap):
        return None
    return entry.cap
