"""The mount's sequential reads of a chunked file: whole chunks fetched
ahead, their shares found with one ``get_buckets_many`` per server, each
share read in one request, and only a bounded window of them held."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import trio
from gridfs_daemon import chunkahead
from gridfs_daemon.chunkreader import ChunkedReader
from gridfs_daemon.segcache import SegmentCache

from gridfs.client import sharemap
from gridfs.client.chunked import load_manifest

from .gridutil import open_grid
from .test_chunk_reads import Counting, Liar, chunk_reads
from .test_chunked import SERVERS, TIMEOUT, K, MiB, client_node, put_random


class Asked(Counting):
    """Counts the storage indexes each ``get_buckets_many`` asks about too."""

    sis: ClassVar[list[bytes]] = []

    async def rpc_get_buckets_many(self, sis: list[bytes]) -> list[list[list[int]]]:
        self.sis.extend(sis)
        return await super().rpc_get_buckets_many(sis)


async def test_a_sequential_mount_reader_asks_each_server_once_and_reads_shares_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small window, so that the file is longer than it (what is held is bounded).
    monkeypatch.setattr(chunkahead, "AHEAD_START", 4 * MiB)
    monkeypatch.setattr(chunkahead, "AHEAD_BYTES", 4 * MiB)
    async with open_grid(tmp_path / "grid", SERVERS, session_class=Asked) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap, data = await put_random(client, tmp_path, 47, 24 * MiB)
                manifest = await load_manifest(client, cap)
                sis = [c.storage_index for c in manifest.chunk_caps()]
                assert len(sis) >= 5
                Counting.calls.clear()
                Asked.sis.clear()
                for node in grid.nodes:
                    node.behaviour.reads.clear()
                session: Any = SimpleNamespace(grid=client)
                reader = ChunkedReader(session, cap, SegmentCache(None, max_bytes=0))
                parts = []
                largest = max(e.length for e in manifest.elements)
                async with trio.open_nursery() as nursery:
                    try:
                        for offset in range(0, len(data), MiB):
                            parts.append(await reader.read(offset, MiB, nursery))
                            ahead = reader._ahead
                            if ahead is None:
                                continue
                            # Held: the chunks this read touched and a window past them.
                            first = manifest.index_at(offset)
                            last = manifest.index_at(min(len(data), offset + MiB) - 1)
                            held = set(ahead._fetches)
                            assert all(j >= first for j in held)
                            past = sum(manifest.elements[j].length for j in held if j > last)
                            assert past <= max(4 * MiB + largest, 2 * largest)  # (2 at least)
                    finally:
                        reader.close()
            assert b"".join(parts) == data
            many = {i: n for (call, i), n in Counting.calls.items() if call == "get_buckets_many"}
            assert many == {node.index: 1 for node in grid.nodes}
            # Each chunk asked of its first k+1 servers only (as its own search would).
            assert sorted(Asked.sis) == sorted(sis * (K + 1))
            # Only the first chunk, read before the reader was sequential, searched itself.
            searches = sum(n for (call, _), n in Counting.calls.items() if call == "get_buckets")
            assert searches <= K + 1
            # From the third chunk on (the first two may be read before the
            # reader is known to be sequential): k shares, one request each.
            assert chunk_reads(grid, sis[2:]) == {si: K for si in sis[2:]}


@pytest.mark.parametrize(("mode", "liars"), [("hides", 2), ("claims", 1), ("stalls", 1)])
async def test_servers_lying_to_the_read_ahead_search_cannot_fool_the_mount(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, liars: int
) -> None:
    """Asked about a chunk, one of its first k+1 servers says it holds
    nothing, or everything (and serves another object's share), or never
    answers: the chunk's bytes still come out right, from the other servers."""
    monkeypatch.setattr(sharemap, "LOCATE_TIMEOUT", 1.0)
    async with open_grid(tmp_path / "grid", SERVERS, session_class=Liar) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap, data = await put_random(client, tmp_path, 53, 16 * MiB)
                await load_manifest(client, cap)
                session: Any = SimpleNamespace(grid=client)
                reader = ChunkedReader(session, cap, SegmentCache(None, max_bytes=0))
                Liar.liars, Liar.mode = {node.index for node in grid.nodes[:liars]}, mode
                parts = []
                async with trio.open_nursery() as nursery:
                    try:
                        for offset in range(0, len(data), MiB):
                            parts.append(await reader.read(offset, MiB, nursery))
                    finally:
                        reader.close()
                        Liar.liars = set()
            assert b"".join(parts) == data
