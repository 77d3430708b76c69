"""``gridfs introducer|storage create|run``: standalone server nodes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from ..config import NodeConfig, NodeDir
from ..node import run_in_foreground
from .util import parse_size


def register(sub: Any) -> None:
    for kind in ("introducer", "storage"):
        p = sub.add_parser(kind, help=f"create or run a {kind} node")
        ksub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
        create = ksub.add_parser("create", help=f"create a {kind} node directory")
        create.add_argument("dir", type=Path, metavar="DIR")
        create.add_argument("--host", default="127.0.0.1", help="address to listen on and announce")
        create.add_argument("--port", type=int, default=0, help="port (default: any free one)")
        create.add_argument("--nickname", default="")
        if kind == "storage":
            create.add_argument("--introducer", default="", metavar="URL")
            create.add_argument(
                "--reserved-space",
                type=parse_size,
                default=1 << 30,
                metavar="SIZE",
                help="free disk space never to use (default 1G)",
            )
            create.add_argument(
                "--max-share-size", type=parse_size, default=1 << 40, metavar="SIZE"
            )
            create.add_argument(
                "--client-quota",
                type=parse_size,
                default=0,
                metavar="SIZE",
                help="most bytes each member may store here (default 0: no limit)",
            )
        create.set_defaults(func=cmd_create, kind=kind)
        run = ksub.add_parser("run", help=f"run a {kind} node in the foreground")
        run.add_argument("dir", type=Path, metavar="DIR")
        run.set_defaults(func=cmd_run, kind=kind)


def cmd_create(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {}
    if args.kind == "storage":
        extra = {
            "introducer": args.introducer,
            "reserved_space": args.reserved_space,
            "max_share_size": args.max_share_size,
            "client_quota": args.client_quota,
        }
    config = NodeConfig(args.kind, args.nickname, args.host, args.port, **extra)
    NodeDir(args.dir).create(config)
    print(f"created {args.kind} node in {args.dir}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    node = NodeDir(args.dir)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {args.kind} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    run_in_foreground(node, args.kind)
    return 0
