"""The highest version of each slot this node has seen: its guard against rollback.

Servers never take an older version than the one they hold, and a read takes
the highest version its servers offer; but servers that hide the newer
versions (stopped, or lying with an empty or replayed answer) could still
show a reader an older tree than it showed before.  So each client node
remembers, per slot, the highest seq it has shown or published, and a read
that can find only older versions fails instead of going back in time (see
:func:`gridfs.client.slots.read_slot`).

Kept in ``private/seen.sqlite`` (mode 0600) so that every process of the node
(commands, the mount) shares it: an update only ever raises a seq, in one
SQLite statement, so two processes racing cannot lower one.  At most
:data:`MAX_ENTRIES` slots are remembered; past that the ones raised longest
ago are forgotten (a node reads a handful of trees, not thousands).
"""

from __future__ import annotations

import sqlite3
import struct
import time
from pathlib import Path

from ..errors import UsageError
from ..fileutil import open_private_db
from ..hashes import STORAGE_INDEX_SIZE

MAX_ENTRIES = 10_000
FILE_NAME = "seen.sqlite"
_BE64 = struct.Struct(">Q")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    si BLOB PRIMARY KEY,        -- the slot's storage index (16 bytes)
    seq BLOB NOT NULL,          -- be64: compares as bytes in numeric order
    raised_ns INTEGER NOT NULL  -- when seq was last raised (for eviction)
)
"""


class SeenVersions:
    """Highest seq per slot storage index, on disk, shared by processes.

    The database is opened on first use, so a command that reads no tree
    never touches it.  Single-threaded use (the trio thread)."""

    def __init__(self, path: Path, max_entries: int = MAX_ENTRIES) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self._db: sqlite3.Connection | None = None
        self._known: dict[bytes, int] = {}
        """What this process last read or wrote: a raise to a seq not above
        it needs no write."""

    @classmethod
    def of_node(cls, private: Path) -> SeenVersions:
        """The store of the node whose private directory is ``private``."""
        return cls(Path(private) / FILE_NAME)

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = open_private_db(self.path, _SCHEMA)
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def get(self, si: bytes) -> int:
        """The highest seq seen of slot ``si``; 0 if none was."""
        row = self._connect().execute("SELECT seq FROM seen WHERE si = ?", (_si(si),)).fetchone()
        seq = 0 if row is None else int(_BE64.unpack(row[0])[0])
        self._known[si] = max(seq, self._known.get(si, 0))
        return seq

    def raise_to(self, si: bytes, seq: int) -> int:
        """Record that version ``seq`` of slot ``si`` was seen; the highest
        seen (``seq`` or one recorded before) is returned."""
        if type(seq) is not int or not 0 <= seq < 2**64:
            raise UsageError(f"a slot version number is in 0..2**64-1, not {seq!r}")
        if seq <= self._known.get(_si(si), 0):
            return self.get(si)
        db = self._connect()
        with db:
            db.execute("BEGIN IMMEDIATE")
            inserted = db.execute(
                "INSERT INTO seen VALUES (?, ?, ?) ON CONFLICT (si) DO UPDATE"
                " SET seq = excluded.seq, raised_ns = excluded.raised_ns"
                " WHERE excluded.seq > seen.seq",
                (si, _BE64.pack(seq), time.time_ns()),
            ).rowcount
            if inserted and self._count(db) > self.max_entries:
                db.execute(
                    "DELETE FROM seen WHERE si IN"
                    " (SELECT si FROM seen ORDER BY raised_ns, rowid LIMIT ?)",
                    (self._count(db) - self.max_entries,),
                )
        return self.get(si)

    def forget(self, si: bytes) -> None:
        """Drop what is known of slot ``si`` (an operator who accepts that the
        newer versions are lost for good)."""
        db = self._connect()
        with db:
            db.execute("DELETE FROM seen WHERE si = ?", (_si(si),))
        self._known.pop(si, None)

    def __len__(self) -> int:
        return self._count(self._connect())

    @staticmethod
    def _count(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT count(*) FROM seen").fetchone()[0])


def _si(si: bytes) -> bytes:
    if not isinstance(si, bytes) or len(si) != STORAGE_INDEX_SIZE:
        raise UsageError(f"a storage index is {STORAGE_INDEX_SIZE} bytes")
    return si
