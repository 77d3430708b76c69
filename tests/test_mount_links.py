"""Hard links on the mount (issue 16 §3): one inode through every name,
while open, after a flush and a remount, through the tree commands, and
with the tools that make them (``cp -al``, ``rsync -aH``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import Grid, Mount, gridfs, mounted, wait_for  # noqa: E402
from .test_mount_durability import expire_snapshots, share_sizes  # noqa: E402

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def test_names_share_one_inode(mount_dir: Path) -> None:
    (mount_dir / "d").mkdir()
    (mount_dir / "a").write_bytes(b"first")
    os.link(mount_dir / "a", mount_dir / "d" / "b")
    a, b = os.stat(mount_dir / "a"), os.stat(mount_dir / "d" / "b")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
    os.link(mount_dir / "d" / "b", mount_dir / "c")
    assert os.stat(mount_dir / "a").st_nlink == 3
    (mount_dir / "c").write_bytes(b"changed through c")
    assert (mount_dir / "a").read_bytes() == b"changed through c"
    os.chmod(mount_dir / "d" / "b", 0o600)
    assert os.stat(mount_dir / "a").st_mode & 0o777 == 0o600
    os.unlink(mount_dir / "a")
    assert os.stat(mount_dir / "c").st_nlink == 2
    assert (mount_dir / "d" / "b").read_bytes() == b"changed through c"
    # rename of one link over another of the same inode: nothing happens
    os.rename(mount_dir / "c", mount_dir / "d" / "b")
    assert os.path.exists(mount_dir / "c") and os.stat(mount_dir / "c").st_nlink == 2
    assert sorted(os.listdir(mount_dir)) == ["c", "d"]
    # the hidden records directory is never listed, nor found by name
    top = mount_dir.parent
    assert ".gridfs-links" not in os.listdir(top)
    assert not os.path.exists(top / ".gridfs-links")


def test_directory_link_count(mount_dir: Path) -> None:
    (mount_dir / "d").mkdir()
    assert os.stat(mount_dir / "d").st_nlink == 2
    for name in "xyz":
        (mount_dir / "d" / name).mkdir()
    (mount_dir / "d" / "f").write_bytes(b"")
    assert os.stat(mount_dir / "d").st_nlink == 5
    os.rmdir(mount_dir / "d" / "x")
    assert os.stat(mount_dir / "d").st_nlink == 4


def test_open_file_seen_through_every_name(mount_dir: Path) -> None:
    (mount_dir / "a").write_bytes(b"0123456789")
    os.link(mount_dir / "a", mount_dir / "b")
    with open(mount_dir / "a", "r+b") as fa, open(mount_dir / "b", "rb") as fb:
        fa.write(b"AB")
        fa.flush()
        assert fb.read() == b"AB23456789"
        os.unlink(mount_dir / "a")
        fa.seek(0, 2)
        fa.write(b"!")
        fa.flush()
    assert (mount_dir / "b").read_bytes() == b"AB23456789!"
    assert os.stat(mount_dir / "b").st_nlink == 1


def test_last_name_gone_keeps_an_open_file_readable(mount_dir: Path) -> None:
    (mount_dir / "a").write_bytes(b"kept")
    os.link(mount_dir / "a", mount_dir / "b")
    with open(mount_dir / "b", "rb") as f:
        os.unlink(mount_dir / "a")
        os.unlink(mount_dir / "b")
        assert f.read() == b"kept"
    assert os.listdir(mount_dir) == []


def test_links_survive_a_flush_and_a_remount(mount_node: Path, tmp_path: Path) -> None:
    big = os.urandom(300_000)
    with mounted(mount_node, tmp_path / "mnt") as m:
        top = m.mountpoint
        (top / "d").mkdir()
        (top / "big").write_bytes(big)
        (top / "small").write_bytes(b"small")
        os.link(top / "big", top / "d" / "big2")
        os.link(top / "small", top / "d" / "small2")
        m.flush()
        (top / "d" / "small2").write_bytes(b"after the flush")
    with mounted(mount_node, tmp_path / "mnt") as m:
        top = m.mountpoint
        a, b = os.stat(top / "big"), os.stat(top / "d" / "big2")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        assert (top / "d" / "big2").read_bytes() == big
        assert (top / "small").read_bytes() == b"after the flush"
        os.unlink(top / "big")
        assert os.stat(top / "d" / "big2").st_nlink == 1
        assert (top / "d" / "big2").read_bytes() == big


def test_tree_commands_follow_links(mount_node: Path, tmp_path: Path) -> None:
    """ls, cat and cp out show every name as its file (cp -r keeps the link
    locally); rm of one name keeps the others, of the last frees the record."""
    big = os.urandom(200_000)
    with mounted(mount_node, tmp_path / "mnt") as m:
        top = m.mountpoint
        (top / "d").mkdir()
        (top / "big").write_bytes(big)
        os.link(top / "big", top / "d" / "big2")
        (top / "s").write_bytes(b"small one")
        os.link(top / "s", top / "d" / "s2")
    node = ("--node", mount_node)
    assert gridfs("cat", "grid:/d/s2", *node).stdout == "small one"
    assert "200000" in gridfs("ls", "-l", "grid:/d", *node).stdout
    assert ".gridfs-links" not in gridfs("ls", "grid:/", *node).stdout
    gridfs("cp", "-r", "grid:/", tmp_path / "out", *node)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["big", "d", "s"]
    assert (out / "d" / "big2").read_bytes() == big
    assert os.stat(out / "big").st_ino == os.stat(out / "d" / "big2").st_ino
    gridfs("rm", "grid:/big", *node)
    gridfs("cp", "grid:/d/s2", "grid:/copy", *node)  # a file of its own
    gridfs("rm", "-r", "grid:/d", *node)
    assert gridfs("cat", "grid:/s", *node).stdout == "small one"
    with mounted(mount_node, tmp_path / "mnt") as m:
        top = m.mountpoint
        assert sorted(os.listdir(top)) == ["copy", "s"]
        assert os.stat(top / "s").st_nlink == 1 and os.stat(top / "copy").st_nlink == 1
        (top / "s").write_bytes(b"changed")
        assert (top / "copy").read_bytes() == b"small one"
    # the big file's record went with its last name; the small one's stays
    records = gridfs("ls", "-l", "grid:/.gridfs-links", *node).stdout.splitlines()
    assert len(records) == 1 and " 7 " in records[0], records


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_cp_al_and_rsync_ah_round_trip(
    shared_mount: Mount, mount_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_bytes(b"one inode")
    os.link(src / "f", src / "sub" / "g")
    (src / "h").write_bytes(b"alone")
    subprocess.run(["rsync", "-aH", f"{src}/", f"{mount_dir}/copy/"], check=True)
    copy = mount_dir / "copy"
    assert os.stat(copy / "f").st_ino == os.stat(copy / "sub" / "g").st_ino
    assert os.stat(copy / "h").st_nlink == 1
    subprocess.run(["cp", "-al", str(copy), str(mount_dir / "snap")], check=True)
    assert os.stat(mount_dir / "snap" / "f").st_ino == os.stat(copy / "f").st_ino
    assert os.stat(copy / "f").st_nlink == 4
    back = tmp_path / "back"
    subprocess.run(["rsync", "-aH", f"{copy}/", f"{back}/"], check=True)
    assert os.stat(back / "f").st_ino == os.stat(back / "sub" / "g").st_ino
    assert (back / "sub" / "g").read_bytes() == b"one inode"


def test_a_linked_files_data_stays_while_a_name_keeps_it(
    mount_grid: Grid, fresh_mount: Mount
) -> None:
    """Leases follow the record: unlinking the first name (the one the data
    was uploaded under) frees nothing; unlinking the last frees the shares
    once the snapshots that still hold them expire."""
    mp = fresh_mount.mountpoint
    before = share_sizes(mount_grid)
    data = os.urandom(600_000)
    (mp / "big").write_bytes(data)
    fresh_mount.flush()
    big = {si for si, size in share_sizes(mount_grid).items() if si not in before and size > 1e6}
    assert big
    (mp / "d").mkdir()
    os.link(mp / "big", mp / "d" / "big2")
    fresh_mount.flush()
    os.unlink(mp / "big")
    fresh_mount.flush()
    expire_snapshots(fresh_mount.node)
    assert big <= set(share_sizes(mount_grid))  # d/big2 keeps it
    out = gridfs("check", "-r", "grid:/", "--node", fresh_mount.node).stdout
    # the top, d, d/big2, the records directory and the record
    assert "5 objects checked: 5 healthy" in out, out
    assert (mp / "d" / "big2").read_bytes() == data
    os.unlink(mp / "d" / "big2")
    fresh_mount.flush()
    expire_snapshots(fresh_mount.node)
    assert not big & set(share_sizes(mount_grid))


def test_snapshots_show_links_as_they_were(fresh_mount: Mount) -> None:
    mp = fresh_mount.mountpoint
    (mp / "f").write_bytes(b"as it was")
    os.link(mp / "f", mp / "g")
    fresh_mount.flush()
    (mp / "g").write_bytes(b"changed since")
    os.unlink(mp / "f")
    fresh_mount.flush()
    versions = sorted(os.listdir(mp / ".snapshots"))
    old = next(
        mp / ".snapshots" / v for v in reversed(versions) if (mp / ".snapshots" / v / "f").exists()
    )
    f, g = os.stat(old / "f"), os.stat(old / "g")
    assert f.st_ino == g.st_ino and f.st_nlink == 2
    assert (old / "g").read_bytes() == b"as it was"
    assert ".gridfs-links" not in os.listdir(old)
    assert (mp / "g").read_bytes() == b"changed since"


def test_link_a_file_being_written(mount_dir: Path) -> None:
    """link() of a file open and written, not yet closed: what was written
    is the linked file's, and later writes through the old handle too."""
    with open(mount_dir / "a", "wb") as f:
        f.write(b"x" * 20_000)  # past the inline limit: a staging file
        f.flush()
        os.link(mount_dir / "a", mount_dir / "b")
        assert os.stat(mount_dir / "b").st_size == 20_000
        f.write(b"tail")
    assert (mount_dir / "b").read_bytes() == b"x" * 20_000 + b"tail"
    assert os.stat(mount_dir / "a").st_nlink == 2
    os.rename(mount_dir / "a", mount_dir / "c")
    with open(mount_dir / "c", "ab") as f:
        f.write(b"!")
    assert (mount_dir / "b").read_bytes().endswith(b"tail!")


