"""The directory tree on a real in-process grid: 5 TLS storage servers on
loopback, directories stored as CHK files, the root in a mutable slot.

The in-memory semantics are in test_tree.py; these tests check that they hold
once every directory and every root version goes through real servers: names,
metadata, a big directory, racing writers, read caps and rollback.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gridfs.caps import LiteralCap, SliceCap
from gridfs.caps import parse as parse_cap
from gridfs.client.broker import StorageBroker
from gridfs.client.gridstore import GridStore, RootUnavailableError, download_bytes
from gridfs.client.seen import SeenVersions
from gridfs.client.slots import SlotRollbackError, create_slot
from gridfs.client.upload import UploadParams
from gridfs.dirnode import DEFAULT_DIR_MODE, Entry, split_path
from gridfs.errors import GridError, UsageError
from gridfs.mutable import SlotReadCap, SlotWriteCap, verify_version
from gridfs.storage.slots import SlotStore
from gridfs.tree import (
    Change,
    Delete,
    Move,
    NotFoundError,
    Put,
    SlotConflictError,
    Tree,
    empty_dir_cap,
    new_dir_entry,
    pack_root,
    unpack_root,
)

from .gridutil import Grid, StorageNode, open_broker, open_grid

SERVERS = 5
PARAMS = UploadParams(k=3, happy=5, n=5)
TIMEOUT = 60
T0 = 1_700_000_000_123_456_789


class ObservedStore(GridStore):
    """A GridStore that counts publishes and conflicts, and can hold its first
    publish until a barrier opens (to make two writers race)."""

    def __init__(
        self,
        broker: StorageBroker,
        root: SlotWriteCap | SlotReadCap,
        secret: bytes,
        before_first_publish: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(broker, root, PARAMS, secret)
        self.attempts = 0
        self.publishes = 0
        self.conflicts = 0
        self.before_first_publish = before_first_publish

    async def publish_root(self, payload: bytes, expected_seq: int) -> int:
        self.attempts += 1
        if self.attempts == 1 and self.before_first_publish is not None:
            await self.before_first_publish()
        try:
            seq = await super().publish_root(payload, expected_seq)
        except SlotConflictError:
            self.conflicts += 1
            raise
        self.publishes += 1
        return seq


@dataclass
class Env:
    grid: Grid
    broker: StorageBroker
    cap: SlotWriteCap
    secret: bytes

    def tree(
        self,
        broker: StorageBroker | None = None,
        cap: SlotWriteCap | SlotReadCap | None = None,
        before_first_publish: Callable[[], Awaitable[None]] | None = None,
    ) -> Tree:
        return Tree(
            ObservedStore(broker or self.broker, cap or self.cap, self.secret, before_first_publish)
        )


@pytest.fixture
async def env(tmp_path: Path, secret: bytes) -> AsyncIterator[Env]:
    """5 storage servers, a client broker, and a tree root (an empty directory
    in a new slot, version 1)."""
    async with (
        open_grid(tmp_path / "grid", servers=SERVERS) as grid,
        open_broker(grid.addresses) as broker,
    ):
        with trio.fail_after(TIMEOUT):
            cap = await create_slot(broker, pack_root(empty_dir_cap()), PARAMS.n, PARAMS.happy)
        yield Env(grid, broker, cap, secret)


def store_of(tree: Tree) -> ObservedStore:
    assert isinstance(tree.store, ObservedStore)
    return tree.store


def lit(data: bytes, mtime_ns: int = T0) -> Entry:
    return Entry("file", LiteralCap(data).to_string(), len(data), 0o644, mtime_ns, mtime_ns)


def p(path: str) -> tuple[str, ...]:
    return tuple(split_path(path))


@contextlib.asynccontextmanager
async def cold_tree(env: Env) -> AsyncIterator[Tree]:
    """A reader with nothing cached: its own broker (connections) and store."""
    async with open_broker(env.grid.addresses) as broker:
        yield Tree(GridStore(broker, env.cap, PARAMS, env.secret))


async def cold_names(env: Env, path: str) -> list[str]:
    async with cold_tree(env) as tree:
        return list(await tree.listdir(p(path)))


async def cold_entry(env: Env, path: tuple[str, ...]) -> Entry:
    async with cold_tree(env) as tree:
        return await tree.lookup(path)


async def cold_missing(env: Env, path: tuple[str, ...]) -> bool:
    """True if a cold reader finds nothing at ``path``."""
    async with cold_tree(env) as tree:
        try:
            await tree.lookup(path)
        except NotFoundError:
            return True
    return False


# -- names ----------------------------------------------------------------------


async def test_names_are_nfc_at_most_255_bytes_without_slash_or_nul(env: Env) -> None:
    tree = env.tree()
    store = store_of(tree)
    decomposed, composed = "cafe\u0301", "caf\u00e9"
    assert decomposed != composed
    with trio.fail_after(TIMEOUT):
        await tree.commit([Put((decomposed,), lit(b"first"))])
        await tree.commit([Put((composed,), lit(b"second"))])
        assert await cold_names(env, "/") == [composed]  # one entry, stored as NFC
        for form in (decomposed, composed):
            assert (await cold_entry(env, (form,))).cap == lit(b"second").cap
            assert (await cold_entry(env, p(f"/{form}"))).cap == lit(b"second").cap
        await tree.commit([Delete((decomposed,))])
        assert await cold_names(env, "/") == []

        # 255 bytes of UTF-8 is the limit, whatever the characters' widths.
        longest = ["x" * 255, "\u00e9" * 127 + "x", "\U0001f600" * 63 + "xyz"]
        assert [len(n.encode()) for n in longest] == [255, 255, 255]
        await tree.commit([Put(("long", n), lit(n.encode()[:8])) for n in longest])
        assert await cold_names(env, "/long") == sorted(longest)
        for n in longest:
            assert (await cold_entry(env, ("long", n))).cap == lit(n.encode()[:8]).cap

        seq, root = await tree.root()
        published = store.publishes
        too_long = ["x" * 256, "\u00e9" * 128, "\U0001f600" * 64]
        for bad in [*too_long, "a/b", "nul\0here", "..", ""]:
            with pytest.raises(UsageError):
                await tree.commit([Put(("long", bad), lit(b"bad"))])
            with pytest.raises(UsageError):
                await tree.commit([Move(("long", longest[0]), ("long", bad))])
        for bad in [*too_long, "nul\0here", ".."]:
            with pytest.raises(UsageError):
                split_path(f"/long/{bad}")
        assert store.publishes == published  # a refused name publishes nothing
        assert await tree.root() == (seq, root)
        assert await cold_names(env, "/long") == sorted(longest)


# -- directory operations -------------------------------------------------------


async def test_mkdir_put_delete_move_keep_metadata(env: Env) -> None:
    tree = env.tree()
    data = b"report " * 10_000  # a real CHK file on the grid
    with trio.fail_after(TIMEOUT):
        cap = await store_of(tree).put_bytes(data)
        assert cap.startswith("gridfs:chk:")
        report = Entry(
            "file",
            cap,
            len(data),
            0o640,
            T0,
            T0 + 1,
            xattrs={"user.color": b"blue", "user.raw": b"\x00\xff"},
        )
        link = Entry("symlink", "", 0, 0o777, T0 + 2, T0 + 2, target="../docs/report.txt")
        await tree.commit(
            [
                Put(p("/a/b/c"), new_dir_entry(T0 + 3)),
                Put(p("/docs/report.txt"), report),
                Put(p("/docs/link"), link),
                Put(p("/docs/gone"), lit(b"to be deleted")),
                Put(p("/docs/sub/deep"), lit(b"deep")),
            ]
        )
        assert await cold_names(env, "/") == ["a", "docs"]
        assert await cold_names(env, "/a/b/c") == []
        c = await cold_entry(env, p("/a/b/c"))
        assert (c.kind, c.mode, c.mtime_ns) == ("dir", DEFAULT_DIR_MODE, T0 + 3)

        # mkdir over an existing directory keeps its contents.
        await tree.commit([Put(p("/docs"), new_dir_entry(T0 + 4))])
        assert await cold_names(env, "/docs") == ["gone", "link", "report.txt", "sub"]

        await tree.commit(
            [
                Delete(p("/docs/gone")),
                Move(p("/docs/report.txt"), p("/a/b/c/moved.txt")),
                Move(p("/docs"), p("/archive/2024/docs")),
            ]
        )
        assert await cold_names(env, "/") == ["a", "archive"]
        assert await cold_names(env, "/a/b/c") == ["moved.txt"]
        assert await cold_names(env, "/archive/2024/docs") == ["link", "sub"]
        assert await cold_names(env, "/archive/2024/docs/sub") == ["deep"]
        assert await cold_missing(env, p("/docs"))
        assert await cold_missing(env, p("/archive/2024/docs/gone"))
        assert not await cold_missing(env, p("/archive/2024/docs/link"))

        moved = await cold_entry(env, p("/a/b/c/moved.txt"))
        # mode, mtime, size, cap and xattrs; the ctime moved, as rename(2)'s does
        assert moved.with_(ctime_ns=report.ctime_ns) == report
        assert moved.ctime_ns > report.ctime_ns
        assert await cold_entry(env, p("/archive/2024/docs/link")) == link
        assert await download_bytes(env.broker, moved.cap) == data


# -- a big directory --------------------------------------------------------------


async def test_ten_thousand_entries_one_publish_then_cold_listing(env: Env) -> None:
    tree = env.tree()
    store = store_of(tree)
    names = [f"file-{i:05}.txt" for i in range(10_000)]
    with trio.fail_after(TIMEOUT * 2):
        await tree.commit([Put(("big", n), lit(n.encode(), T0 + i)) for i, n in enumerate(names)])
        assert store.publishes == 1
        assert store.attempts == 1

        async with cold_tree(env) as cold:
            start = time.perf_counter()
            listing = await cold.listdir(("big",))
            elapsed = time.perf_counter() - start
        print(f"\n10,000 entries listed in {elapsed * 1000:.0f} ms (cold, 5 real servers)")
    assert list(listing) == names
    assert listing.get("file-01234.txt") == lit(b"file-01234.txt", T0 + 1234)
    assert (await tree.lookup(("big",))).size == 10_000


# -- writers racing -----------------------------------------------------------------


def barrier(parties: int) -> Callable[[], Awaitable[None]]:
    """Returns when ``parties`` tasks have called it."""
    arrived = 0
    everyone = trio.Event()

    async def wait() -> None:
        nonlocal arrived
        arrived += 1
        if arrived == parties:
            everyone.set()
        await everyone.wait()

    return wait


async def race(env: Env, alice: list[Change], bob: list[Change]) -> dict[str, tuple[int, str]]:
    """Two writers (two brokers, two stores, one write cap, as two nodes) read
    the same root and publish at the same moment.  Returns each one's (seq, root)."""
    together = barrier(2)
    results: dict[str, tuple[int, str]] = {}
    async with open_broker(env.grid.addresses) as other:
        trees = {
            "alice": env.tree(env.broker, before_first_publish=together),
            "bob": env.tree(other, before_first_publish=together),
        }

        async def commit(name: str, changes: list[Change]) -> None:
            results[name] = await trees[name].commit(changes)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit, "alice", alice)
            nursery.start_soon(commit, "bob", bob)
    stores = [store_of(t) for t in trees.values()]
    assert sum(s.conflicts for s in stores) >= 1, "the writers did not race"
    return results


