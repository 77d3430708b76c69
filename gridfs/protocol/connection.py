"""A sans-I/O RPC connection: length-prefixed msgpack frames with request ids.

Frames are a 4-byte big-endian length and a msgpack body, one of::

    [0, id, method, args]      request (args: a map)
    [1, id, result]            response to request id
    [2, id, code, message]     error reply to request id

Ids are chosen by the requester, unique among its outstanding requests, so
many calls share one connection and answers may come in any order.  The first
request on a connection is ``hello`` (the version handshake).  The frame
length is checked before the frame is buffered (until the hello exchange is
done, against a small limit: a stranger gets no big buffer), the frame is
decoded with a bound on the objects it may make (a megabyte of empty arrays
would be some sixty megabytes of Python lists), and a request's arguments
against its schema before the application sees them.  Anything malformed is a
:class:`RemoteProtocolError`, after which the connection is dead.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack

from .frames import LENGTH as _LEN
from .frames import Buffer, FrameTooLarge, frame_pieces, pack_frame
from .inbox import Inbox
from .schema import MAX_FRAME, PROTOCOL_NAME, PROTOCOL_VERSION, SchemaError, validate_request

REQUEST, RESPONSE, ERROR = 0, 1, 2
MAX_ID = 2**32 - 1
MAX_HELLO_FRAME = 4096
"""Largest frame a server accepts before the hello exchange is done (a hello
request is some 40 bytes)."""
MAX_HELLO_ANSWER = 64 * 1024
"""Largest frame a client accepts before the answer to its hello (a server's
hello information, a mount's path in it)."""
MAX_OBJECTS = 65536
"""Most msgpack objects (containers and their items) one frame may decode to:
a write of MAX_CHUNKS chunks is some 12,300.  Each costs up to ~64 bytes of
Python objects, so a frame decodes to at most a few MiB besides its data."""
MAX_ARRAY = 16384
"""Most items in one array (the largest list of any message is MAX_CHUNKS)."""
MAX_MAP = 4096
MAX_STR = 65536


class ProtocolError(Exception):
    """Base of protocol violations."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection must be closed."""


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class Request:
    id: int
    method: str
    args: dict[str, Any]


@dataclass(frozen=True)
class BadRequest:
    """A well-framed request whose method or arguments are not acceptable;
    the application should answer it with an error reply."""

    id: int
    method: str
    reason: str


@dataclass(frozen=True)
class Response:
    id: int
    result: Any


@dataclass(frozen=True)
class ErrorReply:
    id: int
    code: str
    message: str


@dataclass(frozen=True)
class Closed:
    """The peer closed the connection (EOF)."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
Event = Request | BadRequest | Response | ErrorReply | Closed


class TooManyObjects(ValueError):
    """A frame would decode to more objects than allowed."""


def unpack_bounded(body: bytes | memoryview, max_objects: int = MAX_OBJECTS) -> Any:
    """Decode one msgpack body, refusing it as soon as it has made more than
    ``max_objects`` objects.

    msgpack's own limits bound each container (and each container by the bytes
    left, so a forged count allocates nothing big) but not their total; the
    hooks, called as each array or map is complete, add up its items and stop
    the decoding at the bound.  So a frame makes at most ``max_objects`` plus
    one container's items before it is refused.  Raises TooManyObjects, or
    msgpack's errors for malformed input (its nesting depth is bounded too)."""
    size = len(body)
    count = 0

    def counted(items: Any) -> Any:
        nonlocal count
        count += len(items) + 1
        if count > max_objects:
            raise TooManyObjects(f"frame holds more than {max_objects} objects")
        return items

    return msgpack.unpackb(
        body,
        raw=False,
        strict_map_key=True,
        list_hook=counted,
        object_hook=counted,
        max_str_len=min(MAX_STR, size),
        max_bin_len=size,
        max_array_len=min(MAX_ARRAY, size),
        max_map_len=min(MAX_MAP, size),
        max_ext_len=0,
    )


def hello_args() -> dict[str, Any]:
    return {"protocol": PROTOCOL_NAME, "versions": [PROTOCOL_VERSION]}


