"""Sharing by cap (read-write and read-only), attenuation, and snapshots:
two client nodes of one grid, the real CLI and real mounts."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from gridfs.caps import parse as parse_cap
from gridfs.client.grid import open_grid
from gridfs.client.gridstore import GridStore
from gridfs.config import NodeDir
from gridfs.dirnode import Directory
from gridfs.mutable import SlotReadCap, SlotWriteCap, parse_slot_cap
from gridfs.tree import unpack_root

from .mountutil import GRIDFS, Grid, Mount, gridfs, mounted, tree_cap, wait_for

pytest_plugins = ["tests.mountutil"]


def failing(*args: str | Path) -> str:
    """Run a gridfs command that must fail with one clean line; that line."""
    proc = gridfs(*args, check=False)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def pending(node: Path) -> int:
    out = gridfs("queue", "--node", node).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def make_local_tree(base: Path) -> Path:
    src = base / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(200_000))
    (src / "small.txt").write_bytes(b"small file, kept inside its directory " * 4)
    (src / "sub" / "deeper" / "more.bin").write_bytes(os.urandom(40_000))
    (src / "sub" / "note").write_bytes(b"hi")
    return src


@pytest.fixture
def owner(mount_grid: Grid, tmp_path: Path) -> Path:
    """A node whose tree holds a small nested tree under /src."""
    node = mount_grid.new_node(tmp_path)
    gridfs("cp", "-r", make_local_tree(tmp_path), "grid:/", "--node", node)
    return node


def test_share_prints_caps_that_read_and_a_read_only_alias_writes_nothing(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    rw = gridfs("share", "grid:/", "--node", owner).stdout.strip()
    ro = gridfs("share", "grid:/", "--ro", "--node", owner).stdout.strip()
    assert rw == tree_cap(owner)
    assert isinstance(parse_slot_cap(ro), SlotReadCap) and ro.startswith("gridfs:ssk-ro:")
    big = gridfs("share", "grid:/src/big.bin", "--node", owner).stdout.strip()
    assert big.startswith("gridfs:chk:")
    got = subprocess.run([GRIDFS, "get", big, "--node", str(owner)], capture_output=True)
    assert got.stdout == (tmp_path / "src" / "big.bin").read_bytes()
    # A small file inside its directory has no cap of its own: share stores it.
    small = gridfs("share", "grid:/src/small.txt", "--node", owner).stdout.strip()
    got = subprocess.run([GRIDFS, "get", small, "--node", str(owner)], capture_output=True)
    assert got.stdout == (tmp_path / "src" / "small.txt").read_bytes()

    friend = mount_grid.new_node(tmp_path / "friend")
    gridfs("alias", "add", "shared", ro, "--node", friend)
    assert "big.bin" in gridfs("ls", "-R", "shared:/", "--node", friend).stdout
    cat = subprocess.run(
        [GRIDFS, "cat", "shared:/src/sub/deeper/more.bin", "--node", str(friend)],
        capture_output=True,
    )
    assert cat.stdout == (tmp_path / "src" / "sub" / "deeper" / "more.bin").read_bytes()
    gridfs("cp", "-r", "shared:/src", tmp_path / "out", "--node", friend)
    assert (tmp_path / "out" / "big.bin").read_bytes() == (
        tmp_path / "src" / "big.bin"
    ).read_bytes()
    # The owner's later changes show through the read-only alias.
    gridfs("mkdir", "grid:/later", "--node", owner)
    assert "later/" in gridfs("ls", "shared:/", "--node", friend).stdout

    local = tmp_path / "local.txt"
    local.write_text("x")
    for args in (
        ["mkdir", "shared:/new"],
        ["cp", local, "shared:/x.txt"],
        ["rm", "shared:/src/big.bin"],
        ["rm", "-r", "shared:/src"],
        ["mv", "shared:/src/big.bin", "shared:/b.bin"],
        ["restore", "shared:/src", "--at", "2099-01-01T00:00:00Z"],
        ["share", "shared:/"],
    ):
        assert "read-only" in failing(*args, "--node", friend), args
    assert pending(friend) == 0
    assert "new" not in gridfs("ls", "grid:/", "--node", owner).stdout


def walk(node: Path, cap_text: str) -> tuple[list[bytes], list[str]]:
    """Every byte a reader of ``cap_text`` can fetch (the root version and
    every directory) and every cap in them."""

    async def main() -> tuple[list[bytes], list[str]]:
        async with open_grid(NodeDir(node)) as grid:
            await grid.wait_for_servers()
            cap = parse_slot_cap(cap_text)
            assert isinstance(cap, SlotReadCap)
            store = GridStore(grid.broker, cap, grid.params, grid.secret)
            _, payload = await store.read_root()
            blobs, caps = [payload], [unpack_root(payload)]
            todo = [caps[0]]
            while todo:
                data = await store.get_bytes(todo.pop())
                blobs.append(data)
                for entry in Directory.unpack(data).entries.values():
                    if entry.cap:
                        caps.append(entry.cap)
                    if entry.is_dir:
                        todo.append(entry.cap)
            return blobs, caps

    return trio.run(main)


def test_no_path_from_a_read_only_cap_leads_to_a_write_cap(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    rw = parse_slot_cap(tree_cap(owner))
    assert isinstance(rw, SlotWriteCap)
    ro = gridfs("share", "grid:/", "--ro", "--node", owner).stdout.strip()
    friend = mount_grid.new_node(tmp_path / "friend")
    blobs, caps = walk(friend, ro)
    assert len(blobs) == 5 and len(caps) == 6  # the root, src, sub, deeper and two files
    for cap in caps:  # only immutable caps: files and directories, never a slot's
        parse_cap(cap)
    secrets = [rw.to_string().encode(), rw.seed, rw.write_key]
    for blob in blobs:
        assert not any(s in blob for s in secrets)
        assert b"gridfs:ssk:" not in blob


def erofs(fn: Callable[[], object]) -> None:
    with pytest.raises(OSError) as e:
        fn()
    assert e.value.errno == errno.EROFS, (fn, e.value)


def test_a_read_only_mount_refuses_every_change_at_once(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    ro = gridfs("share", "grid:/", "--ro", "--node", owner).stdout.strip()
    friend = mount_grid.new_node(tmp_path / "friend")
    gridfs("alias", "add", "shared", ro, "--node", friend)
    m = Mount(tmp_path / "mnt", friend, tree="shared")
    m.mount()
    try:
        top = m.mountpoint
        f = top / "src" / "big.bin"
        assert f.read_bytes() == (tmp_path / "src" / "big.bin").read_bytes()
        assert os.statvfs(top).f_flag & os.ST_RDONLY
        erofs(lambda: os.open(top / "new", os.O_CREAT | os.O_WRONLY, 0o644))
        erofs(lambda: os.open(f, os.O_WRONLY))
        erofs(lambda: os.open(f, os.O_RDWR | os.O_TRUNC))
        erofs(lambda: os.mkdir(top / "d"))
        erofs(lambda: os.unlink(f))
        erofs(lambda: os.rmdir(top / "src" / "sub" / "deeper"))
        erofs(lambda: os.rename(f, top / "moved"))
        erofs(lambda: os.chmod(f, 0o600))
        erofs(lambda: os.chown(f, os.getuid(), os.getgid()))
        erofs(lambda: os.utime(f, (1, 1)))
        erofs(lambda: os.setxattr(f, "user.x", b"1"))
        erofs(lambda: os.truncate(f, 0))
        erofs(lambda: os.symlink("x", top / "l"))
        erofs(lambda: os.link(f, top / "hard"))
        erofs(lambda: os.mknod(top / "fifo", 0o600 | 0o010000))
        assert pending(friend) == 0
        assert os.getxattr(top, "user.gridfs.cap").decode() == ro
        big = gridfs("share", "grid:/src/big.bin", "--node", owner).stdout.strip()
        assert os.getxattr(f, "user.gridfs.cap").decode() == big
        with pytest.raises(OSError) as e:
            os.getxattr(top, "user.gridfs.rwcap")
        assert e.value.errno == errno.ENODATA
    finally:
        m.unmount()


def test_cap_xattrs_on_the_owners_mount(owner: Path, tmp_path: Path) -> None:
    with mounted(owner, tmp_path / "mnt") as m:
        top = m.mountpoint
        assert os.getxattr(top, "user.gridfs.rwcap").decode() == tree_cap(owner)
        ro = gridfs("share", "grid:/", "--ro", "--node", owner).stdout.strip()
        assert os.getxattr(top, "user.gridfs.cap").decode() == ro
        big = gridfs("share", "grid:/src/big.bin", "--node", owner).stdout.strip()
        assert os.getxattr(top / "src" / "big.bin", "user.gridfs.cap").decode() == big
        sub = os.getxattr(top / "src" / "sub", "user.gridfs.cap").decode()
        assert parse_cap(sub)  # the directory's immutable (read-only) cap
        assert "user.gridfs.cap" not in os.listxattr(top / "src" / "big.bin")
        with pytest.raises(OSError) as e:
            os.setxattr(top / "src" / "big.bin", "user.gridfs.cap", b"gridfs:lit:")
        assert e.value.errno == errno.EPERM
        with pytest.raises(OSError) as e:
            os.getxattr(top / "src", "user.gridfs.rwcap")
        assert e.value.errno == errno.ENODATA


def storage_bytes(grid: Grid) -> int:
    return sum(
        p.stat().st_size for p in grid.dir.glob("storage-*/storage/shares/**/*") if p.is_file()
    )


def test_rm_rf_on_the_mount_then_browse_snapshots_and_restore(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    original = (tmp_path / "src" / "big.bin").read_bytes()
    with mounted(owner, tmp_path / "mnt") as m:
        top = m.mountpoint
        subprocess.run(["rm", "-rf", str(top / "src")], check=True)
        m.flush()
        assert not (top / "src").exists()
        assert ".snapshots" not in os.listdir(top)
        names = sorted(os.listdir(top / ".snapshots"))
        assert len(names) >= 2, names
        with_src = [n for n in names if (top / ".snapshots" / n / "src" / "big.bin").exists()]
        assert with_src, names
        snap = top / ".snapshots" / with_src[-1]
        assert (snap / "src" / "big.bin").read_bytes() == original
        assert (snap / "src" / "sub" / "note").read_bytes() == b"hi"
        erofs(lambda: os.open(snap / "src" / "new", os.O_CREAT | os.O_WRONLY, 0o644))
        erofs(lambda: os.unlink(snap / "src" / "big.bin"))
        erofs(lambda: os.mkdir(top / ".snapshots" / "x"))
        erofs(lambda: os.open(snap / "src" / "big.bin", os.O_WRONLY))
        assert pending(owner) == 0
        # The files the commit dropped are still on the grid: the snapshot holds them.
        listing = gridfs("snapshots", "grid:", "--node", owner).stdout
        assert with_src[-1] in listing and "(current)" in listing
        status = gridfs("status", "--node", owner).stdout
        assert "snapshots kept" in status, status
        gridfs("restore", "grid:/src", "--at", with_src[-1], "--node", owner)
        wait_for(lambda: (top / "src" / "big.bin").exists(), timeout=30, what="the restore")
        assert (top / "src" / "big.bin").read_bytes() == original
        gridfs("restore", "grid:/src/sub/note", "--at", with_src[-1], "--to", "grid:/n2",
               "--node", owner)  # fmt: skip
        wait_for(lambda: (top / "n2").exists(), timeout=30, what="the restore --to")
        assert (top / "n2").read_bytes() == b"hi"
    with mounted(owner, tmp_path / "mnt", "refresh=1,show_snapshots") as m:
        assert ".snapshots" in os.listdir(m.mountpoint)


def test_expired_snapshots_free_space_on_the_servers(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    big = gridfs("share", "grid:/src/big.bin", "--node", owner).stdout.strip()
    gridfs("rm", "-r", "grid:/src", "--node", owner)

    def readable() -> bool:
        proc = subprocess.run([GRIDFS, "get", big, "--node", str(owner)], capture_output=True)
        return proc.returncode == 0

    assert readable()  # kept for its snapshots (30 days by default)
    listing = gridfs("snapshots", "grid:", "--node", owner).stdout
    assert len(listing.strip().splitlines()) >= 3
    before = storage_bytes(mount_grid)
    config = owner / "gridfs.toml"
    text = config.read_text()
    assert "snapshot_retention = 2592000.0" in text
    config.write_text(
        text.replace("snapshot_retention = 2592000.0", "snapshot_retention = 0.0").replace(
            "snapshot_keep = 10", "snapshot_keep = 1"
        )
    )
    out = gridfs("snapshots", "grid:", "--prune", "--node", owner).stdout
    assert out.startswith("pruned ") and " 0 server copies freed" not in out, out
    assert len(out.strip().splitlines()) == 2, out  # the report and the current version
    assert not readable()
    assert before - storage_bytes(mount_grid) > 200_000 * 5 // 3


def test_two_writers_through_a_shared_write_cap_lose_nothing(
    mount_grid: Grid, owner: Path, tmp_path: Path
) -> None:
    """The friend mounts the owner's tree through the cap `gridfs share`
    printed; both change one file at the same time, and each side's new
    files show on the other: the conflict rule of docs/mount.md §6 holds."""
    rw = gridfs("share", "grid:/", "--node", owner).stdout.strip()
    friend = mount_grid.new_node(tmp_path / "friend")
    gridfs("alias", "add", "shared", rw, "--node", friend)
    # noatime: the friend's read must not commit (an atime), which would
    # refresh its view and so let it see the owner's change before writing.
    theirs = Mount(tmp_path / "theirs", friend, "refresh=1000,noatime", tree="shared")
    with mounted(owner, tmp_path / "ours") as ours:
        theirs.mount()
        try:
            first, second, third = os.urandom(30_000), os.urandom(31_000), os.urandom(32_000)
            (ours.mountpoint / "f").write_bytes(first)
            ours.flush()
            theirs.remount()  # (sees f as first; refreshes no more)
            assert (theirs.mountpoint / "f").read_bytes() == first
            (ours.mountpoint / "f").write_bytes(second)
            ours.flush()
            (theirs.mountpoint / "f").write_bytes(third)  # based on first
            (theirs.mountpoint / "from-friend").write_bytes(b"hello")
            theirs.flush()
            wait_for(
                lambda: "from-friend" in os.listdir(ours.mountpoint),
                timeout=30,
                what="the friend's changes on the owner's mount",
            )
            names = gridfs("ls", "grid:/", "--node", owner).stdout.split()
            kept = [n for n in names if n.startswith("f.conflict-")]
            assert len(kept) == 1, names
            cat = [GRIDFS, "cat", "--node", str(owner)]
            assert subprocess.run([*cat, "grid:/f"], capture_output=True).stdout == third
            got = subprocess.run([*cat, f"grid:/{kept[0]}"], capture_output=True).stdout
            assert got == second
        finally:
            theirs.unmount()


def test_a_snapshot_log_that_cannot_be_written_does_not_stop_reading(owner: Path) -> None:
    log = owner / "private" / "snapshots.sqlite"
    for p in owner.glob("private/snapshots.sqlite*"):
        p.unlink()
    log.mkdir()  # sqlite cannot open it
    assert "big.bin" in gridfs("ls", "grid:/src", "--node", owner).stdout
