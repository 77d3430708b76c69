"""``.snapshots/`` at the top of a mount: the tree's kept root versions, read-only.

``.snapshots/<ISO time>/`` is the tree as it was in that version (the names
of :func:`gridfs.client.snapshots.snapshot_names`), read straight from its
immutable directories.  The top directory's listing shows ``.snapshots``
only with ``-o show_snapshots``; a lookup by name finds it either way (as
``.zfs/snapshot`` does).  It shadows an entry of that name in the tree.
Every change under it is refused with EROFS by :mod:`daemon.fs`.
"""

from __future__ import annotations

from gridfs.client.session import TreeSession
from gridfs.client.snapshots import SnapshotLog, snapshot_names, tree_key
from gridfs.dirnode import Directory, Entry
from gridfs.errors import UsageError
from gridfs.tree import NotFoundError

from .view import View

SNAPSHOTS = ".snapshots"
SNAPSHOT_MODE = 0o555
Path = tuple[str, ...]


def in_snapshots(path: Path) -> bool:
    """Whether ``path`` is ``.snapshots`` or lies under it."""
    return path[:1] == (SNAPSHOTS,)


class SnapshotView(View):
    """The mount's view, with ``.snapshots`` laid over its top directory."""

    def __init__(self, session: TreeSession, show: bool = False) -> None:
        super().__init__(session)
        self.show = show

    def _versions(self) -> dict[str, Entry]:
        with SnapshotLog(self.session.grid.node) as log:
            names = snapshot_names(log.versions(tree_key(self.session.cap)))
        return {
            name: Entry("dir", s.root, 0, SNAPSHOT_MODE, s.at_ns, s.at_ns)
            for name, s in names.items()
        }

    def _top_entry(self) -> Entry:
        return self.root_entry.with_(mode=SNAPSHOT_MODE)

    async def dir(self, path: Path) -> Directory | None:
        if not in_snapshots(path):
            listing = await super().dir(path)
            if path or not self.show or listing is None:
                return listing
            # (a copy each time: the view changes its listings in place)
            return listing.with_entry(SNAPSHOTS, self._top_entry())
        versions = self._versions()
        if len(path) == 1:
            return Directory(versions)
        version = versions.get(path[1])
        if version is None:
            return None
        try:
            tree = self.session.tree
            return await tree.listdir(path[2:], version.cap, at_ns=version.mtime_ns)
        except (NotFoundError, UsageError):
            return None

    async def lookup(self, path: Path) -> Entry | None:
        if path == (SNAPSHOTS,):
            return self._top_entry()
        if not in_snapshots(path):
            return await super().lookup(path)
        parent = await self.dir(path[:-1])
        return None if parent is None else parent.get(path[-1])
