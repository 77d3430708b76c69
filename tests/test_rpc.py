"""The RPC transport: RpcClient and serve_rpc over in-memory streams, then a
real storage node over TLS, then that node under abuse (it must keep serving
well-behaved clients whatever one connection sends it)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import random
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gridfs.node
from gridfs.config import NodeConfig, NodeDir
from gridfs.errors import GridError
from gridfs.hashes import STORAGE_INDEX_SIZE
from gridfs.net import tls
from gridfs.net.identity import NodeAddress
from gridfs.net.rpc import (
    SEND_PIECE,
    SMALL_PIECE,
    ConnectionLost,
    Handler,
    RemoteError,
    RpcClient,
    TakenArgs,
    sendable,
    serve_rpc,
)
from gridfs.node import run_storage
from gridfs.protocol.connection import (
    NEED_DATA,
    BadRequest,
    Connection,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    hello_args,
)
from gridfs.protocol.frames import Blob
from gridfs.protocol.schema import MAX_FRAME, MAX_READ

from .gridutil import MEMBERS
from .test_protocol import HELLO, drain, frame, hostile_pieces

SI = bytes(range(STORAGE_INDEX_SIZE))
HELLO_INFO = {"kind": "toy", "version": 1}
FUZZ = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def read_args(offset: int = 0, length: int = 10) -> dict[str, Any]:
    return {"si": SI, "sharenum": 0, "offset": offset, "length": length}


# == (a) RpcClient and serve_rpc over memory streams ===============================


@dataclass
class Pair:
    client: RpcClient
    server_stream: trio.abc.Stream
    server_ended: trio.Event
    """Set when serve_rpc returned; had it raised, the test would fail."""


@contextlib.asynccontextmanager
async def rpc_pair(
    handler: Handler, *, max_concurrent: int = 8, timeout: float = 60.0
) -> AsyncIterator[Pair]:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    ended = trio.Event()

    async def serve() -> None:
        await serve_rpc(server_stream, handler, lambda: HELLO_INFO, max_concurrent=max_concurrent)
        ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        client = RpcClient(client_stream, default_timeout=timeout)
        await nursery.start(client.run)
        assert client.hello == HELLO_INFO
        yield Pair(client, server_stream, ended)
        nursery.cancel_scope.cancel()


class ShareGoneError(GridError):
    code = "share-gone"


class UncodedError(GridError):
    pass


async def test_concurrent_calls_get_their_own_answers(autojump_clock: trio.abc.Clock) -> None:
    count = 50
    delays = list(range(1, count + 1))
    random.Random(5).shuffle(delays)
    running = peak = 0

    async def handler(method: str, args: dict[str, Any]) -> Any:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(delays[args["offset"]] / 1000)
        running -= 1
        return {"offset": args["offset"], "data": bytes([args["offset"]]) * args["length"]}

    answers: dict[int, Any] = {}
    finished: list[int] = []

    async def one_call(client: RpcClient, i: int) -> None:
        answers[i] = await client.call("read", read_args(i, i + 1))
        finished.append(i)

    async with rpc_pair(handler, max_concurrent=count) as pair:
        with trio.fail_after(10):
            async with trio.open_nursery() as calls:
                for i in range(count):
                    calls.start_soon(one_call, pair.client, i)

    assert answers == {i: {"offset": i, "data": bytes([i]) * (i + 1)} for i in range(count)}
    assert peak == count  # all were in flight at once...
    assert finished == sorted(range(count), key=lambda i: delays[i])  # ...answered as ready
    assert finished != sorted(finished)


async def test_server_runs_at_most_max_concurrent_handlers(autojump_clock: trio.abc.Clock) -> None:
    running = peak = 0

    async def handler(method: str, args: dict[str, Any]) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(0.01)
        running -= 1
        return args["offset"]

    results: list[int] = []

    async def one_call(client: RpcClient, i: int) -> None:
        results.append(await client.call("read", read_args(i)))

    async with rpc_pair(handler, max_concurrent=4) as pair:
        with trio.fail_after(10):
            async with trio.open_nursery() as calls:
                for i in range(20):
                    calls.start_soon(one_call, pair.client, i)
    assert peak == 4
    assert sorted(results) == list(range(20))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ShareGoneError("share 3 went away"), "share-gone"),
        (UncodedError("no code of its own"), "UncodedError"),
    ],
)
async def test_grid_error_reaches_the_caller_with_its_code(error: GridError, code: str) -> None:
    async def handler(method: str, args: dict[str, Any]) -> Any:
        if method == "close":
            raise error
        return "fine"

    async with rpc_pair(handler) as pair:
        with trio.fail_after(10):
            with pytest.raises(RemoteError) as caught:
                await pair.client.call("close", {"si": SI, "sharenum": 3})
            assert caught.value.code == code
            assert caught.value.remote_message == str(error)
            assert await pair.client.call("stats", {}) == "fine"


async def test_handler_bug_is_an_internal_error_and_serving_goes_on() -> None:
    calls: list[str] = []

    async def handler(method: str, args: dict[str, Any]) -> Any:
        calls.append(method)
        if method == "abort":
            raise ValueError("secret detail of the bug")
        return {"ok": len(calls)}

    async with rpc_pair(handler) as pair:
        with trio.fail_after(10):
            for _ in range(3):
                with pytest.raises(RemoteError) as caught:
                    await pair.client.call("abort", {"si": SI, "sharenum": 0})
                assert caught.value.code == "internal"
                assert "secret" not in caught.value.remote_message  # no internals leak
            assert await pair.client.call("stats", {}) == {"ok": 4}
        assert not pair.server_ended.is_set()
        assert not pair.client.closed


@pytest.mark.parametrize("result", [object(), b"x" * (MAX_FRAME + 1)], ids=["unpackable", "huge"])
async def test_unsendable_result_is_an_internal_error_and_serving_goes_on(result: Any) -> None:
    async def handler(method: str, args: dict[str, Any]) -> Any:
        return result if method == "read" else "fine"

    async with rpc_pair(handler) as pair:
        with trio.fail_after(10):
            with pytest.raises(RemoteError) as caught:
                await pair.client.call("read", read_args())
            assert caught.value.code == "internal"
            assert await pair.client.call("stats", {}) == "fine"
        assert not pair.server_ended.is_set()


async def test_bad_arguments_are_refused_before_the_handler() -> None:
    seen: list[str] = []

    async def handler(method: str, args: dict[str, Any]) -> Any:
        seen.append(method)
        return "fine"

    async with rpc_pair(handler) as pair:
        with trio.fail_after(10):
            with pytest.raises(RemoteError) as caught:
                await pair.client.call("read", read_args(length=MAX_READ + 1))
            assert caught.value.code == "bad-request"
            with pytest.raises(RemoteError, match="unknown method"):
                await pair.client.call("format_disk", {})
            assert await pair.client.call("stats", {}) == "fine"
    assert seen == ["stats"]


async def test_call_timeout_loses_the_connection(autojump_clock: trio.abc.Clock) -> None:
    handler_cancelled = trio.Event()

    async def handler(method: str, args: dict[str, Any]) -> Any:
        if method == "stats":
            return "fine"
        try:
            await trio.sleep_forever()
        finally:
            handler_cancelled.set()

    async with rpc_pair(handler) as pair:
        with trio.fail_after(60):
            started = trio.current_time()
            with pytest.raises(ConnectionLost, match="no answer"):
                await pair.client.call("close", {"si": SI, "sharenum": 0}, timeout=5)
            assert trio.current_time() - started == pytest.approx(5)
            assert pair.client.closed

            failed_at = trio.current_time()
            with pytest.raises(ConnectionLost):
                await pair.client.call("stats", {})
            assert trio.current_time() == failed_at  # failed at once, without waiting

            # The server notices the client is gone and stops the stuck handler.
            await pair.server_ended.wait()
            assert handler_cancelled.is_set()


async def test_server_closing_fails_pending_calls() -> None:
    entered = 0
    all_entered = trio.Event()

    async def handler(method: str, args: dict[str, Any]) -> Any:
        nonlocal entered
        entered += 1
        if entered == 5:
            all_entered.set()
        await trio.sleep_forever()

    outcomes: list[BaseException] = []

    async def pending_call(client: RpcClient, i: int) -> None:
        try:
            await client.call("read", read_args(i))
        except ConnectionLost as e:
            outcomes.append(e)

    async with rpc_pair(handler) as pair:
        with trio.fail_after(10):
            async with trio.open_nursery() as calls:
                for i in range(5):
                    calls.start_soon(pending_call, pair.client, i)
                await all_entered.wait()
                await pair.server_stream.aclose()
            await pair.server_ended.wait()  # serve_rpc returned: no error escaped it
            await pair.client.wait_closed()
            assert len(outcomes) == 5
            with pytest.raises(ConnectionLost):
                await pair.client.call("stats", {})


class TricklingStream(trio.abc.Stream):
    """A client stream whose sends go out ``step`` bytes at a time, 1 ms apart
    (a slow link), so that a caller can be cancelled in the middle of a frame."""

    def __init__(self, inner: trio.abc.Stream, step: int = 4096) -> None:
        self.inner = inner
        self.step = step

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), self.step):
            await self.inner.send_all(view[start : start + self.step])
            await trio.sleep(0.001)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_caller_cancelled_mid_send_leaves_the_connection_usable(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Cancelling a call while its request is half sent must not garble the
    stream: the frame goes out whole and later calls on it still work."""
    writes: list[int] = []

    async def handler(method: str, args: dict[str, Any]) -> Any:
        if method == "write":
            writes.append(len(args["chunks"][0][1]))
        return "fine"

    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rpc, server_stream, handler, lambda: HELLO_INFO)
        client = RpcClient(TricklingStream(client_stream))
        await nursery.start(client.run)
        big = {"si": SI, "sharenum": 0, "chunks": [[0, b"x" * 200_000]]}
        with trio.move_on_after(0.010) as scope:  # about 40 KiB of 200 KiB sent
            await client.call("write", big)
        assert scope.cancelled_caught
        with trio.fail_after(10):
            assert await client.call("stats", {}) == "fine"
        assert not client.closed
        assert writes == [200_000]  # the cancelled request arrived whole
        nursery.cancel_scope.cancel()


