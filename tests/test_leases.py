"""Leases and garbage collection: the server's lease database on its own (with
a clock the test controls), then the whole story on a real in-process grid:
expiry, renewal, unlink of what a tree dropped, deduplicated files, secrets
that only work for their owner at their server, the fence, refusing to unlink
on a partial picture, and background check-and-repair.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from gridfs.caps import ReadCap, SliceCap, b32encode, parse_read_cap
from gridfs.client.broker import Server, StorageBroker
from gridfs.client.check import check_file
from gridfs.client.grid import GridClient
from gridfs.client.grid import open_grid as open_client
from gridfs.client.keeper import RetainedSet, get_keeper
from gridfs.client.leases import cancel, take_fences
from gridfs.client.maintain import check_and_repair
from gridfs.client.session import TreeSession, add_alias, create_root
from gridfs.client.upload import UploadParams
from gridfs.config import NodeConfig, NodeDir
from gridfs.dirnode import Entry
from gridfs.errors import GridError, unwrap
from gridfs.hashes import lease_secrets
from gridfs.reach import storage_index_of
from gridfs.storage.leases import (
    CANCELLED,
    DELETED,
    KEPT,
    NONE,
    LeaseDB,
    QuotaExceededError,
    secret_hash,
)
from gridfs.workqueue import PATH

from .gridutil import (
    MEMBERS,
    Grid,
    download_bytes,
    open_broker,
    open_grid,
    upload_bytes,
    write_temp,
)

TIMEOUT = 60
PARAMS = UploadParams(k=3, happy=5, n=5)
SERVERS = 5
SEC = 10**9
T0 = 1_700_000_000_000_000_000
MAX_U64 = 2**64 - 1


# -- the lease database ------------------------------------------------------------


class Clock:
    """A clock the test moves by hand (ns since the epoch)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * SEC)


class Collector:
    """A collect callback that records what it was asked to free (and can fail)."""

    def __init__(self, fail: bool = False) -> None:
        self.freed: list[bytes] = []
        self.fail = fail

    def __call__(self, si: bytes) -> None:
        if self.fail:
            raise OSError("disk on fire")
        self.freed.append(si)


SI1, SI2, SI3 = (bytes([i]) * 16 for i in (1, 2, 3))


def secrets(tag: str) -> tuple[bytes, bytes]:
    """A distinct (renew, cancel) pair for a test's lease ``tag``."""
    return (tag.encode() + b"-renew").ljust(32, b"r"), (tag.encode() + b"-cancel").ljust(32, b"c")


def open_db(
    tmp_path: Path, collect: Callable[[bytes], None], clock: Clock, duration: float = 10.0
) -> LeaseDB:
    return LeaseDB(tmp_path / "leases.sqlite", collect, duration, clock)


def garbage_of(tmp_path: Path) -> list[bytes]:
    db = sqlite3.connect(tmp_path / "leases.sqlite")
    try:
        return [r[0] for r in db.execute("SELECT si FROM garbage ORDER BY si")]
    finally:
        db.close()


def usage_from_charges(db: LeaseDB) -> dict[bytes, int]:
    rows = db.db.execute("SELECT member, sum(bytes) FROM charges GROUP BY member").fetchall()
    return {m: int(b) for m, b in rows}


def usage_table(db: LeaseDB) -> dict[bytes, int]:
    rows = db.db.execute("SELECT member, bytes FROM usage WHERE bytes != 0").fetchall()
    return {m: int(b) for m, b in rows}


