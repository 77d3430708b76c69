"""Who may talk to a server node, and for how long.

TLS already refused everyone whose certificate the grid key did not sign.
The :class:`Gate` of a server node then reads the member from the peer's
certificate, refuses the kinds this node does not serve and the members on
the grid's revocation list, and keeps the live connections of each member so
that a newer revocation list closes them at once.

The revocation list of a node lives in ``private/revocations``: the
introducer's is written by ``revoke`` beside the grid key; a storage server
keeps there the newest list it fetched from the introducer (so a restart keeps
it), and an operator may write one there by hand (``grid revoke`` does, for
the servers of a local grid).  The file is re-read when it changes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from .errors import GridError, NotMemberError
from .fileutil import atomic_output
from .membership import REVOCATIONS_NAME, Member, MembershipError, RevocationList
from .net.calls import IntroducerCalls
from .net.rpc import serve_rpc
from .net.tls import Credentials, TlsStream

log = logging.getLogger(__name__)
WATCH_INTERVAL = 1.0


class Revocations:
    """The newest revocation list a node knows of (verified against its grid
    key), with a way to wait for a newer one."""

    def __init__(self, credentials: Credentials, path: Path | None) -> None:
        self.grid_public = credentials.grid_public
        self.path = path
        self.current = RevocationList(credentials.grid_id, 0, frozenset())
        self.blob: bytes | None = None
        """the signed list as received (what the introducer passes on)"""
        self._changed = trio.Event()
        self._stat: tuple[int, int] | None = None
        self.listeners: list[Callable[[RevocationList], None]] = []
        """run with each newer list"""

    def revoked(self, node_id: bytes) -> bool:
        return node_id in self.current.revoked

    def update(self, blob: bytes, save: bool = True) -> bool:
        """Adopt ``blob`` if it verifies and is newer; MembershipError if it
        does not verify.  Returns whether it was newer."""
        if not self.grid_public:
            return False
        new = RevocationList.verify(blob, self.grid_public)
        if new.seq <= self.current.seq:
            return False
        self.current, self.blob = new, blob
        log.info("revocation list %d: %d members revoked", new.seq, len(new.revoked))
        if save and self.path is not None:
            with atomic_output(self.path) as f:
                f.write(blob)
        for listener in self.listeners:
            listener(new)
        self._changed.set()
        self._changed = trio.Event()
        return True

    def reload(self) -> None:
        """Read the file again if it changed (a bad one is logged, not used)."""
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stat:
            return
        self._stat = stamp
        try:
            self.update(self.path.read_bytes(), save=False)
        except (MembershipError, OSError) as e:
            log.warning("ignoring %s: %s", self.path, e)

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        while True:
            self.reload()
            await trio.sleep(interval)

    async def follow(self, introducer: IntroducerCalls, wait: int) -> None:
        """Long-poll the introducer for lists newer than ours (a bad one is
        logged, and asked for again only after ``wait`` seconds)."""
        while True:
            blob = await introducer.get_revocations(self.current.seq, wait)
            if blob is not None:
                try:
                    self.update(blob)
                except MembershipError as e:
                    log.warning("the introducer sent a bad revocation list: %s", e)
                    await trio.sleep(wait)

    async def wait_newer(self, seq: int, timeout: float) -> None:
        with trio.move_on_after(timeout):
            while self.current.seq <= seq:
                await self._changed.wait()


class Gate:
    """Admission to one server node: members of the given kinds, unrevoked."""

    def __init__(self, credentials: Credentials, private: Path, kinds: tuple[str, ...]) -> None:
        self.credentials = credentials
        self.kinds = kinds
        self.revocations = Revocations(credentials, private / REVOCATIONS_NAME)
        self.revocations.reload()
        self.revocations.listeners.append(self._drop_revoked)
        self._live: dict[bytes, set[trio.CancelScope]] = {}

    def admit(self, stream: TlsStream) -> Member:
        """The member at the other end, or NotMemberError (which the peer is
        told) or MembershipError (which it is not)."""
        member = self.credentials.peer(stream)
        if self.revocations.revoked(member.node_id):
            raise NotMemberError(f"member {member.name} was revoked from the grid")
        if member.kind not in self.kinds:
            raise NotMemberError(f"a {member.kind} member cannot use this {self.node_kind}")
        return member

    @property
    def node_kind(self) -> str:
        own = self.credentials.member
        return own.kind if own is not None else "node"

    @contextlib.contextmanager
    def live(self, member: Member) -> Iterator[trio.CancelScope]:
        """A scope for a member's connection, cancelled if it is revoked."""
        with trio.CancelScope() as scope:
            scopes = self._live.setdefault(member.node_id, set())
            scopes.add(scope)
            try:
                yield scope
            finally:
                scopes.discard(scope)
                if not scopes:
                    del self._live[member.node_id]

    def _drop_revoked(self, revocations: RevocationList) -> None:
        for node in revocations.revoked & set(self._live):
            log.info("closing %d connections of a revoked member", len(self._live[node]))
            for scope in self._live[node]:
                scope.cancel()


async def refuse(stream: TlsStream, error: GridError, patience: float = 5.0) -> None:
    """Tell a member refused after the handshake why: its ``hello`` (and
    anything else it asks) is answered with ``error``, for a few seconds."""

    def hello() -> dict[str, Any]:
        raise error

    async def handler(method: str, args: dict[str, Any]) -> Any:
        raise error

    with trio.move_on_after(patience):
        await serve_rpc(stream, handler, hello)


def is_refusal(error: BaseException) -> bool:
    """Whether a failed connection was a server refusing our membership."""
    return NotMemberError.code + ":" in str(error)


def refused(where: str, error: BaseException) -> NotMemberError:
    """The one line for a refusal: not a member, who said so, and why."""
    reason = str(error).split(NotMemberError.code + ":", 1)[-1].strip()
    return NotMemberError(f"this node is not a member of the grid: {where} refused it ({reason})")
