"""The sans-I/O RPC connection, byte for byte: two Connections wired together
by handing the bytes one produces to the other (no sockets)."""

from __future__ import annotations

import random
import struct
import time
import tracemalloc
from typing import Any

import hypothesis
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gridfs.hashes import STORAGE_INDEX_SIZE
from gridfs.protocol.connection import (
    MAX_ARRAY,
    MAX_HELLO_ANSWER,
    MAX_HELLO_FRAME,
    MAX_ID,
    MAX_MAP,
    MAX_OBJECTS,
    MAX_STR,
    NEED_DATA,
    BadRequest,
    Closed,
    Connection,
    ErrorReply,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    hello_args,
    unpack_bounded,
)
from gridfs.protocol.schema import (
    MAX_ANNOUNCEMENT,
    MAX_BUCKETS,
    MAX_CHUNKS,
    MAX_FRAME,
    MAX_LEASES,
    MAX_READ,
    MAX_U64,
    MAX_WRITE,
    PROTOCOL_NAME,
    PROTOCOL_VERSION,
    REQUESTS,
    validate_request,
)

SI = bytes(range(STORAGE_INDEX_SIZE))
LEASE = {"renew_secret": b"r" * 32, "cancel_secret": b"c" * 32}
AnyEvent = Request | BadRequest | Response | ErrorReply | Closed


# -- wiring ------------------------------------------------------------------


def frame(msg: Any) -> bytes:
    """A well-framed message, built without a Connection (so it can be wrong)."""
    return raw_frame(msgpack.packb(msg, use_bin_type=True))


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def drain(conn: Connection, data: bytes | bytearray = b"") -> list[AnyEvent]:
    """Feed ``data`` and return every event up to NEED_DATA (or Closed)."""
    if data:
        conn.receive_data(data)
    out: list[AnyEvent] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return out
        assert isinstance(event, AnyEvent), event
        out.append(event)
        if isinstance(event, Closed):
            return out


def only_event(conn: Connection, data: bytes | bytearray) -> AnyEvent:
    events = drain(conn, data)
    assert len(events) == 1, events
    return events[0]


def send_eof(conn: Connection) -> list[AnyEvent]:
    conn.receive_data(b"")
    return drain(conn)


def ids(events: list[AnyEvent]) -> list[int]:
    """The request ids of ``events``, which must all be about a request."""
    out = []
    for e in events:
        assert not isinstance(e, Closed)
        out.append(e.id)
    return out


def handshaken_pair() -> tuple[Connection, Connection]:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    rid, data = client.send_request("hello", hello_args())
    assert only_event(server, data) == Request(rid, "hello", hello_args())
    assert server.handshaken
    assert only_event(client, server.send_response(rid, {"kind": "storage"})) == Response(
        rid, {"kind": "storage"}
    )
    assert client.handshaken
    return client, server


def request(client: Connection, server: Connection, method: str, args: Any) -> Request | BadRequest:
    """Send one request from ``client`` and return what ``server`` makes of it."""
    rid, data = client.send_request(method, args)
    event = only_event(server, data)
    assert isinstance(event, Request | BadRequest)
    assert event.id == rid
    return event


def plain(value: Any) -> Any:
    """``value`` as msgpack gives it back: tuples become lists."""
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# -- the happy path ------------------------------------------------------------


def test_hello_then_request_and_response() -> None:
    client, server = handshaken_pair()
    event = request(client, server, "get_buckets", {"si": SI})
    assert event == Request(event.id, "get_buckets", {"si": SI})
    assert server.incoming == {event.id}
    assert client.outstanding == {event.id: "get_buckets"}

    answer = only_event(client, server.send_response(event.id, [[0, 1000], [3, 1000]]))
    assert answer == Response(event.id, [[0, 1000], [3, 1000]])
    assert client.outstanding == {}
    assert server.incoming == set()


def test_requests_may_follow_hello_before_its_answer() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    hello_id, hello = client.send_request("hello", hello_args())
    stats_id, stats = client.send_request("stats", {})
    events = drain(server, hello + stats)
    assert [type(e) for e in events] == [Request, Request]
    assert ids(events) == [hello_id, stats_id]
    assert [e.method for e in events if isinstance(e, Request)] == ["hello", "stats"]


def test_client_refuses_to_send_anything_before_hello() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send_request("stats", {})
    assert client.outstanding == {}