async def test_a_peer_that_takes_nothing_in_loses_the_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    client = RpcClient(client_stream, default_timeout=5)

    async def hello_then_deaf() -> None:
        conn = Connection(Role.SERVER)
        while (event := conn.next_event()) is NEED_DATA:
            conn.receive_data(await server_stream.receive_some(65536))
        assert isinstance(event, Request) and event.method == "hello"
        await server_stream.send_all(conn.send_response(event.id, HELLO_INFO))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hello_then_deaf)
        await nursery.start(client.run)
        with trio.fail_after(60), pytest.raises(ConnectionLost, match="could not send"):
            await client.call("write", {"si": SI, "sharenum": 0, "chunks": [[0, b"x" * 100]]})
        assert client.closed
        assert trio.current_time() == pytest.approx(5)
        nursery.cancel_scope.cancel()


async def test_a_slow_peer_that_keeps_taking_pieces_keeps_the_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The call's timeout bounds each piece of a request, not the whole: 4 MB
    at 256 KiB a millisecond takes 16 ms, longer than the 10 ms timeout."""

    async def handler(method: str, args: dict[str, Any]) -> Any:
        return "fine"

    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rpc, server_stream, handler, lambda: HELLO_INFO)
        client = RpcClient(TricklingStream(client_stream, step=262144), default_timeout=0.010)
        await nursery.start(client.run)
        chunks = [[i * 1_000_000, b"x" * 1_000_000] for i in range(4)]
        assert await client.call("write", {"si": SI, "sharenum": 0, "chunks": chunks}) == "fine"
        assert not client.closed
        nursery.cancel_scope.cancel()


class RecordingStream(TricklingStream):
    """A trickling stream that also records the size of each send."""

    def __init__(self, inner: trio.abc.Stream, step: int = 1 << 20) -> None:
        super().__init__(inner, step)
        self.sends: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends.append(memoryview(data).nbytes)
        await super().send_all(data)


async def test_a_share_in_parts_arrives_whole_in_few_sends(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A Blob's parts are sent as they are, never joined into a frame first:
    its small parts (headers, proofs) go out joined with their neighbours,
    its blocks alone, and the server gets one bin of all of them."""
    got: list[bytes] = []

    async def handler(method: str, args: dict[str, Any]) -> Any:
        got.append(args["data"])
        return {"stored": True, "already": False}

    parts = []
    for _ in range(4):
        parts += [os.urandom(300), bytes(20), os.urandom(350_000)]
    parts.append(bytes(700))
    client_stream, server_stream = trio.testing.memory_stream_pair()
    recording = RecordingStream(client_stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rpc, server_stream, handler, lambda: HELLO_INFO)
        client = RpcClient(recording)
        await nursery.start(client.run)
        recording.sends.clear()
        args = {
            "si": SI,
            "sharenum": 1,
            "data": Blob(parts),
            "renew_secret": bytes(32),
            "cancel_secret": bytes(32),
        }
        await client.call("put_share", args)
        nursery.cancel_scope.cancel()
    assert got == [b"".join(parts)]
    # frame head + first small parts, then each block, each run of small parts
    assert len(recording.sends) == 9, recording.sends
    assert sorted(recording.sends)[-4:] == [350_000] * 4


