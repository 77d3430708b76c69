"""``gridfs introducer|storage create|run``: standalone server nodes, and the
grid key's commands (``introducer invite|revoke``) shared with ``gridfs grid``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..caps import b32encode
from ..config import NodeConfig, NodeDir
from ..errors import UsageError
from ..fileutil import make_private_dir
from ..membership import GridAuthority, Invite, Member, write_membership
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
            create.add_argument(
                "--invite",
                default="",
                metavar="INVITE",
                help="the invite that makes it a member ('-': read it from stdin)",
            )
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
        if kind == "introducer":
            add_member_commands(ksub, "its grid", cmd_invite, cmd_revoke)


def add_member_commands(
    sub: Any, grid: str, invite: Callable[..., int], revoke: Callable[..., int]
) -> None:
    """``invite DIR [--storage] [--name NAME]`` and ``revoke DIR NAME``, for
    ``gridfs grid`` and ``gridfs introducer`` alike."""
    p = sub.add_parser("invite", help=f"print an invite for a new member of {grid}")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument(
        "--storage", action="store_true", help="invite a storage server (default: a client)"
    )
    p.add_argument("--name", default="", help="the member's name (default: a new one)")
    p.set_defaults(func=invite)
    p = sub.add_parser("revoke", help=f"end the membership of NAME in {grid}")
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=revoke)


def read_invite(text: str) -> Invite:
    """An invite given on the command line, or on stdin for ``-`` (so that it
    need not appear in the process list)."""
    if text == "-":
        text = sys.stdin.readline()
    return Invite.decode(text)


def cmd_create(args: argparse.Namespace) -> int:
    node = NodeDir(args.dir)
    extra: dict[str, Any] = {}
    invite: Invite | None = None
    if args.kind == "storage":
        extra = {
            "introducer": args.introducer,
            "reserved_space": args.reserved_space,
            "max_share_size": args.max_share_size,
            "client_quota": args.client_quota,
        }
        if args.invite:
            invite = read_invite(args.invite)
            extra["introducer"] = str(invite.introducer)
    nickname = args.nickname or (invite.name if invite is not None else "")
    config = NodeConfig(args.kind, nickname, args.host, args.port, **extra)
    node.create(config, invite)
    if args.kind == "introducer":
        found_grid(node)
    member = f" as member {invite.name}" if invite is not None else ""
    print(f"created {args.kind} node in {args.dir}{member}")
    return 0


def found_grid(intro: NodeDir) -> GridAuthority:
    """Give an introducer node a new grid key, and make it the grid's first
    member."""
    authority = GridAuthority(intro.private)
    authority.create()
    enroll(authority, intro, "introducer", "introducer")
    return authority


def enroll(authority: GridAuthority, node: NodeDir, name: str, kind: str) -> Member:
    """Issue a member certificate for a node whose key is at hand (a node
    of the key holder's own), and install it with the grid CA.  A name the
    ledger gives to another node already gets this node's id appended."""
    key = node.key()
    taken = authority.ledger().get(name)
    if taken is not None and taken["node_id"] != b32encode(key.node_id):
        name = f"{name}-{b32encode(key.node_id)[:8]}"
    cert, member = authority.issue_local(key.public_bytes, name, kind)
    write_membership(node.private, authority.ca(), cert)
    return member


def authority_of(intro: NodeDir) -> GridAuthority:
    intro.config()
    authority = GridAuthority(intro.private)
    if not authority.exists():
        raise UsageError(f"{intro.path} holds no grid key (not the introducer that made a grid)")
    return authority


def print_invite(intro: NodeDir, args: argparse.Namespace) -> None:
    """Print (only) the invite line."""
    authority = authority_of(intro)
    address = intro.address()
    if address is None:
        raise UsageError(f"{intro.path} has no address yet: run it once first")
    kind = "storage" if args.storage else "client"
    print(authority.invite(address, kind, args.name or None).encode())


def revoke_member(intro: NodeDir, name: str) -> tuple[bytes, Member]:
    authority = authority_of(intro)
    entry = authority.ledger().get(name)
    if entry is not None and entry["kind"] == "introducer":
        raise UsageError("the introducer holds the grid key: it cannot be revoked")
    return authority.revoke(name)


def cmd_invite(args: argparse.Namespace) -> int:
    print_invite(NodeDir(args.dir), args)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    _, member = revoke_member(NodeDir(args.dir), args.name)
    print(f"revoked {member}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    node = NodeDir(args.dir)
    if node.exists():  # keys and log: the owner's alone (tightens older nodes)
        make_private_dir(node.path)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {args.kind} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    run_in_foreground(node, args.kind)
    return 0
