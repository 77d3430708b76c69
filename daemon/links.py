"""Hard links on the mount (the records and references of :mod:`gridfs.links`).

A linked file's inode is its record: the mount's inode number names the
record's path (``.gridfs-links/ID``), so every name reports the same
st_ino, an open file is shared by all its names, and a change through one
name (attributes, content) is a change of the record, seen through all.
Records are kept per slot (the top's, or a shared directory's
``.gridfs-links``): a name and its record are always in the same slot, so
link() or rename() of a name across a slot's boundary answers EXDEV, as
between two filesystems.
The name operations (lookup, link, unlink, rename) follow references here;
every change they make is queued in one transaction, so that a crash keeps
names and link counts consistent.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import Any

import pyfuse3

from gridfs.dirnode import Entry
from gridfs.links import (
    LINKS_DIR,
    SUBDIRS,
    is_slot_top,
    link_id,
    new_id,
    nlink,
    record_path,
    reference,
    subdirs,
    with_extra,
    with_nlink,
)
from gridfs.tree import Change, Delete, Move, Put

from .snapshots import in_snapshots
from .view import View

Path = tuple[str, ...]
Step = tuple[Callable[[], Any], Change]
"""A queue step (run inside one transaction) and the change it makes to the view."""


def top_of(path: Path) -> Path:
    """The top of the tree ``path`` is in: a snapshot's, or the mount's."""
    return path[:2] if in_snapshots(path) and len(path) >= 2 else ()


async def slot_top(view: View, path: Path) -> Path:
    """The top of the slot the name ``path`` is in: its nearest shared
    directory above it, else the top of its tree (whose records it uses)."""
    top = top_of(path)
    for end in range(len(path) - 1, len(top), -1):
        if is_slot_top(await view.lookup(path[:end])):
            return path[:end]
    return top


async def is_records(view: View, path: Path) -> bool:
    """Whether the directory ``path`` is a slot's records directory."""
    return path[-1:] == (LINKS_DIR,) and await is_top(view, path[:-1])


async def is_top(view: View, path: Path) -> bool:
    """Whether the directory ``path`` is a slot's top."""
    return path == top_of(path) or is_slot_top(await view.lookup(path))


async def hidden(view: View, path: Path) -> bool:
    """Whether ``path`` is a records directory (never shown, never made)."""
    return len(path) > len(top_of(path)) and await is_records(view, path)


async def resolve(view: View, path: Path) -> tuple[Path, Entry | None]:
    """The inode at ``path``: its record (path and entry) when the name is a
    reference, else the name itself.  A reference whose record is missing
    (a tree changed by hand) shows as itself: an empty entry."""
    if await hidden(view, path):
        return path, None
    entry = await view.lookup(path)
    link = link_id(entry)
    if link is None:
        return path, entry
    where = record_path(link, await slot_top(view, path))
    record = await view.lookup(where)
    return (path, entry) if record is None else (where, record)


async def child(view: View, path: Path, entry: Entry) -> tuple[Path, Entry]:
    """A listing's entry at ``path`` as readdir shows it: its inode."""
    if link_id(entry) is not None:
        path, found = await resolve(view, path)
        entry = found or entry
    await ensure_counted(view, path, entry)
    return path, entry


def count(view: View, path: Path, entry: Entry) -> int:
    """st_nlink: the record's count for a linked file, 2 + subdirectories
    for a directory (from its listing when the view has it loaded, else
    from the count stored with its entry; see :func:`ensure_counted`)."""
    if not entry.is_dir:
        return nlink(entry)
    listing = view.batch.dirs.get(path) if view.batch is not None else None
    if listing is not None:
        top = not path or (view.batch is not None and path in view.batch.shared)
        return 2 + subdirs(listing, top=top)
    stored = entry.extra.get(SUBDIRS)
    return 2 + stored if type(stored) is int and stored >= 0 else 2


async def ensure_counted(view: View, path: Path, entry: Entry | None) -> None:
    """Load a directory whose subdirectories :func:`count` cannot tell
    otherwise (written before counts were stored, or never written)."""
    unknown = entry is not None and entry.is_dir and SUBDIRS not in entry.extra
    if unknown and path and not in_snapshots(path):
        await view.dir(path)


