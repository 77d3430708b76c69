import time

import pytest

from gridfs.caps import ReadCap, SliceCap
from gridfs.caps import parse as parse_cap
from gridfs.dirnode import INLINE_MAX, Entry, check_name, split_path
from gridfs.errors import GridError, UsageError
from gridfs.tree import (
    Batch,
    Delete,
    Move,
    NotFoundError,
    Put,
    SlotConflictError,
    Tree,
    empty_dir_cap,
    new_dir_entry,
)

from .memstore import MemStore


def f(cap: str, size: int = 1) -> Entry:
    return Entry("file", cap, size, 0o644, 1, 1)


def p(path: str) -> tuple[str, ...]:
    return tuple(split_path(path))


async def names(tree: Tree, path: str) -> list[str]:
    return list(await tree.listdir(p(path)))


async def test_put_creates_parents_and_lists() -> None:
    tree = Tree(MemStore())
    await tree.commit([Put(p("/a/b/c.txt"), f("gridfs:lit:aa"))])
    assert await names(tree, "/") == ["a"]
    assert await names(tree, "/a") == ["b"]
    assert (await tree.lookup(p("/a/b/c.txt"))).cap == "gridfs:lit:aa"
    with pytest.raises(NotFoundError):
        await tree.lookup(p("/a/x"))


async def test_a_batch_publishes_once_and_writes_each_dir_once() -> None:
    store = MemStore()
    tree = Tree(store)
    changes = [Put(p(f"/d{i % 10}/file{i}"), f(f"gridfs:lit:{'a' * 8}", i)) for i in range(1000)]
    await tree.commit(changes)
    assert store.publishes == 1
    assert store.puts <= 11  # ten directories and the root, each written once
    assert len(await names(tree, "/d3")) == 100


async def test_delete_and_move() -> None:
    tree = Tree(MemStore())
    await tree.commit([Put(p("/a/x"), f("gridfs:lit:aa")), Put(p("/a/y"), f("gridfs:lit:ab"))])
    await tree.commit([Move(p("/a"), p("/b")), Delete(p("/b/x"))])
    assert await names(tree, "/") == ["b"]
    assert await names(tree, "/b") == ["y"]


async def test_move_directory_with_pending_changes_inside() -> None:
    tree = Tree(MemStore())
    await tree.commit([Put(p("/a/x"), f("gridfs:lit:aa"))])
    await tree.commit([Put(p("/a/new"), f("gridfs:lit:ac")), Move(p("/a"), p("/z/a2"))])
    assert await names(tree, "/z/a2") == ["new", "x"]
    assert await names(tree, "/") == ["z"]


async def test_changes_are_idempotent() -> None:
    store = MemStore()
    tree = Tree(store)
    batch = [
        Put(p("/a/x"), f("gridfs:lit:aa")),
        Move(p("/a/x"), p("/a/y")),
        Delete(p("/a/gone")),
        Put(p("/m"), new_dir_entry(5)),
    ]
    await tree.commit(batch)
    seq_after_first = store.seq
    root = (await tree.root())[1]
    # Re-applying a batch that already took effect (a crash before the queue
    # forgot it) changes nothing and publishes nothing.
    await tree.commit(batch[1:])
    assert store.seq == seq_after_first and (await tree.root())[1] == root


