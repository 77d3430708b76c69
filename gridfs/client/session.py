"""A client's named trees (aliases) and the work queue of each.

Aliases live in ``private/aliases`` of the client node, one ``NAME: CAP``
per line (the cap of a tree's root slot).  Each tree has its own work queue
in ``queues/<storage index>/``; commands queue their changes there and then
run the queue, so a command killed half-way is finished by the next one (or
by ``gridfs queue flush``).
"""

from __future__ import annotations

import functools
import re
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from ..caps import log_name
from ..config import NodeDir
from ..dirnode import Directory, Entry, split_path
from ..errors import UsageError
from ..fileutil import atomic_output
from ..mutable import SlotCap, SlotReadCap, SlotWriteCap, parse_slot_cap
from ..reach import dropped_caps
from ..tree import Tree, empty_dir_cap, pack_root
from ..workqueue import WorkQueue, queue_directory
from . import links
from .chunked import put_edit
from .grid import GridClient
from .gridstore import GridStore, OverlayStore
from .keeper import get_keeper, lease_lock
from .slots import create_slot
from .snapshots import RootRecorder, SharedRecorder, version_at


class TempfileDigests:
    """Plaintext hashes by tempfile path, each taken by the file's upload.
    A tempfile the queue deletes without uploading it (a later write
    replaced it) would leave its hash behind for the life of the mount:
    those are dropped whenever the hashes have doubled in number since the
    last look."""

    PRUNE_MIN = 1024

    def __init__(self) -> None:
        self._digests: dict[Path, bytes] = {}
        self._prune_at = self.PRUNE_MIN

    def add(self, path: Path, digest: bytes) -> None:
        if len(self._digests) >= self._prune_at:
            self._digests = {p: d for p, d in self._digests.items() if p.exists()}
            self._prune_at = max(self.PRUNE_MIN, 2 * len(self._digests))
        self._digests[path] = digest

    def pop(self, path: Path) -> bytes | None:
        return self._digests.pop(path, None)

    def __len__(self) -> int:
        return len(self._digests)


ALIAS_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
DEFAULT_ALIAS = "grid"


def aliases_path(node: NodeDir) -> Path:
    return node.private / "aliases"


def load_aliases(node: NodeDir) -> dict[str, str]:
    try:
        text = aliases_path(node).read_text()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.lstrip().startswith("#"):
            name, _, cap = line.partition(":")
            out[name.strip()] = cap.strip()
    return out


def add_alias(node: NodeDir, name: str, cap: str) -> None:
    if not ALIAS_RE.fullmatch(name):
        raise UsageError(f"bad alias name {name!r} (letters, digits, _ . -)")
    parse_slot_cap(cap)
    aliases = load_aliases(node)
    if aliases.get(name, cap) != cap:
        raise UsageError(f"alias {name}: already exists")
    aliases[name] = cap
    with atomic_output(aliases_path(node), 0o600) as f:
        f.write("".join(f"{n}: {c}\n" for n, c in sorted(aliases.items())).encode())


def split_grid_path(text: str, aliases: dict[str, str]) -> tuple[str, str] | None:
    """``grid:/a/b`` → ("grid", "/a/b"); None for a local path."""
    name, sep, rest = text.partition(":")
    if not sep or name not in aliases:
        return None
    return name, "/" + rest.lstrip("/")


async def create_root(grid: GridClient) -> SlotWriteCap:
    """A new tree: an empty root directory in a new slot."""
    p = grid.params
    return await create_slot(grid.broker, pack_root(empty_dir_cap()), p.n, p.happy, seen=grid.seen)


class TreeSession:
    """One aliased tree: its store, tree, and work queue (also its executor)."""

    def __init__(self, grid: GridClient, alias: str) -> None:
        """``alias`` is an alias name, or a tree's slot cap itself."""
        aliases = load_aliases(grid.node)
        if alias.startswith("gridfs:"):
            cap_text = alias
        elif alias in aliases:
            cap_text = aliases[alias]
        else:
            raise UsageError(f"unknown alias {alias}: (see gridfs alias list)")
        self.grid = grid
        self.alias = log_name(alias) if alias.startswith("gridfs:") else alias
        """How messages name the tree: never by its cap."""
        self.cap: SlotCap = parse_slot_cap(cap_text)
        if not isinstance(self.cap, SlotWriteCap | SlotReadCap):
            raise UsageError(f"alias {self.alias}: holds a verify cap, which cannot read")
        self.store = GridStore(grid.broker, self.cap, grid.params, grid.secret, grid.seen)
        self.store.on_root = RootRecorder(grid.node, self.cap)
        self.store.on_shared = SharedRecorder(grid.node)
        self.tree = Tree(self.store)
        self.tree.version_at = functools.partial(version_at, grid.node)
        get_keeper(grid).share_tree(self.cap.to_string(), self.tree)
        self.queue = WorkQueue(queue_directory(grid.node.path, self.cap.storage_index))
        self.digests = TempfileDigests()
        """Plaintext hashes of queue tempfiles, known from the writes that
        made them (the mount hashes as it stages): their upload then skips
        a pass over the file to find its convergent key."""

    @property
    def writable(self) -> bool:
        return isinstance(self.cap, SlotWriteCap)

    def check_writable(self) -> None:
        if not self.writable:
            raise UsageError(f"alias {self.alias}: is read-only")

    # The Executor protocol for the work queue.
    async def upload(self, path: Path) -> str:
        # The queue's own tempfiles are read once: their pages need not stay.
        report = await self.grid.put(
            path, drop=self.queue.owns_tempfile(path), digest=self.digests.pop(path)
        )
        return report.cap.to_string()

    async def upload_edit(
        self, source: Path, base_cap: str, extents: list[tuple[int, int]], size: int
    ) -> str:
        return await put_edit(self.grid, base_cap, source, extents, size)

    async def dropped(self, old: str, new: str) -> set[str]:
        return await dropped_caps(self.tree, old, new)

    async def unlink(self, caps: list[str]) -> None:
        await get_keeper(self.grid).unlink(caps)

    def writing(self) -> AbstractAsyncContextManager[None]:
        return lease_lock(self.grid.node)

    async def view_root(self) -> tuple[Tree, str]:
        """The committed tree with the queued changes laid over it."""
        _, root = await self.tree.root()
        changes = self.queue.pending_changes()
        if not changes:
            return self.tree, root
        overlay = Tree(OverlayStore(self.store), self.tree.cache)
        return overlay, await overlay.apply(root, changes, view=True)

    async def lookup(self, path: str, follow: bool = True) -> Entry:
        """The entry at ``path``; a hard link's name as the file it names
        (unless not ``follow``: the name's own entry)."""
        tree, root = await self.view_root()
        parts = tuple(split_path(path))
        entry = await tree.lookup(parts, root)
        return await links.follow(tree, root, entry, parts) if follow else entry

    async def listdir(self, path: str) -> Directory:
        """A directory as the tree commands show it (see links.follow_listing)."""
        tree, root = await self.view_root()
        parts = tuple(split_path(path))
        listing = await tree.listdir(parts, root)
        return await links.follow_listing(tree, root, listing, parts)
