"""Shared directories, the pure part: how a parent's entry links a directory
that lives in its own mutable slot (no I/O).

Sharing a directory gives it a slot of its own, whose payload is a tree root
(:func:`gridfs.tree.pack_root`): its cap can be aliased and mounted like any
tree's.  The directory stays in its tree: the parent's entry keeps kind
``"dir"`` and gains two extra properties (docs/formats.md §13.2):

* ``slot``: the slot's read cap (str), which every reader of the parent gets;
* ``slotw``: the slot's 32-byte write seed XOR a pad that only holders of the
  *enclosing* slot's write cap can derive: ``H(shared-dir-write-pad,
  enclosing write key, child storage index)``.  A read-only holder of the
  parent therefore learns read caps only (transitive attenuation), and a
  writer of the parent can write every shared directory beneath it.

The entry's ``cap`` is a hint: the directory's version when the parent was
last written.  Live readers follow ``slot``; the hint is what a snapshot of
the parent shows when no version of the child slot is known for its time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .changes import Put
from .dirnode import Entry
from .errors import CapError, FormatError, UsageError
from .hashes import TAG_SHARE_WRITE_PAD, tagged_hash
from .mutable import SEED_SIZE, SlotReadCap, SlotWriteCap, parse_slot_cap

SLOT = "slot"
"""Extra property: the read cap of a shared directory's own slot."""
SLOT_WRITE = "slotw"
"""Extra property: its write seed, sealed under the enclosing slot's write key."""


class ReadOnlyShareError(UsageError):
    """A change inside a shared directory whose write cap this writer lacks."""


@dataclass(frozen=True)
class SharedDir:
    """A shared directory a tree batch loaded: its slot, the version read,
    and (for a holder of the enclosing slot's write cap) its write cap."""

    read: SlotReadCap
    seq: int
    write: SlotWriteCap | None


def write_pad(enclosing_write_key: bytes, child_storage_index: bytes) -> bytes:
    """The 32-byte pad that seals a child slot's seed in its parent's entry:
    one pad per (enclosing slot, child slot), each sealing one fixed value."""
    return tagged_hash(TAG_SHARE_WRITE_PAD, enclosing_write_key, child_storage_index)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def share_extra(
    child: SlotWriteCap, enclosing_write_key: bytes, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The extra properties of an entry linking the shared directory ``child``
    (``extra``: the entry's other properties, kept)."""
    out = dict(extra or {})
    out[SLOT] = child.read_cap().to_string()
    out[SLOT_WRITE] = _xor(child.seed, write_pad(enclosing_write_key, child.storage_index))
    return out


def slot_of(entry: Entry) -> SlotReadCap | None:
    """The read cap of the slot a directory entry links, or None (an ordinary
    directory).  A malformed ``slot`` is a :class:`FormatError`: its writer
    is broken or hostile, and the directory cannot be read."""
    if not entry.is_dir or SLOT not in entry.extra:
        return None
    text = entry.extra[SLOT]
    try:
        cap = parse_slot_cap(text) if isinstance(text, str) else None
    except CapError:
        cap = None
    if not isinstance(cap, SlotReadCap):
        raise FormatError("a shared directory's entry has a bad slot cap")
    return cap


def open_write_cap(entry: Entry, enclosing_write_key: bytes | None) -> SlotWriteCap | None:
    """The write cap of the shared directory ``entry`` links, for a holder of
    the enclosing slot's write key; None without that key, or when the sealed
    seed does not open to the slot the entry names (sealed under another
    slot's key: an entry copied from elsewhere, or forged)."""
    read_cap = slot_of(entry)
    sealed = entry.extra.get(SLOT_WRITE)
    if read_cap is None or enclosing_write_key is None:
        return None
    if not isinstance(sealed, bytes) or len(sealed) != SEED_SIZE:
        return None
    cap = SlotWriteCap(_xor(sealed, write_pad(enclosing_write_key, read_cap.storage_index)))
    if cap.read_cap() != read_cap:
        return None
    return cap


def reseal(entry: Entry, child: SlotWriteCap, enclosing_write_key: bytes) -> Entry:
    """``entry`` with the child's seed sealed under another enclosing key (a
    shared directory moved into another slot's directories)."""
    return entry.with_(extra=share_extra(child, enclosing_write_key, entry.extra))


def link_of(current: Entry, extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` with the link (``slot``, ``slotw``) ``current`` has, or
    none if it has none: a change of a directory's attributes, made on a
    view that may predate its sharing or a reseal, never changes its link."""
    out = {k: v for k, v in extra.items() if k not in (SLOT, SLOT_WRITE)}
    out.update({k: v for k, v in current.extra.items() if k in (SLOT, SLOT_WRITE)})
    return out


def unshared(entry: Entry) -> Entry:
    """``entry`` as an ordinary directory (its hint cap), without the link."""
    extra = {k: v for k, v in entry.extra.items() if k not in (SLOT, SLOT_WRITE)}
    return entry.with_(extra=extra)


def keep_link(change: Put, current: Entry) -> Put:
    """A put of a shared directory's entry as a writer saw it (same slot, or
    no link and the hint it was linked with: a chmod queued before the
    share) changes its attributes only: its link and newest hint stay."""
    shared, given = slot_of(current), slot_of(change.entry)
    if shared is None or given not in (shared, None):
        return change
    if given is None and change.entry.cap != current.cap:
        return change
    extra = link_of(current, change.entry.extra)
    kept = change.entry.with_(cap=current.cap, size=current.size, extra=extra)
    return Put(change.path, kept, change.base)
