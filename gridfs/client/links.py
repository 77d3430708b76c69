"""Hard links as the tree commands see them (see :mod:`gridfs.links`).

Reading (``ls``, ``cat``, ``cp`` out): a reference shows as the file its
record holds, and the top directory hides the records.  Changing (``rm``,
``mv`` over a name, ``cp`` within a tree): every reference a change drops or
adds moves its record's count, in the same queue transaction as the change,
so a record lives exactly as long as a name of it does.

Records are kept per slot (:func:`slot_top`): a name's record is in the
records directory of the nearest shared directory above it, else of the
tree's top.  A walk for references stops at a shared directory beneath
(its names count in its own slot, which lives on when a link to it goes).
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from pathlib import Path

from ..dirnode import DEFAULT_DIR_MODE, Directory, Entry, join_path
from ..errors import UsageError
from ..links import (
    LINKS_DIR,
    is_slot_top,
    link_id,
    new_id,
    nlink,
    record_path,
    visible,
    with_nlink,
)
from ..tree import NotFoundError, Tree
from ..workqueue import WorkQueue

Parts = tuple[str, ...]


async def slot_top(tree: Tree, root: str, path: Parts, at_ns: int | None = None) -> Parts:
    """The top of the slot the name ``path`` is (or would be) in: the
    nearest shared directory above it, else the tree's top ``()`` (with
    ``at_ns``: in a snapshot, see :meth:`Tree.lookup`)."""
    top: Parts = ()
    entry = Entry("dir", root, 0, DEFAULT_DIR_MODE)
    for i, name in enumerate(path[:-1]):
        child = (await tree.load_dir(entry.cap)).get(name) if entry.is_dir else None
        if child is None:
            break
        if is_slot_top(child):
            top = path[: i + 1]
        entry = await tree.resolve(child, at_ns)
    return top


async def is_top(tree: Tree, root: str, path: Parts) -> bool:
    """Whether the directory ``path`` is a slot's top (hides its records)."""
    if not path:
        return True
    try:
        return is_slot_top(await tree.lookup(path, root))
    except NotFoundError:
        return False


async def reserved(tree: Tree, root: str, path: Parts) -> bool:
    """Whether ``path`` is a records directory or under one (the tree
    commands change records only through the names of linked files)."""
    for i, name in enumerate(path):
        if name == LINKS_DIR and await is_top(tree, root, path[:i]):
            return True
    return False


async def follow(
    tree: Tree, root: str, entry: Entry, path: Parts, at_ns: int | None = None
) -> Entry:
    """The entry the name ``path`` stands for: its record if it is a
    reference (itself when the record is missing: a tree changed by hand)."""
    link = link_id(entry)
    if link is None:
        return entry
    where = record_path(link, await slot_top(tree, root, path, at_ns))
    try:
        return await tree.lookup(where, root, at_ns=at_ns)
    except NotFoundError:
        return entry


async def follow_listing(tree: Tree, root: str, listing: Directory, path: Parts) -> Directory:
    """The listing of directory ``path`` as the tree commands show it:
    references followed, the records directory hidden at a slot's top."""
    entries = dict(visible(listing, await is_top(tree, root, path)))
    for name, entry in entries.items():
        if link_id(entry) is not None:
            entries[name] = await follow(tree, root, entry, (*path, name))
    return Directory(entries)


async def references(tree: Tree, root: str, entry: Entry) -> Counter[str]:
    """How many references to each record of its slot ``entry`` holds
    (itself, or anywhere under it for a directory; a shared directory's
    names count in its own slot, not in this one)."""
    found: Counter[str] = Counter()
    pending = [] if is_slot_top(entry) else [entry]
    while pending:
        e = pending.pop()
        link = link_id(e)
        if link is not None:
            found[link] += 1
        elif e.is_dir:
            listing = (await tree.load_dir(e.cap)).entries.values()
            pending.extend(c for c in listing if not is_slot_top(c))
    return found