@given(st.lists(st.integers(0, 3 << 20), max_size=12))
def test_sendable_keeps_the_bytes_in_order_and_bounds_each_send(sizes: list[int]) -> None:
    pieces = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    sends = list(sendable(pieces))
    assert b"".join(sends) == b"".join(pieces)
    assert all(0 < len(s) <= SEND_PIECE for s in sends)
    smalls = [len(s) < SMALL_PIECE for s in sends]
    assert not any(a and b for a, b in itertools.pairwise(smalls))


async def test_calls_waiting_their_turn_are_not_framed_yet(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Calls queued on a connection behind a long send hold their arguments,
    not frames of megabytes besides: a call's request is framed (and its
    TakenArgs let go of) only when its turn to send comes."""
    writes: list[int] = []

    async def handler(method: str, args: dict[str, Any]) -> Any:
        writes.append(len(args["chunks"][0][1]))
        return "fine"

    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_rpc, server_stream, handler, lambda: HELLO_INFO)
        client = RpcClient(TricklingStream(client_stream, step=65536))
        await nursery.start(client.run)
        first = {"si": SI, "sharenum": 0, "chunks": [[0, b"x" * 2_000_000]]}
        second = TakenArgs(si=SI, sharenum=1, chunks=[[0, b"y" * 1_000_000]])
        async with trio.open_nursery() as calls:
            calls.start_soon(client.call, "write", first)
            await trio.sleep(0.005)  # the first is sending, 64 KiB a millisecond
            calls.start_soon(client.call, "write", second)
            await trio.sleep(0.005)
            assert second["chunks"], "framed while the first call still sends"
        assert not second  # sent, then let go of
        assert writes == [2_000_000, 1_000_000]
        nursery.cancel_scope.cancel()


class BrokenStream(trio.abc.Stream):
    """A stream whose peer vanished: every operation fails like a reset TCP link."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.BrokenResourceError("connection reset")

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("connection reset")

    async def aclose(self) -> None:
        pass


