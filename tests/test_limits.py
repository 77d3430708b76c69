"""Bounded resources per connection and per peer, attacked.

First serve_rpc over in-memory streams on a virtual clock (the reply budget,
the send and idle time-outs), then a real storage node on loopback TLS under
floods: of connections, of handshakes that never finish, of requests whose
replies are never read, of frames built to be expensive to decode.  Each
attack asserts what it achieved (a bounded cost) and that a well-behaved
client is still served.

Every connection to a real node here is opened by :func:`open_tls` (as
tests/test_rpc.py's ``open_raw`` opens one), from a chosen loopback address:
Linux routes all of 127/8 to this host, so "another address" is 127.0.0.2.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

import gridfs.node
from gridfs.client.broker import Server
from gridfs.config import NodeConfig, NodeDir
from gridfs.net import tls
from gridfs.net.identity import NodeAddress
from gridfs.net.limits import ConnectionLimits, peer_key
from gridfs.net.rpc import REPLY_OVERHEAD, ReplyBudget, RpcClient, serve_rpc
from gridfs.node import SessionFactory, run_introducer, run_storage
from gridfs.protocol.connection import (
    MAX_HELLO_FRAME,
    MAX_OBJECTS,
    Connection,
    Response,
    Role,
    hello_args,
)
from gridfs.protocol.schema import MAX_FRAME, MAX_READ
from gridfs.storage.service import StorageSession

from .gridutil import MEMBERS
from .test_protocol import drain, empty_arrays, raw_frame
from .test_rpc import (
    SI,
    StorageServer,
    local_port,
    read_args,
    read_until_closed,
    send_ignoring_hangup,
)

HELLO_INFO = {"kind": "toy"}
MIB = 2**20


# == (a) serve_rpc on a virtual clock ================================================


def handshaken_client() -> tuple[Connection, bytes]:
    client = Connection(Role.CLIENT)
    _, hello = client.send_request("hello", hello_args())
    return client, hello


async def receive_hello_answer(client: Connection, stream: trio.abc.Stream) -> None:
    events: list[Any] = []
    while not events:
        events = drain(client, await stream.receive_some(65536))
    assert isinstance(events[0], Response) and client.handshaken


async def test_a_peer_that_reads_no_replies_pins_at_most_the_budget(
    autojump_clock: trio.abc.Clock,
) -> None:
    """50 reads of 1 MiB, never read: the server makes replies only while they
    fit the budget (8 of them, though 32 may run at once), then stops reading
    requests, and drops the connection once a send has made no progress for
    the send time-out."""
    limits = ConnectionLimits(send_timeout=7.0)
    budget = ReplyBudget(limits.reply_budget)
    handled = 0

    async def handler(method: str, args: dict[str, Any]) -> bytes:
        nonlocal handled
        handled += 1
        return b"x" * args["length"]

    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    client, hello = handshaken_client()
    reads = b"".join(client.send_request("read", read_args(0, MIB))[1] for _ in range(50))

    async def deaf_client() -> None:
        await client_stream.send_all(hello)
        await receive_hello_answer(client, client_stream)
        await send_ignoring_hangup(client_stream, reads)  # and never read again

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deaf_client)
        with trio.fail_after(100):
            await serve_rpc(
                server_stream, handler, lambda: HELLO_INFO, 32, limits=limits, replies=budget
            )
        nursery.cancel_scope.cancel()
    assert trio.current_time() == pytest.approx(limits.send_timeout)
    assert handled == limits.reply_budget // (MIB + REPLY_OVERHEAD) == 8
    assert budget.limit - (MIB + REPLY_OVERHEAD) < budget.peak <= budget.limit
    assert budget.owed == 0


async def test_one_reply_larger_than_the_budget_still_goes_out(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def handler(method: str, args: dict[str, Any]) -> bytes:
        return b"x" * args["length"]

    budget = ReplyBudget(MIB)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: serve_rpc(server_stream, handler, lambda: HELLO_INFO, replies=budget)
        )
        client = RpcClient(client_stream)
        await nursery.start(client.run)
        for _ in range(3):
            assert len(await client.call("read", read_args(0, MAX_READ))) == MAX_READ
        assert budget.peak == MAX_READ + REPLY_OVERHEAD and budget.owed == 0
        nursery.cancel_scope.cancel()


class SlowReader(trio.abc.Stream):
    """A client stream that takes in 256 KiB every ``pause`` seconds."""

    def __init__(self, inner: trio.abc.Stream, pause: float) -> None:
        self.inner = inner
        self.pause = pause

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        await trio.sleep(self.pause)
        return await self.inner.receive_some(256 * 1024)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_slow_reader_that_keeps_taking_pieces_keeps_the_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The send time-out bounds each piece of a reply, not the whole reply:
    4 MiB taken in at 256 KiB a second is 16 s, beyond the 5 s time-out."""
    limits = ConnectionLimits(send_timeout=5.0)

    async def handler(method: str, args: dict[str, Any]) -> bytes:
        return b"x" * args["length"]

    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: serve_rpc(server_stream, handler, lambda: HELLO_INFO, limits=limits)
        )
        client = RpcClient(SlowReader(client_stream, 1.0), default_timeout=0)
        await nursery.start(client.run)
        assert len(await client.call("read", read_args(0, MAX_READ))) == MAX_READ
        assert trio.current_time() > 3 * limits.send_timeout
        assert not client.closed
        nursery.cancel_scope.cancel()


