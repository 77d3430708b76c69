"""Tree commands: init, alias, mkdir, ls, cat, cp, mv, rm, queue.

Paths on the grid are ``ALIAS:/path`` (e.g. ``grid:/photos/cat.jpg``); any
other argument is a local path.  Changes go through the tree's work queue,
which each command runs to the end before returning.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from ..client import links
from ..client.grid import GridClient, open_grid
from ..client.session import (
    DEFAULT_ALIAS,
    TreeSession,
    add_alias,
    create_root,
    load_aliases,
    split_grid_path,
)
from ..config import NodeConfig, NodeDir, resolve_node_dir
from ..dirnode import INLINE_MAX, Entry, join_path, split_path
from ..errors import UsageError
from ..links import (
    LINKS_DIR,
    NLINK,
    as_copy,
    is_slot_top,
    link_id,
    record_path,
    reference,
    with_extra,
)
from ..tree import NotFoundError, new_dir_entry
from ..workqueue import Step
from .copyout import CopyOut, download
from .files import add_node_option, client_logging
from .nodes import read_invite
from .util import progress_bar

T = TypeVar("T")


def register(sub: Any) -> None:
    init = sub.add_parser("init", help="create a client node with a root directory (alias grid:)")
    add_node_option(init)
    init.add_argument(
        "--invite",
        default="",
        metavar="INVITE",
        help="join a grid with this invite ('-': read it from stdin)",
    )
    init.add_argument("--introducer", default="", metavar="URL")
    init.add_argument("--server", action="append", default=[], metavar="URL", dest="servers")
    init.add_argument("--k", type=int, default=3)
    init.add_argument("--happy", type=int, default=7)
    init.add_argument("--n", type=int, default=10)
    init.set_defaults(func=cmd_init)

    alias = sub.add_parser("alias", help="list or add aliases (names for trees)")
    asub = alias.add_subparsers(dest="action", metavar="ACTION", required=True)
    alist = asub.add_parser("list", help="list aliases")
    add_node_option(alist)
    alist.set_defaults(func=cmd_alias_list)
    aadd = asub.add_parser("add", help="add an alias for a tree's cap")
    aadd.add_argument("name")
    aadd.add_argument("cap")
    add_node_option(aadd)
    aadd.set_defaults(func=cmd_alias_add)

    def cmd(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = sub.add_parser(name, help=help)
        add_node_option(p)
        p.set_defaults(func=func)
        return p

    cmd("mkdir", "make directories (and their parents)", cmd_mkdir).add_argument(
        "paths", nargs="+", metavar="ALIAS:PATH"
    )
    ls = cmd("ls", "list a directory", cmd_ls)
    ls.add_argument("path", nargs="?", default=f"{DEFAULT_ALIAS}:/", metavar="ALIAS:PATH")
    ls.add_argument("-l", dest="long", action="store_true", help="long listing")
    ls.add_argument("-R", dest="recursive", action="store_true", help="list subdirectories too")
    cmd("cat", "write files to stdout", cmd_cat).add_argument(
        "paths", nargs="+", metavar="ALIAS:PATH"
    )
    cp = cmd("cp", "copy files: local ↔ grid, or within the grid", cmd_cp)
    cp.add_argument("-r", "--recursive", action="store_true")
    cp.add_argument(
        "--preserve-mode",
        action="store_true",
        help="out of the grid: keep setuid, setgid and sticky bits (dropped by default)",
    )
    cp.add_argument("sources", nargs="+", metavar="SRC")
    cp.add_argument("dest", metavar="DEST")
    mv = cmd("mv", "move or rename within a tree", cmd_mv)
    mv.add_argument("src", metavar="ALIAS:PATH")
    mv.add_argument("dest", metavar="ALIAS:PATH")
    rm = cmd("rm", "remove files (and directories with -r)", cmd_rm)
    rm.add_argument("-r", "--recursive", action="store_true")
    rm.add_argument("paths", nargs="+", metavar="ALIAS:PATH")

    queue = sub.add_parser("queue", help="show the pending work queue (or flush it)")
    add_node_option(queue)
    queue.add_argument("action", nargs="?", choices=["show", "flush"], default="show")
    queue.add_argument("--alias", default=None, help="only this tree's queue")
    queue.set_defaults(func=cmd_queue)


# -- plumbing -------------------------------------------------------------
def _node(args: argparse.Namespace) -> NodeDir:
    client_logging()
    node = NodeDir(resolve_node_dir(args.node))
    node.config()
    return node


def run_with_grid(args: argparse.Namespace, fn: Callable[[GridClient], Awaitable[T]]) -> T:
    node = _node(args)

    async def main() -> T:
        async with open_grid(node) as grid:
            return await fn(grid)

    return trio.run(main)


def grid_path(text: str, aliases: dict[str, str]) -> tuple[str, str]:
    parsed = split_grid_path(text, aliases)
    if parsed is None:
        raise UsageError(f"{text}: not a grid path (ALIAS:/path; aliases: {', '.join(aliases)})")
    return parsed


async def flush(session: TreeSession, label: str = "") -> None:
    """Run the queue to the end, with a progress bar on a terminal.  When a
    mount of this node is running, it owns the queue: ask it to drain."""
    total = len(session.queue)
    if not total:
        return
    from .mount import control_call, running_mounts

    if running_mounts(session.grid.node):
        await control_call(session.grid.node, "ctl_flush")
        return
    await session.grid.wait_for_servers(session.grid.params.happy)
    with progress_bar(total if total > 50 else 0, label or "queue", unit="steps") as bar:

        def step_done(step: Step) -> None:
            bar(1)

        await session.queue.flush(session, progress=step_done)


# -- init and aliases -----------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    node = NodeDir(resolve_node_dir(args.node))
    if args.invite and node.exists():
        raise UsageError(
            f"{node.path} already holds a gridfs node (an invite makes a new one; "
            "to finish its init, run gridfs init without --invite)"
        )
    if not node.exists():
        invite = read_invite(args.invite) if args.invite else None
        if invite is None and not args.introducer and not args.servers:
            raise UsageError("gridfs init needs --invite INVITE, --introducer URL or --server URL")
        introducer = str(invite.introducer) if invite is not None else args.introducer
        node.create(
            NodeConfig(
                "client",
                invite.name if invite is not None else "client",
                introducer=introducer,
                servers=args.servers,
                k=args.k,
                happy=args.happy,
                n=args.n,
            ),
            invite,
        )
    cap = run_with_grid(args, ensure_root)
    print(f"{DEFAULT_ALIAS}: {cap}")
    return 0


async def ensure_root(grid: GridClient) -> str:
    """Give a client node its root directory and the alias grid: (idempotent)."""
    existing = load_aliases(grid.node).get(DEFAULT_ALIAS)
    if existing:
        return existing
    await grid.wait_for_servers(grid.params.happy)
    cap = (await create_root(grid)).to_string()
    add_alias(grid.node, DEFAULT_ALIAS, cap)
    return cap


def cmd_alias_list(args: argparse.Namespace) -> int:
    for name, cap in sorted(load_aliases(_node(args)).items()):
        print(f"{name}: {cap}")
    return 0


def cmd_alias_add(args: argparse.Namespace) -> int:
    add_alias(_node(args), args.name, args.cap)
    return 0


# -- reading --------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    async def main(grid: GridClient) -> None:
        alias, path = grid_path(args.path, load_aliases(grid.node))
        session = TreeSession(grid, alias)
        entry = await session.lookup(path)
        if not entry.is_dir:
            show([(path.rsplit("/", 1)[-1], entry)], args.long)
            return
        pending = [path]
        while pending:
            current = pending.pop(0)
            listing = await session.listdir(current)
            if args.recursive:
                print(f"{alias}:{current}:")
            show([(name, listing.entries[name]) for name in listing], args.long)
            if args.recursive:
                print()
                subdirs = [n for n in listing if listing.entries[n].is_dir]
                pending[:0] = [f"{current.rstrip('/')}/{n}" for n in subdirs]

    run_with_grid(args, main)
    return 0


def show(rows: list[tuple[str, Entry]], long: bool) -> None:
    for name, e in rows:
        if long:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime_ns / 1e9))
            link = f" -> {e.target}" if e.kind == "symlink" else ""
            print(f"{stat.filemode(e.st_mode)} {e.size:>12} {when} {name}{link}")
        else:
            print(name + ("/" if e.is_dir else ""))


def cmd_cat(args: argparse.Namespace) -> int:
    async def main(grid: GridClient) -> None:
        aliases = load_aliases(grid.node)
        for text in args.paths:
            alias, path = grid_path(text, aliases)
            entry = await TreeSession(grid, alias).lookup(path)
            if entry.kind != "file":
                raise UsageError(f"{text}: not a file")
            await download(grid, entry, sys.stdout.buffer)
        sys.stdout.buffer.flush()

    run_with_grid(args, main)
    return 0


# -- changing -------------------------------------------------------------
def cmd_mkdir(args: argparse.Namespace) -> int:
    async def mkdir(session: TreeSession, text: str, path: str) -> None:
        session.queue.add_file(None, path, new_dir_entry())

    run_with_grid(args, lambda grid: change_paths(grid, args.paths, mkdir))
    return 0


async def change_paths(
    grid: GridClient,
    texts: list[str],
    step: Callable[[TreeSession, str, str], Awaitable[None]],
) -> None:
    """Queue ``step`` for each ALIAS:PATH (trees opened once, writable), then
    run each tree's queue."""
    aliases = load_aliases(grid.node)
    sessions: dict[str, TreeSession] = {}
    for text in texts:
        alias, path = grid_path(text, aliases)
        if alias not in sessions:
            sessions[alias] = TreeSession(grid, alias)
            sessions[alias].check_writable()
        await refuse_reserved(sessions[alias], text, path)
        await step(sessions[alias], text, path)
    for session in sessions.values():
        await flush(session)


