"""Owners and permission rules of the mount, as Linux applies them (pure).

The kernel checks most permissions itself (the mount always has
``default_permissions``), from the owner and mode the daemon reports.  What
it leaves to a FUSE filesystem is here: the owner and group of a new entry
(a setgid directory passes its group on), clearing setuid/setgid where
Linux does (on chown, and on write or truncate by a caller without
CAP_FSETID) for a kernel that leaves that to the filesystem (one that
granted FUSE_HANDLE_KILLPRIV; Linux 6.18 with libfuse 3.14 here does not,
and sends the mode change itself, on behalf of the writer), and the same
checks again where the daemon can make them (chown, chmod, times, the
sticky bit), so that a change never rests on attributes the kernel cached
before another writer changed them.

"Privileged" is a caller whose fsuid is 0: the kernel drops the file
capabilities (CAP_CHOWN, CAP_FOWNER, CAP_FSETID) when a process switches
its fsuid away from 0, and FUSE tells the daemon only the ids.
"""

from __future__ import annotations

import errno
import functools
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from gridfs.dirnode import Entry

from .atime import ATIME
from .idmap import IdMap

WRITE, EXEC = 2, 1
PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID
"""Permission bits of one class (``want`` of :func:`allowed`)."""


@dataclass(frozen=True)
class Caller:
    """Who makes a request: fsuid, fsgid and supplementary groups (those of
    task ``pid``, read only when a rule asks: most requests need none)."""

    uid: int
    gid: int
    given_groups: frozenset[int] = frozenset()
    pid: int = 0
    """the caller's task, whose groups to read (0: ``given_groups`` are all)"""

    @property
    def privileged(self) -> bool:
        return self.uid == 0

    @functools.cached_property
    def groups(self) -> frozenset[int]:
        return self.given_groups | (supplementary_groups(self.pid) if self.pid else frozenset())

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups


@dataclass(frozen=True)
class Owner:
    """An entry's owner, group and mode (permission bits and setuid,
    setgid, sticky) as the mount reports them."""

    uid: int
    gid: int
    mode: int

    def owned_by(self, caller: Caller) -> bool:
        return caller.uid == self.uid or caller.privileged


def supplementary_groups(pid: int) -> frozenset[int]:
    """The groups of task ``pid`` (the FUSE request's caller) from
    ``/proc/PID/status``; none if it is gone (its fsgid still counts)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def caller_of(ctx: Any) -> Caller:
    """The :class:`Caller` of a pyfuse3 RequestContext."""
    return Caller(ctx.uid, ctx.gid, pid=0 if ctx.uid == 0 else ctx.pid)


def allowed(owner: Owner, caller: Caller, want: int) -> bool:
    """generic_permission(): may ``caller`` read(4)/write(2)/search(1) it?"""
    if caller.privileged:
        # root may do anything but execute a file nobody may execute
        return not (want & EXEC and not owner.mode & 0o111 and not stat.S_ISDIR(owner.mode))
    if caller.uid == owner.uid:
        bits = owner.mode >> 6
    elif caller.in_group(owner.gid):
        bits = owner.mode >> 3
    else:
        bits = owner.mode
    return bits & want == want


def check_chown(owner: Owner, caller: Caller, uid: int | None, gid: int | None) -> None:
    """chown(2)'s rule (EPERM): root may give anything to anyone; the owner
    may keep its uid and set the group to one of its own groups."""
    if caller.privileged:
        return
    if uid is not None and not (caller.uid == owner.uid and uid == owner.uid):
        raise PermissionError(errno.EPERM, "only root may give a file away")
    if gid is not None and not (
        caller.uid == owner.uid and (gid == owner.gid or caller.in_group(gid))
    ):
        raise PermissionError(errno.EPERM, "the owner may only choose one of its groups")


def chown_mode(owner: Owner, caller: Caller) -> int:
    """The mode after a chown (any chown, even to the same ids): a file that
    is not a directory loses setuid, and setgid when group-executable or
    when the caller is neither in its group nor root."""
    mode = owner.mode
    if stat.S_ISDIR(mode):
        return mode
    mode &= ~stat.S_ISUID
    if _drops_setgid(owner, caller):
        mode &= ~stat.S_ISGID
    return mode


def write_mode(owner: Owner, caller: Caller) -> int:
    """The mode of a regular file after ``caller`` wrote to it or truncated
    it: what a chown drops, unless the caller is root (CAP_FSETID)."""
    if caller.privileged or not stat.S_ISREG(owner.mode):
        return owner.mode
    return chown_mode(owner, caller)


def _drops_setgid(owner: Owner, caller: Caller) -> bool:
    if not owner.mode & stat.S_ISGID:
        return False
    if owner.mode & stat.S_IXGRP:
        return True
    return not (caller.privileged or caller.in_group(owner.gid))


def check_chmod(owner: Owner, caller: Caller, mode: int) -> int:
    """chmod(2): only the owner or root (EPERM); setgid is dropped silently
    when the caller is not in the file's group.  Returns the bits to store.

    A change that only clears setuid and/or setgid is allowed to anyone: it
    is how the kernel (without FUSE_HANDLE_KILLPRIV, as Linux 6.18 with
    libfuse 3.14 here) clears them on write, truncate and chown, on behalf
    of the writer, after checking that write itself."""
    mode &= 0o7777
    current = owner.mode & 0o7777
    adds, drops = mode & ~current, current & ~mode
    if drops and not adds and not drops & ~PRIVILEGE_BITS:
        return mode
    if not owner.owned_by(caller):
        raise PermissionError(errno.EPERM, "only the owner may change the mode")
    if not (caller.privileged or caller.in_group(owner.gid)):
        mode &= ~stat.S_ISGID
    return mode


def check_times(owner: Owner, caller: Caller, to_now: bool) -> None:
    """utimensat(2): the owner (or root) may set any time; anyone with write
    permission may set both to now (EACCES otherwise), nobody else (EPERM)."""
    if owner.owned_by(caller):
        return
    if not to_now:
        raise PermissionError(errno.EPERM, "only the owner may set a time")
    if not allowed(owner, caller, WRITE):
        raise PermissionError(errno.EACCES, "setting the times to now needs write permission")


def check_sticky(directory: Owner, victim: Owner, caller: Caller) -> None:
    """Removing or replacing a name in a sticky directory (EPERM): only the
    owner of the entry or of the directory, or root."""
    if not directory.mode & stat.S_ISVTX or caller.privileged:
        return
    if caller.uid not in (directory.uid, victim.uid):
        raise PermissionError(errno.EPERM, "sticky directory: not the owner")


def new_owner(parent: Owner, caller: Caller, mode: int) -> Owner:
    """Owner, group and mode of an entry ``caller`` makes in ``parent``
    (``mode`` with its file type): the caller's fsuid; the directory's group
    when it is setgid (and setgid too for a new directory), else the
    caller's fsgid (inode_init_owner)."""
    gid = caller.gid
    if parent.mode & stat.S_ISGID:
        gid = parent.gid
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    return Owner(caller.uid, gid, mode)


