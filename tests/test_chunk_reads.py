"""Reading a chunked file on real servers: the shares of all its chunks are
found with one ``get_buckets_many`` per server, each share is read in one
request, and neither servers that lie to that search nor servers too old
to know it keep the reader from the right bytes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from gridfs.caps import ChunkedCap, b32encode, parse, parse_read_cap
from gridfs.client import chunkread, sharemap
from gridfs.client.chunked import load_manifest
from gridfs.client.download import open_downloader
from gridfs.client.grid import GridClient
from gridfs.storage.service import WrongServerError

from .gridutil import Grid, GridSession, open_grid
from .test_chunked import SERVERS, TIMEOUT, K, MiB, N, client_node, put_random


class Counting(GridSession):
    """A server that counts the share searches it answers (by server index)."""

    calls: ClassVar[Counter[tuple[str, int]]] = Counter()

    async def rpc_get_buckets(self, si: bytes) -> list[list[int]]:
        self.calls["get_buckets", self.node.index] += 1
        return await super().rpc_get_buckets(si)

    async def rpc_get_buckets_many(self, sis: list[bytes]) -> list[list[list[int]]]:
        self.calls["get_buckets_many", self.node.index] += 1
        answers = await super().rpc_get_buckets_many(sis)
        self.calls["get_buckets", self.node.index] -= len(sis)  # (answered through it)
        return answers


class Old(Counting):
    """A server older than ``get_buckets_many`` (if its index is in ``old``)."""

    old: ClassVar[set[int]] = set()

    async def rpc_get_buckets_many(self, sis: list[bytes]) -> list[list[list[int]]]:
        if self.node.index in self.old:
            self.calls["get_buckets_many", self.node.index] += 1
            raise WrongServerError("a storage server does not answer get_buckets_many")
        return await super().rpc_get_buckets_many(sis)


class Liar(GridSession):
    """A server lying to the batched search (if its index is in ``liars``):
    ``claims`` says it holds every share of every object asked about and
    serves the bytes of a share of another object for them; ``hides`` says
    it holds nothing; ``short`` answers fewer lists than it was asked for;
    ``stalls`` never answers."""

    liars: ClassVar[set[int]] = set()
    mode: ClassVar[str] = "claims"

    def _lying(self) -> bool:
        return self.node.index in self.liars

    async def rpc_get_buckets_many(self, sis: list[bytes]) -> list[list[list[int]]]:
        honest = await super().rpc_get_buckets_many(sis)
        if not self._lying():
            if self.liars and self.mode == "claims":
                await trio.sleep(0.2)  # the liars' claims come first: they are tried
            return honest
        if self.mode == "claims":
            return [[[num, 1_000_000] for num in range(N)] for _ in sis]
        if self.mode == "hides":
            return [[] for _ in sis]
        if self.mode == "stalls":
            await trio.sleep_forever()
        return honest[:-1]

    async def rpc_read(self, si: bytes, sharenum: int, offset: int, length: int) -> Any:
        if not self._lying() or self.mode != "claims":
            return await super().rpc_read(si, sharenum, offset, length)
        other = next(p for p in self.node.all_shares() if p.parent.name != b32encode(si))
        with open(other, "rb") as f:
            f.seek(offset)
            return f.read(length)


async def put_big(client: GridClient, tmp_path: Path, seed: int) -> tuple[str, bytes]:
    cap, data = await put_random(client, tmp_path, seed, 12 * MiB)
    return cap.to_string(), data


async def get_with_problems(client: GridClient, cap: str) -> tuple[bytes, list[str]]:
    parts: list[bytes] = []

    async def collect(data: bytes) -> None:
        parts.append(data)

    problems = await client.get(parse_read_cap(cap), collect)
    return b"".join(parts), problems


def chunk_reads(grid: Grid, sis: list[bytes]) -> Counter[bytes]:
    return Counter(r.si for node in grid.nodes for r in node.behaviour.reads if r.si in sis)


async def test_a_chunked_get_asks_each_server_once_and_reads_each_share_once(
    tmp_path: Path,
) -> None:
    async with open_grid(tmp_path / "grid", SERVERS, session_class=Counting) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap, data = await put_big(client, tmp_path, 41)
                parsed = parse(cap)
                assert isinstance(parsed, ChunkedCap)
                sis = [c.storage_index for c in (await load_manifest(client, parsed)).chunk_caps()]
                assert len(sis) >= 4
                chunkread._manifests.clear()
                Counting.calls.clear()
                for node in grid.nodes:
                    node.behaviour.reads.clear()
                got, problems = await get_with_problems(client, cap)
                assert got == data and not problems
                many = {
                    i: n for (call, i), n in Counting.calls.items() if call == "get_buckets_many"
                }
                assert many == {node.index: 1 for node in grid.nodes}
                # The manifest's own search asks k+1 servers; the chunks' none.
                assert (
                    sum(n for (call, _), n in Counting.calls.items() if call == "get_buckets")
                    <= K + 1
                )
                # Each chunk: k shares, each read in one request (head and records).
                assert chunk_reads(grid, sis) == {si: K for si in sis}


@pytest.mark.parametrize(
    ("mode", "liars"),
    [
        ("claims", 1),
        ("claims", N - K),
        ("hides", 1),
        ("short", 2),
        ("stalls", 1),
        ("stalls", N - K),
    ],
)
async def test_servers_lying_to_the_batched_search_cannot_fool_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, liars: int
) -> None:
    """(With N - K stalling, only k shares are named: the search waits for
    the others until its time-out, then the chunks are read from those.)"""
    monkeypatch.setattr(sharemap, "LOCATE_TIMEOUT", 1.0)
    async with open_grid(tmp_path / "grid", SERVERS, session_class=Liar) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap, data = await put_big(client, tmp_path, 43)
                chunkread._manifests.clear()
                Liar.liars, Liar.mode = {node.index for node in grid.nodes[:liars]}, mode
                try:
                    got, problems = await get_with_problems(client, cap)
                finally:
                    Liar.liars = set()
                assert got == data
                if mode == "claims":  # the shares it named were read, and refused
                    assert problems
                    assert all(any(n.where in p for n in grid.nodes[:liars]) for p in problems)


async def test_servers_that_do_not_know_the_batched_search_are_asked_one_by_one(
    tmp_path: Path,
) -> None:
    """Four servers of five are older than ``get_buckets_many``: they are
    asked it once, and then, for each chunk whose shares the one new server
    cannot supply, the old way."""
    async with open_grid(tmp_path / "grid", SERVERS, session_class=Old) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap, data = await put_big(client, tmp_path, 47)
                chunkread._manifests.clear()
                Old.old = {node.index for node in grid.nodes[1:]}
                Counting.calls.clear()
                try:
                    got, problems = await get_with_problems(client, cap)
                finally:
                    Old.old = set()
                assert got == data and not problems
                many = {
                    i: n for (call, i), n in Counting.calls.items() if call == "get_buckets_many"
                }
                assert many == {node.index: 1 for node in grid.nodes}
                asked = {i for (call, i) in Counting.calls if call == "get_buckets"}
                assert asked >= {node.index for node in grid.nodes[1:]}


async def test_a_whole_read_lets_go_of_the_shares_when_it_ends(tmp_path: Path) -> None:
    """(A downloader is freed by the cycle collector, later: the shares it
    read whole must not wait for that.)"""
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap, data = await put_big(client, tmp_path, 53)
                parsed = parse(cap)
                assert isinstance(parsed, ChunkedCap)
                chunk = (await load_manifest(client, parsed)).chunk_caps()[0]
                async with open_downloader(client.broker, chunk, lazy=True, whole=True) as dl:
                    assert await dl.read(0, chunk.size) == data[: chunk.size]
                    held = [s for srcs in dl.sources.values() for s in srcs if s.data is not None]
                    assert len(held) >= K
                assert all(s.data is None for srcs in dl.sources.values() for s in srcs)
