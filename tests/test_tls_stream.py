"""TLS streams made with gridfs.net.tls, over real loopback TCP: a read takes
in every record already received (not one per call), and nothing else about
the stream changes: byte order and limits, EOF, a peer hanging up mid-record,
cancellation, full-duplex use."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from gridfs.net import tls
from gridfs.net.identity import NodeAddress
from gridfs.net.rpc import serve_rpc
from gridfs.protocol.connection import Connection, Role, hello_args

from .gridutil import MEMBERS

Pair = tuple[tls.TlsStream, tls.TlsStream]


@pytest.fixture
def server_ctx() -> tuple[ssl.SSLContext, bytes]:
    """A storage member's server context, and its node id."""
    credentials = MEMBERS.credentials("storage")
    assert credentials.member is not None
    return credentials.server, credentials.member.node_id


async def listen() -> trio.SocketListener:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listeners[0]


@asynccontextmanager
async def tls_pair(server_ctx: tuple[ssl.SSLContext, bytes]) -> AsyncIterator[Pair]:
    """(client, server) ends of one handshaken TLS connection, as node.py and
    tls.connect make them."""
    ctx, node_id = server_ctx
    listener = await listen()
    port = listener.socket.getsockname()[1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            result: list[tls.TlsStream] = []

            async def connect() -> None:
                result.append(
                    await tls.connect(NodeAddress(node_id, "127.0.0.1", port), MEMBERS.client())
                )

            nursery.start_soon(connect)
            server = tls.server_side(await listener.accept(), ctx)
            await server.do_handshake()
    await listener.aclose()
    client = result[0]
    try:
        yield client, server
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


async def settle(stream: tls.TlsStream, expected: int) -> None:
    """Wait until ``expected`` bytes are queued on ``stream``'s socket, unread."""
    sock = stream.transport_stream.socket
    with trio.fail_after(5):
        while len(await sock.recv(expected + 1, socket.MSG_PEEK)) < expected:
            await trio.sleep(0.001)


@pytest.mark.parametrize("direction", ["to server", "to client"])
async def test_records_already_received_come_in_one_read(
    server_ctx: tuple[ssl.SSLContext, bytes], direction: str
) -> None:
    async with tls_pair(server_ctx) as (client, server):
        sender, receiver = (client, server) if direction == "to server" else (server, client)
        # The server's first write also carries its session tickets: have it done.
        await sender.send_all(b"!")
        assert await receiver.receive_some(100) == b"!"
        pieces = [os.urandom(1000) for _ in range(10)]
        for piece in pieces:  # ten sends: ten TLS records
            await sender.send_all(piece)
        await settle(receiver, 10 * (1000 + 22))
        assert await receiver.receive_some(1 << 20) == b"".join(pieces)


async def test_a_read_stops_at_max_bytes_and_keeps_the_rest_in_order(
    server_ctx: tuple[ssl.SSLContext, bytes],
) -> None:
    async with tls_pair(server_ctx) as (client, server):
        pieces = [os.urandom(1000) for _ in range(10)]
        for piece in pieces:
            await client.send_all(piece)
        await settle(server, 10 * (1000 + 22))
        first = await server.receive_some(2500)
        assert first == b"".join(pieces)[:2500]
        rest = await server.receive_some(1 << 20)
        assert first + rest == b"".join(pieces)


async def test_large_payloads_round_trip_full_duplex(
    server_ctx: tuple[ssl.SSLContext, bytes],
) -> None:
    """Both ends send 8 MiB while reading in another task: every byte arrives, in order."""
    upload, download = os.urandom(8 << 20), os.urandom(8 << 20)
    got: dict[str, bytearray] = {"client": bytearray(), "server": bytearray()}

    async def read_all(stream: tls.TlsStream, into: bytearray) -> None:
        while len(into) < len(upload):
            data = await stream.receive_some(256 * 1024)
            assert data, "early EOF"
            into += data

    async def send_in_frames(stream: tls.TlsStream, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(data), 1 << 20):
            await stream.send_all(view[start : start + (1 << 20)])

    async with tls_pair(server_ctx) as (client, server):
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all, server, got["server"])
                nursery.start_soon(read_all, client, got["client"])
                nursery.start_soon(send_in_frames, client, upload)
                nursery.start_soon(send_in_frames, server, download)
    assert got["server"] == upload
    assert got["client"] == download