async def test_racing_writers_of_different_files_both_survive(env: Env) -> None:
    tree = env.tree()
    with trio.fail_after(TIMEOUT):
        base_seq, _ = await tree.commit([Put(p("/shared/a"), lit(b"a"))])
        results = await race(
            env, [Put(p("/shared/alice"), lit(b"alice"))], [Put(p("/shared/bob"), lit(b"bob"))]
        )
        assert await cold_names(env, "/shared") == ["a", "alice", "bob"]
        assert (await cold_entry(env, p("/shared/bob"))).cap == lit(b"bob").cap
        assert (await cold_entry(env, p("/shared/alice"))).cap == lit(b"alice").cap
        # Each change made exactly one version; no version was lost.
        assert max(seq for seq, _ in results.values()) == base_seq + 2
        assert (await tree.root())[0] == base_seq + 2


async def test_true_conflict_last_writer_keeps_the_name(env: Env) -> None:
    tree = env.tree()
    v0, va, vb = lit(b"version 0"), lit(b"alice's version"), lit(b"bob's version")
    with trio.fail_after(TIMEOUT):
        await tree.commit([Put(p("/doc"), v0)])
        results = await race(
            env, [Put(p("/doc"), va, base=v0.cap)], [Put(p("/doc"), vb, base=v0.cap)]
        )
        last, first = sorted(results, key=lambda who: results[who][0], reverse=True)
        assert results[last][0] > results[first][0]
        entry = {"alice": va, "bob": vb}
        async with cold_tree(env) as cold:
            listing = await cold.listdir(())
    kept = [n for n in listing if n != "doc"]
    assert len(kept) == 1 and re.fullmatch(r"doc\.conflict-\d{8}-\d{6}", kept[0]), list(listing)
    assert listing.get("doc") == entry[last]
    assert listing.get(kept[0]) == entry[first]


