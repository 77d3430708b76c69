"""Shared directories in a tree (gridfs/shares.py, Batch): each lives in a
slot of its own, a commit publishes each changed slot once, and the write
cap a parent's entry holds opens only under the enclosing slot's write key."""

import pytest

from gridfs.client.sharing import share_directory
from gridfs.dirnode import Entry, split_path
from gridfs.errors import UsageError
from gridfs.mutable import SlotWriteCap
from gridfs.shares import (
    SLOT,
    SLOT_WRITE,
    ReadOnlyShareError,
    open_write_cap,
    share_extra,
    slot_of,
)
from gridfs.tree import (
    Batch,
    Delete,
    Move,
    Put,
    Tree,
    empty_dir_cap,
    new_dir_entry,
    pack_root,
    unpack_root,
)

from .memstore import MemStore


def f(cap: str) -> Entry:
    return Entry("file", cap, 1, 0o644, 1, 1)


def p(path: str) -> tuple[str, ...]:
    return tuple(split_path(path))


async def share(tree: Tree, store: MemStore, path: str) -> SlotWriteCap:
    """What gridfs share does, on the in-memory store."""
    child = SlotWriteCap.generate()
    seq, root = await tree.root()
    batch = Batch(tree, root)
    parent = await batch.dir(p(path)[:-1], create=False)
    assert parent is not None
    entry = parent.get(p(path)[-1])
    assert entry is not None
    store.slots[child.storage_index] = (1, pack_root(entry.cap))
    key = batch.write_key(p(path)[:-1])
    assert key is not None
    batch.set(p(path)[:-1], p(path)[-1], entry.with_(extra=share_extra(child, key)))
    await store.publish_root(pack_root(await batch.write()), seq)
    return child


async def test_a_change_inside_a_shared_directory_publishes_its_slot_only() -> None:
    store = MemStore()
    tree = Tree(store)
    await tree.commit(
        [Put(p("/docs/a.txt"), f("gridfs:lit:aa")), Put(p("/top"), f("gridfs:lit:bb"))]
    )
    child = await share(tree, store, "/docs")
    root_seq, before = store.seq, store.publishes
    await tree.commit([Put(p(f"/docs/n{i}"), f("gridfs:lit:cc")) for i in range(20)])
    assert store.publishes == before + 1  # twenty changes, one slot changed, one publish
    assert store.seq == root_seq  # the parent was not published
    seq, payload = store.slots[child.storage_index]
    assert seq == 2
    assert len(await tree.load_dir(unpack_root(payload))) == 21
    assert sorted(await tree.listdir(p("/docs")))[:2] == ["a.txt", "n0"]
    entry = await tree.lookup(p("/docs"))
    assert entry.cap == unpack_root(payload)  # the live version, not the parent's hint


async def test_a_burst_over_two_slots_publishes_each_once_child_first() -> None:
    store = MemStore()
    tree = Tree(store)
    await tree.commit([Put(p("/docs/a.txt"), f("gridfs:lit:aa"))])
    child = await share(tree, store, "/docs")
    order: list[str] = []
    real_root, real_slot = store.publish_root, store.publish_dir_slot

    async def publish_root(payload: bytes, expected_seq: int) -> int:
        order.append("root")
        return await real_root(payload, expected_seq)

    async def publish_dir_slot(cap: SlotWriteCap, payload: bytes, expected_seq: int) -> int:
        order.append("child")
        return await real_slot(cap, payload, expected_seq)

    store.publish_root = publish_root  # type: ignore[method-assign]
    store.publish_dir_slot = publish_dir_slot  # type: ignore[method-assign]
    await tree.commit(
        [
            Put(p("/docs/b"), f("gridfs:lit:bb")),
            Put(p("/c"), f("gridfs:lit:cc")),
            Delete(p("/docs/a.txt")),
        ]
    )
    assert order == ["child", "root"]
    assert list(await tree.listdir(p("/docs"))) == ["b"]
    assert store.slots[child.storage_index][0] == 2


async def test_a_reader_without_the_write_key_can_change_nothing_shared() -> None:
    store = MemStore()
    tree = Tree(store)
    await tree.commit([Put(p("/docs/a.txt"), f("gridfs:lit:aa"))])
    child = await share(tree, store, "/docs")
    parent_entry = (await tree.listdir(p("/"))).entries["docs"]
    # What the parent stores: the read cap in clear, the seed sealed.
    assert parent_entry.extra[SLOT] == child.read_cap().to_string()
    assert child.seed not in parent_entry.extra[SLOT_WRITE]
    assert open_write_cap(parent_entry, None) is None
    assert open_write_cap(parent_entry, b"x" * 32) is None  # another slot's key opens nothing
    assert open_write_cap(parent_entry, store.write_key) == child
    store.write_key = None  # now a read-only holder of the tree
    with pytest.raises(ReadOnlyShareError):
        await tree.commit([Put(p("/docs/b"), f("gridfs:lit:bb"))])
    assert store.slots[child.storage_index][0] == 1


async def test_a_shared_directory_moved_into_another_keeps_a_write_cap_that_opens() -> None:
    store = MemStore()
    tree = Tree(store)
    await tree.commit([Put(p("/a/x"), f("gridfs:lit:aa")), Put(p("/b/y"), f("gridfs:lit:bb"))])
    outer = await share(tree, store, "/a")
    inner = await share(tree, store, "/b")
    await tree.commit([Move(p("/b"), p("/a/b"))])
    moved = (await tree.listdir(p("/a"))).entries["b"]
    assert slot_of(moved) == inner.read_cap()
    assert open_write_cap(moved, store.write_key) is None  # sealed for /a's slot now
    assert open_write_cap(moved, outer.write_key) == inner
    await tree.commit([Put(p("/a/b/z"), f("gridfs:lit:cc"))])
    assert sorted(await tree.listdir(p("/a/b"))) == ["y", "z"]