def test_usage_always_equals_the_sum_of_charges(tmp_path: Path) -> None:
    """Random leases, uploads, settlements, cancels, expiries and collections
    by three members: the usage the triggers keep never drifts from the
    charges, a member is charged only while it holds a lease, and none
    passes the quota."""
    import random

    rng = random.Random(14)
    clock, collect = Clock(), Collector()
    db = open_db(tmp_path, collect, clock, duration=50.0)
    members = [b"m0", b"m1", b"m2"]
    stored: dict[bytes, dict[int, int]] = {}
    sis = [bytes([i]) * 16 for i in range(1, 9)]
    for step in range(600):
        si, member = rng.choice(sis), rng.choice(members)
        renew, cancel_secret = secrets(f"{member.decode()}-{si[0]}")
        op = rng.randrange(5)
        if op == 0:
            num = rng.randrange(4)
            size = rng.randrange(1, 1000)
            try:
                db.reserve(
                    si,
                    renew,
                    cancel_secret,
                    member,
                    lambda s: dict(stored.get(s, {})),
                    {num: size},
                    quota=3000,
                )
            except QuotaExceededError:
                continue
            if rng.random() < 0.7:
                stored.setdefault(si, {})[num] = size
                db.settle(si, num, size)
            else:
                db.settle(si, num, stored.get(si, {}).get(num))
        elif op == 1:
            db.add_many(
                [(si, renew, cancel_secret)], lambda s: dict(stored.get(s, {})), member, 3000
            )
        elif op == 2:
            if db.cancel(si, cancel_secret) == DELETED:
                stored.pop(si, None)
        elif op == 3:
            clock.advance(rng.randrange(0, 20))
            db.expire_step()
            for freed in collect.freed:
                stored.pop(freed, None)
            collect.freed.clear()
        else:
            db.reconcile(lambda s, n: stored.get(s, {}).get(n))
        assert usage_table(db) == usage_from_charges(db), step
        orphans = db.db.execute(
            "SELECT count(*) FROM charges c WHERE NOT EXISTS "
            "(SELECT 1 FROM leases l WHERE l.si = c.si AND l.member = c.member)"
        ).fetchone()[0]
        assert orphans == 0, step  # a charge only while its member holds a lease
        assert all(db.usage(m) <= 3000 for m in members)
    db.close()


def test_a_database_from_before_accounting_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "leases.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE leases (si BLOB NOT NULL, renew_hash BLOB NOT NULL, "
        "cancel_hash BLOB NOT NULL, renewed_ns INTEGER NOT NULL, expires_ns INTEGER NOT NULL, "
        "renewed_gen INTEGER NOT NULL, PRIMARY KEY (si, renew_hash));"
    )
    renew, cancel_secret = secrets("old")
    old.execute(
        "INSERT INTO leases VALUES (?, ?, ?, 1, ?, 1)",
        (SI1, secret_hash(renew), secret_hash(cancel_secret), T0 + 100 * SEC),
    )
    old.commit()
    old.close()
    db = open_db(tmp_path, Collector(), Clock())
    assert db.count(SI1) == 1 and db.usage(b"") == 0
    # Its client renews it as a member: the lease becomes that member's,
    # charged to it, and cancelling it leaves no charge behind.
    assert db.add_many([(SI1, renew, cancel_secret)], lambda si: {0: 500}, b"m") == [1]
    assert db.count(SI1) == 1 and db.usage(b"m") == 500 and db.usage(b"") == 0
    db.add(SI1, *secrets("other"), member=b"n")  # keeps SI1 after m's lease goes
    assert db.cancel(SI1, cancel_secret) == CANCELLED
    assert db.usage(b"m") == 0 and db.charges(b"m") == {}
    db.close()


def test_renewing_keeps_one_lease_and_extends_its_expiry(tmp_path: Path) -> None:
    clock, collect = Clock(), Collector()
    db = open_db(tmp_path, collect, clock)
    renew, cancel_secret = secrets("a")
    assert db.add(SI1, renew, cancel_secret) == T0 + 10 * SEC
    clock.advance(4)
    # A renewal may carry another cancel secret: the lease keeps its first one.
    assert db.add(SI1, renew, b"x" * 32) == T0 + 14 * SEC
    (lease,) = db.leases(SI1)
    assert lease.renewed_ns == T0 + 4 * SEC and lease.expires_ns == T0 + 14 * SEC
    assert lease.renew_hash == secret_hash(renew) and lease.cancel_hash == secret_hash(
        cancel_secret
    )
    assert db.total() == 1 and db.count(SI1) == 1
    clock.advance(9)  # past the first expiry, not the renewed one
    assert db.expired() == 0 and db.expire_step() == (0, 0)
    assert db.cancel(SI1, b"x" * 32) == NONE
    assert collect.freed == [] and db.count(SI1) == 1
    assert db.cancel(SI1, cancel_secret) == DELETED
    assert collect.freed == [SI1]
    db.close()


