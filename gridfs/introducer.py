"""The introducer: the seed's ``hello``/``new_peers`` rendezvous, for members.

Storage servers announce themselves over a connection they keep open; the
announcement lasts as long as that connection.  Only a storage member may
announce, and only its own node id, so the introducer holds at most one
announcement per storage member however often anyone tries.  Members
long-poll ``get_peers(after=version)`` and get the set whenever it changes,
in pages (``start``: the node id after which a page begins) that each fit a
frame however large the grid.  ``get_revocations`` passes the grid's signed
revocation list on.  The introducer keeps nothing else on disk: restarted,
it is refilled by the servers' reconnects within seconds.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING, Any

import trio

from .announce import Announcement
from .errors import FormatError, NotMemberError, UsageError
from .membership import Member, RevocationList

if TYPE_CHECKING:
    from .gatekeeper import Revocations

log = logging.getLogger(__name__)
MAX_WAIT = 55.0
PAGE_BYTES = 1024 * 1024
"""Announcements per ``get_peers`` answer are cut at this many bytes (each is
at most 4 KiB and 64 bytes of signature), well inside a frame."""


class BadAnnouncementError(UsageError):
    code = "bad-announcement"


class WrongMethodError(UsageError):
    code = "bad-request"


class IntroducerState:
    def __init__(self, revocations: Revocations | None = None) -> None:
        self.announcements: dict[bytes, tuple[bytes, bytes, Announcement]] = {}
        self.order: list[bytes] = []
        """the announced node ids, sorted (pages are ranges of it)"""
        self.holders: dict[bytes, object] = {}
        """node id → the session whose connection keeps its announcement alive"""
        self.revocations = revocations
        self.version = 0
        self._changed = trio.Event()
        if revocations is not None:
            revocations.listeners.append(self._revoked)

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    def put(self, data: bytes, signature: bytes, ann: Announcement, holder: object) -> None:
        """Hold an announcement for as long as ``holder``'s connection lasts.
        A replay (same or older seq) from another connection is refused, so
        nobody can take over a server's announcement and then drop it."""
        node = ann.address.node_id
        old = self.announcements.get(node)
        if old is not None and (
            old[2].seq > ann.seq or (old[2].seq == ann.seq and self.holders.get(node) is not holder)
        ):
            raise BadAnnouncementError("a newer or equal announcement of that server is held")
        if old is None:
            bisect.insort(self.order, node)
        self.announcements[node] = (data, signature, ann)
        self.holders[node] = holder
        self._bump()

    def remove(self, node: bytes, holder: object) -> None:
        if node in self.announcements and self.holders.get(node) is holder:
            self._drop(node)

    def _drop(self, node: bytes) -> None:
        del self.announcements[node]
        del self.holders[node]
        self.order.pop(bisect.bisect_left(self.order, node))
        self._bump()

    def _revoked(self, revocations: RevocationList) -> None:
        for node in revocations.revoked & set(self.announcements):
            self._drop(node)

    def page(self, start: bytes) -> tuple[list[list[bytes]], bytes | None]:
        """Announcements of node ids after ``start`` (all if empty), up to
        PAGE_BYTES (at least one), and where the next page starts (None: no
        more)."""
        most = PAGE_BYTES
        i = bisect.bisect_right(self.order, start) if start else 0
        out: list[list[bytes]] = []
        size = 0
        while i < len(self.order):
            data, signature, _ = self.announcements[self.order[i]]
            if out and size + len(data) + len(signature) > most:
                return out, self.order[i - 1]
            out.append([data, signature])
            size += len(data) + len(signature)
            i += 1
        return out, None

    async def wait_newer(self, after: int, timeout: float) -> None:
        with trio.move_on_after(timeout):
            while self.version <= after:
                await self._changed.wait()


class IntroducerSession:
    """The introducer's methods as seen by one member's connection."""

    def __init__(self, state: IntroducerState, member: Member) -> None:
        self.state = state
        self.member = member
        self.announced: dict[bytes, int] = {}

    async def handle(self, method: str, args: dict[str, Any]) -> Any:
        if method == "announce":
            return self.announce(args)
        if method == "get_peers":
            if not args["start"]:  # a first page waits for news; the rest follow at once
                await self.state.wait_newer(args["after"], min(float(args["wait"]), MAX_WAIT))
            announcements, more = self.state.page(args["start"])
            return {"version": self.state.version, "announcements": announcements, "next": more}
        if method == "get_revocations":
            revocations = self.state.revocations
            if revocations is None:
                return {"revocations": None}
            await revocations.wait_newer(args["after"], min(float(args["wait"]), MAX_WAIT))
            return {"revocations": revocations.blob}
        raise WrongMethodError(f"an introducer does not answer {method}")

    def announce(self, args: dict[str, Any]) -> None:
        if self.member.kind != "storage":
            raise NotMemberError(f"a {self.member.kind} member cannot announce a storage server")
        try:
            ann = Announcement.verify(args["announcement"], args["signature"])
        except FormatError as e:
            raise BadAnnouncementError(str(e)) from None
        if ann.address.node_id != self.member.node_id:
            raise BadAnnouncementError("a member announces only itself")
        self.state.put(args["announcement"], args["signature"], ann, self)
        self.announced[ann.address.node_id] = ann.seq
        log.info("server %s (%s) announced", ann.address, self.member.name)

    def closed(self) -> None:
        for node in self.announced:
            self.state.remove(node, self)