def test_many_requests_in_flight_answered_out_of_order() -> None:
    client, server = handshaken_pair()
    sent: dict[int, int] = {}
    wire = b""
    for offset in range(200):
        rid, data = client.send_request(
            "read", {"si": SI, "sharenum": 1, "offset": offset, "length": 10}
        )
        sent[rid] = offset
        wire += data
    assert len(sent) == 200  # every outstanding request has its own id

    requests = drain(server, wire)  # all of them in one read
    assert ids(requests) == list(sent)
    random.Random(7).shuffle(requests)
    replies = b"".join(
        server.send_response(r.id, f"at {r.args['offset']}")
        for r in requests
        if isinstance(r, Request)
    )
    answers = drain(client, replies)
    assert ids(answers) == ids(requests)  # order of the replies
    for a in answers:
        assert isinstance(a, Response)
        assert a.result == f"at {sent[a.id]}"
    assert client.outstanding == {}
    assert server.incoming == set()


def test_error_reply_reaches_the_caller() -> None:
    client, server = handshaken_pair()
    event = request(client, server, "read", {"si": SI, "sharenum": 2, "offset": 0, "length": 5})
    reply = only_event(client, server.send_error(event.id, "no-such-share", "share 2 is absent"))
    assert reply == ErrorReply(event.id, "no-such-share", "share 2 is absent")
    assert client.outstanding == {}


def test_error_reply_code_and_message_are_truncated() -> None:
    client, server = handshaken_pair()
    event = request(client, server, "stats", {})
    reply = only_event(client, server.send_error(event.id, "c" * 500, "m" * 50_000))
    assert isinstance(reply, ErrorReply)
    assert reply.code == "c" * 64
    assert reply.message == "m" * 1000


def test_answering_is_once_per_request() -> None:
    client, server = handshaken_pair()
    event = request(client, server, "stats", {})
    server.send_response(event.id, {})
    with pytest.raises(LocalProtocolError):
        server.send_response(event.id, {})
    with pytest.raises(LocalProtocolError):
        server.send_error(event.id + 1, "x", "never asked")


def test_an_unsendable_answer_leaves_the_request_answerable() -> None:
    """A handler result msgpack cannot carry (or too big for a frame) must not
    use up the request: the server still owes, and can send, an error reply."""
    client, server = handshaken_pair()
    event = request(client, server, "stats", {})
    with pytest.raises(TypeError):
        server.send_response(event.id, object())
    with pytest.raises(LocalProtocolError):
        server.send_response(event.id, b"x" * (MAX_FRAME + 1))
    assert server.incoming == {event.id}
    reply = only_event(client, server.send_error(event.id, "internal", "TypeError"))
    assert reply == ErrorReply(event.id, "internal", "TypeError")


def test_only_clients_send_requests() -> None:
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).send_request("hello", hello_args())


def test_oversize_request_is_refused_locally() -> None:
    client, _ = handshaken_pair()
    too_big = {"announcement": b"a" * (MAX_FRAME + 1), "signature": b"s" * 64}
    with pytest.raises(LocalProtocolError):
        client.send_request("announce", too_big)
    with pytest.raises(TypeError):
        client.send_request("stats", {"x": object()})
    assert client.outstanding == {}  # nothing was sent, so nothing is awaited


def test_request_ids_wrap_around_and_skip_outstanding_ones() -> None:
    client, _ = handshaken_pair()
    first, _ = client.send_request("stats", {})
    client._next_id = MAX_ID
    ids = [client.send_request("stats", {})[0] for _ in range(3)]
    assert ids[0] == MAX_ID
    assert first not in ids[1:]
    assert all(0 < i <= MAX_ID for i in ids)
    assert len(set(ids) | {first}) == 4


# -- the handshake -------------------------------------------------------------


def test_request_before_hello_is_a_protocol_error() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError, match="first request must be hello"):
        drain(server, frame([0, 1, "stats", {}]))
    assert isinstance(server.next_event(), Closed)  # the connection is dead


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        ({"protocol": "tahoe", "versions": [PROTOCOL_VERSION]}, "this server speaks"),
        ({"protocol": PROTOCOL_NAME, "versions": [PROTOCOL_VERSION + 1]}, "this server speaks"),
        ({"protocol": PROTOCOL_NAME, "versions": []}, "this server speaks"),
        ({"protocol": PROTOCOL_NAME}, "missing"),
        ({"protocol": PROTOCOL_NAME, "versions": [-1]}, "unsigned"),
        ({"protocol": "p" * 65, "versions": [PROTOCOL_VERSION]}, "short string"),
    ],
)
def test_unacceptable_hello_is_refused(args: dict[str, Any], reason: str) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    rid, data = client.send_request("hello", args)
    event = only_event(server, data)
    assert isinstance(event, BadRequest)
    assert (event.id, event.method) == (rid, "hello")
    assert reason in event.reason
    assert not server.handshaken

    reply = only_event(client, server.send_error(rid, "bad-request", event.reason))
    assert isinstance(reply, ErrorReply)
    # A refused hello is no handshake, on either side.
    assert not client.handshaken
    with pytest.raises(LocalProtocolError):
        client.send_request("stats", {})
    with pytest.raises(RemoteProtocolError):
        drain(server, frame([0, rid + 1, "stats", {}]))