def test_cancel_answers_none_cancelled_deleted(tmp_path: Path) -> None:
    clock, collect = Clock(), Collector()
    db = open_db(tmp_path, collect, clock)
    (ra, ca), (rb, cb) = secrets("a"), secrets("b")
    db.add(SI1, ra, ca)
    db.add(SI1, rb, cb)
    db.add(SI2, ra, ca)  # the same secrets on another index are another lease

    # A wrong cancel secret (or a renew secret, or one from another index) does nothing.
    for wrong in (os.urandom(32), ra, secrets("c")[1]):
        assert db.cancel(SI1, wrong) == NONE
        assert db.cancel(SI1, wrong, MAX_U64) == NONE
    assert db.cancel(SI3, ca) == NONE
    assert collect.freed == [] and db.count(SI1) == 2

    assert db.cancel(SI1, ca) == CANCELLED  # b's lease still keeps it
    assert collect.freed == [] and db.count(SI1) == 1 and db.count(SI2) == 1
    assert db.cancel(SI1, ca) == NONE  # already gone
    assert db.cancel(SI1, cb) == DELETED
    assert collect.freed == [SI1] and db.collected == 1
    assert db.cancel(SI1, cb) == NONE
    assert collect.freed == [SI1]  # collected once
    assert db.count(SI2) == 1 and garbage_of(tmp_path) == []
    db.close()


def test_a_lease_renewed_at_or_after_the_fence_is_kept(tmp_path: Path) -> None:
    clock, collect = Clock(), Collector()
    db = open_db(tmp_path, collect, clock)
    renew, cancel_secret = secrets("a")
    db.add(SI1, renew, cancel_secret)
    fence = db.fence()
    db.add(SI1, renew, cancel_secret)  # the first renewal after the fence
    assert db.cancel(SI1, cancel_secret, renewed_before=fence) == KEPT
    clock.now -= 3600 * SEC  # the clock stepping back does not matter
    db.add(SI1, renew, cancel_secret)
    assert db.cancel(SI1, cancel_secret, renewed_before=fence) == KEPT
    assert collect.freed == [] and db.count(SI1) == 1
    assert db.cancel(SI1, cancel_secret, renewed_before=db.fence()) == DELETED
    assert collect.freed == [SI1]
    db.close()


def test_the_fence_survives_a_restart_and_emptied_tables(tmp_path: Path) -> None:
    clock, collect = Clock(), Collector()
    db = open_db(tmp_path, collect, clock)
    renew, cancel_secret = secrets("a")
    db.add(SI1, renew, cancel_secret)
    db.add(SI2, *secrets("b"))
    fence = db.fence()
    assert db.cancel(SI2, secrets("b")[1], renewed_before=fence) == DELETED
    db.close()
    db = open_db(tmp_path, collect, clock)  # a restart: the generation goes on
    assert db.fence() == fence
    db.add(SI1, renew, cancel_secret)
    assert db.cancel(SI1, cancel_secret, renewed_before=fence) == KEPT
    db.close()


def test_expire_step_is_bounded_and_frees_only_unleased_indexes(tmp_path: Path) -> None:
    clock, collect = Clock(), Collector()
    db = open_db(tmp_path, collect, clock, duration=10.0)
    # Expiry order: a@0 (SI1), b@1 (SI2), c@2 (SI3), d@3 (SI3); e@50 (SI1) lives on.
    for si, tag in ((SI1, "a"), (SI2, "b"), (SI3, "c"), (SI3, "d")):
        db.add(si, *secrets(tag))
        clock.advance(1)
    clock.now = T0 + 50 * SEC
    db.add(SI1, *secrets("e"))
    clock.now = T0 + 20 * SEC
    assert db.expired() == 4 and db.total() == 5

    assert db.expire_step(limit=2) == (2, 1)  # a and b: SI1 still has e, SI2 is free
    assert collect.freed == [SI2] and db.expired() == 2
    assert db.count(SI1) == 1 and db.count(SI3) == 2
    assert db.expire_step(limit=1) == (1, 0)  # c: d still keeps SI3
    assert collect.freed == [SI2]
    assert db.expire_step(limit=5) == (1, 1)  # d
    assert collect.freed == [SI2, SI3]
    assert db.expire_step(limit=5) == (0, 0)
    clock.now = T0 + 60 * SEC + 1
    assert db.expire_step(limit=5) == (1, 1)
    assert collect.freed == [SI2, SI3, SI1] and db.total() == 0 and db.collected == 3
    assert garbage_of(tmp_path) == []
    db.close()


