"""``gridfs mount``, ``umount``, ``status`` and ``install-mount-helper``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from ..caps import log_name
from ..client.grid import GridClient, open_grid
from ..client.keeper import load_record
from ..config import NodeDir, resolve_node_dir
from ..errors import CapError, GridError, UsageError
from ..fileutil import check_private_file, make_private_dir, open_private_log, unix_socket_path
from ..localspace import describe as describe_local
from ..localspace import disk_errno, snapshot_usage
from ..net.rpc import RpcClient
from .files import add_node_option

T = TypeVar("T")
MOUNT_TIMEOUT = 60.0
DEFAULT_TREE = "grid"
CAP_LINE_MAX = 4096
HELPER_PATH = Path("/sbin/mount.gridfs")


def register(sub: Any) -> None:
    m = sub.add_parser("mount", help="mount a tree as a filesystem")
    m.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    m.add_argument(
        "tree",
        nargs="?",
        default=DEFAULT_TREE,
        metavar="ALIAS|CAP",
        help="default: grid; a cap here is handed to the daemon through a pipe "
        "(with --foreground it is refused: use --cap-file)",
    )
    m.add_argument(
        "--cap-file",
        metavar="FILE|-",
        help="read the tree's cap from FILE (yours, mode 0600) or - for stdin, "
        "so that it never shows in a process list",
    )
    m.add_argument(
        "-o",
        dest="options",
        default="",
        metavar="OPTIONS",
        help="sync, allow_other, refresh=SECONDS, drain_timeout=SECONDS, node=DIR, "
        "cap_file=FILE, suid, dev, uidmap=S:L[:N], gidmap=S:L[:N] (see docs/mount.md)",
    )
    m.add_argument("--foreground", "-f", action="store_true", help="do not daemonize")
    add_node_option(m)
    m.set_defaults(func=cmd_mount)
    u = sub.add_parser("umount", help="unmount (drains or persists the queue)")
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    u.set_defaults(func=cmd_umount)
    s = sub.add_parser("status", help="servers, queue backlog, and this node's mounts")
    s.add_argument(
        "--no-servers",
        dest="servers",
        action="store_false",
        help="do not contact the grid (local state only)",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    add_node_option(s)
    s.set_defaults(func=cmd_status)
    h = sub.add_parser("install-mount-helper", help=f"install {HELPER_PATH} for mount -t gridfs")
    h.add_argument("--path", type=Path, default=HELPER_PATH)
    h.set_defaults(func=cmd_install_helper)


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint.absolute())
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                return " fuse.gridfs " in line or "gridfs" in line.split(" - ", 1)[-1]
    return False


def cmd_mount(args: argparse.Namespace) -> int:
    from gridfs_daemon.main import MountDaemon, MountOptions

    options, rest = MountOptions.parse(args.options)
    node = NodeDir(resolve_node_dir(rest.get("node") or args.node))
    node.config()
    mountpoint: Path = args.mountpoint.absolute()
    if not mountpoint.is_dir():
        raise UsageError(f"{mountpoint} is not a directory")
    if is_mounted(mountpoint):
        raise UsageError(f"{mountpoint} is already mounted")
    tree, cap = tree_to_mount(args, rest)
    make_private_dir(node.path)  # tightens a node made by an older gridfs
    if args.foreground:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s gridfs-mount %(levelname)s %(name)s: %(message)s",
        )
        daemon = MountDaemon(node, cap or tree, mountpoint, options)
        trio.run(daemon.run)
        return 0
    log_path = node.path / "mount.log"
    log_start = log_path.stat().st_size if log_path.exists() else 0
    cmd = [sys.executable, "-m", "gridfs", "mount", str(mountpoint)]
    cmd += ["--cap-file", "-"] if cap else [tree]
    cmd += ["--foreground", "--node", str(node.path), "-o", options_without_cap_file(args.options)]
    with open_private_log(log_path) as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if cap else subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    if cap:  # through a pipe: not in the daemon's argv nor its environment
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(cap.encode() + b"\n")
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
    deadline = time.monotonic() + MOUNT_TIMEOUT
    waiting = ""
    while not is_mounted(mountpoint):
        if not waiting:  # the daemon waits for the last one of the tree: say so
            waiting = daemon_waits_for(log_path, log_start)
            if waiting:
                print(f"gridfs: {waiting}…", file=sys.stderr, flush=True)
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            why = tail[0].removeprefix("gridfs: error: ") if tail else f"see {log_path}"
            raise GridError(f"mount failed: {why}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise GridError(f"mount did not come up in {MOUNT_TIMEOUT:.0f}s (see {log_path})")
        time.sleep(0.05)
    label = log_name(cap) if cap else tree
    print(f"mounted {label} at {mountpoint} (pid {proc.pid}; log {log_path})")
    return 0


def daemon_waits_for(log_path: Path, start: int) -> str:
    """What a starting daemon logged after ``start`` that it waits for, or ""."""
    try:
        with open(log_path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        _, sep, what = line.partition(": waiting for ")
        if sep:
            return "waiting for " + what
    return ""


def tree_to_mount(args: argparse.Namespace, rest: dict[str, str]) -> tuple[str, str | None]:
    """(alias, None) for a tree named by its alias, or ("", cap) for a tree
    given by its cap: from ``--cap-file`` / ``-o cap_file=`` (a 0600 file of
    the caller's, or ``-`` for stdin) or, for a daemon started here, from the
    command line.  A cap is checked here, so a bad one is a usage error of
    this command and is never echoed into the daemon's log."""
    cap_file = args.cap_file or rest.get("cap_file")
    tree = rest.get("alias") or args.tree
    if cap_file:
        if tree.startswith("gridfs:"):
            raise UsageError("give the tree's cap once: --cap-file, or ALIAS|CAP, not both")
        return "", read_cap(cap_file)
    if not tree.startswith("gridfs:"):
        return tree, None
    if args.foreground:
        raise UsageError(
            "a cap on the command line of a foreground mount stays in the process list "
            "for the life of the mount: use --cap-file FILE, --cap-file - (stdin) or an alias"
        )
    return "", checked_tree_cap(tree, "the command line")


def read_cap(source: str) -> str:
    """The tree cap in file ``source`` (refused unless only its owner can
    read it), or on stdin for ``-``: the first line, surrounding blanks ignored."""
    if source == "-":
        return checked_tree_cap(sys.stdin.readline(CAP_LINE_MAX), "stdin")
    path = Path(source)
    check_private_file(path)
    with open(path, encoding="utf-8", errors="replace") as f:
        return checked_tree_cap(f.readline(CAP_LINE_MAX), str(path))


def checked_tree_cap(text: str, source: str) -> str:
    """``text`` as a readable tree's cap, or a usage error that names where
    it came from but does not quote it."""
    from ..mutable import SlotReadCap, SlotWriteCap, parse_slot_cap

    try:
        cap = parse_slot_cap(text.strip())
    except CapError:
        raise UsageError(
            f"{source}: not a tree's cap (gridfs:ssk:... or gridfs:ssk-ro:...)"
        ) from None
    if not isinstance(cap, SlotWriteCap | SlotReadCap):
        raise UsageError(f"{source}: a verify cap cannot be mounted")
    return cap.to_string()


def options_without_cap_file(text: str) -> str:
    """The -o options for the daemon: the cap comes through its stdin instead."""
    return ",".join(o for o in (text or "").split(",") if o and not o.startswith("cap_file="))


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount, then wait for the daemon to drain or persist its queue and
    exit, so that the tree can be mounted again at once."""
    from gridfs_daemon.main import unmount

    mountpoint: Path = args.mountpoint.absolute()
    if not is_mounted(mountpoint):
        raise UsageError(f"{mountpoint} is not a gridfs mount")
    daemon = mount_daemon(mountpoint)
    unmount(mountpoint)
    if daemon is not None:
        wait_for_daemon(*daemon, progress=sys.stderr.isatty())
    print(f"unmounted {mountpoint}")
    return 0


def mount_daemon(mountpoint: Path) -> tuple[int, Path] | None:
    """(pid, queue directory) of the daemon serving ``mountpoint``: the
    process holding a tree's ``mount.lock`` that names it (the lock's first
    line is ``PID MOUNTPOINT``; see gridfs_daemon.main), whatever its node."""
    targets = {str(mountpoint), os.path.realpath(mountpoint)}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if b"gridfs" not in (proc / "cmdline").read_bytes():
                continue
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if not link.endswith("/mount.lock"):
                    continue
                with open(link) as f:
                    pid, _, where = f.readline().rstrip("\n").partition(" ")
                if pid == proc.name and {where, os.path.realpath(where)} & targets:
                    return int(pid), Path(link).parent
        except OSError:  # gone meanwhile, or not ours to look at
            continue
    return None


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _queued(queue: Path) -> int | None:
    from ..workqueue import backlog

    counts = backlog(queue)
    return None if counts is None else counts[0]


def wait_for_daemon(pid: int, queue: Path, progress: bool) -> None:
    """Wait until daemon ``pid`` has exited (it drains its queue for up to
    its drain_timeout, then journals the rest); with ``progress``, say on
    stderr how many queued changes it is still uploading."""
    shown: int | None = None
    next_line = 0.0
    while _running(pid):
        if progress and time.monotonic() >= next_line:
            left = _queued(queue)
            if left and left != shown:
                print(f"uploading {left} queued changes…", file=sys.stderr, flush=True)
                shown = left
            next_line = time.monotonic() + 1.0
        time.sleep(0.05)


async def control_call(
    node: NodeDir, method: str, args: dict[str, Any] | None = None, timeout: float = 3600
) -> list[Any]:
    """Call ``method`` on every running mount of ``node``; their answers."""
    answers = []
    for sock in sorted((node.path / "run").glob("*.sock")):
        try:
            with unix_socket_path(sock) as name:
                stream = await trio.open_unix_socket(name)
        except OSError:
            continue  # a mount that died without cleaning up
        rpc = RpcClient(stream, timeout)
        async with trio.open_nursery() as nursery:
            await nursery.start(rpc.run)
            answers.append(await rpc.call(method, args or {}))
            await rpc.aclose()
    return answers


def running_mounts(node: NodeDir) -> list[Path]:
    return [p for p in (node.path / "run").glob("*.sock") if _alive(p)]


def _alive(sock: Path) -> bool:
    try:
        os.kill(int(sock.stem), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


async def gather_status(node: NodeDir, grid: GridClient | None) -> dict[str, Any]:
    """Everything ``gridfs status`` shows, as one JSON-able map: the servers
    (when ``grid`` is given), queue backlogs, running mounts, maintenance."""
    servers: list[dict[str, Any]] = []
    if grid is not None:
        await grid.wait_for_servers()
        stats = await grid.broker.stats()
        for s in sorted(grid.broker.servers.values(), key=lambda s: s.name):
            st = stats.get(s.node_id, "?")
            row: dict[str, Any] = {"name": s.name, "connected": s.connected}
            servers.append(row | (st if isinstance(st, dict) else {"error": st}))
    mounts = []
    if running_mounts(node):
        status = await control_call(node, "ctl_status")
        memory = await control_call(node, "ctl_memory")
        mounts = [{**st, "memory": mem} for st, mem in zip(status, memory, strict=False)]
    return {
        "servers": servers,
        "queues": [{"queue": q, "pending": p, "failing": f} for q, p, f in queue_backlog(node)],
        "mounts": mounts,
        "maintenance": load_record(node),
        "snapshots": unless_disk_full(lambda: snapshot_counts(node), dict[str, int]()),
        "local": snapshot_usage(node.path, node.config().local_limit_bytes()),
    }


def unless_disk_full(read: Callable[[], T], default: T) -> T:
    """``read()``, or ``default`` when a full or failing local disk keeps a
    database from opening (status shows the problem instead)."""
    try:
        return read()
    except (OSError, sqlite3.Error) as e:
        if disk_errno(e) is None:
            raise
        return default


def show_local(local: dict[str, Any], indent: str) -> None:
    """The node's local space (gridfs.localspace): usage, then any problem."""
    if local:
        print(indent + describe_local(local))
        if local["problem"]:
            print(indent + local["problem"])


