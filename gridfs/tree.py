"""A directory tree of immutable directories chained up to a mutable root.

The seed's ``add_modify_subtree``: changing ``/a/b/f`` makes a new ``/a/b``, a
new ``/a`` and a new root, then publishes the root's cap in the root slot.
:meth:`Tree.commit` does this for a whole batch of changes at once: every
directory touched is loaded once, changed in memory, and written once; the
slot is published once, with test-and-set on the version the batch was built
on.  When another writer got there first the batch is re-applied to the new
root: changes are idempotent, and a true conflict on one name keeps both
(the rule is in :func:`conflict_name`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import msgpack
import trio

from .caps import LITERAL_MAX, LiteralCap, ReadCap
from .caps import parse as parse_cap
from .changes import Change, Delete, Move, Put, normal_path
from .dirnode import (
    DEFAULT_DIR_MODE,
    DIR_INLINE_BUDGET,
    EMPTY,
    MAX_NAME_BYTES,
    Directory,
    Entry,
    check_name,
    join_path,
)
from .errors import FormatError, GridError, UsageError, plain_grid_errors
from .links import SUBDIRS, kept_count, subdirs
from .mutable import SlotReadCap, SlotWriteCap
from .pack import build_pack, group_for_packs, pack_digest
from .shares import (
    ReadOnlyShareError,
    SharedDir,
    keep_link,
    link_of,
    open_write_cap,
    reseal,
    slot_of,
)

MAX_RETRIES = 20


class SlotConflictError(GridError):
    """The slot moved on since the version a change was based on."""


class NotFoundError(GridError):
    """No such file or directory in the tree."""

    exit_code = 1


class NotADirectoryError_(UsageError):
    """A path component is not a directory."""


class Store(Protocol):
    """What a tree needs from the grid (or from a fake in tests)."""

    async def put_bytes(self, data: bytes) -> str: ...

    async def get_bytes(self, cap: str) -> bytes: ...

    async def read_root(self) -> tuple[int, bytes]:
        """(seq, payload) of the root slot.  seq 0 and b"" (an empty tree) only
        from a store whose root may not exist yet (an in-memory one); the grid's
        root always exists, and a store that cannot find it raises instead."""

    async def publish_root(self, payload: bytes, expected_seq: int) -> int:
        """Publish if the slot is still at ``expected_seq``; raise SlotConflictError if not."""

    @property
    def root_write_key(self) -> bytes | None:
        """The root slot's write key (None: read-only): it opens the write
        caps of the shared directories the root slot's directories link."""

    async def read_dir_slot(self, cap: SlotReadCap) -> tuple[int, bytes]:
        """(seq, payload) of a shared directory's slot (:mod:`gridfs.shares`),
        never older than a version seen before."""

    async def publish_dir_slot(self, cap: SlotWriteCap, payload: bytes, expected_seq: int) -> int:
        """:meth:`publish_root` for a shared directory's slot."""


Path = tuple[str, ...]


def pack_root(cap: str) -> bytes:
    return msgpack.packb({"root": cap, "version": 1})


def unpack_root(payload: bytes) -> str:
    try:
        d = msgpack.unpackb(payload, raw=False)
        if d["version"] != 1 or not isinstance(d["root"], str):
            raise ValueError
        return str(d["root"])
    except Exception:
        raise FormatError("root slot does not hold a gridfs tree") from None


CONFLICT_ROOM = 8
"""bytes a conflict name leaves for Batch._keep_aside's -2, -3, ..."""


