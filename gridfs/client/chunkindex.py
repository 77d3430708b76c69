"""The node's chunk index: which chunks it has stored, to skip storing them again.

A chunk's key is convergent (its plaintext, the codec parameters and the
node's convergence secret decide it), so the same chunk always gets the
same cap; the index maps that key to the cap, which saves encoding a chunk
again just to learn its cap.  An entry is only a hint: before a cap from
the index goes into a manifest, the uploader renews this node's lease on
it at every server (:mod:`gridfs.client.chunked`), and stores the chunk
anew unless ``happy`` servers answer that they hold it.  So an entry whose
chunk was since given up costs one upload, never a lost chunk; and the
lease renewal is what keeps a concurrent unlink (its fence) from freeing it.

Kept in ``private/chunks.sqlite`` (mode 0600: a read cap is a key), WAL,
written only after a chunk was stored (a crash loses hints, nothing else),
and bounded to :data:`MAX_ENTRIES`, the least recently used go first.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from ..fileutil import open_private_db

MAX_ENTRIES = 200_000
"""About 200 GiB of distinct ~1 MiB chunks; some 40 MB of index."""
FILE_NAME = "chunks.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    key BLOB PRIMARY KEY,       -- the chunk's convergent AES key (32 bytes)
    cap TEXT NOT NULL,          -- its read cap
    used_ns INTEGER NOT NULL    -- last stored or reused (for eviction)
)
"""


class ChunkIndex:
    """Convergent chunk key → cap, on disk, shared by the node's processes."""

    def __init__(self, path: Path, max_entries: int = MAX_ENTRIES) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        """One user of the connection at a time: a put stores batches of
        chunks concurrently, each recording its own from a worker thread."""

    @classmethod
    def of_node(cls, private: Path) -> ChunkIndex:
        return cls(Path(private) / FILE_NAME)

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            # (used under self._lock, at times from a worker thread)
            db = open_private_db(self.path, _SCHEMA, threads=True)
            self._db = db
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def lookup(self, keys: Iterable[bytes]) -> dict[bytes, str]:
        """The caps known for ``keys`` (those not known are left out)."""
        out: dict[bytes, str] = {}
        with self._lock:
            db = self._connect()
            for key in set(keys):
                row = db.execute("SELECT cap FROM chunks WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    out[key] = str(row[0])
        return out

    def add(self, entries: dict[bytes, str]) -> None:
        """Record stored (or reused) chunks; forget the least recently used
        ones past the bound."""
        if not entries:
            return
        now = time.time_ns()
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
                " SET cap = excluded.cap, used_ns = excluded.used_ns",
                [(k, c, now) for k, c in entries.items()],
            )
            over = int(db.execute("SELECT count(*) FROM chunks").fetchone()[0]) - self.max_entries
            if over > 0:
                db.execute(
                    "DELETE FROM chunks WHERE key IN"
                    " (SELECT key FROM chunks ORDER BY used_ns, rowid LIMIT ?)",
                    (over,),
                )

    def forget(self, caps: Iterable[str]) -> None:
        """Drop the entries of chunks found missing (a check or a failed reuse)."""
        with self._lock, self._connect() as db:
            db.executemany("DELETE FROM chunks WHERE cap = ?", [(c,) for c in caps])

    def __len__(self) -> int:
        with self._lock:
            return int(self._connect().execute("SELECT count(*) FROM chunks").fetchone()[0])