async def test_mkdir_over_a_shared_directory_keeps_it_shared() -> None:
    store = MemStore()
    tree = Tree(store)
    await tree.commit([Put(p("/d/x"), f("gridfs:lit:aa"))])
    child = await share(tree, store, "/d")
    await tree.commit([Put(p("/d"), new_dir_entry(5))])
    assert slot_of((await tree.listdir(p("/"))).entries["d"]) == child.read_cap()


async def test_share_directory_makes_a_slot_once_and_keeps_what_raced_it() -> None:
    """gridfs share's commit: the slot holds the directory as committed;
    a writer that changed the directory meanwhile loses nothing (the share
    is built again on the new root); sharing again gives the same cap."""
    store = MemStore()
    tree = Tree(store)
    await tree.commit([Put(p("/d/x"), f("gridfs:lit:aa"))])
    made: list[SlotWriteCap] = []
    raced = False

    async def new_slot(payload: bytes) -> SlotWriteCap:
        nonlocal raced
        cap = SlotWriteCap.generate()
        store.slots[cap.storage_index] = (1, payload)
        made.append(cap)
        if not raced:  # another writer adds to the directory before the link
            raced = True
            await Tree(store).commit([Put(p("/d/y"), f("gridfs:lit:bb"))])
        return cap

    cap = await share_directory(tree, p("/d"), new_slot)
    assert made == [cap]
    assert sorted(await tree.listdir(p("/d"))) == ["x", "y"]
    assert store.slots[cap.storage_index][0] == 2  # took the newer version before the link
    assert await share_directory(tree, p("/d"), new_slot) == cap
    await tree.commit([Put(p("/e/z"), f("gridfs:lit:cc"))])
    store.write_key = None
    assert await share_directory(tree, p("/d"), new_slot) == cap.read_cap()
    with pytest.raises(UsageError, match="read-only"):
        await share_directory(tree, p("/e"), new_slot)


async def test_the_parents_hint_follows_when_the_parent_is_written_anyway() -> None:
    store = MemStore()
    tree = Tree(store)
    await tree.commit([Put(p("/d/x"), f("gridfs:lit:aa"))])
    child = await share(tree, store, "/d")
    await tree.commit([Put(p("/d/y"), f("gridfs:lit:bb"))])
    hint = (await tree.listdir(p("/"))).entries["d"].cap
    live = unpack_root(store.slots[child.storage_index][1])
    assert hint != live  # the parent was not written for the change inside d
    await tree.commit([Put(p("/d/z"), f("gridfs:lit:cc")), Put(p("/top"), f("gridfs:lit:dd"))])
    hint = (await tree.listdir(p("/"))).entries["d"].cap
    assert hint == unpack_root(store.slots[child.storage_index][1])


async def test_a_stale_attribute_change_keeps_the_link_and_whats_inside() -> None:
    """A chmod of a shared directory queued with an older hint (or from
    before it was shared) changes its mode only: the changes inside it in
    the same commit stay, and so does the link."""
    store = MemStore()
    tree = Tree(store)
    await tree.commit([Put(p("/d/x"), f("gridfs:lit:aa"))])
    before_share = (await tree.listdir(p("/"))).entries["d"]
    child = await share(tree, store, "/d")
    seen = (await tree.listdir(p("/"))).entries["d"]
    # The parent is written with a newer hint by another commit.
    await tree.commit([Put(p("/d/y"), f("gridfs:lit:bb")), Put(p("/top"), f("gridfs:lit:cc"))])
    # As the mount puts a directory's attributes (with the empty cap), or
    # with the cap it saw; from a view of before the share, or after it.
    for stale in (seen, before_share.with_(cap=empty_dir_cap()), seen.with_(cap=empty_dir_cap())):
        await tree.commit(
            [Put(p("/d/z"), f("gridfs:lit:dd")), Put(p("/d"), stale.with_(mode=0o700))]
        )
        d = (await tree.listdir(p("/"))).entries["d"]
        assert d.mode == 0o700 and slot_of(d) == child.read_cap()
        assert sorted(await tree.listdir(p("/d"))) == ["x", "y", "z"]
        await tree.commit([Delete(p("/d/z"))])


async def test_rm_r_of_a_shared_directory_names_its_live_version() -> None:
    """gridfs rm -r deletes with the cap it looked up (the live one, not the
    parent's hint): the shared directory goes; and stays if it moved on."""
    store = MemStore()
    tree = Tree(store)
    await tree.commit([Put(p("/d/x"), f("gridfs:lit:aa")), Put(p("/e/x"), f("gridfs:lit:aa"))])
    await share(tree, store, "/d")
    await share(tree, store, "/e")
    await tree.commit([Put(p("/d/y"), f("gridfs:lit:bb")), Put(p("/e/y"), f("gridfs:lit:bb"))])
    seen_d, seen_e = await tree.lookup(p("/d")), await tree.lookup(p("/e"))
    assert seen_d.cap != (await tree.listdir(p("/"))).entries["d"].cap  # live, not the hint
    await tree.commit([Put(p("/e/z"), f("gridfs:lit:cc"))])  # e moves on after the lookup
    await tree.commit([Delete(p("/d"), base=seen_d.cap), Delete(p("/e"), base=seen_e.cap)])
    assert list(await tree.listdir(p("/"))) == ["e"]
