"""The RPC transport: a thin trio loop around :class:`protocol.Connection`.

:class:`RpcClient` multiplexes many calls over one stream; :func:`serve_rpc`
answers requests with a handler, several at a time, and never lets a bad
request, a handler bug or a peer that stops reading take the server down
(see :mod:`gridfs.net.limits` for what one connection may hold).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

from ..errors import GridError
from ..mutable import MAX_SLOT_RECORD, SIGNATURE_SIZE
from ..protocol.connection import (
    NEED_DATA,
    BadRequest,
    Closed,
    Connection,
    ErrorReply,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    hello_args,
)
from ..protocol.frames import Buffer
from ..protocol.schema import MAX_FRAME
from .limits import DEFAULT_LIMITS, ConnectionLimits
from .limits import authenticated as mark_authenticated
from .limits import current as current_admission
from .tls import wake_after

log = logging.getLogger(__name__)
RECEIVE_SIZE = 256 * 1024
SEND_PIECE = 1024 * 1024
"""A request is sent in pieces of this size, each within the call's patience
(a block write is one piece; smaller pieces cost measurable CPU)."""
SEND_PATIENCE = 60.0
"""Patience for a piece of a call that has no timeout (a server's patience
for its replies is :attr:`ConnectionLimits.send_timeout`)."""


SMALL_PIECE = 64 * 1024
"""Pieces of a frame below this are sent joined with their neighbours (a
send costs tens of microseconds); larger ones, a share's blocks, as they are."""


def sendable(pieces: list[Buffer]) -> Iterator[Buffer]:
    """A frame's pieces as the buffers to send: none over SEND_PIECE (each
    send is one wait within the patience), small ones joined."""
    small: list[Buffer] = []
    size = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        for start in range(0, len(view), SEND_PIECE):
            unit = view[start : start + SEND_PIECE]
            if small and (len(unit) >= SMALL_PIECE or size + len(unit) > SEND_PIECE):
                yield b"".join(small)
                small, size = [], 0
            if len(unit) >= SMALL_PIECE:
                yield unit
            else:
                small.append(unit)
                size += len(unit)
    if small:
        yield b"".join(small)


class ConnectionLost(GridError):
    """The connection to a peer broke or timed out."""