async def test_close_notify_is_eof_after_the_data(server_ctx: tuple[ssl.SSLContext, bytes]) -> None:
    async with tls_pair(server_ctx) as (client, server):
        await client.send_all(b"a" * 3000)
        await client.send_all(b"b" * 3000)
        await client.aclose()
        received = bytearray()
        with trio.fail_after(5):
            while data := await server.receive_some(1 << 20):
                received += data
        assert received == b"a" * 3000 + b"b" * 3000
        assert await server.receive_some(1 << 20) == b""


@pytest.mark.parametrize("damage", ["hang up mid-record", "corrupt a record"])
async def test_a_broken_record_breaks_the_stream_after_the_good_ones(
    server_ctx: tuple[ssl.SSLContext, bytes], damage: str
) -> None:
    """Records whole and sound before the damage are delivered (even when the
    bad one was already received with them); then the error the RPC loops
    expect (BrokenResourceError), not a silent EOF or lost data."""
    ctx = server_ctx[0]
    listener = await listen()
    port = listener.socket.getsockname()[1]
    with trio.fail_after(10):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        # The client speaks TLS by hand, so it can cut a record short.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = MEMBERS.client().client.wrap_bio(incoming, outgoing)
        server = tls.server_side(await listener.accept(), ctx)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.do_handshake)
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await tcp.send_all(outgoing.read())
                    incoming.write(await tcp.receive_some())
            await tcp.send_all(outgoing.read())
        for letter in b"xyz":
            obj.write(bytes([letter]) * 1000)
        wire = bytearray(outgoing.read())
        if damage == "hang up mid-record":
            await tcp.send_all(wire[:-10])  # the third record loses its tail
            await tcp.aclose()
        else:
            wire[-10] ^= 1  # the third record fails its authentication
            await tcp.send_all(wire)
            await settle(server, len(wire))
        received = bytearray()
        with pytest.raises(trio.BrokenResourceError):
            while True:
                data = await server.receive_some(1 << 20)
                assert data, "a cut record must not look like a clean EOF"
                received += data
        assert received == b"x" * 1000 + b"y" * 1000
        await trio.aclose_forcefully(server)
        await trio.aclose_forcefully(tcp)
    await listener.aclose()


async def test_a_cancelled_receive_leaves_the_stream_usable(
    server_ctx: tuple[ssl.SSLContext, bytes],
) -> None:
    async with tls_pair(server_ctx) as (client, server):
        with trio.move_on_after(0.05) as waiting:
            await server.receive_some(1 << 20)
        assert waiting.cancelled_caught
        await client.send_all(b"after")
        with trio.fail_after(5):
            assert await server.receive_some(1 << 20) == b"after"
        await server.send_all(b"back")
        with trio.fail_after(5):
            assert await client.receive_some(1 << 20) == b"back"


async def test_the_tcp_layer_reads_up_to_256_kib_at_a_time() -> None:
    """SSLStream refills with a default-sized receive; trio's default is 64 KiB,
    ours 256 KiB, so a 1 MiB request costs 4 trips through the loop, not 16."""
    listener = await listen()
    with trio.fail_after(10):
        client = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        server = tls.LargeReads(await listener.accept())
        data = os.urandom(600_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, data)
            while len(await server.socket.recv(100_000, socket.MSG_PEEK)) < 100_000:
                await trio.sleep(0.001)
            first = await server.receive_some()
            assert 64 * 1024 < len(first) <= tls.SOCKET_RECEIVE_SIZE
            got = bytearray(first)
            while len(got) < len(data):
                got += await server.receive_some()
        assert bytes(got) == data
        await client.aclose()
        await server.aclose()
        await listener.aclose()