async def refuse_reserved(session: TreeSession, text: str, path: str) -> None:
    """Changes of the hard-link records go through their names only.  (A
    path without the records' name needs no look at the tree: a change
    queued while the root cannot be read must not fail here.)"""
    parts = tuple(split_path(path))
    if LINKS_DIR not in parts:
        return
    tree, root = await session.view_root()
    if await links.reserved(tree, root, parts):
        raise UsageError(f"{text}: reserved for the tree's hard links (formats.md §13.3)")


async def _slot_tops(session: TreeSession, *paths: str) -> list[tuple[str, ...]]:
    """The top of the slot each name is in (whose records its links use)."""
    tree, root = await session.view_root()
    return [await links.slot_top(tree, root, tuple(split_path(p))) for p in paths]


async def refuse_crossing(
    session: TreeSession, text: str, entry: Entry, tops: list[tuple[str, ...]]
) -> None:
    """A hard link (or a directory holding some) cannot leave the slot its
    records are in (formats.md §13.3): one clear line instead."""
    src_top, dst_top = tops
    if src_top == dst_top or is_slot_top(entry):
        return
    tree, root = await session.view_root()
    if link_id(entry) is not None or await links.references_under(tree, root, entry, src_top):
        raise UsageError(
            f"{text}: holds hard links, which stay in their shared directory (or out of it);"
            " copy the files instead (cp of a link makes a file of its own)"
        )