# -- queue steps ----------------------------------------------------------------
def _text(path: Path) -> str:
    return "/" + "/".join(path)


def put(ops: Any, path: Path, entry: Entry) -> Step:
    """Store ``entry`` at ``path`` (a file's ``local:`` cap: from its box)."""
    queue, text = ops.queue, _text(path)
    if entry.cap.startswith("pending:"):
        raise pyfuse3.FUSEError(errno.EAGAIN)  # rare: wait for the flush
    if entry.cap.startswith("local:"):
        box = entry.cap.split(":", 2)[1]

        def enqueue() -> Any:
            filled = queue.read_box(box)
            if filled is not None:
                return queue.add_addpath(None, text, entry.with_(cap=filled.decode()))
            if not ops.queue.uploading(box):
                raise pyfuse3.FUSEError(errno.EAGAIN)
            return queue.add_addpath(box, text, entry.with_(cap=""))

        return enqueue, Put(path, entry)
    return (lambda: queue.add_addpath(None, text, entry)), Put(path, entry)


def delete(ops: Any, path: Path, when_ns: int) -> Step:
    return (lambda: ops.queue.add_deletepath(_text(path), when_ns=when_ns)), Delete(
        path, when_ns=when_ns
    )


def move(ops: Any, src: Path, dst: Path, when_ns: int) -> Step:
    return (lambda: ops.queue.add_move(_text(src), _text(dst), when_ns)), Move(src, dst, when_ns)


async def apply(ops: Any, steps: list[Step]) -> None:
    """Queue ``steps`` in one transaction (durably), then show them."""
    async with ops.view.lock:
        ops.space.metadata(lambda: _enqueue_all(ops, steps))  # (even on a full disk)
        for _, change in steps:
            await ops.view.apply(change)
    ops.daemon.kick()


def _enqueue_all(ops: Any, steps: list[Step]) -> None:
    with ops.queue.transaction():
        for enqueue, _ in steps:
            enqueue()


async def settled(ops: Any, path: Path, entry: Entry) -> Entry:
    """``entry`` with a cap its queue steps can still name (see fs.put_entry)."""
    if entry.cap.startswith("local:"):
        box = entry.cap.split(":", 2)[1]
        if ops.queue.read_box(box) is None and not ops.queue.uploading(box):
            return await ops.staging._settled(path, entry)
    return entry


def _update_open(ops: Any, where: Path, record: Entry) -> None:
    """An open file of the record takes its new count and ctime (its next
    commit stores its whole entry)."""
    ino = ops.inodes.by_path.get(where)
    of = ops.open_files.get(ino) if ino is not None else None
    if of is not None:
        of.entry = with_extra(of.entry, **record.extra).with_(ctime_ns=record.ctime_ns)


def _gone(ops: Any, where: Path) -> None:
    """The record at ``where`` lost its last name: an open file of it stays
    readable until closed, and its inode number is free."""
    ino = ops.inodes.by_path.get(where)
    if ino is not None and ino in ops.open_files:
        ops.open_files[ino].unlinked = True
    ops.inodes.unlinked(where)


# -- operations -------------------------------------------------------------
async def link(ops: Any, inode: int, new_path: Path) -> tuple[int, Entry]:
    """link(): ``new_path`` becomes a name of ``inode`` (the caller checked
    that it is free and writable); returns the inode and its record."""
    src = ops.inodes.path(inode)
    ops.check_writable(src)
    of = ops.open_files.get(inode)
    if of is not None:
        if of.unlinked:
            raise pyfuse3.FUSEError(errno.ENOENT)
        await ops.staging.commit(of)  # a dirty file first stores what was written
    entry = await ops.entry_of(inode)
    if entry.is_dir:
        raise pyfuse3.FUSEError(errno.EPERM)
    now = time.time_ns()
    entry = await settled(ops, src, entry)
    if len(src) >= 2 and await is_records(ops.view, src[:-1]):  # a record already
        top = src[:-2]
    else:
        top = await slot_top(ops.view, src)
    if await slot_top(ops.view, new_path) != top:
        raise pyfuse3.FUSEError(errno.EXDEV)  # a name and its record share a slot
    if src[:-1] == (*top, LINKS_DIR):
        link = src[-1]
        record = with_nlink(entry, nlink(entry) + 1, now)
        steps = [put(ops, src, record), put(ops, new_path, reference(record, link))]
        where = src
    else:
        link = new_id()
        where = record_path(link, top)
        record = with_nlink(entry, 2, now)
        ref = reference(record, link)
        steps = [put(ops, where, record), put(ops, src, ref), put(ops, new_path, ref)]
    await apply(ops, steps)
    if where != src:  # the inode is the record from now on
        ops.inodes.moved(src, where)
        if of is not None:
            of.path = where
    _update_open(ops, where, record)
    return inode, record


