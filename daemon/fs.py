"""The FUSE adapter: inodes and handles in, EntryAttributes and errno out.

What a file *is* lives in :mod:`daemon.view` (the tree), :mod:`daemon.staging`
(the contents of open files: writes, truncation, commits to the queue) and
the work queue; this module only translates.  Every handler goes through
:func:`errors_to_errno`, so a bug in one answers EIO and is logged instead of
taking the mount down.  pyfuse3 wants every request handler as a method of
one Operations class; each handler stays a few lines of translation.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from typing import Any

import pyfuse3
import trio

from gridfs.client.session import TreeSession
from gridfs.dirnode import KIND_OF_FORMAT, Entry
from gridfs.tree import Delete, Move, new_dir_entry

from . import atime, links, perms
from .capattrs import CAP_XATTRS, cap_xattr
from .fuseerrors import errors_to_errno, fuse_name
from .inodes import Inodes, Path_
from .perms import Caller, Owners
from .segcache import SegmentCache
from .snapshots import in_snapshots
from .staging import Staging
from .view import View

log = logging.getLogger(__name__)
TIMEOUT = 1.0
"""Seconds the kernel may cache names and attributes (other writers' changes
show up within the refresh interval plus this)."""
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
XATTR_PREFIX = "user."


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
        self.space = daemon.space
        self.cache = cache = SegmentCache(
            session.grid.node.path / "cache" / "segments",
            self.space.limit,
            keep_scans=daemon.options.cache_scans,
        )
        self.staging = Staging(daemon, session, view, cache, sync)
        """The file contents: what a write, truncate or flush does."""
        self.open_files = self.staging.open_files
        self.handles: dict[int, int] = {}
        self._next_fh = 1
        self.uid, self.gid = os.getuid(), os.getgid()
        multiuser = self.uid == 0 or daemon.options.allow_other
        self.owners = Owners(self.uid, self.gid, multiuser, *daemon.options.idmaps)
        self.killpriv: dict[int, Caller] = {}
        """Handles whose writes clear setuid/setgid: by their opener (see perms)."""
        self.initialized = trio.Event()
        """Set once the kernel's INIT has been handled (its reply goes out
        before any other task runs)."""

    def init(self) -> None:
        self.initialized.set()

    @property
    def nursery(self) -> trio.Nursery | None:
        return self.staging.nursery

    @nursery.setter
    def nursery(self, nursery: trio.Nursery | None) -> None:
        self.staging.nursery = nursery

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
        await self.staging.put_entry(path, entry)
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
        await self.staging.put_entry(path, entry)
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
        await self.staging.put_entry(path, entry)
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
        await self.staging.change(
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
                await self.staging.commit(of)
        replaced = self.inodes.by_path.get(dst)
        if replaced is not None and replaced in self.open_files:
            self.open_files[replaced].unlinked = True
        s, d = "/" + "/".join(src), "/" + "/".join(dst)
        now = time.time_ns()
        if links.link_id(entry) or links.link_id(target):
            await links.rename(self, src, entry, dst, target, now)
        else:
            await self.staging.change(lambda: self.queue.add_move(s, d, now), Move(src, dst, now))
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
            of = await self.staging.open_for(inode, self.inodes.path(inode), entry)
            try:
                await self.staging.resize(of, attr.st_size, changes)
                if not of.handles:
                    await self.staging.commit(of)
                elif "mode" in changes and not of.unlinked:  # shown at once, as chmod
                    mode, ctime = changes["mode"], changes["ctime_ns"]
                    await self.staging.put_entry(path, entry.with_(mode=mode, ctime_ns=ctime))
            finally:
                await self.staging.drop_if_unused(of)
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
        await self.staging.put_entry(path, entry)
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
        await self.staging.sync_queue()
        if self.sync:
            await self.daemon.wait_synced()

    # -- files ------------------------------------------------------------------
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
        path = self.inodes.path(inode)
        of = await self.staging.open(inode, path, entry, truncate=bool(flags & os.O_TRUNC))
        if flags & os.O_TRUNC and of.entry.mode & (stat.S_ISUID | stat.S_ISGID):
            try:
                await self.kill_privileges(inode, self.owners.caller(ctx))
            except BaseException:
                await self.staging.abandon(of)
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
        await self.staging.put_entry(path, entry, sync=False)
        ino = self.inodes.get(path)
        await self.staging.create(ino, path, entry)
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

    @errors_to_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        of = self.open_files[self.handles[fh]]
        await atime.read_by(self, of)
        return await self.staging.read(of, off, size)

    @errors_to_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        of = self.open_files[self.handles[fh]]
        writer = self.killpriv.get(fh)
        if writer is not None and of.entry.mode & (stat.S_ISUID | stat.S_ISGID):
            await self.kill_privileges(of.ino, writer)
        await self.staging.write(of, off, buf)
        return len(buf)

    @errors_to_errno
    async def flush(self, fh: int) -> None:
        await self.staging.commit(self.open_files[self.handles[fh]])

    @errors_to_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.staging.commit(self.open_files[self.handles[fh]], wait=False)
        await self.staging.sync_queue()  # e.g. a new file never written: its creation
        if self.sync:  # (that creation too: it may be the only change queued)
            await self.daemon.wait_synced()

    @errors_to_errno
    async def release(self, fh: int) -> None:
        ino = self.handles.pop(fh)
        self.killpriv.pop(fh, None)
        of = self.open_files.get(ino)
        if of is not None:
            await self.staging.release(of)

    @errors_to_errno
    async def fallocate(self, inode: int, mode: int, offset: int, length: int) -> None:
        """Called through daemon.falloc (pyfuse3 has no fallocate handler)."""
        self.check_writable(self.inodes.path(inode))
        of = self.open_files.get(inode)
        if of is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        await self.staging.fallocate(of, mode, offset, length)

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
        await self.staging.put_entry(self.inodes.path(inode), entry)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        total, free = self.daemon.capacity()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = free // 4096
        s.f_files = s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s