def test_second_hello_is_a_bad_request() -> None:
    client, server = handshaken_pair()
    event = request(client, server, "hello", hello_args())
    assert isinstance(event, BadRequest)
    assert "already" in event.reason
    assert server.handshaken


# -- framing -------------------------------------------------------------------


@pytest.mark.parametrize("length", [MAX_FRAME + 1, 2**32 - 1])
def test_oversize_frame_is_rejected_from_its_header_alone(length: int) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(struct.pack(">I", length))  # no body has arrived
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        server.next_event()


def padded_request(rid: int, size: int) -> bytes:
    """A request frame (for an unknown method) whose body is exactly ``size`` bytes."""
    for n in range(size):
        body = msgpack.packb([0, rid, "m" * n, {}])
        if len(body) == size:
            return raw_frame(body)
    raise AssertionError(f"no request body of {size} bytes")


def test_frame_limit_is_inclusive() -> None:
    limit = 64
    server = Connection(Role.SERVER, max_frame=limit)
    assert isinstance(only_event(server, frame([0, 1, "hello", hello_args()])), Request)
    assert isinstance(only_event(server, padded_request(2, limit)), BadRequest)
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        drain(server, padded_request(3, limit + 1))


@pytest.mark.parametrize(
    "body",
    [
        b"",  # an empty frame
        b"\xc1",  # a byte msgpack never uses
        b"\x94\x00\x01",  # an array of 4 that ends after 2 items
        msgpack.packb([0, 1, "hello", hello_args()]) + b"\x00",  # trailing bytes
        msgpack.packb(msgpack.ExtType(5, b"ext")),  # extension types are refused
        msgpack.packb({1: "integer keys"}),  # non-string map keys are refused
        b"\xdd\xff\xff\xff\xff",  # an array claiming 4 billion items
    ],
)
def test_undecodable_frame_is_a_protocol_error(body: bytes) -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        drain(server, raw_frame(body))


@pytest.mark.parametrize(
    "msg",
    [
        {"kind": 0},
        7,
        "request",
        [],
        ["0", 1, "hello", {}],
        [True, 1, "hello", hello_args()],  # a bool is not a kind
        [3, 1, "hello", hello_args()],
        [0, 1, "hello"],
        [0, 1, "hello", hello_args(), "extra"],
        [0, 0, "hello", hello_args()],  # id 0 is reserved
        [0, -1, "hello", hello_args()],
        [0, MAX_ID + 1, "hello", hello_args()],
        [0, "1", "hello", hello_args()],
        [0, 1.0, "hello", hello_args()],
        [0, 1, b"hello", hello_args()],  # a method is text
        [0, 1, None, hello_args()],
        [1, 1, "result"],  # servers receive no answers
        [2, 1, "code", "message"],
    ],
)
def test_malformed_frame_to_server_is_a_protocol_error(msg: Any) -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        drain(server, frame(msg))
    assert isinstance(server.next_event(), Closed)


@pytest.mark.parametrize(
    "msg",
    [
        [0, 5, "stats", {}],  # servers send no requests
        [1, 99, "an answer to nothing"],
        [2, 99, "code", "message"],
        [1, "1", "result"],
        [1, 1],
        [1, 1, "result", "extra"],
        [2, 1, 5, "message"],
        [2, 1, "code", None],
        [2, 1, "code"],
    ],
)
def test_malformed_frame_to_client_is_a_protocol_error(msg: Any) -> None:
    client, _ = handshaken_pair()
    client.send_request("stats", {})  # id 2 outstanding, not 1 nor 99
    with pytest.raises(RemoteProtocolError):
        drain(client, frame(msg))


def test_second_answer_to_the_same_request_is_a_protocol_error() -> None:
    client, server = handshaken_pair()
    event = request(client, server, "stats", {})
    answer = server.send_response(event.id, {})
    assert isinstance(only_event(client, answer), Response)
    with pytest.raises(RemoteProtocolError, match="unknown request id"):
        drain(client, answer)


def test_duplicate_request_id_is_a_protocol_error() -> None:
    _, server = handshaken_pair()
    first = only_event(server, frame([0, 10, "stats", {}]))
    assert isinstance(first, Request)
    with pytest.raises(RemoteProtocolError, match="already in use"):
        drain(server, frame([0, 10, "stats", {}]))