async def test_two_writers_both_survive() -> None:
    store = MemStore()
    alice, bob = Tree(store), Tree(store)
    await alice.commit([Put(p("/shared/a"), f("gridfs:lit:aa"))])

    # Bob's publish will fail once because Alice publishes first.
    real_publish = store.publish_root
    calls = 0

    async def racing_publish(payload: bytes, expected: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await real_publish_alice()
        return await real_publish(payload, expected)

    async def real_publish_alice() -> None:
        store.publish_root = real_publish  # type: ignore[method-assign]
        await alice.commit([Put(p("/shared/alice"), f("gridfs:lit:ab"))])
        store.publish_root = racing_publish  # type: ignore[method-assign]

    store.publish_root = racing_publish  # type: ignore[method-assign]
    await bob.commit([Put(p("/shared/bob"), f("gridfs:lit:ac"))])
    assert await names(alice, "/shared") == ["a", "alice", "bob"]


async def test_true_conflict_keeps_both() -> None:
    store = MemStore()
    tree = Tree(store)
    await tree.commit([Put(p("/doc"), f("gridfs:lit:aa"))])
    await tree.commit([Put(p("/doc"), f("gridfs:lit:ab"), base="gridfs:lit:aa")])  # writer A
    await tree.commit(
        [Put(p("/doc"), f("gridfs:lit:ac"), base="gridfs:lit:aa")]
    )  # writer B, stale base
    listing = await tree.listdir(())
    assert listing.get("doc").cap == "gridfs:lit:ac"  # type: ignore[union-attr]
    kept = [n for n in listing if n.startswith("doc.conflict-")]
    assert len(kept) == 1 and listing.get(kept[0]).cap == "gridfs:lit:ab"  # type: ignore[union-attr]


async def test_a_soft_put_changes_only_the_version_it_saw() -> None:
    """A read's atime move (a soft put) based on a version another writer
    replaced since is dropped: it neither brings the old version back nor
    sets the newer one aside as a conflict, nor makes a removed name again."""
    tree = Tree(MemStore())
    await tree.commit([Put(p("/doc"), f("gridfs:lit:aa"))])
    await tree.commit([Put(p("/doc"), f("gridfs:lit:ab"), base="gridfs:lit:aa")])
    stale = f("gridfs:lit:aa").with_(extra={"atime": 7})
    await tree.commit([Put(p("/doc"), stale, base="gridfs:lit:aa", soft=True)])
    listing = await tree.listdir(())
    assert list(listing) == ["doc"] and listing.get("doc") == f("gridfs:lit:ab")
    await tree.commit([Put(p("/gone"), stale, base="gridfs:lit:aa", soft=True)])
    assert await names(tree, "/") == ["doc"]
    fresh = f("gridfs:lit:ab").with_(extra={"atime": 9})
    await tree.commit([Put(p("/doc"), fresh, base="gridfs:lit:ab", soft=True)])
    assert (await tree.listdir(())).get("doc") == fresh


async def test_stale_delete_keeps_the_newer_version() -> None:
    tree = Tree(MemStore())
    await tree.commit([Put(p("/doc"), f("gridfs:lit:ab"))])
    await tree.commit([Delete(p("/doc"), base="gridfs:lit:aa")])
    assert await names(tree, "/") == ["doc"]


async def test_cannot_move_into_itself_or_replace_root() -> None:
    tree = Tree(MemStore())
    await tree.commit([Put(p("/a/b"), new_dir_entry())])
    with pytest.raises(UsageError):
        await tree.commit([Move(p("/a"), p("/a/b/c"))])
    with pytest.raises(UsageError):
        await tree.commit([Delete(())])


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "nul\0", "x" * 256, "é" * 128])
def test_bad_names(bad: str) -> None:
    with pytest.raises(UsageError):
        check_name(bad)


def test_names_are_nfc() -> None:
    assert check_name("e\u0301") == "\u00e9"


async def test_ten_thousand_entries_list_fast_from_cold_cache() -> None:
    store = MemStore()
    tree = Tree(store)
    await tree.commit(
        [Put(p(f"/big/f{i:05}"), f(f"gridfs:lit:{'a' * 16}", i)) for i in range(10000)]
    )
    cold = Tree(store)
    start = time.perf_counter()
    listing = await cold.listdir(p("/big"))
    elapsed = time.perf_counter() - start
    assert len(listing) == 10000
    print(f"10,000 entries listed in {elapsed * 1000:.0f} ms (in-memory store)")


