"""The FUSE adapter: inodes and handles in, EntryAttributes and errno out.

What a file *is* lives in :mod:`daemon.view` (the tree), :mod:`daemon.files`
(open files) and the work queue; this module only translates.  Every handler
goes through :func:`errors_to_errno`, so a bug in one answers EIO and is
logged instead of taking the mount down.

It is longer than our other modules because pyfuse3 wants every request
handler as a method of one Operations class; each handler stays a few lines
of translation, and splitting the class would only scatter that table.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import pyfuse3
import trio

from gridfs.caps import ReadCap, SliceCap
from gridfs.client.session import TreeSession
from gridfs.dirnode import DIR_INLINE_BUDGET, INLINE_MAX, KIND_OF_FORMAT, Entry, check_name
from gridfs.errors import GridError, UsageError
from gridfs.fileutil import fsync_dir, written_once
from gridfs.localspace import LocalSpace, disk_errno
from gridfs.tree import Delete, Move, NotFoundError, Put, empty_dir_cap, new_dir_entry

from . import atime, links, perms
from .capattrs import CAP_XATTRS, cap_xattr
from .files import CapReader, OpenFile, content_source
from .inodes import Inodes
from .perms import Caller, Owners
from .segcache import SegmentCache
from .snapshots import in_snapshots
from .view import View

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
Path_ = tuple[str, ...]
TIMEOUT = 1.0
"""Seconds the kernel may cache names and attributes (other writers' changes
show up within the refresh interval plus this)."""
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
XATTR_PREFIX = "user."


def errors_to_errno(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except NotFoundError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except PermissionError as e:  # daemon.perms: EPERM or EACCES
            raise pyfuse3.FUSEError(e.errno or errno.EPERM) from None
        except UsageError as e:
            log.debug("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(errno.EINVAL) from None
        except GridError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except OSError as e:
            log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception as e:
            code = disk_errno(e)  # a full or failing local disk (e.g. SQLite's)
            if code is None:
                log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(code or errno.EIO) from None

    return cast(F, wrapper)


def fuse_name(name: bytes) -> str:
    try:
        return check_name(name.decode("utf-8"))
    except UnicodeDecodeError:
        raise pyfuse3.FUSEError(errno.EILSEQ) from None
    except UsageError:
        if len(name) > 255:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG) from None
        raise pyfuse3.FUSEError(errno.EINVAL) from None


DIR_SIZE = 4096
"""What stat reports as a directory's size (as ext4 does for a small one)."""