def snapshot_counts(node: NodeDir) -> dict[str, int]:
    """Snapshots in the node's log, by tree (its storage index, shortened)."""
    from ..client.snapshots import SnapshotLog

    with SnapshotLog(node) as log:
        return {key[:8]: len(log.versions(key)) for key in log.trees()}


def cmd_status(args: argparse.Namespace) -> int:
    node = NodeDir(resolve_node_dir(args.node))
    node.config()

    async def main() -> dict[str, Any]:
        if not args.servers:
            return await gather_status(node, None)
        async with open_grid(node) as grid:
            return await gather_status(node, grid)

    status = trio.run(main)
    if args.json:
        print(json.dumps(status))
        return 0
    if args.servers:
        show_servers(status["servers"])
    for q in status["queues"]:
        note = f" ({q['failing']} failing; see `gridfs queue`)" if q["failing"] else ""
        print(f"queue {q['queue'][:8]}: {q['pending']} pending steps{note}")
    show_maintenance(status["maintenance"])
    for key, count in status["snapshots"].items():
        print(f"tree {key}: {count} snapshots kept")
    if not status["mounts"]:
        print(f"no mount of {node.path} is running")
        show_local(status["local"], "")
    for st in status["mounts"]:
        print(f"{st['mountpoint']}: tree {st['tree']}, pid {st['pid']}, {st['servers']} servers")
        print(
            f"  queue: {st['queue']} pending steps"
            + (f"; last error: {st['last_error']}" if st["last_error"] else "")
        )
        for failed in st["failed_steps"]:
            print(f"  failing: {failed}")
        show_local(st.get("local", {}), "  ")
        show_transfers(st.get("transfers", {}))
        mem = st["memory"]
        print("  memory: " + ", ".join(f"{k} {v // 1024} KiB" for k, v in sorted(mem.items())))
    return 0


