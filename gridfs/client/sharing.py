"""Making a directory of a tree shared: a live cap of its own (``gridfs share``).

A directory becomes shared by getting a slot of its own (holding its current
version, as a tree root does) and its parent's entry the link to it
(:mod:`gridfs.shares`).  Both happen in one commit built on a root version
read: the parent's publish is a test-and-set on that version, so a change
another writer made to the directory meanwhile is never lost; the commit is
then built again on the new root, and the slot made first takes the
directory's newer version before it is linked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..dirnode import join_path
from ..errors import UsageError, plain_grid_errors
from ..mutable import SlotReadCap, SlotWriteCap
from ..shares import open_write_cap, share_extra, slot_of
from ..tree import (
    MAX_RETRIES,
    Batch,
    NotFoundError,
    SlotConflictError,
    Tree,
    pack_root,
    unpack_root,
)
from .grid import GridClient
from .slots import create_slot

Path = tuple[str, ...]


def slot_maker(grid: GridClient) -> Callable[[bytes], Awaitable[SlotWriteCap]]:
    """Makes a new slot holding a payload, on ``grid``."""

    async def make(payload: bytes) -> SlotWriteCap:
        p = grid.params
        return await create_slot(grid.broker, payload, p.n, p.happy, seen=grid.seen)

    return make


async def share_directory(
    tree: Tree, path: Path, new_slot: Callable[[bytes], Awaitable[SlotWriteCap]]
) -> SlotWriteCap | SlotReadCap:
    """The live cap of the directory at ``path`` (not the root): its write
    cap for whoever can write where it is stored, else its read cap.  A
    directory not shared yet is made shared first, in a slot ``new_slot``
    makes (which needs the write cap of the slot its parent is stored in)."""
    made: SlotWriteCap | None = None
    with plain_grid_errors():
        for _ in range(MAX_RETRIES):
            seq, root = await tree.root()
            batch = Batch(tree, root)
            parent = await batch.dir(path[:-1], create=False)
            entry = None if parent is None else parent.get(path[-1])
            if entry is None:
                raise NotFoundError(f"{join_path(list(path))}: no such file or directory")
            if not entry.is_dir:
                raise UsageError(f"{join_path(list(path))}: not a directory")
            key = batch.write_key(path[:-1])
            slot = slot_of(entry)
            if slot is not None:
                return open_write_cap(entry, key) or slot
            if key is None:
                raise UsageError(
                    f"{join_path(list(path))}: not shared yet, and this tree is read-only here"
                    " (its owner can share it)"
                )
            if made is None:
                made = await new_slot(pack_root(entry.cap))
            else:  # built again on a newer root: the slot takes the directory as it is now
                slot_seq, payload = await tree.store.read_dir_slot(made.read_cap())
                if unpack_root(payload) != entry.cap:
                    await tree.store.publish_dir_slot(made, pack_root(entry.cap), slot_seq)
            batch.set(path[:-1], path[-1], entry.with_(extra=share_extra(made, key, entry.extra)))
            new_root = await batch.write()
            if new_root == root:  # the parent is itself in a shared directory's slot
                return made
            try:
                await tree.store.publish_root(pack_root(new_root), seq)
                return made
            except SlotConflictError:
                continue
    raise SlotConflictError(f"gave up after {MAX_RETRIES} conflicting updates of the root")