class RemoteError(GridError):
    """The peer answered a call with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.remote_message = message


class TakenArgs(dict[str, Any]):
    """Request arguments a call may let go of once the request is framed:
    a write's megabytes are then not kept while its answer comes (the
    caller keeps no other reference to them)."""


class _Slot:
    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.outcome: Response | ErrorReply | None = None


class RpcClient:
    """Calls to one server over one stream.  Start :meth:`run` in a nursery;
    when the stream breaks every pending and later call raises ConnectionLost."""

    def __init__(self, stream: trio.abc.Stream, default_timeout: float = 60.0) -> None:
        self.stream = stream
        self.default_timeout = default_timeout
        self.hello: dict[str, Any] | None = None
        self._conn = Connection(Role.CLIENT)
        self._slots: dict[int, _Slot] = {}
        self._send_lock = trio.Lock()
        self._closed: str | None = None
        self._done = trio.Event()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Do the hello handshake, then read answers until the stream ends.

        A failed handshake raises; a connection lost later just ends the task
        (every pending call sees ConnectionLost)."""
        error: ConnectionLost | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_loop)
                try:
                    self.hello = await self.call("hello", hello_args())
                except (ConnectionLost, RemoteError) as e:
                    error = ConnectionLost(f"handshake failed: {e}")
                    nursery.cancel_scope.cancel()
                else:
                    task_status.started()
                    await self.wait_closed()
                    nursery.cancel_scope.cancel()
        finally:
            await self.aclose("connection closed by this client")
        if error is not None:
            raise error

    async def wait_closed(self) -> None:
        await self._done.wait()

    async def _read_loop(self) -> None:
        """Deliver answers to waiting calls; on any failure close the client."""
        reason = "connection closed (reading answers was cancelled)"
        try:
            while True:
                event = self._conn.next_event()
                if event is NEED_DATA:
                    wanted = self._conn.wanted
                    wake_after(self.stream, wanted)
                    data = await self.stream.receive_some(max(wanted, RECEIVE_SIZE))
                    self._conn.receive_data(data)
                    continue
                if isinstance(event, Closed):
                    reason = "server closed the connection"
                    return
                if isinstance(event, Response | ErrorReply):
                    slot = self._slots.pop(event.id, None)
                    if slot is not None:
                        slot.outcome = event
                        slot.event.set()
                else:
                    reason = f"server broke the protocol: unexpected {type(event).__name__}"
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            reason = f"connection lost: {e}"
        except RemoteProtocolError as e:
            reason = f"server broke the protocol: {e}"
        finally:
            await self.aclose(reason)

    async def call(self, method: str, args: dict[str, Any], timeout: float | None = None) -> Any:
        """Send a request and wait for its answer (or ConnectionLost/RemoteError)."""
        if self._closed is not None:
            raise ConnectionLost(self._closed)
        limit = self.default_timeout if timeout is None else timeout
        # (a limit of 0 or less: no timeout for the answer, SEND_PATIENCE per piece)
        deadline, patience = (limit, limit) if limit > 0 else (math.inf, SEND_PATIENCE)
        rid = None
        try:
            async with self._send_lock:
                # Framed only when it can be sent: calls waiting their turn
                # on one connection hold their arguments, not also a frame
                # of megabytes each.
                if self._closed is not None:
                    raise ConnectionLost(self._closed)
                rid, pieces = self._conn.send_request_pieces(method, args)
                if isinstance(args, TakenArgs):
                    args.clear()
                slot = self._slots[rid] = _Slot()
                await self._send_whole(pieces, patience)
                del pieces  # (a write's megabytes: not kept while the answer comes)
            with trio.move_on_after(deadline):
                await slot.event.wait()
        finally:
            if rid is not None:
                self._slots.pop(rid, None)
        if slot.outcome is None:
            if self._closed is not None:
                raise ConnectionLost(self._closed)
            # A peer that stays silent this long is treated as gone.
            await self.aclose(f"no answer to {method} within {limit:g}s")
            raise ConnectionLost(f"no answer to {method} within {limit:g}s")
        if isinstance(slot.outcome, ErrorReply):
            raise RemoteError(slot.outcome.code, slot.outcome.message)
        return slot.outcome.result

    async def _send_whole(self, pieces: list[Buffer], patience: float) -> None:
        """Send one frame, all of it: a frame cut short by a cancelled caller
        would garble the stream for every other call on it (and leave a TLS
        stream broken), so the send is shielded; a peer that takes in nothing
        for ``patience`` seconds loses the connection instead (a slow one
        that keeps taking pieces does not)."""
        problem = ""
        with trio.CancelScope(shield=True):
            for piece in sendable(pieces):
                with trio.move_on_after(patience) as sending:
                    try:
                        await self.stream.send_all(piece)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                        problem = f"connection lost: {e}"
                if sending.cancelled_caught:
                    problem = (
                        f"could not send a request: the peer took nothing in for {patience:g}s"
                    )
                if problem:
                    await self.aclose(problem)
                    break
        if problem:
            raise ConnectionLost(problem)
        await trio.lowlevel.checkpoint_if_cancelled()

    async def aclose(self, reason: str = "closed") -> None:
        if self._closed is None:
            self._closed = reason
            for slot in self._slots.values():
                slot.event.set()
            self._slots.clear()
            self._done.set()
        await trio.aclose_forcefully(self.stream)


Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]
REPLY_OVERHEAD = 64
"""Bytes a reply frame adds to its data (length, kind, id, msgpack headers)."""
SMALL_REPLY = 16 * 1024
"""What a reply of a method not in :func:`reply_estimate` is assumed to cost."""
_REPLY_SIZES = {"slot_read": MAX_SLOT_RECORD + SIGNATURE_SIZE, "get_peers": MAX_FRAME}


def error_code(exc: BaseException) -> str:
    """Wire error code of an exception: its class's ``code`` or its class name."""
    return getattr(exc, "code", None) or type(exc).__name__


def reply_estimate(request: Request) -> int:
    """The most bytes the reply to ``request`` should take: a read's length,
    a method known for large answers its bound, and little for the rest."""
    length = request.args.get("length")
    if request.method == "read" and type(length) is int:
        return length + REPLY_OVERHEAD
    return _REPLY_SIZES.get(request.method, SMALL_REPLY) + REPLY_OVERHEAD