def cmd_mv(args: argparse.Namespace) -> int:
    async def main(grid: GridClient) -> None:
        aliases = load_aliases(grid.node)
        (a1, src), (a2, dst) = grid_path(args.src, aliases), grid_path(args.dest, aliases)
        if a1 != a2:
            raise UsageError("mv works within one tree; use cp and rm across trees")
        session = TreeSession(grid, a1)
        session.check_writable()
        await refuse_reserved(session, args.src, src)
        await refuse_reserved(session, args.dest, dst)
        moved = await session.lookup(src, follow=False)  # a clear error for a missing source
        try:
            target = await session.lookup(dst)
        except NotFoundError:
            target = None
        if target is not None and target.is_dir:
            dst = dst.rstrip("/") + "/" + src.rstrip("/").rsplit("/", 1)[-1]
        await refuse_crossing(session, args.src, moved, await _slot_tops(session, src, dst))
        records = await _replaced_records(session, moved, dst)
        with session.queue.transaction():  # (a hard link it replaces: one name less)
            session.queue.add_move(src, dst)
            links.queue_recount(session.queue, records)
        await flush(session)

    run_with_grid(args, main)
    return 0


async def _replaced_records(
    session: TreeSession, moved: Entry, dst: str
) -> list[tuple[str, Entry | None]]:
    """The records whose count a move onto ``dst`` lowers (the name it
    replaces, when a hard link of another file)."""
    try:
        replaced = await session.lookup(dst, follow=False)
    except NotFoundError:
        return []
    gone = link_id(replaced)
    if gone is None or gone == link_id(moved):
        return []
    tree, root = await session.view_root()
    (top,) = await _slot_tops(session, dst)
    return await links.recounted(tree, root, links.lost(Counter([gone])), top)