async def test_inline_files_beyond_the_directory_budget_are_packed() -> None:
    from gridfs.dirnode import DIR_INLINE_BUDGET

    store = MemStore()
    tree = Tree(store)
    blob = b"x" * 4096
    changes = [
        Put(
            p(f"/small/f{i:03}"), Entry("file", "", 4096, 0o644, 1, 1, data=blob[:-3] + b"%03d" % i)
        )
        for i in range(300)
    ]
    await tree.commit(changes)
    listing = await tree.listdir(p("/small"))
    inline = [n for n in listing if listing.entries[n].data is not None]
    uploaded = [n for n in listing if listing.entries[n].data is None]
    assert sum(len(listing.entries[n].data or b"") for n in inline) <= DIR_INLINE_BUDGET
    assert len(uploaded) == 300 - len(inline) > 0
    caps = [parse_cap(listing.entries[n].cap) for n in uploaded]
    assert all(isinstance(c, SliceCap) for c in caps)
    assert len({c.pack for c in caps}) == 1  # type: ignore[union-attr]
    assert store.puts == 3  # the pack, the directory and the root directory
    for name in uploaded:
        e = listing.entries[name]
        assert await store.get_bytes(e.cap) == blob[:-3] + name[1:].encode()


async def test_a_lone_overflowing_file_gets_a_cap_of_its_own() -> None:
    from gridfs.dirnode import INLINE_MAX

    store = MemStore()
    tree = Tree(store)
    data = [bytes([i]) * INLINE_MAX for i in range(70)]  # 64 fit in 1 MiB, 6 do not
    await tree.commit(
        [Put(p(f"/d/f{i:02}"), Entry("file", "", INLINE_MAX, data=data[i])) for i in range(64)]
    )
    await tree.commit([Put(p("/d/late"), Entry("file", "", INLINE_MAX, data=data[69]))])
    entry = (await tree.listdir(p("/d"))).entries["late"]
    assert entry.data is None and isinstance(parse_cap(entry.cap), ReadCap)
    assert await store.get_bytes(entry.cap) == data[69]


async def test_batches_never_change_directories_they_share() -> None:
    """A batch changes its own copy of a directory in place; the loaded (and
    cached) directories, and what it wrote, stay as they were."""
    from gridfs.tree import Batch

    tree = Tree(MemStore())
    await tree.commit([Put(p("/d/a"), f("gridfs:lit:aa"))])
    cached = await tree.listdir(p("/d"))
    root = (await tree.root())[1]
    batch = Batch(tree, root)
    await batch.apply(Put(p("/d/b"), f("gridfs:lit:bb")))
    await batch.apply(Delete(p("/d/a")))
    assert list(cached) == ["a"]
    assert list(await batch.dir(p("/d"), create=False) or []) == ["b"]
    written = await batch.write()
    assert list(await tree.listdir(p("/d"), written)) == ["b"]
    await batch.apply(Put(p("/d/c"), f("gridfs:lit:cc")))  # after the write: copied again
    assert list(await tree.listdir(p("/d"), written)) == ["b"]
    assert list(await tree.listdir(p("/d"), await batch.write())) == ["b", "c"]
    assert list(await tree.listdir(p("/d"), root)) == ["a"]


async def test_a_failed_pack_upload_fails_the_commit_with_one_grid_error() -> None:
    """Uploads run in a nursery; what reaches the caller (the work queue,
    which records it and retries) must be a GridError, not an exception group."""

    class Refusing(MemStore):
        async def put_bytes(self, data: bytes) -> str:
            if len(data) == 12 * INLINE_MAX:  # the pack (6 files of each directory)
                raise GridError("no servers")
            return await super().put_bytes(data)

    tree = Tree(Refusing())
    data = [bytes([i]) * INLINE_MAX for i in range(70)]
    changes = [
        Put(p(f"/d/f{i:02}"), Entry("file", "", INLINE_MAX, data=d)) for i, d in enumerate(data)
    ]
    changes += [
        Put(p(f"/e/f{i:02}"), Entry("file", "", INLINE_MAX, data=d)) for i, d in enumerate(data)
    ]
    with pytest.raises(GridError, match="no servers"):
        await tree.commit(changes)


