"""The mount's file contents: what open, write, truncate, flush, fsync and
release do to a file's bytes, apart from FUSE.

One :class:`~daemon.files.OpenFile` per inode, shared by all its handles.
Writes go to a memory buffer while the file is small enough to live inside
its directory, else to a staging file in the queue's ``staging/``.  A file
that has a version on the grid (or queued) is staged as an *edit*: a sparse
staging file holding only the ranges written, plus their extents; reads of
the other ranges go to that version (through the segment reader, with
read-ahead).  A commit (flush, fsync, release, a rename of an open dirty
file) hands the staged bytes to the work queue (an edit as an
``upload_edit`` step, folded into the file's previous edit if that one's
upload has not started) and shows the new version in the view at once, with
a placeholder cap until its upload has run.  Nothing here imports pyfuse3:
errors are OSErrors with an errno (the FUSE adapter, :mod:`daemon.fs`,
passes them on), so the state machine runs in unit tests without a mount.
"""

from __future__ import annotations

import errno
import functools
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import trio

from gridfs.caps import LiteralCap, SliceCap, parse_read_cap
from gridfs.client.session import TreeSession
from gridfs.dirnode import DIR_INLINE_BUDGET, INLINE_MAX, Entry
from gridfs.errors import GridError
from gridfs.extents import Extents, add, clip, pieces, union
from gridfs.fileutil import written_once
from gridfs.localspace import LocalSpace
from gridfs.sparse import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, punch_hole
from gridfs.tree import Delete, Move, Put, empty_dir_cap
from gridfs.workqueue import EDIT_SUFFIX, PENDING, QueuedEdit, is_local, is_placeholder, local_box

from .content import Content, Readers, open_content, read_patched
from .files import OpenFile
from .segcache import SegmentCache
from .view import View

Path_ = tuple[str, ...]
COPY_STEP = 4 << 20
"""Bytes copied at a time when a file is staged whole."""


class BoxGone(OSError):
    """EAGAIN: a ``local:`` cap's upload was stored and cleaned up, so no
    queue step can name it; the tree holds its cap now."""


