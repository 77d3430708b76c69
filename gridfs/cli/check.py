"""``gridfs check``: count (or verify) the good shares of a file or a tree."""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Any

from ..caps import ChunkedCap, ChunkedVerifyCap, LiteralCap, parse, stored_cap
from ..client.check import CheckResult, check_file
from ..client.chunkcheck import check_chunked
from ..client.grid import GridClient
from ..client.repair import repair_file
from ..client.session import TreeSession, load_aliases, split_grid_path
from ..dirnode import Entry, split_path
from ..errors import UsageError
from ..links import LINKS_DIR, is_slot_top
from ..tree import NotFoundError
from .files import add_node_option
from .tree import run_with_grid
from .util import progress_bar


def register(sub: Any) -> None:
    c = sub.add_parser("check", help="check the health of a file (or a whole tree with -r)")
    c.add_argument("target", metavar="ALIAS:/path|CAP")
    c.add_argument("--verify", action="store_true", help="fetch and verify every block")
    c.add_argument(
        "--repair",
        action="store_true",
        help="verify, then re-create missing or corrupt shares on other servers (up to n)",
    )
    c.add_argument("--json", action="store_true", help="print one JSON object per file")
    c.add_argument("-r", "--recursive", action="store_true", help="walk a whole tree")
    add_node_option(c)
    c.set_defaults(func=cmd_check)


def describe(path: str, r: CheckResult) -> str:
    state = "healthy" if r.healthy else ("unhealthy" if r.recoverable else "UNRECOVERABLE")
    extra = f", {len(r.corrupt)} corrupt" if r.corrupt else ""
    if r.parts > 1:
        extra += f" (the worst of {r.parts} parts: manifest and chunks)"
    return f"{path}: {state}: {r.good_shares} of {r.total} good shares (needs {r.needed}){extra}"


def cmd_check(args: argparse.Namespace) -> int:
    async def main(grid: GridClient) -> int:
        await grid.wait_for_servers()
        aliases = load_aliases(grid.node)
        parsed = split_grid_path(args.target, aliases)
        if parsed is None:
            if args.recursive:
                raise UsageError("check -r needs a tree path (ALIAS:/path)")
            result = await examine(grid, parse(stored_cap(args.target)), args)
            report(args.target, result, args.json)
            return 0 if result.healthy else 1
        session = TreeSession(grid, parsed[0])
        entry = await session.lookup(parsed[1])
        targets = [(parsed[1], entry)]
        if args.recursive:
            targets = await walk(session, parsed[1], entry)
        counts = {"healthy": 0, "unhealthy": 0, "unrecoverable": 0}
        results: dict[str, CheckResult] = {}
        with progress_bar(len(targets) if len(targets) > 20 else 0, "check", unit="files") as bar:
            for path, e in targets:
                if e.data is not None or e.kind == "symlink" or not e.cap:
                    counts["healthy"] += 1  # kept inside its directory, or no data
                    bar(1)
                    continue
                stored = stored_cap(e.cap)
                if stored not in results:  # the files of one pack share its check
                    results[stored] = await examine(grid, parse(stored), args)
                result = results[stored]
                key = (
                    "healthy"
                    if result.healthy
                    else ("unhealthy" if result.recoverable else "unrecoverable")
                )
                counts[key] += 1
                if args.json or not result.healthy or not args.recursive:
                    report(f"{parsed[0]}:{path}", result, args.json)
                bar(1)
        if args.recursive and not args.json:
            print(
                f"{len(targets)} objects checked: {counts['healthy']} healthy, "
                f"{counts['unhealthy']} unhealthy, {counts['unrecoverable']} unrecoverable"
            )
        return 0 if counts["healthy"] == len(targets) else 1

    return run_with_grid(args, main)


async def examine(grid: GridClient, cap: Any, args: argparse.Namespace) -> CheckResult:
    if isinstance(cap, ChunkedCap | ChunkedVerifyCap):  # its manifest and each chunk
        return await check_chunked(grid, cap, args.verify, args.repair)
    if args.repair and not isinstance(cap, LiteralCap):
        return await repair_file(grid.broker, cap)
    return await check_file(grid.broker, cap, args.verify)


def report(path: str, result: CheckResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"path": path, **result.to_json()}))
    else:
        print(describe(path, result))
        for server, num, why in result.corrupt:
            print(f"  corrupt: share {num} on {server}: {why}")


async def walk(session: TreeSession, path: str, entry: Entry) -> list[tuple[str, Entry]]:
    """Every object under ``path``: directories (their own CHK files) and
    files; a shared directory is checked in its live version (its slot's)."""
    entry = await session.tree.resolve(entry)
    out = [(path, entry)]
    if entry.is_dir:
        listing = await session.listdir(path)
        for name in listing:
            child = f"{path.rstrip('/')}/{name}"
            out += await walk(session, child, listing.entries[name])
        if not split_path(path) or is_slot_top(entry):  # a slot's top: its hidden records too
            where = f"{path.rstrip('/')}/{LINKS_DIR}"
            with contextlib.suppress(NotFoundError):
                out += await walk(session, where, await session.lookup(where))
    return out
