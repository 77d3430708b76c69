"""The work queue: the seed's IWorkQueue, the spine of every change.

A persistent, ordered list of idempotent steps in SQLite (WAL, synchronous
commits), with the seed's ``tempfiles/`` and ``boxes/`` directories beside it.
A step is removed only after its effect is durable, so killing the process at
any instant and running the queue again ends in the same state.

Steps run by section, in the seed's order: uploads, then retains, then path
changes, then unlinks, then cleanup of tempfiles and boxes.  All pending path
changes run as one batch: one new chain of directories and one root publish.
The commit replaces its path steps by one ``unlink_commit`` step (in the same
transaction): give up the leases on what the old root referenced and the new
one does not, and on files uploaded by the batch that it did not link.  All
pending unlinks run as one batch too.  When the queue is empty,
``tempfiles/`` and ``boxes/`` are emptied.

The ``retained`` table holds caps uploaded and not yet linked into the tree
(from ``retain_uri_from_box``) and caps retained with ``retain_ssk``; the
commit that links a file removes it from there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import msgpack
import trio

from . import queuelocal
from .dirnode import Entry
from .errors import GridError, UsageError
from .fileutil import atomic_output, fsync_dir
from .localspace import tolerate_disk_errors
from .queuejournal import (  # noqa: F401 - the queue's API
    CLEANUP,
    DATABASE,
    EDIT_SUFFIX,
    LOCAL,
    MOUNT_LOCK,
    PATH,
    PENDING,
    RETAIN,
    SCHEMA,
    SECTIONS,
    UNLINK,
    UPLOAD,
    QueuedEdit,
    Step,
    _checkpoint,
    backlog,
    is_local,
    is_placeholder,
    local_box,
    queue_directories,
    queue_directory,
    retained_caps,
)
from .tree import Change, Delete, Move, Put, Tree

log = logging.getLogger(__name__)


class QueueError(GridError):
    """A step of the work queue failed; it stays queued and is retried later."""


class Executor(Protocol):
    """What running the queue needs from the grid."""

    tree: Tree

    async def upload(self, path: Path) -> str: ...

    async def upload_edit(
        self, source: Path, base_cap: str, extents: list[tuple[int, int]], size: int
    ) -> str:
        """Store the version of ``base_cap`` that a queued edit makes (see
        gridfs.client.chunked.put_edit); its cap."""

    async def dropped(self, old: str, new: str) -> set[str]:
        """Caps the root directory ``old`` references and ``new`` does not."""

    async def unlink(self, caps: list[str]) -> None:
        """Give up this node's leases on ``caps``, except on what is still referenced."""

    def writing(self) -> AbstractAsyncContextManager[None]:
        """Held while uploads and commits run (see gridfs.client.keeper)."""


