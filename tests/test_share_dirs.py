"""Live shares of subdirectories (gridfs share ALIAS:/dir): two client nodes
of one grid, the real CLI and real mounts.  The directory gets a slot of its
own; whoever holds its write cap changes it and the owner sees the changes
(and the reverse); a read-only holder sees the owner's changes and writes
nothing; a read-only cap of the tree never leads to a shared directory's
write cap."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import trio

from gridfs.client.grid import open_grid
from gridfs.client.gridstore import GridStore
from gridfs.config import NodeDir
from gridfs.dirnode import Directory
from gridfs.mutable import SlotReadCap, SlotWriteCap, parse_slot_cap, read_key
from gridfs.shares import SLOT, open_write_cap, slot_of
from gridfs.tree import unpack_root

from .mountutil import GRIDFS, Grid, Mount, gridfs, mounted, wait_for
from .test_share import failing, make_local_tree, pending

pytest_plugins = ["tests.mountutil"]


@pytest.fixture
def owner(mount_grid: Grid, tmp_path: Path) -> Path:
    node = mount_grid.new_node(tmp_path)
    gridfs("cp", "-r", make_local_tree(tmp_path), "grid:/", "--node", node)
    return node


def ls(path: str, node: Path) -> list[str]:
    return gridfs("ls", path, "--node", node).stdout.split()


def cat(path: str, node: Path) -> bytes:
    return subprocess.run([GRIDFS, "cat", path, "--node", str(node)], capture_output=True).stdout


def snapshot_count(node: Path, alias: str = "grid:") -> int:
    return len(gridfs("snapshots", alias, "--node", node).stdout.strip().splitlines())


def test_share_a_subdirectory_read_write_and_read_only(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    rw = gridfs("share", "grid:/src/sub", "--node", owner).stdout.strip()
    ro = gridfs("share", "grid:/src/sub", "--ro", "--node", owner).stdout.strip()
    write = parse_slot_cap(rw)
    assert isinstance(write, SlotWriteCap) and parse_slot_cap(ro) == write.read_cap()
    assert gridfs("share", "grid:/src/sub", "--node", owner).stdout.strip() == rw  # the same
    assert "sub/" in ls("grid:/src", owner)  # it stays in its tree
    assert sorted(ls("grid:/src/sub", owner)) == ["deeper/", "note"]

    friend = mount_grid.new_node(tmp_path / "friend")
    gridfs("alias", "add", "sub", rw, "--node", friend)
    assert cat("sub:/note", friend) == b"hi"
    assert (
        cat("sub:/deeper/more.bin", friend)
        == (tmp_path / "src" / "sub" / "deeper" / "more.bin").read_bytes()
    )
    local = tmp_path / "theirs.txt"
    local.write_bytes(b"from the friend")
    root_versions = snapshot_count(owner)
    gridfs("cp", local, "sub:/theirs.txt", "--node", friend)
    gridfs("mkdir", "sub:/made-by-friend", "--node", friend)
    gridfs("mv", "sub:/note", "sub:/note2", "--node", friend)
    # The owner sees them through the tree, and its root did not move for them.
    assert sorted(ls("grid:/src/sub", owner)) == [
        "deeper/", "made-by-friend/", "note2", "theirs.txt"
    ]  # fmt: skip
    assert cat("grid:/src/sub/theirs.txt", owner) == b"from the friend"
    gridfs("cp", "-r", "grid:/src", tmp_path / "copy", "--node", owner)
    assert (tmp_path / "copy" / "sub" / "theirs.txt").read_bytes() == b"from the friend"
    assert snapshot_count(owner) == root_versions
    # ... and the friend sees the owner's changes.
    mine = tmp_path / "mine.txt"
    mine.write_bytes(b"from the owner")
    gridfs("cp", mine, "grid:/src/sub/deeper/mine.txt", "--node", owner)
    assert cat("sub:/deeper/mine.txt", friend) == b"from the owner"
    gridfs("rm", "sub:/theirs.txt", "--node", friend)
    assert "theirs.txt" not in ls("grid:/src/sub", owner)

    # A burst of changes inside the shared directory: one publish, of its slot.
    burst = tmp_path / "burst"
    burst.mkdir()
    for i in range(12):
        (burst / f"f{i}").write_bytes(os.urandom(i * 1000))
    gridfs("alias", "add", "mysub", rw, "--node", owner)
    root_versions, sub_versions = snapshot_count(owner), snapshot_count(owner, "mysub:")
    gridfs("cp", "-r", burst, "grid:/src/sub/", "--node", owner)
    assert len(ls("sub:/burst", friend)) == 12
    assert snapshot_count(owner) == root_versions
    assert snapshot_count(owner, "mysub:") == sub_versions + 1

    reader = mount_grid.new_node(tmp_path / "reader")
    gridfs("alias", "add", "subro", ro, "--node", reader)
    assert cat("subro:/deeper/mine.txt", reader) == b"from the owner"
    gridfs("mkdir", "grid:/src/sub/later", "--node", owner)
    assert "later/" in ls("subro:/", reader)
    for args in (
        ["mkdir", "subro:/new"],
        ["cp", local, "subro:/x.txt"],
        ["rm", "subro:/note2"],
        ["mv", "subro:/note2", "subro:/n3"],
        ["share", "subro:/"],
        ["share", "subro:/deeper"],
    ):
        assert "read-only" in failing(*args, "--node", reader), args
    assert pending(reader) == 0
    assert "new" not in ls("grid:/src/sub", owner)
    # A read-only cap of the whole tree gives the shared directory's read cap only.
    tree_ro = gridfs("share", "grid:/", "--ro", "--node", owner).stdout.strip()
    gridfs("alias", "add", "all", tree_ro, "--node", reader)
    assert gridfs("share", "all:/src/sub", "--ro", "--node", reader).stdout.strip() == ro
    assert "read-only" in failing("share", "all:/src/sub", "--node", reader)
    assert "read-only" in failing("mkdir", "all:/src/sub/x", "--node", reader)
    # The owner removes the shared directory from its tree; its holders keep it.
    gridfs("rm", "-r", "grid:/src/sub", "--node", owner)
    assert "sub/" not in ls("grid:/src", owner)
    assert cat("sub:/deeper/mine.txt", friend) == b"from the owner"


def fetch_all(node: Path, cap_text: str) -> tuple[list[bytes], list[Directory]]:
    """Everything a holder of the read cap ``cap_text`` can fetch: every
    version of every slot it can name and every directory, following
    shared directories' slots."""

    async def main() -> tuple[list[bytes], list[Directory]]:
        async with open_grid(NodeDir(node)) as grid:
            await grid.wait_for_servers()
            blobs: list[bytes] = []
            dirs: list[Directory] = []
            slots = [parse_slot_cap(cap_text)]
            while slots:
                cap = slots.pop()
                assert isinstance(cap, SlotReadCap)
                store = GridStore(grid.broker, cap, grid.params, grid.secret)
                _, payload = await store.read_root()
                blobs.append(payload)
                todo = [unpack_root(payload)]
                while todo:
                    data = await store.get_bytes(todo.pop())
                    blobs.append(data)
                    d = Directory.unpack(data)
                    dirs.append(d)
                    for entry in d.entries.values():
                        if entry.is_dir:
                            todo.append(entry.cap)
                        if (slot := slot_of(entry)) is not None:
                            slots.append(slot)
            return blobs, dirs

    return trio.run(main)


