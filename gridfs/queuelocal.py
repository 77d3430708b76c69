"""The work queue's local files for the mount: staging, queued edits, and
where the bytes of a ``local:`` placeholder are (part of gridfs.workqueue's
API: its methods of these names call these)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

from .dirnode import Entry
from .errors import GridError
from .extents import clip, subtract, union
from .queuejournal import EDIT_SUFFIX, UPLOAD, QueuedEdit, Step, _checkpoint
from .sparse import copy_ranges

if TYPE_CHECKING:
    from .workqueue import WorkQueue


def fresh_staging(q: WorkQueue) -> Path:
    """An empty directory for files being written and not yet handed
    over: whatever a previous daemon left there was never acknowledged."""
    staging = q.directory / "staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    return staging


def resolve_local(q: WorkQueue, cap: str) -> Path | QueuedEdit | str:
    """Where the bytes of the ``local:`` placeholder ``cap`` are: a
    whole file's tempfile while that is there, a queued edit while its
    upload is queued, else the cap its upload filled in."""
    _, box, tempfile = cap.split(":", 2)
    path = Path(tempfile) if tempfile.startswith("/") else q.tempfiles / tempfile
    if tempfile and not tempfile.endswith(EDIT_SUFFIX) and path.exists():
        return path
    step = upload_of(q, box)
    if step is not None and step.kind == "upload_edit":
        return edit_of(q, step)
    if step is not None:
        return source_of(q, step)
    filled = q.read_box(box)
    if filled is None:
        raise GridError(f"the queued upload of {cap} is gone")
    return filled.decode()


def upload_of(q: WorkQueue, box: str) -> Step | None:
    for step in q.pending(UPLOAD):
        if step.args["box"] == box:
            return step
    return None


def source_of(q: WorkQueue, step: Step) -> Path:
    source = Path(step.args["tempfile"])
    return source if source.is_absolute() else q.tempfiles / source


def edit_of(q: WorkQueue, step: Step) -> QueuedEdit:
    a = step.args
    extents = [(int(o), int(n)) for o, n in a["extents"]]
    return QueuedEdit(source_of(q, step), extents, a["size"], a["base"], a["base_box"])


def add_edit(
    q: WorkQueue,
    tempfile: Path,
    path: str,
    entry: Entry,
    edit: QueuedEdit,
    tree_base: str | None = None,
) -> str:
    """Like :meth:`add_file`, for an edit (its tempfile ``tempfile``,
    one of the queue's, ends in EDIT_SUFFIX): upload the new version
    it makes of its base into a new box, add the path, retain, clean up;
    returns the box."""
    with q.transaction():
        box = q.create_boxname()
        q._add(
            "upload_edit",
            tempfile=str(tempfile),
            box=box,
            extents=[list(e) for e in edit.extents],
            size=edit.size,
            base=edit.base,
            base_box=edit.base_box,
        )
        q.add_addpath(box, path, entry, tree_base)
        q.add_retain_uri_from_box(box)
        q.add_delete_box(box)
        q.add_delete_tempfile(tempfile.name)
        return box


def merge_edit(
    q: WorkQueue,
    box: str,
    staged: Path,
    extents: list[tuple[int, int]],
    size: int,
    path: str,
    entry: Entry,
    tree_base: str | None = None,
) -> Path | None:
    """Fold a newer edit of the version queued into ``box`` (``extents``
    of the sparse file ``staged``, relative to that version) into it, if
    its upload has not started: one upload, of both edits' ranges, from
    one tempfile; the older tempfile goes at once.  The new tempfile (or
    None: not merged, queue it with :meth:`add_edit`).  Durable."""
    step = upload_of(q, box)
    if step is None or step.kind != "upload_edit" or step.id in q._running:
        return None
    old = edit_of(q, step)
    kept = clip(old.extents, size)
    # Past the older version's end the newer one is its zeros, not the
    # base's bytes: a range of the tempfile (a hole there, or written).
    grown = [(old.size, size - old.size)] if size > old.size else []
    merged = union(union(kept, extents), grown)
    src = os.open(old.tempfile, os.O_RDONLY)
    try:
        dst = os.open(staged, os.O_RDWR)
        try:
            copy_ranges(src, dst, subtract(kept, extents))
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)
    tempfile = q.adopt(staged)
    args = {**step.args, "tempfile": str(tempfile), "extents": [list(e) for e in merged]}
    args["size"] = size
    with q.transaction():
        q.db.execute("UPDATE steps SET args = ? WHERE id = ?", (msgpack.packb(args), step.id))
        q.add_addpath(box, path, entry, tree_base)
        q.add_delete_tempfile(tempfile.name)
    _checkpoint()
    with contextlib.suppress(FileNotFoundError):
        old.tempfile.unlink()
    return tempfile


# -- building steps (the seed's add_* methods) -------------------------


def base_ready(q: WorkQueue, step: Step, batch: list[Step]) -> bool:
    """The version an edit changes is uploaded (or it waits for a queued
    upload of it; an edit whose base box will never be filled is ready,
    to fail and say so)."""
    box = step.args.get("base_box")
    if box is None or q.read_box(box) is not None:
        return True
    return not any(s.args["box"] == box for s in batch if s.id != step.id)
