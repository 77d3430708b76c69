"""The mount daemon: grid client, work queue flusher, FUSE session, control socket.

Everything lives in one trio nursery for the life of the mount.  Unmounting
(umount, fusermount3 -u, SIGTERM, ``gridfs umount``) ends the FUSE session,
then the queue is drained for up to ``drain_timeout`` seconds; whatever is
left stays journaled and is uploaded by the next mount or ``gridfs queue
flush``.  After ``kill -9`` the next mount resumes the queue.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from gridfs.caps import log_name
from gridfs.cli.util import parse_size
from gridfs.client.grid import open_grid
from gridfs.client.keeper import load_record
from gridfs.client.maintain import maintain_forever
from gridfs.client.session import TreeSession
from gridfs.config import NodeDir
from gridfs.errors import GridError, UsageError
from gridfs.localspace import WAIT, WATCH, LocalDiskError, LocalSpace, as_grid_error, disk_errno
from gridfs.malloc import trim_when_idle
from gridfs.workqueue import CLEANUP, PATH

from . import falloc
from .control import serve_control
from .fs import GridOperations
from .idmap import IdMap
from .snapshots import SnapshotView
from .view import View

log = logging.getLogger(__name__)
READ_AHEAD_KB = 1024
"""Kernel readahead for the mount (its default is 128 KiB)."""
BATCH_QUIET = 0.2
"""The background flush waits until changes stop coming for this many seconds..."""
BATCH_MAX = 2.0
"""...but no longer than this after the first change it will carry."""
EXIT_WAIT = 45.0
"""A new mount waits this long for the last daemon of its tree, unmounted but
still draining its queue (less than gridfs.cli.mount.MOUNT_TIMEOUT)."""


FSTAB_WORDS = frozenset(
    [
        "defaults",
        "rw",
        "auto",
        "noauto",
        "user",
        "users",
        "nouser",
        "owner",
        "group",
        "_netdev",
        "nofail",
        "exec",
        "noexec",
    ]
)


FLAGS = frozenset(
    [
        "sync",
        "allow_other",
        "nomaintain",
        "cache_scans",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "ro",
        "show_snapshots",
        "noatime",
        "relatime",
    ]
)
"""Options that are on when named and take no value."""


@dataclass
class MountOptions:
    sync: bool = False
    """fsync() returns only once the file and its directory change are on the grid"""
    allow_other: bool = False
    refresh: float = 10.0
    """seconds between checks for other writers' changes"""
    drain_timeout: float = 60.0
    maintain: bool = True
    """renew leases and check/repair in the background (``-o nomaintain``: off)"""
    cache_size: int | None = None
    """bytes of the node's disk the mount may use for staging, queue and
    segment cache together (gridfs.localspace; None: the node's
    ``local_limit``)"""
    space_wait: float = WAIT
    """seconds a writer short of local space waits for the queue to make
    progress before it gets ENOSPC"""
    cache_scans: bool = False
    """also keep on disk large files read sequentially (SegmentCache.is_scan)"""
    suid: bool = False
    """honour setuid/setgid bits of files on the mount (``-o suid``; default
    nosuid: anyone who can write the tree could plant a setuid program)"""
    dev: bool = False
    """honour device files (``-o dev``; default nodev)"""
    readonly: bool = False
    """refuse every change with EROFS (``-o ro``; always for a read-only cap)"""
    show_snapshots: bool = False
    """list ``.snapshots`` in the top directory (it is reachable by name anyway)"""
    atime: bool = True
    """reads move the atime as ``relatime`` does (``-o noatime``: never)"""
    uidmap: IdMap = field(default_factory=IdMap)
    """stored user ids shown as other local ones (``-o uidmap=S:L[:N]``, repeatable)"""
    gidmap: IdMap = field(default_factory=IdMap)

    @property
    def idmaps(self) -> tuple[IdMap, IdMap]:
        return self.uidmap, self.gidmap

    def fuse_options(self) -> set[str]:
        """The mount options given to libfuse (and so to mount(2) or
        fusermount3): nosuid and nodev unless opted out, for root too."""
        out = set(pyfuse3.default_options) | {"fsname=gridfs", "subtype=gridfs"}
        # The kernel checks permissions against the owners and modes the
        # daemon reports (daemon/perms.py does what it leaves to us).
        out.add("default_permissions")
        out.add("suid" if self.suid else "nosuid")
        out.add("dev" if self.dev else "nodev")
        if self.allow_other:
            out.add("allow_other")
        if self.readonly:
            out.add("ro")
        return out

    @classmethod
    def parse(cls, text: str) -> tuple[MountOptions, dict[str, str]]:
        """``sync,refresh=5,node=DIR`` → options, and the rest (node=, defaults…)."""
        opts, rest = cls(), {}
        for item in filter(None, (text or "").split(",")):
            key, eq, value = item.partition("=")
            if eq and key in FLAGS:  # (-o cache_scans=no would have turned it on)
                raise UsageError(f"-o {key} takes no value: -o {key}, or leave it out")
            if key == "sync":
                opts.sync = True
            elif key == "allow_other":
                opts.allow_other = True
            elif key == "nomaintain":
                opts.maintain = False
            elif key == "cache_scans":
                opts.cache_scans = True
            elif key == "ro":
                opts.readonly = True
            elif key == "show_snapshots":
                opts.show_snapshots = True
            elif key in ("noatime", "relatime"):
                opts.atime = key == "relatime"
            elif key in ("suid", "nosuid", "dev", "nodev"):
                setattr(opts, key.removeprefix("no"), not key.startswith("no"))
            elif key == "cache_size":
                try:
                    opts.cache_size = parse_size(value)
                except argparse.ArgumentTypeError:
                    opts.cache_size = 0
                if opts.cache_size < 1:
                    raise UsageError(
                        f"-o cache_size= needs a size (e.g. 512M), not {value!r}"
                    ) from None
            elif key in ("refresh", "drain_timeout", "space_wait"):
                try:
                    setattr(opts, key, float(value))
                except ValueError:
                    raise UsageError(f"-o {key}= needs a number of seconds") from None
            elif key in ("uidmap", "gidmap"):
                setattr(opts, key, getattr(opts, key).extended(key, value))
            elif key in ("node", "alias", "cap_file"):
                rest[key] = value
            elif key in FSTAB_WORDS:
                continue  # fstab words the kernel or mount(8) handle
            else:
                raise UsageError(f"unknown mount option {key!r}")
        return opts, rest


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) we are ready or stopping; no-op elsewhere."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


