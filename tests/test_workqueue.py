"""The work queue on its own: order, batching, idempotence, failure, cleanup.

Crash injection against a real grid lives in test_queue_crash.py."""

import contextlib
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from gridfs.caps import LiteralCap
from gridfs.dirnode import Entry
from gridfs.errors import GridError, UsageError
from gridfs.tree import Put, Tree
from gridfs.workqueue import (
    PATH,
    QueueError,
    WorkQueue,
    backlog,
    is_local,
    is_placeholder,
    local_box,
    queue_directories,
    retained_caps,
)

from .memstore import MemStore


class FakeExecutor:
    def __init__(self) -> None:
        self.store = MemStore()
        self.tree = Tree(self.store)
        self.uploads: list[Path] = []
        self.unlinked: list[str] = []
        self.diffs: list[tuple[str, str]] = []
        self.fail_uploads = False

    async def upload(self, path: Path) -> str:
        if self.fail_uploads:
            raise GridError("no servers")
        self.uploads.append(path)
        return await self.store.put_bytes(path.read_bytes() + b"." * 100)

    async def dropped(self, old: str, new: str) -> set[str]:
        self.diffs.append((old, new))
        return {old}

    async def unlink(self, caps: list[str]) -> None:
        self.unlinked += caps

    def writing(self) -> AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # type: ignore[return-value]


def entry(size: int = 0) -> Entry:
    return Entry("file", "", size, 0o644, 1, 1)


def add_tempfile(q: WorkQueue, data: bytes, path: str) -> None:
    f, name = q.create_tempfile()
    with f:
        f.write(data)
    q.add_file(q.tempfile_path(name), path, entry(len(data)))


async def test_steps_run_in_section_order_and_the_queue_empties(tmp_path: Path) -> None:
    q = WorkQueue(tmp_path / "q")
    ex = FakeExecutor()
    add_tempfile(q, b"hello", "/docs/a.txt")
    q.add_unlink_uri("gridfs:lit:aa")
    add_tempfile(q, b"world", "/docs/b.txt")
    kinds = [s.kind for s in q.pending()]
    assert kinds[:2] == ["upload_chk", "upload_chk"]
    assert kinds.index("addpath") < kinds.index("unlink_uri") < kinds.index("delete_box")
    await q.flush(ex)
    assert len(q) == 0
    assert list(await ex.tree.listdir(("docs",))) == ["a.txt", "b.txt"]
    assert ex.store.publishes == 1  # both paths in one batch
    assert list(q.tempfiles.iterdir()) == [] and list(q.boxes.iterdir()) == []
    # Linked files leave the retained table; the commit's unlink step names
    # the old and new roots and the files it linked (spared by the keeper's walk).
    assert q.retained() == []
    assert ex.unlinked[0] == "gridfs:lit:aa"
    assert len(ex.diffs) == 1
    linked = {e.cap for e in (await ex.tree.listdir(("docs",))).entries.values()}
    assert set(ex.unlinked[1:]) == linked | {ex.diffs[0][0]}


async def test_a_thousand_files_publish_the_root_once(tmp_path: Path) -> None:
    q = WorkQueue(tmp_path / "q")
    ex = FakeExecutor()
    for i in range(1000):
        q.add_file(None, f"/tree/d{i % 7}/f{i}", entry().with_(cap=LiteralCap(b"x").to_string()))
    await q.flush(ex)
    assert ex.store.publishes == 1
    assert len(await ex.tree.listdir(("tree", "d0"))) == 143


async def test_failed_upload_stays_queued_with_its_error(tmp_path: Path) -> None:
    q = WorkQueue(tmp_path / "q")
    ex = FakeExecutor()
    add_tempfile(q, b"data", "/f")
    ex.fail_uploads = True
    with pytest.raises(QueueError, match="no servers"):
        await q.flush(ex)
    step = q.pending()[0]
    assert step.kind == "upload_chk" and step.attempts == 1 and "no servers" in step.describe()
    assert any(q.tempfiles.iterdir())  # the data is still here
    ex.fail_uploads = False
    await q.flush(ex)
    assert len(q) == 0 and (await ex.tree.lookup(("f",))).size == 4


async def test_queue_survives_reopen(tmp_path: Path) -> None:
    q = WorkQueue(tmp_path / "q")
    add_tempfile(q, b"persist me", "/p")
    q.close()
    q2 = WorkQueue(tmp_path / "q")
    assert next(s.kind for s in q2.pending()) == "upload_chk"
    ex = FakeExecutor()
    await q2.flush(ex)
    assert (await ex.tree.lookup(("p",))).size == 10


