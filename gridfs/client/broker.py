"""Which storage servers exist, and connections to them.

Servers come from the introducer (a long-poll subscription that survives
introducer restarts) and from the static ``servers`` list of the config.
Each :class:`Server` connects on first use, as a member of the grid (the
node's :class:`~gridfs.net.tls.Credentials`), keeps its connection open, and
reconnects with backoff after it breaks.  Only storage members of our grid
are used: a server whose certificate does not verify is unavailable, and one
on the grid's revocation list (fetched from the introducer) is left out.  If
a server or the introducer refuses *us* (revoked), :attr:`StorageBroker.refusal`
says so, and operations report that rather than a shortage of servers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import trio

from ..announce import Announcement
from ..errors import FormatError, GridError, NotMemberError, unwrap
from ..gatekeeper import Revocations, is_refusal, refused
from ..hashes import lease_secrets, server_permutation
from ..membership import RevocationList
from ..net import tls
from ..net.calls import IntroducerCalls, PeerPage, StorageCalls
from ..net.identity import NodeAddress
from ..net.rpc import ConnectionLost, RpcClient

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 10.0
IDLE_REOPEN = 240.0
"""A connection unused this long is replaced before the next call, rather
than used just as the server closes it (servers close idle connections after
300 s by default: gridfs/net/limits.py)."""
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
        credentials: tls.Credentials,
        call_timeout: float = CALL_TIMEOUT,
        lease_secret: bytes = b"",
    ) -> None:
        self.address = address
        self.credentials = credentials
        self.refusal: NotMemberError | None = None
        """set when the server refused us as a member (revoked)"""
        self.lease_secret = lease_secret or os.urandom(32)
        self.announcement: Announcement | None = None
        self.call_timeout = call_timeout
        self._nursery = nursery
        self._rpc: RpcClient | None = None
        self._lock = trio.Lock()
        self._failures = 0
        self._retry_at = 0.0
        self._in_flight = 0
        self._last_used = 0.0

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
            now = trio.current_time()
            if self._rpc is not None and not self._rpc.closed:
                if self._in_flight or now - self._last_used < IDLE_REOPEN:
                    return self._rpc
                await self._rpc.aclose("idle: replaced before the server closes it")
            if now < self._retry_at:
                raise ServerUnavailable(f"{self.name}: unreachable, retrying later")
            try:
                stream = await tls.connect(
                    self.address, self.credentials, CONNECT_TIMEOUT, kind="storage"
                )
                rpc = RpcClient(stream, self.call_timeout)
                await self._nursery.start(rpc.run)
            except GridError as e:
                self._failures += 1
                self._retry_at = now + min(0.5 * 2 ** (self._failures - 1), 30.0)
                if is_refusal(e):
                    self.refusal = refused(f"server {self.name}", e)
                raise ServerUnavailable(f"{self.name}: {e}") from None
            self._failures = 0
            self._rpc, self._last_used = rpc, now
            return rpc

    async def call(self, method: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        rpc = await self.connect()
        self._in_flight += 1
        try:
            return await rpc.call(method, args, timeout)
        finally:
            self._in_flight -= 1
            self._last_used = trio.current_time()

    @property
    def calls(self) -> StorageCalls:
        """This server's requests, typed (connecting as :meth:`call` does)."""
        return StorageCalls(self.call)

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
        credentials: tls.Credentials,
        introducer: NodeAddress | None = None,
        static: list[NodeAddress] | None = None,
        call_timeout: float = CALL_TIMEOUT,
        lease_secret: bytes = b"",
        revocations: Path | None = None,
    ) -> None:
        """``lease_secret`` is the node's (a random one, good for this process
        only, if none is given); ``revocations`` is where the node keeps the
        newest revocation list it knows (none: only in memory)."""
        self._nursery = nursery
        self.credentials = credentials
        self.revocations = Revocations(credentials, revocations)
        self.revocations.reload()
        self.revocations.listeners.append(self._forget_revoked)
        self.introducer_refusal: NotMemberError | None = None
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

    @property
    def refusal(self) -> NotMemberError | None:
        """Why the grid refuses this node, if the introducer or a server did."""
        if self.introducer_refusal is not None:
            return self.introducer_refusal
        return next((s.refusal for s in self.servers.values() if s.refusal), None)

    def _forget_revoked(self, revocations: RevocationList) -> None:
        for node in revocations.revoked & set(self.servers):
            log.info("server %s was revoked from the grid", self.servers[node].name)
            del self.servers[node]

    def _add(self, address: NodeAddress, ann: Announcement | None = None) -> Server | None:
        if self.revocations.revoked(address.node_id):
            return None
        server = self.servers.get(address.node_id)
        if server is None or server.address != address:
            server = Server(
                address, self._nursery, self.credentials, self.call_timeout, self.lease_secret
            )
            self.servers[address.node_id] = server
        if ann is not None:
            server.announcement = ann
        self._changed.set()
        self._changed = trio.Event()
        return server

    async def _subscribe(self, introducer: NodeAddress) -> None:
        backoff = 0.5
        while True:
            try:
                stream = await tls.connect(
                    introducer, self.credentials, CONNECT_TIMEOUT, kind="introducer"
                )
                rpc = RpcClient(stream, POLL_WAIT + 15.0)
                async with trio.open_nursery() as nursery:
                    await nursery.start(rpc.run)
                    self.introducer_connected, backoff = True, 0.5
                    calls = IntroducerCalls(rpc.call)
                    nursery.start_soon(self.revocations.follow, calls, POLL_WAIT)
                    await self._follow_peers(calls)
            except* GridError as group:  # (lost inside the nursery: as a group)
                error = unwrap(group)
                log.info("introducer %s: %s", introducer, error)
                if is_refusal(error):
                    self.introducer_refusal = refused("the introducer", error)
                    self.introduced.set()  # (an answer, of a kind: nobody waits longer)
            self.introducer_connected = False
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _follow_peers(self, introducer: IntroducerCalls) -> None:
        """Long-poll the peer list; read each new one in all its pages."""
        version = 0
        while True:
            page = await introducer.get_peers(version, POLL_WAIT, b"")
            latest = self._apply(page)
            while page.next is not None:
                page = await introducer.get_peers(version, 0, page.next)
                self._apply(page)
            version = latest
            self.introduced.set()

    def _apply(self, page: PeerPage) -> int:
        for data, signature in page.announcements:
            try:
                ann = Announcement.verify(data, signature)
            except FormatError:
                log.warning("ignoring a bad announcement from the introducer")
                continue
            self._add(ann.address, ann)
        return page.version

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