def test_request_id_may_be_reused_once_answered() -> None:
    _, server = handshaken_pair()
    assert isinstance(only_event(server, frame([0, 10, "stats", {}])), Request)
    server.send_response(10, {})
    assert isinstance(only_event(server, frame([0, 10, "stats", {}])), Request)


def test_duplicate_id_of_a_bad_request_is_still_a_protocol_error() -> None:
    """A BadRequest is owed an answer too, so its id stays in use."""
    _, server = handshaken_pair()
    assert isinstance(only_event(server, frame([0, 10, "nosuch", {}])), BadRequest)
    with pytest.raises(RemoteProtocolError):
        drain(server, frame([0, 10, "stats", {}]))


# -- argument checks -----------------------------------------------------------

READ = {"si": SI, "sharenum": 0, "offset": 0, "length": 10}
BAD_ARGS: list[tuple[str, Any, str]] = [
    (
        "write",
        {"si": SI, "sharenum": 0, "chunks": [[0, b"x" * MAX_WRITE], [MAX_WRITE, b"y"]]},
        "at most",
    ),
    (
        "write",
        {"si": SI, "sharenum": 0, "chunks": [[i, b""] for i in range(MAX_CHUNKS + 1)]},
        "chunks",
    ),
    ("write", {"si": SI, "sharenum": 0, "chunks": []}, "chunks"),
    ("write", {"si": SI, "sharenum": 0, "chunks": [[0, b"x", 1]]}, "[offset, data]"),
    ("write", {"si": SI, "sharenum": 0, "chunks": [[-1, b"x"]]}, "unsigned"),
    ("write", {"si": SI, "sharenum": 0, "chunks": [[0, "text"]]}, "bytes"),
    ("get_buckets", {"si": SI[:15]}, "wrong length"),
    ("get_buckets", {"si": SI + b"!"}, "wrong length"),
    ("get_buckets", {"si": SI.hex()}, "expected bytes"),
    ("close", {"si": SI, "sharenum": 256}, "share number"),
    ("close", {"si": SI, "sharenum": -1}, "share number"),
    ("close", {"si": SI, "sharenum": True}, "share number"),
    ("allocate_buckets", {"si": SI, "sharenums": [1, 2, 1], "share_size": 10, **LEASE}, "repeated"),
    (
        "allocate_buckets",
        {"si": SI, "sharenums": list(range(MAX_BUCKETS)) * 2, "share_size": 1, **LEASE},
        "at most",
    ),
    ("allocate_buckets", {"si": SI, "sharenums": [1], "share_size": -5, **LEASE}, "unsigned"),
    ("allocate_buckets", {"si": SI, "sharenums": [1], "share_size": 5}, "unexpected or missing"),
    (
        "allocate_buckets",
        {"si": SI, "sharenums": [1], "share_size": 5, **LEASE, "cancel_secret": b"c" * 31},
        "wrong length",
    ),
    ("add_leases", {"leases": [[SI, b"r" * 32]]}, "expected a list of 3"),
    ("add_leases", {"leases": [[SI, b"r" * 32, b"c" * 32]] * (MAX_LEASES + 1)}, "at most"),
    ("cancel_leases", {"leases": [[SI, b"c" * 33]], "renewed_before": 0}, "wrong length"),
    ("cancel_leases", {"leases": [], "renewed_before": -1}, "unsigned"),
    ("read", {**READ, "length": MAX_READ + 1}, "at most"),
    ("read", {**READ, "offset": 1.5}, "unsigned"),
    ("announce", {"announcement": b"a" * (MAX_ANNOUNCEMENT + 1), "signature": b"s" * 64}, "length"),
    ("announce", {"announcement": b"a", "signature": b"s" * 63}, "length"),
    ("rm_rf", {}, "unknown method"),
    ("_secret", {}, "unknown method"),
    ("read", {**READ, "extra": 1}, "unexpected or missing"),
    ("read", {"si": SI, "sharenum": 0, "offset": 0}, "unexpected or missing"),
    ("stats", {"verbose": True}, "unexpected or missing"),
    ("stats", [], "must be a map"),
    ("stats", None, "must be a map"),
]


