"""Which storage servers exist, and connections to them.

Servers come from the introducer (a long-poll subscription that survives
introducer restarts) and from the static ``servers`` list of the config.
Each :class:`Server` connects on first use, keeps its connection open, and
reconnects with backoff after it breaks.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from ..announce import Announcement
from ..errors import FormatError, GridError, unwrap
from ..hashes import lease_secrets, server_permutation
from ..net import tls
from ..net.identity import NodeAddress
from ..net.rpc import ConnectionLost, RpcClient

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 30.0
POLL_WAIT = 30


class ServerUnavailable(ConnectionLost):
    """A server cannot be reached right now."""


class Server:
    """One storage server and our (lazily opened, re-opened) connection to it."""

    def __init__(
        self,
        address: NodeAddress,
        nursery: trio.Nursery,
        call_timeout: float = CALL_TIMEOUT,
        lease_secret: bytes = b"",
    ) -> None:
        self.address = address
        self.lease_secret = lease_secret or os.urandom(32)
        self.announcement: Announcement | None = None
        self.call_timeout = call_timeout
        self._nursery = nursery
        self._rpc: RpcClient | None = None
        self._lock = trio.Lock()
        self._failures = 0
        self._retry_at = 0.0

    @property
    def node_id(self) -> bytes:
        return self.address.node_id

    @property
    def name(self) -> str:
        nick = self.announcement.nickname if self.announcement else ""
        return f"{nick or self.address.short_id} ({self.address.host}:{self.address.port})"

    @property
    def connected(self) -> bool:
        return self._rpc is not None and not self._rpc.closed

    async def connect(self) -> RpcClient:
        async with self._lock:
            if self._rpc is not None and not self._rpc.closed:
                return self._rpc
            now = trio.current_time()
            if now < self._retry_at:
                raise ServerUnavailable(f"{self.name}: unreachable, retrying later")
            try:
                stream = await tls.connect(self.address, CONNECT_TIMEOUT)
                rpc = RpcClient(stream, self.call_timeout)
                await self._nursery.start(rpc.run)
            except GridError as e:
                self._failures += 1
                self._retry_at = now + min(0.5 * 2 ** (self._failures - 1), 30.0)
                raise ServerUnavailable(f"{self.name}: {e}") from None
            self._failures = 0
            self._rpc = rpc
            return rpc

    async def call(self, method: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        rpc = await self.connect()
        return await rpc.call(method, args, timeout)

    def lease_secrets(self, storage_index: bytes) -> tuple[bytes, bytes]:
        """Our (renew, cancel) secrets for ``storage_index`` on this server."""
        return lease_secrets(self.lease_secret, storage_index, self.node_id)

    def lease_args(self, storage_index: bytes) -> dict[str, bytes]:
        """The same, as the request fields that carry them."""
        renew, cancel = self.lease_secrets(storage_index)
        return {"renew_secret": renew, "cancel_secret": cancel}

    async def disconnect(self) -> None:
        if self._rpc is not None:
            await self._rpc.aclose("disconnected")


class StorageBroker:
    """The set of known storage servers.  Lives inside the caller's nursery."""

    def __init__(
        self,
        nursery: trio.Nursery,
        introducer: NodeAddress | None = None,
        static: list[NodeAddress] | None = None,
        call_timeout: float = CALL_TIMEOUT,
        lease_secret: bytes = b"",
    ) -> None:
        """``lease_secret`` is the node's (a random one, good for this process
        only, if none is given)."""
        self._nursery = nursery
        self.introducer = introducer
        self.call_timeout = call_timeout
        self.lease_secret = lease_secret or os.urandom(32)
        self.servers: dict[bytes, Server] = {}
        self._changed = trio.Event()
        self.introducer_connected = False
        self.introduced = trio.Event()
        """Set once the introducer's first peer list arrived (or at once without one)."""
        if introducer is None:
            self.introduced.set()
        for address in static or []:
            self._add(address)
        if introducer is not None:
            nursery.start_soon(self._subscribe, introducer)

    def _add(self, address: NodeAddress, ann: Announcement | None = None) -> Server:
        server = self.servers.get(address.node_id)
        if server is None or server.address != address:
            server = Server(address, self._nursery, self.call_timeout, self.lease_secret)
            self.servers[address.node_id] = server
        if ann is not None:
            server.announcement = ann
        self._changed.set()
        self._changed = trio.Event()
        return server

    async def _subscribe(self, introducer: NodeAddress) -> None:
        version, backoff = 0, 0.5
        while True:
            try:
                stream = await tls.connect(introducer, CONNECT_TIMEOUT)
                rpc = RpcClient(stream, POLL_WAIT + 15.0)
                async with trio.open_nursery() as nursery:
                    await nursery.start(rpc.run)
                    self.introducer_connected, backoff = True, 0.5
                    while True:
                        reply = await rpc.call("get_peers", {"after": version, "wait": POLL_WAIT})
                        version = self._apply(reply)
                        self.introduced.set()
            except* GridError as group:  # (lost inside the nursery: as a group)
                log.info("introducer %s: %s", introducer, unwrap(group))
            self.introducer_connected, version = False, 0
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    def _apply(self, reply: Any) -> int:
        if not isinstance(reply, dict) or type(reply.get("version")) is not int:
            raise ConnectionLost("introducer sent a malformed peer list")
        for item in reply.get("announcements", []):
            try:
                ann = Announcement.verify(item[0], item[1])
            except (FormatError, IndexError, TypeError, KeyError):
                log.warning("ignoring a bad announcement from the introducer")
                continue
            self._add(ann.address, ann)
        return int(reply["version"])

    async def wait_for_servers(self, count: int, timeout: float) -> int:
        """Wait until ``count`` servers are known; return how many are."""
        with trio.move_on_after(timeout):
            while len(self.servers) < count:
                await self._changed.wait()
        return len(self.servers)

    async def ready(self, timeout: float) -> int:
        """Wait for the introducer's first list of servers; return how many are known."""
        with trio.move_on_after(timeout):
            await self.introduced.wait()
        return len(self.servers)

    def permuted(self, storage_index: bytes) -> list[Server]:
        """Servers in this file's own order: where its shares go and are sought."""
        return sorted(
            self.servers.values(), key=lambda s: server_permutation(storage_index, s.node_id)
        )

    async def stats(self) -> dict[bytes, dict[str, int] | str]:
        """Capacity of every server, or why it could not be asked."""
        out: dict[bytes, dict[str, int] | str] = {}

        async def ask(server: Server) -> None:
            try:
                out[server.node_id] = await server.call("stats", {}, timeout=10.0)
            except GridError as e:
                out[server.node_id] = str(e)

        async with trio.open_nursery() as nursery:
            for server in list(self.servers.values()):
                nursery.start_soon(ask, server)
        return out