def test_restore_brings_back_links(fresh_mount: Mount) -> None:
    """gridfs restore of a directory whose linked files are gone since:
    the records come back with it; of one linked file: a file of its own.
    gridfs mkdir/cp/mv/rm of the records directory are refused."""
    mp, node = fresh_mount.mountpoint, ("--node", fresh_mount.node)
    (mp / "d").mkdir()
    (mp / "d" / "a").write_bytes(b"linked")
    os.link(mp / "d" / "a", mp / "d" / "b")
    fresh_mount.flush()
    subprocess.run(["rm", "-r", str(mp / "d")], check=True)
    fresh_mount.flush()
    versions = sorted(os.listdir(mp / ".snapshots"))
    at = next(v for v in reversed(versions) if (mp / ".snapshots" / v / "d" / "b").exists())
    gridfs("restore", "grid:/d", "--at", at, *node)
    gridfs("restore", "grid:/d/a", "--at", at, "--to", "grid:/single", *node)
    fresh_mount.flush()
    wait_for(lambda: (mp / "d" / "b").exists() and (mp / "single").exists(), what="restores")
    a, b = os.stat(mp / "d" / "a"), os.stat(mp / "d" / "b")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert (mp / "d" / "b").read_bytes() == b"linked"
    assert os.stat(mp / "single").st_nlink == 1
    for args in (["mkdir", "grid:/.gridfs-links/x"], ["rm", "-r", "grid:/.gridfs-links"]):
        proc = gridfs(*args, *node, check=False)
        assert proc.returncode == 2 and "reserved for the tree's hard links" in proc.stderr