# -- read caps --------------------------------------------------------------------


async def test_read_cap_lists_but_cannot_publish(env: Env) -> None:
    writer = env.tree()
    reader = env.tree(cap=env.cap.read_cap())
    with trio.fail_after(TIMEOUT):
        seq, root = await writer.commit([Put(p("/shared/x"), lit(b"x"))])
        assert list(await reader.listdir(p("/shared"))) == ["x"]
        assert await reader.lookup(p("/shared/x")) == lit(b"x")
        with pytest.raises(UsageError, match="read-only"):
            await reader.commit([Put(p("/shared/y"), lit(b"y"))])
        assert store_of(reader).publishes == 0
        assert await writer.root() == (seq, root)
        assert await cold_names(env, "/shared") == ["x"]


# -- rollback -------------------------------------------------------------------------


def seq_on_disk(node: StorageNode, si: bytes) -> int:
    stored = SlotStore(node.dir.storage_path).read(si)
    assert stored is not None
    return verify_version(si, *stored).seq


async def restore(node: StorageNode, backup: Path) -> None:
    """Stop the server, put its slots/ back from ``backup``, start it again."""
    await node.kill()
    slots = node.dir.storage_path / "slots"
    shutil.rmtree(slots)
    shutil.copytree(backup, slots)
    await node.start()


