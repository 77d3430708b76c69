"""The RPC transport: a thin trio loop around :class:`protocol.Connection`.

:class:`RpcClient` multiplexes many calls over one stream; :func:`serve_rpc`
answers requests with a handler, several at a time, and never lets a bad
request or a handler bug take the server down.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..errors import GridError
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
from .tls import wake_after

log = logging.getLogger(__name__)
RECEIVE_SIZE = 256 * 1024
SEND_PIECE = 1024 * 1024
"""A request is sent in pieces of this size, each within the call's patience
(a block write is one piece; smaller pieces cost measurable CPU)."""
SEND_PATIENCE = 60.0
"""Patience for a piece of a call that has no timeout."""


class ConnectionLost(GridError):
    """The connection to a peer broke or timed out."""


class RemoteError(GridError):
    """The peer answered a call with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.remote_message = message


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
        rid, data = self._conn.send_request(method, args)
        limit = self.default_timeout if timeout is None else timeout
        # (a limit of 0 or less: no timeout for the answer, SEND_PATIENCE per piece)
        deadline, patience = (limit, limit) if limit > 0 else (math.inf, SEND_PATIENCE)
        slot = self._slots[rid] = _Slot()
        try:
            async with self._send_lock:
                await self._send_whole(data, patience)
            with trio.move_on_after(deadline):
                await slot.event.wait()
        finally:
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

    async def _send_whole(self, data: bytes, patience: float) -> None:
        """Send one frame, all of it: a frame cut short by a cancelled caller
        would garble the stream for every other call on it (and leave a TLS
        stream broken), so the send is shielded; a peer that takes in nothing
        for ``patience`` seconds loses the connection instead (a slow one
        that keeps taking pieces does not)."""
        problem = ""
        view = memoryview(data)
        with trio.CancelScope(shield=True):
            for start in range(0, len(view), SEND_PIECE):
                with trio.move_on_after(patience) as sending:
                    try:
                        await self.stream.send_all(view[start : start + SEND_PIECE])
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


def error_code(exc: BaseException) -> str:
    """Wire error code of an exception: its class's ``code`` or its class name."""
    return getattr(exc, "code", None) or type(exc).__name__


async def serve_rpc(
    stream: trio.abc.Stream,
    handler: Handler,
    hello: Callable[[], dict[str, Any]],
    max_concurrent: int = 8,
    max_frame: int | None = None,
) -> None:
    """Answer requests on ``stream`` until it closes or the peer misbehaves.

    ``handler(method, args)`` returns the result or raises a GridError (sent
    as an error reply with its code); any other exception is logged and sent
    as ``internal``.  At most ``max_concurrent`` requests run at once; beyond
    that the stream is not read, so a flooding peer is slowed, not buffered.
    """
    conn = Connection(Role.SERVER) if max_frame is None else Connection(Role.SERVER, max_frame)
    send_lock = trio.Lock()
    limiter = trio.Semaphore(max_concurrent)

    async def send(data: bytes) -> None:
        async with send_lock:
            await stream.send_all(data)

    async def answer(req: Request) -> None:
        try:
            try:
                result = hello() if req.method == "hello" else await handler(req.method, req.args)
                data = conn.send_response(req.id, result)
            except GridError as e:
                data = conn.send_error(req.id, error_code(e), str(e))
            except Exception as e:
                log.exception("handler for %s failed", req.method)
                data = conn.send_error(req.id, "internal", f"{type(e).__name__}")
            await send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            limiter.release()

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
                    conn.receive_data(await stream.receive_some(max(wanted, RECEIVE_SIZE)))
                elif isinstance(event, Closed):
                    break
                elif isinstance(event, BadRequest):
                    await send(conn.send_error(event.id, "bad-request", event.reason))
                elif isinstance(event, Request):
                    await limiter.acquire()
                    nursery.start_soon(answer, event)
            nursery.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError, trio.TooSlowError):
        pass  # except*: the nursery wraps a broken stream in an ExceptionGroup
    finally:
        await trio.aclose_forcefully(stream)
