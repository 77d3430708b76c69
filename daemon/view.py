"""What the mount shows: the committed tree with the queued changes laid over it.

Every change the mount makes is first made durable in the work queue, then
applied to this in-memory view, so it is visible at once (read-your-writes)
while the upload and the root publish happen in the background.  After a
flush, or when another writer changed the tree, the view is rebuilt from the
new root plus whatever is still queued.
"""

from __future__ import annotations

import logging
import time

import trio

from gridfs.client.gridstore import OverlayStore
from gridfs.client.session import TreeSession
from gridfs.dirnode import DEFAULT_DIR_MODE, Directory, Entry
from gridfs.errors import NotEnoughSharesError
from gridfs.tree import Batch, Change, Tree

log = logging.getLogger(__name__)
Path = tuple[str, ...]


class View:
    def __init__(self, session: TreeSession) -> None:
        self.session = session
        self.lock = trio.Lock()
        """Held while the view changes: a change is queued and applied as one."""
        self.flushing = trio.Lock()
        """Held while the queue is flushed (by the daemon) and while the view is rebuilt."""
        self.overlay = OverlayStore(session.store)
        self.batch: Batch | None = None
        self.seq = -1
        self.root_entry = Entry("dir", "", 0, DEFAULT_DIR_MODE, time.time_ns(), time.time_ns())
        """The top directory's attributes: kept here while the mount is up
        (the root slot keeps none)."""
        self._root_touched = 0
        """The batch's root_mtime_ns that root_entry last took."""

    async def rebuild(self, if_changed: bool = False) -> bool:
        """Re-read the root and re-apply what is still queued; True if the
        committed tree changed.  With ``if_changed`` (a poll for other
        writers' changes), only if the root is not the one the view is built
        on: the view then already is that root with the queued changes
        applied as they were queued, and re-applying a long queue is costly.

        The root is read before taking the lock, so that a slow or stalled grid
        does not hold up local changes; holding ``flushing`` meanwhile keeps a
        flush from publishing a root and dropping its steps from the queue in
        between (the view would lose them until the next rebuild)."""
        async with self.flushing:
            seq, root = await self.session.tree.root()
            moved = if_changed and await self._shared_moved()
            async with self.lock:
                same = self.batch is not None and (seq, root) == (self.seq, self.batch.root_cap)
                if if_changed and same and not moved:
                    return False
                self.overlay.slots.clear()  # (the view's own versions of shared directories)
                overlay = Tree(self.overlay, self.session.tree.cache)
                batch = Batch(overlay, root)
                for change in self.session.queue.pending_changes():
                    await batch.apply(change)
                changed = seq != self.seq or moved
                self.batch, self.seq = batch, seq
                self._root_touched = batch.root_mtime_ns  # (re-applied: taken already)
                return changed

    async def _shared_moved(self) -> bool:
        """Whether a shared directory the view loaded has a newer version in
        its slot: it changes without its parent (its other holders' writes)."""
        if self.batch is None:
            return False
        for shared in list(self.batch.shared.values()):
            seq, _ = await self.session.store.read_dir_slot(shared.read)
            if seq != shared.seq:
                return True
        return False

    async def dir(self, path: Path) -> Directory | None:
        assert self.batch is not None
        try:
            return await self.batch.dir(path, create=False)
        except NotEnoughSharesError:
            # Another writer moved the tree on since this view was built and
            # gave up directories of the root it is built on (they were only
            # its own): build on the new root and look again, once.
            if not await self.rebuild(if_changed=True):
                raise
            log.info("a directory of the last root is gone; view rebuilt on the new one")
            return await self.batch.dir(path, create=False)

    async def lookup(self, path: Path) -> Entry | None:
        if not path:
            return self.root_entry
        parent = await self.dir(path[:-1])
        return None if parent is None else parent.get(path[-1])

    async def apply(self, change: Change) -> None:
        """Apply a change that is already in the queue (caller holds the lock)."""
        assert self.batch is not None
        await self.batch.apply(change)
        self._touch_root()

    def _touch_root(self) -> None:
        """The root's times follow its names changing (Batch._touch)."""
        assert self.batch is not None
        when = self.batch.root_mtime_ns
        if when != self._root_touched:
            self.root_entry = self.root_entry.with_(mtime_ns=when, ctime_ns=when)
            self._root_touched = when
