"""What a directory tree references: every cap beneath a directory, and what
one version of a tree references that the next one does not.

Leases are renewed on the first (everything reachable) and given up on the
second (what a commit dropped), after checking that nothing else the node
keeps still references it.  Directories are immutable files, so an unchanged
subtree has the same cap in both versions and the difference walk never
enters it: its cost follows the size of the change, not of the tree.
Both name stored objects: a file kept in a pack is named by the pack's cap.
A shared directory's entry references its slot only (its read cap; the cap
the entry holds is a hint, never read live): the keeper walks that slot's
versions as it walks a tree's.
"""

from __future__ import annotations

import trio

from .caps import ChunkedCap, ChunkedVerifyCap, LiteralCap, ReadCap, SliceCap, VerifyCap, stored_cap
from .caps import parse as parse_cap
from .dirnode import Entry
from .errors import CapError, FormatError
from .mutable import parse_slot_cap
from .shares import slot_of
from .tree import Tree

WALK_CONCURRENCY = 8


def storage_index_of(cap: str) -> bytes | None:
    """The storage index a cap names on the servers, or None (a literal or
    local cap, or no cap at all: nothing is stored for it)."""
    if not cap.startswith("gridfs:") or cap.startswith("gridfs:lit:"):
        return None
    try:
        parsed = parse_cap(cap)
    except CapError:
        try:
            return parse_slot_cap(cap).storage_index
        except CapError:
            return None
    if isinstance(parsed, ReadCap | VerifyCap | SliceCap | ChunkedCap | ChunkedVerifyCap):
        return parsed.storage_index
    assert isinstance(parsed, LiteralCap)
    return None


async def subtree_caps(tree: Tree, dir_cap: str, found: set[str] | None = None) -> set[str]:
    """``dir_cap`` and every cap beneath it (directories fetched a few at a
    time), added to ``found`` and returned: a directory already in
    ``found`` is not walked again (walks of many versions of one tree share
    most of their directories)."""
    if found is None:
        found = set()
    elif dir_cap in found:
        return found
    limiter = trio.Semaphore(WALK_CONCURRENCY)

    async def visit(cap: str, nursery: trio.Nursery) -> None:
        async with limiter:
            d = await tree.load_dir(cap)
        for entry in d.entries.values():
            if (slot := _shared_slot(entry)) is not None:
                found.add(slot)  # walked as a tree of its own (Keeper.reachable);
                continue  # its entry's cap is a hint, never read live
            if not entry.cap or (stored := stored_cap(entry.cap)) in found:
                continue
            found.add(stored)
            if entry.is_dir:
                nursery.start_soon(visit, entry.cap, nursery)

    found.add(dir_cap)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(visit, dir_cap, nursery)
    return found


def _shared_slot(entry: Entry) -> str | None:
    """The read cap of the slot a shared directory's entry links, if any
    (a malformed one is nothing: it cannot be read, so nothing is kept)."""
    try:
        slot = slot_of(entry)
    except FormatError:
        return None
    return None if slot is None else slot.to_string()


async def dropped_caps(tree: Tree, old: str, new: str) -> set[str]:
    """Caps the directory ``old`` references (itself included) that ``new``
    does not reference at the same place.  A cap dropped here may still be
    referenced elsewhere; callers check that before giving anything up."""
    if old == new:
        return set()
    out = {old}
    before, after = await tree.load_dir(old), await tree.load_dir(new)
    for name, entry in before.entries.items():
        now = after.get(name)
        old_slot = _shared_slot(entry)
        new_slot = None if now is None else _shared_slot(now)
        if old_slot is not None:  # it referenced its slot only
            if old_slot != new_slot:
                out.add(old_slot)
            continue
        if not entry.cap or (now is not None and now.cap == entry.cap and new_slot is None):
            continue
        if not entry.is_dir:
            out.add(stored_cap(entry.cap))
        elif now is not None and now.is_dir and now.cap and new_slot is None:
            out |= await dropped_caps(tree, entry.cap, now.cap)
        else:
            out |= await subtree_caps(tree, entry.cap)
    return out
