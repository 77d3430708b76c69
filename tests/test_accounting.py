"""Per-member accounting on a storage server, attacked: a member filling past
its quota, empty allocations, open buckets held for free, slots over the
reserved space, charges after a crash, and a flood of corruption reports
against another member's lease and close operations."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from gridfs.client.upload import UploadParams
from gridfs.codec import params_for_size
from gridfs.config import NodeConfig, NodeDir
from gridfs.errors import GridError, unwrap
from gridfs.hashes import lease_secrets
from gridfs.immutable import FileEncoder, encode_shares
from gridfs.mutable import MAX_SLOT_RECORD, SlotWriteCap, sign_version
from gridfs.net import tls
from gridfs.net.rpc import RemoteError, RpcClient
from gridfs.node import run_storage
from gridfs.storage.leases import SLOT, LeaseDB, QuotaExceededError
from gridfs.storage.service import VERIFY_CONCURRENCY, StorageSession, server_state
from gridfs.storage.slots import SlotStore
from gridfs.storage.store import ShareStore, StoreLimits

from .gridutil import MEMBERS, open_broker, open_grid, upload_bytes

ALICE = b"a" * 20
BOB = b"b" * 20
TIMEOUT = 60


@dataclasses.dataclass(frozen=True)
class EncodedFile:
    si: bytes
    shares: list[bytes]
    verify_cap: str


def encoded(size: int, k: int = 1, n: int = 2) -> EncodedFile:
    """A real file's shares (valid headers, hashes and chains)."""
    params = params_for_size(k, n, 1 << 20, size)
    finished, shares = encode_shares(FileEncoder(os.urandom(32), params, size), os.urandom(size))
    cap = finished.cap
    return EncodedFile(cap.storage_index, shares, cap.verify_cap().to_string())


def slot_write(who: bytes, payload: int = 500) -> dict[str, Any]:
    """slot_write arguments for version 1 of a new slot."""
    write_cap = SlotWriteCap.generate()
    version = sign_version(write_cap, 1, os.urandom(payload))
    si = write_cap.storage_index
    return {
        "si": si,
        "record": version.record,
        "signature": version.signature,
        "check": False,
        "expected_seq": 0,
    } | secrets(si, who)


def secrets(si: bytes, who: bytes) -> dict[str, bytes]:
    renew, cancel = lease_secrets(who.ljust(32, b"."), si, b"server-id-" + who[:10])
    return {"renew_secret": renew, "cancel_secret": cancel}


class Server:
    """One server's stores, as run_storage makes them, with sessions built
    directly (a session per member, as if each had its own connection)."""

    def __init__(self, root: Path, quota: int = 0, reserved_space: int = 0) -> None:
        self.root = root
        self.limits = StoreLimits(reserved_space=reserved_space, client_quota=quota)
        self.open()

    def open(self) -> None:
        self.store = ShareStore(self.root, self.limits)
        self.slots = SlotStore(self.root)

        def collect(si: bytes) -> None:
            self.store.delete_all(si)
            self.slots.delete(si)

        self.leases = LeaseDB(self.root / "leases.sqlite", collect)

    def restart(self) -> None:
        """As after a crash: nothing of the old objects is cleaned up."""
        self.leases.close()
        self.open()

    def session(self, member: bytes) -> StorageSession:
        return StorageSession(self.store, 60.0, self.slots, self.leases, member=member)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "s", quota=0)
    yield s
    s.leases.close()


async def store_share(session: StorageSession, f: EncodedFile, num: int = 0) -> None:
    data = f.shares[num]
    reply = await session.handle(
        "allocate_buckets",
        {"si": f.si, "sharenums": [num], "share_size": len(data), **secrets(f.si, session.member)},
    )
    assert reply == {"already": [], "allocated": [num]}
    await session.handle("write", {"si": f.si, "sharenum": num, "chunks": [(0, data)]})
    await session.handle("close", {"si": f.si, "sharenum": num})


async def used(session: StorageSession) -> int:
    stats = await session.handle("stats", {})
    return int(stats["member_used"])


