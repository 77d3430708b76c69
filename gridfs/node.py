"""Running server nodes: an introducer or a storage server, in the foreground.

Both listen with mutual TLS under their member certificate, admit only
members of their grid (see gridfs/gatekeeper.py), write ``node.url`` once
listening and ``node.pid`` while running, and stop cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

import trio

from . import __version__
from .announce import Announcement
from .config import NodeConfig, NodeDir
from .errors import GridError, NotMemberError, UsageError, unwrap
from .gatekeeper import Gate, Revocations, is_refusal, refuse
from .introducer import IntroducerSession, IntroducerState
from .membership import Member, MembershipError
from .net import tls
from .net.calls import IntroducerCalls
from .net.identity import NodeAddress, NodeKey
from .net.limits import DEFAULT_LIMITS, ConnectionGate, ConnectionLimits
from .net.rpc import RpcClient, serve_rpc
from .protocol import schema
from .storage.leases import LeaseDB
from .storage.service import StorageSession
from .storage.slots import SlotStore
from .storage.store import ShareStore, StoreLimits

log = logging.getLogger(__name__)
HANDSHAKE_TIMEOUT = 10.0
ANNOUNCE_INTERVAL = 60.0
REVOCATION_WAIT = 30


class Session(Protocol):
    async def handle(self, method: str, args: dict[str, Any]) -> Any: ...


def hello_info(kind: str, key: NodeKey) -> dict[str, Any]:
    return {
        "version": schema.PROTOCOL_VERSION,
        "software": f"gridfs/{__version__}",
        "kind": kind,
        "node_id": key.node_id,
        "limits": {
            "max_frame": schema.MAX_FRAME,
            "max_write": schema.MAX_WRITE,
            "max_read": schema.MAX_READ,
            "max_buckets": schema.MAX_BUCKETS,
            "max_open_buckets": schema.MAX_OPEN_BUCKETS,
        },
    }


Connection = Callable[[tls.TlsStream, Member], Awaitable[None]]


async def serve_node(
    node: NodeDir,
    config: NodeConfig,
    gate: Gate,
    connection: Connection,
    *,
    limits: ConnectionLimits = DEFAULT_LIMITS,
    task_status: trio.TaskStatus[NodeAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen with TLS and hand each admitted member's connection to
    ``connection``; a :class:`ConnectionGate` admits connections within
    ``limits`` first."""
    key = node.key()
    ctx = gate.credentials.server
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    port = listeners[0].socket.getsockname()[1]
    if config.port != port:
        config.port = port  # keep the same address across restarts
        node.save(config)
    address = NodeAddress(key.node_id, config.host, port)
    node.publish_address(address)

    async def handle(tcp: trio.SocketStream) -> None:
        stream = tls.server_side(tcp, ctx)
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
            await admit(stream, gate, connection)
        except (trio.BrokenResourceError, trio.TooSlowError, OSError):
            pass
        except Exception:
            log.exception("connection handler failed")
        finally:
            await trio.aclose_forcefully(stream)

    log.info("%s listening at %s", config.kind, address)
    task_status.started(address)
    await trio.serve_listeners(ConnectionGate(limits).wrap(handle), listeners)


async def admit(stream: tls.TlsStream, gate: Gate, connection: Connection) -> None:
    """Serve a handshaken stream if its peer is an admitted member, for as
    long as it stays one; tell a refused member why."""
    try:
        member = gate.admit(stream)
    except NotMemberError as e:
        log.info("refused a connection: %s", e)
        await refuse(stream, e)
        return
    except MembershipError as e:  # (TLS checked the chain: should not happen)
        log.warning("refused a connection: %s", e)
        return
    with gate.live(member):
        await connection(stream, member)


SessionFactory = Callable[[ShareStore, float], StorageSession]


