"""The ``gridfs`` command: argument parsing and the one place errors meet the user."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import GridError, unwrap
from ..malloc import keep_freed_memory
from . import check, debug, files, grid, leases, mount, nodes, share, tree, web


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gridfs",
        description="Encrypted, erasure-coded files on servers you do not have to trust.",
    )
    parser.add_argument("--version", action="version", version=f"gridfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    files.register(sub)
    grid.register(sub)
    nodes.register(sub)
    tree.register(sub)
    share.register(sub)
    mount.register(sub)
    check.register(sub)
    leases.register(sub)
    web.register(sub)
    debug.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    # What the imports made lives as long as the process: keep the cyclic
    # collector from scanning it again and again (several % of a transfer's
    # CPU under perf; the collector still sees everything made from here on).
    gc.freeze()
    gc.enable()  # (off while the command's modules were imported: gridfs.__main__)
    try:
        try:
            return int(args.func(args) or 0)
        except BaseExceptionGroup as group:
            raise unwrap(group) from None
    except GridError as e:
        print(f"gridfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("gridfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 141
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"gridfs: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


def run() -> None:
    sys.exit(main())