async def test_a_member_past_its_quota_is_refused_and_another_still_writes(
    tmp_path: Path,
) -> None:
    files = [encoded(50_000) for _ in range(4)]
    size = len(files[0].shares[0])
    server = Server(tmp_path / "s", quota=3 * size + size // 2)
    alice, bob = server.session(ALICE), server.session(BOB)
    for f in files[:3]:
        await store_share(alice, f)
    assert await used(alice) == 3 * size
    stats = await alice.handle("stats", {})
    assert stats["member_quota"] == 3 * size + size // 2

    with pytest.raises(QuotaExceededError, match="quota exceeded") as caught:
        await store_share(alice, files[3])
    assert caught.value.code == "quota-exceeded"
    assert not server.store.shares(files[3].si) and server.store.open_buckets() == 0
    assert server.leases.count(files[3].si) == 0  # the refusal added no lease
    with pytest.raises(QuotaExceededError):  # nor through put_share
        await alice.handle(
            "put_share",
            {"si": files[3].si, "sharenum": 1, "data": files[3].shares[1]}
            | secrets(files[3].si, ALICE),
        )
    assert await used(alice) == 3 * size

    await store_share(bob, files[3])  # another member is not affected
    assert await used(bob) == size and await used(alice) == 3 * size
    server.leases.close()


async def test_the_quota_error_reaches_the_client_over_the_wire(tmp_path: Path) -> None:
    f = encoded(50_000)
    async with one_server(tmp_path, quota=1000) as (address, _), connected(address) as client:
        with pytest.raises(RemoteError, match="quota exceeded") as caught:
            await client.call(
                "allocate_buckets",
                {"si": f.si, "sharenums": [0], "share_size": len(f.shares[0])} | secrets(f.si, b""),
            )
        assert caught.value.code == "quota-exceeded"


async def test_open_buckets_count_against_the_quota(server: Server) -> None:
    server.store.limits = dataclasses.replace(server.limits, client_quota=100_000)
    alice = server.session(ALICE)
    a, b = encoded(30_000), encoded(30_000)
    share = 60_000  # promised, never written
    await alice.handle(
        "allocate_buckets",
        {"si": a.si, "sharenums": [0], "share_size": share} | secrets(a.si, ALICE),
    )
    assert await used(alice) == share
    with pytest.raises(QuotaExceededError):
        await alice.handle(
            "allocate_buckets",
            {"si": b.si, "sharenums": [0], "share_size": share} | secrets(b.si, ALICE),
        )
    await alice.handle("abort", {"si": a.si, "sharenum": 0})
    assert await used(alice) == 0
    await alice.handle(
        "allocate_buckets",
        {"si": b.si, "sharenums": [0], "share_size": share} | secrets(b.si, ALICE),
    )
    alice.abort_all()  # the connection ended: its promises go with it
    assert server.store.open_buckets() == 0  # at once
    with trio.fail_after(10):
        while await used(alice):  # and the charge soon after
            await trio.sleep(0.01)


async def test_a_thousand_empty_allocations_add_no_lease(server: Server) -> None:
    alice, bob = server.session(ALICE), server.session(BOB)
    for i in range(1000):
        si = i.to_bytes(16, "big")
        reply = await alice.handle(
            "allocate_buckets", {"si": si, "sharenums": [], "share_size": 1000} | secrets(si, ALICE)
        )
        assert reply == {"already": [], "allocated": []}
    assert server.leases.total() == 0 and await used(alice) == 0
    # A share someone else is uploading is not "held" either.
    f = encoded(10_000)
    args = {"si": f.si, "sharenums": [0], "share_size": len(f.shares[0])}
    await alice.handle("allocate_buckets", args | secrets(f.si, ALICE))
    reply = await bob.handle("allocate_buckets", args | secrets(f.si, BOB))
    assert reply == {"already": [], "allocated": []}
    assert server.leases.total() == 1 and await used(bob) == 0


async def test_slots_need_room_above_the_reserved_space(tmp_path: Path) -> None:
    server = Server(tmp_path / "s", reserved_space=10**18)
    alice = server.session(ALICE)
    args = slot_write(ALICE)
    si = args["si"]
    with pytest.raises(GridError, match="no room") as caught:
        await alice.handle("slot_write", args)
    assert caught.value.code == "no-space"  # type: ignore[attr-defined]
    assert server.slots.read(si) is None
    assert server.leases.total() == 0 and await used(alice) == 0

    server.store.limits = dataclasses.replace(server.limits, reserved_space=0)
    assert (await alice.handle("slot_write", args)) == {"ok": True}
    size = server.slots.size(si)
    assert size is not None and 500 < size <= MAX_SLOT_RECORD + 200
    assert server.leases.charges(ALICE) == {(si, SLOT): size}
    assert await used(alice) == size
    server.leases.close()


async def test_slots_count_against_the_quota(tmp_path: Path) -> None:
    server = Server(tmp_path / "s", quota=1000)
    alice = server.session(ALICE)
    assert (await alice.handle("slot_write", slot_write(ALICE, 200))) == {"ok": True}
    args = slot_write(ALICE, 2000)
    with pytest.raises(QuotaExceededError):
        await alice.handle("slot_write", args)
    assert server.slots.read(args["si"]) is None and server.leases.count(args["si"]) == 0
    server.leases.close()


async def test_two_members_of_one_file_and_nobody_charges_another(server: Server) -> None:
    """Bob leasing Alice's file is charged for what was there; Alice is never
    charged for shares Bob adds later; cancelling frees only Bob's account."""
    alice, bob = server.session(ALICE), server.session(BOB)
    f = encoded(40_000, k=1, n=3)
    size = len(f.shares[0])
    await store_share(alice, f, 0)
    renew, cancel = secrets(f.si, BOB).values()
    assert await bob.handle("add_leases", {"leases": [(f.si, renew, cancel)]}) == [1]
    assert await used(bob) == size and await used(alice) == size
    await store_share(bob, f, 1)  # Bob adds a share: his to pay for
    assert await used(bob) == 2 * size and await used(alice) == size
    reply = await bob.handle("cancel_leases", {"leases": [(f.si, cancel)], "renewed_before": 2**62})
    assert reply == ["cancelled"]
    assert await used(bob) == 0 and await used(alice) == size  # Alice's lease keeps both
    # A lease on something not stored adds nothing, however often.
    other = encoded(1000)
    r, c = secrets(other.si, BOB).values()
    assert await bob.handle("add_leases", {"leases": [(other.si, r, c)] * 3}) == [0, 0, 0]
    assert await used(bob) == 0


async def test_new_leases_past_the_quota_are_refused_but_renewals_never(tmp_path: Path) -> None:
    server = Server(tmp_path / "s", quota=0)
    alice, bob = server.session(ALICE), server.session(BOB)
    f, g = encoded(40_000), encoded(40_000)
    await store_share(alice, f)
    await store_share(alice, g)
    size = len(f.shares[0])
    bobs = encoded(40_000)
    await store_share(bob, bobs)
    renewed = server.leases.leases(bobs.si)[0].renewed_ns
    server.store.limits = dataclasses.replace(server.limits, client_quota=size + size // 2)
    # Bob's new lease would pass his quota: refused alone, his renewal goes on.
    mine = (bobs.si, *secrets(bobs.si, BOB).values())
    new = (f.si, *secrets(f.si, BOB).values())
    assert await bob.handle("add_leases", {"leases": [mine, new]}) == [1, -1]
    assert server.leases.count(f.si) == 1 and await used(bob) == size  # nothing added
    assert server.leases.leases(bobs.si)[0].renewed_ns > renewed
    # Alice is over the (lowered) quota, yet renews what she holds.
    renewals = [(s.si, *secrets(s.si, ALICE).values()) for s in (f, g)]
    assert await alice.handle("add_leases", {"leases": renewals}) == [1, 1]
    assert await used(alice) == 2 * size
    server.leases.close()


async def test_charges_survive_a_restart_and_a_crash_leaves_none_for_nothing(
    server: Server,
) -> None:
    alice = server.session(ALICE)
    kept, lost, closed = encoded(30_000), encoded(30_000), encoded(30_000)
    await store_share(alice, kept)
    size = len(kept.shares[0])
    # An upload under way when the server dies: its charge must not outlive it.
    await alice.handle(
        "allocate_buckets",
        {"si": lost.si, "sharenums": [0], "share_size": size} | secrets(lost.si, ALICE),
    )
    # An upload closed on disk whose settlement the crash lost.
    await alice.handle(
        "allocate_buckets",
        {"si": closed.si, "sharenums": [0], "share_size": size} | secrets(closed.si, ALICE),
    )
    bucket = alice.buckets.pop((closed.si, 0))
    bucket.write(0, closed.shares[0])
    bucket.close()  # ...and no settle
    assert server.leases.usage(ALICE) == 3 * size
    server.restart()  # no abort_all: the process died
    fresh = server.session(ALICE)
    empty = {"si": lost.si, "sharenums": [], "share_size": size} | secrets(lost.si, ALICE)
    await fresh.handle("allocate_buckets", empty)  # the first upload call reconciles
    assert await used(fresh) == 2 * size  # kept and closed, not lost
    assert server.leases.charges(ALICE) == {(kept.si, 0): size, (closed.si, 0): size}


async def test_expiry_and_collection_release_the_charges(tmp_path: Path) -> None:
    now = [10**18]
    store = ShareStore(tmp_path, StoreLimits(reserved_space=0))

    def collect(si: bytes) -> None:
        store.delete_all(si)

    leases = LeaseDB(tmp_path / "leases.sqlite", collect, duration=10, clock=lambda: now[0])
    alice = StorageSession(store, 60.0, SlotStore(tmp_path), leases, member=ALICE)
    f = encoded(20_000)
    await store_share(alice, f)
    assert leases.usage(ALICE) == len(f.shares[0])
    now[0] += 11 * 10**9
    assert leases.expire_step() == (1, 1)
    assert leases.usage(ALICE) == 0 and not store.shares(f.si)
    leases.close()


@contextlib.asynccontextmanager
async def one_server(
    tmp_path: Path, quota: int = 0
) -> AsyncIterator[tuple[Any, list[StorageSession]]]:
    """A real storage node of the test grid on loopback (each connection's
    member is its peer's, from TLS).  Yields its address and the sessions
    made so far."""
    node = NodeDir(tmp_path / "node")
    node.create(NodeConfig("storage", "s", reserved_space=0, client_quota=quota))
    MEMBERS.enroll(node, "storage")
    sessions: list[StorageSession] = []

    def factory(store: ShareStore, idle_timeout: float) -> StorageSession:
        session = StorageSession(store, idle_timeout)
        sessions.append(session)
        return session

    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            lambda task_status: run_storage(node, session_factory=factory, task_status=task_status)
        )
        yield address, sessions
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def connected(address: Any) -> AsyncIterator[RpcClient]:
    """A connection of a new member of the test grid (an account of its own)."""
    stream = await tls.connect(address, MEMBERS.credentials("client"))
    client = RpcClient(stream, default_timeout=30)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        yield client
        await client.aclose()
        nursery.cancel_scope.cancel()


async def test_a_flood_of_reports_waits_for_its_turn_and_leases_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Six connections report a 4 MiB share corrupt 40 times each (forged
    caps: the server must hash it to see it is fine).  Another member's
    add_leases and a whole upload finish while the flood still waits, at
    most VERIFY_CONCURRENCY checks ever run at once, and the log gets one
    warning, not 240."""
    caplog.set_level(logging.INFO, logger="gridfs")
    big, small = encoded(4 << 20), encoded(20_000)
    forged = big.verify_cap.rsplit(":", 4)
    forged[1] = "a" * len(forged[1])  # another extension block hash
    forged_cap = ":".join(forged)
    with trio.fail_after(TIMEOUT):
        async with (
            one_server(tmp_path) as (address, sessions),
            connected(address) as alice,
            connected(address) as bob,
        ):
            share = big.shares[0]
            lease = secrets(big.si, ALICE)
            await alice.call(
                "allocate_buckets",
                {"si": big.si, "sharenums": [0], "share_size": len(share)} | lease,
            )
            for off in range(0, len(share), 1 << 20):
                await alice.call(
                    "write",
                    {
                        "si": big.si,
                        "sharenum": 0,
                        "chunks": [[off, share[off : off + (1 << 20)]]],
                    },
                )
            await alice.call("close", {"si": big.si, "sharenum": 0})
            await bob.call("stats", {})
            state = server_state(sessions[0].store)
            flood_done = trio.Event()
            replies: list[dict[str, Any]] = []

            async def flood() -> None:
                async with contextlib.AsyncExitStack() as stack:
                    clients = [
                        await stack.enter_async_context(connected(address)) for _ in range(6)
                    ]

                    async def report(c: RpcClient) -> None:
                        args = {"si": big.si, "sharenum": 0, "verify_cap": forged_cap}
                        replies.append(await c.call("report_corrupt", args))

                    async with trio.open_nursery() as n:
                        for c in clients:
                            for _ in range(40):
                                n.start_soon(report, c)
                flood_done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                while state.verifying < VERIFY_CONCURRENCY:
                    await trio.sleep(0.005)
                # Bob's lease and upload go on meanwhile.
                renew, cancel = secrets(big.si, BOB).values()
                assert await bob.call("add_leases", {"leases": [[big.si, renew, cancel]]}) == [1]
                data = small.shares[0]
                await bob.call(
                    "allocate_buckets",
                    {"si": small.si, "sharenums": [0], "share_size": len(data)}
                    | secrets(small.si, BOB),
                )
                await bob.call("write", {"si": small.si, "sharenum": 0, "chunks": [[0, data]]})
                await bob.call("close", {"si": small.si, "sharenum": 0})
                assert not flood_done.is_set(), "the flood ended before Bob's calls"
            assert len(replies) == 240
            assert all(not r["quarantined"] for r in replies)
            assert state.most_verifying == VERIFY_CONCURRENCY
            assert sessions[0].store.shares(big.si) == {0: len(share)}
        warnings = [r for r in caplog.records if "not quarantined" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        for cap in (big.verify_cap, forged_cap):  # no cap in the log
            assert cap.split(":")[3] not in caplog.text


async def test_an_upload_past_the_quota_fails_with_one_clear_error(
    tmp_path: Path, secret: bytes
) -> None:
    """A real client's upload: the first fits, the next would pass the
    member's quota and fails saying so; nothing of it stays on the server."""
    params = UploadParams(k=1, happy=1, n=1)
    with trio.fail_after(TIMEOUT):
        async with (
            one_server(tmp_path, quota=150_000) as (address, sessions),
            open_broker([address]) as broker,
        ):
            await upload_bytes(broker, os.urandom(100_000), tmp_path, params, secret)
            with pytest.raises(GridError) as caught:
                await upload_bytes(broker, os.urandom(100_000), tmp_path, params, secret)
            message = str(unwrap(caught.value))
            assert "quota exceeded" in message and "\n" not in message, message
            store = sessions[0].store
            assert store.capacity()["shares"] == 1 and store.open_buckets() == 0


def test_client_quota_is_a_storage_setting(tmp_path: Path) -> None:
    config = NodeConfig("storage", "s", client_quota=10 << 30)
    assert "client_quota = 10737418240" in config.to_toml()
    assert NodeConfig.from_toml(config.to_toml()).client_quota == 10 << 30
    assert NodeConfig("storage", "s").client_quota == 0  # no limit by default
    for bad in (-1, 1.5, "10G"):
        with pytest.raises(GridError, match="client_quota"):
            NodeConfig("storage", "s", client_quota=bad)  # type: ignore[arg-type]


async def test_a_quota_in_the_config_is_enforced_per_member(tmp_path: Path, secret: bytes) -> None:
    """``[storage] client_quota`` of a server run from its node directory:
    one member is refused past it, another member still stores."""
    params = UploadParams(k=1, happy=1, n=1)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=1, client_quota=150_000) as grid:
            async with open_broker(grid.addresses) as broker:
                await upload_bytes(broker, os.urandom(100_000), tmp_path, params, secret)
                with pytest.raises(GridError, match="quota exceeded"):
                    try:
                        await upload_bytes(broker, os.urandom(100_000), tmp_path, params, secret)
                    except BaseExceptionGroup as group:
                        raise unwrap(group) from None
            other = MEMBERS.credentials("client", "other-member")
            async with open_broker(grid.addresses, credentials=other) as broker:
                await upload_bytes(broker, os.urandom(100_000), tmp_path, params, secret)
            assert len(grid.all_shares()) == 2