async def run_storage(
    node: NodeDir,
    *,
    session_factory: SessionFactory = StorageSession,
    limits: ConnectionLimits = DEFAULT_LIMITS,
    task_status: trio.TaskStatus[NodeAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``node``'s share store; ``session_factory(store, idle_timeout)``
    makes each connection's session (tests substitute misbehaving ones);
    ``limits`` bound connections (tests make them small)."""
    config = node.config()
    key = node.key()
    credentials = node.credentials()
    if credentials.member is None:
        log.warning("%s is not a member of a grid: it will refuse every connection", node.path)
    elif credentials.member.kind != "storage":
        raise UsageError(f"{node.path} holds the membership of a {credentials.member.kind}")
    gate = Gate(credentials, node.private, ("client",))
    room = StoreLimits(config.reserved_space, config.max_share_size, config.client_quota)
    store = ShareStore(node.storage_path, room)
    slots = SlotStore(node.storage_path)

    def collect(si: bytes) -> None:
        store.delete_all(si)
        slots.delete(si)

    leases = LeaseDB(node.storage_path / "leases.sqlite", collect, config.lease_duration)
    hello = hello_info("storage", key)

    async def connection(stream: tls.TlsStream, member: Member) -> None:
        session = session_factory(store, config.idle_timeout)
        session.member = member.node_id
        if session.slots is None:  # factories take (store, idle_timeout): attach the rest
            session.slots = slots
        if session.leases is None:
            session.leases = leases
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.reap_idle)
                await serve_rpc(stream, session.handle, lambda: hello)
                nursery.cancel_scope.cancel()
        finally:
            session.abort_all()  # the connection was the canary

    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            partial(serve_node, limits=limits), node, config, gate, connection
        )
        nursery.start_soon(crawl_expired_leases, leases, config.expire_interval)
        nursery.start_soon(gate.revocations.watch)
        if config.introducer and credentials.member is not None:
            intro = NodeAddress.parse(config.introducer)

            def announcement() -> Announcement:
                capacity = store.capacity()
                return Announcement(
                    address, key.public_bytes, config.nickname, capacity, time.time_ns()
                )

            nursery.start_soon(
                announce_forever, intro, key, credentials, announcement, gate.revocations
            )
        task_status.started(address)


async def crawl_expired_leases(leases: LeaseDB, interval: float, batch: int = 1000) -> None:
    """The expiry crawler: every ``interval`` seconds, drop expired leases and
    free what they alone kept, ``batch`` leases per step so one step never
    holds the database (or the event loop's thread) for long."""
    while True:
        dropped, freed = await trio.to_thread.run_sync(leases.expire_step, batch)
        if dropped:
            log.info("expired %d leases, freed %d storage indexes", dropped, freed)
        await trio.sleep(0.05 if dropped == batch else interval)


async def announce_forever(
    introducer: NodeAddress,
    key: NodeKey,
    credentials: tls.Credentials,
    announcement: Callable[[], Announcement],
    revocations: Revocations,
) -> None:
    """Keep an announcement at the introducer, and fetch the grid's newer
    revocation lists from it: reconnect with backoff when the connection
    drops (an introducer restart), refresh the announcement now and then."""
    backoff = 0.5
    while True:
        try:
            stream = await tls.connect(introducer, credentials, kind="introducer")
            rpc = RpcClient(stream, default_timeout=REVOCATION_WAIT + 15.0)
            async with trio.open_nursery() as nursery:
                await nursery.start(rpc.run)
                backoff = 0.5

                calls = IntroducerCalls(rpc.call)

                async def refresh(calls: IntroducerCalls = calls) -> None:
                    while True:
                        await calls.announce(*announcement().sign(key))
                        await trio.sleep(ANNOUNCE_INTERVAL)

                nursery.start_soon(refresh)
                nursery.start_soon(revocations.follow, calls, REVOCATION_WAIT)
                await rpc.wait_closed()
                nursery.cancel_scope.cancel()
        except* GridError as group:  # (lost inside the nursery: as a group)
            error = unwrap(group)
            level = logging.WARNING if is_refusal(error) else logging.INFO
            log.log(level, "introducer %s: %s", introducer, error)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, 10.0)


async def run_introducer(
    node: NodeDir,
    *,
    limits: ConnectionLimits = DEFAULT_LIMITS,
    task_status: trio.TaskStatus[NodeAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = node.config()
    credentials = node.credentials()
    if credentials.member is None:
        raise NotMemberError(
            f"{node.path} has no grid (an introducer made before grids: run gridfs grid start "
            "on its grid directory, or make a new one with gridfs introducer create)"
        )
    if credentials.member.kind != "introducer":
        raise UsageError(f"{node.path} holds the membership of a {credentials.member.kind}")
    gate = Gate(credentials, node.private, ("client", "storage", "introducer"))
    state = IntroducerState(gate.revocations)
    hello = hello_info("introducer", node.key())

    async def connection(stream: tls.TlsStream, member: Member) -> None:
        session = IntroducerSession(state, member)
        try:
            await serve_rpc(stream, session.handle, lambda: hello)
        finally:
            session.closed()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            partial(serve_node, limits=limits), node, config, gate, connection
        )
        nursery.start_soon(gate.revocations.watch)
        task_status.started(address)


def run_in_foreground(node: NodeDir, kind: str) -> None:
    """Run a node until SIGTERM/SIGINT, with its pid file and log."""
    config = node.config()
    if config.kind != kind:
        raise GridError(f"{node.path} is a {config.kind} node, not a {kind} node")
    running = node.pid()
    if running is not None and running != os.getpid():
        raise GridError(f"{node.path} is already running (pid {running})")
    node.pid_path.write_text(f"{os.getpid()}\n")
    runner = run_storage if kind == "storage" else run_introducer

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await nursery.start(runner, node)
                async for _ in signals:
                    log.info("%s stopping", kind)
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    finally:
        with contextlib.suppress(FileNotFoundError):
            node.pid_path.unlink()
