"""Snapshots: every root version of a tree this node committed or saw.

Each version of a tree's root slot names an immutable root directory, so an
old version stays readable for as long as its directories and files stay on
the grid.  The node records each version it publishes or reads in its
snapshot log, ``private/snapshots.sqlite`` (one table, see docs/formats.md,
"Snapshot log"), and the keeper (:mod:`gridfs.client.keeper`) keeps leases on
everything the recorded versions reference: a file a commit removed stays on
the grid until the last snapshot that holds it expires.

A snapshot expires once it is older than ``snapshot_retention`` and is not
among the tree's ``snapshot_keep`` newest versions (:func:`expired`).
Snapshots are named by the time the node first saw them, in UTC, to the
second (:func:`snapshot_names`).
"""

from __future__ import annotations

import datetime
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..caps import b32encode
from ..config import NodeDir
from ..errors import FormatError, UsageError
from ..mutable import SlotCap
from ..tree import unpack_root


@dataclass(frozen=True)
class Snapshot:
    """One root version of a tree: its slot seq, when this node first saw
    (or made) it, and the cap of its root directory."""

    seq: int
    at_ns: int
    root: str


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
            " at_ns INTEGER NOT NULL, root TEXT NOT NULL, PRIMARY KEY (tree, seq))"
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
            "INSERT OR IGNORE INTO snapshots VALUES (?, ?, ?, ?)", (tree, seq, now, root)
        )

    def versions(self, tree: str) -> list[Snapshot]:
        """The tree's snapshots, oldest first."""
        rows = self.db.execute(
            "SELECT seq, at_ns, root FROM snapshots WHERE tree = ? ORDER BY seq", (tree,)
        )
        return [Snapshot(int(s), int(a), str(r)) for s, a, r in rows]

    def trees(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT tree FROM snapshots ORDER BY tree")]

    def forget(self, tree: str, seqs: Iterable[int]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "DELETE FROM snapshots WHERE tree = ? AND seq = ?", [(tree, s) for s in seqs]
            )


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
        with SnapshotLog(self.node) as log:
            log.record(self.tree, seq, root)
        self.last_seq = seq


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