class WorkQueue:
    """One root's queue in ``directory`` (queue.sqlite, tempfiles/, boxes/)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.tempfiles = self.directory / "tempfiles"
        self.boxes = self.directory / "boxes"
        for d in (self.directory, self.tempfiles, self.boxes):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = sqlite3.connect(self.directory / DATABASE, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._lock = trio.Lock()
        self._running: set[int] = set()
        """Upload steps under way: their arguments no longer change."""
        self.unsynced = False
        """Steps were committed with ``sync=False`` since the last fsync of the journal."""

    def close(self) -> None:
        self.db.close()

    @property
    def mount_lock(self) -> Path:
        """The file a daemon mounting this queue's tree holds locked."""
        return self.directory / MOUNT_LOCK

    # -- staging and placeholders (for the mount) ------------------------------
    def fresh_staging(self) -> Path:
        """An empty ``staging/`` (see gridfs.queuelocal.fresh_staging)."""
        return queuelocal.fresh_staging(self)

    def adopt(self, path: Path) -> Path:
        """Move the finished (fsynced) file ``path``, on the queue's
        filesystem, among the queue's tempfiles, durably; its new path.
        An open descriptor of it keeps reading it."""
        target = self.tempfiles / Path(path).name
        os.rename(path, target)
        fsync_dir(self.tempfiles)
        return target

    def owns_tempfile(self, path: Path) -> bool:
        """``path`` is one of the queue's tempfiles (read once by its upload)."""
        return Path(path).parent == self.tempfiles

    def placeholder(self, box: str, tempfile: Path | str) -> str:
        """The ``local:`` cap a view shows for a file queued for upload into ``box``."""
        name = Path(tempfile).name if self.owns_tempfile(Path(tempfile)) else str(tempfile)
        return f"{LOCAL}{box}:{name}"

    def resolve_local(self, cap: str) -> Path | QueuedEdit | str:
        """Where the bytes of the ``local:`` placeholder ``cap`` are (see
        gridfs.queuelocal.resolve_local)."""
        return queuelocal.resolve_local(self, cap)

    def uploading(self, box: str) -> bool:
        """An upload into ``box`` is still queued."""
        return queuelocal.upload_of(self, box) is not None

    def add_edit(
        self, tempfile: Path, path: str, entry: Entry, edit: QueuedEdit, base: str | None = None
    ) -> str:
        """Queue an edit (see gridfs.queuelocal.add_edit); its box."""
        return queuelocal.add_edit(self, tempfile, path, entry, edit, base)

    def merge_edit(
        self,
        box: str,
        staged: Path,
        extents: list[tuple[int, int]],
        size: int,
        path: str,
        entry: Entry,
        base: str | None = None,
    ) -> Path | None:
        """Fold an edit into the queued one of ``box`` if its upload has not
        started (see gridfs.queuelocal.merge_edit); its tempfile, or None."""
        return queuelocal.merge_edit(self, box, staged, extents, size, path, entry, base)

    def create_tempfile(self, suffix: str = "") -> tuple[BinaryIO, str]:
        name = uuid.uuid4().hex + suffix
        return open(self.tempfiles / name, "xb"), name  # the caller closes it

    def tempfile_path(self, name: str) -> Path:
        return self.tempfiles / name

    def create_boxname(self, contents: bytes | None = None) -> str:
        name = uuid.uuid4().hex
        if contents is not None:
            self._fill_box(name, contents)
        return name

    def _fill_box(self, name: str, contents: bytes) -> None:
        with atomic_output(self.boxes / name, 0o600) as f:
            f.write(contents)

    def read_box(self, name: str) -> bytes | None:
        try:
            return (self.boxes / name).read_bytes()
        except FileNotFoundError:
            return None

    def _add(self, kind: str, **args: Any) -> int:
        cur = self.db.execute(
            "INSERT INTO steps (section, kind, args) VALUES (?, ?, ?)",
            (SECTIONS[kind], kind, msgpack.packb(args)),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def add_upload_chk(self, tempfile: str, box: str) -> int:
        return self._add("upload_chk", tempfile=tempfile, box=box)

    def add_addpath(
        self, box: str | None, path: str, entry: Entry, base: str | None = None, soft: bool = False
    ) -> int:
        """Put ``entry`` at ``path``; its cap comes from ``box`` when given
        (refused, before anything is journaled, for the root itself).
        ``soft``: see tree.Put (recorded only when set)."""
        if not _split(path):
            raise UsageError("cannot replace the root directory")
        args: dict[str, Any] = dict(box=box, path=path, entry=entry.to_wire(""), base=base)
        if soft:
            args["soft"] = True
        return self._add("addpath", **args)

    def add_deletepath(self, path: str, base: str | None = None, when_ns: int = 0) -> int:
        """Delete ``path``; ``when_ns`` (0: now) becomes its directory's mtime."""
        return self._add("deletepath", path=path, base=base, when=when_ns or time.time_ns())

    def add_move(self, src: str, dst: str, when_ns: int = 0) -> int:
        """Rename ``src`` to ``dst``; ``when_ns`` (0: now) becomes both directories' mtime."""
        return self._add("move", src=src, dst=dst, when=when_ns or time.time_ns())

    def add_retain_uri_from_box(self, box: str) -> int:
        return self._add("retain_uri_from_box", box=box)

    def add_retain_ssk(self, cap: str) -> int:
        return self._add("retain_ssk", cap=cap)

    def add_unlink_uri(self, uri: str) -> int:
        return self._add("unlink_uri", uri=uri)

    def add_unlink_ssk(self, cap: str) -> int:
        return self._add("unlink_ssk", cap=cap)

    def add_delete_tempfile(self, name: str) -> int:
        return self._add("delete_tempfile", name=name)

    def add_delete_box(self, name: str) -> int:
        return self._add("delete_box", name=name)

    def add_file(
        self,
        source: Path | None,
        path: str,
        entry: Entry,
        base: str | None = None,
        sync: bool = True,
        soft: bool = False,
    ) -> str | None:
        """The usual sequence for one file: upload it into a box, add the path,
        retain, and clean up, all in one transaction; returns the box.  With
        ``sync=False`` see :meth:`transaction`; ``soft`` (an entry that
        carries its cap): see tree.Put."""
        with self.transaction(sync):
            if source is None:  # the entry already carries its cap or its data
                self.add_addpath(None, path, entry, base, soft)
                return None
            box = self.create_boxname()
            self.add_upload_chk(str(source), box)
            self.add_addpath(box, path, entry, base)
            self.add_retain_uri_from_box(box)
            self.add_delete_box(box)
            if self.owns_tempfile(Path(source)):
                self.add_delete_tempfile(Path(source).name)
            return box

    @contextlib.contextmanager
    def transaction(self, sync: bool = True) -> Any:
        """One transaction.  With ``sync=False`` its commit is not fsynced:
        it survives the process being killed, but not a power loss until the
        next synced commit or :meth:`sync` (both fsync the journal, which
        holds it)."""
        if not sync:
            self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                # (also a COMMIT that failed, e.g. on a full disk: SQLite may
                # leave its transaction open, and every later BEGIN would fail)
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        finally:
            if not sync:
                self.db.execute("PRAGMA synchronous=FULL")
        self.unsynced = not sync

    def sync(self) -> None:
        """Make the steps committed with ``sync=False`` durable."""
        if not self.unsynced:
            return
        # Cleared first: a step committed during the fsync (the daemon runs
        # this in a thread) sets it again.
        self.unsynced = False
        # In WAL mode a commit is a frame appended to the -wal file; a synced
        # commit fsyncs that file, a checkpoint fsyncs the database first.
        try:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(self.directory / "queue.sqlite-wal", os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except BaseException:
            self.unsynced = True
            raise

    # -- reading ------------------------------------------------------------
    def pending(self, section: int | None = None) -> list[Step]:
        """The steps not yet run, in order (only those of ``section`` when
        given: the mount asks about uploads on every write, while a busy
        queue holds thousands of later steps)."""
        query = "SELECT id, kind, args, attempts, last_error FROM steps"
        params: tuple[int, ...] = ()
        if section is not None:
            query, params = query + " WHERE section = ?", (section,)
        rows = self.db.execute(query + " ORDER BY section, id", params).fetchall()
        return [Step(i, k, msgpack.unpackb(a, raw=False), n, e) for i, k, a, n, e in rows]

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM steps").fetchone()[0])

    def retained(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT cap FROM retained ORDER BY cap")]

    def pending_changes(self) -> list[Change]:
        """Path steps not yet applied, as tree changes (for read-your-writes).
        A file whose upload has not run yet gets the cap ``local:BOX:TEMPFILE``
        so a reader can find its bytes on the local disk meanwhile."""
        steps = self.pending()
        sources = {s.args["box"]: s.args["tempfile"] for s in steps if s.section == UPLOAD}
        out: list[Change] = []
        for s in steps:
            if s.section != PATH:
                continue
            change = self._change(s)
            if change is None and s.kind == "addpath":
                box = s.args["box"]
                _, entry = Entry.from_wire(s.args["entry"])
                local = self.placeholder(box, sources.get(box, ""))
                change = Put(_split(s.args["path"]), entry.with_(cap=local), s.args["base"])
            if change is not None and not _replaces_root(change):
                out.append(change)
        return out

    # -- running ------------------------------------------------------------
    async def flush(
        self,
        executor: Executor,
        concurrency: int = 8,
        progress: Callable[[Step], None] | None = None,
        through: int = CLEANUP,
    ) -> None:
        """Run every step to the end (or every step up to section ``through``:
        PATH is enough for the grid to hold every change).  A failing step
        stays queued (with its error recorded) and the first failure is
        raised as QueueError."""
        async with self._lock:
            while True:
                steps = self.pending()
                if not steps or steps[0].section > through:
                    if not steps:
                        self._empty_dirs()
                    return
                if steps[0].section > PATH:
                    await self._run_section(executor, steps, concurrency, progress)
                    continue
                # Uploads, retains and the commit: all under the writers' lock,
                # so an unlink's fence sees every cap stored here recorded.
                async with executor.writing():
                    while steps and steps[0].section <= min(PATH, through):
                        await self._run_section(executor, steps, concurrency, progress)
                        steps = self.pending()

    async def _run_section(
        self,
        executor: Executor,
        steps: list[Step],
        concurrency: int,
        progress: Callable[[Step], None] | None,
    ) -> None:
        section = steps[0].section
        batch = [s for s in steps if s.section == section]
        _checkpoint()
        if section == UPLOAD:
            ready = [
                s for s in batch if s.kind != "upload_edit" or queuelocal.base_ready(self, s, batch)
            ]
            if not ready:
                raise QueueError(f"{batch[0].describe()}: the version it edits was never uploaded")
            await self._run_uploads(executor, ready, concurrency, progress)
        elif section == PATH:
            await self._run_paths(executor, batch, progress)
        elif section == UNLINK:
            await self._run_unlinks(executor, batch, progress)
        else:
            for step in batch:
                await self._run_one(executor, step)
                if progress:
                    progress(step)

    async def _run_uploads(
        self,
        executor: Executor,
        steps: list[Step],
        concurrency: int,
        progress: Callable[[Step], None] | None,
    ) -> None:
        limiter = trio.Semaphore(concurrency)
        errors: list[str] = []

        async def one(step: Step) -> None:
            async with limiter:
                try:
                    await self._run_one(executor, step)
                except GridError as e:
                    errors.append(f"{step.describe()}: {e}")
                    return
            if progress:
                progress(step)

        async with trio.open_nursery() as nursery:
            for step in steps:
                nursery.start_soon(one, step)
        if errors:
            raise QueueError(
                errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
            )

    async def _run_one(self, executor: Executor, step: Step) -> None:
        a = step.args
        try:
            if step.section == UPLOAD:
                current = self._current(step)
                if current is None:
                    return
                step, a = current, current.args
                if self.read_box(a["box"]) is None:  # done already if the box is full
                    self._running.add(step.id)
                    try:
                        cap = await self._upload(executor, step)
                    finally:
                        self._running.discard(step.id)
                    _checkpoint()
                    # Retained before the box is filled: an unlink elsewhere
                    # in this node must see the cap from the moment it exists.
                    self.db.execute(
                        "INSERT OR IGNORE INTO retained VALUES (?, ?)", (cap, time.time_ns())
                    )
                    self._fill_box(a["box"], cap.encode())
            elif step.kind in ("retain_uri_from_box", "retain_ssk"):
                cap = (
                    a["cap"]
                    if step.kind == "retain_ssk"
                    else (self.read_box(a["box"]) or b"").decode()
                )
                if cap:
                    self.db.execute(
                        "INSERT OR IGNORE INTO retained VALUES (?, ?)", (cap, time.time_ns())
                    )
            elif step.kind == "delete_tempfile":
                with contextlib.suppress(FileNotFoundError):
                    (self.tempfiles / a["name"]).unlink()
            elif step.kind == "delete_box":
                with contextlib.suppress(FileNotFoundError):
                    (self.boxes / a["name"]).unlink()
            else:
                raise AssertionError(step.kind)
        except GridError as e:
            self._record_failure([step], str(e))
            raise
        _checkpoint()
        self._remove([step])
        _checkpoint()

    def _current(self, step: Step) -> Step | None:
        """``step`` as journaled now (an edit merged into it changed its
        arguments since it was read), or None if it is gone."""
        row = self.db.execute("SELECT args FROM steps WHERE id = ?", (step.id,)).fetchone()
        if row is None:
            return None
        return Step(step.id, step.kind, msgpack.unpackb(row[0], raw=False), step.attempts)

    async def _upload(self, executor: Executor, step: Step) -> str:
        if step.kind == "upload_chk":
            return await executor.upload(queuelocal.source_of(self, step))
        edit = queuelocal.edit_of(self, step)
        base = edit.base
        if base is None:
            filled = self.read_box(edit.base_box or "")
            if filled is None:
                raise QueueError("the version this edit changes was never uploaded")
            base = filled.decode()
        return await executor.upload_edit(edit.tempfile, base, edit.extents, edit.size)

    def _change(self, step: Step) -> Change | None:
        a = step.args
        if step.kind == "addpath":
            _, entry = Entry.from_wire(a["entry"])
            if a["box"] is not None:
                cap = self.read_box(a["box"])
                if cap is None:
                    return None  # its upload has not run yet
                entry = entry.with_(cap=cap.decode())
            return Put(_split(a["path"]), entry, a["base"], a.get("soft", False))
        if step.kind == "deletepath":
            return Delete(_split(a["path"]), a["base"], a.get("when", 0))
        if step.kind == "move":
            return Move(_split(a["src"]), _split(a["dst"]), a.get("when", 0))
        raise AssertionError(step.kind)

    async def _run_paths(
        self, executor: Executor, steps: list[Step], progress: Callable[[Step], None] | None
    ) -> None:
        changes = [self._change(s) for s in steps]
        if stale := [s for s, c in zip(steps, changes, strict=True) if _replaces_root(c)]:
            log.warning("dropping %d queued change(s) of the root's own entry", len(stale))
            self._remove(stale)
            kept = [(s, c) for s, c in zip(steps, changes, strict=True) if not _replaces_root(c)]
            steps, changes = [s for s, _ in kept], [c for _, c in kept]
            if not steps:
                return
        if any(c is None for c in changes):
            raise QueueError("a path step refers to a box that was never filled")
        try:
            _, new, old = await executor.tree.commit_from([c for c in changes if c is not None])
        except GridError as e:
            self._record_failure(steps, str(e))
            raise
        _checkpoint()
        put = sorted({c.entry.cap for c in changes if isinstance(c, Put) and c.entry.cap})
        with self.transaction():
            self.db.executemany("DELETE FROM steps WHERE id = ?", [(s.id,) for s in steps])
            self.db.executemany("DELETE FROM retained WHERE cap = ?", [(c,) for c in put])
            if old != new or put:
                self._add("unlink_commit", old=old, new=new, caps=put)
        _checkpoint()
        if progress:
            for s in steps:
                progress(s)

    async def _run_unlinks(
        self, executor: Executor, steps: list[Step], progress: Callable[[Step], None] | None
    ) -> None:
        try:
            # First turn each commit's (old, new) pair into the caps it dropped,
            # durably: once leases are given up, the old directories may be gone.
            for i, s in enumerate(steps):
                if s.kind == "unlink_commit" and s.args["old"] != s.args["new"]:
                    dropped = await executor.dropped(s.args["old"], s.args["new"])
                    args = {**s.args, "old": s.args["new"]}
                    args["caps"] = sorted(set(s.args["caps"]) | dropped)
                    self.db.execute(
                        "UPDATE steps SET args = ? WHERE id = ?", (msgpack.packb(args), s.id)
                    )
                    steps[i] = Step(s.id, s.kind, args, s.attempts, s.last_error)
                    _checkpoint()
            caps: list[str] = []
            for s in steps:
                if s.kind == "unlink_commit":
                    caps += s.args["caps"]
                else:
                    cap = s.args["uri"] if s.kind == "unlink_uri" else s.args["cap"]
                    # It stops being retained first: the walk must not find it there.
                    self.db.execute("DELETE FROM retained WHERE cap = ?", (cap,))
                    caps.append(cap)
            await executor.unlink(caps)
        except GridError as e:
            self._record_failure(steps, str(e))
            raise
        _checkpoint()
        self._remove(steps)
        _checkpoint()
        if progress:
            for s in steps:
                progress(s)

    def _remove(self, steps: list[Step]) -> None:
        with self.transaction():
            self.db.executemany("DELETE FROM steps WHERE id = ?", [(s.id,) for s in steps])

    def _record_failure(self, steps: list[Step], error: str) -> None:
        with tolerate_disk_errors("a failed step"):  # (the failure itself is raised on)
            self.db.executemany(
                "UPDATE steps SET attempts = attempts + 1, last_error = ? WHERE id = ?",
                [(error[:500], s.id) for s in steps],
            )

    def _empty_dirs(self) -> None:
        """The seed: with the queue empty, no tempfile or box can be referenced."""
        for d in (self.tempfiles, self.boxes):
            for p in d.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            fsync_dir(d)


def _replaces_root(change: Change | None) -> bool:
    """A put of the root itself, which mounts before add_addpath refused it
    queued for chmod, utimens or xattrs of the mountpoint: it can never apply
    (the root has no entry) and would hold up the queue for good, so it is
    dropped."""
    return isinstance(change, Put) and not change.path


def _split(path: str) -> tuple[str, ...]:
    from .dirnode import split_path

    return tuple(split_path(path))