def test_the_database_holds_no_secret(tmp_path: Path) -> None:
    clock, collect = Clock(), Collector()
    db = open_db(tmp_path, collect, clock)
    pairs = [(os.urandom(32), os.urandom(32)) for _ in range(20)]
    for i, (renew, cancel_secret) in enumerate(pairs):
        db.add(bytes([i]) * 16, renew, cancel_secret)
    assert db.cancel(bytes([0]) * 16, pairs[0][1]) == DELETED
    files = [tmp_path / "leases.sqlite", tmp_path / "leases.sqlite-wal"]
    on_disk = b"".join(p.read_bytes() for p in files if p.exists())
    for renew, cancel_secret in pairs:
        assert renew not in on_disk and cancel_secret not in on_disk
    # The check is not vacuous: what the files do hold is the hashes.
    for renew, cancel_secret in pairs[1:]:
        assert secret_hash(renew) in on_disk and secret_hash(cancel_secret) in on_disk
    db.close()
    on_disk = b"".join(p.read_bytes() for p in files if p.exists())
    assert not any(r in on_disk or c in on_disk for r, c in pairs)


def test_a_failed_collect_is_finished_when_the_database_reopens(tmp_path: Path) -> None:
    clock = Clock()
    broken = Collector(fail=True)
    db = open_db(tmp_path, broken, clock)
    db.add(SI1, *secrets("a"))
    db.add(SI2, *secrets("b"))
    assert db.cancel(SI1, secrets("a")[1]) == DELETED
    clock.advance(11)
    assert db.expire_step() == (1, 1)
    assert db.collected == 0
    assert garbage_of(tmp_path) == sorted([SI1, SI2])  # still to be freed
    db.close()

    collect = Collector()
    db = open_db(tmp_path, collect, clock)
    assert sorted(collect.freed) == sorted([SI1, SI2]) and db.collected == 2
    assert garbage_of(tmp_path) == []
    db.close()
    collect = Collector()
    open_db(tmp_path, collect, clock).close()
    assert collect.freed == []  # done once


def test_a_lease_added_after_an_index_went_to_garbage_saves_it(tmp_path: Path) -> None:
    clock = Clock()
    db = open_db(tmp_path, Collector(fail=True), clock)
    db.add(SI1, *secrets("a"))
    assert db.cancel(SI1, secrets("a")[1]) == DELETED
    assert garbage_of(tmp_path) == [SI1]
    db.add(SI1, *secrets("b"))  # someone uploads the same file again
    assert garbage_of(tmp_path) == []
    db.close()

    # Even if the index is still listed as garbage (a crash between the two),
    # it is not collected while a lease holds it.
    raw = sqlite3.connect(tmp_path / "leases.sqlite")
    with raw:
        raw.execute("INSERT INTO garbage VALUES (?)", (SI1,))
    raw.close()
    collect = Collector()
    db = open_db(tmp_path, collect, clock)
    assert collect.freed == [] and db.count(SI1) == 1
    assert garbage_of(tmp_path) == []
    assert db.cancel(SI1, secrets("b")[1]) == DELETED
    assert collect.freed == [SI1]
    db.close()


# -- on a real grid ----------------------------------------------------------------


def held(grid: Grid, si: bytes) -> int:
    """How many shares of ``si`` the servers hold on disk."""
    return sum(len(node.shares(si)) for node in grid.nodes)


def slot_copies(grid: Grid, si: bytes) -> int:
    return sum(node.has_slot(si) for node in grid.nodes)


def si_of(cap: object) -> bytes:
    assert isinstance(cap, ReadCap)
    return cap.storage_index


@contextlib.asynccontextmanager
async def client_node(
    path: Path,
    grid: Grid,
    k: int = PARAMS.k,
    happy: int = PARAMS.happy,
    n: int = PARAMS.n,
    convergence: bytes | None = None,
    snapshots: bool = False,
) -> AsyncIterator[GridClient]:
    """A client node (made on first use) over the grid's servers, and its
    GridClient; unless ``snapshots``, it keeps no old root versions (what a
    commit drops is given up at once)."""
    node = NodeDir(path)
    if not node.exists():
        servers = [str(a) for a in grid.addresses]
        config = NodeConfig("client", path.name, servers=servers, k=k, happy=happy, n=n)
        if not snapshots:
            config = dataclasses.replace(config, snapshot_retention=0.0, snapshot_keep=1)
        node.create(config)
        MEMBERS.enroll(node, "client")
        if convergence is not None:
            (node.private / "convergence").write_bytes(convergence)
    async with open_client(node) as client:
        yield client


