"""``gridfs put`` and ``gridfs get``: immutable files to and from the grid."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from ..caps import LiteralCap, parse_read_cap
from ..client.grid import open_grid
from ..client.keeper import RetainedSet, lease_lock
from ..config import NodeDir, resolve_node_dir
from ..errors import UsageError
from ..fileutil import WriteBehind, atomic_output
from .util import progress_bar


def add_node_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--node",
        metavar="DIR",
        help="client node directory (default: $GRIDFS_NODE, else ~/.config/gridfs/client)",
    )


def register(sub: Any) -> None:
    put = sub.add_parser("put", help="upload a file; print its read cap")
    put.add_argument("file", metavar="FILE|-", help="file to upload, or - for stdin")
    put.add_argument(
        "--no-retain",
        dest="retain",
        action="store_false",
        help="do not add the cap to the retained set (its leases then run out unless "
        "a tree links it or someone retains it)",
    )
    put.add_argument(
        "--one-object",
        dest="chunked",
        action="store_false",
        help="store the file as one object, not in chunks: no dedup with other files or "
        "versions (the format before chunked files, to compare with)",
    )
    add_node_option(put)
    put.set_defaults(func=cmd_put)
    get = sub.add_parser("get", help="download a file by its read cap")
    get.add_argument("cap", metavar="CAP")
    get.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: stdout")
    add_node_option(get)
    get.set_defaults(func=cmd_get)


def client_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="gridfs: %(message)s", stream=sys.stderr)


def cmd_put(args: argparse.Namespace) -> int:
    client_logging()
    node = NodeDir(resolve_node_dir(args.node))
    node.config()
    if args.file == "-":
        with tempfile.NamedTemporaryFile(prefix="put-", dir=node.path) as spool:
            shutil.copyfileobj(sys.stdin.buffer, spool)
            spool.flush()
            return _put(node, Path(spool.name), args.retain, args.chunked)
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{path} is not a regular file")
    return _put(node, path, args.retain, args.chunked)


def _put(node: NodeDir, path: Path, retain: bool, chunked: bool = True) -> int:
    async def main() -> str:
        async with open_grid(node) as grid:
            # Held until the cap is retained: an unlink's fence must see it.
            async with lease_lock(node):
                with progress_bar(os.stat(path).st_size, "put") as bar:
                    report = await grid.put(path, bar, chunked=chunked)
                cap = report.cap.to_string()
                if retain and not isinstance(report.cap, LiteralCap):
                    retained = RetainedSet(node)
                    try:
                        retained.add([cap])
                    finally:
                        retained.close()
            return cap

    print(trio.run(main))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    client_logging()
    cap = parse_read_cap(args.cap)
    node = NodeDir(resolve_node_dir(args.node))
    node.config()

    async def main(out: Any) -> None:
        sink = WriteBehind(out)
        async with open_grid(node) as grid:
            with progress_bar(cap.size, "get") as bar:

                async def write(data: bytes) -> None:
                    await trio.to_thread.run_sync(sink.write, data)
                    bar(len(data))

                await grid.get(cap, write)

    if args.output is None:
        trio.run(main, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        # Like cp or curl, no fsync: a download can always be done again.
        with atomic_output(args.output, durable=False) as f:
            trio.run(main, f)
    return 0
