"""The introducer: the seed's ``hello``/``new_peers`` rendezvous.

Storage servers announce themselves over a connection they keep open; the
announcement lasts as long as that connection.  Clients long-poll
``get_peers(after=version)`` and get the full set whenever it changes.  The
introducer keeps nothing on disk: restarted, it is refilled by the servers'
reconnects within seconds.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from .announce import Announcement
from .errors import FormatError, UsageError

log = logging.getLogger(__name__)
MAX_WAIT = 55.0


class BadAnnouncementError(UsageError):
    code = "bad-announcement"


class WrongMethodError(UsageError):
    code = "bad-request"


class IntroducerState:
    def __init__(self) -> None:
        self.announcements: dict[bytes, tuple[bytes, bytes, Announcement]] = {}
        self.holders: dict[bytes, object] = {}
        """node id → the session whose connection keeps its announcement alive"""
        self.version = 0
        self._changed = trio.Event()

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
        self.announcements[node] = (data, signature, ann)
        self.holders[node] = holder
        self._bump()

    def remove(self, node: bytes, holder: object) -> None:
        if node in self.announcements and self.holders.get(node) is holder:
            del self.announcements[node]
            del self.holders[node]
            self._bump()

    async def wait_newer(self, after: int, timeout: float) -> None:
        with trio.move_on_after(timeout):
            while self.version <= after:
                await self._changed.wait()


class IntroducerSession:
    """The introducer's methods as seen by one connection."""

    def __init__(self, state: IntroducerState) -> None:
        self.state = state
        self.announced: dict[bytes, int] = {}

    async def handle(self, method: str, args: dict[str, Any]) -> Any:
        if method == "announce":
            try:
                ann = Announcement.verify(args["announcement"], args["signature"])
            except FormatError as e:
                raise BadAnnouncementError(str(e)) from None
            self.state.put(args["announcement"], args["signature"], ann, self)
            self.announced[ann.address.node_id] = ann.seq
            log.info("server %s (%s) announced", ann.address, ann.nickname)
            return None
        if method == "get_peers":
            await self.state.wait_newer(args["after"], min(float(args["wait"]), MAX_WAIT))
            return {
                "version": self.state.version,
                "announcements": [[d, s] for d, s, _ in self.state.announcements.values()],
            }
        raise WrongMethodError(f"an introducer does not answer {method}")

    def closed(self) -> None:
        for node in self.announced:
            self.state.remove(node, self)
