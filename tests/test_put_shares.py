"""``put_shares``: the shares of several chunks to one server in one request.

On a server: each share stored as ``put_share`` would, a bad one failing
alone, a quota refusing the whole call, the wire's limits.  On a grid: a
chunked put sends each server a few such requests and no other upload
call; servers that refuse them, answer them wrongly or lie about them leave
the chunks to the ordinary upload, and the file reads back whole."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gridfs.caps import ChunkedCap, parse_read_cap
from gridfs.client.batchput import put_objects
from gridfs.client.chunked import put_file
from gridfs.hashes import PlaintextHasher
from gridfs.protocol.schema import MAX_PUT_SHARES, MAX_WRITE, SchemaError, validate_request
from gridfs.storage.leases import QuotaExceededError

from .gridutil import Grid, GridSession, StorageNode, open_grid
from .test_accounting import ALICE, BOB, EncodedFile, Server, encoded, secrets, used
from .test_chunked import (
    SERVERS,
    TIMEOUT,
    N,
    chunk_sis,
    client_node,
    get_all,
)

MiB = 1 << 20


def item(f: EncodedFile, num: int, who: bytes = ALICE, data: bytes | None = None) -> list[Any]:
    s = secrets(f.si, who)
    share = f.shares[num] if data is None else data
    return [f.si, num, share, s["renew_secret"], s["cancel_secret"]]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "s")
    yield s
    s.leases.close()


# -- on one server ------------------------------------------------------------


async def test_each_share_is_stored_and_leased_and_a_repeat_is_already(server: Server) -> None:
    files = [encoded(40_000) for _ in range(3)]
    alice = server.session(ALICE)
    batch = [item(files[0], 0), item(files[1], 1), item(files[2], 0)]
    answers = await alice.handle("put_shares", {"shares": batch})
    assert answers == [{"stored": True, "already": False}] * 3
    assert server.store.shares(files[0].si) == {0: len(files[0].shares[0])}
    assert server.store.shares(files[1].si) == {1: len(files[1].shares[1])}
    assert all(server.leases.count(f.si) == 1 for f in files)
    charged = await used(alice)
    assert charged == len(files[0].shares[0]) + len(files[1].shares[1]) + len(files[2].shares[0])
    assert server.store.open_buckets() == 0 and not list((server.root / "incoming").iterdir())

    bob = server.session(BOB)  # the same shares again: held, and a lease for bob
    answers = await bob.handle("put_shares", {"shares": [item(f, 0, BOB) for f in files[::2]]})
    assert answers == [{"stored": False, "already": True}] * 2
    assert server.leases.count(files[0].si) == 2 and server.leases.count(files[1].si) == 1
    assert await used(alice) == charged


async def test_a_bad_share_fails_alone_and_leaves_nothing_behind(server: Server) -> None:
    good, bad = encoded(40_000), encoded(40_000)
    alice = server.session(ALICE)
    wrong = item(bad, 0, data=bad.shares[1])  # share 1's bytes (its header) as share 0
    short = item(bad, 1, data=bad.shares[1][:-1])
    answers = await alice.handle("put_shares", {"shares": [item(good, 0), wrong, short]})
    assert answers[0] == {"stored": True, "already": False}
    for answer in answers[1:]:
        assert not answer["stored"] and not answer["already"]
        assert answer["error"].startswith(("incomplete: ", "bad-write: "))
    assert server.store.shares(bad.si) == {}
    assert not list((server.root / "incoming").rglob("*"))
    assert await used(alice) == len(good.shares[0])  # no charge stays for the failed ones


async def test_a_batch_past_the_quota_stores_nothing(tmp_path: Path) -> None:
    files = [encoded(40_000) for _ in range(3)]
    size = len(files[0].shares[0])
    server = Server(tmp_path / "s", quota=2 * size + size // 2)
    try:
        alice = server.session(ALICE)
        with pytest.raises(QuotaExceededError):
            await alice.handle("put_shares", {"shares": [item(f, 0) for f in files]})
        assert all(server.store.shares(f.si) == {} for f in files)
        assert all(server.leases.count(f.si) == 0 for f in files)
        assert server.store.open_buckets() == 0 and await used(alice) == 0
        answers = await alice.handle("put_shares", {"shares": [item(f, 0) for f in files[:2]]})
        assert [a["stored"] for a in answers] == [True, True]
    finally:
        server.leases.close()


async def test_a_share_another_connection_is_writing_is_neither(server: Server) -> None:
    f = encoded(40_000)
    bob = server.session(BOB)
    await bob.handle(
        "allocate_buckets",
        {"si": f.si, "sharenums": [0], "share_size": len(f.shares[0])} | secrets(f.si, BOB),
    )
    answers = await server.session(ALICE).handle("put_shares", {"shares": [item(f, 0)]})
    assert answers == [{"stored": False, "already": False}]
    assert server.store.shares(f.si) == {}


def test_the_wire_limits_of_a_batch() -> None:
    f = encoded(40_000)
    ok = [item(f, 0), item(f, 1)]
    assert len(validate_request("put_shares", {"shares": ok})["shares"]) == 2
    big = [item(f, 0, data=bytes(MAX_WRITE // 2 + 1)), item(f, 1, data=bytes(MAX_WRITE // 2))]
    many = [item(encoded(100), 0) for _ in range(MAX_PUT_SHARES + 1)]
    for shares in ([], [item(f, 0), item(f, 0)], big, many, [item(f, 0)[:4]]):
        with pytest.raises(SchemaError):
            validate_request("put_shares", {"shares": shares})


# -- on a grid ----------------------------------------------------------------


class CountingSession(GridSession):
    """Counts the upload calls each server gets."""

    calls: dict[str, int] = {}
    batches: list[int] = []
    """Shares in each put_shares request."""

    async def handle(self, method: str, args: dict[str, Any]) -> Any:
        CountingSession.calls[method] = CountingSession.calls.get(method, 0) + 1
        return await super().handle(method, args)

    async def rpc_put_shares(self, shares: Any) -> Any:
        CountingSession.batches.append(len(shares))
        return await super().rpc_put_shares(shares)


class OldSession(GridSession):
    """A server from before ``put_shares``."""

    async def rpc_put_shares(self, shares: Any) -> Any:
        return await super().handle("no_such_call", {})


class WrongAnswerSession(GridSession):
    """Stores the shares but answers with one answer too few."""

    async def rpc_put_shares(self, shares: Any) -> Any:
        return (await super().rpc_put_shares(shares))[:-1]


class LyingSession(GridSession):
    """Answers "stored" and stores nothing."""

    async def rpc_put_shares(self, shares: Any) -> Any:
        return [{"stored": True, "already": False} for _ in shares]


def plaintext_hash(data: bytes) -> bytes:
    hasher = PlaintextHasher()
    hasher.update(data)
    return hasher.digest()


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


async def test_a_chunked_put_stores_every_chunk_through_put_shares(tmp_path: Path) -> None:
    CountingSession.calls = {}
    async with open_grid(tmp_path / "grid", SERVERS, session_class=CountingSession) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                data = random_file(tmp_path / "f", 24 * MiB)
                cap = await put_file(client, tmp_path / "f")
                assert isinstance(parse_read_cap(cap), ChunkedCap)
                sis = await chunk_sis(client, cap)
                calls = dict(CountingSession.calls)
                assert SERVERS <= calls["put_shares"] <= len(sis) * SERVERS
                assert "allocate_buckets" not in calls and "write" not in calls
                assert calls.get("put_share", 0) <= SERVERS  # the manifest, alone
                for si in sis:
                    assert sum(len(node.shares(si)) for node in grid.nodes) == N
                assert await get_all(client, cap) == data


async def test_each_server_gets_the_shares_of_several_chunks_in_one_request(
    tmp_path: Path,
) -> None:
    CountingSession.batches = []
    async with open_grid(tmp_path / "grid", SERVERS, session_class=CountingSession) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                objects = [os.urandom(300_000) for _ in range(6)]
                caps = await put_objects(client, [(d, plaintext_hash(d)) for d in objects])
                assert CountingSession.batches == [6] * SERVERS
                for data, cap in zip(objects, caps, strict=True):
                    assert cap is not None
                    assert sum(len(node.shares(cap.storage_index)) for node in grid.nodes) == N
                    assert await get_all(client, cap.to_string()) == data


async def put_with_one_odd_server(
    tmp_path: Path, session: type[GridSession]
) -> tuple[Grid, StorageNode, set[bytes]]:
    """Put a chunked file on a grid whose last server is served by
    ``session``, read it back whole, and return the grid (stopped: its
    share files stay), that server, and the chunks' storage indexes."""
    async with open_grid(tmp_path / "grid", SERVERS - 1) as grid:
        grid.session_class = session
        odd = (await grid.add_servers(1))[0]
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                data = random_file(tmp_path / "f", 12 * MiB)
                cap = await put_file(client, tmp_path / "f")
                assert await get_all(client, cap) == data
                return grid, odd, await chunk_sis(client, cap)


@pytest.mark.parametrize("session", [OldSession, WrongAnswerSession])
async def test_a_server_that_fails_batches_gets_each_chunk_alone(
    tmp_path: Path, session: type[GridSession]
) -> None:
    grid, odd, sis = await put_with_one_odd_server(tmp_path, session)
    for si in sis:  # the odd server holds its share of every chunk
        assert len(odd.shares(si)) == 1
        assert sum(len(node.shares(si)) for node in grid.nodes) == N


async def test_a_server_that_says_it_stored_what_it_dropped_cannot_spoil_the_file(
    tmp_path: Path,
) -> None:
    grid, liar, sis = await put_with_one_odd_server(tmp_path, LyingSession)
    for si in sis:
        assert not liar.shares(si)
        assert sum(len(node.shares(si)) for node in grid.nodes) == N - 1