def show_maintenance(record: dict[str, Any]) -> None:
    """The last lease renewal, unlink and background check, as the daemon left them."""
    now = time.time()

    def ago(entry: dict[str, Any]) -> str:
        return f"{max(0, now - float(entry.get('at', now))) / 3600:.1f} h ago"

    if "renew" in record:
        r = record["renew"]
        print(
            f"leases renewed {ago(r)}: {r.get('leases', 0)} leases on {r.get('objects', 0)} "
            f"objects at {r.get('servers', 0)} servers"
            + (f", {r['unheld']} objects held by no server" if r.get("unheld") else "")
        )
    if "unlink" in record:
        u = record["unlink"]
        print(f"last unlink {ago(u)}: {u.get('objects', 0)} objects, {u.get('freed', 0)} freed")
    if "snapshots" in record:
        s = record["snapshots"]
        print(
            f"snapshots at the last walk {ago(s)}: {s.get('snapshots', 0)} versions of "
            f"{s.get('trees', 0)} trees; {s.get('held', 0)} objects held only by snapshots"
        )
    if "check" in record:
        c = record["check"]
        print(
            f"background check {ago(c)}: {c.get('files', 0)} files, {c.get('healthy', 0)} "
            f"healthy, {c.get('repaired', 0)} repaired, {c.get('unrecoverable', 0)} "
            f"unrecoverable, {c.get('failed', 0)} failed"
        )


