"""Connections that break during the TLS handshake: the client's to storage
servers (ServerUnavailable) and a storage server's to the introducer (retried)."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gridfs.announce import Announcement
from gridfs.client.broker import Server, ServerUnavailable, StorageBroker
from gridfs.gatekeeper import Revocations
from gridfs.net import tls
from gridfs.net.identity import NodeAddress, NodeKey
from gridfs.net.rpc import serve_rpc
from gridfs.node import announce_forever, hello_info

from .gridutil import MEMBERS


class Resetter:
    """A listener that accepts, waits for the ClientHello, then resets."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.setblocking(False)
        self.address = NodeAddress(bytes(20), "127.0.0.1", self.sock.getsockname()[1])
        self.resets = 0

    async def serve(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            conn, _ = self.sock.accept()
            await trio.sleep(0.05)  # the ClientHello is on its way
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST
            self.resets += 1


@pytest.fixture
def resetter() -> Iterator[Resetter]:
    r = Resetter()
    try:
        yield r
    finally:
        r.sock.close()


async def test_a_server_that_resets_during_the_handshake_is_unavailable(
    resetter: Resetter,
) -> None:
    """A server dying mid-handshake (connection reset) is a ServerUnavailable
    for the caller, which fails over; it once escaped as BrokenResourceError
    and took the mount daemon down."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resetter.serve)
        server = Server(resetter.address, nursery, MEMBERS.client())
        with trio.fail_after(10), pytest.raises(ServerUnavailable):
            await server.call("stats", {})
        assert not server.connected
        nursery.cancel_scope.cancel()


async def test_an_introducer_reset_during_the_handshake_is_retried(resetter: Resetter) -> None:
    """The storage server's announcing task (and the client's subscription)
    keep retrying with backoff: a reset must not end them."""
    key = NodeKey.generate()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resetter.serve)
        storage = MEMBERS.credentials("storage")
        nursery.start_soon(
            announce_forever,
            resetter.address,
            key,
            storage,
            lambda: pytest.fail("announced without a connection"),
            Revocations(storage, None),
        )
        broker = StorageBroker(nursery, MEMBERS.client(), introducer=resetter.address)
        with trio.fail_after(10):
            while resetter.resets < 4:  # both tasks came back after a reset
                await trio.sleep(0.05)
        assert not broker.introducer_connected
        nursery.cancel_scope.cancel()


class DyingIntroducer:
    """A TLS node that answers hello, then drops the connection in the middle
    of the next call (an introducer restarting)."""

    def __init__(self, tmp_path: Path) -> None:
        private = tmp_path / "introducer"
        self.ctx = MEMBERS.credentials("introducer", private=private).server
        self.key = NodeKey.from_pem((private / "node.key").read_bytes())
        self.accepted = 0

    async def serve(self, *, task_status: trio.TaskStatus[NodeAddress]) -> None:
        async def handle(tcp: trio.SocketStream) -> None:
            stream = tls.server_side(tcp, self.ctx)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.do_handshake()
                self.accepted += 1

                async def handler(method: str, args: dict[str, Any]) -> Any:
                    await trio.aclose_forcefully(stream)
                    await trio.sleep_forever()

                await serve_rpc(stream, handler, lambda: hello_info("introducer", self.key))

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        task_status.started(NodeAddress(self.key.node_id, "127.0.0.1", port))
        await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize("who", ["client", "storage server"])
async def test_an_introducer_dying_mid_call_is_reconnected_to(who: str, tmp_path: Path) -> None:
    """The connection lost inside the call's nursery arrives as an exception
    group; it must be retried like any lost connection, not end the task
    (it took the client's broker, or the storage server, down)."""
    introducer = DyingIntroducer(tmp_path)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(introducer.serve)
        if who == "client":
            StorageBroker(nursery, MEMBERS.client(), introducer=address)
        else:
            storage = MEMBERS.credentials("storage")
            revocations = Revocations(storage, None)
            nursery.start_soon(
                announce_forever, address, NodeKey.generate(), storage, announcement, revocations
            )
        with trio.fail_after(15):
            while introducer.accepted < 3:  # came back twice (backoff 0.5 s, 1 s)
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


def announcement() -> Announcement:
    key = NodeKey.generate()
    return Announcement(NodeAddress(key.node_id, "127.0.0.1", 1), key.public_bytes, "", {}, 1)


async def test_tls_connect_failures_are_connect_errors(resetter: Resetter) -> None:
    """Refused, reset during the handshake: both a GridError with the address."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused = NodeAddress(bytes(20), "127.0.0.1", closed.getsockname()[1])
    closed.close()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(resetter.serve)
        for address in (refused, resetter.address):
            with trio.fail_after(10), pytest.raises(tls.ConnectError, match=r"127\.0\.0\.1:"):
                await tls.connect(address, MEMBERS.client())
        nursery.cancel_scope.cancel()


async def test_a_connection_left_idle_is_replaced_before_the_server_closes_it(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A call after IDLE_REOPEN seconds of quiet goes over a new connection,
    never over the old one that the server may be closing just then; a
    connection in use is kept."""
    from gridfs.client.broker import IDLE_REOPEN

    from .gridutil import open_broker, open_grid

    with trio.fail_after(3 * IDLE_REOPEN):  # (virtual time: the clock jumps)
        async with open_grid(tmp_path, servers=1) as grid, open_broker(grid.addresses) as broker:
            (server,) = broker.servers.values()
            await server.calls.stats()
            first = await server.connect()
            mock_clock.jump(IDLE_REOPEN / 2)
            await server.calls.stats()
            assert await server.connect() is first  # used recently: kept
            mock_clock.jump(IDLE_REOPEN + 1)
            await server.calls.stats()
            second = await server.connect()
            assert second is not first and first.closed