async def test_a_commit_retried_after_a_conflict_stores_its_pack_once() -> None:
    """Packed files get random keys, so building the pack again on each retry
    would leave a new unreferenced pack behind every time."""

    class Conflicting(MemStore):
        conflicts = 3

        async def publish_root(self, payload: bytes, expected_seq: int) -> int:
            if self.conflicts:
                self.conflicts -= 1
                raise SlotConflictError("another writer was first")
            return await super().publish_root(payload, expected_seq)

    store = Conflicting()
    files = [b"x" * 4093 + b"%03d" % i for i in range(300)]
    await Tree(store).commit(
        [Put(p(f"/small/f{i:03}"), Entry("file", "", 4096, data=d)) for i, d in enumerate(files)]
    )
    assert store.conflicts == 0
    packs = [d for d in store.blobs.values() if len(d) == 300 * 4096 - 1024 * 1024]
    assert len(packs) == 1
    listing = await Tree(store).listdir(p("/small"))
    for i, data in enumerate(files):
        entry = listing.entries[f"f{i:03}"]
        assert (entry.data if entry.data is not None else await store.get_bytes(entry.cap)) == data


async def test_a_later_commit_never_reuses_an_earlier_commits_pack() -> None:
    """The same files put again after being removed get a new pack: the old
    one may have been unlinked (freed on the servers) in between."""
    store = MemStore()
    tree = Tree(store)
    files = [b"y" * 4093 + b"%03d" % i for i in range(300)]
    puts = [Put(p(f"/s/f{i:03}"), Entry("file", "", 4096, data=d)) for i, d in enumerate(files)]

    async def pack_of_f299() -> str:
        cap = parse_cap((await tree.listdir(p("/s"))).entries["f299"].cap)
        assert isinstance(cap, SliceCap)
        return cap.pack.to_string()

    await tree.commit(puts)
    first = await pack_of_f299()
    await tree.commit([Delete(p(f"/s/f{i:03}")) for i in range(300)])
    await tree.commit(puts)
    assert await pack_of_f299() != first


async def test_a_view_of_queued_changes_keeps_overflowing_files_inline() -> None:
    """The queued changes laid over the committed tree (`gridfs ls` while
    changes wait) store nothing: files over a directory's inline budget stay
    inline there instead of going to a pack the overlay cannot name."""
    from gridfs.client.gridstore import OverlayStore

    base = MemStore()
    data = [bytes([i]) * INLINE_MAX for i in range(80)]
    changes = [
        Put(p(f"/d/f{i:02}"), Entry("file", "", INLINE_MAX, data=d)) for i, d in enumerate(data)
    ]
    view = Tree(OverlayStore(base))
    root = await view.apply(empty_dir_cap(), changes, view=True)
    listing = await view.listdir(p("/d"), root)
    assert [listing.entries[f"f{i:02}"].data for i in range(80)] == data
    assert base.puts == 0


async def test_a_name_appearing_or_going_sets_its_directorys_times() -> None:
    """POSIX: create, delete and rename change the directory's mtime and
    ctime; a change to an entry that stays does not."""
    tree = Tree(MemStore())
    await tree.commit([Put(p("/a"), new_dir_entry(10)), Put(p("/b"), new_dir_entry(10))])

    async def times(path: str) -> tuple[int, int]:
        e = await tree.lookup(p(path))
        return e.mtime_ns, e.ctime_ns

    assert await times("/a") == (10, 10)
    await tree.commit([Put(p("/a/x"), Entry("file", "gridfs:lit:aa", 1, 0o644, 3, 20))])
    assert await times("/a") == (20, 20)  # the new entry's ctime
    await tree.commit([Put(p("/a/x"), Entry("file", "gridfs:lit:ab", 1, 0o600, 4, 30))])
    assert await times("/a") == (20, 20)  # the same name, changed: not the directory
    await tree.commit([Move(p("/a/x"), p("/b/y"), when_ns=40)])
    assert await times("/a") == (40, 40)
    assert await times("/b") == (40, 40)
    await tree.commit([Move(p("/b/y"), p("/b/z"), when_ns=45)])
    assert await times("/b") == (45, 45)
    await tree.commit([Delete(p("/b/z"), when_ns=50)])
    assert await times("/b") == (50, 50)
    assert await times("/a") == (40, 40)
    await tree.commit([Delete(p("/b/gone"), when_ns=60)])
    assert await times("/b") == (50, 50)  # nothing went
    await tree.commit([Put(p("/a/sub/f"), Entry("file", "gridfs:lit:aa", 1, 0o644, 3, 70))])
    assert await times("/a/sub") == (70, 70)
    assert (await times("/a"))[0] > 70  # made on the way: "now", when the batch began