async def test_server_restored_from_backup_cannot_roll_the_root_back(
    env: Env, tmp_path: Path
) -> None:
    si = env.cap.storage_index
    tree = env.tree()
    with trio.fail_after(TIMEOUT):
        assert (await tree.root())[0] == 1
        backups = []
        for node in env.grid.nodes:
            backups.append(tmp_path / f"backup-{node.index}")
            shutil.copytree(node.dir.storage_path / "slots", backups[-1])
        seq2, root2 = await tree.commit([Put(p("/after-backup"), lit(b"new"))])
        assert seq2 == 2
        assert [seq_on_disk(n, si) for n in env.grid.nodes] == [2] * SERVERS

        # One server comes back from its backup, holding version 1 again.
        await restore(env.grid.nodes[0], backups[0])
        assert seq_on_disk(env.grid.nodes[0], si) == 1
        async with cold_tree(env) as cold:
            assert await cold.root() == (2, root2)
            assert list(await cold.listdir(())) == ["after-backup"]
        assert seq_on_disk(env.grid.nodes[0], si) == 2  # and the read repaired it

        # All but one: a single server with version 2 is enough.
        for node, backup in list(zip(env.grid.nodes, backups, strict=True))[1:]:
            await restore(node, backup)
        assert [seq_on_disk(n, si) for n in env.grid.nodes] == [2, 1, 1, 1, 1]
        async with cold_tree(env) as cold:
            seq, payload = await cold.store.read_root()
            assert (seq, unpack_root(payload)) == (2, root2)
        assert [seq_on_disk(n, si) for n in env.grid.nodes] == [2] * SERVERS

        # And the writer goes on from version 2.
        async with cold_tree(env) as fresh:
            seq3, _ = await fresh.commit([Put(p("/third"), lit(b"3"))])
        assert seq3 == 3
        assert await cold_names(env, "/") == ["after-backup", "third"]


