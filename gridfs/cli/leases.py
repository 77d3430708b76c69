"""``gridfs retain``, ``gridfs unlink`` and ``gridfs renew``: the node's leases."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..caps import parse as parse_cap
from ..client.chunkread import expand
from ..client.grid import GridClient
from ..client.keeper import RetainedSet, get_keeper, lease_lock
from ..client.leases import renew
from ..mutable import parse_slot_cap
from ..reach import storage_index_of
from .files import add_node_option
from .tree import run_with_grid


def register(sub: Any) -> None:
    r = sub.add_parser(
        "retain", help="keep files (or whole trees) alive: add caps to the retained set"
    )
    r.add_argument("caps", nargs="*", metavar="CAP")
    r.add_argument("--list", action="store_true", help="print the retained set")
    add_node_option(r)
    r.set_defaults(func=cmd_retain)
    u = sub.add_parser(
        "unlink", help="stop keeping caps: give up this node's leases unless still referenced"
    )
    u.add_argument("caps", nargs="+", metavar="CAP")
    add_node_option(u)
    u.set_defaults(func=cmd_unlink)
    n = sub.add_parser(
        "renew", help="renew this node's leases on everything it keeps (the daemon does it daily)"
    )
    n.add_argument("--json", action="store_true", help="print one JSON object")
    add_node_option(n)
    n.set_defaults(func=cmd_renew)


def checked_cap(text: str) -> str:
    """A cap's canonical spelling, or a one-line CapError naming what is wrong."""
    if text.strip().startswith("gridfs:ssk"):
        return parse_slot_cap(text).to_string()
    return parse_cap(text).to_string()


def cmd_retain(args: argparse.Namespace) -> int:
    caps = [checked_cap(c) for c in args.caps]

    async def main(grid: GridClient) -> int:
        retained = RetainedSet(grid.node)
        try:
            if caps:
                async with lease_lock(grid.node):
                    retained.add(caps)
                keeper = get_keeper(grid)
                found: set[str] = set()
                for cap in caps:
                    slot = cap.startswith(("gridfs:ssk:", "gridfs:ssk-ro:"))
                    found |= await keeper.tree_caps(cap) if slot else {cap}
                await grid.wait_for_servers()
                found = await expand(grid, found)  # chunked files: their chunks too
                sis = [si for c in found if (si := storage_index_of(c)) is not None]
                report = await renew(grid.broker, sis)
                held = report.objects - len(report.unheld)
                print(
                    f"retained {len(caps)} caps: leases renewed on {held} objects "
                    f"at {report.servers} servers"
                    + (f"; {len(report.unheld)} held by no server" if report.unheld else "")
                )
            if args.list or not caps:
                for cap in retained.caps():
                    print(cap)
        finally:
            retained.close()
        return 0

    return run_with_grid(args, main)


def cmd_unlink(args: argparse.Namespace) -> int:
    caps = [checked_cap(c) for c in args.caps]

    async def main(grid: GridClient) -> int:
        keeper = get_keeper(grid)
        await grid.wait_for_servers()
        dropped: set[str] = set()
        for cap in caps:
            if cap.startswith(("gridfs:ssk:", "gridfs:ssk-ro:")):
                dropped |= await keeper.tree_caps(cap)
            else:
                dropped.add(cap)  # a file, or a slot's verify cap (the slot alone)
        retained = RetainedSet(grid.node)
        try:
            retained.remove(caps)
        finally:
            retained.close()
        report = await keeper.unlink(dropped)
        still = report.referenced
        print(
            f"unlinked {len(caps)} caps: gave up {report.cancelled} leases at "
            f"{report.servers} servers; {report.freed} server copies freed"
            + (f"; {still} objects still referenced here, kept" if still else "")
        )
        return 0

    return run_with_grid(args, main)


def cmd_renew(args: argparse.Namespace) -> int:
    async def main(grid: GridClient) -> int:
        await grid.wait_for_servers()
        report = await get_keeper(grid).renew_all()
        if args.json:
            out = {
                "objects": report.objects,
                "servers": report.servers,
                "leases": report.leases,
                "unheld": [si.hex() for si in report.unheld],
                "failures": report.failures,
            }
            print(json.dumps(out))
        else:
            print(
                f"renewed {report.leases} leases on {report.objects} objects "
                f"at {report.servers} servers"
            )
            if report.unheld:
                print(f"  {len(report.unheld)} objects are held by no server that answered")
            for failure in report.failures:
                print(f"  {failure}")
        return 0 if not report.failures else 1

    return run_with_grid(args, main)