def conflict_name(name: str, when_ns: int) -> str:
    """The name under which the loser of a true conflict is kept: the last
    writer wins the name, the other version stays beside it.  A long name is
    cut (at a character) so that the result is still a valid name: a commit
    that made an invalid one would fail again at every retry."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(when_ns / 1e9))
    suffix = f".conflict-{stamp}"
    room = MAX_NAME_BYTES - len(suffix) - CONFLICT_ROOM
    stem = name.encode()[:room].decode(errors="ignore")
    return f"{stem}{suffix}"


def empty_dir_cap() -> str:
    return LiteralCap(EMPTY.pack()).to_string()


def new_dir_entry(now_ns: int | None = None) -> Entry:
    now = time.time_ns() if now_ns is None else now_ns
    return Entry("dir", empty_dir_cap(), 0, DEFAULT_DIR_MODE, now, now)


class DirCache:
    """Directories by cap: immutable, so cached until evicted (LRU)."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._items: OrderedDict[str, Directory] = OrderedDict()
        self.max_entries = max_entries

    def get(self, cap: str) -> Directory | None:
        d = self._items.get(cap)
        if d is not None:
            self._items.move_to_end(cap)
        return d

    def put(self, cap: str, d: Directory) -> None:
        self._items[cap] = d
        self._items.move_to_end(cap)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


class Tree:
    def __init__(self, store: Store, cache: DirCache | None = None) -> None:
        self.store = store
        self.cache = cache or DirCache()
        self.slots: dict[bytes, tuple[int, str]] = {}
        """(seq, directory cap) of the shared directories' slots read since
        the root was last read: each is read once per root read."""
        self.version_at: Callable[[SlotReadCap, int], str | None] | None = None
        """The directory cap a shared directory's slot held at a time, as
        far as the node knows (its snapshot log): lookups in a snapshot."""

    async def shared_root(self, cap: SlotReadCap) -> tuple[int, str]:
        """(seq, directory cap) of the newest version of a shared directory's slot."""
        hit = self.slots.get(cap.storage_index)
        if hit is None:
            seq, payload = await self.store.read_dir_slot(cap)
            hit = self.slots[cap.storage_index] = (seq, unpack_root(payload))
        return hit

    async def resolve(self, entry: Entry, at_ns: int | None = None) -> Entry:
        """``entry`` with the live cap of the directory it names (a shared
        directory's entry holds a hint: its slot holds the current version);
        with ``at_ns``, the version its slot held then if the node knows it,
        else the hint."""
        slot = slot_of(entry)
        if slot is None:
            return entry
        if at_ns is not None:
            cap = None if self.version_at is None else self.version_at(slot, at_ns)
            return entry if cap is None else entry.with_(cap=cap)
        return entry.with_(cap=(await self.shared_root(slot))[1])

    async def load_dir(self, cap: str) -> Directory:
        d = self.cache.get(cap)
        if d is None:
            d = Directory.unpack(await self.store.get_bytes(cap))
            self.cache.put(cap, d)
        return d

    async def root(self) -> tuple[int, str]:
        seq, payload = await self.store.read_root()
        self.slots.clear()
        if seq == 0:
            return 0, empty_dir_cap()
        return seq, unpack_root(payload)

    async def lookup(
        self, path: Path, root_cap: str | None = None, *, at_ns: int | None = None
    ) -> Entry:
        """The entry at ``path`` (the root itself for ``()``).  Shared
        directories are followed to their slots' newest versions, or with
        ``at_ns`` (a lookup in a snapshot) to their versions at that time."""
        path = normal_path(path)
        if root_cap is None:
            root_cap = (await self.root())[1]
        entry = Entry("dir", root_cap, 0, DEFAULT_DIR_MODE)
        for i, name in enumerate(path):
            if not entry.is_dir:
                raise NotADirectoryError_(f"{join_path(list(path[:i]))} is not a directory")
            child = (await self.load_dir(entry.cap)).get(name)
            if child is None:
                raise NotFoundError(f"{join_path(list(path[: i + 1]))}: no such file or directory")
            entry = await self.resolve(child, at_ns)
        return entry

    async def listdir(
        self, path: Path, root_cap: str | None = None, *, at_ns: int | None = None
    ) -> Directory:
        entry = await self.lookup(path, root_cap, at_ns=at_ns)
        if not entry.is_dir:
            raise NotADirectoryError_(f"{join_path(list(path))} is not a directory")
        return await self.load_dir(entry.cap)

    async def commit(self, changes: Sequence[Change]) -> tuple[int, str]:
        """Apply ``changes`` and publish the new root once; retry on conflict.
        Returns (seq, root cap); publishes nothing if nothing changed."""
        seq, root_cap, _ = await self.commit_from(changes)
        return seq, root_cap

    async def commit_from(self, changes: Sequence[Change]) -> tuple[int, str, str]:
        """:meth:`commit`, also returning the root cap the changes replaced
        (what the new root no longer references can then be unlinked)."""
        # The packs stored by this commit, by a digest of their files: a retry
        # after a conflict reuses them (file keys are random, so building them
        # again would leave orphans).  Never kept beyond this commit: a later
        # one may find them unlinked.
        packs: dict[bytes, list[str]] = {}
        with plain_grid_errors():
            for _ in range(MAX_RETRIES):
                seq, root_cap = await self.root()
                new_cap = await self.apply(root_cap, changes, packs)
                if new_cap == root_cap:
                    return seq, root_cap, root_cap
                try:
                    seq = await self.store.publish_root(pack_root(new_cap), seq)
                    return seq, new_cap, root_cap
                except SlotConflictError:
                    continue
        raise SlotConflictError(f"gave up after {MAX_RETRIES} conflicting updates of the root")

    async def apply(
        self,
        root_cap: str,
        changes: Sequence[Change],
        packs: dict[bytes, list[str]] | None = None,
        *,
        view: bool = False,
    ) -> str:
        """The root cap after ``changes``: every touched directory written once
        (``packs``: see :meth:`Batch.upload_overflow`).  A ``view`` (the queued
        changes over the committed tree, never published) keeps every small
        file inside its directory: nothing is stored for it."""
        batch = Batch(self, root_cap, packs)
        for change in changes:
            await batch.apply(change)
        return await batch.write(store_overflow=not view)


