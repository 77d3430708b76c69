"""Leases: who wants a storage index kept on this server, and until when.

A lease is held on a storage index (it covers every share of it here, and the
slot, if that is what the index names).  It is known by the hash of its renew
secret and can be cancelled only by the holder of its cancel secret; the
server keeps only SHA-256 hashes of both, so neither its disk nor a copy of
its database lets anyone renew or cancel a lease.  Clients derive both
secrets per node, per file and per server (see :mod:`gridfs.hashes`), so a
server cannot use what one client sent it against another server.

Every add or renewal also takes the next value of a counter kept in the
database (the *generation*): a client's fence is that counter, read from
``stats`` as ``lease_fence``, so "renewed after the fence" never depends on
the clock.

When the last lease of a storage index is cancelled or expires, the index
goes into the ``garbage`` table in the same transaction, and its shares and
slot are deleted afterwards; a crash in between is finished when the store
reopens.  Storage that never had a lease is never collected.

The database is ``leases.sqlite`` under the server's storage root (SQLite in
WAL mode, synchronous=FULL: an acknowledged lease survives a power cut).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_LEASE_DURATION = 31 * 24 * 3600.0
"""Seconds a lease lasts from its last renewal (Tahoe-LAFS uses 31 days too)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    si BLOB NOT NULL,
    renew_hash BLOB NOT NULL,
    cancel_hash BLOB NOT NULL,
    renewed_ns INTEGER NOT NULL,
    expires_ns INTEGER NOT NULL,
    renewed_gen INTEGER NOT NULL,
    PRIMARY KEY (si, renew_hash)
);
CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_ns);
CREATE INDEX IF NOT EXISTS leases_cancel ON leases (si, cancel_hash);
CREATE TABLE IF NOT EXISTS garbage (si BLOB PRIMARY KEY);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('generation', 0);
"""

NONE = "none"
"""cancel: no lease with that cancel secret on that storage index."""
KEPT = "kept"
"""cancel: the lease was renewed at or after the fence, so it stays."""
CANCELLED = "cancelled"
"""cancel: the lease is gone; other leases keep the storage."""
DELETED = "deleted"
"""cancel: that was the last lease; the storage is freed."""


def secret_hash(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


@dataclass(frozen=True)
class LeaseInfo:
    """One lease as stored (hashes only)."""

    renew_hash: bytes
    cancel_hash: bytes
    renewed_ns: int
    expires_ns: int


class LeaseDB:
    """The leases of one server, and the storage indexes waiting to be freed.

    ``collect(si)`` is called (under this object's lock) to delete what is
    stored under an index whose last lease went; it must be idempotent.
    Thread-safe: every method holds one lock, so adding a lease and
    collecting an index never interleave.
    """

    def __init__(
        self,
        path: Path,
        collect: Callable[[bytes], None],
        duration: float = DEFAULT_LEASE_DURATION,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        if not duration > 0:
            raise ValueError(f"lease duration must be positive, not {duration}")
        self.duration_ns = int(duration * 1e9)
        self._collect = collect
        self._clock = clock
        self._lock = threading.RLock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.collected = 0
        """Storage indexes freed since this object was made."""
        (gen,) = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        self._generation = int(gen)
        """The stored generation, mirrored in memory (only add_many changes it)."""
        self.finish_garbage()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def now(self) -> int:
        return self._clock()

    def add(self, si: bytes, renew_secret: bytes, cancel_secret: bytes) -> int:
        """Add a lease, or renew the one with this renew secret; returns its
        new expiry (ns since the epoch).  A renewal keeps the cancel secret
        the lease was made with."""
        return self.add_many([(si, renew_secret, cancel_secret)])[0]

    def add_many(
        self,
        items: list[tuple[bytes, bytes, bytes]],
        held: Callable[[bytes], int] | None = None,
    ) -> list[int]:
        """Add or renew many leases in one transaction.  With ``held``, only
        on storage indexes for which it answers more than 0 (asked under
        the lock, so a collection cannot slip in between); returns its
        answers then, else every lease's expiry."""
        now = self._clock()
        expires = now + self.duration_ns
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            answers = [held(si) for si, _, _ in items] if held else [expires] * len(items)
            gen = self._generation + 1
            self.db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (gen,))
            for (si, renew, cancel), answer in zip(items, answers, strict=True):
                if not answer:
                    continue
                self.db.execute(
                    "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (si, renew_hash) "
                    "DO UPDATE SET renewed_ns = excluded.renewed_ns, "
                    "expires_ns = excluded.expires_ns, renewed_gen = excluded.renewed_gen",
                    (si, secret_hash(renew), secret_hash(cancel), now, expires, gen),
                )
                self.db.execute("DELETE FROM garbage WHERE si = ?", (si,))
        self._generation = gen  # committed
        return answers

    def fence(self) -> int:
        """The generation the next add or renewal will get: a lease renewed
        after this call has ``renewed_gen >= fence()``.  Takes no lock (an
        int read), so ``stats`` never waits for a commit's fsync."""
        return self._generation + 1

    def cancel(self, si: bytes, cancel_secret: bytes, renewed_before: int | None = None) -> str:
        """Cancel the lease this cancel secret made, unless it was renewed at
        or after the fence ``renewed_before`` (a :meth:`fence` value).  Frees
        the storage if it was the last lease.  Returns NONE, KEPT, CANCELLED
        or DELETED."""
        with self._lock:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                row = self.db.execute(
                    "SELECT renew_hash, renewed_gen FROM leases WHERE si = ? AND cancel_hash = ?",
                    (si, secret_hash(cancel_secret)),
                ).fetchone()
                if row is None:
                    return NONE
                if renewed_before is not None and row[1] >= renewed_before:
                    return KEPT
                self.db.execute("DELETE FROM leases WHERE si = ? AND renew_hash = ?", (si, row[0]))
                last = self._count(si) == 0
                if last:
                    self.db.execute("INSERT OR IGNORE INTO garbage VALUES (?)", (si,))
            if not last:
                return CANCELLED
            self._free(si)
            return DELETED

    def leases(self, si: bytes) -> list[LeaseInfo]:
        with self._lock:
            rows = self.db.execute(
                "SELECT renew_hash, cancel_hash, renewed_ns, expires_ns FROM leases "
                "WHERE si = ? ORDER BY renewed_ns",
                (si,),
            ).fetchall()
        return [LeaseInfo(*r) for r in rows]

    def count(self, si: bytes) -> int:
        with self._lock:
            return self._count(si)

    def expire_step(self, limit: int = 1000) -> tuple[int, int]:
        """One bounded step of the expiry crawler: drop at most ``limit``
        expired leases and free what they alone kept.  Returns (leases
        dropped, storage indexes freed); (0, 0) when nothing was due."""
        now = self._clock()
        with self._lock:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                rows = self.db.execute(
                    "SELECT si, renew_hash FROM leases WHERE expires_ns <= ? "
                    "ORDER BY expires_ns LIMIT ?",
                    (now, limit),
                ).fetchall()
                self.db.executemany("DELETE FROM leases WHERE si = ? AND renew_hash = ?", rows)
                emptied = sorted({si for si, _ in rows if self._count(si) == 0})
                self.db.executemany(
                    "INSERT OR IGNORE INTO garbage VALUES (?)", [(s,) for s in emptied]
                )
            for si in emptied:
                self._free(si)
        return len(rows), len(emptied)

    def expired(self) -> int:
        """How many leases are past their expiry and not yet crawled."""
        with self._lock:
            (n,) = self.db.execute(
                "SELECT count(*) FROM leases WHERE expires_ns <= ?", (self._clock(),)
            ).fetchone()
        return int(n)

    def total(self) -> int:
        with self._lock:
            (n,) = self.db.execute("SELECT count(*) FROM leases").fetchone()
        return int(n)

    def finish_garbage(self) -> None:
        """Free every index left in the garbage table (after a crash)."""
        with self._lock:
            for (si,) in self.db.execute("SELECT si FROM garbage").fetchall():
                self._free(si)

    def _count(self, si: bytes) -> int:
        (n,) = self.db.execute("SELECT count(*) FROM leases WHERE si = ?", (si,)).fetchone()
        return int(n)

    def _free(self, si: bytes) -> None:
        """Delete the storage of ``si`` if it still has no lease (a lease may
        have been added since it went into the garbage table)."""
        if self._count(si) == 0:
            try:
                self._collect(si)
            except Exception as e:
                log.warning("could not free %s: %s", si.hex(), e)
                return
            self.collected += 1
        with self.db:
            self.db.execute("DELETE FROM garbage WHERE si = ?", (si,))
