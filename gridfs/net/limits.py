"""How many connections a server takes, and what each may hold of it.

A :class:`ConnectionGate` admits or refuses each accepted socket: in total,
per peer address, and before authentication (the TLS handshake and the hello
exchange), when a connection also has :attr:`ConnectionLimits.handshake_timeout`
to finish.  A refused socket is closed at once; refusals are logged at most
once per ``log_interval``, never once per connection (a flood must not fill
the log).  What a connection may use once admitted (idle and send time-outs,
the bytes of replies it may leave unread) is applied by
:func:`gridfs.net.rpc.serve_rpc`, which finds the limits of the connection it
serves with :func:`current`.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import trio

from ..protocol.schema import MAX_FRAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds a server keeps per connection and per peer (docs/protocol.md,
    "Limits")."""

    max_connections: int = 512
    """Connections open at once, in all (below the usual 1024 descriptors)."""
    max_per_address: int = 64
    """Connections open at once from one address (an IPv6 /64 is one address)."""
    max_unauthenticated: int = 64
    """Connections still in their TLS handshake or before hello, in all."""
    max_unauthenticated_per_address: int = 8
    """The same from one address, so one peer cannot take every handshake slot."""
    handshake_timeout: float = 10.0
    """Seconds a connection has for the TLS handshake and hello together."""
    idle_timeout: float = 300.0
    """A connection with no request in flight that receives nothing for this
    long is closed (clients reconnect on their next call)."""
    send_timeout: float = 60.0
    """A peer that takes in no part of a reply for this long loses the connection."""
    reply_budget: int = 2 * MAX_FRAME
    """Bytes of replies one connection may owe at once (being made, waiting
    or being sent): two of the largest frames.  Past it, no more requests are
    read from that connection until replies have gone out."""
    log_interval: float = 60.0
    """Refused connections are logged at most once per this many seconds."""


DEFAULT_LIMITS = ConnectionLimits()


def peer_key(sockaddr: object) -> str:
    """Whom a connection counts against: its IP address, with an IPv4 address
    mapped into IPv6 taken as IPv4 and an IPv6 one cut to its /64 (one host
    commonly holds a whole /64).  Anything else (a Unix socket) is one key."""
    host = sockaddr[0] if isinstance(sockaddr, tuple) and sockaddr else None
    if not isinstance(host, str):
        return "local"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


class Admission:
    """One admitted connection: its limits and whether it is authenticated."""

    def __init__(self, gate: ConnectionGate, key: str, scope: trio.CancelScope) -> None:
        self.gate = gate
        self.key = key
        self.limits = gate.limits
        self._scope = scope
        self.is_authenticated = False

    def authenticated(self) -> None:
        """The peer finished its handshake and hello: it no longer counts as
        unauthenticated, and the handshake deadline no longer applies."""
        if not self.is_authenticated:
            self.is_authenticated = True
            self._scope.deadline = math.inf
            self.gate._leave_unauthenticated(self.key)


_current: contextvars.ContextVar[Admission | None] = contextvars.ContextVar(
    "gridfs_admission", default=None
)


def current() -> Admission | None:
    """The admission of the connection being served by this task, if any."""
    return _current.get()


def authenticated() -> None:
    """Mark the connection served by this task authenticated (if it was
    admitted by a gate; otherwise nothing to do)."""
    admission = _current.get()
    if admission is not None:
        admission.authenticated()


class ConnectionGate:
    """Admits connections within :class:`ConnectionLimits`; one per listener set."""

    def __init__(self, limits: ConnectionLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.open: Counter[str] = Counter()
        """Connections open per peer key."""
        self.unauthenticated: Counter[str] = Counter()
        self.total = 0
        self.total_unauthenticated = 0
        self.refused = 0
        """Connections refused since the gate was made."""
        self._unlogged: Counter[str] = Counter()
        self._logged_at = -math.inf

    def _refusal(self, key: str) -> str | None:
        lim = self.limits
        if self.total >= lim.max_connections:
            return "too many connections"
        if self.open[key] >= lim.max_per_address:
            return "too many connections from one address"
        if self.total_unauthenticated >= lim.max_unauthenticated:
            return "too many connections before authentication"
        if self.unauthenticated[key] >= lim.max_unauthenticated_per_address:
            return "too many connections before authentication from one address"
        return None

    def _refuse(self, key: str, reason: str) -> None:
        self.refused += 1
        self._unlogged[f"{reason} ({key})"] += 1
        now = trio.current_time()
        if now - self._logged_at >= self.limits.log_interval:
            self._logged_at = now
            counts = "; ".join(f"{n} for {why}" for why, n in self._unlogged.most_common(3))
            log.warning(
                "refused %d connection(s) since the last report: %s", self._unlogged.total(), counts
            )
            self._unlogged.clear()

    def _leave_unauthenticated(self, key: str) -> None:
        self.total_unauthenticated -= 1
        self.unauthenticated[key] -= 1
        if not self.unauthenticated[key]:
            del self.unauthenticated[key]

    @contextlib.asynccontextmanager
    async def admit(self, tcp: trio.SocketStream) -> AsyncIterator[Admission | None]:
        """Admit ``tcp`` (yield its Admission) or refuse it (close it at once
        and yield None).  The body runs with the handshake deadline until the
        admission is marked :meth:`Admission.authenticated`; past it, the body
        is cancelled and the connection is over."""
        try:
            key = peer_key(tcp.socket.getpeername())
        except OSError:  # gone already
            await trio.aclose_forcefully(tcp)
            yield None
            return
        reason = self._refusal(key)
        if reason is not None:
            self._refuse(key, reason)
            await trio.aclose_forcefully(tcp)
            yield None
            return
        self.total += 1
        self.open[key] += 1
        self.total_unauthenticated += 1
        self.unauthenticated[key] += 1
        scope = trio.CancelScope(deadline=trio.current_time() + self.limits.handshake_timeout)
        admission = Admission(self, key, scope)
        token = _current.set(admission)
        try:
            with scope:
                yield admission
        finally:
            _current.reset(token)
            if not admission.is_authenticated:
                self._leave_unauthenticated(key)
            self.total -= 1
            self.open[key] -= 1
            if not self.open[key]:
                del self.open[key]
            if scope.cancelled_caught and not admission.is_authenticated:
                log.debug("closed a connection from %s: no hello in time", key)

    def wrap(
        self, handler: Callable[[trio.SocketStream], Awaitable[None]]
    ) -> Callable[[trio.SocketStream], Awaitable[None]]:
        """``handler`` run only for admitted connections (for serve_listeners)."""

        async def admitted(tcp: trio.SocketStream) -> None:
            async with self.admit(tcp) as admission:
                if admission is not None:
                    await handler(tcp)

        return admitted
