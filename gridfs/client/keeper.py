"""What a client node keeps on the grid, and keeping it there.

A node keeps everything reachable from its *roots* and its *retained set*:

* every tree it has an alias for: the root slot, and every directory and file
  beneath the root (directories are immutable files of their own), and
  beneath every older root version the snapshot log keeps
  (:mod:`gridfs.client.snapshots`; expired versions are let go at each
  unlink and renewal);
* the node's retained set, ``private/retained.sqlite`` (``gridfs retain``,
  and every ``gridfs put``): a file cap keeps that file, a tree's slot cap
  keeps the whole tree;
* what its work queues hold between an upload and its linking into the tree
  (the queues' ``retained`` tables, which an upload step fills before its box).

:meth:`Keeper.renew_all` renews this node's leases on all of it;
:meth:`Keeper.unlink` gives up this node's leases on caps that were dropped
(by a commit, or by ``gridfs unlink``) once a fresh walk shows that nothing
the node keeps still references them.  Other nodes' leases are theirs: a
deduplicated file stays as long as anyone holds a lease on it.

Uploads and commits hold the node's lease lock (``private/lease.lock``)
shared from the moment they store anything until the cap is recorded in one
of the places above; an unlink takes it exclusively only while it reads the
servers' clocks (the fence, see :mod:`gridfs.client.leases`).  So every cap
stored before the fence is visible to the walk, and every lease renewed
after it is spared by the servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import trio

from ..caps import log_name
from ..config import NodeDir
from ..errors import GridError, plain_grid_errors
from ..fileutil import atomic_output
from ..mutable import SlotReadCap, SlotWriteCap, parse_slot_cap
from ..reach import storage_index_of, subtree_caps
from ..tree import Tree, unpack_root
from ..workqueue import queue_directories, retained_caps
from .chunkread import expand
from .grid import GridClient
from .gridstore import GridStore
from .leases import CancelReport, RenewReport, cancel, renew, take_fences
from .slots import read_slot
from .snapshots import SnapshotLog, expired, tree_key, update_held

log = logging.getLogger(__name__)


class RetainedSet:
    """The node's retained caps, in SQLite (``private/retained.sqlite``)."""

    def __init__(self, node: NodeDir) -> None:
        node.private.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(node.private / "retained.sqlite", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS retained (cap TEXT PRIMARY KEY, added_ns INTEGER NOT NULL)"
        )

    def close(self) -> None:
        self.db.close()

    def add(self, caps: Iterable[str]) -> None:
        now = time.time_ns()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT OR IGNORE INTO retained VALUES (?, ?)", [(c, now) for c in caps]
            )

    def remove(self, caps: Iterable[str]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("DELETE FROM retained WHERE cap = ?", [(c,) for c in caps])

    def caps(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT cap FROM retained ORDER BY added_ns, cap")]


FENCE_PATIENCE = 10.0
"""Seconds an unlink waits for the node's uploads to pause before giving up
(it is retried later; uploads never wait for unlinks)."""


class LeaseLockBusy(GridError):
    """Uploads of this node kept running; the unlink will be retried."""


@contextlib.asynccontextmanager
async def lease_lock(
    node: NodeDir, exclusive: bool = False, patience: float | None = None
) -> AsyncIterator[None]:
    """The node's lease lock (a flock on ``private/lease.lock``), shared by
    writers, exclusive while an unlink takes its fence.  ``patience``: give
    up with LeaseLockBusy after that many seconds."""
    node.private.mkdir(parents=True, exist_ok=True)
    fd = os.open(node.private / "lease.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = None if patience is None else trio.current_time() + patience
        while True:
            try:
                fcntl.flock(fd, op)
                break
            except BlockingIOError:
                if deadline is not None and trio.current_time() > deadline:
                    raise LeaseLockBusy(
                        "this node's uploads did not pause; giving up leases later"
                    ) from None
                await trio.sleep(0.02)
        yield
    finally:
        os.close(fd)


def queued_caps(node: NodeDir) -> set[str]:
    """Caps the node's work queues hold between upload and linking (an
    upload step fills its box and the retained table in one transaction)."""
    out: set[str] = set()
    for qdir in queue_directories(node.path):
        out |= retained_caps(qdir)
    return out


class Keeper:
    """Renews and gives up one client node's leases (see the module doc)."""

    def __init__(self, grid: GridClient) -> None:
        self.grid = grid
        self.node = grid.node
        self.trees: dict[str, Tree] = {}
        """One Tree (with its directory cache) per root cap, kept across walks."""
        self.unwalkable: list[str] = []
        """Trees the last lenient walk could not read (and why)."""
        self.snapshot_stats: dict[str, dict[str, int]] = {}
        """Per tree (by :func:`tree_key`), from its last walk: how many
        versions are kept, and how many objects only old versions hold."""

    def share_tree(self, root_cap: str, tree: Tree) -> None:
        """Let walks use ``tree`` (and its cache) for the tree at ``root_cap``."""
        self.trees[root_cap] = tree

    def tree(self, root_cap: str) -> Tree:
        if root_cap not in self.trees:
            cap = parse_slot_cap(root_cap)
            if not isinstance(cap, SlotWriteCap | SlotReadCap):
                raise GridError(f"cannot read the tree of a verify cap ({log_name(root_cap)})")
            grid = self.grid
            store = GridStore(grid.broker, cap, grid.params, grid.secret, grid.seen)
            self.trees[root_cap] = Tree(store)
        return self.trees[root_cap]

    async def tree_caps(self, root_cap: str, strict: bool = True) -> set[str]:
        """A tree's root slot cap and every cap beneath its newest root.

        ``strict`` (for unlinks) insists on being sure the version walked is
        the newest: the slot must be found, and enough servers must answer
        that any version published to ``happy`` of them was seen."""
        cap = parse_slot_cap(root_cap)
        if not isinstance(cap, SlotWriteCap | SlotReadCap):
            return {root_cap}  # a verify cap keeps the slot; it cannot see inside
        broker = self.grid.broker
        await broker.ready(10.0)
        known = len(broker.servers)
        p = self.grid.params
        read = await read_slot(broker, cap, max(known, p.n), happy=p.happy, seen=self.grid.seen)
        answered = sum(len(ids) for ids in read.servers.values())
        need = known - self.grid.params.happy + 1
        if strict and answered < need:
            raise GridError(
                f"only {answered} of {known} servers answered for a tree's root "
                f"({need} needed to be sure of its newest version)"
            )
        root = unpack_root(read.plaintext or b"")
        tree = self.tree(root_cap)
        with plain_grid_errors():  # a directory that cannot be read: one GridError
            found = await subtree_caps(tree, root, {root_cap})
        live = len(found)
        key = tree_key(cap)
        with SnapshotLog(self.node) as snaplog:
            unreadable = await update_held(snaplog, key, tree)
            if strict and unreadable:
                # Its newest version walked, an older one cannot: its
                # directories are gone, and it can never be browsed again.
                snaplog.forget(key, [s.seq for s in unreadable])
            versions = snaplog.versions(key)
            found |= snaplog.held(key)
        if versions and versions[-1].root != root:  # not the version read: walked whole
            try:
                with plain_grid_errors():
                    await subtree_caps(tree, versions[-1].root, found)
            except GridError:
                if strict:
                    raise
        self.snapshot_stats[key] = {"snapshots": len(versions), "held": len(found) - live}
        return found

    async def expire_snapshots(self) -> tuple[int, set[str]]:
        """Forget the snapshots the retention policy lets go (of every
        tree); (how many, the caps they referenced) for an unlink to give
        up what nothing else keeps.  Cheap when nothing expired."""
        config = self.node.config()
        now = time.time_ns()
        count = 0
        caps: set[str] = set()
        with SnapshotLog(self.node) as snaplog:
            for key in snaplog.trees():
                policy = (config.snapshot_retention, config.snapshot_keep, now)
                if not expired(snaplog.versions(key), *policy):
                    continue
                tree = self._tree_by_key(key)
                if tree is not None:  # (else a tree the node no longer keeps)
                    await update_held(snaplog, key, tree)
                doomed = expired(snaplog.versions(key), *policy)
                caps |= snaplog.held(key, [s.seq for s in doomed])
                snaplog.forget(key, [s.seq for s in doomed])
                count += len(doomed)
        if count:
            log.info("%d snapshots expired", count)
        return count, caps

    def _tree_by_key(self, key: str) -> Tree | None:
        from .session import load_aliases  # session imports this module

        for cap_text in [*load_aliases(self.node).values(), *self.trees]:  # (shared slots)
            with contextlib.suppress(Exception):
                cap = parse_slot_cap(cap_text)
                if isinstance(cap, SlotWriteCap | SlotReadCap) and tree_key(cap) == key:
                    return self.tree(cap_text)
        return None

    async def reachable(self, strict: bool = True) -> set[str]:
        """Every cap this node keeps.  ``strict`` (for unlinks): raise if any
        root cannot be walked, since nothing may be given up on a partial
        picture; otherwise (for renewals) walk what can be walked and log
        the rest."""
        from .session import load_aliases  # session imports this module

        roots = set(load_aliases(self.node).values())
        retained = RetainedSet(self.node)
        try:
            kept = set(retained.caps())
        finally:
            retained.close()
        kept |= await trio.to_thread.run_sync(queued_caps, self.node)
        for cap in sorted(kept):
            if cap.startswith("gridfs:ssk"):
                roots.add(cap)
        found = set(kept)
        self.unwalkable = []
        walked: set[str] = set()
        while todo := sorted(roots - walked):
            for root in todo:  # then the shared directories' slots the walks found
                walked.add(root)
                try:
                    found |= await self.tree_caps(root, strict)
                except GridError as e:
                    if strict:
                        raise
                    found.add(root)
                    self.unwalkable.append(f"{log_name(root)}: {e}")
                    log.warning("cannot walk the tree %s: %s", log_name(root), e)
            roots |= {c for c in found if c.startswith("gridfs:ssk")}
        # A chunked file keeps its manifest and every chunk (a chunk shared
        # by two files or versions stays while either is kept).
        return await expand(self.grid, found, strict)

    async def renew_all(self) -> RenewReport:
        """Renew this node's lease on everything it keeps, at every server."""
        count, doomed = await self.expire_snapshots()
        if count:
            try:
                await self.unlink(doomed)
            except GridError as e:  # not renewed from now on: their leases run out
                log.warning("could not give up what expired snapshots held: %s", e)
        caps = await self.reachable(strict=False)
        report = await renew(self.grid.broker, filter(None, map(storage_index_of, caps)))
        record(self.node, "renew", _renew_summary(report))
        self.record_snapshots()
        return report

    def record_snapshots(self) -> None:
        """What the last walk found the snapshots hold (for gridfs status)."""
        stats = self.snapshot_stats.values()
        record(
            self.node,
            "snapshots",
            {
                "trees": len(stats),
                "snapshots": sum(s["snapshots"] for s in stats),
                "held": sum(s["held"] for s in stats),
            },
        )

    async def unlink(self, caps: Iterable[str]) -> CancelReport:
        """Give up this node's leases on ``caps``, except on what the node
        still keeps."""
        dropped = set(caps)
        _, doomed = await self.expire_snapshots()
        # (a manifest that cannot be read: its chunks' leases simply run out)
        dropped = await expand(self.grid, dropped | doomed, strict=False)
        sis = {si for c in dropped if (si := storage_index_of(c)) is not None}
        if not sis:
            return CancelReport()
        async with lease_lock(self.node, exclusive=True, patience=FENCE_PATIENCE):
            fences = await take_fences(self.grid.broker)
        keep = {storage_index_of(c) for c in await self.reachable()}
        report = await cancel(self.grid.broker, sis - keep, fences)
        report.referenced = len(sis & keep)
        log.info(
            "unlinked %d objects: %d leases given up, %d freed, %d kept",
            len(sis - keep),
            report.cancelled,
            report.freed,
            report.kept,
        )
        record(self.node, "unlink", {"objects": len(sis - keep), "freed": report.freed})
        self.record_snapshots()
        return report


def get_keeper(grid: GridClient) -> Keeper:
    """The grid client's one Keeper (so every walk shares the tree caches)."""
    if grid.keeper is None:
        grid.keeper = Keeper(grid)
    return grid.keeper


def _renew_summary(r: RenewReport) -> dict[str, Any]:
    return {
        "objects": r.objects,
        "servers": r.servers,
        "leases": r.leases,
        "unheld": len(r.unheld),
        "failures": r.failures[:5],
    }


def maintenance_path(node: NodeDir) -> Path:
    return node.path / "maintenance.json"


def load_record(node: NodeDir) -> dict[str, Any]:
    """The last result of each maintenance task (renew, unlink, check)."""
    try:
        data = json.loads(maintenance_path(node).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(node: NodeDir, task: str, result: dict[str, Any]) -> None:
    """Remember a maintenance result (for ``gridfs status`` and scheduling)."""
    data = load_record(node)
    data[task] = {"at": time.time(), **result}
    with contextlib.suppress(OSError), atomic_output(maintenance_path(node), durable=False) as f:
        f.write(json.dumps(data, indent=1).encode())
