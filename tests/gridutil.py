"""An in-process grid for tests: real TLS storage servers on loopback, real disks.

Every server and client is a member of one test grid (:data:`MEMBERS`, a
grid key made once per test process).  Every server runs
:func:`gridfs.node.run_storage` in its own cancel scope, so
a test can kill one (its listener and connections close, as when the process
dies) and start it again on the same directory and port.  Each server's
sessions are :class:`GridSession`, which logs every ``read`` and, when the
test says so, tampers with the answers: a malicious server.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from gridfs.caps import LiteralCap, ReadCap, b32encode
from gridfs.client.broker import CALL_TIMEOUT, StorageBroker
from gridfs.client.download import Downloader, open_downloader
from gridfs.client.upload import Progress, UploadParams, UploadReport, upload_file
from gridfs.codec import params_for_size
from gridfs.config import NodeConfig, NodeDir
from gridfs.errors import unwrap
from gridfs.hashes import storage_index
from gridfs.membership import GridKey, Member, write_membership
from gridfs.net.identity import NodeAddress, NodeKey
from gridfs.net.tls import Credentials
from gridfs.node import run_storage
from gridfs.offline import file_key
from gridfs.storage.service import StorageSession
from gridfs.storage.store import ShareStore


class Membership:
    """A grid key for tests, and members of its grid made on request."""

    def __init__(self) -> None:
        self.key = GridKey.generate()
        self.ca = self.key.ca_certificate()
        self._count = 0
        self._cached: dict[str, Credentials] = {}

    def enroll(self, node: NodeDir, kind: str, name: str | None = None) -> Member:
        """Make an existing node directory a member of the test grid."""
        self._count += 1
        name = name or f"{kind}-{self._count}"
        key = node.key()
        write_membership(node.private, self.ca, self.key.issue(key.public_bytes, name, kind))
        return Member(key.node_id, name, kind)

    def credentials(
        self, kind: str = "client", name: str | None = None, private: Path | None = None
    ) -> Credentials:
        """A new member's credentials, its key and certificates written in
        ``private`` (a new temporary directory by default)."""
        private = private or Path(tempfile.mkdtemp(prefix="gridfs-member-"))
        key = NodeKey.generate()
        key.write(private)
        self._count += 1
        cert = self.key.issue(key.public_bytes, name or f"{kind}-{self._count}", kind)
        write_membership(private, self.ca, cert)
        return Credentials.load(private)

    def client(self) -> Credentials:
        """The same client member's credentials, for every broker that does
        not ask for its own."""
        if "client" not in self._cached:
            self._cached["client"] = self.credentials("client", "test-client")
        return self._cached["client"]


MEMBERS = Membership()


TamperMode = Literal["flip", "swap", "truncate", "garbage", "hang"]
TAMPER_MODES: tuple[TamperMode, ...] = ("flip", "swap", "truncate", "garbage", "hang")


@dataclass(frozen=True)
class Tamper:
    """How a malicious server answers ``read``."""

    mode: TamperMode
    heads: bool = False
    """Tamper with head reads (offset 0) too; by default only with records,
    so the share is accepted first and its blocks are what is wrong."""


@dataclass(frozen=True)
class ReadCall:
    si: bytes
    sharenum: int
    offset: int
    length: int


@dataclass
class Behaviour:
    """What one server does, changeable while it runs."""

    tamper: Tamper | None = None
    crash_on_kill: bool = False
    """When killed, leave uploads in progress on disk (a crash, not a shutdown)."""
    reads: list[ReadCall] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    """How many chunks each write request carried."""


class StorageNode:
    """One storage server of a :class:`Grid`."""

    def __init__(self, grid: Grid, index: int, node_dir: NodeDir) -> None:
        self.grid = grid
        self.index = index
        self.dir = node_dir
        self.behaviour = Behaviour()
        self.address: NodeAddress | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._stopped.set()

    @property
    def running(self) -> bool:
        return not self._stopped.is_set()

    @property
    def where(self) -> str:
        """``host:port``, as it appears in server names in error messages."""
        assert self.address is not None
        return f"{self.address.host}:{self.address.port}"

    def share_dir(self, si: bytes) -> Path:
        name = b32encode(si)
        return self.dir.storage_path / "shares" / name[:2] / name

    def shares(self, si: bytes) -> set[int]:
        """Closed shares of ``si`` on disk (read directly: works while stopped)."""
        d = self.share_dir(si)
        return {int(p.name) for p in d.iterdir()} if d.exists() else set()

    def all_shares(self) -> list[Path]:
        return sorted(p for p in (self.dir.storage_path / "shares").rglob("*") if p.is_file())

    def has_slot(self, si: bytes) -> bool:
        """Whether the slot ``si`` is stored here (read directly: works while stopped)."""
        name = b32encode(si)
        return (self.dir.storage_path / "slots" / name[:2] / name).exists()

    def incoming(self) -> list[Path]:
        """Files of uploads in progress."""
        root = self.dir.storage_path / "incoming"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def record_reads(self, si: bytes) -> list[ReadCall]:
        return [r for r in self.behaviour.reads if r.si == si and r.offset > 0]

    async def start(self) -> NodeAddress:
        assert not self.running, f"server {self.index} is already running"
        self._stopped = trio.Event()
        address: NodeAddress = await self.grid.nursery.start(self._serve)
        self.address = address
        return address

    async def _serve(self, *, task_status: trio.TaskStatus[NodeAddress]) -> None:
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                factory = functools.partial(self.grid.session_class, node=self)
                await run_storage(self.dir, session_factory=factory, task_status=task_status)
        finally:
            self._stopped.set()

    def kill_soon(self) -> None:
        """Kill the server (from synchronous code); it is gone at the next checkpoint."""
        assert self._scope is not None
        self._scope.cancel()

    async def kill(self) -> None:
        self.kill_soon()
        await self._stopped.wait()

    async def restart(self) -> NodeAddress:
        if self.running:
            await self.kill()
        address = await self.start()
        assert address == self.address
        return address


class GridSession(StorageSession):
    """A storage session that logs reads and writes, and tampers with reads
    on request."""

    def __init__(self, store: ShareStore, idle_timeout: float, *, node: StorageNode) -> None:
        super().__init__(store, idle_timeout)
        self.node = node

    async def rpc_write(self, si: bytes, sharenum: int, chunks: list[tuple[int, bytes]]) -> None:
        self.node.behaviour.writes.append(len(chunks))
        await super().rpc_write(si, sharenum, chunks)

    async def rpc_read(self, si: bytes, sharenum: int, offset: int, length: int) -> Any:
        behaviour = self.node.behaviour
        behaviour.reads.append(ReadCall(si, sharenum, offset, length))
        data = await super().rpc_read(si, sharenum, offset, length)
        tamper = behaviour.tamper
        if tamper is None or (offset == 0 and not tamper.heads):
            return data
        if tamper.mode == "flip":
            flipped = bytearray(data)
            flipped[len(flipped) // 2] ^= 0x10
            return bytes(flipped)
        if tamper.mode == "swap":
            return self.node.grid.other_share_bytes(si, sharenum, offset, length)
        if tamper.mode == "truncate":
            return data[:-1]
        if tamper.mode == "garbage":
            return {"not": ["the", "bytes"], "you": 1}
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    def abort_all(self) -> None:
        if self.node.behaviour.crash_on_kill:
            self.buckets.clear()  # the process died: nothing is cleaned up
            return
        super().abort_all()


class Grid:
    """Storage servers under ``root``, running in ``nursery``."""

    def __init__(
        self, nursery: trio.Nursery, root: Path, session_class: type[GridSession] | None = None
    ) -> None:
        self.nursery = nursery
        self.root = root
        self.nodes: list[StorageNode] = []
        self.session_class = session_class or GridSession
        """What each server's connections are served by (a subclass: a hostile server)."""

    async def add_servers(
        self, count: int, reserved_space: int = 0, **settings: Any
    ) -> list[StorageNode]:
        """``settings`` are more NodeConfig fields (e.g. ``lease_duration``)."""
        added = []
        for _ in range(count):
            i = len(self.nodes)
            node_dir = NodeDir(self.root / f"s{i}")
            config = NodeConfig("storage", f"s{i}", reserved_space=reserved_space, **settings)
            node_dir.create(config)
            MEMBERS.enroll(node_dir, "storage", f"s{i}")
            node = StorageNode(self, i, node_dir)
            self.nodes.append(node)
            await node.start()
            added.append(node)
        return added

    @property
    def addresses(self) -> list[NodeAddress]:
        return [n.address for n in self.nodes if n.address is not None]

    def holder(self, si: bytes, sharenum: int) -> StorageNode:
        """The server holding share ``sharenum`` of ``si``."""
        (node,) = [n for n in self.nodes if sharenum in n.shares(si)]
        return node

    def other_share_bytes(self, si: bytes, sharenum: int, offset: int, length: int) -> bytes:
        """The same bytes of another share of the same file, from any server."""
        for node in self.nodes:
            for other in sorted(node.shares(si) - {sharenum}):
                path = node.share_dir(si) / str(other)
                with open(path, "rb") as f:
                    return os.pread(f.fileno(), length, offset)
        raise AssertionError("no other share to swap in")

    def incoming(self) -> list[Path]:
        return [p for n in self.nodes for p in n.incoming()]

    def all_shares(self) -> list[Path]:
        return [p for n in self.nodes for p in n.all_shares()]

    async def restart_all(self) -> None:
        for node in self.nodes:
            await node.restart()


