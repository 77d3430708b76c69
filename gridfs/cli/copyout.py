"""``gridfs cp`` out of the grid: a subtree written under one local
directory, and nowhere else.

Whatever a tree holds was written by whoever can write the tree, so the
copy trusts none of it, even past the checks of
:meth:`gridfs.dirnode.Directory.unpack`:

* every name is checked again before it becomes a path (no ``/``, ``.``,
  ``..``, NUL or over-long name), and every path written is checked to lie
  under the real (resolved) target directory;
* a symlink is never followed: one that is in the way of a directory is an
  error, a file replaces it (rename), and the copy's own symlinks are made
  last in their directory;
* setuid, setgid and sticky bits are dropped unless ``--preserve-mode``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import trio

from ..caps import parse_read_cap
from ..client.grid import GridClient
from ..client.links import follow, slot_top
from ..client.session import TreeSession
from ..dirnode import (
    DEFAULT_DIR_MODE,
    SPECIAL_KINDS,
    Directory,
    Entry,
    name_problem,
    shown_name,
)
from ..errors import FormatError, UsageError
from ..fileutil import atomic_output
from ..links import is_slot_top, link_id, visible

SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


def local_mode(mode: int, preserve: bool) -> int:
    """The permission bits a copied file or directory gets: without
    ``preserve``, never setuid, setgid or sticky."""
    return mode & (0o7777 if preserve else 0o777)


def is_within(path: str, top: str) -> bool:
    return path == top or os.path.commonpath([path, top]) == top


async def download(grid: GridClient, entry: Entry, out: Any) -> None:
    """Write the content of file ``entry`` to binary file ``out``."""
    if entry.data is not None:  # a small file kept inside its directory
        out.write(entry.data)
        return

    async def write(data: bytes) -> None:
        await trio.to_thread.run_sync(out.write, data)

    await grid.get(parse_read_cap(entry.cap), write)


class CopyOut:
    """Copies entries of one tree to local paths under ``top`` only."""

    def __init__(
        self, grid: GridClient, session: TreeSession, top: Path, preserve_mode: bool = False
    ) -> None:
        self.grid = grid
        self.session = session
        self.top = os.path.realpath(top)
        self.preserve_mode = preserve_mode
        self.root: str | None = None
        self.linked: dict[tuple[tuple[str, ...], str], Path] = {}
        """the local copy of each hard-linked file copied so far, by its
        slot's top and record id"""

    async def load_dir(self, entry: Entry) -> Directory:
        """A directory's listing (a shared one's live version; its hard
        links' names as references), without the records directory of a
        slot's top (the tree's, or a shared directory's)."""
        if self.root is None:
            _, self.root = await self.session.view_root()
        tree = self.session.tree
        listing = await tree.load_dir((await tree.resolve(entry)).cap)
        top = entry.cap == self.root or is_slot_top(entry)
        return Directory(dict(visible(listing, top=top)))

    async def link_or_fetch(
        self, entry: Entry, where: str, target: Path, parts: tuple[str, ...]
    ) -> None:
        """Copy a listing's ``entry`` (at ``parts`` in its tree): a hard
        link's second name becomes a hard link of the local copy of its first."""
        link = link_id(entry)
        if link is None:
            return await self.fetch(entry, where, target, True, parts)
        tree, root = await self.session.view_root()
        key = (await slot_top(tree, root, parts), link)
        if key in self.linked:
            os.link(self.linked[key], target)
            return None
        await self.fetch(await follow(tree, root, entry, parts), where, target, True, parts)
        self.linked[key] = target
        return None

    def child(self, parent: Path, name: str, where: str) -> Path:
        """The local path of entry ``name`` of the directory copied to
        ``parent``: refused unless it is one plain name under :attr:`top`."""
        problem = name_problem(name)
        if problem is not None:
            raise FormatError(f"{where}: refusing the entry {shown_name(name)}: {problem}")
        real_parent = os.path.realpath(parent)
        path = os.path.join(real_parent, name)
        if not is_within(real_parent, self.top) or os.path.dirname(path) != real_parent:
            raise FormatError(f"{where}: refusing to write {path}: outside {self.top}")
        return Path(path)

    async def fetch(
        self,
        entry: Entry,
        where: str,
        target: Path,
        recursive: bool,
        parts: tuple[str, ...] = (),
    ) -> None:
        """Copy ``entry`` (at grid path ``where``, ``parts`` in its tree) to
        ``target``."""
        if not is_within(os.path.realpath(target.parent), self.top):
            raise FormatError(f"{where}: refusing to write {target}: outside {self.top}")
        if entry.kind == "symlink":
            os.symlink(entry.target, target)
        elif entry.kind in SPECIAL_KINDS:  # a FIFO, socket or device node (devices: root only)
            mode = local_mode(entry.mode, self.preserve_mode)
            os.mknod(target, stat.S_IFMT(entry.st_mode) | mode, entry.rdev)
        elif entry.kind == "file":
            mode = local_mode(entry.mode, self.preserve_mode)
            with atomic_output(target, mode, durable=False) as f:  # replaces, never follows
                await download(self.grid, entry, f)
            os.utime(target, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
        else:
            if not recursive:
                raise UsageError(f"{where}: is a directory (use cp -r)")
            await self.fetch_dir(entry, where, target, parts)

    async def fetch_dir(
        self, entry: Entry, where: str, target: Path, parts: tuple[str, ...]
    ) -> None:
        try:
            target.mkdir(mode=0o700)  # its own mode once its entries are in
            made = True
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(target).st_mode):
                raise UsageError(
                    f"{target}: is in the way and not a directory (symlinks are not followed)"
                ) from None
            made = False  # a directory of the user's: its mode stays
        listing = await self.load_dir(entry)
        names = sorted(listing.entries, key=lambda n: listing.entries[n].kind == "symlink")
        for name in names:
            child = listing.entries[name]
            path = self.child(target, name, where)
            await self.link_or_fetch(child, f"{where.rstrip('/')}/{name}", path, (*parts, name))
        if made:
            os.chmod(target, local_mode(entry.mode or DEFAULT_DIR_MODE, self.preserve_mode))