class Batch:
    """Directories being changed by one commit, by path (the mount keeps one
    open as its live view: changes are applied in memory, never written)."""

    def __init__(
        self, tree: Tree, root_cap: str, packs: dict[bytes, list[str]] | None = None
    ) -> None:
        self.tree = tree
        self.root_cap = root_cap
        self.packs: dict[bytes, list[str]] = {} if packs is None else packs
        """slice caps of the packs stored for this commit, by pack_digest"""
        self.dirs: dict[Path, Directory] = {}
        self.entries: dict[Path, dict[str, Entry]] = {}
        """The entries of the directories this batch changed, which it alone
        holds (``dirs[path].entries``): changed in place, so that a change
        costs the same in a directory of 10 or 100,000 entries"""
        self.dirty: set[Path] = set()
        self.inline: dict[Path, int] = {}
        """bytes of inline files in each loaded directory"""
        self.overflow: set[Path] = set()
        """inline files that do not fit their directory's budget: stored on write"""
        self.now = time.time_ns()
        self.root_mtime_ns = 0
        """when a name last appeared in or went from the root (0: not in this
        batch); the root has no entry to keep it in"""
        self.shared: dict[Path, SharedDir] = {}
        """The loaded directories that live in slots of their own: written
        to those slots, never linked into their parents"""

    async def dir(self, path: Path, create: bool) -> Directory | None:
        """The directory at ``path`` as changed so far (made if ``create``)."""
        if path in self.dirs:
            return self.dirs[path]
        if not path:
            d = await self.tree.load_dir(self.root_cap)
        else:
            parent = await self.dir(path[:-1], create)
            if parent is None:
                return None
            entry = parent.get(path[-1])
            if entry is None or not entry.is_dir:
                if not create:
                    return None
                if entry is not None:  # a file where a directory must go: keep it aside
                    self._keep_aside(path[:-1], path[-1], self.now, entry)
                self.set(path[:-1], path[-1], new_dir_entry(self.now))
                self._touch(path[:-1], self.now)
                d = EMPTY
            elif (slot := slot_of(entry)) is not None:
                seq, cap = await self.tree.shared_root(slot)
                write = open_write_cap(entry, self.write_key(path[:-1]))
                self.shared[path] = SharedDir(slot, seq, write)
                d = await self.tree.load_dir(cap)
            else:
                d = await self.tree.load_dir(entry.cap)
        self.dirs[path] = d
        self.inline[path] = sum(e.inline_size for e in d.entries.values())
        return d

    def _own(self, path: Path) -> dict[str, Entry]:
        """The entries of the directory at ``path``, to change in place (a
        copy the first time: the loaded directory may be shared)."""
        entries = self.entries.get(path)
        if entries is None:
            entries = self.entries[path] = dict(self.dirs[path].entries)
            self.dirs[path] = Directory(entries)
        return entries

    def set(self, parent: Path, name: str, entry: Entry | None) -> None:
        entries = self._own(parent)
        old = entries.get(name)
        if entry is None:
            entries.pop(name, None)
        else:
            entries[check_name(name)] = entry
        self.inline[parent] += (entry.inline_size if entry else 0) - (old.inline_size if old else 0)
        self.dirty.add(parent)
        same_dir = entry is not None and old is not None and entry.is_dir and entry.cap == old.cap
        if old is not None and old.is_dir and not same_dir:
            # The directory was removed or replaced: its pending subtree goes too.
            child = (*parent, name)
            for p in [p for p in self.dirs if p[: len(child)] == child]:
                del self.dirs[p]
                self.entries.pop(p, None)
                self.dirty.discard(p)
                self.shared.pop(p, None)

    def write_key(self, path: Path) -> bytes | None:
        """The write key of the slot the directory at ``path`` is stored in
        (its own if shared, else its nearest shared ancestor's, else the
        root's); None when this writer has only a read cap of it."""
        for i in range(len(path), 0, -1):
            shared = self.shared.get(path[:i])
            if shared is not None:
                return None if shared.write is None else shared.write.write_key
        return self.tree.store.root_write_key

    def _keep_aside(self, parent: Path, name: str, when_ns: int, entry: Entry) -> None:
        """Keep the loser of a conflict beside ``name``: under its conflict
        name, or that name with -2, -3, ... when another entry has it (two
        conflicts in the same second must not overwrite one another)."""
        entries = self._own(parent)
        base = candidate = conflict_name(name, when_ns)
        n = 1
        while (taken := entries.get(candidate)) is not None and taken != entry:
            n += 1
            candidate = f"{base}-{n}"
        self.set(parent, candidate, entry)

    def _touch(self, path: Path, when_ns: int) -> None:
        """A name appeared in or went from the directory at ``path``: its
        mtime and ctime become ``when_ns`` (0: now), as POSIX has it.  The
        directory's own entry is in its parent, which the batch has loaded
        on the way to it."""
        when = when_ns or self.now
        if not path:
            self.root_mtime_ns = when
            return
        if path in self.shared:  # its entry is its parent's: changing it would publish both
            return
        entries = self._own(path[:-1])
        entry = entries.get(path[-1])
        if entry is not None and entry.is_dir:
            entries[path[-1]] = entry.with_(mtime_ns=when, ctime_ns=when)
            self.dirty.add(path[:-1])

    async def apply(self, change: Change) -> None:
        if isinstance(change, Put):
            await self.put(change)
        elif isinstance(change, Delete):
            await self.delete(change)
        else:
            await self.move(change)

    async def put(self, change: Put, when_ns: int | None = None) -> None:
        """Apply ``change``; a new name makes ``when_ns`` (by default the
        entry's ctime) the parent's mtime."""
        if not change.path:
            raise UsageError("cannot replace the root directory")
        parent, name = change.path[:-1], change.path[-1]
        d = await self.dir(parent, create=True)
        assert d is not None
        current = d.get(name)
        if current is not None and current == change.entry:
            return
        if change.soft and (
            current is None or current.cap != change.base or current.data != change.entry.data
        ):
            return
        if (
            current is not None
            and change.base is not None
            and current.cap != change.base
            and current.cap != change.entry.cap
            and not (current.is_dir and change.entry.is_dir)
        ):
            # Named by the change's time: the mount's view and the commit agree.
            self._keep_aside(parent, name, change.entry.ctime_ns or self.now, current)
            self._touch(parent, change.entry.ctime_ns if when_ns is None else when_ns)
        if (
            current is not None
            and current.is_dir
            and change.entry.is_dir
            and change.entry.cap == empty_dir_cap()
            and current.cap != change.entry.cap
        ):
            # mkdir over an existing directory keeps its contents (and their count).
            extra = link_of(current, kept_count(change.entry, current))
            kept = change.entry.with_(cap=current.cap, size=current.size, extra=extra)
            change = Put(change.path, kept, change.base)
            if current == change.entry:
                return
        if current is not None and current.is_dir and change.entry.is_dir:
            change = keep_link(change, current)
            if current == change.entry:
                return
        if change.entry.data is not None:
            budget = (
                DIR_INLINE_BUDGET - self.inline[parent] + (current.inline_size if current else 0)
            )
            if change.entry.inline_size > budget:  # the directory is full: upload it
                self.overflow.add(change.path)  # (at write time, many at once)
        self.set(parent, name, change.entry)
        if current is None:
            self._touch(parent, change.entry.ctime_ns if when_ns is None else when_ns)

    async def delete(self, change: Delete) -> None:
        if not change.path:
            raise UsageError("cannot delete the root directory")
        d = await self.dir(change.path[:-1], create=False)
        current = d.get(change.path[-1]) if d is not None else None
        if current is None:
            return
        if change.base is not None and change.base != await self._live_cap(current):
            return  # changed by another writer since: their version stays
        self.set(change.path[:-1], change.path[-1], None)
        self._touch(change.path[:-1], change.when_ns)

    async def _live_cap(self, entry: Entry) -> str:
        """The cap of ``entry`` as readers saw it: a shared directory's is
        the version its slot held when this batch read it (not the hint)."""
        return (await self.tree.resolve(entry)).cap

    async def move(self, change: Move) -> None:
        if not change.src or not change.dst:
            raise UsageError("cannot move the root directory")
        if change.dst[: len(change.src)] == change.src:
            if change.dst == change.src:
                return
            raise UsageError("cannot move a directory into itself")
        src_dir = await self.dir(change.src[:-1], create=False)
        entry = src_dir.get(change.src[-1]) if src_dir is not None else None
        if entry is None:
            return
        if entry.is_dir and any(p[: len(change.src)] == change.src for p in self.dirty):
            # Pending changes inside the moved directory: write them first.
            entry = entry.with_(cap=await self.write_subtree(change.src))
        if slot_of(entry) is not None:  # its write cap is sealed for the slot it leaves
            await self.dir(change.dst[:-1], create=True)
            old_key, new_key = self.write_key(change.src[:-1]), self.write_key(change.dst[:-1])
            write = open_write_cap(entry, old_key)
            if write is not None and new_key is not None and new_key != old_key:
                entry = reseal(entry, write, new_key)
        # As on Linux, the entry renamed changes too: its ctime moves.
        entry = entry.with_(ctime_ns=change.when_ns or self.now)
        await self.put(Put(change.dst, entry), change.when_ns)
        self.set(change.src[:-1], change.src[-1], None)
        self._touch(change.src[:-1], change.when_ns)
        self._touch(change.dst[:-1], change.when_ns)

    async def write_subtree(self, top: Path) -> str:
        """Write the dirty directories at and under ``top``; return top's cap."""
        while True:
            under = [p for p in self.dirty if p[: len(top)] == top]
            if not under:
                return self._cap_of(top)
            path = max(under, key=len)
            cap = await self._flush_dir(path)
            if path == top:
                return cap

    def _cap_of(self, path: Path) -> str:
        parent = self.dirs[path[:-1]]
        entry = parent.get(path[-1])
        assert entry is not None
        return entry.cap

    async def _write_dir(self, path: Path) -> str:
        data = self.dirs[path].pack()
        cap = await self.tree.store.put_bytes(data)
        self.entries.pop(path, None)  # shared from now on: copied before any change
        self.tree.cache.put(cap, self.dirs[path])
        self.dirty.discard(path)
        return cap

    async def _flush_dir(self, path: Path) -> str:
        """Write the directory at ``path`` and put its new cap where it
        belongs: in its own slot if it is shared, else in its parent."""
        cap = await self._write_dir(path)
        if path in self.shared:
            await self._publish_shared(path, cap)
        elif path:
            self._link(path, cap)
        return cap

    async def _publish_shared(self, path: Path, cap: str) -> None:
        """Publish a shared directory's new version in its slot (test-and-set
        on the version this batch read: another writer's newer one is a
        SlotConflictError, and the commit is re-applied).  The parent is not
        changed for it; if the parent is being written anyway, its entry's
        hint follows."""
        shared = self.shared[path]
        if shared.write is None:
            raise ReadOnlyShareError(f"{join_path(list(path))}: a read-only shared directory")
        seq = await self.tree.store.publish_dir_slot(shared.write, pack_root(cap), shared.seq)
        self.shared[path] = SharedDir(shared.read, seq, shared.write)
        # Not cached as read: the store needs a fresh read before it
        # publishes this slot again (the directory loaded again elsewhere
        # in this batch, e.g. moved after it was written).
        self.tree.slots.pop(shared.read.storage_index, None)
        if path[:-1] in self.dirty:
            entries = self._own(path[:-1])
            entry = entries.get(path[-1])
            if entry is not None and slot_of(entry) == shared.read:
                entries[path[-1]] = entry.with_(cap=cap, size=len(self.dirs[path]))

    def _link(self, path: Path, cap: str) -> None:
        entries = self._own(path[:-1])
        entry = entries.get(path[-1])
        assert entry is not None
        listing = self.dirs[path]
        extra = {**entry.extra, SUBDIRS: subdirs(listing, top=not path)}
        entries[path[-1]] = entry.with_(cap=cap, size=len(listing), extra=extra)
        self.dirty.add(path[:-1])

    async def upload_overflow(self, concurrency: int = 4) -> None:
        """Store the inline files over their directory's budget on their own:
        together in packs (each file under its own key, see
        :mod:`gridfs.pack`), a lone one as a file of its own."""
        members: list[tuple[Path, Entry]] = []
        for path in sorted(self.overflow):
            d = self.dirs.get(path[:-1])
            entry = d.get(path[-1]) if d is not None else None
            if entry is not None and entry.data is not None:  # not replaced or removed since
                members.append((path, entry))
        self.overflow.clear()
        limiter = trio.Semaphore(concurrency)

        async def store(group: list[tuple[Path, Entry]]) -> None:
            bodies = [entry.data for _, entry in group if entry.data is not None]
            async with limiter:
                if len(group) == 1 or sum(map(len, bodies)) <= LITERAL_MAX:
                    caps = [await self.tree.store.put_bytes(body) for body in bodies]
                elif (digest := pack_digest(bodies)) in self.packs:  # an earlier try's
                    caps = self.packs[digest]
                else:
                    data, places = build_pack(bodies)
                    pack = parse_cap(await self.tree.store.put_bytes(data))
                    assert isinstance(pack, ReadCap), "a pack is never a literal"
                    caps = [place.slice_of(pack).to_string() for place in places]
                    self.packs[digest] = caps
            for (path, entry), cap in zip(group, caps, strict=True):
                current = self.dirs[path[:-1]].get(path[-1])
                if current == entry:
                    self.set(path[:-1], path[-1], entry.with_(cap=cap, data=None))

        groups = group_for_packs([e.inline_size for _, e in members])
        async with trio.open_nursery() as nursery:
            for indexes in groups:
                nursery.start_soon(store, [members[i] for i in indexes])

    async def write(self, store_overflow: bool = True) -> str:
        """Write every changed directory, deepest first; return the root's cap
        (first storing the small files over their directories' budget)."""
        if store_overflow:
            await self.upload_overflow()
        while self.dirty:
            path = max(self.dirty, key=len)
            cap = await self._flush_dir(path)
            if not path:
                return cap
        return self.root_cap