def test_tree_commands_mv_over_a_link_and_cp_of_a_directory(
    mount_node: Path, tmp_path: Path
) -> None:
    """gridfs mv over a name of a linked file lowers its count; gridfs cp -r
    of a directory holding links within the tree keeps them links (one
    more name each), so removing the original leaves the copy whole."""
    with mounted(mount_node, tmp_path / "mnt") as m:
        top = m.mountpoint
        (top / "d").mkdir()
        (top / "d" / "a").write_bytes(b"shared")
        os.link(top / "d" / "a", top / "d" / "b")
        os.link(top / "d" / "a", top / "c")
        (top / "x").write_bytes(b"other")
    node = ("--node", mount_node)
    gridfs("mv", "grid:/x", "grid:/c", *node)
    gridfs("cp", "-r", "grid:/d", "grid:/e", *node)
    gridfs("rm", "-r", "grid:/d", *node)
    with mounted(mount_node, tmp_path / "mnt") as m:
        top = m.mountpoint
        assert sorted(os.listdir(top)) == ["c", "e"]
        assert (top / "c").read_bytes() == b"other" and os.stat(top / "c").st_nlink == 1
        a, b = os.stat(top / "e" / "a"), os.stat(top / "e" / "b")
        assert a.st_ino == b.st_ino and a.st_nlink == 2
        assert (top / "e" / "b").read_bytes() == b"shared"


def test_cp_into_the_grid_keeps_hard_links(mount_node: Path, tmp_path: Path) -> None:
    """gridfs cp -r of a local tree: names of one local file become links
    of one record (its content uploaded once); a file whose other name is
    outside the tree is a file of its own."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    big = os.urandom(100_000)
    (src / "big").write_bytes(big)
    os.link(src / "big", src / "sub" / "big2")
    (src / "small").write_bytes(b"small")
    os.link(src / "small", src / "sub" / "small2")
    os.link(src / "small", src / "sub" / "small3")
    (tmp_path / "outside").write_bytes(b"half in")
    os.link(tmp_path / "outside", src / "half")
    gridfs("cp", "-r", src, "grid:/in", "--node", mount_node)
    with mounted(mount_node, tmp_path / "mnt") as m:
        top = m.mountpoint / "in"
        assert os.stat(top / "big").st_ino == os.stat(top / "sub" / "big2").st_ino
        assert os.stat(top / "sub" / "big2").st_nlink == 2
        assert (top / "sub" / "big2").read_bytes() == big
        assert os.stat(top / "sub" / "small3").st_nlink == 3
        assert (top / "sub" / "small2").read_bytes() == b"small"
        assert os.stat(top / "half").st_nlink == 1
        (top / "small").write_bytes(b"through one name")
        assert (top / "sub" / "small3").read_bytes() == b"through one name"