class GridOperations(pyfuse3.Operations):
    supports_dot_lookup = False
    readonly = False
    """Refuse every change with EROFS (a read-only tree, or -o ro)."""

    def __init__(self, daemon: Any, session: TreeSession, view: View, sync: bool) -> None:
        super().__init__()
        self.daemon = daemon
        self.session = session
        self.queue = session.queue
        self.view = view
        self.sync = sync
        self.inodes = Inodes()
        self.open_files: dict[int, OpenFile] = {}
        self.handles: dict[int, int] = {}
        self._next_fh = 1
        self.space: LocalSpace = daemon.space
        self.cache = SegmentCache(
            session.grid.node.path / "cache" / "segments",
            self.space.limit,
            keep_scans=daemon.options.cache_scans,
        )
        self.uid, self.gid = os.getuid(), os.getgid()
        multiuser = self.uid == 0 or daemon.options.allow_other
        self.owners = Owners(self.uid, self.gid, multiuser, *daemon.options.idmaps)
        self.killpriv: dict[int, Caller] = {}
        """Handles whose writes clear setuid/setgid: by their opener (see perms)."""
        self.staging_dir = self.queue.directory / "staging"
        """Files being written; the queue never sees (or cleans) them until handed over."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)  # never acknowledged: discard
        self.staging_dir.mkdir(mode=0o700)
        self.nursery: trio.Nursery | None = None
        self._sync_lock = trio.Lock()
        self.initialized = trio.Event()
        """Set once the kernel's INIT has been handled (its reply goes out
        before any other task runs)."""

    def init(self) -> None:
        self.initialized.set()

    # -- attributes ---------------------------------------------------------
    def attrs(self, ino: int, entry: Entry) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = TIMEOUT
        a.attr_timeout = TIMEOUT
        a.st_mode = entry.st_mode
        of = self.open_files.get(ino)
        gone = of is not None and of.unlinked  # (open, with no name left)
        a.st_nlink = 0 if gone else links.count(self.view, self.inodes.paths.get(ino, ()), entry)
        a.st_uid, a.st_gid = self.owners.ids(entry)
        a.st_rdev = entry.rdev
        size = of.size if of is not None and of.staged else entry.size
        if entry.kind == "symlink":
            size = len(entry.target.encode())
        elif entry.is_dir:
            # Not the entry count: that changes when queued changes are
            # committed, and tar or rsync would see the directory "change".
            size = DIR_SIZE
        a.st_size = size
        a.st_blksize = 128 * 1024
        a.st_blocks = (size + 511) // 512
        a.st_mtime_ns = entry.mtime_ns
        a.st_ctime_ns = entry.ctime_ns or entry.mtime_ns
        a.st_atime_ns = atime.atime(entry)
        return a

    async def new_entry(self, path: Path_, entry: Entry, ctx: Any) -> Entry:
        """``entry``, about to be made at ``path`` by ``ctx``'s caller, with
        its owner and group (and a setgid directory's bits)."""
        parent = await self.view.lookup(path[:-1])
        assert parent is not None
        return self.owners.created(entry, parent, self.owners.caller(ctx))

    async def entry_of(self, ino: int) -> Entry:
        of = self.open_files.get(ino)
        if of is not None and of.unlinked:
            return of.entry
        entry = await self.view.lookup(self.inodes.path(ino))
        if entry is None:
            if of is not None:
                return of.entry
            raise pyfuse3.FUSEError(errno.ENOENT)
        return entry

    @errors_to_errno
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        path = (*self.inodes.path(parent_inode), fuse_name(name))
        path, entry = await links.resolve(self.view, path)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        await links.ensure_counted(self.view, path, entry)
        return self.attrs(self.inodes.get(path), entry)

    @errors_to_errno
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        entry = await self.entry_of(inode)
        await links.ensure_counted(self.view, self.inodes.path(inode), entry)
        return self.attrs(inode, entry)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        return None  # inode numbers stay stable for the daemon's lifetime

    @errors_to_errno
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        entry = await self.entry_of(inode)
        if entry.kind != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return entry.target.encode()

    # -- changing the tree ----------------------------------------------------
    async def change(self, enqueue: Callable[[], Any], change: Put | Delete | Move) -> None:
        """Queue a change (durably), then show it in the view."""
        async with self.view.lock:
            self.space.metadata(enqueue)  # (even on a full disk: rm must work)
            await self.view.apply(change)
        self.daemon.kick()

    def queued(
        self, path: Path_, entry: Entry, sync: bool = True, base: str | None = None
    ) -> Callable[[], Any]:
        """The queue step that stores ``entry`` (as the view holds it) at ``path``
        (``sync``: see WorkQueue.transaction; ``base``: see tree.Put)."""
        text = "/" + "/".join(path)
        if entry.cap.startswith("local:"):
            box = entry.cap.split(":", 2)[1]

            def enqueue() -> Any:  # decided under the view lock, with the step added
                filled = self.queue.read_box(box)
                if filled is not None:  # uploaded: the box may be cleaned up any time
                    return self.queue.add_file(None, text, entry.with_(cap=filled.decode()))
                if not self._uploading(box):  # a path step on it could never run
                    raise pyfuse3.FUSEError(errno.EAGAIN)
                return self.queue.add_addpath(box, text, entry.with_(cap=""))

            return enqueue
        if entry.cap.startswith("pending:"):
            raise pyfuse3.FUSEError(errno.EAGAIN)  # rare: wait for the flush
        return lambda: self.queue.add_file(None, text, entry, base, sync=sync)

    async def put_entry(self, path: Path_, entry: Entry, sync: bool = True) -> None:
        if entry.is_dir:
            # The view's cap of a directory may be stale (committed since, or
            # changed by another writer); put with the empty cap, a directory
            # that exists keeps its contents and takes only the attributes.
            entry = entry.with_(cap=empty_dir_cap(), size=0)
        elif entry.cap.startswith("local:"):
            box = entry.cap.split(":", 2)[1]
            if self.queue.read_box(box) is None and not self._uploading(box):
                entry = await self._settled(path, entry)  # uploaded and cleaned up
        # A file as this mount last saw it: should another writer have put
        # another version there since, the commit keeps theirs beside it.
        base = _base_of(entry)
        await self.change(self.queued(path, entry, sync, base), Put(path, entry, base))

    def _uploading(self, box: str) -> bool:
        return any(s.kind == "upload_chk" and s.args["box"] == box for s in self.queue.pending())

    async def _settled(self, path: Path_, entry: Entry) -> Entry:
        """``entry``, whose ``local:`` upload the queue has finished and cleaned
        up since the view was built, with the cap the tree holds for it now."""
        await self.view.rebuild()
        fresh = await self.view.lookup(path)
        if (
            fresh is None
            or fresh.cap.startswith("local:")
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
            if not of.entry.cap.startswith("local:") or of.unlinked:
                raise
            of.entry = await self._settled(of.path, of.entry)
            source = await content_source(self.session, of.entry, get)
        if isinstance(source, Path):  # (no checkpoint since it was found)
            of.pinned = os.open(source, os.O_RDONLY)
            return Path(f"/proc/self/fd/{of.pinned}")
        return source

    def check_writable(self, path: Path_) -> None:
        """EROFS, before anything is looked at or queued, for a change on a
        read-only mount or under .snapshots."""
        if self.readonly or in_snapshots(path):
            raise pyfuse3.FUSEError(errno.EROFS)

    async def _child(self, parent_inode: int, name: bytes) -> tuple[Path_, Entry | None]:
        """The path and entry of a name about to be made, removed or renamed."""
        path = (*self.inodes.path(parent_inode), fuse_name(name))
        self.check_writable(path)
        if await links.hidden(self.view, path):  # a slot's records: a reserved name
            raise pyfuse3.FUSEError(errno.EPERM)
        return path, await self.view.lookup(path)

    @errors_to_errno
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path, existing = await self._child(parent_inode, name)
        if existing is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        entry = await self.new_entry(path, new_dir_entry().with_(mode=mode & 0o7777), ctx)
        await self.put_entry(path, entry)
        return self.attrs(self.inodes.get(path), entry)

    @errors_to_errno
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path, existing = await self._child(parent_inode, name)
        if existing is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        now = time.time_ns()
        entry = Entry("symlink", "", 0, 0o777, now, now, os.fsdecode(target))
        entry = await self.new_entry(path, entry, ctx)
        await self.put_entry(path, entry)
        return self.attrs(self.inodes.get(path), entry)

    @errors_to_errno
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        """FIFOs, sockets (bind), device nodes: entries with no content (the
        kernel itself serves what is opened: a FIFO is a local pipe)."""
        path, existing = await self._child(parent_inode, name)
        if existing is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        kind = KIND_OF_FORMAT.get(stat.S_IFMT(mode) or stat.S_IFREG)
        if kind is None or kind in ("dir", "symlink"):
            raise pyfuse3.FUSEError(errno.EINVAL)
        now = time.time_ns()
        entry = Entry(kind, "", 0, mode & 0o7777, now, now)
        if kind == "file":
            entry = entry.with_(data=b"")
        elif kind in ("chr", "blk"):
            entry = entry.with_(rdev=rdev)
        entry = await self.new_entry(path, entry, ctx)
        await self.put_entry(path, entry)
        return self.attrs(self.inodes.get(path), entry)

    @errors_to_errno
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path, entry = await self._child(parent_inode, name)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        await self.check_sticky(path, (await links.resolve(self.view, path))[1] or entry, ctx)
        if not await links.unlink(self, path, entry):
            await self._remove(path)

    async def check_sticky(self, path: Path_, entry: Entry, ctx: Any) -> None:
        """EPERM if ``entry`` at ``path`` is in a sticky directory and the
        caller owns neither (the kernel checks too, on what it cached)."""
        parent = await self.view.lookup(path[:-1])
        assert parent is not None
        perms.check_sticky(self.owners.of(parent), self.owners.of(entry), self.owners.caller(ctx))

    @errors_to_errno
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path, entry = await self._child(parent_inode, name)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not entry.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        listing = await self.view.dir(path)
        if listing is not None and len(listing):
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        await self.check_sticky(path, entry, ctx)
        await self._remove(path)

    async def _remove(self, path: Path_) -> None:
        text = "/" + "/".join(path)
        now = time.time_ns()
        await self.change(
            lambda: self.queue.add_deletepath(text, when_ns=now), Delete(path, when_ns=now)
        )
        ino = self.inodes.by_path.get(path)
        if ino is not None and ino in self.open_files:
            self.open_files[ino].unlinked = True  # stays readable until closed
        self.inodes.unlinked(path)

    @errors_to_errno
    async def rename(
        self,
        parent_old: int,
        name_old: bytes,
        parent_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        src, entry = await self._child(parent_old, name_old)
        dst, target = await self._child(parent_new, name_new)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)  # documented: not supported
        if target is not None:
            if flags & RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            if target.is_dir and not entry.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if entry.is_dir and not target.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            if target.is_dir:
                listing = await self.view.dir(dst)
                if listing is not None and len(listing):
                    raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        if dst[: len(src)] == src and dst != src:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if src == dst or links.same_inode(entry, target):
            return  # (two names of one inode: POSIX's no-op)
        await links.check_crossing(self, src, entry, dst)
        await self.check_sticky(src, (await links.resolve(self.view, src))[1] or entry, ctx)
        if target is not None:
            await self.check_sticky(dst, (await links.resolve(self.view, dst))[1] or target, ctx)
        for of in self.open_files.values():  # a dirty file commits under its new name
            if of.path[: len(src)] == src:
                await self.commit(of)
        replaced = self.inodes.by_path.get(dst)
        if replaced is not None and replaced in self.open_files:
            self.open_files[replaced].unlinked = True
        s, d = "/" + "/".join(src), "/" + "/".join(dst)
        now = time.time_ns()
        if links.link_id(entry) or links.link_id(target):
            await links.rename(self, src, entry, dst, target, now)
        else:
            await self.change(lambda: self.queue.add_move(s, d, now), Move(src, dst, now))
        self.inodes.moved(src, dst)
        for of in self.open_files.values():
            if of.path[: len(src)] == src:
                of.path = dst + of.path[len(src) :]

    @errors_to_errno
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path, existing = await self._child(new_parent_inode, new_name)
        if existing is not None:
            raise pyfuse3.FUSEError(errno.EEXIST)
        return self.attrs(*await links.link(self, inode, path))

    @errors_to_errno
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path = self.inodes.path(inode)
        self.check_writable(path)
        entry = await self.entry_of(inode)
        changes = self.owners.setattr_changes(entry, self.owners.caller(ctx), attr, fields)
        if fields.update_size:
            if entry.kind != "file":
                raise pyfuse3.FUSEError(errno.EISDIR if entry.is_dir else errno.EINVAL)
            # A truncation moves the mtime, as on Linux, when it is made:
            # the kernel asks no time with ftruncate (nor truncate).
            changes.setdefault("mtime_ns", changes["ctime_ns"])
            of = await self.open_for(inode, entry)
            try:
                async with of.lock:
                    await self.stage(of, keep=attr.st_size > 0)
                    self._truncate(of, attr.st_size)
                    of.dirty = True
                    of.entry = of.entry.with_(**changes)
                    of.mtime_set = True
                if not of.handles:
                    await self.commit(of)
                elif "mode" in changes and not of.unlinked:  # shown at once, as chmod
                    mode, ctime = changes["mode"], changes["ctime_ns"]
                    await self.put_entry(path, entry.with_(mode=mode, ctime_ns=ctime))
            finally:
                await self.drop_if_unused(of)
            return self.attrs(inode, of.entry)
        if changes:
            entry = await self.set_attrs(inode, entry, changes, fields.update_mtime)
        return self.attrs(inode, entry)

    async def set_attrs(
        self, inode: int, entry: Entry, changes: dict[str, Any], mtime_set: bool = False
    ) -> Entry:
        """Store ``changes`` to the attributes of ``inode`` (now ``entry``);
        its entry after them."""
        path = self.inodes.path(inode)
        if not path:
            # The top directory: the root slot keeps no attributes, so its
            # mode, owner and times live with the mount (a clear EINVAL would
            # make rsync -a into the mountpoint fail).
            self.view.root_entry = self.view.root_entry.with_(**changes)
            return self.view.root_entry
        current = self.open_files.get(inode)
        if current is not None:
            current.entry = current.entry.with_(**changes)
            current.mtime_set = current.mtime_set or mtime_set
            if current.unlinked:
                return current.entry
        entry = entry.with_(**changes)
        await self.put_entry(path, entry)
        return entry

    async def kill_privileges(self, inode: int, caller: Caller) -> None:
        """Clear setuid/setgid of a file ``caller`` writes (see perms.write_mode)."""
        entry = await self.entry_of(inode)
        owner = self.owners.of(entry)
        mode = perms.write_mode(owner, caller)
        if mode != owner.mode:
            await self.set_attrs(inode, entry, {"mode": mode & 0o7777, "ctime_ns": time.time_ns()})

    # -- directories ----------------------------------------------------------
    @errors_to_errno
    async def opendir(self, inode: int, ctx: Any) -> int:
        entry = await self.entry_of(inode)
        if not entry.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @errors_to_errno
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        path = self.inodes.path(fh)
        listing = await self.view.dir(path)
        if listing is None:
            return
        # "." and ".." first (offsets 1 and 2: the kernel takes neither
        # as a lookup), then the entries in the listing's stable order.
        if start_id < 1:
            here = await self.getattr(fh)
            if not pyfuse3.readdir_reply(token, b".", here, 1):
                return
        if start_id < 2:
            parent = await self.getattr(self.inodes.get(path[:-1]))
            if not pyfuse3.readdir_reply(token, b"..", parent, 2):
                return
        names = [n for n in listing if not await links.hidden(self.view, (*path, n))]
        for i in range(max(0, start_id - 2), len(names)):
            name = names[i]
            child, entry = await links.child(self.view, (*path, name), listing.entries[name])
            attrs = self.attrs(self.inodes.get(child), entry)
            if not pyfuse3.readdir_reply(token, name.encode(), attrs, i + 3):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    @errors_to_errno
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.sync_queue()
        if self.sync:
            await self.daemon.wait_synced()

    async def sync_queue(self) -> None:
        """Make the queued steps durable, fsyncing in a thread (the event loop
        serves other requests meanwhile).  One at a time: a second caller
        must not return while the first one's fsync is still running."""
        async with self._sync_lock:
            if self.queue.unsynced:
                await trio.to_thread.run_sync(self.queue.sync)

    # -- files ------------------------------------------------------------------
    async def open_for(self, ino: int, entry: Entry) -> OpenFile:
        """The inode's open state; an open after another writer's change
        (close-to-open, as on NFS) takes the version the view shows now,
        unless the file is being written here."""
        of = self.open_files.get(ino)
        if of is None:
            of = OpenFile(ino, self.inodes.path(ino), entry, size=entry.size)
            self.open_files[ino] = of
        elif entry != of.entry and not (of.staged or of.dirty or of.unlinked or of.lock.locked()):
            if of.pinned is not None and entry.cap != of.entry.cap:
                os.close(of.pinned)  # our queued version's bytes: not the current ones
                of.pinned = None
            of.entry, of.size, of.base = entry, entry.size, None
        return of

    async def drop_if_unused(self, of: OpenFile) -> None:
        if of.handles == 0 and not of.dirty:
            if of.staging is not None and not of.handed_over and of.staging_name is not None:
                # committed inline (or unlinked): the queue never needs it
                (self.staging_dir / of.staging_name).unlink(missing_ok=True)
            of.close()
            if self.open_files.get(of.ino) is of:
                del self.open_files[of.ino]

    def _new_fh(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = ino
        return fh

    @errors_to_errno
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            self.check_writable(self.inodes.path(inode))
        entry = await self.entry_of(inode)
        if entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        of = await self.open_for(inode, entry)
        of.handles += 1
        try:
            if not of.staged and of.entry.cap.startswith("local:"):
                await self.source(of)  # pins the queue's tempfile while open
            if flags & os.O_TRUNC:
                async with of.lock:
                    await self.stage(of, keep=False)
                    self._truncate(of, 0)
                    of.dirty = True
                if of.entry.mode & (stat.S_ISUID | stat.S_ISGID):
                    await self.kill_privileges(inode, self.owners.caller(ctx))
        except BaseException:
            of.handles -= 1
            await self.drop_if_unused(of)
            raise
        return self._file_info(inode, flags, ctx)

    @errors_to_errno
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path, existing = await self._child(parent_inode, name)
        if existing is not None and existing.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        now = time.time_ns()
        entry = Entry("file", "", 0, mode & 0o7777, now, now, data=b"")
        entry = await self.new_entry(path, entry, ctx)
        # Not fsynced: close() after writing, fsync() of the file or of its
        # directory (or any synced change) makes it durable; one fsync a file.
        await self.put_entry(path, entry, sync=False)
        ino = self.inodes.get(path)
        old = self.open_files.get(ino)
        if old is not None:
            old.unlinked = True
            del self.open_files[ino]
        of = await self.open_for(ino, entry)
        of.handles += 1
        async with of.lock:
            await self.stage(of, keep=False)
        return self._file_info(ino, flags, ctx), self.attrs(ino, entry)

    def _file_info(self, ino: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        info = pyfuse3.FileInfo(fh=self._new_fh(ino))
        caller = self.owners.caller(ctx)
        if flags & os.O_ACCMODE != os.O_RDONLY and not caller.privileged:
            # FUSE tells write() nobody's identity: its opener's stands in
            self.killpriv[info.fh] = caller
        info.keep_cache = False  # (an open sees the current version)
        # A write-only handle bypasses the kernel's page cache: its bytes go
        # to staging without first filling page-cache pages nobody reads
        # (nothing can read or map the file through it).
        info.direct_io = flags & os.O_ACCMODE == os.O_WRONLY
        return info

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

    def _truncate(self, of: OpenFile, size: int) -> None:
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
        if keep:  # the current bytes are copied: room for them first
            await self.space.reserve(of.size if of.staging is not None else of.entry.size)
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

    @errors_to_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        of = self.open_files[self.handles[fh]]
        await atime.read_by(self, of)
        if of.buffer is not None:
            return bytes(of.buffer[off : off + size])
        if of.staging is not None:
            return os.pread(of.staging, size, off)
        if of.entry.kind != "file":
            raise pyfuse3.FUSEError(errno.EINVAL)
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

    @errors_to_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        of = self.open_files[self.handles[fh]]
        writer = self.killpriv.get(fh)
        if writer is not None and of.entry.mode & (stat.S_ISUID | stat.S_ISGID):
            await self.kill_privileges(of.ino, writer)
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
                if off >= of.size:  # appending: staged once, read once by the upload
                    written_once(of.staging, off, len(buf))
            of.size = max(of.size, end)
            of.dirty, of.mtime_set = True, False
        return len(buf)

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
                os.rename(self.staging_dir / name, self.queue.tempfile_path(name))
                fsync_dir(self.queue.tempfiles)
                digest = of.plaintext_digest()
                if digest is not None:
                    self.session.digests.add(self.queue.tempfile_path(name), digest)
                async with self.view.lock:
                    source = self.queue.tempfile_path(name)
                    add = functools.partial(self.queue.add_file, source, text, entry, base)
                    box = self.space.metadata(add)
                    view_entry = entry.with_(cap=f"local:{box}:{name}")
                    await self.view.apply(Put(of.path, view_entry, base))
                self.daemon.kick()
                entry = view_entry
                of.handed_over = True
            of.entry = entry
        if self.sync and wait:
            await self.daemon.wait_synced()

    @errors_to_errno
    async def flush(self, fh: int) -> None:
        await self.commit(self.open_files[self.handles[fh]])

    @errors_to_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.commit(self.open_files[self.handles[fh]], wait=False)
        await self.sync_queue()  # e.g. a new file never written: its creation
        if self.sync:  # (that creation too: it may be the only change queued)
            await self.daemon.wait_synced()

    @errors_to_errno
    async def release(self, fh: int) -> None:
        ino = self.handles.pop(fh)
        self.killpriv.pop(fh, None)
        of = self.open_files.get(ino)
        if of is None:
            return
        of.handles -= 1
        if of.handles == 0:
            await self.commit(of)
            of.dirty = False
            await self.drop_if_unused(of)

    # -- xattrs and statfs ----------------------------------------------------
    @errors_to_errno
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        key = name.decode("utf-8", "replace")
        if not key.startswith(XATTR_PREFIX):
            # security.*, system.* (ACLs): not supported.  ENOTSUP rather than
            # ENODATA: ls -l asks for security.selinux and the ACL of every
            # entry, and stops asking on this filesystem after one ENOTSUP.
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if key in CAP_XATTRS:
            return await cap_xattr(self, inode, key, ctx)
        value = (await self.entry_of(inode)).xattrs.get(key)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @errors_to_errno
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [k.encode() for k in (await self.entry_of(inode)).xattrs]

    @errors_to_errno
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        key = name.decode("utf-8", "replace")
        if not key.startswith(XATTR_PREFIX):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        self.check_writable(self.inodes.path(inode))
        if key in CAP_XATTRS:
            raise pyfuse3.FUSEError(errno.EPERM)  # computed, never stored
        if len(value) > 64 * 1024:
            raise pyfuse3.FUSEError(errno.E2BIG)
        await self._set_xattrs(inode, key, value)

    @errors_to_errno
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        key = name.decode("utf-8", "replace")
        self.check_writable(self.inodes.path(inode))
        if key not in (await self.entry_of(inode)).xattrs:
            raise pyfuse3.FUSEError(errno.ENODATA)
        await self._set_xattrs(inode, key, None)

    async def _set_xattrs(self, inode: int, key: str, value: bytes | None) -> None:
        entry = await self.entry_of(inode)
        xattrs = dict(entry.xattrs)
        if value is None:
            xattrs.pop(key, None)
        else:
            xattrs[key] = value
        entry = entry.with_(xattrs=xattrs, ctime_ns=time.time_ns())
        of = self.open_files.get(inode)
        if of is not None:
            of.entry = of.entry.with_(xattrs=xattrs)
        await self.put_entry(self.inodes.path(inode), entry)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        total, free = self.daemon.capacity()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = free // 4096
        s.f_files = s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s


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
    if entry.is_dir or not entry.cap or entry.cap.startswith(("local:", "pending:")):
        return None
    return entry.cap
