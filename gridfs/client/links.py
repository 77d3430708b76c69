"""Hard links as the tree commands see them (see :mod:`gridfs.links`).

Reading (``ls``, ``cat``, ``cp`` out): a reference shows as the file its
record holds, and the top directory hides the records.  Changing (``rm``,
``mv`` over a name, ``cp`` within a tree): every reference a change drops or
adds moves its record's count, in the same queue transaction as the change,
so a record lives exactly as long as a name of it does.
"""

from __future__ import annotations

import os
import stat
import time
from collections import Counter
from pathlib import Path

from ..dirnode import Directory, Entry, join_path, split_path
from ..errors import UsageError
from ..links import LINKS_DIR, link_id, new_id, nlink, record_path, visible, with_nlink
from ..tree import NotFoundError, Tree
from ..workqueue import WorkQueue


async def follow(tree: Tree, root: str, entry: Entry) -> Entry:
    """The entry a name stands for: its record if it is a reference (itself
    when the record is missing: a tree changed by hand)."""
    link = link_id(entry)
    if link is None:
        return entry
    try:
        return await tree.lookup(record_path(link), root)
    except NotFoundError:
        return entry


async def follow_listing(tree: Tree, root: str, listing: Directory, top: bool) -> Directory:
    """A listing as the tree commands show it: references followed, the
    records directory hidden in the ``top`` directory."""
    entries = dict(visible(listing, top))
    for name, entry in entries.items():
        if link_id(entry) is not None:
            entries[name] = await follow(tree, root, entry)
    return Directory(entries)


async def references(tree: Tree, root: str, entry: Entry) -> Counter[str]:
    """How many references to each record ``entry`` holds (itself, or
    anywhere under it for a directory)."""
    found: Counter[str] = Counter()
    pending = [entry]
    while pending:
        e = pending.pop()
        link = link_id(e)
        if link is not None:
            found[link] += 1
        elif e.is_dir:
            pending.extend((await tree.load_dir(e.cap)).entries.values())
    return found


async def has_records(tree: Tree, root: str) -> bool:
    """Whether the tree holds any record (else no walk for references is needed)."""
    try:
        records = await tree.lookup((LINKS_DIR,), root)
    except NotFoundError:
        return False
    return records.is_dir and len(await tree.load_dir(records.cap)) > 0


async def references_under(tree: Tree, root: str, entry: Entry) -> Counter[str]:
    """:func:`references`, skipping the walk in a tree without records."""
    if entry.is_dir and not await has_records(tree, root):
        return Counter()
    return await references(tree, root, entry)


async def recounted(tree: Tree, root: str, changes: Counter[str]) -> list[tuple[str, Entry | None]]:
    """The records of ``changes`` (by how many names each gains, or loses
    when negative) after it: (path, new entry, or None when it has no name
    left).  A record already gone is left out."""
    now = time.time_ns()
    out: list[tuple[str, Entry | None]] = []
    for link, delta in sorted(changes.items()):
        if not delta:
            continue
        path = join_path(list(record_path(link)))
        try:
            record = await tree.lookup(record_path(link), root)
        except NotFoundError:
            continue
        if record.cap.startswith(("local:", "pending:")):
            raise UsageError(f"{path}: still being uploaded; run gridfs queue flush first")
        count = nlink(record) + delta
        out.append((path, with_nlink(record, count, now) if count > 0 else None))
    return out


async def restored(
    tree: Tree, snapshot_root: str, root: str, found: Counter[str]
) -> list[tuple[str, Entry | None]]:
    """The records that references ``found`` (in a directory restored from
    ``snapshot_root``) need in the tree at ``root``: one more name each for
    a record still there, else the record as the snapshot had it."""
    out: list[tuple[str, Entry | None]] = []
    for link, count in sorted(found.items()):
        try:
            await tree.lookup(record_path(link), root)
        except NotFoundError:
            try:
                old = await tree.lookup(record_path(link), snapshot_root)
            except NotFoundError:
                continue
            path = join_path(list(record_path(link)))
            out.append((path, with_nlink(old, count, time.time_ns())))
            continue
        out += await recounted(tree, root, Counter({link: count}))
    return out


class LocalLinks:
    """The hard links of a local tree being copied in: each regular file
    with several names in the tree becomes one record, each name a
    reference (a file whose other names lie outside the tree is copied as a
    file of its own)."""

    def __init__(self, top: Path) -> None:
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


def reserved(path: str) -> bool:
    """Whether ``path`` is the records directory or under it (the tree
    commands change it only through the names of linked files)."""
    return split_path(path)[:1] == [LINKS_DIR]


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
