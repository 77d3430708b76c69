"""Finding the shares of many objects at once: the chunks of one file.

A chunk's own share search asks k+1 servers where its shares are, one
``get_buckets`` each: for a file of 4 MiB chunks that is one request per
megabyte on top of the reads, which cost the servers and the client more
than the reads themselves.  A :class:`ShareMap` asks each server about up to
MAX_LOOKUPS chunks in one ``get_buckets_many`` request, one window of chunks
ahead of the reads, and tells each chunk's downloader where its shares are
(:class:`~gridfs.client.download.Located`).  The downloader reads and
verifies those shares as always (an answer proves nothing: a share is
trusted only once it verifies against the chunk's cap), and asks servers
itself when they do not serve: the servers this search did not hear from
(down, slow, or too old to know the request, which are not asked again).

With ``spread``, each server is asked only about the objects for which it
is among the first ``spread`` servers in the object's own order (k+1: where
the primary shares and a spare are, normally), as an object's own lazy
search asks: on a grid of N servers, a server then looks up about
(k+1)/N of the objects instead of all of them (each a directory read on
its disk).  The others are the object's unasked servers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable

import trio

from ..errors import GridError
from ..net.rpc import RemoteError
from ..protocol.schema import MAX_LOOKUPS
from .broker import Server, StorageBroker
from .download import LOCATE_TIMEOUT, Located

log = logging.getLogger(__name__)


class _Lookup:
    """One window of storage indexes, asked of every server at once."""

    def __init__(self, sis: list[bytes]) -> None:
        self.sis = sis
        self.found: dict[bytes, list[tuple[Server, int, int]]] = {si: [] for si in sis}
        self.asked: dict[bytes, set[Server]] = {si: set() for si in sis}
        """the servers asked about each object"""
        self.waiting: set[Server] = set()
        """servers asked that have not answered (nor failed) yet"""
        self.answered: set[Server] = set()
        self.changed = trio.Event()

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class ShareMap:
    """Where the shares of a sequence of objects are, found a window at a
    time; get one from :func:`open_share_map`."""

    def __init__(
        self,
        broker: StorageBroker,
        nursery: trio.Nursery,
        sis: Iterable[bytes],
        spread: int | None = None,
    ) -> None:
        self.broker = broker
        self.spread = spread
        """ask each object of its first ``spread`` servers only (None: of all)"""
        self._nursery = nursery
        order = list(dict.fromkeys(sis))
        self._windows = [order[i : i + MAX_LOOKUPS] for i in range(0, len(order), MAX_LOOKUPS)]
        self._window_of = {si: i // MAX_LOOKUPS for i, si in enumerate(order)}
        self._lookups: dict[int, _Lookup] = {}
        self.unsupported: set[Server] = set()
        """servers that do not know ``get_buckets_many``: not asked again"""

    async def located(self, si: bytes, k: int) -> Located | None:
        """Where the shares of ``si`` are: once k+1 distinct shares are found
        or every server has answered.  None for an object not in the map, or
        when no server answered (the object's own share search is better
        then: it asks k+1 servers first, in the object's order)."""
        window = self._window_of.get(si)
        if window is None:
            return None
        for i in (window, window + 1):  # (the next window is asked ahead)
            self._start(i)
        lookup = self._lookups[window]
        asked = lookup.asked[si]
        while lookup.waiting & asked and len({num for _, num, _ in lookup.found[si]}) <= k:
            await lookup.changed.wait()
        heard = lookup.answered & asked
        if not heard:
            return None
        unasked = [s for s in self.broker.servers.values() if s not in heard]
        return Located(tuple(lookup.found[si]), tuple(unasked))

    def _start(self, window: int) -> None:
        if window in self._lookups or window >= len(self._windows):
            return
        lookup = self._lookups[window] = _Lookup(self._windows[window])
        servers = [s for s in self.broker.servers.values() if s not in self.unsupported]
        ask: dict[Server, list[bytes]] = {s: [] for s in servers}
        for si in lookup.sis:
            first = self.broker.permuted(si)[: self.spread] if self.spread else servers
            for server in first:
                if server in ask:
                    ask[server].append(si)
                    lookup.asked[si].add(server)
        for server, sis in ask.items():
            if sis:
                lookup.waiting.add(server)
                self._nursery.start_soon(self._ask, server, lookup, sis)

    async def _ask(self, server: Server, lookup: _Lookup, sis: list[bytes]) -> None:
        try:
            with trio.fail_after(LOCATE_TIMEOUT):
                answers = await server.calls.get_buckets_many(sis)
        except RemoteError as e:
            if e.code == "bad-request":  # a server older than the request
                self.unsupported.add(server)
            log.info("%s: %s", server.name, e)
        except (GridError, trio.TooSlowError) as e:
            log.info("%s: %s", server.name, e)
        else:
            lookup.answered.add(server)
            for si, shares in zip(sis, answers, strict=True):
                lookup.found[si].extend((server, num, size) for num, size in shares)
        lookup.waiting.discard(server)
        lookup.wake()


@contextlib.asynccontextmanager
async def open_share_map(
    broker: StorageBroker, sis: Iterable[bytes], spread: int | None = None
) -> AsyncIterator[ShareMap]:
    """A :class:`ShareMap` for ``sis`` (in the order they will be read),
    whose searches run in the background while it lives (``spread``: see
    the module's docstring)."""
    async with trio.open_nursery() as nursery:
        try:
            yield ShareMap(broker, nursery, sis, spread)
        finally:
            nursery.cancel_scope.cancel()
