"""What a mount keeps: across remounts, kill -9, -o sync, dead servers, other writers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gridfs_daemon.staging import _base_of

from gridfs.caps import b32encode, parse_read_cap
from gridfs.dirnode import Entry

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import (  # noqa: E402
    GRIDFS,
    Grid,
    Mount,
    gridfs,
    is_mounted,
    mounted,
    outside,
    pid_alive,
    run,
    wait_dead,
    wait_for,
)

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def populate(root: Path) -> dict[str, bytes]:
    """Files of every size class, in nested directories; their contents by path."""
    files = {
        "empty": b"",
        "tiny": b"x",
        "inline.txt": os.urandom(10_000),
        "a/b/c/deep": os.urandom(30_000),
        "a/big": os.urandom(2_500_000),
        "a/b/other": b"other",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink("a/big", root / "link")
    (root / "emptydir").mkdir()
    os.chmod(root / "a" / "b" / "other", 0o600)
    os.utime(root / "tiny", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    return files


def check(root: Path, files: dict[str, bytes], extra: tuple[str, ...] = ()) -> None:
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel
    assert os.readlink(root / "link") == "a/big"
    assert os.listdir(root / "emptydir") == []
    assert (root / "a" / "b" / "other").stat().st_mode & 0o777 == 0o600
    assert (root / "tiny").stat().st_mtime_ns == 1_500_000_000_000_000_000
    names = ["a", "empty", "emptydir", "inline.txt", "link", "tiny", *extra]
    assert sorted(os.listdir(root)) == sorted(names)


def listing(root: Path) -> list[tuple[str, int, int]]:
    """Names, modes and sizes (of files; a directory's size means nothing)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = os.lstat(p)
            size = 0 if os.path.isdir(p) and not os.path.islink(p) else st.st_size
            out.append((str(p.relative_to(root)), st.st_mode, size))
    return sorted(out)


def test_remount_shows_everything(fresh_mount: Mount) -> None:
    files = populate(fresh_mount.mountpoint)
    before = listing(fresh_mount.mountpoint)
    fresh_mount.remount()  # unmounting drains the queue
    assert fresh_mount.queue_length() == 0, fresh_mount.log()
    assert listing(fresh_mount.mountpoint) == before
    check(fresh_mount.mountpoint, files)


def test_kill9_after_fsync_then_remount(fresh_mount: Mount) -> None:
    mp = fresh_mount.mountpoint
    (mp / "dir").mkdir()
    data = {"dir/big": os.urandom(3_000_000), "dir/small": b"small and synced", "top": b"t"}
    for rel, content in data.items():
        fd = os.open(mp / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
    dfd = os.open(mp / "dir", os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    fresh_mount.kill9()  # at once: the uploads have not finished
    assert fresh_mount.queue_length() > 0
    fresh_mount.mount()  # resumes the queue
    for rel, content in data.items():
        assert (mp / rel).read_bytes() == content, rel
    assert sorted(os.listdir(mp)) == ["dir", "top"]
    wait_for(lambda: fresh_mount.queue_length() == 0, timeout=60, what="the queue to drain")
    assert "queue: 0 pending steps" in fresh_mount.status()
    fresh_mount.remount()
    for rel, content in data.items():
        assert (mp / rel).read_bytes() == content, rel


AFTER_THE_GRID = {"unlink_commit", "delete_box", "delete_tempfile"}
"""Queue steps an fsync under -o sync leaves to the background flush."""


def test_sync_option_fsync_waits_for_the_grid(
    mount_grid: Grid, mount_node: Path, tmp_path: Path
) -> None:
    with mounted(mount_node, tmp_path / "mnt", "sync,refresh=1") as m:
        big = os.urandom(2_000_000)
        with open(m.mountpoint / "f", "wb") as f:
            f.write(big)
            f.flush()
            os.fsync(f.fileno())
            # still open, and already on the grid: nothing but the giving up
            # of old leases and the local clean-up (left to the background
            # flush) is queued, and another client reads it
            assert m.pending_kinds() <= AFTER_THE_GRID
            assert outside(mount_grid, mount_node, "cat", "t:/f") == big
        (m.mountpoint / "d").mkdir()
        with open(m.mountpoint / "d" / "small", "wb") as f:
            f.write(b"small")
            os.fsync(f.fileno())
            assert m.pending_kinds() <= AFTER_THE_GRID
            assert outside(mount_grid, mount_node, "ls", "t:/d").split() == [b"small"]


def test_reads_survive_two_dead_servers(mount_grid: Grid, fresh_mount: Mount) -> None:
    files = populate(fresh_mount.mountpoint)
    fresh_mount.flush()
    assert len(mount_grid.storage_pids()) == 5
    try:
        mount_grid.kill_servers(4, 5)
        assert len(mount_grid.storage_pids()) == 3
        shutil.rmtree(fresh_mount.node / "cache", ignore_errors=True)
        fresh_mount.remount()  # an empty cache: every byte comes from the 3 servers left
        check(fresh_mount.mountpoint, files)
        # and writing still works (happy = 3)
        more = os.urandom(1_500_000)
        (fresh_mount.mountpoint / "written-while-degraded").write_bytes(more)
        fresh_mount.flush()
        fresh_mount.remount()
        assert (fresh_mount.mountpoint / "written-while-degraded").read_bytes() == more
    finally:
        mount_grid.start()  # restarts the two dead servers on their old directories
    assert len(mount_grid.storage_pids()) == 5
    check(fresh_mount.mountpoint, files, extra=("written-while-degraded",))


def test_busy_mount_while_servers_die(mount_grid: Grid, fresh_mount: Mount) -> None:
    """Servers die while the mount is reading and writing."""
    mp = fresh_mount.mountpoint
    old = os.urandom(4_000_000)
    (mp / "old").write_bytes(old)
    fresh_mount.flush()
    fresh_mount.remount()
    try:
        with open(mp / "old", "rb") as f:
            first = f.read(1_000_000)
            mount_grid.kill_servers(1, 2)
            rest = f.read()
        assert first + rest == old
        new = os.urandom(2_000_000)
        (mp / "new").write_bytes(new)
        fresh_mount.flush()
        assert (mp / "new").read_bytes() == new
    finally:
        mount_grid.start()
    assert len(mount_grid.storage_pids()) == 5


def test_another_writers_changes_show_up(mount_grid: Grid, fresh_mount: Mount) -> None:
    mp = fresh_mount.mountpoint
    (mp / "d").mkdir()
    (mp / "d" / "mine").write_bytes(b"mine")
    fresh_mount.flush()
    local = fresh_mount.node.parent / "theirs.txt"
    local.write_bytes(b"written by another client")
    outside(mount_grid, fresh_mount.node, "cp", str(local), "t:/d/theirs")
    wait_for(
        lambda: sorted(os.listdir(mp / "d")) == ["mine", "theirs"],
        timeout=15,
        what="the other client's file in the mount (refresh=1)",
    )
    assert (mp / "d" / "theirs").read_bytes() == b"written by another client"


def test_an_open_after_another_writers_change_sees_it_while_the_file_is_held(
    mount_grid: Grid, fresh_mount: Mount
) -> None:
    """Close-to-open, as on NFS: a handle kept open (a file manager, a
    viewer) must not pin the version that later opens read, nor its reader."""
    mp = fresh_mount.mountpoint
    old, new = os.urandom(2_500_000), os.urandom(3_100_000)
    (mp / "f").write_bytes(old)
    fresh_mount.flush()
    fresh_mount.remount()  # read from the grid, not from the local upload
    with open(mp / "f", "rb") as held:
        assert held.read(100_000) == old[:100_000]  # a reader of the old version
        _replaced_by_another_writer(mount_grid, fresh_mount, "f", new)


def test_an_open_after_another_writers_change_lets_our_queued_copy_go(
    mount_grid: Grid, fresh_mount: Mount
) -> None:
    """A handle opened while our version was still queued holds the queue's
    copy of its bytes: once another writer's version shows up, an open must
    read theirs, not that copy."""
    mp = fresh_mount.mountpoint
    old, new = os.urandom(2_500_000), os.urandom(3_100_000)
    servers = mount_grid.storage_pids()
    for pid in servers.values():  # our version stays queued while it is opened
        os.kill(pid, signal.SIGSTOP)
    try:
        (mp / "f").write_bytes(old)
        held = open(mp / "f", "rb")  # noqa: SIM115 (held across the steps below)
        assert held.read(1000) == old[:1000]
    finally:
        for pid in servers.values():
            os.kill(pid, signal.SIGCONT)
    with held:
        fresh_mount.flush()
        _replaced_by_another_writer(mount_grid, fresh_mount, "f", new)


def _replaced_by_another_writer(grid: Grid, mount: Mount, name: str, new: bytes) -> None:
    """Another client puts ``new`` at ``name``; once the mount shows it
    (refresh=1), an open there reads it."""
    local = mount.node.parent / "new.bin"
    local.write_bytes(new)
    outside(grid, mount.node, "cp", str(local), f"t:/{name}")
    wait_for(
        lambda: (mount.mountpoint / name).stat().st_size == len(new),
        timeout=15,
        what="the other client's version in the mount (refresh=1)",
    )
    assert (mount.mountpoint / name).read_bytes() == new


def test_a_change_names_the_version_it_started_from_only_where_it_can() -> None:
    """tree.Put's base: a real cap; not a directory's, a queued version's or
    a small inline file's (its commit may give it a cap, and its own next
    change would then look like another writer's: a spurious conflict)."""
    chk = "gridfs:chk:" + "a" * 52 + ":" + "b" * 52 + ":3:10:5000000"
    assert _base_of(Entry("file", chk, 5_000_000)) == chk
    assert _base_of(Entry("file", "", 3, data=b"abc")) is None
    assert _base_of(Entry("file", "local:box:tmp", 9)) is None
    assert _base_of(Entry("dir", "gridfs:lit:aa")) is None


def test_a_file_written_here_and_by_another_writer_keeps_both(
    mount_grid: Grid, fresh_mount: Mount
) -> None:
    """Another client replaces a file while this mount has it open and is
    writing it: the later commit (ours) wins the name, and their version,
    acknowledged to them, is kept beside it instead of being lost."""
    mp = fresh_mount.mountpoint
    (mp / "f").write_bytes(os.urandom(100_000))
    fresh_mount.flush()
    ours, theirs = os.urandom(200_000), os.urandom(150_000)
    (fresh_mount.node.parent / "ours.bin").write_bytes(ours)
    (fresh_mount.node.parent / "theirs.bin").write_bytes(theirs)
    # The writer is a process of its own: a process this test starts while
    # holding the file open would close its copy, and a close commits.
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLDING_WRITER,
            str(mp / "f"),
            str(fresh_mount.node.parent / "ours.bin"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert writer.stdout is not None and writer.stdout.readline() == b"written\n"
    theirs_path = str(fresh_mount.node.parent / "theirs.bin")
    outside(mount_grid, fresh_mount.node, "cp", theirs_path, "t:/f")
    outside(mount_grid, fresh_mount.node, "cp", theirs_path, "t:/marker")
    wait_for(
        lambda: "marker" in os.listdir(mp),
        timeout=15,
        what="the other client's changes in the mount (refresh=1)",
    )
    writer.communicate(b"close\n", timeout=30)
    assert writer.returncode == 0
    names = sorted(os.listdir(mp))
    assert names[0] == "f" and names[1].startswith("f.conflict-") and names[2] == "marker", names
    assert (mp / "f").read_bytes() == ours
    assert (mp / names[1]).read_bytes() == theirs
    fresh_mount.flush()
    assert outside(mount_grid, fresh_mount.node, "cat", "t:/f") == ours
    assert outside(mount_grid, fresh_mount.node, "cat", f"t:/{names[1]}") == theirs


HOLDING_WRITER = """
import sys
with open(sys.argv[1], "r+b") as f, open(sys.argv[2], "rb") as source:
    f.write(source.read())
    f.flush()
    print("written", flush=True)
    sys.stdin.readline()
"""


def test_chmod_of_a_file_another_writer_replaced_keeps_their_version(
    mount_grid: Grid, mount_node: Path, tmp_path: Path
) -> None:
    """An attribute change puts the whole entry as the mount saw it; when
    another writer has replaced the file since, theirs must not be lost."""
    with mounted(mount_node, tmp_path / "mnt", "refresh=1000") as m:
        ours, theirs = os.urandom(50_000), os.urandom(60_000)
        (m.mountpoint / "f").write_bytes(ours)
        m.flush()
        local = tmp_path / "theirs.bin"
        local.write_bytes(theirs)
        outside(mount_grid, mount_node, "cp", str(local), "t:/f")
        os.chmod(m.mountpoint / "f", 0o600)  # the view still shows ours
        m.flush()
        names = outside(mount_grid, mount_node, "ls", "t:/").decode().split()
        assert names[0] == "f" and names[1].startswith("f.conflict-") and len(names) == 2, names
        assert outside(mount_grid, mount_node, "cat", "t:/f") == ours
        assert outside(mount_grid, mount_node, "cat", f"t:/{names[1]}") == theirs


def test_a_root_another_writer_gave_up_is_left_for_the_new_one(
    mount_grid: Grid, mount_node: Path, tmp_path: Path
) -> None:
    """The view is built on another writer's root, whose directories only
    that writer holds; its next change gives them up (the servers delete
    them) before the view has read them: listing rebuilds on the new root
    instead of failing with EIO until the next refresh.  (That writer keeps
    no snapshots: with them, the old root would stay readable.)"""
    config = mount_grid.reader() / "gridfs.toml"
    text = config.read_text()
    config.write_text(
        text.replace("snapshot_retention = 2592000.0", "snapshot_retention = 0.0").replace(
            "snapshot_keep = 10", "snapshot_keep = 1"
        )
    )
    try:
        with mounted(mount_node, tmp_path / "mnt", "refresh=1000") as m:
            (m.mountpoint / "mine").write_bytes(b"mine")
            m.flush()
            local = tmp_path / "theirs.txt"
            local.write_bytes(b"theirs")
            outside(mount_grid, mount_node, "cp", str(local), "t:/a")
            m.flush()  # the view is now built on their root, not yet read
            outside(mount_grid, mount_node, "cp", str(local), "t:/b")  # gives that root up
            assert sorted(os.listdir(m.mountpoint)) == ["a", "b", "mine"]
            assert "view rebuilt on the new one" in m.log()
    finally:
        config.write_text(text)


def test_directory_attributes_keep_another_writers_files(
    mount_grid: Grid, mount_node: Path, tmp_path: Path
) -> None:
    """chmod/utime/xattr of a directory must not put back the directory's
    contents as this mount last saw them."""
    with mounted(mount_node, tmp_path / "mnt", "refresh=1000") as m:
        d = m.mountpoint / "d"
        d.mkdir()
        (d / "mine").write_bytes(b"mine")
        m.flush()
        local = tmp_path / "theirs.txt"
        local.write_bytes(b"theirs")
        outside(mount_grid, mount_node, "cp", str(local), "t:/d/theirs")
        os.chmod(d, 0o700)
        os.utime(d, ns=(1_000_000_000, 2_000_000_000))
        os.setxattr(d, "user.tag", b"x")
        m.flush()
        names = outside(mount_grid, mount_node, "ls", "-l", "t:/d").decode()
        assert sorted(line.split()[-1] for line in names.splitlines()) == ["mine", "theirs"]
        assert sorted(os.listdir(d)) == ["mine", "theirs"]
        assert d.stat().st_mode & 0o777 == 0o700
        assert d.stat().st_mtime_ns == 2_000_000_000
        assert os.getxattr(d, "user.tag") == b"x"


def test_chmod_of_a_renamed_directory(mount_grid: Grid, fresh_mount: Mount) -> None:
    """A directory renamed with changes inside it not yet uploaded takes chmod
    and utime at once (no EAGAIN), and all of it reaches the grid."""
    mp = fresh_mount.mountpoint
    servers = mount_grid.storage_pids()
    for pid in servers.values():  # nothing is uploaded meanwhile
        os.kill(pid, signal.SIGSTOP)
    try:
        (mp / "src").mkdir()
        for i in range(40):
            (mp / "src" / f"f{i:02d}").write_bytes(os.urandom(2000))
        os.rename(mp / "src", mp / "dst")
        os.chmod(mp / "dst", 0o750)
        os.utime(mp / "dst", ns=(3_000_000_000, 4_000_000_000))
    finally:
        for pid in servers.values():
            os.kill(pid, signal.SIGCONT)
    fresh_mount.remount()
    assert len(os.listdir(mp / "dst")) == 40
    assert (mp / "dst").stat().st_mode & 0o777 == 0o750
    assert (mp / "dst").stat().st_mtime_ns == 4_000_000_000
    assert not (mp / "src").exists()


def test_identical_files_upload_together(mount_grid: Grid, fresh_mount: Mount) -> None:
    """Copies of one file queued together share one convergent storage index:
    their uploads run at once and must not count each other as refusals."""
    data = os.urandom(200_000)
    servers = mount_grid.storage_pids()
    for pid in servers.values():  # the uploads start together when the grid wakes up
        os.kill(pid, signal.SIGSTOP)
    try:
        for i in range(4):  # cp x y; cp x z; ...: the same convergent storage index
            (fresh_mount.mountpoint / f"copy{i}").write_bytes(data)
        time.sleep(1)
    finally:
        for pid in servers.values():
            os.kill(pid, signal.SIGCONT)
    flushed = gridfs("queue", "flush", "--node", fresh_mount.node, check=False)
    assert "upload failed" not in fresh_mount.log()
    assert flushed.returncode == 0, flushed.stderr


def test_mount_helper(mount_node: Path, tmp_path: Path) -> None:
    helper = Path("/sbin/mount.gridfs")
    first = gridfs("install-mount-helper", "--path", helper).stdout
    assert re.search(r"(installed|is up to date)", first), first
    second = gridfs("install-mount-helper", "--path", helper).stdout
    assert "up to date" in second
    assert os.access(helper, os.X_OK)
    mp = tmp_path / "viahelper"
    mp.mkdir()
    m = Mount(mp, mount_node)
    try:
        run(["mount", "-t", "gridfs", "grid", str(mp), "-o", f"node={mount_node},refresh=2"])
        assert is_mounted(mp)
        status = gridfs("status", "--node", mount_node).stdout
        pid = re.search(r"pid (\d+)", status)
        assert pid, status
        m.adopt(int(pid.group(1)))
        assert str(mp) in status
        (mp / "hello").write_bytes(b"via mount -t gridfs")
        assert (mp / "hello").read_bytes() == b"via mount -t gridfs"
        run(["umount", str(mp)])
        assert not is_mounted(mp)
        assert wait_dead(int(pid.group(1)), 60)
    finally:
        m.unmount()
    with mounted(mount_node, mp) as again:
        assert (again.mountpoint / "hello").read_bytes() == b"via mount -t gridfs"


def test_second_mount_of_the_same_tree_is_refused(fresh_mount: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    proc = subprocess.run(
        [GRIDFS, "mount", str(other), "--node", str(fresh_mount.node)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert proc.returncode != 0
        assert "mounted elsewhere" in proc.stderr + proc.stdout
        assert not is_mounted(other)
    finally:
        if is_mounted(other):
            subprocess.run(["fusermount3", "-u", "-z", str(other)], timeout=30)
    assert fresh_mount.pid is not None and pid_alive(fresh_mount.pid)
    (fresh_mount.mountpoint / "still").write_bytes(b"fine")
    assert (fresh_mount.mountpoint / "still").read_bytes() == b"fine"


def expire_snapshots(node: Path) -> None:
    """Let every old root version of the node's trees go (docs/formats.md §14.4)."""
    config = node / "gridfs.toml"
    config.write_text(
        config.read_text()
        .replace("snapshot_retention = 2592000.0", "snapshot_retention = 0.0")
        .replace("snapshot_keep = 10", "snapshot_keep = 1")
    )
    gridfs("snapshots", "grid:", "--prune", "--node", node)


def share_sizes(grid: Grid) -> dict[str, int]:
    """Storage index directory → total bytes of its shares, over every server."""
    out: dict[str, int] = {}
    for d in grid.dir.glob("storage-*/storage/shares/*/*"):
        out[d.name] = out.get(d.name, 0) + sum(p.stat().st_size for p in d.iterdir())
    return out


def test_rm_through_the_mount_frees_the_shares(mount_grid: Grid, fresh_mount: Mount) -> None:
    mp = fresh_mount.mountpoint
    before = share_sizes(mount_grid)
    (mp / "doomed.bin").write_bytes(os.urandom(600_000))
    (mp / "kept.bin").write_bytes(os.urandom(600_000))
    fresh_mount.flush()
    big = {si for si, size in share_sizes(mount_grid).items() if si not in before and size > 1e6}
    assert len(big) == 2, big  # the two files (directories are small)
    os.unlink(mp / "doomed.bin")
    fresh_mount.flush()  # runs the unlink step too
    assert not big - set(share_sizes(mount_grid))  # kept for the tree's snapshots...
    expire_snapshots(fresh_mount.node)  # ...until they expire
    after = share_sizes(mount_grid)
    assert len(big - set(after)) == 1  # one file's shares are gone from every server...
    assert (mp / "kept.bin").stat().st_size == 600_000  # ...the other's stay
    fresh_mount.remount()
    assert sorted(os.listdir(mp)) == ["kept.bin"]
    assert len((mp / "kept.bin").read_bytes()) == 600_000


def test_the_mount_renews_the_nodes_leases(mount_grid: Grid, fresh_mount: Mount) -> None:
    (fresh_mount.mountpoint / "f").write_bytes(os.urandom(100_000))
    fresh_mount.flush()
    # A node with no maintenance record renews (and checks) as soon as it mounts.
    wait_for(
        lambda: "leases renewed" in gridfs("status", "--node", fresh_mount.node).stdout,
        timeout=60,
        what="a lease renewal",
    )
    record = json.loads((fresh_mount.node / "maintenance.json").read_text())
    assert record["renew"]["servers"] == len(mount_grid.storage_pids())
    assert record["renew"]["leases"] > 0 and record["renew"]["unheld"] == 0


def test_read_segments_are_cached_on_disk_across_remounts(
    mount_grid: Grid, fresh_mount: Mount
) -> None:
    mp = fresh_mount.mountpoint
    before = share_sizes(mount_grid)
    data = os.urandom(3_000_000)  # a chunked file: a manifest and chunks
    (mp / "cached.bin").write_bytes(data)
    fresh_mount.flush()
    cap = parse_read_cap(os.getxattr(mp / "cached.bin", "user.gridfs.cap").decode())
    chunks = [s for s, size in share_sizes(mount_grid).items() if s not in before and size > 1e5]
    sis = [*chunks, b32encode(cap.storage_index)]  # type: ignore[union-attr]
    fresh_mount.remount()
    assert (mp / "cached.bin").read_bytes() == data  # fetched from the grid, and cached
    cache = fresh_mount.node / "cache" / "segments"

    def cached() -> int:  # (written behind the read, in a thread)
        return sum(p.stat().st_size for p in cache.iterdir() if not p.name.endswith(".tmp"))

    wait_for(lambda: cached() >= len(data), timeout=10, what="the segments on disk")
    assert cached() >= len(data)
    fresh_mount.remount()
    for si in sis:
        for d in mount_grid.dir.glob(f"storage-*/storage/shares/*/{si}"):
            shutil.rmtree(d)  # the file is gone from the grid: only the cache can answer
    assert (mp / "cached.bin").read_bytes() == data


def test_small_files_over_the_directory_budget_share_a_pack(
    mount_grid: Grid, fresh_mount: Mount
) -> None:
    """300 files of 12 KiB: the directory keeps 1 MiB of them inside itself,
    the rest go to the grid together in one pack (not one upload each); the
    pack lives while any of its files does."""
    mp = fresh_mount.mountpoint
    (mp / "many").mkdir()
    fresh_mount.flush()
    before = share_sizes(mount_grid)
    files = {f"f{i:03}": os.urandom(12 * 1024) for i in range(300)}
    for name, data in files.items():
        (mp / "many" / name).write_bytes(data)
    fresh_mount.flush()
    new = {si: size for si, size in share_sizes(mount_grid).items() if si not in before}
    # The pack (215 files, more bytes than them), the directory (1 MiB of
    # inline files, 3-of-5: its shares hold less), the root; no file alone.
    packs = {si for si, size in new.items() if size > 215 * 12 * 1024}
    assert len(packs) == 1 and len(new) <= 3, new
    fresh_mount.remount()  # nothing in memory: every read goes to the grid
    for name, data in files.items():
        assert (mp / "many" / name).read_bytes() == data, name
    packed = sorted(files)[-50:]  # (inline files are kept in name order, the rest packed)
    for name in sorted(files):
        if name not in packed[:3]:
            os.unlink(mp / "many" / name)
    fresh_mount.flush()
    assert packs <= set(share_sizes(mount_grid))  # three of its files are left
    for name in packed[:3]:
        assert (mp / "many" / name).read_bytes() == files[name]
    for name in packed[:3]:
        os.unlink(mp / "many" / name)
    fresh_mount.flush()
    assert packs <= set(share_sizes(mount_grid))  # the last one gone: kept for snapshots...
    expire_snapshots(fresh_mount.node)
    assert not packs & set(share_sizes(mount_grid))  # ...then the pack goes too


def test_files_written_through_the_mount_keep_their_convergent_key(
    mount_grid: Grid, fresh_mount: Mount, tmp_path: Path
) -> None:
    """The mount hashes a file as it is written in order (its upload skips a
    pass over it); whether it was written in order or not, the key is the one
    ``gridfs put`` derives from the same bytes: the same shares."""
    in_order, backwards = os.urandom(3 * 2**20 + 5), os.urandom(2**20 + 7)
    with open(fresh_mount.mountpoint / "in-order", "wb") as f:
        for off in range(0, len(in_order), 65536):
            f.write(in_order[off : off + 65536])
    fd = os.open(fresh_mount.mountpoint / "backwards", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for off in reversed(range(0, len(backwards), 65536)):
            os.pwrite(fd, backwards[off : off + 65536], off)
    finally:
        os.close(fd)
    gridfs("queue", "flush", "--node", fresh_mount.node)
    stored = share_sizes(mount_grid)
    for name, data in (("in-order", in_order), ("backwards", backwards)):
        assert (fresh_mount.mountpoint / name).read_bytes() == data
        (tmp_path / name).write_bytes(data)
        cap = parse_read_cap(gridfs("put", tmp_path / name, "--node", fresh_mount.node).stdout)
        assert b32encode(cap.storage_index) in stored, name