async def put_bytes(client: GridClient, data: bytes, directory: Path) -> ReadCap:
    path = write_temp(directory, data)
    try:
        report = await client.put(path)
    finally:
        path.unlink()
    assert isinstance(report.cap, ReadCap)
    return report.cap


async def test_unrenewed_leases_expire_and_renewed_ones_never_do(tmp_path: Path) -> None:
    duration = 3.0
    async with open_grid(
        tmp_path / "grid", servers=SERVERS, lease_duration=duration, expire_interval=0.1
    ) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                a_data, b_data = os.urandom(150_000), os.urandom(150_000)
                a = await put_bytes(client, a_data, tmp_path / "tmp")
                b = await put_bytes(client, b_data, tmp_path / "tmp")
                assert held(grid, a.storage_index) == held(grid, b.storage_index) == 5
                retained = RetainedSet(client.node)
                retained.add([b.to_string()])
                retained.close()
                keeper = get_keeper(client)
                first = await keeper.renew_all()
                assert (first.objects, first.servers, first.leases) == (1, 5, 5)
                assert first.unheld == [] and first.failures == []

                async def keep_renewing() -> None:
                    while True:
                        await keeper.renew_all()
                        await trio.sleep(0.3)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_renewing)
                    # (the expirer removes a share, then its emptied directory)
                    while held(grid, a.storage_index) or any(
                        n.share_dir(a.storage_index).exists() for n in grid.nodes
                    ):
                        await trio.sleep(0.05)
                    # Well past the end of B's first lease: only renewals keep it.
                    await trio.sleep(duration + 1.0)
                    assert held(grid, b.storage_index) == 5
                    nursery.cancel_scope.cancel()
                assert held(grid, b.storage_index) == 5
                assert await download_bytes(client.broker, b) == b_data
                assert held(grid, a.storage_index) == 0


async def flush(session: TreeSession) -> None:
    await session.queue.flush(session)
    assert len(session.queue) == 0


def file_entry(size: int) -> Entry:
    return Entry("file", "", size, 0o644, T0, T0)


async def used(broker: StorageBroker) -> int:
    stats = await broker.stats()
    assert all(isinstance(s, dict) for s in stats.values()), stats
    return sum(s["used"] for s in stats.values() if isinstance(s, dict))