class Daemon(Protocol):
    """What the state machine needs of the daemon running the queue."""

    space: LocalSpace
    """The node's local disk budget: staged bytes are reserved in it first."""

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
        self.space = daemon.space
        self.session = session
        self.queue = session.queue
        self.view = view
        self.cache = cache
        self.sync = sync
        self.open_files: dict[int, OpenFile] = {}
        self.staging_dir = self.queue.fresh_staging()
        """Files being written; the queue never sees (or cleans) them until handed over."""
        self._nursery: trio.Nursery | None = None
        self.readers: Readers | None = None
        """The grid's versions being read (set with the nursery)."""
        self._sync_lock = trio.Lock()

    @property
    def nursery(self) -> trio.Nursery | None:
        """Where readers fetch segments (set once the mount runs)."""
        return self._nursery

    @nursery.setter
    def nursery(self, nursery: trio.Nursery | None) -> None:
        self._nursery = nursery
        if self.readers is not None:
            self.readers.close()
        self.readers = None if nursery is None else Readers(self.session, self.cache, nursery)

    # -- queueing changes -----------------------------------------------------
    async def change(self, enqueue: Callable[[], Any], change: Put | Delete | Move) -> None:
        """Queue a change (durably), then show it in the view."""
        async with self.view.lock:
            self.space.metadata(enqueue)  # (even on a full disk: rm must work)
            await self.view.apply(change)
        self.daemon.kick()

    def queued(
        self,
        path: Path_,
        entry: Entry,
        sync: bool = True,
        base: str | None = None,
        soft: bool = False,
    ) -> Callable[[], Any]:
        """The queue step that stores ``entry`` (as the view holds it) at ``path``
        (``sync``: see WorkQueue.transaction; ``base``, ``soft``: see tree.Put)."""
        text = "/" + "/".join(path)
        if is_local(entry.cap):
            box = local_box(entry.cap)

            def enqueue() -> Any:  # decided under the view lock, with the step added
                filled = self.queue.read_box(box)
                if filled is not None:  # uploaded: the box may be cleaned up any time
                    return self.queue.add_file(None, text, entry.with_(cap=filled.decode()))
                if not self.queue.uploading(box):  # a path step on it could never run
                    raise BoxGone(errno.EAGAIN, os.strerror(errno.EAGAIN))
                return self.queue.add_addpath(box, text, entry.with_(cap=""))

            return enqueue
        if entry.cap.startswith(PENDING):
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))  # rare: wait for the flush
        return lambda: self.queue.add_file(None, text, entry, base, sync=sync, soft=soft)

    async def put_entry(
        self, path: Path_, entry: Entry, sync: bool = True, soft: bool = False
    ) -> None:
        """Store ``entry`` at ``path`` (``soft``, for an atime a read moved:
        only over the version the mount saw, see tree.Put)."""
        if entry.is_dir:
            # The view's cap of a directory may be stale (committed since, or
            # changed by another writer); put with the empty cap, a directory
            # that exists keeps its contents and takes only the attributes.
            entry = entry.with_(cap=empty_dir_cap(), size=0)
        elif is_local(entry.cap):
            box = local_box(entry.cap)
            if self.queue.read_box(box) is None and not self.queue.uploading(box):
                entry = await self._settled(path, entry)  # uploaded and cleaned up
        try:
            await self._put(path, entry, sync, soft)
        except BoxGone:
            # Its upload finished and was cleaned up while this waited for
            # the view: once more, with the cap the tree holds now.
            await self._put(path, await self._settled(path, entry), sync, soft)

    async def _put(self, path: Path_, entry: Entry, sync: bool, soft: bool) -> None:
        # A file as this mount last saw it: should another writer have put
        # another version there since, the commit keeps theirs beside it.
        base = _base_of(entry)
        if soft:  # (the cap it was read as; "" for a file inside its directory)
            if entry.is_dir or is_placeholder(entry.cap):
                return  # (a version not uploaded yet: its commit carries the atime)
            base = entry.cap
        queued = self.queued(path, entry, sync, base, soft)
        await self.change(queued, Put(path, entry, base, soft))

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

    async def content(self, of: OpenFile) -> Content:
        """The bytes of the version the entry of ``of`` names (not its staged
        changes), opened once a version: a queued tempfile stays open, and so
        readable after the queue uploaded and removed it (also unlinked)."""
        key = (of.entry.cap, of.entry.data)
        if of.content is not None and of.content_key == key:
            return of.content
        self._drop_content(of)
        assert self.readers is not None
        get = self.view.overlay.get_bytes
        try:
            content = await open_content(self.readers, of.entry, get)
        except GridError:
            if not is_local(of.entry.cap) or of.unlinked:
                raise
            of.entry = await self._settled(of.path, of.entry)
            content = await open_content(self.readers, of.entry, get)
        of.content, of.content_key = content, (of.entry.cap, of.entry.data)
        return content

    def _drop_content(self, of: OpenFile) -> None:
        if of.content is not None:
            of.content.close()
            of.content, of.content_key = None, None

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
            if entry.cap != of.entry.cap or entry.data != of.entry.data:
                self._drop_content(of)  # our queued version's bytes: not the current ones
            of.entry, of.size, of.base = entry, entry.size, None
        return of

    async def open(self, ino: int, path: Path_, entry: Entry, truncate: bool = False) -> OpenFile:
        """One more handle on ``ino`` (at ``path``, now ``entry``); emptied
        with ``truncate`` (O_TRUNC).  Each open is matched by a release."""
        of = await self.open_for(ino, path, entry)
        of.handles += 1
        try:
            if not of.staged and is_local(of.entry.cap):
                await self.content(of)  # holds the queue's tempfile while open
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
            self._unstage(of)  # (unlinked, or not changed: the queue never needs it)
            of.close()
            if self.open_files.get(of.ino) is of:
                del self.open_files[of.ino]

    # -- changing the bytes ------------------------------------------------
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

    async def fallocate(self, of: OpenFile, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on ``of``: mode 0 extends the file to cover the range
        (nothing needs reserving: the staging file is sparse, the grid holds
        what is uploaded), FALLOC_FL_KEEP_SIZE does nothing, PUNCH_HOLE (with
        KEEP_SIZE) zeroes the range as a hole; any other mode EOPNOTSUPP."""
        punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if mode not in (0, FALLOC_FL_KEEP_SIZE, punch):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        if offset < 0 or length <= 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        end = offset + length
        async with of.lock:
            if mode == 0 and end > of.size:
                await self.stage(of, keep=True)
                self.truncate(of, end)
            elif mode == punch and offset < of.size:
                await self.stage(of, keep=True)
                self._punch(of, offset, min(end, of.size) - offset)
            else:
                return
            of.dirty, of.mtime_set = True, False

    def _punch(self, of: OpenFile, offset: int, length: int) -> None:
        if of.buffer is not None:
            of.buffer[offset : offset + length] = bytes(length)
        else:
            assert of.staging is not None
            punch_hole(of.staging, offset, length)
            if of.extents is not None:
                of.extents = add(of.extents, offset, length)
        of.hasher = None

    async def stage(self, of: OpenFile, keep: bool) -> None:
        """Make sure ``of`` has a private buffer or staging file (showing its
        current bytes when ``keep``) before it is written."""
        if of.staged:
            return
        if of.base is None:
            of.base = _base_of(of.entry)
        of.hasher = None  # (restarted by a write to the file while empty)
        size = of.entry.size
        if not keep or size <= INLINE_MAX:
            data = await (await self.content(of)).read(0, size) if keep and size else b""
            of.buffer = bytearray(data[:size].ljust(size, b"\0"))
            of.size = len(of.buffer)
            return
        ref = self._edit_base(of)
        content = await self.content(of)
        of.staging, of.staging_name = self._new_staging(edit=ref is not None)
        of.size = size
        if ref is not None:  # only what is written is staged
            os.ftruncate(of.staging, size)
            of.extents, of.origin, of.origin_size, of.origin_ref = [], content, size, ref
            of.content, of.content_key = None, None  # (the origin's now)
            return
        try:
            await self.space.reserve(size)  # the current bytes are copied: room first
            for off in range(0, size, COPY_STEP):
                os.pwrite(of.staging, await content.read(off, COPY_STEP), off)
        except BaseException:
            self._unstage(of)
            raise

    def _edit_base(self, of: OpenFile) -> tuple[str | None, str | None] | None:
        """What an edit of the version of ``of`` can name as its base: (cap,
        None), or (None, box) while that version's upload is queued; None
        if its bytes are staged whole instead (a file in a pack, or whose
        queued upload is gone)."""
        cap = of.entry.cap
        if of.entry.data is not None or not cap or cap.startswith(PENDING):
            return None
        if is_local(cap):
            box = local_box(cap)
            filled = self.queue.read_box(box)
            if filled is None:
                return (None, box) if self.queue.uploading(box) else None
            cap = filled.decode()
        try:
            parsed = parse_read_cap(cap)
        except GridError:
            return None
        return None if isinstance(parsed, LiteralCap | SliceCap) else (cap, None)

    def _new_staging(self, edit: bool) -> tuple[int, str]:
        name = uuid.uuid4().hex + (EDIT_SUFFIX if edit else "")
        fd = os.open(self.staging_dir / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return fd, name

    def _unstage(self, of: OpenFile) -> None:
        """Let the staging file (if the queue has not taken it) and the
        version it edits go."""
        if of.staging is not None:
            os.close(of.staging)
            if of.staging_name is not None:
                (self.staging_dir / of.staging_name).unlink(missing_ok=True)
        if of.origin is not None:
            of.origin.close()
        of.staging, of.staging_name, of.extents, of.origin, of.origin_ref = (
            None,
            None,
            None,
            None,
            None,
        )
        of.buffer = None

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
            if of.extents is not None:
                of.extents = clip(of.extents, size)
                of.origin_size = min(of.origin_size, size)
        of.size = size
        if size != of.hashed:
            of.hasher = None

    def _spill(self, of: OpenFile) -> None:
        """Move the buffer of ``of``, about to grow past INLINE_MAX, to a staging file."""
        assert of.buffer is not None and of.staging is None
        fd, name = self._new_staging(edit=False)
        try:
            os.pwrite(fd, of.buffer, 0)
        except BaseException:
            os.close(fd)
            os.unlink(self.staging_dir / name)
            raise
        of.staging, of.staging_name, of.buffer = fd, name, None

    async def read(self, of: OpenFile, off: int, size: int) -> bytes:
        """Bytes [off, off + size) of ``of`` as this mount sees them."""
        if of.buffer is not None:
            return bytes(of.buffer[off : off + size])
        if of.staging is not None:
            if of.extents is None:
                return os.pread(of.staging, size, off)
            limit = of.origin_size
            return await read_patched(of.staging, of.extents, of.size, of.origin, limit, off, size)
        if of.entry.kind != "file":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return await (await self.content(of)).read(off, size)

    async def write(self, of: OpenFile, off: int, buf: bytes) -> None:
        """Stage ``buf`` at ``off`` of ``of``."""
        async with of.lock:
            await self.stage(of, keep=True)
            end = off + len(buf)
            if of.buffer is None or end > INLINE_MAX:  # to disk: room for it first
                await self.space.reserve(len(buf) + len(of.buffer or b""))
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
                if of.extents is not None:
                    of.extents = add(of.extents, off, len(buf))
                elif off >= of.size:  # appending: staged once, read once by the upload
                    written_once(of.staging, off, len(buf))
            of.size = max(of.size, end)
            of.dirty, of.mtime_set = True, False

    # -- commits -----------------------------------------------------------
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
            if of.size <= INLINE_MAX and of.size <= DIR_INLINE_BUDGET:
                entry = entry.with_(data=await self.read(of, 0, of.size))
                await self.change(self.queued(of.path, entry, base=base), Put(of.path, entry, base))
            else:
                assert of.staging is not None, "a buffer never holds more than INLINE_MAX"
                if of.extents is not None and not await self._editable(of):
                    await self._fill_whole(of)
                await trio.to_thread.run_sync(os.fsync, of.staging)
                if of.extents is not None:
                    entry = await self._hand_over_edit(of, entry, base)
                else:
                    entry = await self._hand_over_whole(of, entry, base)
                self.daemon.kick()
            of.entry = entry
            self._unstage(of)  # the next write stages anew, over this version
        if self.sync and wait:
            await self.daemon.wait_synced()

    def _edit_extents(self, of: OpenFile) -> Extents:
        """The ranges of ``of`` an edit changed, relative to its origin:
        those written or punched, and those a truncation below the origin's
        end then an extension zeroed."""
        assert of.extents is not None and of.origin is not None
        zeroed = min(of.origin.size, of.size) - of.origin_size
        return union(clip(of.extents, of.size), [(of.origin_size, zeroed)] if zeroed > 0 else [])

    async def _editable(self, of: OpenFile) -> bool:
        """The edit of ``of`` can name its base (the box of a queued base
        may have been uploaded and cleaned up since it was staged), and is
        not the whole file anyway."""
        assert of.origin_ref is not None
        box = of.origin_ref[1]
        if box is not None:
            filled = self.queue.read_box(box)
            if filled is not None:
                of.origin_ref = (filled.decode(), None)
            elif not self.queue.uploading(box):
                return False
        return self._edit_extents(of) != [(0, of.size)]

    async def _fill_whole(self, of: OpenFile) -> None:
        """Turn the edit of ``of`` into its whole file: copy in the ranges it
        did not change, from its origin."""
        assert of.staging is not None and of.extents is not None
        limit = min(of.origin_size, of.size)
        for at, length, inside in pieces(of.extents, 0, limit):
            if not inside:
                for off in range(at, at + length, COPY_STEP):
                    n = min(COPY_STEP, at + length - off)
                    assert of.origin is not None
                    os.pwrite(of.staging, await of.origin.read(off, n), off)
        of.extents = None

    async def _hand_over_whole(self, of: OpenFile, entry: Entry, base: str | None) -> Entry:
        assert of.staging_name is not None
        # The queue takes the staging file over: it moves among its tempfiles.
        tempfile = self.queue.adopt(self.staging_dir / of.staging_name)
        of.staging_name = None
        digest = of.plaintext_digest()
        if digest is not None:
            self.session.digests.add(tempfile, digest)
        async with self.view.lock:
            add = functools.partial(self.queue.add_file, tempfile, "/" + "/".join(of.path))
            box = self.space.metadata(lambda: add(entry, base))
            assert box is not None
            view_entry = entry.with_(cap=self.queue.placeholder(box, tempfile))
            await self.view.apply(Put(of.path, view_entry, base))
        return view_entry

    async def _hand_over_edit(self, of: OpenFile, entry: Entry, base: str | None) -> Entry:
        """Queue the edit of ``of`` (its base is named: see _editable),
        folded into the queued edit it changes when that one has not
        started uploading."""
        assert of.staging_name is not None and of.origin_ref is not None
        staged = self.staging_dir / of.staging_name
        extents, text = self._edit_extents(of), "/" + "/".join(of.path)
        base_cap, base_box = of.origin_ref
        async with self.view.lock:
            tempfile = None
            if base_box is not None:
                merge = functools.partial(self.queue.merge_edit, base_box, staged, extents)
                tempfile = self.space.metadata(lambda: merge(of.size, text, entry, base))
            if tempfile is not None:
                assert base_box is not None
                box = base_box
            else:
                tempfile = self.queue.adopt(staged)
                edit = QueuedEdit(tempfile, extents, of.size, base_cap, base_box)
                box = self.space.metadata(
                    lambda: self.queue.add_edit(tempfile, text, entry, edit, base)
                )
            of.staging_name = None
            view_entry = entry.with_(cap=self.queue.placeholder(box, tempfile))
            await self.view.apply(Put(of.path, view_entry, base))
        return view_entry

    async def sync_queue(self) -> None:
        """Make the queued steps durable, fsyncing in a thread (the event loop
        serves other requests meanwhile).  One at a time: a second caller
        must not return while the first one's fsync is still running."""
        async with self._sync_lock:
            if self.queue.unsynced:
                await trio.to_thread.run_sync(self.queue.sync)


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