class ReplyBudget:
    """Bytes of replies a connection owes: reserved by estimate when a
    request starts, set to the real size when its reply is made, given back
    once the reply is sent.  A request starts only if its estimate fits (or
    nothing is owed, so one reply bigger than the budget still gets through),
    so what a peer that reads no replies pins stays within the budget."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.owed = 0
        self.peak = 0
        """The most bytes owed at once (for tests and diagnostics)."""
        self._lot = trio.lowlevel.ParkingLot()

    async def reserve(self, size: int) -> None:
        while self.owed and self.owed + size > self.limit:
            await self._lot.park()
        self._add(size)

    def adjust(self, reserved: int, actual: int) -> None:
        """A reply turned out ``actual`` bytes, not the ``reserved`` estimate."""
        self._add(actual - reserved)

    def release(self, size: int) -> None:
        self._add(-size)

    def _add(self, delta: int) -> None:
        self.owed += delta
        self.peak = max(self.peak, self.owed)
        if delta < 0:
            self._lot.unpark_all()


class _SendTimeout(Exception):
    """The peer took in nothing of a reply for the send time-out."""


async def serve_rpc(
    stream: trio.abc.Stream,
    handler: Handler,
    hello: Callable[[], dict[str, Any]],
    max_concurrent: int = 8,
    max_frame: int | None = None,
    *,
    limits: ConnectionLimits | None = None,
    replies: ReplyBudget | None = None,
) -> None:
    """Answer requests on ``stream`` until it closes or the peer misbehaves.

    ``handler(method, args)`` returns the result or raises a GridError (sent
    as an error reply with its code); any other exception is logged and sent
    as ``internal``.  At most ``max_concurrent`` requests run at once, and a
    request starts only while the replies owed fit ``replies`` (by default a
    :class:`ReplyBudget` of ``limits.reply_budget``); beyond that the stream
    is not read, so a flooding peer is slowed, not buffered.  A peer that
    takes in nothing of a reply for ``limits.send_timeout`` seconds, or sends
    nothing for ``limits.idle_timeout`` seconds while no request is in
    flight, loses the connection.  ``limits`` defaults to those of the
    connection's admission (:func:`gridfs.net.limits.current`), if any.

    ``hello`` is answered at once, before the next request is read (so its
    answer is the first frame the client receives), and marks the connection
    authenticated for its gate.
    """
    if limits is None:
        admission = current_admission()
        limits = admission.limits if admission is not None else DEFAULT_LIMITS
    conn = Connection(Role.SERVER) if max_frame is None else Connection(Role.SERVER, max_frame)
    send_lock = trio.Lock()
    limiter = trio.Semaphore(max_concurrent)
    budget = replies if replies is not None else ReplyBudget(limits.reply_budget)
    in_flight = 0
    reading: trio.CancelScope | None = None
    """The receive under way, if any: its deadline is the idle time-out."""

    def idle_deadline() -> float:
        return trio.current_time() + limits.idle_timeout if in_flight == 0 else math.inf

    stalled = ""
    """Why sending stopped: a frame was cut short, nothing may follow it."""

    async def send(data: bytes) -> None:
        nonlocal stalled
        view = memoryview(data)
        async with send_lock:
            for start in range(0, len(view), SEND_PIECE):
                if stalled:
                    raise _SendTimeout(stalled)
                with trio.move_on_after(limits.send_timeout) as sending:
                    await stream.send_all(view[start : start + SEND_PIECE])
                if sending.cancelled_caught:
                    stalled = f"the peer took nothing in for {limits.send_timeout:g}s"
                    raise _SendTimeout(stalled)

    async def answer(req: Request, reserved: int) -> None:
        nonlocal in_flight
        size = reserved
        try:
            try:
                result = await handler(req.method, req.args)
                data = conn.send_response(req.id, result)
            except GridError as e:
                data = conn.send_error(req.id, error_code(e), str(e))
            except Exception as e:
                log.exception("handler for %s failed", req.method)
                data = conn.send_error(req.id, "internal", f"{type(e).__name__}")
            budget.adjust(reserved, len(data))
            size = len(data)
            await send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            budget.release(size)
            limiter.release()
            in_flight -= 1
            if reading is not None:
                reading.deadline = idle_deadline()

    try:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    event = conn.next_event()
                except RemoteProtocolError as e:
                    log.info("closing connection: %s", e)
                    break
                if event is NEED_DATA:
                    wanted = conn.wanted
                    wake_after(stream, wanted)
                    size = max(wanted, RECEIVE_SIZE if conn.handshaken else conn.frame_limit)
                    data: bytes | bytearray | None = None
                    with trio.CancelScope(deadline=idle_deadline()) as reading:
                        data = await stream.receive_some(size)
                    reading = None
                    if data is None:
                        log.info("closing a connection idle for %gs", limits.idle_timeout)
                        break
                    conn.receive_data(data)
                elif isinstance(event, Closed):
                    break
                elif isinstance(event, BadRequest):
                    await send(conn.send_error(event.id, "bad-request", event.reason))
                elif not isinstance(event, Request):
                    log.info("closing connection: a client sent an answer")
                    break
                elif event.method == "hello":
                    try:
                        reply = conn.send_response(event.id, hello())
                    except GridError as e:  # a refusal (gatekeeper.refuse): say why
                        await send(conn.send_error(event.id, error_code(e), str(e)))
                        continue
                    await send(reply)
                    mark_authenticated()
                else:
                    await limiter.acquire()
                    reserved = reply_estimate(event)
                    await budget.reserve(reserved)
                    if stalled:  # the connection is ending: start nothing more
                        budget.release(reserved)
                        break
                    in_flight += 1
                    nursery.start_soon(answer, event, reserved)
            nursery.cancel_scope.cancel()
    except* _SendTimeout as group:
        log.info("closing connection: %s", group.exceptions[0])
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError):
        pass  # except*: the nursery wraps a broken stream in an ExceptionGroup
    finally:
        await trio.aclose_forcefully(stream)
