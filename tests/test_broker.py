"""Connections that break during the TLS handshake: the client's to storage
servers (ServerUnavailable) and a storage server's to the introducer (retried)."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
import trio

from gridfs.client.broker import Server, ServerUnavailable, StorageBroker
from gridfs.net.identity import NodeAddress, NodeKey
from gridfs.node import announce_forever


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
        server = Server(resetter.address, nursery)
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
        nursery.start_soon(
            announce_forever,
            resetter.address,
            key,
            lambda: pytest.fail("announced without a connection"),
        )
        broker = StorageBroker(nursery, introducer=resetter.address)
        with trio.fail_after(10):
            while resetter.resets < 4:  # both tasks came back after a reset
                await trio.sleep(0.05)
        assert not broker.introducer_connected
        nursery.cancel_scope.cancel()
