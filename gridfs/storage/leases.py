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

Accounting.  Every lease names the *member* that made it (the client's node
id; ``b""`` for a client without one).  A member is *charged* for an object
(a share, or the slot: number -1) of a storage index when it stores the
object, and for every object already there when it takes its first lease on
the index; the charge goes when its last lease on the index goes, or the
object does.  Two members leasing one index are each charged in full for
what was there when they leased it, and only the uploader for what came
later: nobody can charge a member for shares it never saw.  A member's usage
is the sum of its charges, kept in the ``usage`` table by triggers, so it
moves in the same transaction as the charges.  A charge for an upload under
way (an open bucket, a slot being written) is *unsettled*: it holds the
promised size against the member's quota until the upload ends; on the next
start, every unsettled charge is set from what the disk holds (or dropped),
so a crash never leaves a charge for nothing nor an object uncharged.

The database is ``leases.sqlite`` under the server's storage root (SQLite in
WAL mode, synchronous=FULL: an acknowledged lease survives a power cut).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gridfs.errors import GridError

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
CREATE TABLE IF NOT EXISTS charges (
    si BLOB NOT NULL,
    num INTEGER NOT NULL,
    member BLOB NOT NULL,
    bytes INTEGER NOT NULL,
    settled INTEGER NOT NULL,
    PRIMARY KEY (si, num, member)
);
CREATE INDEX IF NOT EXISTS charges_unsettled ON charges (settled) WHERE settled = 0;
CREATE TABLE IF NOT EXISTS usage (member BLOB PRIMARY KEY, bytes INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS charge_added AFTER INSERT ON charges BEGIN
    INSERT INTO usage VALUES (NEW.member, NEW.bytes)
    ON CONFLICT (member) DO UPDATE SET bytes = bytes + NEW.bytes;
END;
CREATE TRIGGER IF NOT EXISTS charge_dropped AFTER DELETE ON charges BEGIN
    UPDATE usage SET bytes = bytes - OLD.bytes WHERE member = OLD.member;
END;
CREATE TRIGGER IF NOT EXISTS charge_changed AFTER UPDATE OF bytes ON charges BEGIN
    UPDATE usage SET bytes = bytes - OLD.bytes + NEW.bytes WHERE member = NEW.member;
END;
"""

SLOT = -1
"""The object number of a storage index's slot (shares are 0..255)."""

Objects = dict[int, int]
"""The objects stored under one storage index: number (SLOT for the slot) -> bytes."""


class QuotaExceededError(GridError):
    """The member would hold more than this server's ``client_quota``."""

    code = "quota-exceeded"


NONE = "none"
"""cancel: no lease with that cancel secret on that storage index."""
KEPT = "kept"
"""cancel: the lease was renewed at or after the fence, so it stays."""
CANCELLED = "cancelled"
"""cancel: the lease is gone; other leases keep the storage."""
DELETED = "deleted"
"""cancel: that was the last lease; the storage is freed."""
REFUSED = -1
"""add_many: a new lease that would take its member past the quota; not added."""


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
    """The leases of one server, the charges of its members, and the storage
    indexes waiting to be freed.

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
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(leases)")}
        if "member" not in columns:  # a database from before accounting
            self.db.execute("ALTER TABLE leases ADD COLUMN member BLOB NOT NULL DEFAULT x''")
        self.db.execute("CREATE INDEX IF NOT EXISTS leases_member ON leases (si, member)")
        self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        """A second connection for :meth:`usage`: in WAL mode it reads the
        last commit without waiting for a writer (``stats`` never waits)."""
        self._reader_lock = threading.Lock()
        self.collected = 0
        """Storage indexes freed since this object was made."""
        (gen,) = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        self._generation = int(gen)
        """The stored generation, mirrored in memory (only add_many changes it)."""
        self.finish_garbage()

    def close(self) -> None:
        with self._lock, self._reader_lock:
            self.db.close()
            self._reader.close()

    def now(self) -> int:
        return self._clock()

    def add(self, si: bytes, renew_secret: bytes, cancel_secret: bytes, member: bytes = b"") -> int:
        """Add a lease, or renew the one with this renew secret; returns its
        new expiry (ns since the epoch).  A renewal keeps the cancel secret
        and the member the lease was made with."""
        return self.add_many([(si, renew_secret, cancel_secret)], member=member)[0]

    def add_many(
        self,
        items: list[tuple[bytes, bytes, bytes]],
        held: Callable[[bytes], Objects] | None = None,
        member: bytes = b"",
        quota: int = 0,
    ) -> list[int]:
        """Add or renew many leases of ``member`` in one transaction.  With
        ``held`` (what is stored under an index), only on storage indexes
        that hold something (asked under the lock, so a collection cannot
        slip in between); returns how many objects each holds then, else
        every lease's expiry.  A member's first lease on an index charges it
        for what is there; one that would take it past ``quota`` (0: none)
        is not added and answers REFUSED.  Renewals are never refused (they
        charge nothing), so one new lease too many never costs the others
        of its batch."""
        now = self._clock()
        expires = now + self.duration_ns
        with self._lock:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                answers = []
                for si, renew, cancel in items:
                    objects = held(si) if held else None
                    answers.append(expires if objects is None else len(objects))
                    if objects is not None and not objects:
                        continue
                    self.db.execute("SAVEPOINT item")
                    if self._lease_locked(si, renew, cancel, member, now, expires, objects):
                        try:
                            self._check_quota_locked(member, quota)
                        except QuotaExceededError:
                            self.db.execute("ROLLBACK TO item")
                            answers[-1] = REFUSED
                    self.db.execute("RELEASE item")
                self._bump_generation_locked()
            self._generation += 1  # committed
        return answers

    def reserve(
        self,
        si: bytes,
        renew_secret: bytes,
        cancel_secret: bytes,
        member: bytes,
        held: Callable[[bytes], Objects],
        new: Objects,
        quota: int = 0,
    ) -> None:
        """Add or renew ``member``'s lease on ``si`` before it stores ``new``
        objects there (number -> bytes), and charge it for them, unsettled,
        until :meth:`settle`; ``held`` is what ``si`` holds now (charged if
        this is the member's first lease on it).  All or nothing: past
        ``quota`` (0: none) it raises QuotaExceededError and changes nothing."""
        self.reserve_many([(si, renew_secret, cancel_secret, new)], member, held, quota)

    def reserve_many(
        self,
        items: Sequence[tuple[bytes, bytes, bytes, Objects]],
        member: bytes,
        held: Callable[[bytes], Objects],
        quota: int = 0,
    ) -> None:
        """:meth:`reserve` each (si, renew_secret, cancel_secret, new), in
        one transaction (one fsync): all or nothing."""
        now = self._clock()
        with self._lock:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                charged = False
                for si, renew_secret, cancel_secret, new in items:
                    expires = now + self.duration_ns
                    charged |= self._lease_locked(
                        si, renew_secret, cancel_secret, member, now, expires, held(si)
                    )
                    for num, size in new.items():
                        self.db.execute(
                            "INSERT INTO charges VALUES (?, ?, ?, ?, 0) "
                            "ON CONFLICT (si, num, member) "
                            "DO UPDATE SET bytes = max(bytes, excluded.bytes), settled = 0",
                            (si, num, member, size),
                        )
                        charged = True
                if charged:
                    self._check_quota_locked(member, quota)
                self._bump_generation_locked()
            self._generation += 1  # committed

    def settle(self, si: bytes, num: int, size: int | None) -> None:
        """An upload of object ``num`` of ``si`` ended: it now holds ``size``
        bytes, or nothing (None).  Not fsynced: a settlement lost in a crash
        is redone from the disk on the next start (see :meth:`reconcile`)."""
        self.settle_many([(si, num, size)])

    def settle_many(self, items: Sequence[tuple[bytes, int, int | None]]) -> None:
        """:meth:`settle` each (si, num, size), in one transaction."""
        with self._lock:
            self.db.execute("PRAGMA synchronous=NORMAL")
            try:
                with self.db:
                    self.db.execute("BEGIN IMMEDIATE")
                    for si, num, size in items:
                        self._settle_locked(si, num, size)
            finally:
                self.db.execute("PRAGMA synchronous=FULL")

    def unsettle(self, si: bytes, num: int) -> None:
        """Object ``num`` of ``si`` is about to go (quarantine): its charges
        follow the disk from now on, so a crash midway leaves them right."""
        with self._lock, self.db:
            self.db.execute("UPDATE charges SET settled = 0 WHERE si = ? AND num = ?", (si, num))

    def reconcile(self, size_of: Callable[[bytes, int], int | None]) -> int:
        """Set every unsettled charge from what the disk holds (``size_of``:
        bytes of an object, None if it is not stored).  Call once at start,
        before any upload: an unsettled charge then is one a crash left.
        Returns how many charges it settled."""
        with self._lock:
            rows = self.db.execute(
                "SELECT DISTINCT si, num FROM charges WHERE settled = 0"
            ).fetchall()
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                for si, num in rows:
                    self._settle_locked(si, num, size_of(si, num))
        return len(rows)

    def usage(self, member: bytes) -> int:
        """Bytes charged to ``member`` (settled, and promised to its uploads),
        as of the last commit; never waits for the writer's lock."""
        with self._reader_lock:
            row = self._reader.execute(
                "SELECT bytes FROM usage WHERE member = ?", (member,)
            ).fetchone()
        return 0 if row is None else int(row[0])

    def charges(self, member: bytes) -> dict[tuple[bytes, int], int]:
        """(si, object number) -> bytes charged to ``member`` (for tests and audits)."""
        with self._lock:
            rows = self.db.execute(
                "SELECT si, num, bytes FROM charges WHERE member = ?", (member,)
            ).fetchall()
        return {(si, num): size for si, num, size in rows}

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
                    "SELECT renew_hash, renewed_gen, member FROM leases "
                    "WHERE si = ? AND cancel_hash = ?",
                    (si, secret_hash(cancel_secret)),
                ).fetchone()
                if row is None:
                    return NONE
                if renewed_before is not None and row[1] >= renewed_before:
                    return KEPT
                self.db.execute("DELETE FROM leases WHERE si = ? AND renew_hash = ?", (si, row[0]))
                self._uncharge_locked(si, row[2])
                last = self._count(si) == 0
                if last:
                    self._to_garbage_locked(si)
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
                    "SELECT si, renew_hash, member FROM leases WHERE expires_ns <= ? "
                    "ORDER BY expires_ns LIMIT ?",
                    (now, limit),
                ).fetchall()
                self.db.executemany(
                    "DELETE FROM leases WHERE si = ? AND renew_hash = ?",
                    [(si, renew) for si, renew, _ in rows],
                )
                for si, member in sorted({(si, member) for si, _, member in rows}):
                    self._uncharge_locked(si, member)
                emptied = sorted({si for si, _, _ in rows if self._count(si) == 0})
                for si in emptied:
                    self._to_garbage_locked(si)
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

    def _lease_locked(
        self,
        si: bytes,
        renew: bytes,
        cancel: bytes,
        member: bytes,
        now: int,
        expires: int,
        held: Objects | None,
    ) -> bool:
        """Add or renew one lease (in the caller's transaction); on the
        member's first lease on ``si``, charge it for ``held``.  Whether
        anything was charged.  A renewal keeps the lease's member, except
        that a lease of no member (made before accounting) is adopted by
        the member renewing it, whose secret proves it is the same client."""
        renew_hash = secret_hash(renew)
        row = self.db.execute(
            "SELECT member FROM leases WHERE si = ? AND renew_hash = ?", (si, renew_hash)
        ).fetchone()
        previous = None if row is None else bytes(row[0])
        owner = member if previous in (None, b"") else previous
        first = (
            owner == member
            and self.db.execute(
                "SELECT 1 FROM leases WHERE si = ? AND member = ? LIMIT 1", (si, member)
            ).fetchone()
            is None
        )
        self.db.execute(
            "INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (si, renew_hash) "
            "DO UPDATE SET renewed_ns = excluded.renewed_ns, "
            "expires_ns = excluded.expires_ns, renewed_gen = excluded.renewed_gen, "
            "member = excluded.member",
            (si, renew_hash, secret_hash(cancel), now, expires, self._generation + 1, owner),
        )
        if previous is not None and previous != owner:
            self._uncharge_locked(si, previous)
        self.db.execute("DELETE FROM garbage WHERE si = ?", (si,))
        if not first or not held:
            return False
        self.db.executemany(
            "INSERT OR IGNORE INTO charges VALUES (?, ?, ?, ?, 1)",
            [(si, num, member, size) for num, size in held.items()],
        )
        return True

    def _check_quota_locked(self, member: bytes, quota: int) -> None:
        if not quota:
            return
        row = self.db.execute("SELECT bytes FROM usage WHERE member = ?", (member,)).fetchone()
        used = 0 if row is None else int(row[0])
        if used > quota:
            raise QuotaExceededError(
                f"quota exceeded: this would make {used} bytes stored for this client "
                f"here, and its quota is {quota}"
            )

    def _bump_generation_locked(self) -> None:
        """Store the next generation in the caller's transaction (the caller
        advances the in-memory mirror once that commits)."""
        gen = self._generation + 1
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (gen,))

    def _settle_locked(self, si: bytes, num: int, size: int | None) -> None:
        if size is None:
            self.db.execute("DELETE FROM charges WHERE si = ? AND num = ?", (si, num))
        else:
            self.db.execute(
                "UPDATE charges SET bytes = ?, settled = 1 WHERE si = ? AND num = ?",
                (size, si, num),
            )

    def _uncharge_locked(self, si: bytes, member: bytes) -> None:
        """Drop ``member``'s charges on ``si`` if it has no lease there any more."""
        if (
            self.db.execute(
                "SELECT 1 FROM leases WHERE si = ? AND member = ? LIMIT 1", (si, member)
            ).fetchone()
            is None
        ):
            self.db.execute("DELETE FROM charges WHERE si = ? AND member = ?", (si, member))

    def _to_garbage_locked(self, si: bytes) -> None:
        """``si`` lost its last lease: queue it for freeing, and let its
        remaining charges (uploads under way) follow the disk."""
        self.db.execute("INSERT OR IGNORE INTO garbage VALUES (?)", (si,))
        self.db.execute("UPDATE charges SET settled = 0 WHERE si = ?", (si,))

    def _count(self, si: bytes) -> int:
        (n,) = self.db.execute("SELECT count(*) FROM leases WHERE si = ?", (si,)).fetchone()
        return int(n)

    def _free(self, si: bytes) -> None:
        """Delete the storage of ``si`` if it still has no lease (a lease may
        have been added since it went into the garbage table)."""
        collected = self._count(si) == 0
        if collected:
            try:
                self._collect(si)
            except Exception as e:
                log.warning("could not free %s: %s", si.hex(), e)
                return
            self.collected += 1
        with self.db:
            self.db.execute("DELETE FROM garbage WHERE si = ?", (si,))
            if collected:  # what is left are charges for uploads under way
                self.db.execute("DELETE FROM charges WHERE si = ? AND settled = 0", (si,))