def cmd_rm(args: argparse.Namespace) -> int:
    async def rm(session: TreeSession, text: str, path: str) -> None:
        entry = await session.lookup(path, follow=False)
        if not split_path(path):
            raise UsageError("refusing to remove the root directory")
        if entry.is_dir and not args.recursive:
            raise UsageError(f"{text}: is a directory (use rm -r)")
        tree, root = await session.view_root()
        (top,) = await _slot_tops(session, path)
        found = await links.references_under(tree, root, entry, top)
        records = await links.recounted(tree, root, links.lost(found), top)
        with session.queue.transaction():  # the names and their records' counts
            session.queue.add_deletepath(path, base=entry.cap)
            links.queue_recount(session.queue, records)

    run_with_grid(args, lambda grid: change_paths(grid, args.paths, rm))
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    async def main(grid: GridClient) -> None:
        aliases = load_aliases(grid.node)
        dest = split_grid_path(args.dest, aliases)
        if dest is None:
            await copy_to_local(
                grid, aliases, args.sources, Path(args.dest), args.recursive, args.preserve_mode
            )
        else:
            await copy_to_grid(grid, aliases, args.sources, dest, args.recursive)

    run_with_grid(args, main)
    return 0


def _entry_from_stat(st: os.stat_result, kind: str, cap: str = "", target: str = "") -> Entry:
    """The entry of a local file: its mode and mtime, as ``cp -p`` keeps them;
    its ctime is now (when it changes in the grid, as a copy's ctime is)."""
    mode = st.st_mode & 0o7777
    size = st.st_size if kind == "file" else 0
    return Entry(kind, cap, size, mode, st.st_mtime_ns, time.time_ns(), target)


async def copy_to_grid(
    grid: GridClient,
    aliases: dict[str, str],
    sources: list[str],
    dest: tuple[str, str],
    recursive: bool,
) -> None:
    alias, dpath = dest
    session = TreeSession(grid, alias)
    session.check_writable()
    try:
        into_dir = (await session.lookup(dpath)).is_dir
    except NotFoundError:
        into_dir = len(sources) > 1 or args_end_with_slash(dpath)
    queue = session.queue
    for src in sources:
        gsrc = split_grid_path(src, aliases)
        name = src.rstrip("/").rsplit("/", 1)[-1] or src
        target = f"{dpath.rstrip('/')}/{name}" if into_dir else dpath
        await refuse_reserved(session, target, target)
        if gsrc is not None:  # within the grid: the same caps, no data moves
            if gsrc[0] != alias:
                raise UsageError("cp between two trees is not supported yet")
            entry = await session.lookup(gsrc[1])
            if entry.is_dir and not recursive:
                raise UsageError(f"{src}: is a directory (use cp -r)")
            # A copy of a hard-linked file is a file of its own; hard links
            # inside a copied directory stay links (one more name each).
            tops = await _slot_tops(session, gsrc[1], target)
            if entry.is_dir:
                await refuse_crossing(session, src, entry, tops)
            tree, root = await session.view_root()
            found = await links.references_under(tree, root, entry, tops[0])
            records = await links.recounted(tree, root, found, tops[0])
            with queue.transaction():
                queue.add_addpath(None, target, as_copy(entry).with_(ctime_ns=time.time_ns()))
                links.queue_recount(queue, records)
            continue
        local = Path(src)
        if local.is_dir() and not local.is_symlink():
            if not recursive:
                raise UsageError(f"{src}: is a directory (use cp -r)")
            (top,) = await _slot_tops(session, target)
            _queue_tree(queue, local, target, top)
        else:
            _queue_one(queue, local, target)
    await flush(session, "cp")