@dataclass(frozen=True)
class Owners:
    """Owners as one mount shows them.  ``uid``/``gid``: the user running
    the mount, who owns the entries stored without an owner.  A
    ``multiuser`` mount (by root, or with allow_other) shows and enforces
    the stored owners; a user's own mount shows everything as theirs."""

    uid: int
    gid: int
    multiuser: bool
    uidmap: IdMap = field(default_factory=IdMap)
    """stored ↔ shown user ids (``-o uidmap=``; see daemon.idmap)"""
    gidmap: IdMap = field(default_factory=IdMap)

    def ids(self, entry: Entry) -> tuple[int, int]:
        if self.multiuser and entry.uid is not None and entry.gid is not None:
            return self.uidmap.local(entry.uid), self.gidmap.local(entry.gid)
        return self.uid, self.gid

    def stored(self, uid: int, gid: int) -> dict[str, int]:
        """The entry fields that store the owner this mount shows as (uid, gid)."""
        return {"uid": self.uidmap.stored(uid), "gid": self.gidmap.stored(gid)}

    def of(self, entry: Entry) -> Owner:
        return Owner(*self.ids(entry), entry.st_mode)

    def caller(self, ctx: Any) -> Caller:
        """Who makes a request (on a single-user mount: its owner)."""
        if not self.multiuser or ctx is None:
            return Caller(self.uid, self.gid)
        return caller_of(ctx)

    def created(self, entry: Entry, parent: Entry, caller: Caller) -> Entry:
        """``entry``, made by ``caller`` in the directory ``parent``, with its
        owner, group and mode (see :func:`new_owner`)."""
        owner = new_owner(self.of(parent), caller, entry.st_mode)
        return entry.with_(**self.stored(owner.uid, owner.gid), mode=owner.mode & 0o7777)

    def chown(
        self, owner: Owner, caller: Caller, uid: int | None, gid: int | None
    ) -> dict[str, int]:
        """The attribute changes of a chown (``None``: -1, unchanged), once
        checked (PermissionError)."""
        if not self.multiuser:  # a user's own mount: everything stays theirs
            if uid not in (None, self.uid) or gid not in (None, self.gid):
                raise PermissionError(errno.EPERM, "a single-user mount: everything is yours")
            return {}
        check_chown(owner, caller, uid, gid)
        return {
            **self.stored(owner.uid if uid is None else uid, owner.gid if gid is None else gid),
            "mode": chown_mode(owner, caller) & 0o7777,
        }

    def setattr_changes(
        self, entry: Entry, caller: Caller, attr: Any, fields: Any
    ) -> dict[str, Any]:
        """The attribute changes of a SETATTR of ``entry`` by ``caller``
        (pyfuse3's ``attr`` and ``fields``), once checked (PermissionError).
        The size itself is the caller's to apply; its setuid clearing is here."""
        owner = self.of(entry)
        changes: dict[str, Any] = {}
        uid = attr.st_uid if fields.update_uid else None
        gid = attr.st_gid if fields.update_gid else None
        others = (fields.update_mode, fields.update_size, fields.update_mtime, fields.update_atime)
        if uid is not None or gid is not None or not any(others):
            # (a SETATTR of nothing, or of the ctime alone, is a chown(-1, -1))
            changes.update(self.chown(owner, caller, uid, gid))
        if fields.update_mode:
            changes["mode"] = check_chmod(owner, caller, attr.st_mode)
        if fields.update_mtime or fields.update_atime:
            # pyfuse3 turns UTIME_NOW into the time: the kernel refused
            # explicit times to non-owners; to now, it checked write
            # permission on what it cached: that again.
            check_times(owner, caller, to_now=True)
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_atime:
            changes["extra"] = {**entry.extra, ATIME: attr.st_atime_ns}
        if fields.update_size and "mode" not in changes:
            mode = write_mode(owner, caller)
            if mode != owner.mode:
                changes["mode"] = mode & 0o7777
        if fields.update_size or fields.update_ctime or fields.update_atime or changes:
            changes["ctime_ns"] = time.time_ns()
        return changes
