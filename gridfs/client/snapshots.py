"""Snapshots: every root version of a tree this node committed or saw.

Each version of a tree's root slot names an immutable root directory, so an
old version stays readable for as long as its directories and files stay on
the grid.  The node records each version it publishes or reads in its
snapshot log, ``private/snapshots.sqlite`` (docs/formats.md §14.4), and the
keeper (:mod:`gridfs.client.keeper`) keeps leases on everything the recorded
versions reference: a file a commit removed stays on the grid until the last
snapshot that holds it expires.  So that this costs little however many
versions are kept, the log also holds what each version references that the
next one does not (:func:`update_held`).

A snapshot expires once it is older than ``snapshot_retention`` and is not
among the tree's ``snapshot_keep`` newest versions (:func:`expired`).
Snapshots are named by the time the node first saw them, in UTC, to the
second (:func:`snapshot_names`).
"""

from __future__ import annotations

import datetime
import itertools
import logging
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..caps import b32encode
from ..config import NodeDir
from ..errors import FormatError, GridError, UsageError, plain_grid_errors
from ..mutable import SlotCap
from ..reach import dropped_caps
from ..tree import Tree, unpack_root

log_ = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """One root version of a tree: its slot seq, when this node first saw
    (or made) it, the cap of its root directory, and the version its held
    caps were computed against (0: not yet; see :func:`update_held`)."""

    seq: int
    at_ns: int
    root: str
    next_seq: int = 0


def tree_key(cap: SlotCap) -> str:
    """How the log names a tree: its slot's storage index (public anyway)."""
    return b32encode(cap.storage_index)


