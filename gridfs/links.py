"""Hard links: names that share one inode record of their tree (pure, plus
the lookups that follow them).

Directories stay immutable and shareable: a hard-linked file's attributes
and content are kept once, in a *record*, the entry named by the link's id in
the hidden directory :data:`LINKS_DIR` at the top of its *slot*: the
nearest shared directory above the name (docs/formats.md §13.2), else the
tree's top.  So a slot is self-contained: a holder of only a shared
directory's cap finds every record its references name, and a name never
refers across a slot's boundary (link and rename there are EXDEV).  Each of its
names is a *reference*: an entry of the same kind, with no cap and no data,
whose ``extra`` property :data:`LINK` holds the id.  The record's ``extra``
property :data:`NLINK` counts the references (st_nlink).  A file becomes a
record when it gets its second name; unlinking a reference lowers the count,
and the last one removes the record.

Everything that reads the tree follows references here
(:func:`resolve`); everything that walks caps (leases, check, the diff of
what a commit dropped) finds the content once, in the record, which is an
ordinary entry of an ordinary directory.  A snapshot holds its own
:data:`LINKS_DIR`, so a reference in it resolves to the record as it was.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from .dirnode import Directory, Entry
from .shares import SLOT

LINKS_DIR = ".gridfs-links"
"""The top directory's hidden entry holding the tree's inode records."""
LINK = "link"
"""``extra`` property of a reference: the id of its record (16 hex digits)."""
NLINK = "nlink"
"""``extra`` property of a record: how many references name it (≥ 1)."""
SUBDIRS = "subdirs"
"""``extra`` property of a directory's entry: how many subdirectories it
held when written (st_nlink is 2 + this), so that stat needs no listing."""
Path = tuple[str, ...]


def new_id() -> str:
    """A record id: random, so that two writers of one tree never collide."""
    return secrets.token_hex(8)


def link_id(entry: Entry | None) -> str | None:
    """The record id a reference names (None: not a reference)."""
    if entry is None:
        return None
    value = entry.extra.get(LINK)
    return value if isinstance(value, str) and _is_id(value) else None


def _is_id(text: str) -> bool:
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def nlink(record: Entry) -> int:
    """The number of names of a record (1 for an entry that is not one)."""
    value = record.extra.get(NLINK)
    return value if type(value) is int and value > 0 else 1


def with_extra(entry: Entry, **changes: Any) -> Entry:
    """``entry`` with extra properties set (None: removed)."""
    extra = {k: v for k, v in {**entry.extra, **changes}.items() if v is not None}
    return entry.with_(extra=extra)


def with_nlink(record: Entry, count: int, ctime_ns: int) -> Entry:
    """The record with ``count`` names; its ctime moves, as a link count's
    change moves it on Linux."""
    return with_extra(record, **{NLINK: count}).with_(ctime_ns=ctime_ns)


def reference(record: Entry, link: str) -> Entry:
    """A name of the record ``link``: its kind (so that a listing that does
    not follow it still tells a file from a symlink), nothing else that
    counts."""
    return Entry(
        record.kind, "", 0, record.mode, record.mtime_ns, record.ctime_ns, extra={LINK: link}
    )


def as_copy(entry: Entry) -> Entry:
    """An entry to store under a new name as an independent copy (a copy of
    a record within the tree, by the tree commands): no link count."""
    return with_extra(entry, **{NLINK: None})


def is_slot_top(entry: Entry | None) -> bool:
    """Whether a directory's entry makes it a slot's top (a shared
    directory): the records of the references beneath it are its own."""
    return entry is not None and entry.is_dir and SLOT in entry.extra


def record_path(link: str, top: Path = ()) -> Path:
    """Where record ``link`` is, for the references of the slot whose top
    is ``top`` (the tree's top, or a shared directory)."""
    return (*top, LINKS_DIR, link)


def subdirs(listing: Directory, top: bool = False) -> int:
    """Subdirectories of ``listing`` (the hidden records directory does not
    count, in the ``top`` directory)."""
    return sum(1 for n, e in listing.entries.items() if e.is_dir and not (top and n == LINKS_DIR))


def kept_count(new: Entry, current: Entry) -> dict[str, Any]:
    """The extra properties of directory entry ``new`` put over ``current``
    (whose contents it keeps): the subdirectory count is current's."""
    extra = {k: v for k, v in new.extra.items() if k != SUBDIRS}
    if SUBDIRS in current.extra:
        extra[SUBDIRS] = current.extra[SUBDIRS]
    return extra


def visible(listing: Directory, top: bool) -> Mapping[str, Entry]:
    """The entries a listing shows (the top directory hides :data:`LINKS_DIR`)."""
    if top and LINKS_DIR in listing.entries:
        return {n: e for n, e in listing.entries.items() if n != LINKS_DIR}
    return listing.entries
