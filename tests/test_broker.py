"""The client's connections to storage servers: failures become ServerUnavailable."""

from __future__ import annotations

import socket
import struct

import pytest
import trio

from gridfs.client.broker import Server, ServerUnavailable
from gridfs.net.identity import NodeAddress


async def test_a_server_that_resets_during_the_handshake_is_unavailable() -> None:
    """A server dying mid-handshake (connection reset) is a ServerUnavailable
    for the caller, which fails over; it once escaped as BrokenResourceError
    and took the mount daemon down."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]

    async def reset_everyone() -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            conn, _ = listener.accept()
            await trio.sleep(0.05)  # the ClientHello is on its way
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # RST

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reset_everyone)
            server = Server(NodeAddress(bytes(20), "127.0.0.1", port), nursery)
            with trio.fail_after(10), pytest.raises(ServerUnavailable):
                await server.call("stats", {})
            assert not server.connected
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