async def test_a_view_and_its_commit_agree_on_directory_times() -> None:
    """The mount's view applies the queued changes to the committed tree; the
    commit applies the same changes again later: the times must not move."""
    tree = Tree(MemStore())
    await tree.commit([Put(p("/d"), new_dir_entry(10))])
    changes = [
        Put(p("/d/f"), Entry("file", "gridfs:lit:aa", 1, 0o644, 1, 100)),
        Move(p("/d/f"), p("/d/g"), when_ns=200),
        Delete(p("/top"), when_ns=300),
    ]
    root = (await tree.root())[1]
    view = Batch(tree, root)
    for change in changes:
        await view.apply(change)
    seen = (await view.dir((), create=False)).get("d")  # type: ignore[union-attr]
    await tree.commit(changes)
    committed = await tree.lookup(p("/d"))
    assert (seen.mtime_ns, seen.ctime_ns) == (committed.mtime_ns, committed.ctime_ns) == (200, 200)
    assert view.root_mtime_ns == 0  # /top was not there: the root did not change
    await view.apply(Put(p("/new"), Entry("file", "gridfs:lit:ab", 1, 0o644, 1, 400)))
    assert view.root_mtime_ns == 400


async def test_a_move_sets_the_ctime_of_what_it_moves() -> None:
    tree = Tree(MemStore())
    await tree.commit([Put(p("/d/f"), Entry("file", "gridfs:lit:aa", 1, 0o644, 5, 6))])
    await tree.commit([Move(p("/d/f"), p("/g"), when_ns=700), Move(p("/d"), p("/e"), when_ns=800)])
    moved, moved_dir = await tree.lookup(p("/g")), await tree.lookup(p("/e"))
    assert (moved.mtime_ns, moved.ctime_ns, moved.cap) == (5, 700, "gridfs:lit:aa")
    assert moved_dir.ctime_ns == 800


async def test_two_conflicts_in_one_second_keep_both_losers() -> None:
    tree = Tree(MemStore())
    when = 1_700_000_000 * 10**9
    await tree.commit([Put(p("/doc"), f("gridfs:lit:aa"))])
    for cap, loser in (("gridfs:lit:ab", "x"), ("gridfs:lit:ac", "y")):
        await tree.commit([Put(p("/doc"), Entry("file", f"gridfs:lit:{loser}{loser}", 1))])
        stale = Entry("file", cap, 1, 0o644, when, when)  # from the same second
        await tree.commit([Put(p("/doc"), stale, base="gridfs:lit:aa")])
    listing = await tree.listdir(())
    kept = sorted((n, listing.entries[n].cap) for n in listing if n != "doc")
    base = "doc.conflict-20231114-221320"
    assert kept == [(base, "gridfs:lit:xx"), (base + "-2", "gridfs:lit:yy")]  # none lost


async def test_a_conflict_on_a_long_name_keeps_a_valid_name() -> None:
    """A 250-byte name plus the conflict suffix would pass the 255-byte
    limit: the commit failed at every retry, and its queue with it."""
    tree = Tree(MemStore())
    name = "é" * 125  # 250 bytes in UTF-8
    await tree.commit([Put((name,), f("gridfs:lit:aa"))])
    await tree.commit([Put((name,), f("gridfs:lit:ab"))])
    await tree.commit([Put((name,), f("gridfs:lit:ac"), base="gridfs:lit:aa")])
    kept = [n for n in await tree.listdir(()) if n != name]
    assert len(kept) == 1 and len(kept[0].encode()) <= 255 and ".conflict-" in kept[0]
    assert (await tree.lookup((kept[0],))).cap == "gridfs:lit:ab"