def test_no_path_from_a_read_only_cap_to_a_shared_directorys_write_cap(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    """The attack: a holder of the tree's read cap reads every byte it can
    reach (the root, every directory, the shared directories' own slots)
    and tries every key it holds or can derive on the sealed write caps."""
    sub = parse_slot_cap(gridfs("share", "grid:/src/sub", "--node", owner).stdout.strip())
    deeper = parse_slot_cap(gridfs("share", "grid:/src/sub/deeper", "--node", owner).stdout.strip())
    assert isinstance(sub, SlotWriteCap) and isinstance(deeper, SlotWriteCap)
    tree_ro = gridfs("share", "grid:/", "--ro", "--node", owner).stdout.strip()
    sub_ro = gridfs("share", "grid:/src/sub", "--ro", "--node", owner).stdout.strip()
    attacker = mount_grid.new_node(tmp_path / "attacker")
    for cap_text in (tree_ro, sub_ro):
        blobs, dirs = fetch_all(attacker, cap_text)
        secrets = [sub.seed, sub.write_key, deeper.seed, deeper.write_key]
        secrets += [sub.to_string().encode(), deeper.to_string().encode()]
        for blob in blobs:
            assert not any(s in blob for s in secrets)
            assert b"gridfs:ssk:" not in blob
        shared = [e for d in dirs for e in d.entries.values() if SLOT in e.extra]
        assert len(shared) == (2 if cap_text == tree_ro else 1)
        # Every key the holder has: read keys of the slots it can name.
        keys = [parse_slot_cap(cap_text).read_key]  # type: ignore[union-attr]
        keys += [s.read_key for e in shared if (s := slot_of(e)) is not None]
        keys += [read_key(b) for b in blobs if len(b) == 32]
        for entry in shared:
            assert all(open_write_cap(entry, k) is None for k in keys)
    # The owner, with the tree's write key, opens both (transitively).
    root = parse_slot_cap(gridfs("share", "grid:/", "--node", owner).stdout.strip())
    assert isinstance(root, SlotWriteCap)


def test_mounts_of_a_shared_directory_see_each_others_changes(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    rw = gridfs("share", "grid:/src/sub", "--node", owner).stdout.strip()
    ro = gridfs("share", "grid:/src/sub", "--ro", "--node", owner).stdout.strip()
    friend = mount_grid.new_node(tmp_path / "friend")
    gridfs("alias", "add", "sub", rw, "--node", friend)
    theirs = Mount(tmp_path / "theirs", friend, "refresh=1", tree="sub")
    with mounted(owner, tmp_path / "ours") as ours:
        theirs.mount()
        try:
            shared = ours.mountpoint / "src" / "sub"
            assert os.getxattr(shared, "user.gridfs.cap").decode() == ro
            assert os.getxattr(shared, "user.gridfs.rwcap").decode() == rw
            assert os.getxattr(theirs.mountpoint, "user.gridfs.rwcap").decode() == rw
            assert (theirs.mountpoint / "note").read_bytes() == b"hi"
            assert sorted(os.listdir(shared)) == ["deeper", "note"]  # (the view loads it)
            data = os.urandom(50_000)
            (theirs.mountpoint / "from-friend.bin").write_bytes(data)
            os.mkdir(theirs.mountpoint / "dir-by-friend")
            theirs.flush()
            wait_for(
                lambda: "from-friend.bin" in os.listdir(shared),
                timeout=30,
                what="the friend's file on the owner's mount",
            )
            assert (shared / "from-friend.bin").read_bytes() == data
            assert (shared / "dir-by-friend").is_dir()
            (shared / "from-owner.txt").write_bytes(b"owner")
            ours.flush()
            wait_for(
                lambda: (theirs.mountpoint / "from-owner.txt").exists(),
                timeout=30,
                what="the owner's file on the friend's mount",
            )
            assert (theirs.mountpoint / "from-owner.txt").read_bytes() == b"owner"
            # The owner's own commit shows at once on its mount and CLI.
            assert cat("grid:/src/sub/from-owner.txt", owner) == b"owner"
        finally:
            theirs.unmount()


def test_concurrent_writers_through_a_shared_directory_lose_nothing(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    """docs/mount.md §6 through a shared directory: both sides change one
    file from the same version; the last writer wins the name and the other
    version is kept beside it, and each side's new files show on the other."""
    rw = gridfs("share", "grid:/src/sub", "--node", owner).stdout.strip()
    friend = mount_grid.new_node(tmp_path / "friend")
    gridfs("alias", "add", "sub", rw, "--node", friend)
    # noatime: the friend's read must not commit (an atime), which would
    # refresh its view and so let it see the owner's change before writing.
    theirs = Mount(tmp_path / "theirs", friend, "refresh=1000,noatime", tree="sub")
    with mounted(owner, tmp_path / "ours") as ours:
        shared = ours.mountpoint / "src" / "sub"
        theirs.mount()
        try:
            first, second, third = os.urandom(30_000), os.urandom(31_000), os.urandom(32_000)
            (shared / "f").write_bytes(first)
            ours.flush()
            theirs.remount()  # (sees f as first; refreshes no more)
            assert (theirs.mountpoint / "f").read_bytes() == first
            (shared / "f").write_bytes(second)
            (shared / "owner-new").write_bytes(b"o")
            ours.flush()
            (theirs.mountpoint / "f").write_bytes(third)  # based on first
            (theirs.mountpoint / "friend-new").write_bytes(b"f")
            theirs.flush()
            names = ls("grid:/src/sub", owner)
            kept = [n for n in names if n.startswith("f.conflict-")]
            assert len(kept) == 1, names
            assert "owner-new" in names and "friend-new" in names
            assert cat("grid:/src/sub/f", owner) == third
            assert cat(f"grid:/src/sub/{kept[0]}", owner) == second
            wait_for(
                lambda: "friend-new" in os.listdir(shared),
                timeout=30,
                what="the friend's changes on the owner's mount",
            )
        finally:
            theirs.unmount()


def test_leases_and_snapshots_follow_into_a_shared_directory(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    """A file removed through the shared directory's own cap stays on the
    grid for the snapshots, check -r walks into the shared directory, and
    once the snapshots expire the file is freed."""
    rw = gridfs("share", "grid:/src/sub", "--node", owner).stdout.strip()
    gridfs("alias", "add", "sub", rw, "--node", owner)
    more = gridfs("share", "grid:/src/sub/deeper/more.bin", "--node", owner).stdout.strip()
    got_more = (tmp_path / "src" / "sub" / "deeper" / "more.bin").read_bytes()
    out = gridfs("check", "-r", "grid:/src", "--node", owner).stdout
    assert "7 objects checked: 7 healthy" in out, out  # src, big, small, sub, deeper, more, note
    gridfs("rm", "sub:/deeper/more.bin", "--node", owner)
    assert "more.bin" not in ls("grid:/src/sub/deeper", owner)

    def readable() -> bool:
        proc = subprocess.run([GRIDFS, "get", more, "--node", str(owner)], capture_output=True)
        return proc.returncode == 0

    assert readable()  # held by the snapshots
    assert snapshot_count(owner, "sub:") >= 2
    # The tree's newest snapshot goes into the shared directory as it was then.
    snaps = json.loads(gridfs("snapshots", "grid:", "--json", "--node", owner).stdout)
    newest = snaps["snapshots"][-1]["name"]
    gridfs("restore", "grid:/src/sub/deeper/more.bin", "--at", newest, "--node", owner)
    assert cat("sub:/deeper/more.bin", owner) == got_more
    gridfs("rm", "grid:/src/sub/deeper/more.bin", "--node", owner)
    out = gridfs("check", "-r", "grid:/src", "--node", owner).stdout
    assert "6 objects checked: 6 healthy" in out, out
    config = owner / "gridfs.toml"
    text = config.read_text()
    config.write_text(
        text.replace("snapshot_retention = 2592000.0", "snapshot_retention = 0.0").replace(
            "snapshot_keep = 10", "snapshot_keep = 1"
        )
    )
    gridfs("snapshots", "grid:", "--prune", "--node", owner)
    assert not readable()
    assert cat("grid:/src/sub/note", owner) == b"hi"  # the live directory kept its leases
    assert cat("sub:/note", owner) == b"hi"


def test_a_read_only_mount_of_the_tree_gives_a_shared_directorys_read_cap_only(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    ro = gridfs("share", "grid:/src/sub", "--ro", "--node", owner).stdout.strip()
    tree_ro = gridfs("share", "grid:/", "--ro", "--node", owner).stdout.strip()
    reader = mount_grid.new_node(tmp_path / "reader")
    gridfs("alias", "add", "all", tree_ro, "--node", reader)
    m = Mount(tmp_path / "mnt", reader, tree="all")
    m.mount()
    try:
        shared = m.mountpoint / "src" / "sub"
        assert (shared / "note").read_bytes() == b"hi"
        assert os.getxattr(shared, "user.gridfs.cap").decode() == ro
        with pytest.raises(OSError) as e:
            os.getxattr(shared, "user.gridfs.rwcap")
        assert e.value.errno == errno.ENODATA
        with pytest.raises(OSError) as e:
            os.open(shared / "new", os.O_CREAT | os.O_WRONLY, 0o644)
        assert e.value.errno == errno.EROFS
        assert pending(reader) == 0
    finally:
        m.unmount()