async def test_serve_rpc_ends_quietly_on_a_broken_stream() -> None:
    async def handler(method: str, args: dict[str, Any]) -> Any:
        raise AssertionError("no request ever arrives")

    with trio.fail_after(10):
        await serve_rpc(BrokenStream(), handler, lambda: HELLO_INFO)  # must not raise


async def fake_server(stream: trio.abc.Stream, after_hello: bytes | None) -> None:
    """Answer hello with an error (after_hello is None) or accept it and then
    send ``after_hello`` as soon as another request arrives."""
    conn = Connection(Role.SERVER)
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
            continue
        assert isinstance(event, Request)
        if event.method == "hello":
            if after_hello is None:
                await stream.send_all(conn.send_error(event.id, "bad-request", "go away"))
                return
            await stream.send_all(conn.send_response(event.id, HELLO_INFO))
        else:
            assert after_hello is not None
            await stream.send_all(after_hello)
            await trio.sleep_forever()


async def test_refused_hello_fails_the_client_run() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = RpcClient(client_stream)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server, server_stream, None)
            with pytest.raises(ConnectionLost, match=r"handshake failed.*go away"):
                await client.run()
    assert client.closed


@pytest.mark.parametrize(
    "garbage",
    [b"\x00\x00\x00\x01\xc1", b"\xff\xff\xff\xff", frame([0, 1, "stats", {}]), frame([1, 999, 0])],
    ids=["undecodable", "oversize", "request", "unknown-id"],
)
async def test_server_breaking_the_protocol_fails_pending_calls(garbage: bytes) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client = RpcClient(client_stream)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server, server_stream, garbage)
            await nursery.start(client.run)
            with pytest.raises(ConnectionLost, match="broke the protocol"):
                await client.call("stats", {})
            with pytest.raises(ConnectionLost):
                await client.call("stats", {})
            nursery.cancel_scope.cancel()