def show_transfers(transfers: dict[str, Any]) -> None:
    for t in transfers.get("active", []):
        pct = 100 * t["done"] // t["size"] if t["size"] else 100
        print(
            f"  {t['kind']} {t['name']}: {pct}% of {t['size'] >> 10} KiB "
            f"at {t['rate'] / 1e6:.1f} MB/s"
        )
    recent = transfers.get("recent", [])
    if recent:
        t = recent[0]
        print(
            f"  last {t['kind']}: {t['name']} {t['size'] >> 10} KiB at {t['rate'] / 1e6:.1f} MB/s"
            f"  (totals: up {transfers.get('uploaded_bytes', 0) >> 20} MiB, "
            f"down {transfers.get('downloaded_bytes', 0) >> 20} MiB)"
        )


def show_servers(rows: list[dict[str, Any]]) -> None:
    print(f"{len(rows)} storage servers known:")
    for st in rows:
        if "error" not in st:
            used, avail = st.get("used", 0) >> 20, st.get("available", 0) >> 20
            print(
                f"  {st['name']:40} connected  {st.get('shares', 0)} shares, "
                f"used {used} MiB, available {avail} MiB"
            )
        else:
            state = "connected" if st["connected"] else "unreachable"
            print(f"  {st['name']:40} {state}: {st['error']}")


def queue_backlog(node: NodeDir) -> list[tuple[str, int, int]]:
    """(queue, pending steps, failing steps) of each tree, read from the journals."""
    from ..workqueue import backlog, queue_directories

    out = []
    for qdir in queue_directories(node.path):
        counts = backlog(qdir)
        if counts is not None:
            out.append((qdir.name, *counts))
    return out


HELPER = """#!/bin/sh
# mount.gridfs SOURCE MOUNTPOINT [-o OPTIONS]: called by mount -t gridfs.
# Installed by `gridfs install-mount-helper`.
src="$1"; mp="$2"; shift 2
opts=""
while [ $# -gt 0 ]; do
    case "$1" in
        -o) opts="$2"; shift 2 ;;
        -o*) opts="${1#-o}"; shift ;;
        *) shift ;;
    esac
done
exec "{gridfs}" mount "$mp" "$src" -o "$opts"
"""


def cmd_install_helper(args: argparse.Namespace) -> int:
    gridfs = Path(sys.executable).parent / "gridfs"
    if not gridfs.exists():
        raise UsageError(f"cannot find the gridfs command next to {sys.executable}")
    text = HELPER.replace("{gridfs}", str(gridfs))
    path: Path = args.path
    if path.exists() and path.read_text() == text:
        print(f"{path} is up to date")
        return 0
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
    print(f"installed {path}")
    return 0