async def test_an_idle_connection_is_closed_but_not_one_with_a_request_in_flight(
    autojump_clock: trio.abc.Clock,
) -> None:
    limits = ConnectionLimits(idle_timeout=100.0)

    async def handler(method: str, args: dict[str, Any]) -> str:
        await trio.sleep(3 * limits.idle_timeout)  # a long poll, say
        return "late"

    client_stream, server_stream = trio.testing.memory_stream_pair()
    ended = trio.Event()

    async def serve() -> None:
        await serve_rpc(server_stream, handler, lambda: HELLO_INFO, limits=limits)
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = RpcClient(client_stream, default_timeout=0)
        await nursery.start(client.run)
        assert await client.call("stats", {}) == "late"
        answered = trio.current_time()
        assert answered == pytest.approx(3 * limits.idle_timeout)
        await client.wait_closed()
        await ended.wait()
        assert trio.current_time() == pytest.approx(answered + limits.idle_timeout)
        nursery.cancel_scope.cancel()


async def test_hello_is_answered_before_requests_sent_after_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A client takes only a small frame until its hello is answered, so the
    hello answer must come first even when reads were sent right behind it."""

    async def handler(method: str, args: dict[str, Any]) -> bytes:
        return b"x" * args["length"]

    client_stream, server_stream = trio.testing.memory_stream_pair()
    client, hello = handshaken_client()
    for _ in range(8):
        hello += client.send_request("read", read_args(0, MIB))[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_rpc(server_stream, handler, lambda: HELLO_INFO))
        await client_stream.send_all(hello)
        answers: list[Any] = []
        while len(answers) < 9:
            answers += drain(client, await client_stream.receive_some(MIB))
        assert answers[0].result == HELLO_INFO
        nursery.cancel_scope.cancel()


def test_peers_are_counted_by_address_and_ipv6_by_its_64() -> None:
    assert peer_key(("10.1.2.3", 5000)) == "10.1.2.3"
    assert peer_key(("::ffff:10.1.2.3", 5000, 0, 0)) == "10.1.2.3"
    assert peer_key(("2001:db8:1:2:aaaa::1", 1, 0, 0)) == peer_key(("2001:db8:1:2:ffff::9", 1))
    assert peer_key(("2001:db8:1:2::1", 1)) != peer_key(("2001:db8:1:3::1", 1))
    assert peer_key("/run/socket") == "local"


# == (b) a real storage node under floods ============================================


@pytest.fixture
def storage_dir(tmp_path: Path) -> NodeDir:
    node = NodeDir(tmp_path / "s")
    node.create(NodeConfig("storage", "s1", reserved_space=0))
    MEMBERS.enroll(node, "storage")
    return node


class LimitedServer(StorageServer):
    limits: ConnectionLimits
    budgets: dict[int, ReplyBudget]
    """The reply budget of each server-side connection, by client port."""


@contextlib.asynccontextmanager
async def limited_server(
    node: NodeDir,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    limits: ConnectionLimits,
    session_factory: SessionFactory = StorageSession,
) -> AsyncIterator[LimitedServer]:
    """Run a real storage node with ``limits``, recording how each of its
    connections ends and what each owed in replies."""
    server: LimitedServer | None = None

    async def recording_serve_rpc(stream: tls.TlsStream, *args: Any, **kwargs: Any) -> None:
        assert server is not None
        port = stream.transport_stream.socket.getpeername()[1]
        budget = server.budgets[port] = ReplyBudget(limits.reply_budget)
        try:
            await serve_rpc(stream, *args, replies=budget, **kwargs)
        except trio.Cancelled:  # by the handshake deadline (or the test's end)
            server.record_end(port, None)
            raise
        except BaseException as e:
            server.record_end(port, e)
            raise
        server.record_end(port, None)

    monkeypatch.setattr(gridfs.node, "serve_rpc", recording_serve_rpc)
    caplog.set_level(logging.INFO, logger="gridfs")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            lambda **kw: run_storage(node, limits=limits, session_factory=session_factory, **kw)
        )
        server = LimitedServer(address, caplog)
        server.limits, server.budgets = limits, {}
        yield server
        server.assert_no_failures()
        nursery.cancel_scope.cancel()


async def open_tls(address: NodeAddress, source: str = "127.0.0.1") -> tls.TlsStream:
    """A TLS connection to the node from ``source``; the one place this file
    opens one (made as tests/test_rpc.py's ``open_raw`` makes its own)."""
    tcp = await trio.open_tcp_stream(address.host, address.port, local_address=source)
    context = MEMBERS.client().client
    stream = trio.SSLStream(tls.LargeReads(tcp), context, server_hostname=None)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


@dataclass
class Held:
    rpc: RpcClient
    port: int
    """The client's port: how the server's records name its connection."""

    async def call(self, method: str, args: dict[str, Any]) -> Any:
        return await self.rpc.call(method, args)


@contextlib.asynccontextmanager
async def clients(
    address: NodeAddress, count: int, source: str = "127.0.0.1"
) -> AsyncIterator[list[Held]]:
    """``count`` clients that said hello and stay connected until the exit."""
    async with trio.open_nursery() as nursery:
        opened = []
        for _ in range(count):
            stream = await open_tls(address, source)
            client = Held(RpcClient(stream, default_timeout=10), local_port(stream))
            await nursery.start(client.rpc.run)
            opened.append(client)
        yield opened
        for client in opened:
            await client.rpc.aclose()


async def served(address: NodeAddress, source: str) -> bool:
    """Whether a client from ``source`` gets an answer to ``stats``."""
    with trio.fail_after(10):
        async with clients(address, 1, source) as [client]:
            return "total" in await client.call("stats", {})


async def refused(address: NodeAddress, source: str) -> bool:
    """Whether a connection from ``source`` is closed before its TLS handshake
    can finish (at once: well before any time-out)."""
    with trio.fail_after(2):
        try:
            stream = await open_tls(address, source)
        except (trio.BrokenResourceError, OSError):
            return True
        await trio.aclose_forcefully(stream)
        return False


async def stalled(address: NodeAddress, source: str) -> trio.SocketStream:
    """A TCP connection that will never start its TLS handshake."""
    return await trio.open_tcp_stream(address.host, address.port, local_address=source)


def refusal_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gridfs.net.limits"]


async def wait_ended(server: StorageServer, clients: list[Held]) -> None:
    for client in clients:
        await server.connection_ended(client.port)


async def test_a_flood_from_one_address_is_refused_past_its_cap(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ConnectionLimits(max_per_address=3)
    async with limited_server(storage_dir, monkeypatch, caplog, limits) as server:
        async with clients(server.address, 3) as held:
            for _ in range(20):
                assert await refused(server.address, "127.0.0.1")
            assert await served(server.address, "127.0.0.2")  # another address is served
            assert [await c.call("stats", {}) for c in held]  # and so are those admitted
        await wait_ended(server, held)
        assert await served(server.address, "127.0.0.1")  # room again once they left
        logs = refusal_logs(caplog)
        assert len(logs) == 1, logs  # 20 refusals, one line (at most one a minute)
        assert "too many connections from one address (127.0.0.1)" in logs[0]


async def test_connections_past_the_total_cap_are_refused(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ConnectionLimits(max_connections=4, max_per_address=3, log_interval=0)
    async with limited_server(storage_dir, monkeypatch, caplog, limits) as server:
        async with clients(server.address, 3) as held, clients(server.address, 1, "127.0.0.2"):
            assert await refused(server.address, "127.0.0.3")
            assert await refused(server.address, "127.0.0.3")
        await wait_ended(server, held)
        assert await served(server.address, "127.0.0.3")
        logs = refusal_logs(caplog)
        assert len(logs) == 2 and "too many connections (127.0.0.3)" in logs[0]


async def test_handshakes_that_never_finish_are_capped_and_timed_out(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Connections that never start TLS: two per address, three in all, each
    closed after the handshake time-out; meanwhile other peers are served."""
    limits = ConnectionLimits(
        max_unauthenticated_per_address=2, max_unauthenticated=3, handshake_timeout=2.0
    )
    async with limited_server(storage_dir, monkeypatch, caplog, limits) as server:
        started = trio.current_time()
        silent = [await stalled(server.address, "127.0.0.1") for _ in range(2)]
        assert await refused(server.address, "127.0.0.1")  # a third from that address
        assert await served(server.address, "127.0.0.2")  # (unauthenticated: 3 in all)
        silent.append(await stalled(server.address, "127.0.0.2"))
        assert await refused(server.address, "127.0.0.3")  # a fourth in all
        with trio.fail_after(10):
            for stream in silent:
                assert await read_until_closed(stream) == b""  # the server hung up...
        waited = trio.current_time() - started
        assert limits.handshake_timeout * 0.9 < waited < limits.handshake_timeout + 5
        assert await served(server.address, "127.0.0.1")  # ...and has room again
        assert await served(server.address, "127.0.0.3")
        for stream in silent:
            await stream.aclose()
        logs = " ".join(refusal_logs(caplog))
        assert "before authentication from one address (127.0.0.1)" in logs


async def test_a_connection_that_never_says_hello_is_closed_at_the_handshake_deadline(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ConnectionLimits(handshake_timeout=1.5, max_unauthenticated_per_address=1)
    async with limited_server(storage_dir, monkeypatch, caplog, limits) as server:
        started = trio.current_time()
        stream = await open_tls(server.address)  # TLS done, then nothing
        assert await refused(server.address, "127.0.0.1")  # it still counts as a stranger
        with trio.fail_after(10):
            assert await read_until_closed(stream) == b""
        assert trio.current_time() - started > limits.handshake_timeout * 0.9
        await server.connection_ended(local_port(stream))
        await trio.aclose_forcefully(stream)
        assert await served(server.address, "127.0.0.1")


async def test_hello_ends_the_handshake_deadline(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ConnectionLimits(handshake_timeout=1.0, max_unauthenticated_per_address=1)
    async with (
        limited_server(storage_dir, monkeypatch, caplog, limits) as server,
        clients(server.address, 2) as held,  # each said hello: not strangers
    ):
        await trio.sleep(limits.handshake_timeout * 2)
        assert [await c.call("stats", {}) for c in held]


class ZeroShares(StorageSession):
    """A storage session whose every share reads as zeros (big reads, no uploads)."""

    async def rpc_read(self, si: bytes, sharenum: int, offset: int, length: int) -> bytes:
        return bytes(length)


async def test_connections_that_never_read_replies_pin_at_most_the_budget(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two peers send 40 reads of 4 MiB each and read nothing: by the server's
    own accounting each owes at most its reply budget (it was 58 MiB a
    connection), both lose their connection after the send time-out, and a
    well-behaved client reads the same share meanwhile."""
    limits = ConnectionLimits(send_timeout=1.5)
    async with limited_server(storage_dir, monkeypatch, caplog, limits, ZeroShares) as server:
        ports, deaf = [], []  # (held: a stream collected would close its socket)
        async with trio.open_nursery() as nursery:
            for source in ["127.0.0.1", "127.0.0.2"]:
                stream = await open_tls(server.address, source)
                deaf.append(stream)
                ports.append(local_port(stream))
                client, hello = handshaken_client()
                await stream.send_all(hello)
                await receive_hello_answer(client, stream)
                reads = [client.send_request("read", read_args(0, MAX_READ))[1] for _ in range(40)]
                nursery.start_soon(send_ignoring_hangup, stream, b"".join(reads))
            async with clients(server.address, 1, "127.0.0.3") as [good]:
                for _ in range(3):
                    assert await good.call("read", read_args(0, MAX_READ)) == bytes(MAX_READ)
            with trio.fail_after(20):
                for port in ports:
                    await server.connection_ended(port)
            nursery.cancel_scope.cancel()
        for stream in deaf:
            await trio.aclose_forcefully(stream)
        for port in ports:
            budget = server.budgets[port]
            assert budget.limit - (MAX_READ + REPLY_OVERHEAD) < budget.peak <= budget.limit
            assert budget.limit == 2 * MAX_FRAME
        sends = [r for r in caplog.records if "took nothing in for 1.5s" in r.getMessage()]
        assert len(sends) == 2
        await server.assert_healthy()


async def test_a_megabyte_of_empty_arrays_before_hello_is_refused_by_its_size(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with limited_server(storage_dir, monkeypatch, caplog, ConnectionLimits()) as server:
        with trio.fail_after(10):
            stream = await open_tls(server.address)
            await send_ignoring_hangup(stream, raw_frame(empty_arrays(1_000_000)))
            assert await read_until_closed(stream) == b""
            await server.connection_ended(local_port(stream))
            await trio.aclose_forcefully(stream)
        why = f"before hello exceeds the {MAX_HELLO_FRAME} limit"  # not decoded: refused by size
        assert any(why in r.getMessage() for r in caplog.records)
        await server.assert_healthy()


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (empty_arrays(MAX_FRAME - 100), f"more than {MAX_OBJECTS} objects"),
        (b"\x91" * 100_000 + b"\x90", "StackError"),
        (b"\xdd\xff\xff\xff\xff" + b"\x90" * 1000, "undecodable"),
    ],
    ids=["countless-arrays", "deep-nesting", "huge-count"],
)
async def test_frames_costly_to_decode_after_hello_end_the_connection(
    storage_dir: NodeDir,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    why: str,
) -> None:
    async with limited_server(storage_dir, monkeypatch, caplog, ConnectionLimits()) as server:
        with trio.fail_after(10):
            stream = await open_tls(server.address)
            client, hello = handshaken_client()
            await stream.send_all(hello)
            await receive_hello_answer(client, stream)
            await send_ignoring_hangup(stream, raw_frame(body))
            assert await read_until_closed(stream) == b""
            await server.connection_ended(local_port(stream))
            await trio.aclose_forcefully(stream)
        assert any(why in r.getMessage() for r in caplog.records)
        await server.assert_healthy()


async def test_a_request_after_hello_with_a_huge_list_is_a_bad_request(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with limited_server(storage_dir, monkeypatch, caplog, ConnectionLimits()) as server:
        with trio.fail_after(10):
            async with clients(server.address, 1) as [client]:
                leases = [[SI, b"r" * 32, b"c" * 32]] * 5000  # over MAX_LEASES, within bounds
                with pytest.raises(gridfs.net.rpc.RemoteError, match="bad-request"):
                    await client.call("add_leases", {"leases": leases})
                assert "total" in await client.call("stats", {})


async def test_an_idle_connection_is_closed_and_the_client_reconnects(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    limits = ConnectionLimits(idle_timeout=0.5)
    async with limited_server(storage_dir, monkeypatch, caplog, limits) as server:
        async with trio.open_nursery() as nursery:
            peer = Server(server.address, nursery, MEMBERS.client())
            assert "total" in await peer.call("stats", {})
            first = await peer.connect()
            with trio.fail_after(10):
                await first.wait_closed()  # the server closed it...
            assert not peer.connected
            assert "total" in await peer.call("stats", {})  # ...and it was reopened
            assert peer.connected and await peer.connect() is not first
            await peer.disconnect()
        assert any("idle for 0.5s" in r.getMessage() for r in caplog.records)


def test_the_hello_frame_of_this_protocol_fits_the_limit_before_hello() -> None:
    body = msgpack.packb([0, 2**32 - 1, "hello", hello_args()])
    assert len(body) < MAX_HELLO_FRAME // 10
    assert struct.calcsize(">I") + len(body) < MAX_HELLO_FRAME


async def test_the_introducer_caps_connections_too(tmp_path: Path) -> None:
    node = NodeDir(tmp_path / "i")
    node.create(NodeConfig("introducer", "i"))
    MEMBERS.enroll(node, "introducer")
    limits = ConnectionLimits(max_per_address=2, idle_timeout=1.0)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(lambda **kw: run_introducer(node, limits=limits, **kw))
        with trio.fail_after(10):
            async with clients(address, 2) as held:
                assert await refused(address, "127.0.0.1")
                reply = await held[0].call("get_peers", {"after": 0, "wait": 0, "start": b""})
                assert reply["announcements"] == []
            async with clients(address, 1, "127.0.0.2") as [idle]:
                await idle.rpc.wait_closed()  # closed by the introducer after 1 s
        nursery.cancel_scope.cancel()