# == (b) a real storage node over TLS ==============================================


def local_port(stream: tls.TlsStream | trio.SocketStream) -> int:
    tcp = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    port: int = tcp.socket.getsockname()[1]
    return port


@dataclass
class StorageServer:
    address: NodeAddress
    caplog: pytest.LogCaptureFixture
    ended: dict[int, BaseException | None] = field(default_factory=dict)
    """How each server-side connection ended (by client port): None if cleanly."""
    _changed: trio.Event = field(default_factory=trio.Event)

    def record_end(self, port: int, outcome: BaseException | None) -> None:
        self.ended[port] = outcome
        self._changed.set()
        self._changed = trio.Event()

    async def connection_ended(self, port: int) -> None:
        """Wait for the server's side of one connection to end, and check it
        ended without an error escaping serve_rpc."""
        with trio.fail_after(10):
            while port not in self.ended:
                await self._changed.wait()
        assert self.ended[port] is None, f"serve_rpc raised {self.ended[port]!r}"

    def assert_no_failures(self) -> None:
        assert [e for e in self.ended.values() if e is not None] == []
        logged = [r for r in self.caplog.records if r.name == "gridfs.node"]
        assert [r.getMessage() for r in logged if r.levelno >= logging.ERROR] == []

    async def assert_healthy(self) -> None:
        """A fresh, well-behaved client is served, and its connection ends cleanly."""
        with trio.fail_after(10):
            stream = await tls.connect(self.address, MEMBERS.client())
            port = local_port(stream)
            client = RpcClient(stream, default_timeout=10)
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                stats = await client.call("stats", {})
                await client.aclose()
            await self.connection_ended(port)
        assert client.hello is not None
        assert client.hello["node_id"] == self.address.node_id
        assert stats["reserved"] == 0 and stats["total"] > 0
        self.assert_no_failures()


@pytest.fixture
def storage_dir(tmp_path: Path) -> NodeDir:
    node = NodeDir(tmp_path / "s")
    node.create(NodeConfig("storage", "s1", reserved_space=0))
    MEMBERS.enroll(node, "storage")
    return node


