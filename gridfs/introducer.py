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


class IntroducerState:
    def __init__(self) -> None:
        self.announcements: dict[bytes, tuple[bytes, bytes, Announcement]] = {}
        self.version = 0
        self._changed = trio.Event()

    def _bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = trio.Event()

    def put(self, data: bytes, signature: bytes, ann: Announcement) -> None:
        node = ann.address.node_id
        old = self.announcements.get(node)
        if old is not None and old[2].seq > ann.seq:
            raise BadAnnouncementError("an announcement with a higher sequence number is held")
        self.announcements[node] = (data, signature, ann)
        self._bump()

    def remove(self, node: bytes, seq: int) -> None:
        held = self.announcements.get(node)
        if held is not None and held[2].seq == seq:
            del self.announcements[node]
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
            self.state.put(args["announcement"], args["signature"], ann)
            self.announced[ann.address.node_id] = ann.seq
            log.info("server %s (%s) announced", ann.address, ann.nickname)
            return None
        if method == "get_peers":
            await self.state.wait_newer(args["after"], min(float(args["wait"]), MAX_WAIT))
            return {
                "version": self.state.version,
                "announcements": [[d, s] for d, s, _ in self.state.announcements.values()],
            }
        raise UsageError(f"an introducer does not answer {method}")

    def closed(self) -> None:
        for node, seq in self.announced.items():
            self.state.remove(node, seq)