@pytest.mark.parametrize(
    ("method", "args", "reason"), BAD_ARGS, ids=[f"{m}-{r}" for m, _, r in BAD_ARGS]
)
def test_bad_arguments_are_a_bad_request_not_an_error(method: str, args: Any, reason: str) -> None:
    client, server = handshaken_pair()
    event = request(client, server, method, args)
    assert isinstance(event, BadRequest)
    assert event.method == method
    assert reason in event.reason
    assert len(event.reason) < 200
    # The connection is fine: the bad request is answered, the next one served.
    reply = only_event(client, server.send_error(event.id, "bad-request", event.reason))
    assert reply == ErrorReply(event.id, "bad-request", event.reason)
    assert isinstance(request(client, server, "stats", {}), Request)


def test_unknown_method_name_is_cut_short_in_the_event() -> None:
    _, server = handshaken_pair()
    event = only_event(server, frame([0, 5, "m" * 5000, {}]))
    assert isinstance(event, BadRequest)
    assert event.method == "m" * 40
    assert len(event.reason) < 100


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("write", {"si": SI, "sharenum": 255, "chunks": [[0, b"x" * MAX_WRITE]]}),
        ("write", {"si": SI, "sharenum": 0, "chunks": [[i, b"z"] for i in range(MAX_CHUNKS)]}),
        ("write", {"si": SI, "sharenum": 0, "chunks": [[MAX_U64, b""]]}),
        ("read", {**READ, "length": MAX_READ}),
        ("read", {**READ, "offset": MAX_U64, "length": 0}),
        (
            "allocate_buckets",
            {"si": SI, "sharenums": list(range(MAX_BUCKETS)), "share_size": 0, **LEASE},
        ),
        ("allocate_buckets", {"si": SI, "sharenums": [], "share_size": MAX_U64, **LEASE}),
        ("add_leases", {"leases": [[SI, b"r" * 32, b"c" * 32]] * MAX_LEASES}),
        ("cancel_leases", {"leases": [[SI, b"c" * 32]] * MAX_LEASES, "renewed_before": MAX_U64}),
        ("announce", {"announcement": b"a" * MAX_ANNOUNCEMENT, "signature": b"s" * 64}),
    ],
)
def test_arguments_at_the_limits_are_accepted(method: str, args: dict[str, Any]) -> None:
    client, server = handshaken_pair()
    event = request(client, server, method, args)
    assert isinstance(event, Request), event
    assert plain(event.args) == args


# -- bounded parsing -------------------------------------------------------------