class SnapshotLog:
    """The node's snapshot log (``private/snapshots.sqlite``)."""

    def __init__(self, node: NodeDir) -> None:
        node.private.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(
            node.private / "snapshots.sqlite", isolation_level=None, timeout=30.0
        )
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS snapshots (tree TEXT NOT NULL, seq INTEGER NOT NULL,"
            " at_ns INTEGER NOT NULL, root TEXT NOT NULL, next_seq INTEGER NOT NULL DEFAULT 0,"
            " PRIMARY KEY (tree, seq))"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS held (tree TEXT NOT NULL, seq INTEGER NOT NULL,"
            " cap TEXT NOT NULL, PRIMARY KEY (tree, seq, cap))"
        )

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> SnapshotLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, tree: str, seq: int, root: str, at_ns: int | None = None) -> None:
        """Remember version ``seq`` of ``tree`` (the first sighting's time stays)."""
        now = time.time_ns() if at_ns is None else at_ns
        self.db.execute(
            "INSERT OR IGNORE INTO snapshots VALUES (?, ?, ?, ?, 0)", (tree, seq, now, root)
        )

    def versions(self, tree: str) -> list[Snapshot]:
        """The tree's snapshots, oldest first."""
        rows = self.db.execute(
            "SELECT seq, at_ns, root, next_seq FROM snapshots WHERE tree = ? ORDER BY seq", (tree,)
        )
        return [Snapshot(int(s), int(a), str(r), int(n)) for s, a, r, n in rows]

    def trees(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT tree FROM snapshots ORDER BY tree")]

    def forget(self, tree: str, seqs: Iterable[int]) -> None:
        rows = [(tree, s) for s in seqs]
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("DELETE FROM snapshots WHERE tree = ? AND seq = ?", rows)
            self.db.executemany("DELETE FROM held WHERE tree = ? AND seq = ?", rows)

    def set_held(self, tree: str, seq: int, next_seq: int, caps: Iterable[str]) -> None:
        """Version ``seq`` references ``caps`` that version ``next_seq`` does not."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM held WHERE tree = ? AND seq = ?", (tree, seq))
            self.db.executemany(
                "INSERT OR IGNORE INTO held VALUES (?, ?, ?)", [(tree, seq, c) for c in caps]
            )
            self.db.execute(
                "UPDATE snapshots SET next_seq = ? WHERE tree = ? AND seq = ?",
                (next_seq, tree, seq),
            )

    def held(self, tree: str, seqs: Iterable[int] | None = None) -> set[str]:
        """The held caps of the tree's versions (of ``seqs`` only, if given)."""
        if seqs is None:
            rows = self.db.execute("SELECT cap FROM held WHERE tree = ?", (tree,))
            return {r[0] for r in rows}
        out: set[str] = set()
        for seq in seqs:
            rows = self.db.execute("SELECT cap FROM held WHERE tree = ? AND seq = ?", (tree, seq))
            out |= {r[0] for r in rows}
        return out


class RootRecorder:
    """Records the root versions one tree's store reads or publishes (the
    callback of :class:`gridfs.client.gridstore.GridStore`); a version
    already recorded costs nothing."""

    def __init__(self, node: NodeDir, cap: SlotCap) -> None:
        self.node = node
        self.tree = tree_key(cap)
        self.last_seq = -1

    def __call__(self, seq: int, payload: bytes) -> None:
        if seq == self.last_seq or seq <= 0:
            return
        try:
            root = unpack_root(payload)
        except FormatError:
            return
        try:
            with SnapshotLog(self.node) as log:
                log.record(self.tree, seq, root)
        except sqlite3.Error as e:  # reading the tree must not fail for it
            log_.warning("could not record version %d of %s: %s", seq, self.tree[:12], e)
            return
        self.last_seq = seq


class SharedRecorder:
    """Records the versions of shared directories' slots a tree's store
    reads or publishes (``GridStore.on_shared``): each slot has its own
    snapshots, as a tree's root does, under its own :func:`tree_key`."""

    def __init__(self, node: NodeDir) -> None:
        self.node = node
        self.recorders: dict[bytes, RootRecorder] = {}

    def __call__(self, cap: SlotCap, seq: int, payload: bytes) -> None:
        recorder = self.recorders.get(cap.storage_index)
        if recorder is None:
            recorder = self.recorders[cap.storage_index] = RootRecorder(self.node, cap)
        recorder(seq, payload)


def version_at(node: NodeDir, cap: SlotCap, at_ns: int) -> str | None:
    """The directory a shared directory's slot held at ``at_ns``, as far as
    the node's snapshot log knows (the newest version recorded by then);
    None if it recorded none (:attr:`gridfs.tree.Tree.version_at`)."""
    try:
        with SnapshotLog(node) as log:
            versions = log.versions(tree_key(cap))
    except sqlite3.Error:
        return None
    known = [s for s in versions if s.at_ns <= at_ns]
    return max(known, key=lambda s: s.seq).root if known else None


async def update_held(log: SnapshotLog, key: str, tree: Tree) -> list[Snapshot]:
    """Bring the held caps of the tree's versions up to date: each version's
    are the caps it references that the next recorded version does not
    reference at the same place (:func:`gridfs.reach.dropped_caps`).  By
    induction over the versions, everything a version references is in the
    newest version's walk or in the held caps of that version or a later
    one: so the walk of the newest root and the held caps of the kept
    versions cover every kept version, and only a new pair of versions
    costs a comparison (of the directories that changed).  Returns the
    versions that could not be compared (their directories, or their
    successor's, cannot be fetched)."""
    versions = log.versions(key)
    failed: list[Snapshot] = []
    for old, new in itertools.pairwise(versions):
        if old.next_seq == new.seq:
            continue
        try:
            with plain_grid_errors():
                caps = await dropped_caps(tree, old.root, new.root)
        except GridError as e:
            log_.warning("snapshot %d of %s cannot be walked: %s", old.seq, key[:12], e)
            failed.append(old)
            continue
        log.set_held(key, old.seq, new.seq, caps)
    return failed


def expired(
    snapshots: list[Snapshot], retention: float, keep: int, now_ns: int | None = None
) -> list[Snapshot]:
    """The snapshots the policy lets go: older than ``retention`` seconds and
    not among the ``keep`` newest (the newest one, the tree's current version
    as far as this node knows, is always kept)."""
    now = time.time_ns() if now_ns is None else now_ns
    newest_first = sorted(snapshots, key=lambda s: s.seq, reverse=True)
    keep = max(1, keep)
    return [s for s in newest_first[keep:] if now - s.at_ns >= retention * 1e9]


def iso_time(at_ns: int) -> str:
    """``2026-12-05T05:10:03Z``: a snapshot's time as its name shows it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at_ns // 1_000_000_000))


def snapshot_names(snapshots: list[Snapshot]) -> dict[str, Snapshot]:
    """Each snapshot by its name: its ISO time, and for a second version in
    the same second, that time and ``.SEQ``."""
    out: dict[str, Snapshot] = {}
    for s in sorted(snapshots, key=lambda s: s.seq):
        name = iso_time(s.at_ns)
        out[name if name not in out else f"{name}.{s.seq}"] = s
    return out


def parse_time(text: str) -> int:
    """``--at`` of restore: an ISO 8601 time (UTC unless it names a zone;
    ``Z`` allowed), as nanoseconds since the epoch (the end of the second
    when it names none of its fractions)."""
    stem = text.strip()
    try:
        when = datetime.datetime.fromisoformat(stem.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--at {text!r}: not a time (e.g. 2026-12-05T05:10:03Z, as gridfs snapshots lists)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    ns = int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000
    return ns + (999_999_999 if not when.microsecond else 0)  # the whole second


def pick(snapshots: list[Snapshot], at: str) -> Snapshot:
    """The snapshot named ``at``, else the newest one taken at or before
    the time ``at`` (to the second)."""
    named = snapshot_names(snapshots)
    if at in named:
        return named[at]
    when = parse_time(at)
    before = [s for s in snapshots if s.at_ns <= when]
    if not before:
        raise UsageError(f"no snapshot of this tree at or before {at} (see gridfs snapshots)")
    return max(before, key=lambda s: s.seq)
