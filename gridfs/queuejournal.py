"""The work queue's journal: its layout on disk, its step records, and its
placeholder caps (see gridfs.workqueue, whose API re-exports these; nothing
else reads the journal's files).

``NODE/queues/<tree's slot storage index>/`` holds ``queue.sqlite`` (the
steps and the retained caps), ``tempfiles/``, ``boxes/``, ``staging/``
(the mount's files being written) and ``mount.lock``.  Layout and step
arguments: docs/formats.md, "Work queue" and "Queued edits".
"""

from __future__ import annotations

import os
import signal
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .caps import b32encode, log_name

UPLOAD, RETAIN, PATH, UNLINK, CLEANUP = range(5)
SECTIONS = {
    "upload_chk": UPLOAD,
    "upload_edit": UPLOAD,
    "retain_uri_from_box": RETAIN,
    "retain_ssk": RETAIN,
    "addpath": PATH,
    "deletepath": PATH,
    "move": PATH,
    "unlink_uri": UNLINK,
    "unlink_ssk": UNLINK,
    "unlink_commit": UNLINK,
    "delete_tempfile": CLEANUP,
    "delete_box": CLEANUP,
}
SCHEMA = """
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    section INTEGER NOT NULL,
    kind TEXT NOT NULL,
    args BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS steps_order ON steps (section, id);
CREATE TABLE IF NOT EXISTS retained (cap TEXT PRIMARY KEY, added_ns INTEGER NOT NULL);
"""
DATABASE = "queue.sqlite"


LOCAL = "local:"
"""Placeholder cap of a file whose upload is queued: ``local:BOX:TEMPFILE``
(the box its cap will fill; the tempfile holding its bytes meanwhile)."""
PENDING = "pending:"
"""Placeholder cap of a directory (or pack) built by the view's overlay and
not stored yet (see gridfs.client.gridstore.OverlayStore)."""
MOUNT_LOCK = "mount.lock"
"""Held by the daemon mounting the queue's tree (first line: PID MOUNTPOINT)."""


def is_placeholder(cap: str) -> bool:
    """A cap standing for something not on the grid yet (only ever in a view)."""
    return cap.startswith((LOCAL, PENDING))


def is_local(cap: str) -> bool:
    return cap.startswith(LOCAL)


def local_box(cap: str) -> str:
    """The box a ``local:`` placeholder's upload fills."""
    return cap.split(":", 2)[1]


def queue_directory(node_root: Path, storage_index: bytes) -> Path:
    """Where the queue of the tree with root slot ``storage_index`` lives."""
    return Path(node_root) / "queues" / b32encode(storage_index)


def queue_directories(node_root: Path) -> list[Path]:
    """The queue directories of a node, one a tree it has changed."""
    return sorted(p for p in (Path(node_root) / "queues").glob("*") if p.is_dir())


def backlog(directory: Path) -> tuple[int, int] | None:
    """(pending steps, failing steps) of the queue in ``directory``, read
    without taking part in it (another process may be running it); None if
    it cannot be read now."""
    db = Path(directory) / DATABASE
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
        try:
            pending, failing = con.execute(
                "SELECT COUNT(*), COUNT(last_error) FROM steps"
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return int(pending), int(failing)


def retained_caps(directory: Path) -> set[str]:
    """Caps the queue in ``directory`` holds between upload and linking (an
    upload step fills its box and the retained table in one transaction)."""
    db = Path(directory) / DATABASE
    if not db.exists():
        return set()
    con = sqlite3.connect(db, timeout=30.0)
    try:
        return {r[0] for r in con.execute("SELECT cap FROM retained")}
    finally:
        con.close()


EDIT_SUFFIX = ".edit"
"""The name of an edit's tempfile ends so: a sparse file, not the whole file."""


@dataclass(frozen=True)
class QueuedEdit:
    """A queued ``upload_edit`` step: the new version of a file is the
    version ``base`` (a cap, or the box another queued upload fills),
    with the bytes of ``tempfile`` in ``extents``, truncated or extended
    to ``size``."""

    tempfile: Path
    extents: list[tuple[int, int]]
    size: int
    base: str | None
    base_box: str | None

    @property
    def base_ref(self) -> str:
        """The base as a cap the view understands (a placeholder while queued)."""
        return self.base if self.base is not None else f"{LOCAL}{self.base_box}:"


@dataclass(frozen=True)
class Step:
    id: int
    kind: str
    args: dict[str, Any]
    attempts: int = 0
    last_error: str | None = None

    @property
    def section(self) -> int:
        return SECTIONS[self.kind]

    def describe(self) -> str:
        a = self.args
        what = {
            "upload_chk": lambda: f"upload {a['tempfile']} into box {a['box']}",
            "upload_edit": lambda: (
                f"upload an edit of {sum(n for _, n in a['extents'])} bytes "
                f"({Path(a['tempfile']).name}) into box {a['box']}"
            ),
            "addpath": lambda: f"add {a['path']}",
            "deletepath": lambda: f"delete {a['path']}",
            "move": lambda: f"move {a['src']} to {a['dst']}",
            "retain_uri_from_box": lambda: f"retain the cap in box {a['box']}",
            "retain_ssk": lambda: f"retain {log_name(a['cap'])}",
            "unlink_uri": lambda: f"unlink {log_name(a['uri'])}",
            "unlink_ssk": lambda: f"unlink {log_name(a['cap'])}",
            "unlink_commit": lambda: f"unlink what a commit dropped ({len(a['caps'])} files)",
            "delete_tempfile": lambda: f"delete tempfile {a['name']}",
            "delete_box": lambda: f"delete box {a['name']}",
        }[self.kind]()
        return what + (f"  (failed {self.attempts}x: {self.last_error})" if self.last_error else "")


def _checkpoint() -> None:
    """Crash-injection for tests: SIGKILL ourselves at the Nth checkpoint when
    GRIDFS_TEST_KILL_AT=N (a step boundary or the middle of a step)."""
    target = os.environ.get("GRIDFS_TEST_KILL_AT")
    if target is None:
        return
    _checkpoint.count = getattr(_checkpoint, "count", 0) + 1  # type: ignore[attr-defined]
    if _checkpoint.count == int(target):  # type: ignore[attr-defined]
        os.kill(os.getpid(), signal.SIGKILL)