@pytest.mark.skipif(not tls.LOW_WATER_SAFE, reason="SO_RCVLOWAT is used on Linux 5.10+ only")
async def test_a_reader_expecting_a_large_frame_wakes_once_most_of_it_is_there(
    server_ctx: tuple[ssl.SSLContext, bytes],
) -> None:
    """tls.wake_after sets the socket's low-water mark: a 1.5 MB frame sent in
    64 KiB pieces reaches a reader that says it waits for all of it in a few
    reads, not one per piece, and the mark never holds back its last bytes
    (the sender stays connected and silent after them)."""
    frame = os.urandom(1_500_000)
    async with tls_pair(server_ctx) as (client, server):
        await server.send_all(b"!")  # the session tickets, out of the way
        assert await client.receive_some(100) == b"!"

        async def trickle() -> None:
            view = memoryview(frame)
            for start in range(0, len(frame), 64 * 1024):
                await client.send_all(view[start : start + 64 * 1024])
                await trio.sleep(0.002)

        got = bytearray()
        reads = 0
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                while len(got) < len(frame):
                    wanted = len(frame) - len(got)
                    tls.wake_after(server, wanted)
                    got += await server.receive_some(max(wanted, 256 * 1024))
                    reads += 1
        assert bytes(got) == frame
        assert reads <= 6, reads  # 23 pieces: one read each without the mark
        tls.wake_after(server, 0)
        mark = server.transport_stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        assert mark == 1


async def test_a_peer_hanging_up_wakes_a_reader_below_its_mark(
    server_ctx: tuple[ssl.SSLContext, bytes],
) -> None:
    async with tls_pair(server_ctx) as (client, server):
        tls.wake_after(server, 1 << 20)
        await client.send_all(os.urandom(100_000))
        got = bytearray()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def hang_up() -> None:
                    await trio.sleep(0.2)
                    await trio.aclose_forcefully(client)

                nursery.start_soon(hang_up)
                with pytest.raises(trio.BrokenResourceError):
                    while data := await server.receive_some(1 << 20):
                        got += data
        assert len(got) == 100_000  # what came was delivered before the end


@pytest.mark.skipif(not tls.LOW_WATER_SAFE, reason="SO_RCVLOWAT is used on Linux 5.10+ only")
async def test_an_rpc_server_takes_a_trickled_large_request_in_a_few_reads(
    server_ctx: tuple[ssl.SSLContext, bytes],
) -> None:
    """serve_rpc tells the socket what the frame under way still lacks: a
    1.4 MB write request sent in 64 KiB pieces costs the server a few
    transport reads, not one per piece."""
    conn = Connection(Role.CLIENT)
    _, hello = conn.send_request("hello", hello_args())
    chunk = [[0, os.urandom(1_400_000)]]
    _, request = conn.send_request("write", {"si": b"s" * 16, "sharenum": 0, "chunks": chunk})
    handled: list[int] = []

    async def handler(method: str, args: dict[str, object]) -> None:
        handled.append(len(args["chunks"][0][1]))  # type: ignore[index]

    async with tls_pair(server_ctx) as (client, server):
        transport = server.transport_stream
        reads = 0
        receive = transport.receive_some

        async def counted(max_bytes: int | None = None) -> bytes:
            nonlocal reads
            reads += 1
            return await receive(max_bytes)

        transport.receive_some = counted  # type: ignore[method-assign]
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_rpc, server, handler, dict)
                await client.send_all(hello)
                await client.receive_some(1 << 16)  # the hello answer
                reads = 0
                view = memoryview(request)
                for start in range(0, len(request), 64 * 1024):
                    await client.send_all(view[start : start + 64 * 1024])
                    await trio.sleep(0.002)
                await client.receive_some(1 << 16)  # the write's answer
                nursery.cancel_scope.cancel()
    assert handled == [1_400_000]
    assert reads <= 6, reads  # 22 pieces: one read each without the mark


async def test_a_read_on_a_socket_closed_meanwhile_reports_it_closed() -> None:
    """Another task may close the socket (a call timing out) while the reader
    holds a mark: the read says ClosedResourceError, as without one."""
    listener = await listen()
    with trio.fail_after(10):
        client = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        server = tls.LargeReads(await listener.accept())
        server.wake_after(1 << 20)
        server.socket.close()
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()
    await client.aclose()
    await listener.aclose()