class Connection:
    """One side of an RPC connection.  Feed bytes with :meth:`receive_data`,
    read events with :meth:`next_event`, and turn calls into bytes with the
    ``send_*`` methods."""

    def __init__(
        self,
        role: Role,
        max_frame: int = MAX_FRAME,
        *,
        max_hello_frame: int | None = None,
        max_objects: int = MAX_OBJECTS,
    ) -> None:
        self.role = role
        self.max_frame = max_frame
        if max_hello_frame is None:
            max_hello_frame = MAX_HELLO_FRAME if role is Role.SERVER else MAX_HELLO_ANSWER
        self.max_hello_frame = max_hello_frame
        """Frame limit until the hello exchange is done."""
        self.max_objects = max_objects
        self._inbox = Inbox()
        self._eof = False
        self._dead = False
        self._next_id = 1
        self.outstanding: dict[int, str] = {}
        """Our requests awaiting an answer: id → method."""
        self.incoming: set[int] = set()
        """Peer requests we have not answered yet."""
        self.handshaken = False

    # -- input ------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray) -> None:
        """Bytes from the peer; ``b""`` means the peer closed."""
        if self._dead:
            return
        if not data:
            self._eof = True
        else:
            self._inbox.append(data)

    @property
    def wanted(self) -> int:
        """Bytes still missing from the frame being received (0 when the
        next frame's length is not known yet)."""
        if len(self._inbox) < _LEN.size:
            return 0
        (length,) = _LEN.unpack(self._inbox.peek(_LEN.size))
        return max(0, _LEN.size + length - len(self._inbox))

    def next_event(self) -> Event | _NeedData:
        if self._dead:
            return Closed()
        try:
            body = self._next_frame()
            if body is None:
                if self._eof:
                    self._dead = True
                    return Closed()
                return NEED_DATA
            try:
                return self._parse(body)
            finally:
                body.release()
        except RemoteProtocolError:
            self._dead = True
            raise

    @property
    def frame_limit(self) -> int:
        """The largest frame body acceptable now."""
        return self.max_frame if self.handshaken else min(self.max_frame, self.max_hello_frame)

    def _next_frame(self) -> memoryview | None:
        if len(self._inbox) < _LEN.size:
            if self._eof and self._inbox:
                raise RemoteProtocolError("connection closed in the middle of a frame")
            return None
        (length,) = _LEN.unpack(self._inbox.peek(_LEN.size))
        if length > self.frame_limit:
            before = "" if self.handshaken else " before hello"
            raise RemoteProtocolError(
                f"frame of {length} bytes{before} exceeds the {self.frame_limit} limit"
            )
        if len(self._inbox) < _LEN.size + length:
            if self._eof:
                raise RemoteProtocolError("connection closed in the middle of a frame")
            return None
        # (_parse copies what it keeps)
        return self._inbox.take(_LEN.size + length)[_LEN.size :]

    def _parse(self, body: memoryview) -> Event:
        try:
            msg = unpack_bounded(body, self.max_objects)
        except TooManyObjects as e:
            raise RemoteProtocolError(str(e)) from None
        except Exception as e:
            raise RemoteProtocolError(f"undecodable frame: {type(e).__name__}") from None
        if not isinstance(msg, list) or not msg or type(msg[0]) is not int:
            raise RemoteProtocolError("a frame must be a list starting with its kind")
        kind = msg[0]
        if kind == REQUEST and len(msg) == 4:
            return self._parse_request(msg[1], msg[2], msg[3])
        if kind == RESPONSE and len(msg) == 3:
            if self._match(msg[1]) == "hello":
                self.handshaken = True  # only an accepted hello is a handshake
            return Response(msg[1], msg[2])
        if kind == ERROR and len(msg) == 4 and isinstance(msg[2], str) and isinstance(msg[3], str):
            self._match(msg[1])
            return ErrorReply(msg[1], msg[2][:64], msg[3][:1000])
        raise RemoteProtocolError("unknown frame kind or shape")

    def _parse_request(self, rid: Any, method: Any, args: Any) -> Event:
        if self.role is not Role.SERVER:
            raise RemoteProtocolError("a server may not send requests")
        if type(rid) is not int or not 0 < rid <= MAX_ID:
            raise RemoteProtocolError("bad request id")
        if rid in self.incoming:
            raise RemoteProtocolError(f"request id {rid} is already in use")
        if not isinstance(method, str):
            raise RemoteProtocolError("method must be a string")
        if not self.handshaken and method != "hello":
            raise RemoteProtocolError("the first request must be hello")
        self.incoming.add(rid)
        try:
            checked = validate_request(method, args)
        except SchemaError as e:
            return BadRequest(rid, method[:40], str(e))
        if method == "hello":
            if self.handshaken:
                return BadRequest(rid, method, "hello was already done")
            if checked["protocol"] != PROTOCOL_NAME or PROTOCOL_VERSION not in checked["versions"]:
                speaks = f"{PROTOCOL_NAME}/{PROTOCOL_VERSION}"
                return BadRequest(rid, method, f"this server speaks {speaks}")
            self.handshaken = True
        return Request(rid, method, checked)

    def _match(self, rid: Any) -> str:
        if type(rid) is not int or rid not in self.outstanding:
            raise RemoteProtocolError(f"answer to unknown request id {rid!r}")
        return self.outstanding.pop(rid)

    # -- output -----------------------------------------------------------
    def send_request(self, method: str, args: dict[str, Any]) -> tuple[int, bytes]:
        rid, pieces = self.send_request_pieces(method, args)
        return rid, b"".join(pieces)

    def send_request_pieces(self, method: str, args: dict[str, Any]) -> tuple[int, list[Buffer]]:
        """:meth:`send_request` with the frame as pieces to send in order:
        the parts of each :class:`Blob` in ``args`` are among them as they
        are (h11's ``send_with_data_passthrough``)."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only clients send requests")
        if not self.handshaken and method != "hello" and "hello" not in self.outstanding.values():
            raise LocalProtocolError("the first request must be hello")
        rid = self._next_id
        while rid in self.outstanding:
            rid = rid % MAX_ID + 1
        try:  # may fail: then nothing was sent
            pieces = frame_pieces([REQUEST, rid, method, args], self.max_frame)
        except FrameTooLarge as e:
            raise LocalProtocolError(str(e)) from None
        self._next_id = rid % MAX_ID + 1
        self.outstanding[rid] = method
        return rid, pieces

    def send_response(self, rid: int, result: Any) -> bytes:
        return self._answer(rid, [RESPONSE, rid, result])

    def send_error(self, rid: int, code: str, message: str) -> bytes:
        return self._answer(rid, [ERROR, rid, code, message])

    def _answer(self, rid: int, msg: list[Any]) -> bytes:
        if rid not in self.incoming:
            raise LocalProtocolError(f"no request {rid} to answer")
        data = self._frame(msg)  # may fail (unpackable, too big): the request stays owed
        self.incoming.discard(rid)
        return data

    def _frame(self, msg: list[Any]) -> bytes:
        try:
            return pack_frame(msg, self.max_frame)
        except FrameTooLarge as e:
            raise LocalProtocolError(str(e)) from None
