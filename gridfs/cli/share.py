"""Sharing and history: share, snapshots, restore.

``gridfs share ALIAS:/path [--ro]`` prints a live cap for the tree's root or
any directory (its slot's write cap, or with ``--ro`` its read cap; a
directory gets a slot of its own the first time, see
:mod:`gridfs.client.sharing`) or for a file (its read cap);
``gridfs snapshots ALIAS:`` lists the root versions the node keeps (see
:mod:`gridfs.client.snapshots`); ``gridfs restore`` puts a file or directory
of one of them back into a tree.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ..caps import LITERAL_MAX, LiteralCap
from ..client import links
from ..client.grid import GridClient
from ..client.gridstore import upload_bytes
from ..client.keeper import RetainedSet, get_keeper, lease_lock
from ..client.session import TreeSession, load_aliases
from ..client.sharing import share_directory, slot_maker
from ..client.snapshots import SnapshotLog, iso_time, pick, snapshot_names, tree_key
from ..dirnode import split_path
from ..errors import UsageError
from ..links import as_copy, is_slot_top
from ..mutable import SlotReadCap, SlotVerifyCap, SlotWriteCap
from ..shares import unshared
from ..tree import NotFoundError
from ..workqueue import is_placeholder
from .files import add_node_option
from .tree import flush, grid_path, run_with_grid


def register(sub: Any) -> None:
    share = sub.add_parser(
        "share", help="print a live cap for a directory (--ro: read-only) or a file's cap"
    )
    share.add_argument("path", metavar="ALIAS:PATH")
    share.add_argument("--ro", action="store_true", help="a read-only cap")
    add_node_option(share)
    share.set_defaults(func=cmd_share)

    snaps = sub.add_parser("snapshots", help="list a tree's snapshots (--prune: expire now)")
    snaps.add_argument("path", metavar="ALIAS:")
    snaps.add_argument("--prune", action="store_true", help="apply the retention policy now")
    snaps.add_argument("--json", action="store_true")
    add_node_option(snaps)
    snaps.set_defaults(func=cmd_snapshots)

    restore = sub.add_parser("restore", help="bring back a file or directory from a snapshot")
    restore.add_argument("path", metavar="ALIAS:PATH")
    restore.add_argument("--at", required=True, metavar="TIME", help="snapshot name or ISO time")
    restore.add_argument("--to", default=None, metavar="ALIAS:PATH", help="restore there instead")
    add_node_option(restore)
    restore.set_defaults(func=cmd_restore)


def cmd_share(args: argparse.Namespace) -> int:
    async def main(grid: GridClient) -> str:
        alias, path = grid_path(args.path, load_aliases(grid.node))
        session = TreeSession(grid, alias)
        if not split_path(path):
            if args.ro:
                assert not isinstance(session.cap, SlotVerifyCap)  # (TreeSession refuses one)
                return session.cap.read_cap().to_string()
            if not isinstance(session.cap, SlotWriteCap):
                raise UsageError(f"alias {alias}: is read-only (share it with --ro)")
            return session.cap.to_string()
        entry = await session.lookup(path)
        if entry.is_dir:
            await flush(session, "share")  # (the slot takes the committed directory)
            live = await share_directory(session.tree, tuple(split_path(path)), slot_maker(grid))
            if args.ro or isinstance(live, SlotReadCap):
                if not args.ro:
                    raise UsageError(f"{args.path}: is read-only here (share it with --ro)")
                return live.read_cap().to_string()
            return live.to_string()
        if entry.kind != "file":
            raise UsageError(f"{args.path}: not a file or directory")
        if entry.cap and not is_placeholder(entry.cap):
            return entry.cap
        if entry.data is None:
            raise UsageError(f"{args.path}: its upload is still queued (gridfs queue flush)")
        if len(entry.data) <= LITERAL_MAX:
            return LiteralCap(entry.data).to_string()
        # A small file inside its directory has no cap of its own: store it
        # once, and keep it (the retained set) as gridfs put would.
        await grid.wait_for_servers(grid.params.happy)
        async with lease_lock(grid.node):
            cap = await upload_bytes(grid.broker, entry.data, grid.params, grid.secret)
            retained = RetainedSet(grid.node)
            try:
                retained.add([cap])
            finally:
                retained.close()
        return cap

    print(run_with_grid(args, main))
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    async def main(grid: GridClient) -> dict[str, Any]:
        alias, _ = grid_path(args.path, load_aliases(grid.node))
        session = TreeSession(grid, alias)
        seq, _ = await session.tree.root()  # (records the current version)
        out: dict[str, Any] = {"pruned": 0}
        if args.prune:
            await grid.wait_for_servers()
            keeper = get_keeper(grid)
            count, caps = await keeper.expire_snapshots()
            report = await keeper.unlink(caps)
            out |= {"pruned": count, "cancelled": report.cancelled, "freed": report.freed}
        with SnapshotLog(grid.node) as log:
            names = snapshot_names(log.versions(tree_key(session.cap)))
        out["snapshots"] = [
            {"name": name, "seq": s.seq, "at": s.at_ns / 1e9, "current": s.seq == seq}
            for name, s in names.items()
        ]
        return out

    out = run_with_grid(args, main)
    if args.json:
        print(json.dumps(out))
        return 0
    if args.prune:
        print(
            f"pruned {out['pruned']} snapshots: gave up {out['cancelled']} leases, "
            f"{out['freed']} server copies freed"
        )
    for s in out["snapshots"]:
        local = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(s["at"]))
        print(f"{s['name']}  seq {s['seq']:<6} {local}" + ("  (current)" if s["current"] else ""))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    async def main(grid: GridClient) -> str:
        aliases = load_aliases(grid.node)
        alias, path = grid_path(args.path, aliases)
        if not split_path(path):
            raise UsageError("restore a file or directory of the tree (or use --to for its root)")
        session = TreeSession(grid, alias)
        await session.tree.root()  # (records the current version)
        with SnapshotLog(grid.node) as log:
            snap = pick(log.versions(tree_key(session.cap)), args.at)
        try:
            entry = await session.tree.lookup(tuple(split_path(path)), snap.root, at_ns=snap.at_ns)
        except NotFoundError:
            raise UsageError(f"{args.path}: not in the snapshot of {args.at}") from None
        dest_alias, dest = grid_path(args.to, aliases) if args.to else (alias, path)
        target = session if dest_alias == alias else TreeSession(grid, dest_alias)
        target.check_writable()
        if not split_path(dest):
            raise UsageError("cannot restore over the root directory")
        try:
            current = await target.lookup(dest)
        except NotFoundError:
            current = None
        parts, at = tuple(split_path(path)), snap.at_ns
        if is_slot_top(entry) and await links.has_records(session.tree, snap.root, parts, at):
            raise UsageError(f"{args.path}: a shared directory with hard links: restore its files")
        entry = unshared(entry)  # (the directory as it was: not its live slot)
        if current is not None and (current.is_dir or entry.is_dir):
            raise UsageError(f"{args.to or args.path}: exists (remove it, or restore with --to)")
        # A hard link comes back as a file of its own; links inside a
        # directory stay links (their records restored where gone).
        entry = as_copy(await links.follow(session.tree, snap.root, entry, parts, at))
        old_top = await links.slot_top(session.tree, snap.root, parts, at)
        found = await links.references_under(session.tree, snap.root, entry, old_top, at)
        _, root = await session.tree.root()
        top = await links.slot_top(session.tree, root, tuple(split_path(dest)))
        if found and (target is not session or top != old_top):
            raise UsageError(
                f"{args.path}: holds hard links: restore it into its own tree and shared directory"
            )
        records = await links.restored(session.tree, snap.root, root, found, (old_top, top), at)
        with target.queue.transaction():
            target.queue.add_addpath(None, dest, entry.with_(ctime_ns=time.time_ns()))
            links.queue_recount(target.queue, records)
        await flush(target, "restore")
        return f"restored {args.path} from the snapshot of {iso_time(snap.at_ns)}"

    print(run_with_grid(args, main))
    return 0