@contextlib.asynccontextmanager
async def open_grid(
    root: Path,
    servers: int = 10,
    reserved_space: int = 0,
    session_class: type[GridSession] | None = None,
    **settings: Any,
) -> AsyncIterator[Grid]:
    """A grid of ``servers`` storage servers; all of them stop on exit.
    ``settings`` are more NodeConfig fields for every server."""
    async with trio.open_nursery() as nursery:
        grid = Grid(nursery, root, session_class)
        await grid.add_servers(servers, reserved_space, **settings)
        try:
            yield grid
        finally:
            nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def open_broker(
    addresses: list[NodeAddress],
    call_timeout: float = CALL_TIMEOUT,
    credentials: Credentials | None = None,
) -> AsyncIterator[StorageBroker]:
    """A client's broker over a static server list; its connections close on
    exit.  It is the test grid's client member unless ``credentials`` say
    otherwise."""
    async with trio.open_nursery() as nursery:
        broker = StorageBroker(
            nursery, credentials or MEMBERS.client(), static=addresses, call_timeout=call_timeout
        )
        try:
            yield broker
        finally:
            nursery.cancel_scope.cancel()


def write_temp(directory: Path, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return Path(name)


def predicted_storage_index(path: Path, params: UploadParams, secret: bytes) -> bytes:
    """The storage index an upload of ``path`` will use (convergent encryption)."""
    codec = params_for_size(params.k, params.n, params.segment_size, path.stat().st_size)
    return storage_index(file_key(path, secret, codec.serialize()))


async def upload_bytes(
    broker: StorageBroker,
    data: bytes,
    directory: Path,
    params: UploadParams,
    secret: bytes,
    progress: Progress | None = None,
) -> UploadReport:
    path = write_temp(directory, data)
    try:
        return await upload_file(broker, path, params, secret, progress)
    finally:
        path.unlink()


async def download_bytes(broker: StorageBroker, cap: LiteralCap | ReadCap) -> bytes:
    """The whole file; raises the one error that matters, not an exception group."""
    if isinstance(cap, LiteralCap):
        return cap.data
    try:
        async with open_downloader(broker, cap) as downloader:
            return await downloader.read(0, cap.size)
    except BaseExceptionGroup as group:
        raise unwrap(group) from None


async def wait_located(downloader: Downloader, shares: int) -> None:
    """Wait until ``shares`` shares were found (accepted or reported bad), so
    that which share a read uses no longer depends on which answered first."""
    while sum(len(s) for s in downloader.sources.values()) + len(downloader.problems) < shares:
        await trio.sleep(0.01)