def empty_arrays(size: int, width: int = 4096) -> bytes:
    """A frame body of about ``size`` bytes that is nothing but empty arrays:
    one byte each, some 64 bytes each as Python lists."""
    inner = b"\xdd" + struct.pack(">I", width) + b"\x90" * width
    count = max(1, size // len(inner))
    return b"\xdd" + struct.pack(">I", count) + inner * count


def decoding_cost(conn: Connection, data: bytes) -> tuple[float, int, str]:
    """CPU seconds and peak bytes allocated (beyond ``data``) while ``conn``
    takes in ``data``, and the protocol error it raised."""
    tracemalloc.start()
    started = time.process_time()
    try:
        conn.receive_data(data)
        with pytest.raises(RemoteProtocolError) as caught:
            drain(conn)
        cpu = time.process_time() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return cpu, peak - len(data), str(caught.value)


def padded_hello(size: int) -> bytes:
    """A hello frame (with a field too many) whose body is exactly ``size`` bytes."""
    for n in range(size):
        body = msgpack.packb([0, 1, "hello", {**hello_args(), "pad": "x" * n}])
        if len(body) == size:
            return raw_frame(body)
    raise AssertionError(f"no hello body of {size} bytes")


def test_a_stranger_may_send_only_a_small_frame_before_hello() -> None:
    server = Connection(Role.SERVER)
    assert server.frame_limit == MAX_HELLO_FRAME
    event = only_event(server, padded_hello(MAX_HELLO_FRAME))  # read and parsed
    assert isinstance(event, BadRequest) and "unexpected" in event.reason

    server = Connection(Role.SERVER)
    server.receive_data(padded_hello(MAX_HELLO_FRAME + 1)[:4])  # the header alone
    with pytest.raises(RemoteProtocolError, match="before hello exceeds the 4096 limit"):
        server.next_event()


def test_the_frame_limit_grows_to_max_frame_once_hello_is_done() -> None:
    client, server = handshaken_pair()
    assert server.frame_limit == client.frame_limit == MAX_FRAME
    assert isinstance(only_event(server, padded_request(2, MAX_HELLO_FRAME + 1)), BadRequest)


def test_a_client_takes_a_hello_answer_up_to_its_own_limit() -> None:
    assert Connection(Role.CLIENT).frame_limit == MAX_HELLO_ANSWER
    info = {"mountpoint": "/m" * 2000}  # a hello answer bigger than a hello request may be
    for limit, accepted in [(MAX_HELLO_ANSWER, True), (4000, False)]:
        client = Connection(Role.CLIENT, max_hello_frame=limit)
        rid, _ = client.send_request("hello", hello_args())
        answer = frame([1, rid, info])
        assert 4000 < len(answer) < MAX_HELLO_ANSWER
        if accepted:
            assert only_event(client, answer) == Response(rid, info)
        else:
            with pytest.raises(RemoteProtocolError, match="before hello"):
                drain(client, answer)


def test_a_megabyte_of_empty_arrays_before_hello_is_refused_unread() -> None:
    data = raw_frame(empty_arrays(1_000_000))
    cpu, peak, error = decoding_cost(Connection(Role.SERVER), data)
    assert "before hello exceeds" in error  # refused by its header: nothing decoded
    assert cpu < 0.05 and peak < 64 * 1024  # (decoded, it cost ~195 ms and ~61 MiB)


@pytest.mark.parametrize("shape", ["arrays", "maps", "small ints", "strings"])
def test_a_frame_of_countless_small_objects_after_hello_is_refused_cheaply(shape: str) -> None:
    items = {"arrays": b"\x90", "maps": b"\x80", "small ints": b"\xe0", "strings": b"\xa2ab"}
    item = items[shape]
    width = 4096
    inner = b"\xdd" + struct.pack(">I", width) + item * width
    body = b"\xdd" + struct.pack(">I", MAX_FRAME // len(inner)) + inner * (MAX_FRAME // len(inner))
    _, server = handshaken_pair()
    cpu, peak, error = decoding_cost(server, raw_frame(body))
    assert f"more than {MAX_OBJECTS} objects" in error
    # Decoded in full, 4 MiB of empty arrays made ~244 MiB of lists in ~1 s.
    assert peak < 8 * 2**20, peak
    assert cpu < 0.5, cpu


def test_the_object_bound_is_inclusive() -> None:
    # Each array or map counts itself and its items: 31 + 2 + 5 = 38.
    body = msgpack.packb([0, 2, "m", {"a": list(range(30))}])
    for bound, ok in [(38, True), (37, False)]:
        server = Connection(Role.SERVER, max_objects=bound)
        assert isinstance(only_event(server, frame([0, 1, "hello", hello_args()])), Request)
        if ok:
            assert isinstance(only_event(server, raw_frame(body)), BadRequest)
        else:
            with pytest.raises(RemoteProtocolError, match=f"more than {bound} objects"):
                drain(server, raw_frame(body))


@pytest.mark.parametrize(
    "body",
    [
        b"\x91" * 5000 + b"\x90",  # arrays nested 5000 deep
        b"\x81\xa1k" * 5000 + b"\xc0",  # maps nested 5000 deep
        b"\xdd" + struct.pack(">I", MAX_ARRAY + 1) + b"\x90" * (MAX_ARRAY + 1),
        b"\xdf\xff\xff\xff\xff",  # a map claiming 4 billion pairs
        b"\xc6\xff\xff\xff\xff" + b"x" * 10,  # a bin claiming 4 GiB
        b"\xdb\xff\xff\xff\xff" + b"x" * 10,  # a string claiming 4 GiB
    ],
    ids=["deep-arrays", "deep-maps", "long-array", "huge-map", "huge-bin", "huge-str"],
)
def test_deep_or_huge_count_frames_after_hello_are_protocol_errors(body: bytes) -> None:
    _, server = handshaken_pair()
    data = raw_frame(body)
    cpu, peak, _ = decoding_cost(server, data)
    assert peak < 2**20 and cpu < 0.1


@pytest.mark.parametrize(
    ("at_bound", "over"),
    [
        (list(range(MAX_ARRAY)), list(range(MAX_ARRAY + 1))),
        ({f"k{i}": 0 for i in range(MAX_MAP)}, {f"k{i}": 0 for i in range(MAX_MAP + 1)}),
        ("s" * MAX_STR, "s" * (MAX_STR + 1)),
    ],
    ids=["array", "map", "str"],
)
def test_container_and_string_bounds_are_inclusive(at_bound: Any, over: Any) -> None:
    assert unpack_bounded(msgpack.packb(at_bound)) == at_bound
    with pytest.raises(ValueError):
        unpack_bounded(msgpack.packb(over))


def test_a_write_of_max_chunks_stays_within_the_object_bound() -> None:
    client, server = handshaken_pair()
    chunks = [[i, b"z"] for i in range(MAX_CHUNKS)]
    args = {"si": SI, "sharenum": 0, "chunks": chunks}
    assert isinstance(request(client, server, "write", args), Request)
    assert 3 * MAX_CHUNKS + 10 < MAX_OBJECTS


# -- end of stream and delivery ----------------------------------------------------


@pytest.mark.parametrize("cut", [1, 3, 4, 10])
def test_eof_in_the_middle_of_a_frame_is_a_protocol_error(cut: int) -> None:
    _, server = handshaken_pair()
    server.receive_data(frame([0, 9, "stats", {}])[:cut])
    assert server.next_event() is NEED_DATA
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        send_eof(server)


def test_eof_between_frames_is_closed() -> None:
    client, server = handshaken_pair()
    rid, data = client.send_request("stats", {})
    server.receive_data(data)
    server.receive_data(b"")
    assert server.next_event() == Request(rid, "stats", {})  # what came first is kept
    assert isinstance(server.next_event(), Closed)
    assert isinstance(server.next_event(), Closed)  # and stays closed
    server.receive_data(frame([0, 77, "stats", {}]))  # nothing after EOF counts
    assert isinstance(server.next_event(), Closed)


def test_dead_connection_ignores_more_data() -> None:
    server = Connection(Role.SERVER)
    with pytest.raises(RemoteProtocolError):
        drain(server, b"\xff\xff\xff\xff")
    server.receive_data(frame([0, 1, "hello", hello_args()]))
    assert isinstance(server.next_event(), Closed)


def test_bytes_arriving_one_at_a_time_still_parse() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    hello_id, hello = client.send_request("hello", hello_args())
    read_id, read = client.send_request("read", READ)
    got: list[AnyEvent] = []
    for byte in hello + read:
        got += drain(server, bytes([byte]))
    assert got == [Request(hello_id, "hello", hello_args()), Request(read_id, "read", READ)]

    replies = server.send_response(read_id, b"0123456789") + server.send_response(hello_id, {})
    answers: list[AnyEvent] = []
    for byte in replies:
        answers += drain(client, bytes([byte]))
    assert answers == [Response(read_id, b"0123456789"), Response(hello_id, {})]
    assert send_eof(client) == [Closed()]


def test_wanted_is_what_the_frame_under_way_still_lacks() -> None:
    """What the transport may wait for before waking the reader (tls.wake_after)."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    _, hello = client.send_request("hello", hello_args())
    _, read = client.send_request("read", READ)
    assert server.wanted == 0  # nothing yet: the next frame's length is unknown
    server.receive_data(hello[:3])
    assert server.wanted == 0  # its length prefix is not complete
    server.receive_data(hello[3:10])
    assert server.wanted == len(hello) - 10
    server.receive_data(hello[10:] + read[:6])
    assert server.wanted == 0  # the first frame is whole
    assert isinstance(server.next_event(), Request)
    assert server.wanted == len(read) - 6  # now the second frame's
    server.receive_data(read[6:])
    assert server.wanted == 0


# -- property tests ------------------------------------------------------------------

u64s = st.integers(0, MAX_U64)
sis = st.binary(min_size=STORAGE_INDEX_SIZE, max_size=STORAGE_INDEX_SIZE)
sharenums = st.integers(0, MAX_BUCKETS - 1)
VALID_ARGS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "stats": st.just({}),
    "allocate_buckets": st.fixed_dictionaries(
        {
            "si": sis,
            "sharenums": st.lists(sharenums, unique=True, max_size=MAX_BUCKETS),
            "share_size": u64s,
            "renew_secret": st.binary(min_size=32, max_size=32),
            "cancel_secret": st.binary(min_size=32, max_size=32),
        }
    ),
    "write": st.fixed_dictionaries(
        {
            "si": sis,
            "sharenum": sharenums,
            "chunks": st.lists(st.tuples(u64s, st.binary(max_size=64)).map(list), min_size=1),
        }
    ),
    "close": st.fixed_dictionaries({"si": sis, "sharenum": sharenums}),
    "abort": st.fixed_dictionaries({"si": sis, "sharenum": sharenums}),
    "get_buckets": st.fixed_dictionaries({"si": sis}),
    "read": st.fixed_dictionaries(
        {"si": sis, "sharenum": sharenums, "offset": u64s, "length": st.integers(0, MAX_READ)}
    ),
    "announce": st.fixed_dictionaries(
        {
            "announcement": st.binary(max_size=MAX_ANNOUNCEMENT),
            "signature": st.binary(min_size=64, max_size=64),
        }
    ),
    "get_peers": st.fixed_dictionaries(
        {"after": u64s, "wait": u64s, "start": st.binary(max_size=20)}
    ),
    "get_revocations": st.fixed_dictionaries({"after": u64s, "wait": u64s}),
}
valid_requests = st.sampled_from(sorted(VALID_ARGS)).flatmap(
    lambda m: st.tuples(st.just(m), VALID_ARGS[m])
)
results = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), MAX_U64)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


def test_valid_request_strategies_name_real_methods() -> None:
    # (That their arguments are valid, the round trip below checks.)
    assert set(VALID_ARGS) <= set(REQUESTS) - {"hello"}


@given(st.lists(st.tuples(valid_requests, results), min_size=1, max_size=8), st.randoms())
def test_valid_requests_round_trip(
    calls: list[tuple[tuple[str, dict[str, Any]], Any]], rng: random.Random
) -> None:
    client, server = handshaken_pair()
    wire, expected = b"", {}
    for (method, args), result in calls:
        rid, data = client.send_request(method, args)
        wire += data
        expected[rid] = (method, args, result)
    events = drain(server, wire)
    assert ids(events) == list(expected)
    requests = [e for e in events if isinstance(e, Request)]
    assert requests == events
    for r in requests:
        method, args, _ = expected[r.id]
        assert (r.method, plain(r.args)) == (method, args)

    rng.shuffle(requests)
    replies = b"".join(server.send_response(r.id, expected[r.id][2]) for r in requests)
    answers = drain(client, replies)
    assert ids(answers) == [r.id for r in requests]
    for a in answers:
        assert isinstance(a, Response)
        assert a.result == expected[a.id][2]
    assert client.outstanding == {} and server.incoming == set()


# Anything a hostile peer might send: raw bytes, framed random msgpack values,
# request-shaped frames with random parts, and valid frames cut or bit-flipped.
ints = st.integers(-(2**63), MAX_U64)  # what msgpack can carry
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | ints
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=20)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.binary(max_size=6) | ints, inner, max_size=4)
    ),
    max_leaves=12,
)
methods = st.sampled_from(sorted(REQUESTS)) | st.text(max_size=8)
request_shaped = st.one_of(
    st.tuples(st.integers(0, 3), st.integers(-1, MAX_ID + 1), methods, msgpack_values),
    st.tuples(
        st.just(0),
        st.integers(1, 5),
        methods,
        st.dictionaries(st.text(max_size=10), msgpack_values),
    ),
    st.tuples(st.integers(0, 3), msgpack_values, msgpack_values),
    valid_requests.map(lambda mr: (0, 3, mr[0], mr[1])),
).map(lambda t: frame(list(t)))


@st.composite
def mutated_frames(draw: st.DrawFn) -> bytes:
    method, args = draw(valid_requests)
    data = bytearray(frame([0, draw(st.integers(1, 5)), method, args]))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


hostile_pieces = st.one_of(
    st.binary(max_size=64),
    msgpack_values.map(lambda v: raw_frame(msgpack.packb(v, use_bin_type=True))),
    request_shaped,
    mutated_frames(),
)
HELLO = frame([0, 1, "hello", hello_args()])


@settings(max_examples=300)
@given(
    st.booleans(),
    st.lists(hostile_pieces, max_size=6),
    st.lists(st.integers(1, 50), min_size=1),
    st.booleans(),
)
def test_hostile_bytes_yield_only_events_or_protocol_errors(
    say_hello: bool, pieces: list[bytes], cuts: list[int], eof: bool
) -> None:
    server = Connection(Role.SERVER)
    data = (HELLO if say_hello else b"") + b"".join(pieces)
    chunks, at = [], 0
    for i in range(len(data)):
        n = cuts[i % len(cuts)]
        chunks.append(data[at : at + n])
        at += n
        if at >= len(data):
            break
    if eof:
        chunks.append(b"")
    try:
        for chunk in chunks:
            server.receive_data(chunk)
            for event in drain(server):
                hypothesis.event(type(event).__name__)
                if isinstance(event, Request):
                    # Whatever reaches the application has passed its schema.
                    assert validate_request(event.method, plain(event.args)) == event.args
                    server.send_response(event.id, None)
                elif isinstance(event, BadRequest):
                    server.send_error(event.id, "bad-request", event.reason)
                else:
                    assert isinstance(event, Closed)
                    assert eof
    except RemoteProtocolError:
        hypothesis.event("RemoteProtocolError")
        assert isinstance(server.next_event(), Closed)


@given(st.binary(max_size=200))
def test_random_bytes_to_a_client_yield_only_events_or_protocol_errors(data: bytes) -> None:
    client, _ = handshaken_pair()
    client.send_request("stats", {})
    client.receive_data(data)
    client.receive_data(b"")
    try:
        events = drain(client)
    except RemoteProtocolError:
        return
    assert isinstance(events[-1], Closed)
