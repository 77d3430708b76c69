"""Access times: stored per entry, moved by reads as Linux's ``relatime`` does.

The atime is the entry's extra property :data:`ATIME` (nanoseconds; absent:
the mtime stands in).  Setting it (utimensat, ``touch -a``, ``tar``,
``rsync --atimes``) stores it and moves the ctime like any attribute.  A read
moves it to now only when it is not after the mtime or the ctime, or is a day
old (relatime): a file read over and over changes its directory once a day
at most, and "was it read since it was written" still has its answer.  Such
a move is not synced on its own and moves no ctime.  ``-o noatime`` turns
the moves on reads off.
"""

from __future__ import annotations

import time
from typing import Any

from gridfs.dirnode import Entry
from gridfs.links import with_extra

from .snapshots import in_snapshots

ATIME = "atime"
"""``extra`` property: the access time, in nanoseconds since the epoch."""
RELATIME_NS = 24 * 3600 * 10**9
"""A read moves an atime at least this old even when after the mtime and ctime."""


def atime(entry: Entry) -> int:
    """The access time an entry reports."""
    value = entry.extra.get(ATIME)
    return value if type(value) is int else entry.mtime_ns


def stale(entry: Entry, now: int) -> bool:
    """Whether a read at ``now`` moves the atime (relatime's rule)."""
    seen = atime(entry)
    return seen <= entry.mtime_ns or seen <= entry.ctime_ns or now - seen >= RELATIME_NS


def with_atime(entry: Entry, ns: int) -> Entry:
    return with_extra(entry, **{ATIME: ns})


async def read_by(ops: Any, of: Any) -> None:
    """A read of the open file ``of`` on the mount ``ops``: move its atime
    when :func:`stale`.  A file being written keeps the new atime with its
    next commit; any other is stored now (not synced)."""
    now = time.time_ns()
    if not ops.daemon.options.atime or ops.readonly or of.unlinked or in_snapshots(of.path):
        return
    if not stale(of.entry, now):
        return
    of.entry = with_atime(of.entry, now)
    if of.staged or of.dirty or of.entry.kind != "file":
        return
    entry = await ops.view.lookup(of.path)
    if entry is not None and entry.cap == of.entry.cap and entry.data == of.entry.data:
        await ops.staging.put_entry(of.path, with_atime(entry, now), sync=False, soft=True)
