"""POSIX behaviour of a mounted tree, through the kernel (FUSE), one syscall at a time."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.mountutil")
from .helpers import mapped_resident_pages  # noqa: E402
from .mountutil import Grid, Mount, mounted, outside, wait_for  # noqa: E402

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
MIB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(src: Path, dst: Path, flags: int) -> None:
    AT_FDCWD = -100
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(src))


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as info:
        fn(*args)
    return info.value.errno


# -- files --------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 5000, 16 * 1024 + 1, 2_500_000])
def test_write_and_read_back(mount_dir: Path, size: int) -> None:
    data = os.urandom(size)
    f = mount_dir / "f.bin"
    f.write_bytes(data)
    assert f.stat().st_size == size
    assert f.read_bytes() == data
    assert os.listdir(mount_dir) == ["f.bin"]


def test_two_handles_see_each_others_writes(mount_dir: Path) -> None:
    f = mount_dir / "shared"
    with open(f, "wb", buffering=0) as w, open(f, "rb", buffering=0) as r:
        w.write(b"hello")
        assert r.read() == b"hello"
        w.write(b" world")
        assert os.pread(r.fileno(), 100, 0) == b"hello world"
        assert os.fstat(r.fileno()).st_size == 11


def test_a_write_only_handle_bypasses_the_page_cache(mount_dir: Path) -> None:
    """dd of=FILE and the like write through handles nothing can read or map:
    their bytes go straight to staging (direct_io) instead of filling
    page-cache pages first, and readers still see them at once."""
    path = mount_dir / "direct"
    path.write_bytes(b"A" * MIB)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), MIB) as mapping:
        assert mapping[:] == b"A" * MIB  # cached now
        assert mapped_resident_pages(mapping) == MIB // mmap.PAGESIZE
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"B" * MIB, 0)
        finally:
            os.close(fd)
        assert mapped_resident_pages(mapping) == 0  # the write went around the cache
        assert mapping[:] == b"B" * MIB and os.pread(f.fileno(), 4, 0) == b"BBBB"


def test_append(mount_dir: Path) -> None:
    f = mount_dir / "log"
    for i in range(3):
        with open(f, "ab") as out:
            out.write(f"line {i}\n".encode())
    assert f.read_bytes() == b"line 0\nline 1\nline 2\n"
    # O_APPEND writes go to the end even after seeking to the start
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"tail\n")
    finally:
        os.close(fd)
    assert f.read_bytes() == b"line 0\nline 1\nline 2\ntail\n"


@pytest.mark.parametrize("size", [1000, 3_000_000])
def test_overwrite_in_the_middle(mount_dir: Path, shared_mount: Mount, size: int) -> None:
    data = bytearray(os.urandom(size))
    f = mount_dir / "f"
    f.write_bytes(data)
    if size > 1 << 20:
        shared_mount.flush()  # now the bytes come from the grid, not the staging file
    mid = size // 2
    with open(f, "r+b") as g:
        g.seek(mid)
        g.write(b"XYZ" * 10)
    data[mid : mid + 30] = b"XYZ" * 10
    assert f.stat().st_size == size
    assert f.read_bytes() == bytes(data)


def test_open_trunc_and_exclusive_create(mount_dir: Path) -> None:
    f = mount_dir / "f"
    f.write_bytes(b"a" * 100)
    with open(f, "wb") as g:
        g.write(b"b")
    assert f.read_bytes() == b"b"
    assert errno_of(os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST


def test_truncate_up_and_down(mount_dir: Path, shared_mount: Mount) -> None:
    f = mount_dir / "f"
    f.write_bytes(b"0123456789")
    os.truncate(f, 4)
    assert f.stat().st_size == 4
    assert f.read_bytes() == b"0123"
    os.truncate(f, 20)
    assert f.read_bytes() == b"0123" + b"\0" * 16
    with open(f, "r+b") as g:
        g.truncate(2)
        g.seek(0, os.SEEK_END)
        g.write(b"!")
    assert f.read_bytes() == b"01!"
    os.truncate(f, 0)
    assert f.stat().st_size == 0
    assert f.read_bytes() == b""
    # a large file from the grid, shortened and lengthened
    big = os.urandom(2_200_000)
    f.write_bytes(big)
    shared_mount.flush()
    os.truncate(f, 1_500_000)
    assert f.read_bytes() == big[:1_500_000]
    os.truncate(f, 1_600_000)
    assert f.read_bytes() == big[:1_500_000] + b"\0" * 100_000


def test_small_files_grow_and_shrink_across_the_inline_limit(
    mount_dir: Path, shared_mount: Mount
) -> None:
    """Files of at most 16 KiB are written in memory (no staging file); one
    that grows past that moves to a staging file, and back into its
    directory when it shrinks again."""
    limit = 16 * 1024
    f = mount_dir / "f"
    with open(f, "w+b", buffering=0) as g:
        g.write(b"a" * 100)
        os.pwrite(g.fileno(), b"b", 1000)  # a hole in the buffer
        assert os.pread(g.fileno(), 2000, 0) == b"a" * 100 + b"\0" * 900 + b"b"
        os.pwrite(g.fileno(), b"c" * 10, limit - 5)  # past the limit: staged to a file
        assert os.fstat(g.fileno()).st_size == limit + 5
        g.truncate(50)
        assert os.pread(g.fileno(), 100, 0) == b"a" * 50
        g.truncate(limit + 1)
        os.fsync(g.fileno())
        assert f.stat().st_size == limit + 1
    assert f.read_bytes() == b"a" * 50 + b"\0" * (limit + 1 - 50)
    os.truncate(f, 3)
    assert f.read_bytes() == b"aaa"
    with open(f, "r+b") as g:  # small again: written in memory, keeping the bytes
        g.seek(1)
        g.write(b"XY")
    assert f.read_bytes() == b"aXY"
    # small files that did not fit their directory have caps of their own
    d = mount_dir / "full"
    d.mkdir()
    blobs = {f"b{i:02d}": os.urandom(15 * 1024) for i in range(80)}
    for name, data in blobs.items():
        (d / name).write_bytes(data)
    shared_mount.flush()
    for name, data in blobs.items():
        with open(d / name, "r+b") as g:
            g.seek(10)
            g.write(b"!")
        assert (d / name).read_bytes() == data[:10] + b"!" + data[11:], name
    assert f.read_bytes() == b"aXY"
    # once closed, nothing is left in the mount's staging directory
    staging = list(shared_mount.node.glob("queues/*/staging/*"))
    assert staging == []


def test_chmod_utime_chown(mount_dir: Path) -> None:
    f = mount_dir / "f"
    f.write_bytes(b"x")
    os.chmod(f, 0o640)
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert stat.S_ISREG(f.stat().st_mode)
    os.utime(f, ns=(1_000_000_000_000_000_000, 1_234_567_890_123_456_789))
    assert f.stat().st_mtime_ns == 1_234_567_890_123_456_789
    d = mount_dir / "d"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o700)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_ISDIR(d.stat().st_mode)
    # root (mounting as root) may give a file away, and the owner is kept
    # (the single-user rules of a user's own mount: test_a_users_own_mount...)
    os.chown(f, os.getuid(), os.getgid())
    assert f.stat().st_uid == os.getuid()
    os.chown(f, 1234, 5678)
    assert (f.stat().st_uid, f.stat().st_gid) == (1234, 5678)
    # the attributes stay with the content
    assert f.read_bytes() == b"x"
    assert stat.S_IMODE(f.stat().st_mode) == 0o640


def test_utime_of_an_open_file_survives_close(mount_dir: Path) -> None:
    """tar and cp -p set the times with futimens before close(); the close
    (which hands the file to the queue) must not stamp it with the time."""
    f = mount_dir / "f"
    with open(f, "wb") as g:
        g.write(b"data" * 5000)
        g.flush()
        os.utime(g.fileno(), ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    time.sleep(1.2)  # past the kernel's attribute cache
    assert f.stat().st_mtime_ns == 1_600_000_000_000_000_000
    with open(f, "ab") as g:  # a later write moves it again
        g.write(b"more")
    time.sleep(1.2)
    assert f.stat().st_mtime_ns > 1_600_000_000_000_000_000
    assert f.read_bytes() == b"data" * 5000 + b"more"


def test_a_directorys_times_follow_its_names(mount_dir: Path, shared_mount: Mount) -> None:
    """create, unlink, mkdir, rmdir and rename change the directory's mtime
    and ctime (file managers, make and backup tools look at them); writing
    or chmod of a file in it does not; and the grid keeps what was shown."""
    old = 1_500_000_000_000_000_000
    d, e = mount_dir / "d", mount_dir / "e"
    d.mkdir()
    e.mkdir()

    def times(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_mtime_ns, st.st_ctime_ns

    def changed_by(action, *dirs: Path) -> None:  # type: ignore[no-untyped-def]
        for x in dirs:
            os.utime(x, ns=(old, old))
            assert times(x)[0] == old
        before = time.time_ns()
        action()
        for x in dirs:
            mtime, ctime = times(x)
            assert before <= mtime == ctime <= time.time_ns(), (action, x)

    changed_by(lambda: (d / "f").write_bytes(b"x"), d)
    changed_by(lambda: os.rename(d / "f", d / "g"), d)
    changed_by(lambda: os.rename(d / "g", e / "g"), d, e)
    changed_by(lambda: (d / "sub").mkdir(), d)
    changed_by(lambda: (d / "sub").rmdir(), d)
    changed_by(lambda: (e / "g").unlink(), e)
    changed_by(lambda: os.symlink("g", d / "link"), d)
    top = shared_mount.mountpoint  # its attributes live only in the mount
    changed_by(lambda: (top / f"{mount_dir.name}-x").mkdir(), top)
    changed_by(lambda: (top / f"{mount_dir.name}-x").rmdir(), top)
    os.chmod(top, 0o750)  # rsync -a sets the top directory's mode and times too
    try:
        assert stat.S_IMODE(top.stat().st_mode) == 0o750
        os.utime(top, ns=(old, old))
        (d / "unrelated").mkdir()  # a change elsewhere leaves the top alone
        assert times(top)[0] == old
    finally:
        os.chmod(top, 0o755)
    (d / "f").write_bytes(b"x")
    os.utime(d, ns=(old, old))
    with open(d / "f", "ab") as f:
        f.write(b"more")
    os.chmod(d / "f", 0o600)
    os.utime(d / "f", ns=(old, old))
    assert times(d)[0] == old
    shown = times(d), times(e)
    shared_mount.flush()  # committed, and the view rebuilt from the grid's tree
    time.sleep(1.2)  # past the kernel's attribute cache
    assert (times(d), times(e)) == shown


def test_mkdir_rmdir(mount_dir: Path) -> None:
    d = mount_dir / "a"
    d.mkdir()
    assert d.is_dir()
    assert errno_of(os.mkdir, d) == errno.EEXIST
    (d / "b").mkdir()
    (d / "b" / "f").write_bytes(b"1")
    assert errno_of(os.rmdir, d) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, d / "b" / "f") == errno.ENOTDIR
    assert errno_of(os.unlink, d / "b") == errno.EISDIR
    assert errno_of(os.rmdir, d / "nope") == errno.ENOENT
    assert errno_of(os.mkdir, d / "nope" / "x") == errno.ENOENT
    assert errno_of(os.mkdir, d / "b" / "f" / "x") == errno.ENOTDIR
    os.unlink(d / "b" / "f")
    os.rmdir(d / "b")
    os.rmdir(d)
    assert os.listdir(mount_dir) == []


def test_listings_start_with_dot_and_dot_dot(mount_dir: Path) -> None:
    """readdir gives "." and ".." first, with the inode numbers of the
    directory and its parent (ls -a, find and shells expect them)."""
    sub = mount_dir / "sub"
    sub.mkdir()
    (sub / "f").write_bytes(b"1")
    out = subprocess.run(["ls", "-ai1", str(sub)], capture_output=True, text=True, check=True)
    listed = [line.split(maxsplit=1) for line in out.stdout.splitlines()]
    assert [name for _, name in listed] == [".", "..", "f"]
    inodes = {name: int(ino) for ino, name in listed}
    assert inodes["."] == sub.stat().st_ino
    assert inodes[".."] == mount_dir.stat().st_ino
    assert inodes["f"] == (sub / "f").stat().st_ino
    assert os.listdir(sub) == ["f"]


def test_many_entries_in_one_directory(mount_dir: Path) -> None:
    names = {f"file-{i:04d}" for i in range(300)}
    for name in names:
        (mount_dir / name).write_bytes(name.encode())
    assert set(os.listdir(mount_dir)) == names
    assert sorted(p.name for p in mount_dir.iterdir()) == sorted(names)
    assert (mount_dir / "file-0123").read_bytes() == b"file-0123"


def test_files_never_vanish_while_the_queue_drains(mount_node: Path, tmp_path: Path) -> None:
    """The mount uploads and publishes in the background while files keep
    coming, and re-reads the root often (refresh=0.05); every file written
    must stay visible throughout."""
    with mounted(mount_node, tmp_path / "mnt", "refresh=0.05") as m:
        written: list[str] = []
        for i in range(200):
            name = f"f{i:03d}"
            (m.mountpoint / name).write_bytes(os.urandom(12_000 if i % 2 else 40_000))
            written.append(name)
            assert sorted(os.listdir(m.mountpoint)) == written, f"after writing {name}"
            for old in written[-20:]:
                assert (m.mountpoint / old).exists(), f"{old} vanished after writing {name}"


def test_unlink_while_open(mount_dir: Path) -> None:
    f = mount_dir / "f"
    data = os.urandom(100_000)
    f.write_bytes(data)
    with open(f, "rb") as g:
        assert g.read(10) == data[:10]
        os.unlink(f)
        assert not f.exists()
        assert os.listdir(mount_dir) == []
        assert g.read() == data[10:]
        assert os.pread(g.fileno(), 5, 0) == data[:5]
    # and a file still being written, unlinked before it was ever closed
    with open(f, "w+b") as g:
        g.write(b"ephemeral")
        g.flush()
        os.unlink(f)
        g.write(b" data")
        g.flush()
        g.seek(0)
        assert g.read() == b"ephemeral data"
    assert not f.exists()
    assert os.listdir(mount_dir) == []


def test_unlinked_open_file_outlives_the_upload(mount_dir: Path, shared_mount: Mount) -> None:
    """Open, unlink, and let the queue upload and clean up: still readable."""
    data = os.urandom(300_000)
    f = mount_dir / "f"
    f.write_bytes(data)
    with open(f, "rb") as g:
        os.unlink(f)
        shared_mount.flush()
        assert g.read() == data


def test_attributes_and_reads_while_uploads_finish(mount_dir: Path, shared_mount: Mount) -> None:
    """chmod, xattrs and reads of just-written files, at moments spread over
    the background upload: none may fail, and the queue must drain."""
    contents = {}
    for i in range(16):
        f = mount_dir / f"f{i}"
        contents[f] = os.urandom(40_000 + i)
        f.write_bytes(contents[f])
        time.sleep(0.05 + 0.03 * i)
        os.chmod(f, 0o600)
        os.setxattr(f, "user.i", str(i).encode())
        assert f.read_bytes() == contents[f]
    shared_mount.flush()
    assert shared_mount.queue_length() == 0
    for f, data in contents.items():
        assert f.read_bytes() == data
        assert stat.S_IMODE(f.stat().st_mode) == 0o600


# -- rename -----------------------------------------------------------------
def test_rename_over_existing_file(mount_dir: Path) -> None:
    a, b = mount_dir / "a", mount_dir / "b"
    a.write_bytes(b"new content")
    b.write_bytes(b"old")
    os.rename(a, b)
    assert b.read_bytes() == b"new content"
    assert not a.exists()
    assert os.listdir(mount_dir) == ["b"]
    # the write-to-temp-then-rename pattern of editors and package managers
    for i in range(5):
        tmp = mount_dir / f".b.tmp{i}"
        tmp.write_bytes(f"version {i}".encode())
        os.replace(tmp, b)
        assert b.read_bytes() == f"version {i}".encode()
    assert os.listdir(mount_dir) == ["b"]


def test_rename_directory(mount_dir: Path) -> None:
    src = mount_dir / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"deep")
    (src / "g").write_bytes(b"top")
    os.rename(src, mount_dir / "dst")
    assert not src.exists()
    assert (mount_dir / "dst" / "sub" / "f").read_bytes() == b"deep"
    assert (mount_dir / "dst" / "g").read_bytes() == b"top"
    # onto an empty directory: fine; onto a non-empty one: ENOTEMPTY
    (mount_dir / "empty").mkdir()
    os.rename(mount_dir / "dst", mount_dir / "empty")
    assert sorted(os.listdir(mount_dir / "empty")) == ["g", "sub"]
    (mount_dir / "full").mkdir()
    (mount_dir / "full" / "x").write_bytes(b"")
    assert errno_of(os.rename, mount_dir / "empty", mount_dir / "full") == errno.ENOTEMPTY
    assert errno_of(os.rename, mount_dir / "empty", mount_dir / "full" / "x") == errno.ENOTDIR
    assert errno_of(os.rename, mount_dir / "full" / "x", mount_dir / "empty") == errno.EISDIR
    inside = mount_dir / "empty" / "sub" / "in"
    assert errno_of(os.rename, mount_dir / "empty", inside) == errno.EINVAL
    assert errno_of(os.rename, mount_dir / "missing", mount_dir / "m2") == errno.ENOENT
    assert sorted(os.listdir(mount_dir)) == ["empty", "full"]


def test_rename_of_open_file_keeps_writing(mount_dir: Path) -> None:
    a = mount_dir / "a"
    with open(a, "wb") as g:
        g.write(b"first ")
        g.flush()
        os.rename(a, mount_dir / "b")
        g.write(b"second")
    assert (mount_dir / "b").read_bytes() == b"first second"
    assert os.listdir(mount_dir) == ["b"]


def test_renameat2_flags(mount_dir: Path) -> None:
    a, b = mount_dir / "a", mount_dir / "b"
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    assert errno_of(renameat2, a, b, RENAME_NOREPLACE) == errno.EEXIST
    assert errno_of(renameat2, a, b, RENAME_EXCHANGE) == errno.EINVAL
    assert a.read_bytes() == b"A" and b.read_bytes() == b"B"
    renameat2(a, mount_dir / "c", RENAME_NOREPLACE)
    assert (mount_dir / "c").read_bytes() == b"A"
    assert sorted(os.listdir(mount_dir)) == ["b", "c"]


# -- other kinds of things ----------------------------------------------------
def test_symlink_readlink(mount_dir: Path) -> None:
    (mount_dir / "target").write_bytes(b"pointed at")
    link = mount_dir / "link"
    os.symlink("target", link)
    assert os.readlink(link) == "target"
    assert stat.S_ISLNK(os.lstat(link).st_mode)
    assert os.lstat(link).st_size == len("target")
    assert link.read_bytes() == b"pointed at"
    os.symlink("/nonexistent/ü/path", mount_dir / "dangling")
    assert os.readlink(mount_dir / "dangling") == "/nonexistent/ü/path"
    assert not (mount_dir / "dangling").exists()
    assert errno_of(os.symlink, "x", link) == errno.EEXIST
    assert errno_of(os.readlink, mount_dir / "target") == errno.EINVAL
    os.unlink(link)
    assert (mount_dir / "target").read_bytes() == b"pointed at"


def test_user_xattrs(mount_dir: Path) -> None:
    f = mount_dir / "f"
    f.write_bytes(b"content")
    os.setxattr(f, "user.color", b"blue")
    os.setxattr(f, "user.empty", b"")
    os.setxattr(f, "user.bin", bytes(range(256)))
    assert os.getxattr(f, "user.color") == b"blue"
    assert os.getxattr(f, "user.empty") == b""
    assert os.getxattr(f, "user.bin") == bytes(range(256))
    assert sorted(os.listxattr(f)) == ["user.bin", "user.color", "user.empty"]
    os.setxattr(f, "user.color", b"red")
    assert os.getxattr(f, "user.color") == b"red"
    os.removexattr(f, "user.color")
    assert sorted(os.listxattr(f)) == ["user.bin", "user.empty"]
    assert errno_of(os.getxattr, f, "user.color") == errno.ENODATA
    assert errno_of(os.removexattr, f, "user.color") == errno.ENODATA
    with pytest.raises(OSError) as info:
        os.setxattr(f, "trusted.x", b"1")
    assert info.value.errno in (errno.ENOTSUP, errno.EOPNOTSUPP)
    # Other namespaces are not supported: ENOTSUP (ls -l then stops asking for
    # security.selinux and ACLs on every entry; ENODATA made it ask each time)
    for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
        assert errno_of(os.getxattr, f, name) in (errno.ENOTSUP, errno.EOPNOTSUPP), name
    assert f.read_bytes() == b"content"  # xattrs do not touch the content
    d = mount_dir / "d"
    d.mkdir()
    os.setxattr(d, "user.dir", b"yes")
    assert os.getxattr(d, "user.dir") == b"yes"
    # xattrs set on an open file survive its close
    with open(f, "ab") as g:
        os.setxattr(f, "user.during", b"write")
        g.write(b"+")
    assert os.getxattr(f, "user.during") == b"write"
    assert f.read_bytes() == b"content+"


def test_xattrs_on_the_top_directory_are_refused_and_queue_nothing(
    mount_dir: Path, shared_mount: Mount
) -> None:
    """The root has no entry to keep them: EINVAL, and no queued step that
    could never apply (it held up the queue, and the next mount, for good)."""
    top = shared_mount.mountpoint
    assert errno_of(os.setxattr, top, "user.tag", b"x") == errno.EINVAL
    (mount_dir / "after").write_bytes(b"after")
    shared_mount.flush()
    assert shared_mount.queue_length() == 0


def test_names(mount_dir: Path) -> None:
    names = ["héllo wörld", "世界", "emoji-🙂", "a b", "-dash", "x" * 255, "€" * 85]
    for name in names:
        assert len(name.encode()) <= 255
        (mount_dir / name).write_bytes(name.encode())
    assert sorted(os.listdir(mount_dir)) == sorted(names)
    for name in names:
        assert (mount_dir / name).read_bytes() == name.encode()
    assert errno_of(open, mount_dir / ("y" * 256), "wb") == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, mount_dir / ("€" * 86)) == errno.ENAMETOOLONG
    assert errno_of(os.stat, mount_dir / ("z" * 256)) == errno.ENAMETOOLONG


def test_mmap_read(mount_dir: Path, shared_mount: Mount) -> None:
    data = os.urandom(1_500_000)
    f = mount_dir / "m"
    f.write_bytes(data)
    for flushed in (False, True):
        if flushed:
            shared_mount.flush()
        with open(f, "rb") as g, mmap.mmap(g.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert len(m) == len(data)
            assert m[:100] == data[:100]
            assert m[1_400_000:1_400_100] == data[1_400_000:1_400_100]
            assert m[:] == data


def test_statfs(mount_dir: Path) -> None:
    s = os.statvfs(mount_dir)
    assert s.f_blocks > 0
    assert 0 < s.f_bavail <= s.f_blocks
    assert s.f_bsize > 0
    assert s.f_namemax == 255


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may set a mount's readahead")
def test_kernel_readahead_is_one_mebibyte(shared_mount: Mount) -> None:
    """Set after INIT (whose reply resets it): sequential reads come to the
    daemon as 1 MiB requests instead of 128 KiB."""
    target = str(shared_mount.mountpoint.absolute())
    with open("/proc/self/mountinfo") as f:
        devices = [line.split()[2] for line in f if line.split()[4] == target]
    knob = Path("/sys/class/bdi") / devices[-1] / "read_ahead_kb"
    wait_for(lambda: knob.read_text().strip() == "1024", timeout=10, what="read_ahead_kb 1024")


def test_sqlite_module_in_the_mount(mount_dir: Path) -> None:
    db = sqlite3.connect(mount_dir / "small.db")
    db.execute("create table t (x)")
    db.executemany("insert into t values (?)", [(i,) for i in range(100)])
    db.commit()
    assert db.execute("select sum(x) from t").fetchone()[0] == 4950
    db.close()


# -- read-your-writes, and what another client sees --------------------------------
def test_read_your_writes_then_visible_to_another_client(
    mount_dir: Path, shared_mount: Mount, mount_grid: Grid
) -> None:
    big, small = os.urandom(3_000_000), b"small file"
    servers = mount_grid.storage_pids()
    assert len(servers) == 5
    for pid in servers.values():  # the grid stalls: nothing can be uploaded
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # the mount's refresher (refresh=1) now waits for the stalled grid
        started = time.monotonic()
        (mount_dir / "big").write_bytes(big)
        (mount_dir / "small").write_bytes(small)
        (mount_dir / "sub").mkdir()
        (mount_dir / "sub" / "f").write_bytes(b"in sub")
        os.rename(mount_dir / "small", mount_dir / "sub" / "small")
        assert sorted(os.listdir(mount_dir)) == ["big", "sub"]
        assert sorted(os.listdir(mount_dir / "sub")) == ["f", "small"]
        assert (mount_dir / "big").read_bytes() == big
        assert (mount_dir / "sub" / "small").read_bytes() == small
        # a stalled grid must not stall local changes (they only go to the queue)
        assert time.monotonic() - started < 5
        assert shared_mount.queue_length() > 0  # really not uploaded yet
    finally:
        for pid in servers.values():
            os.kill(pid, signal.SIGCONT)
    shared_mount.flush()
    rel = "t:/" + mount_dir.name
    listing = outside(mount_grid, shared_mount.node, "ls", "-l", rel).decode()
    rows = {line.split()[-1]: line.split() for line in listing.splitlines()}
    assert set(rows) == {"big", "sub"}, listing
    assert rows["big"][1] == str(len(big))
    assert rows["sub"][0].startswith("d")
    assert outside(mount_grid, shared_mount.node, "ls", rel + "/sub").split() == [b"f", b"small"]
    assert outside(mount_grid, shared_mount.node, "cat", rel + "/sub/small") == small
    assert outside(mount_grid, shared_mount.node, "cat", rel + "/big") == big