class MountDaemon:
    def __init__(self, node: NodeDir, tree: str, mountpoint: Path, options: MountOptions) -> None:
        """``tree`` is an alias or the tree's cap (handed over privately: see
        gridfs.cli.mount); only :attr:`label` is ever shown."""
        self.node = node
        self.tree = tree
        self.label = log_name(tree) if tree.startswith("gridfs:") else tree
        self.mountpoint = Path(mountpoint).absolute()
        self.options = options
        self.session: TreeSession | None = None
        self.view: View | None = None
        self.space: LocalSpace | None = None
        self.last_error: str | None = None
        self.flushed = 0
        self.failed_flushes = 0
        self._kicked = trio.Event()
        self._capacity = (1 << 40, 1 << 40)
        self._terminated = False

    # -- the queue in the background -------------------------------------------
    def kick(self) -> None:
        self._kicked.set()

    async def flush_queue(self, through: int = CLEANUP) -> None:
        assert self.session is not None and self.view is not None
        assert self.space is not None
        try:
            async with self.view.flushing:
                await self.session.queue.flush(self.session, through=through)
            self.flushed += 1
            self.last_error = None
            await self.view.rebuild()
        except Exception as e:  # a full disk: the flusher tries again when it has room
            if disk_errno(e) is None:
                raise
            self.space.note(e)
            raise as_grid_error(e) from None
        self.space.ok()
        self.space.changed()  # (tempfiles gone: waiting writers measure again)

    async def wait_synced(self) -> None:
        """For -o sync and gridfs queue flush: return once the grid has every
        change (giving up old leases can wait for the background flush)."""
        await self.flush_queue(through=PATH)
        if len(self.session.queue):  # type: ignore[union-attr]
            self.kick()

    async def gather(self) -> None:
        """Wait for a change, then for the burst it starts to end: until no
        change came for BATCH_QUIET seconds, at most BATCH_MAX after the first.
        One flush then commits the burst as one batch (each commit rewrites
        the directories it touches and the root)."""
        await self._kicked.wait()
        deadline = trio.current_time() + BATCH_MAX
        while True:
            self._kicked = trio.Event()
            with trio.move_on_at(min(deadline, trio.current_time() + BATCH_QUIET)):
                await self._kicked.wait()
            if not self._kicked.is_set() or trio.current_time() >= deadline:
                return

    async def flusher(self) -> None:
        backoff = 1.0
        while True:
            await self.gather()
            try:
                await self.flush_queue()
                backoff = 1.0
            except LocalDiskError as e:  # space.watch kicks it once the disk has room
                self.failed_flushes += 1
                self.last_error = str(e)
                log.error("the queue stopped: %s", e)
            except GridError as e:
                self.failed_flushes += 1
                self.last_error = str(e)
                log.error("upload failed, will retry in %.0fs: %s", backoff, e)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                self.kick()

    async def refresher(self) -> None:
        """Show other writers' changes: re-read the root now and then."""
        assert self.view is not None
        while True:
            await trio.sleep(self.options.refresh)
            try:
                if await self.view.rebuild(if_changed=True):
                    log.info("the tree changed elsewhere; view rebuilt")
            except GridError as e:
                log.warning("could not re-read the root: %s", e)

    def capacity(self) -> tuple[int, int]:
        return self._capacity

    async def capacity_poller(self) -> None:
        assert self.session is not None
        while True:
            stats = await self.session.grid.broker.stats()
            good = [s for s in stats.values() if isinstance(s, dict)]
            if good:
                k, n = self.session.grid.params.k, self.session.grid.params.n
                total = sum(int(s.get("total", 0)) for s in good) * k // n
                free = sum(int(s.get("available", 0)) for s in good) * k // n
                self._capacity = (total, free)
            await trio.sleep(30)

    def status(self) -> dict[str, Any]:
        assert self.session is not None
        queue = self.session.queue
        failed = [s.describe() for s in queue.pending() if s.last_error]
        return {
            "mountpoint": str(self.mountpoint),
            "tree": self.label,
            "pid": os.getpid(),
            "queue": len(queue),
            "failed_steps": failed[:20],
            "last_error": self.last_error or "",
            "servers": len(self.session.grid.broker.servers),
            "flushes": self.flushed,
            "failed_flushes": self.failed_flushes,
            "maintenance": load_record(self.node),
            "transfers": self.session.grid.transfers.snapshot(),
            "local": self.space.usage().to_json() if self.space else {},
        }

    # -- running ----------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_grid(self.node) as grid:
            await grid.wait_for_servers()
            self.session = TreeSession(grid, self.tree)
            lock = await self._lock_tree(self.session)
            self.space = LocalSpace(
                self.node.path,
                self.options.cache_size or self.node.config().local_limit_bytes(),
                self.options.space_wait,
                progress=lambda: int(grid.transfers.snapshot()["uploaded_bytes"]),
                on_pressure=self.kick,
            )
            self.options.readonly = self.options.readonly or not self.session.writable
            self.view = SnapshotView(self.session, self.options.show_snapshots)
            await self.view.rebuild()
            ops = GridOperations(self, self.session, self.view, self.options.sync)
            ops.readonly = self.options.readonly
            self.space.attach_cache(ops.cache)
            ops.cache.admit = self.space.admit_cache
            pyfuse3.init(ops, str(self.mountpoint), self.options.fuse_options())
            unmounted = False
            try:
                async with trio.open_nursery() as nursery:
                    ops.nursery = nursery
                    falloc.install(ops.fallocate)
                    nursery.start_soon(self._survive, self.flusher)
                    nursery.start_soon(self._survive, self.refresher)
                    nursery.start_soon(self.capacity_poller)
                    nursery.start_soon(self.space.watch, self.kick)
                    if self.options.maintain:
                        nursery.start_soon(self._survive, maintain_forever, grid)
                    nursery.start_soon(serve_control, self, self.node)
                    nursery.start_soon(self._signals)
                    nursery.start_soon(self._read_ahead, ops.initialized)
                    nursery.start_soon(trim_when_idle)
                    if len(self.session.queue):
                        log.info("resuming %d queued steps", len(self.session.queue))
                        self.kick()
                    gc.freeze()  # the set-up lives as long as the mount: no more scans of it
                    sd_notify("READY=1")
                    task_status.started()
                    await pyfuse3.main()
                    unmounted = True
                    nursery.cancel_scope.cancel()
            finally:
                sd_notify("STOPPING=1")
                # A signal ends main() with the filesystem still mounted.
                pyfuse3.close(unmount=self._terminated or not unmounted)
                await self._drain()
                lock.close()

    async def _survive(self, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a background task for the life of the mount: a full or failing
        local disk (gridfs.localspace.disk_errno) does not end the daemon;
        the task starts again a moment later."""
        assert self.space is not None
        while True:
            try:
                await task(*args)
                return
            except Exception as e:
                if disk_errno(e) is None:
                    raise
                self.space.note(e)
                await trio.sleep(WATCH)

    async def _read_ahead(self, initialized: trio.Event) -> None:
        """Let the kernel read ahead READ_AHEAD_KB on this mount, so that a
        sequential reader's requests are 1 MiB instead of 128 KiB.  Set after
        INIT, whose reply resets it; needs root (else nothing changes)."""
        await initialized.wait()
        await trio.sleep(0)  # the INIT reply is written by now
        device = mount_device(self.mountpoint)
        if device is None:
            log.info("no mount at %s in /proc/self/mountinfo: readahead not set", self.mountpoint)
            return
        knob = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
        try:
            knob.write_text(f"{READ_AHEAD_KB}\n")
        except OSError as e:
            log.info("kernel readahead stays at its default: %s: %s", knob, e.strerror)

    async def _lock_tree(self, session: TreeSession) -> Any:
        """One mount per tree and node: it owns the tree's work queue.  A
        daemon whose filesystem is unmounted but that still drains its queue
        (``fusermount3 -u M && gridfs mount M``) is waited for, at most
        EXIT_WAIT seconds; one whose mount is still there is refused."""
        f = open(session.queue.mount_lock, "a+")  # noqa: SIM115 - held while mounted
        deadline = trio.current_time() + EXIT_WAIT
        said = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                f.seek(0)
                pid, _, where = f.readline().rstrip("\n").partition(" ")
                exiting = bool(where) and mount_device(Path(where)) is None
                if not exiting or trio.current_time() > deadline:
                    f.close()
                    why = "mounted elsewhere" if not exiting else "still being unmounted"
                    at = f" (pid {pid}, {where})" if where else ""
                    raise UsageError(f"tree {self.label} of this node is {why}{at}") from None
                if not said:
                    log.info(
                        "waiting for the daemon of the last mount of %s (pid %s, unmounted "
                        "from %s) to finish its queue",
                        self.label,
                        pid,
                        where,
                    )
                    said = True
                await trio.sleep(0.1)
        f.truncate(0)
        f.write(f"{os.getpid()} {self.mountpoint}\n")
        f.flush()
        return f

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for _ in signals:
                log.info("unmounting %s", self.mountpoint)
                self._terminated = True
                pyfuse3.terminate()
                return

    async def _drain(self) -> None:
        assert self.session is not None
        if not len(self.session.queue):
            return
        with trio.move_on_after(self.options.drain_timeout):
            pause = 0.5
            while len(self.session.queue):
                try:
                    await self.session.queue.flush(self.session)
                except Exception as e:  # a server away for a moment: try again
                    if not isinstance(e, GridError) and disk_errno(e) is None:
                        raise
                    log.warning("could not finish the queue yet: %s", e)
                    await trio.sleep(pause)
                    pause = min(pause * 2, 8.0)
        try:
            self.session.queue.sync()
        except OSError as e:  # (what it holds is journaled without the fsync)
            log.warning("could not fsync the queue: %s", e)
        left = len(self.session.queue)
        if left:
            log.warning(
                "%d steps stay queued; the next mount or `gridfs queue flush` uploads them", left
            )


def mount_device(mountpoint: Path) -> str | None:
    """``MAJOR:MINOR`` of the FUSE mount at ``mountpoint`` (the name of its
    backing device info in /sys/class/bdi), read from /proc/self/mountinfo:
    a stat of the mountpoint from the daemon itself could wait for itself."""
    escaped = str(mountpoint)
    for char, code in (("\\", "\\134"), (" ", "\\040"), ("\t", "\\011"), ("\n", "\\012")):
        escaped = escaped.replace(char, code)
    device = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4] == escaped and " - fuse" in line:
                device = fields[2]  # the last one: mounted on top of any other
    return device


def unmount(mountpoint: Path) -> None:
    """Unmount via fusermount3 (works for the mounting user, root or not)."""
    import subprocess

    proc = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise GridError(proc.stderr.strip() or f"could not unmount {mountpoint}")