async def test_unlink_frees_what_the_tree_dropped(tmp_path: Path) -> None:
    async with open_grid(tmp_path / "grid", servers=SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                root = await create_root(client)
                add_alias(client.node, "grid", root.to_string())
                session = TreeSession(client, "grid")
                f_data, g_data = os.urandom(100_000), os.urandom(60_000)
                f_src, g_src = (write_temp(tmp_path / "src", d) for d in (f_data, g_data))
                session.queue.add_file(f_src, "/dir/f.bin", file_entry(len(f_data)))
                await flush(session)
                f_cap = (await session.lookup("/dir/f.bin")).cap
                root_v1 = (await session.tree.root())[1]
                dir_v1 = (await session.lookup("/dir")).cap
                v1 = [storage_index_of(c) for c in (f_cap, root_v1, dir_v1)]
                assert all(si is not None and held(grid, si) == 5 for si in v1)

                session.queue.add_file(g_src, "/dir/g.bin", file_entry(len(g_data)))
                await flush(session)
                root_v2 = (await session.tree.root())[1]
                dir_v2 = (await session.lookup("/dir")).cap
                old = [storage_index_of(c) for c in (root_v1, dir_v1)]
                assert all(si is not None and held(grid, si) == 0 for si in old)
                f_si = storage_index_of(f_cap)
                assert f_si is not None and held(grid, f_si) == 5

                before = await used(client.broker)
                session.queue.add_deletepath("/dir/f.bin")
                await flush(session)
                assert held(grid, f_si) == 0
                assert not any(n.share_dir(f_si).exists() for n in grid.nodes)
                for cap in (root_v2, dir_v2):
                    si = storage_index_of(cap)
                    assert si is not None and held(grid, si) == 0
                assert await used(client.broker) < before

                # What the node still keeps is all there, and the tree reads fine.
                reachable = await get_keeper(client).reachable()
                assert root.to_string() in reachable and len(reachable) == 4  # slot, 2 dirs, g
                for cap in reachable:
                    si = storage_index_of(cap)
                    assert si is not None
                    if cap.startswith("gridfs:ssk:"):
                        assert slot_copies(grid, si) == SERVERS
                    else:
                        assert held(grid, si) == 5, cap
                assert list(await session.listdir("/dir")) == ["g.bin"]
                g_cap = (await session.lookup("/dir/g.bin")).cap
                assert g_cap in reachable
                g = parse_read_cap(g_cap)
                assert isinstance(g, ReadCap)
                async with open_broker(grid.addresses) as cold:
                    assert await download_bytes(cold, g) == g_data
                session.queue.close()


async def test_a_file_put_and_deleted_in_one_batch_is_unlinked(tmp_path: Path) -> None:
    async with open_grid(tmp_path / "grid", servers=SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                root = await create_root(client)
                add_alias(client.node, "grid", root.to_string())
                session = TreeSession(client, "grid")
                data = os.urandom(90_000)
                session.queue.add_file(
                    write_temp(tmp_path / "src", data), "/t.bin", file_entry(len(data))
                )
                session.queue.add_deletepath("/t.bin")
                await session.queue.flush(session, through=PATH)  # uploaded, then dropped
                assert session.queue.retained() == []  # the commit took it out
                (step,) = [st for st in session.queue.pending() if st.kind == "unlink_commit"]
                (cap,) = step.args["caps"]
                si = storage_index_of(cap)
                assert si is not None and held(grid, si) == 5
                await flush(session)  # the unlink step
                assert held(grid, si) == 0  # the temporary file's shares are gone
                assert (await session.listdir("/")).entries == {}
                session.queue.close()


async def test_a_deduplicated_file_lives_until_its_last_holder_unlinks(tmp_path: Path) -> None:
    convergence = os.urandom(32)
    data = os.urandom(200_000)
    async with open_grid(tmp_path / "grid", servers=SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with (
                client_node(tmp_path / "alice", grid, convergence=convergence) as alice,
                client_node(tmp_path / "bob", grid, convergence=convergence) as bob,
            ):
                assert alice.node.lease_secret() != bob.node.lease_secret()
                a_cap = await put_bytes(alice, data, tmp_path / "tmp")
                b_cap = await put_bytes(bob, data, tmp_path / "tmp")
                assert a_cap == b_cap
                si = a_cap.storage_index
                assert held(grid, si) == 5

                report = await get_keeper(alice).unlink([a_cap.to_string()])
                assert (report.cancelled, report.freed, report.servers) == (5, 0, 5)
                assert held(grid, si) == 5  # bob's leases keep it
                assert await download_bytes(bob.broker, b_cap) == data
                again = await get_keeper(alice).unlink([a_cap.to_string()])
                assert (again.cancelled, again.freed) == (0, 0)
                assert held(grid, si) == 5

                report = await get_keeper(bob).unlink([b_cap.to_string()])
                assert (report.cancelled, report.freed) == (5, 5)
                assert held(grid, si) == 0


async def test_only_the_owner_can_cancel_and_only_at_its_own_server(tmp_path: Path) -> None:
    async with open_grid(tmp_path / "grid", servers=SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with (
                open_broker(grid.addresses) as owner,
                open_broker(grid.addresses) as other,
            ):
                assert owner.lease_secret != other.lease_secret
                report = await upload_bytes(
                    owner, os.urandom(120_000), tmp_path, PARAMS, os.urandom(32)
                )
                si = si_of(report.cap)
                assert held(grid, si) == 5 and all(len(n.shares(si)) == 1 for n in grid.nodes)

                async def cancel_at(server: Server, secret: bytes) -> list[str]:
                    args = {"leases": [[si, secret]], "renewed_before": MAX_U64}
                    answer: list[str] = await server.call("cancel_leases", args)
                    return answer

                # Another client: its own derived secrets, random ones, the owner's renew secret.
                for server in other.servers.values():
                    owners = owner.servers[server.node_id]
                    for secret in (
                        server.lease_secrets(si)[1],
                        os.urandom(32),
                        owners.lease_secrets(si)[0],
                    ):
                        assert await cancel_at(server, secret) == [NONE]
                assert held(grid, si) == 5

                # A server that learned the owner's cancel secret for its own copy
                # cannot use it at another server.
                ids = [n.address.node_id for n in grid.nodes if n.address is not None]
                for at in ids:
                    for learned_by in ids:
                        if at != learned_by:
                            stolen = lease_secrets(owner.lease_secret, si, learned_by)[1]
                            assert await cancel_at(other.servers[at], stolen) == [NONE]
                assert held(grid, si) == 5

                # The same request with the right secret does delete (the test can fail).
                first = grid.nodes[0]
                assert first.address is not None
                right = lease_secrets(owner.lease_secret, si, first.address.node_id)[1]
                assert await cancel_at(other.servers[first.address.node_id], right) == [DELETED]
                assert first.shares(si) == set() and held(grid, si) == 4


async def test_a_lease_renewed_after_the_fence_is_spared(tmp_path: Path) -> None:
    data, secret = os.urandom(150_000), os.urandom(32)
    async with open_grid(tmp_path / "grid", servers=SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with open_broker(grid.addresses) as broker:
                first = await upload_bytes(broker, data, tmp_path, PARAMS, secret)
                si = si_of(first.cap)
                fences = await take_fences(broker)
                assert len(fences) == SERVERS
                again = await upload_bytes(broker, data, tmp_path, PARAMS, secret)
                assert again.cap == first.cap  # the same file: our leases renewed
                report = await cancel(broker, [si], fences)
                assert (report.kept, report.cancelled, report.freed) == (5, 0, 0)
                assert report.servers == 5 and held(grid, si) == 5

                report = await cancel(broker, [si], await take_fences(broker))
                assert (report.kept, report.cancelled, report.freed) == (0, 5, 5)
                assert held(grid, si) == 0


async def test_unlink_refuses_to_act_on_a_partial_picture(tmp_path: Path) -> None:
    async with open_grid(tmp_path / "grid", servers=SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                root = await create_root(client)
                add_alias(client.node, "grid", root.to_string())
                session = TreeSession(client, "grid")
                src = write_temp(tmp_path / "src", os.urandom(80_000))
                session.queue.add_file(src, "/f.bin", file_entry(80_000))
                await flush(session)
                session.queue.close()
                x = await put_bytes(client, os.urandom(90_000), tmp_path / "tmp")
                assert held(grid, x.storage_index) == 5

            # Three of five servers down: the root directory (k=3) cannot be read.
            for node in grid.nodes[:3]:
                await node.kill()
            async with client_node(tmp_path / "client", grid) as client:
                with pytest.raises(BaseException) as info:
                    await get_keeper(client).unlink([x.to_string()])
                assert isinstance(unwrap(info.value), GridError), info.value
            assert held(grid, x.storage_index) == 5
            assert all(len(n.shares(x.storage_index)) == 1 for n in grid.nodes[3:])

            # With the servers back, the same unlink frees it.
            for node in grid.nodes[:3]:
                await node.start()
            async with client_node(tmp_path / "client", grid) as client:
                report = await get_keeper(client).unlink([x.to_string()])
                assert report.freed == 5 and held(grid, x.storage_index) == 0


async def test_unlink_refuses_when_no_server_answering_holds_the_root_slot(
    tmp_path: Path,
) -> None:
    async with open_grid(tmp_path / "grid", servers=10) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                root = await create_root(client)
                add_alias(client.node, "grid", root.to_string())
                session = TreeSession(client, "grid")
                src = write_temp(tmp_path / "src", os.urandom(80_000))
                session.queue.add_file(src, "/f.bin", file_entry(80_000))
                await flush(session)
                f_cap = (await session.lookup("/f.bin")).cap
                session.queue.close()
            f_si, slot_si = storage_index_of(f_cap), storage_index_of(root.to_string())
            assert f_si is not None and slot_si is not None
            # Every server withholds the root slot (it answers "no such slot").
            name = b32encode(slot_si)
            for node in grid.nodes:
                (node.dir.storage_path / "slots" / name[:2] / name).unlink(missing_ok=True)
                assert not node.has_slot(slot_si)
            live = [node for node in grid.nodes if node.running]
            before = {node.index: node.shares(f_si) for node in live}
            async with client_node(tmp_path / "client", grid) as client:
                with pytest.raises(BaseException) as info:
                    await get_keeper(client).unlink([f_cap])
                assert isinstance(unwrap(info.value), GridError), info.value
            assert {node.index: node.shares(f_si) for node in live} == before


@pytest.mark.parametrize("kept_as", ["file cap", "slice cap"])
async def test_background_check_repairs_a_kept_file(kept_as: str, tmp_path: Path) -> None:
    """A file kept by its cap, or by a slice of it (a file in a pack: the pack
    is what is checked and repaired)."""
    data = os.urandom(400_000)
    async with open_grid(tmp_path / "grid", servers=14) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid, k=3, happy=7, n=10) as client:
                cap = await put_bytes(client, data, tmp_path / "tmp")
                kept = cap if kept_as == "file cap" else SliceCap(bytes(32), 10, 1000, cap)
                retained = RetainedSet(client.node)
                retained.add([kept.to_string()])
                retained.close()
            si = cap.storage_index
            holders = [node for node in grid.nodes if node.shares(si)]
            assert len(holders) == 10
            for node in holders[:4]:
                await node.kill()
            async with client_node(tmp_path / "client", grid) as client:
                counts = await check_and_repair(client)
                assert counts["files"] == 1 and counts["repaired"] == 1, counts
                assert counts["unrecoverable"] == counts["failed"] == 0, counts
                after = await check_file(client.broker, cap, verify=True)
                assert after.healthy and after.good_shares == 10 and not after.corrupt
                assert await download_bytes(client.broker, cap) == data
                again = await check_and_repair(client)
                assert again["healthy"] == 1 and again["repaired"] == 0, again
            live = [node for node in grid.nodes if node.running]
            assert len(live) == 10
            assert sorted(n for node in live for n in node.shares(si)) == list(range(10))


async def test_snapshots_keep_what_commits_drop_and_walks_stay_cheap(tmp_path: Path) -> None:
    """With snapshots, a file a commit dropped keeps its leases until its
    version expires; a later walk of the node (a fresh process: cold
    caches) fetches only the newest version's directories, however many
    versions are kept."""
    async with open_grid(tmp_path / "grid", servers=SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid, snapshots=True) as client:
                root = await create_root(client)
                add_alias(client.node, "grid", root.to_string())
                session = TreeSession(client, "grid")
                data = os.urandom(100_000)
                session.queue.add_file(
                    write_temp(tmp_path / "src", data), "/a/f.bin", file_entry(len(data))
                )
                await flush(session)
                f_si = storage_index_of((await session.lookup("/a/f.bin")).cap)
                assert f_si is not None
                session.queue.add_deletepath("/a/f.bin")
                await flush(session)
                for i in range(6):  # more versions, each with a new directory
                    session.queue.add_file(
                        None, f"/d{i}/x", file_entry(0).with_(data=b"%d" % i * 100)
                    )
                    await flush(session)
                assert held(grid, f_si) == 5  # its version is kept: so is it
                session.queue.close()
            async with client_node(tmp_path / "client", grid, snapshots=True) as fresh:
                keeper = get_keeper(fresh)
                tree = keeper.tree(root.to_string())
                fetched: list[str] = []
                get_bytes = tree.store.get_bytes

                async def counting(cap: str) -> bytes:
                    fetched.append(cap)
                    return await get_bytes(cap)

                tree.store.get_bytes = counting  # type: ignore[method-assign]
                found = await keeper.reachable()
                assert f_si in {storage_index_of(c) for c in found}
                assert len(fetched) == 1 + 7  # the newest root, /a and /d0.../d5
                assert keeper.snapshot_stats[b32encode(root.storage_index)]["snapshots"] == 9
                # Expired (everything but the newest version): the file is given up.
                config = fresh.node.config()
                fresh.node.save(
                    dataclasses.replace(config, snapshot_retention=0.0, snapshot_keep=1)
                )
                count, caps = await keeper.expire_snapshots()
                assert count == 8 and f_si in {storage_index_of(c) for c in caps}
                await keeper.unlink(caps)
                assert held(grid, f_si) == 0