async def test_every_server_restored_from_backup_is_refused_by_a_node_that_saw_more(
    env: Env, tmp_path: Path
) -> None:
    """All servers back at version 1: a reader that saw version 2 fails with
    one clear error naming them (never lists the old tree, never publishes on
    it); a reader that never saw version 2 cannot know, and reads version 1."""
    si = env.cap.storage_index
    seen = SeenVersions(tmp_path / "seen.sqlite")
    backups = []
    for node in env.grid.nodes:
        backups.append(tmp_path / f"backup-{node.index}")
        shutil.copytree(node.dir.storage_path / "slots", backups[-1])
    with trio.fail_after(TIMEOUT):
        store = GridStore(env.broker, env.cap, PARAMS, env.secret, seen)
        assert (await Tree(store).commit([Put(p("/after-backup"), lit(b"new"))]))[0] == 2
        assert seen.get(si) == 2
        for node, backup in zip(env.grid.nodes, backups, strict=True):
            await restore(node, backup)
        async with open_broker(env.grid.addresses) as broker:
            tree = Tree(GridStore(broker, env.cap, PARAMS, env.secret, seen))
            with pytest.raises(SlotRollbackError, match=r"version 1 .* older than version 2") as e:
                await tree.commit([Put(p("/on-the-old-tree"), lit(b"x"))])
            assert len(e.value.servers) == SERVERS
            assert [seq_on_disk(n, si) for n in env.grid.nodes] == [1] * SERVERS
        async with cold_tree(env) as cold:
            assert (await cold.root())[0] == 1
    seen.close()


async def test_a_root_slot_that_holds_nothing_is_an_error_not_an_empty_tree(env: Env) -> None:
    """A tree whose root slot no server holds (never made, or lost) is one
    clear error for reads and writes: never an empty directory, and a write
    does not create version 1 of a new, empty tree."""
    missing = SlotWriteCap.generate()
    tree = Tree(GridStore(env.broker, missing, PARAMS, env.secret))
    with trio.fail_after(TIMEOUT):
        with pytest.raises(RootUnavailableError, match="5 of 5 servers answered without it"):
            await tree.listdir(())
        with pytest.raises(RootUnavailableError):
            await tree.commit([Put(p("/x"), lit(b"x"))])
    assert not any(node.has_slot(missing.storage_index) for node in env.grid.nodes)


# -- packs ----------------------------------------------------------------------


async def test_packed_files_read_back_from_the_grid_and_corruption_is_caught(env: Env) -> None:
    """Small files over their directory's budget go to one pack; a cold reader
    gets each back by its slice cap, and flipped bits in the pack's shares
    are caught by its hash trees: the reader goes on with other shares, and
    with fewer than k good ones left fails, never giving wrong bytes."""
    tree = env.tree()
    files = {f"f{i:03}": bytes([i]) * 16_000 + b"%03d" % i for i in range(80)}
    changes = [
        Put(("small", name), Entry("file", "", len(data), 0o644, T0, T0, data=data))
        for name, data in files.items()
    ]
    with trio.fail_after(TIMEOUT):
        await tree.commit(changes)
        listing = await tree.listdir(("small",))
    slices = {n: parse_cap(e.cap) for n, e in listing.entries.items() if e.data is None}
    assert len(slices) == 80 - 65 and all(isinstance(c, SliceCap) for c in slices.values())
    (pack,) = {c.pack for c in slices.values()}  # type: ignore[union-attr]
    assert pack.size == sum(len(files[n]) for n in slices)

    def damage(num: int) -> None:
        path = env.grid.holder(pack.storage_index, num).share_dir(pack.storage_index) / str(num)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # in the block data
        path.write_bytes(bytes(raw))

    async def read_all() -> int:
        """Read every packed file with a cold reader; return how many failed."""
        failed = 0
        async with open_broker(env.grid.addresses) as broker:
            with trio.fail_after(TIMEOUT):
                for name, cap in slices.items():
                    try:
                        data = await download_bytes(broker, cap.to_string())
                    except GridError:  # one plain error, not a nursery's group
                        failed += 1
                    else:
                        assert data == files[name], name
        return failed

    for num in range(PARAMS.k, PARAMS.n):
        damage(num)
    assert await read_all() == 0  # k good shares are left: every file comes back
    damage(0)
    assert await read_all() == len(slices)  # fewer than k: an error, never wrong bytes
