"""Hard links inside a shared directory (docs/formats.md §13.3, "per
slot"): two client nodes of one grid, real mounts and the real CLI.  A
link's record lives in the records directory of its slot (the shared
directory), so the owner (through its tree) and a holder of the shared
directory's cap (through its own mount) see one inode with the same count
and content; a name never leaves its record's slot (EXDEV, as between two
filesystems)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import GRIDFS, Grid, Mount, gridfs, mounted, wait_for  # noqa: E402
from .test_share import failing, make_local_tree  # noqa: E402

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


@pytest.fixture
def owner(mount_grid: Grid, tmp_path: Path) -> Path:
    node = mount_grid.new_node(tmp_path)
    gridfs("cp", "-r", make_local_tree(tmp_path), "grid:/", "--node", node)
    return node


@pytest.fixture
def friend(mount_grid: Grid, owner: Path, tmp_path: Path) -> Path:
    """A second node holding the write cap of the shared /src/sub as ``sub``."""
    rw = gridfs("share", "grid:/src/sub", "--node", owner).stdout.strip()
    node = mount_grid.new_node(tmp_path / "friend")
    gridfs("alias", "add", "sub", rw, "--node", node)
    return node


def ls(path: str, node: Path) -> list[str]:
    return gridfs("ls", path, "--node", node).stdout.split()


def cat(path: str, node: Path) -> bytes:
    return subprocess.run(
        [GRIDFS, "cat", path, "--node", str(node)], capture_output=True, check=True
    ).stdout


def links_of(path: Path) -> int:
    return os.stat(path).st_nlink


def expect_errno(code: int, call, *args) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as e:
        call(*args)
    assert e.value.errno == code, e.value


def test_owner_links_in_a_shared_directory_the_holder_sees_one_inode(
    owner: Path, friend: Path, tmp_path: Path
) -> None:
    theirs = Mount(tmp_path / "theirs", friend, "refresh=1", tree="sub")
    with mounted(owner, tmp_path / "ours") as ours:
        shared = ours.mountpoint / "src" / "sub"
        os.link(shared / "note", shared / "deeper" / "note2")
        assert links_of(shared / "note") == links_of(shared / "deeper" / "note2") == 2
        # The record is the shared directory's, hidden and reserved there.
        assert sorted(os.listdir(shared)) == ["deeper", "note"]
        assert not os.path.exists(shared / ".gridfs-links")
        expect_errno(errno.EPERM, os.mkdir, shared / ".gridfs-links")
        ours.flush()
        assert len(ls("grid:/src/sub/.gridfs-links", owner)) == 1
        failing("ls", "grid:/.gridfs-links", "--node", owner)  # (none at the tree's top)
        theirs.mount()
        try:
            top = theirs.mountpoint
            a, b = os.stat(top / "note"), os.stat(top / "deeper" / "note2")
            assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
            assert (top / "deeper" / "note2").read_bytes() == b"hi"
            assert ".gridfs-links" not in os.listdir(top)
            assert cat("sub:/deeper/note2", friend) == b"hi"
            assert cat("grid:/src/sub/deeper/note2", owner) == b"hi"
            # The holder drops a name: the owner's count follows.
            os.unlink(top / "note")
            assert links_of(top / "deeper" / "note2") == 1
            theirs.flush()
            wait_for(
                lambda: not (shared / "note").exists(),
                timeout=30,
                what="the holder's unlink on the owner's mount",
            )
            assert links_of(shared / "deeper" / "note2") == 1
            assert (shared / "deeper" / "note2").read_bytes() == b"hi"
        finally:
            theirs.unmount()


def test_holder_links_on_its_mount_the_owner_sees_one_inode(
    owner: Path, friend: Path, tmp_path: Path
) -> None:
    theirs = Mount(tmp_path / "theirs", friend, "refresh=1", tree="sub")
    with mounted(owner, tmp_path / "ours") as ours:
        shared = ours.mountpoint / "src" / "sub"
        assert sorted(os.listdir(shared)) == ["deeper", "note"]  # (the view loads it)
        theirs.mount()
        try:
            top = theirs.mountpoint
            more = (top / "deeper" / "more.bin").read_bytes()
            os.link(top / "deeper" / "more.bin", top / "more-link")
            os.link(top / "more-link", top / "deeper" / "third")
            assert links_of(top / "deeper" / "more.bin") == 3
            theirs.flush()
            wait_for(
                lambda: (shared / "more-link").exists(),
                timeout=30,
                what="the holder's link on the owner's mount",
            )
            names = [
                shared / "deeper" / "more.bin",
                shared / "more-link",
                shared / "deeper" / "third",
            ]
            stats = [os.stat(p) for p in names]
            assert len({s.st_ino for s in stats}) == 1
            assert [s.st_nlink for s in stats] == [3, 3, 3]
            assert all(p.read_bytes() == more for p in names)
            assert ".gridfs-links" not in os.listdir(shared)
            assert cat("grid:/src/sub/more-link", owner) == more
            # The owner drops two names: the holder's count follows.
            os.unlink(shared / "deeper" / "more.bin")
            os.unlink(shared / "deeper" / "third")
            assert links_of(shared / "more-link") == 1
            ours.flush()
            wait_for(
                lambda: not (top / "deeper" / "third").exists(),
                timeout=30,
                what="the owner's unlinks on the holder's mount",
            )
            assert links_of(top / "more-link") == 1
            assert (top / "more-link").read_bytes() == more
        finally:
            theirs.unmount()
    # Both names gone: the record goes with the last.
    gridfs("rm", "sub:/more-link", "--node", friend)
    assert ls("sub:/.gridfs-links", friend) == []


def test_a_name_never_leaves_its_records_slot(owner: Path, friend: Path, tmp_path: Path) -> None:
    """link() and rename() across the shared directory's boundary are EXDEV
    (mv then copies); a directory without links, or the shared directory
    itself, moves as before."""
    with mounted(owner, tmp_path / "ours") as ours:
        src = ours.mountpoint / "src"
        shared = src / "sub"
        expect_errno(errno.EXDEV, os.link, shared / "note", src / "note-out")
        expect_errno(errno.EXDEV, os.link, src / "small.txt", shared / "small-in")
        os.link(shared / "note", shared / "deeper" / "n2")
        expect_errno(errno.EXDEV, os.rename, shared / "deeper" / "n2", src / "n2")
        expect_errno(errno.EXDEV, os.rename, shared / "deeper", src / "deeper-out")
        os.link(src / "small.txt", src / "small2")
        expect_errno(errno.EXDEV, os.rename, src / "small2", shared / "small2")
        # mv copies across, as between two filesystems: a file of its own.
        subprocess.run(["mv", src / "small2", shared / "small2"], check=True)
        assert links_of(src / "small.txt") == 1 and links_of(shared / "small2") == 1
        assert (shared / "small2").read_bytes() == (src / "small.txt").read_bytes()
        # Without links, and the shared directory itself: a rename as before.
        os.mkdir(src / "plain")
        (src / "plain" / "f").write_bytes(b"f")
        os.rename(src / "plain", shared / "plain")
        os.rename(shared, ours.mountpoint / "sub-moved")
        moved = ours.mountpoint / "sub-moved"
        assert links_of(moved / "note") == 2 and (moved / "deeper" / "n2").read_bytes() == b"hi"
        ours.flush()
    assert cat("sub:/note", friend) == b"hi"
    assert "shared directory" in failing(
        "mv", "grid:/sub-moved/note", "grid:/note-out", "--node", owner
    )


def test_tree_commands_use_the_shared_directorys_records(
    owner: Path, friend: Path, tmp_path: Path
) -> None:
    """cp -r of a local tree with hard links into the shared directory makes
    its records there; the holder reads them; rm on either side counts; check
    -r finds the records of the shared directory too."""
    local = tmp_path / "linked"
    local.mkdir()
    (local / "a").write_bytes(os.urandom(70_000))
    os.link(local / "a", local / "b")
    gridfs("cp", "-r", local, "grid:/src/sub/", "--node", owner)
    assert len(ls("grid:/src/sub/.gridfs-links", owner)) == 1
    assert ".gridfs-links/" not in ls("grid:/src/sub", owner) + ls("sub:/", friend)
    assert "reserved" in failing("rm", "-r", "grid:/src/sub/.gridfs-links", "--node", owner)
    assert sorted(ls("sub:/linked", friend)) == ["a", "b"]
    assert cat("sub:/linked/b", friend) == (local / "a").read_bytes()
    checked = gridfs("check", "-r", "--json", "grid:/", "--node", owner).stdout.splitlines()
    paths = [json.loads(line)["path"] for line in checked]
    assert sum(p.startswith("grid:/src/sub/.gridfs-links/") for p in paths) == 1, paths
    gridfs("rm", "grid:/src/sub/linked/a", "--node", owner)
    out = tmp_path / "out"
    gridfs("cp", "-r", "sub:/linked", out, "--node", friend)
    assert (out / "b").read_bytes() == (local / "a").read_bytes()
    gridfs("rm", "-r", "sub:/linked", "--node", friend)
    assert ls("grid:/src/sub/.gridfs-links", owner) == []
    shutil.rmtree(out)