async def unlink_steps(ops: Any, path: Path, entry: Entry, now: int) -> list[Step]:
    """What removing the name ``path`` (holding ``entry``) changes besides
    the name itself: a reference's record loses a name, or goes with its
    last (then an open file of it stays readable until closed)."""
    link = link_id(entry)
    if link is None:
        return []
    where = record_path(link, await slot_top(ops.view, path))
    record = await ops.view.lookup(where)
    if record is None:
        return []
    if nlink(record) > 1:
        record = with_nlink(await settled(ops, where, record), nlink(record) - 1, now)
        _update_open(ops, where, record)
        return [put(ops, where, record)]
    return [delete(ops, where, now)]


async def unlink(ops: Any, path: Path, entry: Entry) -> bool:
    """unlink() of a reference (False: ``entry`` is none, fs does the rest)."""
    link = link_id(entry)
    if link is None:
        return False
    now = time.time_ns()
    extra = await unlink_steps(ops, path, entry, now)
    await apply(ops, [delete(ops, path, now), *extra])
    if extra and isinstance(extra[0][1], Delete):
        _gone(ops, extra[0][1].path)
    return True


async def rename(
    ops: Any, src: Path, entry: Entry, dst: Path, target: Entry | None, now: int
) -> None:
    """rename() of ``src`` (holding ``entry``) over ``dst`` (holding
    ``target``, or nothing): the move, what the name it replaces loses, and
    the moved inode's ctime, in one transaction."""
    steps = [move(ops, src, dst, now)]
    if target is not None:
        steps += await unlink_steps(ops, dst, target, now)
    link = link_id(entry)
    if link is not None:  # the inode is the record: its ctime moves (as Linux's)
        where = record_path(link, await slot_top(ops.view, src))
        record = await ops.view.lookup(where)
        touched = {c.path for _, c in steps if isinstance(c, Put | Delete)}
        if record is not None and where not in touched:
            record = (await settled(ops, where, record)).with_(ctime_ns=now)
            _update_open(ops, where, record)
            steps.append(put(ops, where, record))
    await apply(ops, steps)
    for _, change in steps[1:]:
        if isinstance(change, Delete):
            _gone(ops, change.path)


def same_inode(entry: Entry | None, target: Entry | None) -> bool:
    """Whether two names are links of one inode (rename between them: a no-op)."""
    link = link_id(entry)
    return link is not None and link == link_id(target)


async def check_crossing(ops: Any, src: Path, entry: Entry, dst: Path) -> None:
    """EXDEV for a rename that would take a reference out of its record's
    slot: the name itself, or a directory holding one (a shared directory
    is a slot of its own and moves whole).  Checked only when the two ends
    lie in different slots, and a directory is walked only when its slot
    has records at all."""
    if is_slot_top(entry):
        return
    top = await slot_top(ops.view, src)
    if await slot_top(ops.view, dst) == top:
        return
    if link_id(entry) is not None:
        raise pyfuse3.FUSEError(errno.EXDEV)
    if entry.is_dir and await ops.view.dir((*top, LINKS_DIR)) and await holds_links(ops.view, src):
        raise pyfuse3.FUSEError(errno.EXDEV)


async def holds_links(view: View, path: Path) -> bool:
    """Whether the directory ``path`` holds a reference of its slot (shared
    directories beneath it are slots of their own, not looked into)."""
    pending = [path]
    while pending:
        here = pending.pop()
        listing = await view.dir(here)
        for name, entry in (listing.entries if listing is not None else {}).items():
            if link_id(entry) is not None:
                return True
            if entry.is_dir and not is_slot_top(entry):
                pending.append((*here, name))
    return False
