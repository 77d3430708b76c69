"""``gridfs grid start|stop|status|invite|revoke``: a private grid on loopback
in one directory.

DIR/introducer   DIR/storage-1 … DIR/storage-N   DIR/client

The introducer's directory holds the grid key; every node of the directory
is a member (``grid start`` issues their certificates, and upgrades a grid
made before membership existed).  ``invite`` lets other nodes join, and
``revoke`` ends a member (see docs/operations.md, "Membership").
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from ..client.broker import StorageBroker
from ..config import DEFAULT_HAPPY, NodeConfig, NodeDir
from ..errors import GridError, UsageError
from ..fileutil import atomic_output, make_private_dir, open_private_log
from ..gatekeeper import WATCH_INTERVAL
from ..membership import REVOCATIONS_NAME, GridAuthority
from ..net.identity import NodeAddress
from .nodes import add_member_commands, enroll, found_grid, print_invite, revoke_member
from .util import parse_size

START_TIMEOUT = 30.0


def register(sub: Any) -> None:
    grid = sub.add_parser("grid", help="a local grid: introducer + storage servers + client")
    gsub = grid.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = gsub.add_parser("start", help="start (or restart) a local grid in DIR")
    start.add_argument("dir", type=Path, metavar="DIR")
    start.add_argument("--servers", type=int, default=10, help="storage servers (default 10)")
    start.add_argument("--k", type=int, default=3)
    start.add_argument("--happy", type=int, default=None, help="default: min(7, servers)")
    start.add_argument("--n", type=int, default=10)
    start.add_argument(
        "--reserved-space",
        type=parse_size,
        default=64 << 20,
        metavar="SIZE",
        help="free disk space each server keeps (default 64M)",
    )
    start.set_defaults(func=cmd_start)
    stop = gsub.add_parser("stop", help="stop every node of the grid in DIR")
    stop.add_argument("dir", type=Path, metavar="DIR")
    stop.set_defaults(func=cmd_stop)
    status = gsub.add_parser("status", help="show the nodes of the grid in DIR")
    status.add_argument("dir", type=Path, metavar="DIR")
    status.set_defaults(func=cmd_status)
    add_member_commands(gsub, "the grid in DIR", cmd_invite, cmd_revoke)


def server_dirs(root: Path) -> list[NodeDir]:
    nodes = [NodeDir(root / "introducer")]
    storage = sorted(root.glob("storage-*"), key=lambda p: int(p.name.split("-")[1]))
    return nodes + [NodeDir(p) for p in storage]


def spawn(node: NodeDir, kind: str) -> int:
    """Start a node in the background (its own session, output to node.log)."""
    running = node.pid()
    if running is not None:
        return running
    node.url_path.unlink(missing_ok=True)
    make_private_dir(node.path)
    with open_private_log(node.log_path) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gridfs", kind, "run", str(node.path)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while node.address() is None:
        if proc.poll() is not None:
            raise GridError(f"{kind} node {node.path} failed to start (see {node.log_path})")
        if time.monotonic() > deadline:
            raise GridError(f"{kind} node {node.path} did not start in time")
        time.sleep(0.05)
    return proc.pid


def cmd_start(args: argparse.Namespace) -> int:
    root: Path = args.dir
    if args.servers < 1:
        raise UsageError("a grid needs at least one storage server")
    happy = args.happy if args.happy is not None else min(DEFAULT_HAPPY, args.servers, args.n)
    client_config = NodeConfig("client", "client", k=args.k, happy=happy, n=args.n)
    root.mkdir(parents=True, exist_ok=True)
    intro = NodeDir(root / "introducer")
    if not intro.exists():
        intro.create(NodeConfig("introducer", "introducer"))
    authority = GridAuthority(intro.private)
    if not authority.exists():  # a new grid, or one made before membership
        found_grid(intro)
    spawn(intro, "introducer")
    intro_url = intro.address()
    assert intro_url is not None
    for i in range(1, args.servers + 1):
        node = NodeDir(root / f"storage-{i}")
        if not node.exists():
            node.create(
                NodeConfig(
                    "storage",
                    f"storage-{i}",
                    introducer=str(intro_url),
                    reserved_space=args.reserved_space,
                )
            )
        else:  # the introducer may have a new port after a re-create
            config = node.config()
            if config.introducer != str(intro_url):
                config.introducer = str(intro_url)
                node.save(config)
        enroll_local(authority, node, f"storage-{i}", "storage")
        spawn(node, "storage")
    client = NodeDir(root / "client")
    if not client.exists():
        client_config.introducer = str(intro_url)
        client.create(client_config)
    elif client.config().introducer != str(intro_url):
        config = client.config()
        config.introducer = str(intro_url)
        client.save(config)
    enroll_local(authority, client, "client", "client")
    total = len(server_dirs(root)) - 1
    connected = trio.run(count_servers, client, intro_url, total, START_TIMEOUT)
    if connected < total:
        raise GridError(f"only {connected} of {total} storage servers connected to the introducer")
    trio.run(give_root, client)
    print(f"grid running in {root}: introducer {intro_url}, {connected} storage servers")
    print(f"client node: {client.path}   (export GRIDFS_NODE={client.path.resolve()})")
    return 0


def enroll_local(authority: GridAuthority, node: NodeDir, name: str, kind: str) -> None:
    """Make a local node of the grid a member if it is not one yet (a node
    made before membership existed), restarting it if it runs."""
    if node.credentials().member is not None:
        return
    enroll(authority, node, name, kind)
    if node.pid() is not None:
        stop_node(node)


async def count_servers(client: NodeDir, introducer: NodeAddress, want: int, timeout: float) -> int:
    async with trio.open_nursery() as nursery:
        broker = StorageBroker(nursery, client.credentials(), introducer)
        count = await broker.wait_for_servers(want, timeout)
        nursery.cancel_scope.cancel()
    return count


async def give_root(client: NodeDir) -> None:
    """The client node gets a root directory and the alias grid: (once)."""
    from ..client.grid import open_grid
    from .tree import ensure_root

    async with open_grid(client) as grid:
        await ensure_root(grid)


def cmd_stop(args: argparse.Namespace) -> int:
    nodes = [n for n in server_dirs(args.dir) if n.exists()]
    if not nodes:
        raise UsageError(f"no grid in {args.dir}")
    stopped = unmount_client(NodeDir(args.dir / "client"))
    for node in reversed(nodes):
        if stop_node(node):
            stopped += 1
    print(f"stopped {stopped} nodes in {args.dir}")
    return 0


def unmount_client(client: NodeDir) -> int:
    """Unmount the client's mounts first: they drain their queues while the
    servers are still up."""
    from .mount import control_call, running_mounts

    if not client.exists() or not running_mounts(client):
        return 0
    from gridfs_daemon.main import unmount

    statuses = trio.run(control_call, client, "ctl_status")
    for status in statuses:
        unmount(Path(status["mountpoint"]))
    deadline = time.monotonic() + 120
    while running_mounts(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    return len(statuses)


def stop_node(node: NodeDir, timeout: float = 10.0) -> bool:
    pid = node.pid()
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while node.pid() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    if node.pid() is not None:
        os.kill(pid, signal.SIGKILL)
        node.pid_path.unlink(missing_ok=True)
    return True


def cmd_status(args: argparse.Namespace) -> int:
    nodes = [n for n in server_dirs(args.dir) if n.exists()]
    if not nodes:
        raise UsageError(f"no grid in {args.dir}")
    revoked = revoked_names(NodeDir(args.dir / "introducer"))
    running = 0
    for node in nodes:
        pid = node.pid()
        running += pid is not None
        state = f"running (pid {pid})" if pid else "stopped"
        stand = membership(node, revoked)
        print(f"{node.path.name:12} {state:22} {stand:22} {node.address() or ''}")
    client = NodeDir(args.dir / "client")
    if client.exists():
        print(f"{'client':12} {'':22} {membership(client, revoked):22} {client.path}")
    intro = NodeDir(args.dir / "introducer")
    if GridAuthority(intro.private).exists():
        issued = len(GridAuthority(intro.private).ledger())
        names = f" ({', '.join(sorted(revoked))})" if revoked else ""
        print(f"{issued} members issued, {len(revoked)} revoked{names}")
    print(f"{running} of {len(nodes)} nodes running")  # (last: scripts read it)
    return 0 if running == len(nodes) else 1


def revoked_names(intro: NodeDir) -> set[str]:
    if not GridAuthority(intro.private).exists():
        return set()
    ledger = GridAuthority(intro.private).ledger()
    return {name for name, entry in ledger.items() if entry.get("revoked")}


def membership(node: NodeDir, revoked: set[str]) -> str:
    """How a node stands in its grid, for the status table."""
    try:
        member = node.credentials().member
    except (GridError, OSError, ValueError) as e:
        return f"bad membership ({str(e)[:40]})"
    if member is None:
        return "not a member"
    return f"{member.name} (revoked)" if member.name in revoked else f"member {member.name}"


def cmd_invite(args: argparse.Namespace) -> int:
    intro = NodeDir(args.dir / "introducer")
    if not intro.exists():
        raise UsageError(f"no grid in {args.dir}")
    print_invite(intro, args)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    intro = NodeDir(args.dir / "introducer")
    if not intro.exists():
        raise UsageError(f"no grid in {args.dir}")
    blob, member = revoke_member(intro, args.name)
    running = False
    for node in server_dirs(args.dir)[1:]:  # the local servers act at once
        if node.exists():
            write_revocations(node, blob)
            running |= node.pid() is not None
    if running or intro.pid() is not None:
        time.sleep(2 * WATCH_INTERVAL)  # (they re-read it within a second)
    print(f"revoked {member}")
    return 0


def write_revocations(node: NodeDir, blob: bytes) -> None:
    with atomic_output(node.private / REVOCATIONS_NAME) as f:
        f.write(blob)