async def has_records(tree: Tree, root: str, top: Parts = (), at_ns: int | None = None) -> bool:
    """Whether the slot at ``top`` holds any record (else no walk for
    references is needed)."""
    try:
        records = await tree.lookup((*top, LINKS_DIR), root, at_ns=at_ns)
    except NotFoundError:
        return False
    return records.is_dir and len(await tree.load_dir(records.cap)) > 0


async def references_under(
    tree: Tree, root: str, entry: Entry, top: Parts = (), at_ns: int | None = None
) -> Counter[str]:
    """:func:`references`, skipping the walk in a slot (at ``top``) without records."""
    if entry.is_dir and not await has_records(tree, root, top, at_ns):
        return Counter()
    return await references(tree, root, entry)


async def recounted(
    tree: Tree, root: str, changes: Counter[str], top: Parts = ()
) -> list[tuple[str, Entry | None]]:
    """The records of ``changes`` (by how many names each gains, or loses
    when negative) in the slot at ``top`` after it: (path, new entry, or
    None when it has no name left).  A record already gone is left out."""
    now = time.time_ns()
    out: list[tuple[str, Entry | None]] = []
    for link, delta in sorted(changes.items()):
        if not delta:
            continue
        path = join_path(list(record_path(link, top)))
        try:
            record = await tree.lookup(record_path(link, top), root)
        except NotFoundError:
            continue
        if record.cap.startswith(("local:", "pending:")):
            raise UsageError(f"{path}: still being uploaded; run gridfs queue flush first")
        count = nlink(record) + delta
        out.append((path, with_nlink(record, count, now) if count > 0 else None))
    return out


async def restored(
    tree: Tree,
    snapshot_root: str,
    root: str,
    found: Counter[str],
    tops: tuple[Parts, Parts] = ((), ()),
    at_ns: int | None = None,
) -> list[tuple[str, Entry | None]]:
    """The records that references ``found`` (in a directory restored from
    ``snapshot_root``) need in the tree at ``root``: one more name each for
    a record still there, else the record as the snapshot had it.
    ``tops``: the slot's top in the snapshot (taken ``at_ns``) and in the tree."""
    old_top, top = tops
    out: list[tuple[str, Entry | None]] = []
    for link, count in sorted(found.items()):
        try:
            await tree.lookup(record_path(link, top), root)
        except NotFoundError:
            try:
                old = await tree.lookup(record_path(link, old_top), snapshot_root, at_ns=at_ns)
            except NotFoundError:
                continue
            path = join_path(list(record_path(link, top)))
            out.append((path, with_nlink(old, count, time.time_ns())))
            continue
        out += await recounted(tree, root, Counter({link: count}), top)
    return out


class LocalLinks:
    """The hard links of a local tree being copied in: each regular file
    with several names in the tree becomes one record, each name a
    reference (a file whose other names lie outside the tree is copied as a
    file of its own)."""

    def __init__(self, top: Path, slot: Parts = ()) -> None:
        self.slot = slot
        """the top of the slot the copy goes into (whose records it makes)"""
        names: Counter[tuple[int, int]] = Counter()
        for dirpath, _, filenames in os.walk(top):
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    names[(st.st_dev, st.st_ino)] += 1
        self.names = {key: n for key, n in names.items() if n > 1}
        self.ids: dict[tuple[int, int], str] = {}

    def record_of(self, st: os.stat_result) -> tuple[str, int, bool] | None:
        """(record id, its number of names, whether this is its first name)
        for the local file ``st``, or None if it is not linked in the tree."""
        key = (st.st_dev, st.st_ino)
        count = self.names.get(key)
        if count is None:
            return None
        first = key not in self.ids
        link = self.ids.setdefault(key, new_id())
        return link, count, first


def queue_recount(queue: WorkQueue, records: list[tuple[str, Entry | None]]) -> None:
    """Queue :func:`recounted`'s records (inside the caller's transaction)."""
    for path, record in records:
        if record is None:
            queue.add_deletepath(path)
        else:
            queue.add_addpath(None, path, record)


def lost(found: Counter[str]) -> Counter[str]:
    """The count changes of dropping the references ``found``."""
    return Counter({link: -n for link, n in found.items()})