def args_end_with_slash(path: str) -> bool:
    return path.endswith("/")


def _queue_one(
    queue: Any, local: Path, target: str, local_links: links.LocalLinks | None = None
) -> None:
    st = os.lstat(local)
    if stat.S_ISLNK(st.st_mode):
        queue.add_file(None, target, _entry_from_stat(st, "symlink", target=os.readlink(local)))
    elif stat.S_ISREG(st.st_mode):
        entry = _entry_from_stat(st, "file")
        record = local_links.record_of(st) if local_links is not None else None
        if record is not None and local_links is not None:  # a hard link: content once
            link, count, first = record
            entry = with_extra(entry, **{NLINK: count})
            if first:
                where = record_path(link, local_links.slot)
                _queue_file(queue, local, join_path(list(where)), entry)
            queue.add_file(None, target, reference(entry, link))
        else:
            _queue_file(queue, local, target, entry)
    else:
        raise UsageError(f"{local}: only regular files, directories and symlinks can be copied")


def _queue_file(queue: Any, local: Path, target: str, entry: Entry) -> None:
    if entry.size <= INLINE_MAX:  # kept inside its directory: no upload of its own
        entry = entry.with_(data=local.read_bytes())
        queue.add_file(None, target, entry.with_(size=len(entry.data or b"")))
    else:
        queue.add_file(local.resolve(), target, entry)


def _queue_tree(queue: Any, top: Path, target: str, slot: tuple[str, ...] = ()) -> None:
    """Queue a local tree.  Each directory is put again after everything in
    it, with its local times: a name put in a directory sets its mtime, and
    putting a directory that is there takes only its attributes."""
    top_entry = _entry_from_stat(os.stat(top), "dir").with_(cap=new_dir_entry().cap)
    queue.add_file(None, target, top_entry)
    dirs = [(target, top_entry)]
    local_links = links.LocalLinks(top, slot)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        rel = os.path.relpath(dirpath, top)
        base = target if rel == "." else f"{target}/{rel}"
        for d in dirnames:
            p = Path(dirpath) / d
            if p.is_symlink():
                _queue_one(queue, p, f"{base}/{d}")
            else:
                entry = _entry_from_stat(os.stat(p), "dir").with_(cap=new_dir_entry().cap)
                queue.add_file(None, f"{base}/{d}", entry)
                dirs.append((f"{base}/{d}", entry))
        for f in sorted(filenames):
            _queue_one(queue, Path(dirpath) / f, f"{base}/{f}", local_links)
    for path, entry in dirs:
        queue.add_file(None, path, entry.with_(ctime_ns=time.time_ns()))


async def copy_to_local(
    grid: GridClient,
    aliases: dict[str, str],
    sources: list[str],
    dest: Path,
    recursive: bool,
    preserve_mode: bool = False,
) -> None:
    for src in sources:
        alias, path = grid_path(src, aliases)
        session = TreeSession(grid, alias)
        entry = await session.lookup(path)
        name = path.rstrip("/").rsplit("/", 1)[-1] or alias
        into = dest.is_dir()
        target = dest / name if into else dest
        copy = CopyOut(grid, session, dest if into else dest.absolute().parent, preserve_mode)
        await copy.fetch(entry, src, target, recursive, tuple(split_path(path)))


def cmd_queue(args: argparse.Namespace) -> int:
    node = _node(args)
    aliases = load_aliases(node)
    names = [args.alias] if args.alias else sorted(aliases)
    if args.action == "show":
        total = 0
        for name in names:

            async def steps(grid: GridClient, name: str = name) -> list[Step]:
                return TreeSession(grid, name).queue.pending()

            pending = run_with_grid(args, steps)
            total += len(pending)
            for step in pending:
                print(f"{name}: {step.id:>6} {step.kind:<20} {step.describe()}")
        print(f"{total} pending steps")
        return 0

    async def main(grid: GridClient) -> None:
        from .mount import control_call, running_mounts

        if running_mounts(grid.node):  # the mount owns the queue: ask it to drain
            await control_call(grid.node, "ctl_flush")
        for name in names:
            await flush(TreeSession(grid, name), f"flush {name}")

    run_with_grid(args, main)
    print("queue empty: the grid has everything")
    return 0