async def test_upload_with_a_full_box_is_not_repeated(tmp_path: Path) -> None:
    """A crash after the upload filled the box but before the step was removed."""
    q = WorkQueue(tmp_path / "q")
    ex = FakeExecutor()
    f, name = q.create_tempfile()
    with f:
        f.write(b"once")
    box = q.create_boxname(b"gridfs:lit:aa")
    q.add_upload_chk(name, box)
    q.add_addpath(box, "/once", entry(4))
    await q.flush(ex)
    assert ex.uploads == []
    assert (await ex.tree.lookup(("once",))).cap == "gridfs:lit:aa"


async def test_pending_changes_show_queued_paths(tmp_path: Path) -> None:
    q = WorkQueue(tmp_path / "q")
    q.add_file(None, "/x", entry().with_(cap="gridfs:lit:aa"))
    q.add_deletepath("/y")
    q.add_move("/a", "/b")
    changes = q.pending_changes()
    assert [type(c).__name__ for c in changes] == ["Put", "Delete", "Move"]


def test_unsynced_commit_survives_a_killed_process_and_sync_restores_full(
    tmp_path: Path,
) -> None:
    """A step committed with sync=False (the mount's file creation) is not
    fsynced, but is in the journal for the next open even if the process dies
    at once; the next synced commit or sync() covers it."""
    import os
    import signal

    pid = os.fork()
    if pid == 0:  # the child: commit without fsync, then die without closing
        try:
            q = WorkQueue(tmp_path / "q")
            q.add_file(None, "/new", entry(), sync=False)
            assert q.unsynced
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    q = WorkQueue(tmp_path / "q")
    assert [s.args["path"] for s in q.pending()] == ["/new"]
    assert q.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    q.add_file(None, "/a", entry(), sync=False)
    assert q.unsynced
    assert q.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # back to FULL
    q.sync()
    assert not q.unsynced
    q.add_file(None, "/b", entry(), sync=False)
    q.add_file(None, "/c", entry())  # a synced commit fsyncs the journal with /b in it
    assert not q.unsynced
    assert [s.args["path"] for s in q.pending()] == ["/new", "/a", "/b", "/c"]


async def test_a_change_of_the_root_entry_is_refused_and_an_old_one_dropped(
    tmp_path: Path,
) -> None:
    """The root has no entry: an addpath of "/" is refused before anything is
    journaled, and one an older mount queued (chmod of its mountpoint) is
    dropped instead of failing the queue, and the mount, for good."""
    q = WorkQueue(tmp_path / "q")
    ex = FakeExecutor()
    dir_entry = Entry("dir", "", 0, 0o700, 1, 1)
    with pytest.raises(UsageError, match="cannot replace the root"):
        q.add_file(None, "/", dir_entry)
    assert len(q) == 0
    q._add("addpath", box=None, path="/", entry=dir_entry.to_wire(""), base=None)  # (as before)
    q.add_file(None, "/after", entry().with_(cap=LiteralCap(b"x").to_string()))
    assert [type(c).__name__ for c in q.pending_changes()] == ["Put"]  # the view skips it
    await q.flush(ex)
    assert len(q) == 0
    assert list(await ex.tree.listdir(())) == ["after"]


async def test_placeholders_resolve_to_the_tempfile_then_to_the_uploaded_cap(
    tmp_path: Path,
) -> None:
    """What the mount and the keeper ask of a queue, through its API only."""
    q = WorkQueue(tmp_path / "q")
    staged = q.fresh_staging() / "v1"
    staged.write_bytes(b"version one")
    tempfile = q.adopt(staged)
    assert q.owns_tempfile(tempfile) and not staged.exists()
    box = q.add_file(tempfile, "/f", entry(11))
    assert box is not None and q.uploading(box)
    cap = q.placeholder(box, tempfile)
    assert is_local(cap) and is_placeholder(cap) and local_box(cap) == box
    assert q.resolve_local(cap) == tempfile
    [change] = q.pending_changes()
    assert isinstance(change, Put) and change.entry.cap == cap  # as the view shows it
    assert backlog(q.directory) == (len(q), 0)
    ex = FakeExecutor()
    await q.flush(ex, through=PATH)
    assert q.resolve_local(cap) == tempfile  # (the cleanup section has not run)
    tempfile.unlink()
    uploaded = q.resolve_local(cap)
    assert isinstance(uploaded, str) and not is_placeholder(uploaded)
    assert not q.uploading(box)
    assert queue_directories(tmp_path) == [] and backlog(tmp_path / "none") is None
    assert retained_caps(q.directory) == set()  # linked by the commit
    await q.flush(ex)
    with pytest.raises(GridError, match="gone"):
        q.resolve_local(cap)