@contextlib.asynccontextmanager
async def storage_server(
    node: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[StorageServer]:
    """Run a real storage node, recording how each of its connections ends."""
    server: StorageServer | None = None

    async def recording_serve_rpc(stream: tls.TlsStream, *args: Any, **kwargs: Any) -> None:
        assert server is not None
        port = stream.transport_stream.socket.getpeername()[1]
        try:
            await serve_rpc(stream, *args, **kwargs)
        except BaseException as e:
            server.record_end(port, e)
            raise
        server.record_end(port, None)

    monkeypatch.setattr(gridfs.node, "serve_rpc", recording_serve_rpc)
    caplog.set_level(logging.INFO, logger="gridfs")
    async with trio.open_nursery() as nursery:
        address = await nursery.start(run_storage, node)
        server = StorageServer(address, caplog)
        yield server
        server.assert_no_failures()
        nursery.cancel_scope.cancel()


async def test_stats_and_get_buckets_over_tls(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with storage_server(storage_dir, monkeypatch, caplog) as server:
        with trio.fail_after(10):
            stream = await tls.connect(server.address, MEMBERS.client())
            port = local_port(stream)
            client = RpcClient(stream)
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                assert client.hello is not None
                assert client.hello["kind"] == "storage"
                assert client.hello["node_id"] == server.address.node_id
                assert client.hello["limits"]["max_frame"] == MAX_FRAME

                stats = await client.call("stats", {})
                assert set(stats) >= {"total", "free", "available", "used", "reserved"}
                assert stats["used"] == 0
                assert await client.call("get_buckets", {"si": os.urandom(16)}) == []
                with pytest.raises(RemoteError) as caught:
                    await client.call("get_buckets", {"si": b"short"})
                assert caught.value.code == "bad-request"
                with pytest.raises(RemoteError) as caught:
                    await client.call("read", read_args())
                assert caught.value.code == "no-such-share"
                assert await client.call("get_buckets", {"si": SI}) == []
                await client.aclose()
            # The client hung up without a TLS goodbye; the server takes it calmly.
            await server.connection_ended(port)


async def test_a_node_with_another_key_is_refused(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with storage_server(storage_dir, monkeypatch, caplog) as server:
        impostor = NodeAddress(bytes(20), server.address.host, server.address.port)
        assert impostor.node_id != server.address.node_id
        with trio.fail_after(10), pytest.raises(tls.WrongNodeError):
            await tls.connect(impostor, MEMBERS.client())
        await server.assert_healthy()


# == (c) abusing the real node ======================================================


async def open_raw(address: NodeAddress) -> trio.SSLStream[trio.SocketStream]:
    tcp = await trio.open_tcp_stream(address.host, address.port)
    stream = trio.SSLStream(tcp, MEMBERS.client().client, server_hostname=None)
    await stream.do_handshake()
    return stream


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    with contextlib.suppress(trio.BrokenResourceError):  # a hang-up without TLS goodbye
        while data := await stream.receive_some(65536):
            received += data
    return bytes(received)


async def send_ignoring_hangup(stream: trio.abc.SendStream, data: bytes) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(data)


def must_hang_up(data: bytes) -> bool:
    """Whether a server must close the connection after ``data``, by the sans-I/O
    model.  The model answers each request at once, as fast as any server could,
    so what it finds wrong is wrong whatever the timing."""
    model = Connection(Role.SERVER)
    if data:  # (no data would mean EOF)
        model.receive_data(data)
    try:
        while (event := model.next_event()) is not NEED_DATA:
            assert isinstance(event, Request | BadRequest)
            model.send_error(event.id, "x", "")
    except RemoteProtocolError:
        return True
    return False


async def abuse(server: StorageServer, data: bytes, *, goodbye: bool = False) -> bytes:
    """Send ``data`` on a fresh TLS connection; if the server must hang up on
    it, wait for that (else leave at once, with or without a TLS goodbye).  The
    server's side must end cleanly, and the server must still serve others.
    Returns what the server sent back."""
    hang_up = must_hang_up(data)
    received = b""
    with trio.fail_after(10):
        stream = await open_raw(server.address)
        port = local_port(stream)
        try:
            await send_ignoring_hangup(stream, data)
            if hang_up:
                received = await read_until_closed(stream)
        finally:
            if goodbye:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.aclose()
            else:
                await trio.aclose_forcefully(stream)
        await server.connection_ended(port)
    await server.assert_healthy()
    return received


def test_the_model_knows_what_must_be_hung_up_on() -> None:
    assert must_hang_up(b"\xff\xff\xff\xff")
    assert must_hang_up(frame([0, 1, "stats", {}]))
    assert must_hang_up(HELLO + frame([0, 1, "stats"]))
    assert not must_hang_up(HELLO + HELLO[:-1])
    assert not must_hang_up(HELLO + frame([0, 2, "nosuch", {}]))


async def test_requests_before_hello_are_hung_up_on(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with storage_server(storage_dir, monkeypatch, caplog) as server:
        received = await abuse(server, frame([0, 1, "stats", {}]) + frame([0, 2, "stats", {}]))
        assert received == b""  # not one answer


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 2**32 - 1])
async def test_oversize_header_is_hung_up_on_without_waiting_for_the_body(
    storage_dir: NodeDir,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    length: int,
) -> None:
    async with storage_server(storage_dir, monkeypatch, caplog) as server:
        client = Connection(Role.CLIENT)
        hello_id, hello = client.send_request("hello", hello_args())
        with trio.fail_after(10):
            stream = await open_raw(server.address)
            port = local_port(stream)
            await stream.send_all(hello)
            answers: list[Any] = []
            while not answers:
                answers = drain(client, await stream.receive_some(65536))
            assert isinstance(answers[0], Response) and answers[0].id == hello_id

            await stream.send_all(struct.pack(">I", length) + b"\x00" * 100)
            assert await read_until_closed(stream) == b""
            await trio.aclose_forcefully(stream)
            await server.connection_ended(port)
        await server.assert_healthy()


@pytest.mark.parametrize("goodbye", [True, False], ids=["tls-goodbye", "tcp-close"])
async def test_truncated_frame_then_leaving(
    storage_dir: NodeDir,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    goodbye: bool,
) -> None:
    async with storage_server(storage_dir, monkeypatch, caplog) as server:
        cut = frame([0, 2, "read", read_args()])[:-3]
        assert not must_hang_up(HELLO + cut)
        await abuse(server, HELLO + cut, goodbye=goodbye)
        await abuse(server, cut[:2], goodbye=goodbye)


async def test_plaintext_garbage_instead_of_tls(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    noise = b"\x00" + random.Random(3).randbytes(3000)  # 0x00 is no TLS record type
    async with storage_server(storage_dir, monkeypatch, caplog) as server:
        for garbage in [b"GET / HTTP/1.1\r\n\r\n", HELLO, noise]:
            with trio.fail_after(5):
                tcp = await trio.open_tcp_stream(server.address.host, server.address.port)
                await send_ignoring_hangup(tcp, garbage)
                await read_until_closed(tcp)  # the failed TLS handshake ends it
                await tcp.aclose()
            await server.assert_healthy()


async def test_flood_of_requests_without_reading_replies(
    storage_dir: NodeDir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = Connection(Role.CLIENT)
    ids, frames = [], []
    for method in ["hello"] + ["stats"] * 3000:
        rid, data = client.send_request(method, hello_args() if method == "hello" else {})
        ids.append(rid)
        frames.append(data)

    async with storage_server(storage_dir, monkeypatch, caplog) as server:
        with trio.fail_after(30):
            stream = await open_raw(server.address)
            port = local_port(stream)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, b"".join(frames))
                # While the flooder reads nothing, others are still served...
                await server.assert_healthy()
                # ...and the flooder's every request was answered.
                answers: list[Any] = []
                while len(answers) < len(ids):
                    answers += drain(client, await stream.receive_some(65536))
            assert [a.id for a in answers] == ids
            assert all(isinstance(a, Response) for a in answers)

            # Flood again, and leave without reading a single reply.
            with trio.move_on_after(5):  # the server may stop reading: that is fine
                await stream.send_all(b"".join(frames[1:]))
            await trio.aclose_forcefully(stream)
            await server.connection_ended(port)
        await server.assert_healthy()


@FUZZ
@given(st.booleans(), st.lists(hostile_pieces, min_size=1, max_size=5), st.booleans())
async def test_fuzzed_frames_never_hurt_the_server(
    storage_dir: NodeDir,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    say_hello: bool,
    pieces: list[bytes],
    goodbye: bool,
) -> None:
    data = (HELLO if say_hello else b"") + b"".join(pieces)
    hypothesis.event("must hang up" if must_hang_up(data) else "may wait for more")
    async with storage_server(storage_dir, monkeypatch, caplog) as server:
        await abuse(server, data, goodbye=goodbye)


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=4))
async def test_random_bodies_after_hello_never_hurt_the_server(
    storage_dir: NodeDir,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    bodies: list[bytes],
) -> None:
    # Random bodies in honest length prefixes reach the msgpack decoder.
    data = HELLO + b"".join(struct.pack(">I", len(b)) + b for b in bodies)
    hypothesis.event("must hang up" if must_hang_up(data) else "may wait for more")
    async with storage_server(storage_dir, monkeypatch, caplog) as server:
        await abuse(server, data)
