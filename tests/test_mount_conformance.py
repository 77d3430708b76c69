"""POSIX conformance, table-driven: every case runs on the mount and on a
tmpfs, as root or as another user, and must observe the same thing.

A case is a setup (run as root) and an operation (run as the case's user),
both in a fresh directory of their own, by relative paths, in a child
process that took the user's ids (setresuid/setresgid/setgroups: a real
other user, so the mount runs with ``allow_other``).  What is compared: the
operation's result or errno, and for every entry of the directory its type,
permission bits (setuid, setgid, sticky included), uid, gid, rdev, size
(files and symlinks) and whether its ctime moved.  A difference from tmpfs
that the mount keeps on purpose is in docs/mount.md §8, not here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import GRIDFS, Grid, Mount, is_mounted, mounted  # noqa: E402

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.getuid() != 0, reason="needs /dev/fuse and root"
)

USERS = {
    "root": (0, 0, ()),
    "alice": (1001, 1001, (1001, 3000)),
    "bob": (1002, 1002, (1002,)),
    "nobody": (65534, 65534, (65534, 3000)),
}
"""name → (uid, gid, supplementary groups); alice and nobody are also in
group 3000 (nobody: a user with a passwd entry, as fusermount3 wants)."""
ALICE, BOB, STAFF, NOBODY = 1001, 1002, 3000, 65534
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Case:
    name: str
    op: Callable[[], Any]
    user: str = "root"
    setup: Callable[[], Any] | None = None

    def __str__(self) -> str:
        return self.name


# -- running a case ------------------------------------------------------------
def as_user(user: str, directory: int | Path, fn: Callable[[], Any]) -> tuple[str, Any]:
    """Run ``fn`` in a child process as ``user``, in ``directory`` (a path,
    or a directory open as that descriptor): ("ok", its result) or ("error",
    errno name)."""
    uid, gid, groups = USERS[user]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            os.umask(0o022)
            if isinstance(directory, Path):
                os.chdir(directory)
            else:
                os.fchdir(directory)
            try:
                outcome: tuple[str, Any] = ("ok", fn())
            except OSError as e:
                outcome = ("error", errno.errorcode.get(e.errno or 0, e.errno))
            os.write(write, pickle.dumps(outcome))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the case's child failed"
    return pickle.loads(data)


def snapshot(directory: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``directory`` (itself as "."): what a case compares."""
    out = {}
    for path in [directory, *sorted(directory.rglob("*"))]:
        s = os.lstat(path)
        size = s.st_size if stat.S_ISREG(s.st_mode) or stat.S_ISLNK(s.st_mode) else None
        key = str(path.relative_to(directory))
        out[key] = (
            stat.S_IFMT(s.st_mode),
            oct(stat.S_IMODE(s.st_mode)),
            s.st_uid,
            s.st_gid,
            s.st_rdev,
            size,
            s.st_ctime_ns,
        )
    return out


def observe(world: Path, case: Case) -> dict[str, Any]:
    directory = world / f"{case.name}-{uuid.uuid4().hex[:6]}"
    directory.mkdir()
    os.chmod(directory, 0o755)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if case.setup is not None:
            outcome = as_user("root", fd, case.setup)
            assert outcome[0] == "ok", f"setup of {case}: {outcome}"
        before = snapshot(directory)
        time.sleep(0.01)  # past tmpfs's coarse clock tick: a change moves the ctime
        result = as_user(case.user, fd, case.op)
        after = snapshot(directory)
    finally:
        os.close(fd)
    entries = {}
    for name, fields in after.items():
        moved = name in before and before[name][-1] != fields[-1]
        entries[name] = (*fields[:-1], "ctime moved" if moved else "")
    return {"result": result, "entries": entries}


def check(worlds: tuple[Path, Path], case: Case) -> None:
    mount, tmpfs = worlds
    expected = observe(tmpfs, case)
    got = observe(mount, case)
    assert got == expected, f"{case}: mount {got} != tmpfs {expected}"


@pytest.fixture(scope="module")
def worlds(
    mount_grid: Grid, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    """(a directory of a mount with allow_other, a directory of a tmpfs)."""
    base = tmp_path_factory.mktemp("conformance")
    node = mount_grid.new_node(base)
    tmpfs = base / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", tmpfs], check=True)
    try:
        with mounted(node, base / "mnt", options="refresh=1,allow_other") as m:
            yield _world(m), _world_dir(tmpfs)
    finally:
        subprocess.run(["umount", "-l", tmpfs], check=False)


def _world(m: Mount) -> Path:
    return _world_dir(m.mountpoint)


def _world_dir(top: Path) -> Path:
    d = top / "w"
    d.mkdir()
    os.chmod(d, 0o755)
    return d


# -- helpers for the tables ------------------------------------------------------
def make(path: str, mode: int = 0o644, owner: tuple[int, int] = (0, 0), data: bytes = b"x") -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, *owner)
    os.chmod(path, mode)  # after the chown, which clears setuid


def mkdir(path: str, mode: int = 0o755, owner: tuple[int, int] = (0, 0)) -> None:
    os.mkdir(path)
    os.chown(path, *owner)
    os.chmod(path, mode)


def steps(*fns: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        result = None
        for fn in fns:
            result = fn()
        return result

    return run


def write(path: str, data: bytes = b"more") -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def open_trunc(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))


def ftruncate(path: str, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def fchown(path: str, uid: int, gid: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchown(fd, uid, gid)
    finally:
        os.close(fd)


def fchmod(path: str, mode: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def create(path: str, mode: int = 0o644) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))


def fifo_round_trip() -> bytes:
    os.mkfifo("p")
    r = os.open("p", os.O_RDONLY | os.O_NONBLOCK)
    w = os.open("p", os.O_WRONLY)
    try:
        os.write(w, b"through the pipe")
        return os.read(r, 100)
    finally:
        os.close(w)
        os.close(r)


def socket_round_trip() -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.connect("s")
            client.send(b"through the socket")
            return server.recv(100)


def bind_twice() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as a:
        a.bind("s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as b:
            b.bind("s")


def utime_now(path: str) -> None:
    os.utime(path, None)  # both UTIME_NOW


def utime_at(path: str) -> int:
    os.utime(path, ns=(1_000_000_007, 1_600_000_000_123_456_789))
    return os.lstat(path).st_mtime_ns


UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str, atime: tuple[int, int], mtime: tuple[int, int]) -> int | str:
    """utimensat(2) with (seconds, nanoseconds) or UTIME_NOW/UTIME_OMIT in
    the nanoseconds; the mtime after it ("recent": set by the clock)."""
    times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
    if _libc.utimensat(-100, path.encode(), times, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    mtime_ns = os.lstat(path).st_mtime_ns
    return mtime_ns if mtime_ns < 1_700_000_000 * 10**9 else "recent"


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def mknod_chr(path: str, major: int = 1, minor: int = 3) -> None:
    os.mknod(path, 0o640 | stat.S_IFCHR, os.makedev(major, minor))


def mknod_blk(path: str) -> None:
    os.mknod(path, 0o600 | stat.S_IFBLK, os.makedev(7, 300))


def renameat2(src: str, dst: str, flags: int) -> None:
    AT_FDCWD = -100
    if _libc.renameat2(AT_FDCWD, src.encode(), AT_FDCWD, dst.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def rename_moves_ctime(src: str, dst: str) -> bool:
    """Whether renaming ``src`` moved its ctime (as rename(2) does on Linux)."""
    before = os.lstat(src).st_ctime_ns
    time.sleep(0.01)
    os.rename(src, dst)
    return os.lstat(dst).st_ctime_ns > before


def listing() -> list[str]:
    return sorted(os.listdir("."))


ALICES, BOBS = (ALICE, ALICE), (BOB, BOB)


# -- the tables ------------------------------------------------------------------
CHOWN = [
    Case("root-gives-away", lambda: os.chown("f", ALICE, STAFF), setup=lambda: make("f")),
    Case("root-uid-only", lambda: os.chown("f", BOB, -1), setup=lambda: make("f")),
    Case("root-gid-only", lambda: os.chown("f", -1, STAFF), setup=lambda: make("f")),
    Case("root-noop-clears-setuid", lambda: os.chown("f", -1, -1),
         setup=lambda: make("f", 0o4755)),
    Case("root-clears-setuid-setgid", lambda: os.chown("f", ALICE, -1),
         setup=lambda: make("f", 0o6755)),
    Case("root-keeps-setgid-without-gx", lambda: os.chown("f", ALICE, -1),
         setup=lambda: make("f", 0o2745)),
    Case("root-dir-keeps-bits", lambda: os.chown("d", ALICE, STAFF),
         setup=lambda: mkdir("d", 0o7755)),
    Case("root-lchown-symlink", lambda: os.lchown("l", ALICE, STAFF),
         setup=steps(lambda: make("f"), lambda: os.symlink("f", "l"))),
    Case("root-chown-follows-symlink", lambda: os.chown("l", ALICE, STAFF),
         setup=steps(lambda: make("f"), lambda: os.symlink("f", "l"))),
    Case("root-chown-fifo", lambda: os.chown("p", BOB, BOB), setup=lambda: os.mkfifo("p")),
    Case("root-fchown", lambda: fchown("f", ALICE, ALICE), setup=lambda: make("f")),
    Case("owner-gives-away", lambda: os.chown("f", BOB, -1), "alice",
         lambda: make("f", owner=ALICES)),
    Case("owner-keeps-own-uid", lambda: os.chown("f", ALICE, -1), "alice",
         lambda: make("f", owner=ALICES)),
    Case("owner-chgrp-to-own-group", lambda: os.chown("f", -1, STAFF), "alice",
         lambda: make("f", owner=ALICES)),
    Case("owner-chgrp-to-other-group", lambda: os.chown("f", -1, BOB), "alice",
         lambda: make("f", owner=ALICES)),
    Case("owner-fchown-to-own-group", lambda: fchown("f", -1, STAFF), "alice",
         lambda: make("f", owner=ALICES)),
    Case("owner-chgrp-clears-setgid-gx", lambda: os.chown("f", -1, STAFF), "alice",
         lambda: make("f", 0o2775, owner=ALICES)),
    Case("owner-chgrp-keeps-setgid", lambda: os.chown("f", -1, STAFF), "alice",
         lambda: make("f", 0o2745, owner=ALICES)),
    Case("owner-chgrp-clears-setuid", lambda: os.chown("f", -1, STAFF), "alice",
         lambda: make("f", 0o4755, owner=ALICES)),
    Case("other-chgrp", lambda: os.chown("f", -1, BOB), "bob",
         lambda: make("f", 0o666, owner=ALICES)),
    Case("other-chown-to-self", lambda: os.chown("f", BOB, -1), "bob",
         lambda: make("f", 0o666, owner=ALICES)),
    Case("other-chown-noop", lambda: os.chown("f", -1, -1), "bob",
         lambda: make("f", 0o644, owner=ALICES)),
    Case("other-lchown", lambda: os.lchown("l", BOB, BOB), "bob",
         steps(lambda: os.symlink("x", "l"), lambda: os.lchown("l", ALICE, ALICE))),
    Case("in-unsearchable-dir", lambda: os.chown("d/f", -1, STAFF), "alice",
         steps(lambda: mkdir("d", 0o700), lambda: make("d/f", owner=ALICES))),
    Case("missing", lambda: os.chown("nothing", ALICE, ALICE)),
]  # fmt: skip

CHMOD = [
    Case("owner", lambda: os.chmod("f", 0o600), "alice", lambda: make("f", owner=ALICES)),
    Case("owner-fchmod", lambda: fchmod("f", 0o640), "alice", lambda: make("f", owner=ALICES)),
    Case("other", lambda: os.chmod("f", 0o600), "bob", lambda: make("f", 0o666, owner=ALICES)),
    Case("root-any", lambda: os.chmod("f", 0o4711), setup=lambda: make("f", owner=ALICES)),
    Case("owner-setuid", lambda: os.chmod("f", 0o4755), "alice",
         lambda: make("f", owner=ALICES)),
    Case("owner-setgid-own-group", lambda: os.chmod("f", 0o2755), "alice",
         lambda: make("f", owner=(ALICE, STAFF))),
    Case("owner-setgid-other-group", lambda: os.chmod("f", 0o2755), "alice",
         lambda: make("f", owner=(ALICE, BOB))),
    Case("owner-sticky-dir", lambda: os.chmod("d", 0o1777), "alice",
         lambda: mkdir("d", owner=ALICES)),
    Case("owner-sticky-file", lambda: os.chmod("f", 0o1644), "alice",
         lambda: make("f", owner=ALICES)),
    Case("root-fifo", lambda: os.chmod("p", 0o600), setup=lambda: os.mkfifo("p")),
    Case("other-dir", lambda: os.chmod("d", 0o777), "bob", lambda: mkdir("d", owner=ALICES)),
]  # fmt: skip

CREATE = [
    Case("file", lambda: create("f"), "alice", lambda: os.chmod(".", 0o777)),
    Case("file-no-write-permission", lambda: create("f"), "bob"),
    Case("file-in-setgid-dir", lambda: create("d/f"), "alice",
         lambda: mkdir("d", 0o2777, owner=(0, STAFF))),
    Case("setgid-file-in-own-group-dir", lambda: create("d/f", 0o2775), "alice",
         lambda: mkdir("d", 0o2777, owner=(0, STAFF))),
    Case("setgid-file-in-other-group-dir", lambda: create("d/f", 0o2775), "bob",
         lambda: mkdir("d", 0o2777, owner=(0, STAFF))),
    Case("setuid-file", lambda: create("f", 0o4755), "alice", lambda: os.chmod(".", 0o777)),
    Case("mkdir", lambda: os.mkdir("d"), "alice", lambda: os.chmod(".", 0o777)),
    Case("mkdir-in-setgid-dir", lambda: os.mkdir("d/e", 0o755), "alice",
         lambda: mkdir("d", 0o2777, owner=(0, STAFF))),
    Case("mkdir-setgid-mode", lambda: os.mkdir("d", 0o2755), "alice",
         lambda: os.chmod(".", 0o777)),
    Case("mkdir-sticky-mode", lambda: os.mkdir("d", 0o1777), "alice",
         lambda: os.chmod(".", 0o777)),
    Case("mkdir-in-setgid-dir-by-root", lambda: os.mkdir("d/e", 0o700),
         setup=lambda: mkdir("d", 0o2755, owner=(ALICE, STAFF))),
    Case("symlink-in-setgid-dir", lambda: os.symlink("target", "d/l"), "alice",
         lambda: mkdir("d", 0o2777, owner=(0, STAFF))),
    Case("mkfifo-in-setgid-dir", lambda: os.mkfifo("d/p", 0o660), "alice",
         lambda: mkdir("d", 0o2777, owner=(0, STAFF))),
    Case("excl-onto-fifo", lambda: create("p"), setup=lambda: os.mkfifo("p")),
    Case("mkdir-onto-fifo", lambda: os.mkdir("p"), setup=lambda: os.mkfifo("p")),
    Case("symlink-onto-socket", lambda: os.symlink("x", "s"),
         setup=lambda: os.mknod("s", 0o755 | stat.S_IFSOCK)),
]  # fmt: skip

MKNOD = [
    Case("mkfifo", lambda: os.mkfifo("p")),
    Case("mkfifo-mode", lambda: os.mkfifo("p", 0o600)),
    Case("mkfifo-by-user", lambda: os.mkfifo("p"), "alice", lambda: os.chmod(".", 0o777)),
    Case("mkfifo-no-write-permission", lambda: os.mkfifo("p"), "alice"),
    Case("chr", lambda: mknod_chr("c")),
    Case("chr-big-numbers", lambda: mknod_chr("c", 259, 70000)),
    Case("blk", lambda: mknod_blk("b")),
    Case("chr-by-user", lambda: mknod_chr("c"), "alice", lambda: os.chmod(".", 0o777)),
    Case("socket-node", lambda: os.mknod("s", 0o644 | stat.S_IFSOCK)),
    Case("regular", lambda: os.mknod("f", 0o600 | stat.S_IFREG)),
    Case("onto-file", lambda: os.mkfifo("f"), setup=lambda: make("f")),
    Case("onto-dir", lambda: os.mkfifo("d"), setup=lambda: os.mkdir("d")),
    Case("onto-fifo", lambda: mknod_chr("p"), setup=lambda: os.mkfifo("p")),
    Case("onto-dangling-symlink", lambda: os.mkfifo("l"), setup=lambda: os.symlink("x", "l")),
    Case("onto-socket", lambda: os.mkfifo("s"),
         setup=lambda: os.mknod("s", 0o644 | stat.S_IFSOCK)),
    Case("fifo-round-trip", fifo_round_trip),
    Case("fifo-listed", steps(lambda: os.mkfifo("p"), listing)),
    Case("fifo-rename", lambda: os.rename("p", "q"), setup=lambda: os.mkfifo("p")),
    Case("fifo-rename-over-file", lambda: os.rename("p", "f"),
         setup=steps(lambda: os.mkfifo("p"), lambda: make("f"))),
    Case("fifo-unlink", lambda: os.unlink("p"), setup=lambda: os.mkfifo("p")),
    Case("fifo-rmdir", lambda: os.rmdir("p"), setup=lambda: os.mkfifo("p")),
    Case("fifo-truncate", lambda: os.truncate("p", 0), setup=lambda: os.mkfifo("p")),
    Case("chr-rename", lambda: os.rename("c", "d"), setup=lambda: mknod_chr("c")),
    Case("socket-round-trip", socket_round_trip),
    Case("socket-bind-twice", bind_twice),
    Case("socket-unlink", lambda: os.unlink("s"),
         setup=lambda: os.mknod("s", 0o644 | stat.S_IFSOCK)),
    Case("dir-onto-fifo-rename", lambda: os.rename("d", "p"),
         setup=steps(lambda: os.mkfifo("p"), lambda: os.mkdir("d"))),
]  # fmt: skip


def sticky(owner: tuple[int, int] = (0, 0)) -> Callable[[], None]:
    """A sticky, world-writable t/ owned by ``owner``, with alice's t/a and bob's t/b."""
    return steps(
        lambda: mkdir("t", 0o1777, owner),
        lambda: make("t/a", 0o666, ALICES),
        lambda: make("t/b", 0o666, BOBS),
    )


REMOVE = [
    Case("sticky-unlink-other", lambda: os.unlink("t/a"), "bob", sticky()),
    Case("sticky-unlink-own", lambda: os.unlink("t/a"), "alice", sticky()),
    Case("sticky-unlink-by-dir-owner", lambda: os.unlink("t/a"), "bob", sticky(BOBS)),
    Case("sticky-unlink-by-root", lambda: os.unlink("t/a"), setup=sticky()),
    Case("sticky-rename-other-away", lambda: os.rename("t/a", "t/c"), "bob", sticky()),
    Case("sticky-rename-own", lambda: os.rename("t/b", "t/c"), "bob", sticky()),
    Case("sticky-rename-over-other", lambda: os.rename("t/b", "t/a"), "bob", sticky()),
    Case("sticky-rename-into-over-other", lambda: os.rename("u/x", "t/a"), "bob",
         steps(sticky(), lambda: mkdir("u", 0o777), lambda: make("u/x", owner=BOBS))),
    Case("sticky-rename-into-new-name", lambda: os.rename("u/x", "t/x"), "bob",
         steps(sticky(), lambda: mkdir("u", 0o777), lambda: make("u/x", owner=BOBS))),
    Case("sticky-rename-noreplace", lambda: renameat2("t/b", "t/a", 1), "bob", sticky()),
    Case("sticky-rmdir-other", lambda: os.rmdir("t/e"), "bob",
         steps(sticky(), lambda: mkdir("t/e", 0o777, ALICES))),
    Case("sticky-unlink-fifo-other", lambda: os.unlink("t/p"), "bob",
         steps(sticky(), lambda: os.mkfifo("t/p"), lambda: os.chown("t/p", ALICE, ALICE))),
    Case("plain-unlink-other", lambda: os.unlink("t/a"), "bob",
         steps(sticky(), lambda: os.chmod("t", 0o777))),
    Case("unlink-no-write-permission", lambda: os.unlink("t/a"), "bob",
         steps(sticky(), lambda: os.chmod("t", 0o755))),
    Case("rename-into-unwritable", lambda: os.rename("t/b", "u/b"), "bob",
         steps(sticky(), lambda: mkdir("u", 0o755))),
    Case("rename-moves-ctime", lambda: rename_moves_ctime("t/b", "t/c"), "bob", sticky()),
    Case("rename-dir-moves-ctime", lambda: rename_moves_ctime("t", "u"), setup=sticky()),
    Case("rename-fifo-moves-ctime", lambda: rename_moves_ctime("p", "q"),
         setup=lambda: os.mkfifo("p")),
    Case("rmdir-nonempty", lambda: os.rmdir("t"), setup=sticky()),
    Case("rename-dir-into-itself", lambda: os.rename("t", "t/x"), setup=sticky()),
]  # fmt: skip

TIMES = [
    Case("owner-explicit", lambda: utime_at("f"), "alice", lambda: make("f", owner=ALICES)),
    Case("other-explicit-writable", lambda: utime_at("f"), "alice",
         lambda: make("f", 0o666, owner=BOBS)),
    Case("other-now-writable", lambda: utime_now("f"), "alice",
         lambda: make("f", 0o666, owner=BOBS)),
    Case("other-now-read-only", lambda: utime_now("f"), "alice",
         lambda: make("f", 0o644, owner=BOBS)),
    Case("group-now-writable", lambda: utime_now("f"), "alice",
         lambda: make("f", 0o664, owner=(BOB, STAFF))),
    Case("root-explicit", lambda: utime_at("f"), setup=lambda: make("f", owner=BOBS)),
    Case("root-explicit-fifo", lambda: utime_at("p"), setup=lambda: os.mkfifo("p")),
    Case("open-trunc-moves-ctime", lambda: open_trunc("f"), setup=lambda: make("f")),
    Case("ftruncate-moves-ctime", lambda: ftruncate("f", 5), setup=lambda: make("f")),
    Case("truncate-same-size", lambda: os.truncate("f", 1), setup=lambda: make("f")),
    Case("write-moves-ctime", lambda: write("f"), setup=lambda: make("f")),
    Case("setxattr-moves-ctime", lambda: os.setxattr("f", "user.k", b"v"),
         setup=lambda: make("f")),
    Case("setxattr-by-other", lambda: os.setxattr("f", "user.k", b"v"), "bob",
         lambda: make("f", 0o644, ALICES)),
    Case("omit-mtime", lambda: utimensat("f", (5, 0), (0, UTIME_OMIT)),
         setup=lambda: steps(lambda: make("f"), lambda: utime_at("f"))()),
    Case("set-mtime-omit-atime", lambda: utimensat("f", (0, UTIME_OMIT), (7, 11)),
         setup=lambda: make("f")),
    Case("other-now-omit-atime", lambda: utimensat("f", (0, UTIME_OMIT), (0, UTIME_NOW)),
         user="alice", setup=lambda: make("f", 0o666, owner=BOBS)),
    Case("other-both-omit", lambda: utimensat("f", (0, UTIME_OMIT), (0, UTIME_OMIT)),
         user="alice", setup=lambda: make("f", 0o644, owner=BOBS)),
]  # fmt: skip

KILLPRIV = [
    Case("write-by-other", lambda: write("f"), "alice", lambda: make("f", 0o4777, BOBS)),
    Case("write-by-owner", lambda: write("f"), "alice", lambda: make("f", 0o4755, ALICES)),
    Case("write-by-root", lambda: write("f"), setup=lambda: make("f", 0o4755, ALICES)),
    Case("write-setgid-gx", lambda: write("f"), "alice", lambda: make("f", 0o2777, BOBS)),
    Case("write-setgid-no-gx-not-in-group", lambda: write("f"), "alice",
         lambda: make("f", 0o2767, BOBS)),
    Case("write-setgid-no-gx-in-group", lambda: write("f"), "alice",
         lambda: make("f", 0o2767, (BOB, STAFF))),
    Case("truncate-by-other", lambda: os.truncate("f", 1), "alice",
         lambda: make("f", 0o6777, BOBS)),
    Case("ftruncate-by-other", lambda: ftruncate("f", 0), "alice",
         lambda: make("f", 0o4777, BOBS)),
    Case("open-trunc-by-other", lambda: open_trunc("f"), "alice",
         lambda: make("f", 0o4777, BOBS)),
    Case("truncate-by-root", lambda: os.truncate("f", 0), setup=lambda: make("f", 0o6755, BOBS)),
    Case("large-write-by-other", lambda: write("f", b"z" * 100_000), "alice",
         lambda: make("f", 0o4777, BOBS, b"y" * 50_000)),
]  # fmt: skip

ACCESS = [
    Case("owner-reads", lambda: read("f"), "alice", lambda: make("f", 0o600, ALICES)),
    Case("other-reads-private", lambda: read("f"), "bob", lambda: make("f", 0o600, ALICES)),
    Case("group-reads", lambda: read("f"), "alice", lambda: make("f", 0o640, (BOB, STAFF))),
    Case("group-writes-read-only", lambda: write("f"), "alice",
         lambda: make("f", 0o640, (BOB, STAFF))),
    Case("owner-bits-win-over-group", lambda: read("f"), "alice",
         lambda: make("f", 0o070, (ALICE, STAFF))),
    Case("search-denied", lambda: os.stat("d/f"), "bob",
         steps(lambda: mkdir("d", 0o750, ALICES), lambda: make("d/f"))),
    Case("list-without-read", lambda: os.listdir("d"), "bob",
         lambda: mkdir("d", 0o711, ALICES)),
    Case("access-write", lambda: os.access("f", os.W_OK), "bob", lambda: make("f", 0o664)),
    Case("access-exec-root", lambda: os.access("f", os.X_OK), setup=lambda: make("f", 0o644)),
    Case("readlink-fifo", lambda: os.readlink("p"), setup=lambda: os.mkfifo("p")),
    Case("stat-through-fifo", lambda: os.stat("p/x"), setup=lambda: os.mkfifo("p")),
]  # fmt: skip


def bind(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)


EXISTING = {
    "file": lambda: make("x"),
    "dir": lambda: os.mkdir("x"),
    "dangling-symlink": lambda: os.symlink("nowhere", "x"),
    "fifo": lambda: os.mkfifo("x"),
    "socket": lambda: os.mknod("x", 0o755 | stat.S_IFSOCK),
    "chr": lambda: mknod_chr("x"),
}
MAKERS = {
    "open-excl": lambda: create("x"),
    "mkdir": lambda: os.mkdir("x"),
    "mkfifo": lambda: os.mkfifo("x"),
    "mknod-chr": lambda: mknod_chr("x"),
    "symlink": lambda: os.symlink("t", "x"),
    "bind": lambda: bind("x"),
}
EEXIST = [
    Case(f"{maker}-onto-{kind}", make_it, setup=existing)
    for maker, make_it in MAKERS.items()
    for kind, existing in EXISTING.items()
]
"""Every way to make a name, onto every kind of entry already there."""

LONG = "n" * 256
"""A name one byte past NAME_MAX."""


def times_moved(path: str, fn: Callable[[], Any]) -> tuple[bool, bool]:
    """Whether ``fn`` moved the mtime and the ctime of ``path``."""
    before = os.lstat(path)
    time.sleep(0.01)
    fn()
    after = os.lstat(path)
    return after.st_mtime_ns != before.st_mtime_ns, after.st_ctime_ns != before.st_ctime_ns


def open_nofollow(path: str) -> None:
    os.close(os.open(path, os.O_RDONLY | os.O_NOFOLLOW))


def loop() -> None:
    os.symlink("b", "a")
    os.symlink("a", "b")


ERRORS = [
    # ELOOP
    Case("stat-symlink-loop", lambda: os.stat("a"), setup=loop),
    Case("open-symlink-loop", lambda: read("a"), setup=loop),
    Case("create-through-loop", lambda: create("a"), setup=loop),
    Case("stat-through-loop-dir", lambda: os.stat("a/x"), setup=loop),
    Case("stat-self-loop", lambda: os.stat("l"), setup=lambda: os.symlink("l", "l")),
    Case("lstat-loop", lambda: os.lstat("a").st_size, setup=loop),
    Case("open-nofollow-symlink", lambda: open_nofollow("l"),
         setup=steps(lambda: make("f"), lambda: os.symlink("f", "l"))),
    Case("open-nofollow-dangling", lambda: open_nofollow("l"),
         setup=lambda: os.symlink("nowhere", "l")),
    Case("open-nofollow-dir-symlink", lambda: open_nofollow("l"),
         setup=steps(lambda: os.mkdir("d"), lambda: os.symlink("d", "l"))),
    Case("open-nofollow-file", lambda: open_nofollow("f"), setup=lambda: make("f")),
    # ENAMETOOLONG
    Case("long-create", lambda: create(LONG)),
    Case("long-mkdir", lambda: os.mkdir(LONG)),
    Case("long-symlink", lambda: os.symlink("t", LONG)),
    Case("long-rename", lambda: os.rename("f", LONG), setup=lambda: make("f")),
    Case("long-mkfifo", lambda: os.mkfifo(LONG)),
    Case("long-mknod-chr", lambda: mknod_chr(LONG)),
    Case("long-stat", lambda: os.stat(LONG)),
    Case("long-unlink", lambda: os.unlink(LONG)),
    Case("long-component", lambda: os.stat(f"{LONG}/x")),
    Case("long-component-create", lambda: create(f"d/{LONG}/f"), setup=lambda: os.mkdir("d")),
    Case("long-open-read", lambda: read(LONG)),
    Case("name-255-ok", lambda: create("m" * 255)),
    Case("symlink-target-4095", lambda: len(os.readlink(steps(
        lambda: os.symlink("t" * 4095, "l"), lambda: "l")()))),
    # EINVAL, ENOTDIR, EISDIR, ENOTEMPTY
    Case("rename-dir-into-grandchild", lambda: os.rename("d", "d/e/f"),
         setup=lambda: os.makedirs("d/e")),
    Case("rename-dir-onto-own-child", lambda: os.rename("d", "d/e"),
         setup=lambda: os.makedirs("d/e")),
    Case("rename-file-over-dir", lambda: os.rename("f", "d"),
         setup=steps(lambda: make("f"), lambda: os.mkdir("d"))),
    Case("rename-dir-over-file", lambda: os.rename("d", "f"),
         setup=steps(lambda: make("f"), lambda: os.mkdir("d"))),
    Case("rename-dir-over-empty-dir", lambda: os.rename("d", "e"),
         setup=steps(lambda: os.mkdir("d"), lambda: os.mkdir("e"))),
    Case("rename-dir-over-nonempty-dir", lambda: os.rename("d", "e"),
         setup=steps(lambda: os.mkdir("d"), lambda: os.mkdir("e"), lambda: make("e/f"))),
    Case("rename-file-over-symlink-to-dir", lambda: os.rename("f", "l"),
         setup=steps(lambda: make("f"), lambda: os.mkdir("d"), lambda: os.symlink("d", "l"))),
    Case("rename-under-a-file", lambda: os.rename("g", "f/g"),
         setup=steps(lambda: make("f"), lambda: make("g"))),
    Case("rename-from-under-a-file", lambda: os.rename("f/g", "g"), setup=lambda: make("f")),
    Case("rename-file-trailing-slash", lambda: os.rename("f", "g/"), setup=lambda: make("f")),
    Case("rename-missing", lambda: os.rename("nothing", "g")),
    Case("rmdir-file", lambda: os.rmdir("f"), setup=lambda: make("f")),
    Case("rmdir-symlink-to-dir", lambda: os.rmdir("l"),
         setup=steps(lambda: os.mkdir("d"), lambda: os.symlink("d", "l"))),
    Case("rmdir-dot", lambda: os.rmdir("d/."), setup=lambda: os.mkdir("d")),
    Case("rmdir-nonempty-dir-only", lambda: os.rmdir("d"),
         setup=steps(lambda: os.mkdir("d"), lambda: os.mkdir("d/e"))),
    Case("unlink-dir", lambda: os.unlink("d"), setup=lambda: os.mkdir("d")),
    Case("unlink-under-a-file", lambda: os.unlink("f/x"), setup=lambda: make("f")),
    Case("unlink-file-trailing-slash", lambda: os.unlink("f/"), setup=lambda: make("f")),
    Case("mkdir-under-a-file", lambda: os.mkdir("f/d"), setup=lambda: make("f")),
    Case("create-under-a-file", lambda: create("f/g"), setup=lambda: make("f")),
    Case("open-dir-for-write", lambda: write("d"), setup=lambda: os.mkdir("d")),
    Case("open-file-as-dir", lambda: os.close(os.open("f", os.O_RDONLY | os.O_DIRECTORY)),
         setup=lambda: make("f")),
    Case("listdir-file", lambda: os.listdir("f"), setup=lambda: make("f")),
    Case("truncate-dir", lambda: os.truncate("d", 0), setup=lambda: os.mkdir("d")),
    Case("symlink-under-a-file", lambda: os.symlink("t", "f/l"), setup=lambda: make("f")),
    # times of truncation
    Case("open-trunc-times", lambda: times_moved("f", lambda: open_trunc("f")),
         setup=lambda: make("f")),
    Case("open-trunc-empty-times", lambda: times_moved("f", lambda: open_trunc("f")),
         setup=lambda: make("f", data=b"")),
    Case("ftruncate-times", lambda: times_moved("f", lambda: ftruncate("f", 0)),
         setup=lambda: make("f")),
    Case("ftruncate-grow-times", lambda: times_moved("f", lambda: ftruncate("f", 9)),
         setup=lambda: make("f")),
    Case("ftruncate-same-size-times", lambda: times_moved("f", lambda: ftruncate("f", 1)),
         setup=lambda: make("f")),
    Case("truncate-times", lambda: times_moved("f", lambda: os.truncate("f", 0)),
         setup=lambda: make("f")),
    Case("open-rdonly-trunc-times", lambda: times_moved("f", lambda: os.close(
        os.open("f", os.O_RDONLY | os.O_TRUNC))), setup=lambda: make("f", 0o666)),
]  # fmt: skip
"""Errors POSIX names, and the times truncation moves (issue 16 §4)."""


def links_of(*paths: str) -> tuple[Any, ...]:
    """What hard links show of ``paths``: each one's st_nlink, and which of
    them share the first one's inode."""
    stats = [os.lstat(p) for p in paths]
    return tuple(s.st_nlink for s in stats), tuple(s.st_ino == stats[0].st_ino for s in stats)


def linked(*names: str) -> Callable[[], None]:
    """A setup: file ``f`` (and directory ``d``) with the hard links ``names``."""
    return steps(lambda: make("f", data=b"linked"), lambda: os.mkdir("d"),
                 *[lambda n=n: os.link("f", n) for n in names])  # fmt: skip


def link_then(fn: Callable[[], Any]) -> Callable[[], Any]:
    return steps(lambda: os.link("f", "d/g"), fn)


def write_read(writer: str, reader: str) -> bytes:
    with open(writer, "r+b") as w:
        w.write(b"LINK")
    return read(reader)


def held_through_links() -> tuple[Any, ...]:
    """Write through one name while another is open; unlink both; the
    open file stays whole (its st_nlink 0) until closed."""
    fd = os.open("d/g", os.O_RDWR)
    try:
        os.pwrite(fd, b"held", 0)
        os.unlink("f")
        os.unlink("d/g")
        return os.fstat(fd).st_nlink, os.pread(fd, 100, 0)
    finally:
        os.close(fd)


def atime_at(path: str) -> int:
    os.utime(path, ns=(1_000_000_007, 1_600_000_000_123_456_789))
    return os.lstat(path).st_atime_ns


def read_moves_atime(path: str) -> bool:
    """Whether reading ``path`` moved its atime (relatime: it is not after
    the mtime here)."""
    os.utime(path, ns=(1_500_000_000_000_000_001, 1_600_000_000_000_000_001))
    read(path)
    return os.lstat(path).st_atime_ns != 1_500_000_000_000_000_001


def read_twice_moves_atime(path: str) -> bool:
    """Whether a second read moves the atime again (relatime: not within a day)."""
    read(path)
    before = os.lstat(path).st_atime_ns
    time.sleep(0.01)
    read(path)
    return os.lstat(path).st_atime_ns != before


LINKS = [
    Case("file", lambda: steps(lambda: os.link("f", "g"), lambda: links_of("f", "g"))(),
         setup=lambda: make("f")),
    Case("across-dirs", link_then(lambda: links_of("f", "d/g")), setup=linked()),
    Case("third-name", link_then(lambda: steps(lambda: os.link("d/g", "h"),
                                               lambda: links_of("f", "d/g", "h"))()),
         setup=linked()),
    Case("symlink", lambda: steps(lambda: os.link("l", "m", follow_symlinks=False),
                                  lambda: links_of("l", "m"))(),
         setup=lambda: os.symlink("t", "l")),
    Case("fifo", lambda: steps(lambda: os.link("p", "q"), lambda: links_of("p", "q"))(),
         setup=lambda: os.mkfifo("p")),
    Case("dir", lambda: os.link("d", "e"), setup=lambda: os.mkdir("d")),
    Case("missing", lambda: os.link("nothing", "g")),
    Case("into-missing-dir", lambda: os.link("f", "x/g"), setup=lambda: make("f")),
    Case("under-a-file", lambda: os.link("f", "f/g"), setup=lambda: make("f")),
    Case("long-name", lambda: os.link("f", LONG), setup=lambda: make("f")),
    Case("no-write-permission", lambda: os.link("f", "g"), "bob", lambda: make("f", 0o666)),
    Case("into-writable-dir", lambda: os.link("f", "t/g"), "bob",
         steps(lambda: make("f", 0o644, owner=BOBS), lambda: mkdir("t", 0o777))),
    Case("others-file-protected", lambda: os.link("f", "t/g"), "bob",
         steps(lambda: make("f", 0o600, owner=ALICES), lambda: mkdir("t", 0o777))),
    Case("unlink-one-name", lambda: steps(lambda: os.unlink("f"),
                                          lambda: (links_of("d/g"), read("d/g")))(),
         setup=linked("d/g")),
    Case("unlink-both", lambda: steps(lambda: os.unlink("f"), lambda: os.unlink("d/g"),
                                      listing)(), setup=linked("d/g")),
    Case("rename-onto-own-link", lambda: steps(lambda: os.rename("f", "d/g"),
                                               lambda: links_of("f", "d/g"))(),
         setup=linked("d/g")),
    Case("rename-onto-own-link-noreplace", lambda: renameat2("f", "d/g", 1),
         setup=linked("d/g")),
    Case("rename-link-away", lambda: steps(lambda: os.rename("d/g", "h"),
                                           lambda: links_of("f", "h"))(),
         setup=linked("d/g")),
    Case("rename-link-moves-ctime", lambda: rename_moves_ctime("d/g", "h"),
         setup=linked("d/g")),
    Case("rename-file-onto-link", lambda: steps(lambda: os.rename("x", "d/g"),
                                                lambda: (links_of("f"), read("d/g")))(),
         setup=steps(linked("d/g"), lambda: make("x", data=b"other"))),
    Case("rename-dir-holding-link", lambda: steps(lambda: os.rename("d", "e"),
                                                  lambda: links_of("f", "e/g"))(),
         setup=linked("d/g")),
    Case("write-through-other-name", lambda: write_read("d/g", "f"), setup=linked("d/g")),
    Case("truncate-through-other-name", lambda: steps(lambda: os.truncate("d/g", 2),
                                                      lambda: read("f"))(),
         setup=linked("d/g")),
    Case("chmod-through-other-name", lambda: os.chmod("d/g", 0o600), setup=linked("d/g")),
    Case("chown-through-other-name", lambda: os.chown("d/g", ALICE, STAFF),
         setup=linked("d/g")),
    Case("xattr-through-other-name", lambda: steps(
        lambda: os.setxattr("d/g", "user.k", b"v"), lambda: os.getxattr("f", "user.k"))(),
         setup=linked("d/g")),
    Case("held-through-links", held_through_links, setup=linked("d/g")),
    Case("sticky-unlink-others-link", lambda: os.unlink("t/g"), "bob",
         steps(lambda: mkdir("t", 0o1777), lambda: make("t/f", owner=ALICES),
               lambda: os.link("t/f", "t/g"))),
    Case("dir-count", lambda: steps(lambda: os.makedirs("d/e"), lambda: os.mkdir("d/f"),
                                    lambda: make("d/x"), lambda: os.lstat("d").st_nlink)()),
    Case("dir-count-after-rmdir", lambda: steps(lambda: os.rmdir("d/e"),
                                                lambda: os.lstat("d").st_nlink)(),
         setup=lambda: os.makedirs("d/e")),
    Case("dir-count-after-rename-out", lambda: steps(
        lambda: os.rename("d/e", "e"), lambda: (os.lstat("d").st_nlink,
                                                os.lstat(".").st_nlink))(),
         setup=lambda: os.makedirs("d/e")),
]  # fmt: skip
LINKS += [
    Case(f"onto-{kind}", lambda: os.link("f", "x"),
         setup=steps(lambda: make("f"), existing))
    for kind, existing in EXISTING.items()
]  # fmt: skip
"""Hard links (issue 16 §3): link(2), and what rename, unlink and the
attribute calls do to files with several names."""

ATIMES = [
    Case("explicit-atime", lambda: atime_at("f"), setup=lambda: make("f")),
    Case("read-moves-old-atime", lambda: read_moves_atime("f"), setup=lambda: make("f")),
    Case("second-read-keeps-atime", lambda: read_twice_moves_atime("f"),
         setup=lambda: make("f")),
    Case("removexattr-moves-ctime", lambda: os.removexattr("f", "user.k"),
         setup=steps(lambda: make("f"), lambda: os.setxattr("f", "user.k", b"v"))),
    Case("chmod-moves-ctime", lambda: os.chmod("f", 0o600), setup=lambda: make("f")),
    Case("chown-moves-ctime", lambda: os.chown("f", ALICE, -1), setup=lambda: make("f")),
    Case("atime-only-moves-ctime", lambda: utimensat("f", (5, 0), (0, UTIME_OMIT)),
         setup=lambda: make("f")),
]  # fmt: skip
"""Access times, and the metadata changes that move the ctime (§4)."""

TABLES = {
    "chown": CHOWN,
    "chmod": CHMOD,
    "create": CREATE,
    "mknod": MKNOD,
    "remove": REMOVE,
    "times": TIMES,
    "killpriv": KILLPRIV,
    "access": ACCESS,
    "eexist": EEXIST,
    "errors": ERRORS,
    "links": LINKS,
    "atimes": ATIMES,
}


@pytest.mark.parametrize("case", CHOWN, ids=str)
def test_chown(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", CHMOD, ids=str)
def test_chmod(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", CREATE, ids=str)
def test_create_owner(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", MKNOD, ids=str)
def test_mknod(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", REMOVE, ids=str)
def test_unlink_rename(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", TIMES, ids=str)
def test_utimes(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", ACCESS, ids=str)
def test_access(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", EEXIST, ids=str)
def test_making_an_existing_name(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", ERRORS, ids=str)
def test_exact_errors(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", LINKS, ids=str)
def test_links(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", ATIMES, ids=str)
def test_atimes(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


@pytest.mark.parametrize("case", KILLPRIV, ids=str)
def test_setuid_cleared(worlds: tuple[Path, Path], case: Case) -> None:
    check(worlds, case)


def test_rename_across_trees_is_exdev(
    worlds: tuple[Path, Path], mount_grid: Grid, tmp_path: Path
) -> None:
    """Another tree mounted beside the first: rename (of a file, of a
    directory, with RENAME_NOREPLACE) and link between them are EXDEV, as
    between two tmpfs, and nothing moves."""
    here = worlds[0] / f"exdev-{uuid.uuid4().hex[:6]}"
    here.mkdir()
    make(str(here / "f"))
    (here / "d").mkdir()
    with mounted(mount_grid.new_node(tmp_path), tmp_path / "other") as other:
        there = other.mountpoint
        for op in (
            lambda: os.rename(here / "f", there / "f"),
            lambda: os.rename(here / "d", there / "d"),
            lambda: renameat2(str(here / "f"), str(there / "g"), 1),
            lambda: os.link(here / "f", there / "f"),
        ):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EXDEV, e.value
        assert sorted(os.listdir(there)) == []
    assert sorted(os.listdir(here)) == ["d", "f"]


def test_a_users_own_mount_is_single_user(mount_grid: Grid) -> None:
    """Mounted by a user without allow_other, everything is that user's, as
    before owners were kept: entries another machine's root made too, and
    chown to anyone else is EPERM; what the user makes records their ids.

    Where /dev/fuse is 0600 (as on this machine), the test runs itself again
    in a mount namespace of its own with an open node bound over it; nothing
    outside the namespace changes.
    """
    if not os.stat("/dev/fuse").st_mode & 0o006 and not os.environ.get(IN_OPEN_FUSE):
        rerun_with_open_dev_fuse("test_a_users_own_mount_is_single_user")
        return
    base = Path(tempfile.mkdtemp(prefix="gridfs-user-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        node, mnt = mount_grid.new_node(base), base / "mnt"
        with mounted(node, mnt):  # root's mount: the file is root's
            make(str(mnt / "roots"), 0o644)
            assert os.stat(mnt / "roots").st_uid == 0
        subprocess.run(["chown", "-R", f"{NOBODY}:{NOBODY}", node, mnt], check=True)
        daemon = user_daemon(NOBODY, mnt, node, base / "daemon.log")
        mount = Mount(mnt, node).adopt(daemon.pid)
        try:
            assert as_user("root", base, lambda: os.stat("mnt/roots")) == ("error", "EACCES")

            def ids(path: str) -> tuple[int, int]:
                s = os.lstat(path)
                return s.st_uid, s.st_gid

            seen = as_user("nobody", mnt, lambda: (ids("roots"), write("roots"), ids(".")))
            assert seen == ("ok", ((NOBODY, NOBODY), 4, (NOBODY, NOBODY)))
            made = as_user("nobody", mnt, steps(lambda: create("new"), lambda: os.mkfifo("p")))
            assert made == ("ok", None)
            assert as_user("nobody", mnt, lambda: os.chown("new", BOB, -1)) == ("error", "EPERM")
            assert as_user("nobody", mnt, lambda: os.chown("new", -1, STAFF)) == ("error", "EPERM")
            assert as_user("nobody", mnt, lambda: os.chown("new", NOBODY, NOBODY)) == ("ok", None)
        finally:
            mount.unmount(strict=True)
            daemon.wait(10)
        with mounted(node, mnt):  # root's mount shows what was stored
            assert {n: ids_of(mnt / n) for n in ("roots", "new", "p")} == {
                "roots": (0, 0),
                "new": (NOBODY, NOBODY),
                "p": (NOBODY, NOBODY),
            }
            assert (mnt / "roots").read_bytes() == b"more"
    finally:
        shutil.rmtree(base, ignore_errors=True)


IN_OPEN_FUSE = "GRIDFS_TEST_OPEN_DEV_FUSE"


def rerun_with_open_dev_fuse(test: str) -> None:
    """Run ``test`` of this file in a private mount namespace where
    /dev/fuse is a 0666 node bound over the real one."""
    scratch = Path(tempfile.mkdtemp(prefix="gridfs-devfuse-"))
    try:
        script = (
            f"mknod {scratch}/fuse c 10 229 && chmod 666 {scratch}/fuse && "
            f'mount --bind {scratch}/fuse /dev/fuse && exec "$@"'
        )
        namespace = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
        pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        proc = subprocess.run(
            [*namespace, *pytest_cmd, f"{__file__}::{test}"],
            env={**os.environ, IN_OPEN_FUSE: "1"},
            capture_output=True,
            timeout=300,
        )
        out = proc.stdout.decode(errors="replace")
        assert proc.returncode == 0 and "1 passed" in out, out[-3000:]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def user_daemon(uid: int, mnt: Path, node: Path, log: Path) -> subprocess.Popen[bytes]:
    """``gridfs mount --foreground`` run by ``uid``, once it is mounted.  The
    venv's interpreter lives under /root here, out of another user's reach:
    the system's Python of the same version runs it with the venv's packages."""
    packages = (
        Path(GRIDFS).parent.parent
        / "lib"
        / f"python{sys.version_info[0]}.{sys.version_info[1]}"
        / "site-packages"
    )
    code = (
        # The venv's packages go first: the system's own (an older
        # cryptography, say) must not shadow them.
        f"import site, sys; before = list(sys.path); site.addsitedir({str(packages)!r}); "
        "sys.path[:] = [p for p in sys.path if p not in before] + before; "
        "from gridfs.__main__ import main; sys.exit(main())"
    )
    args = ["mount", str(mnt), "--foreground", "--node", str(node), "-o", "refresh=1"]
    user = [f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            ["setpriv", *user, "/usr/bin/python3.11", "-c", code, *args],
            stdout=out, stderr=out, env={"HOME": str(mnt.parent), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while not is_mounted(mnt):
        assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    return daemon


def ids_of(path: Path) -> tuple[int, int]:
    s = os.lstat(path)
    return s.st_uid, s.st_gid


def test_owners_modes_and_special_files_survive_a_remount(mount_node: Path, tmp_path: Path) -> None:
    """What the mount showed is what the grid keeps: owners, setuid/setgid/
    sticky bits, FIFOs, sockets and device numbers come back the same after
    the queue was uploaded and the tree read again from the grid."""
    mnt = tmp_path / "mnt"

    def seen() -> dict[str, tuple[Any, ...]]:
        out = {}
        for name in sorted(os.listdir(mnt / "top")):
            s = os.lstat(mnt / "top" / name)
            mode = (stat.S_IFMT(s.st_mode), oct(stat.S_IMODE(s.st_mode)))
            out[name] = (*mode, s.st_uid, s.st_gid, s.st_rdev)
        return out

    with mounted(mount_node, mnt, options="refresh=1,allow_other") as m:
        top = mnt / "top"
        mkdir(str(top), 0o3777, (BOB, STAFF))
        make(str(top / "tool"), 0o6755, (ALICE, STAFF))
        os.chmod(top / "tool", 0o6755)
        os.mkfifo(top / "pipe", 0o620)
        os.chown(top / "pipe", BOB, BOB)
        mknod_chr(str(top / "null"), 1, 3)
        os.mknod(top / "sock", 0o755 | stat.S_IFSOCK)
        os.symlink("tool", top / "link")
        os.lchown(top / "link", ALICE, ALICE)
        os.mkdir(top / "sub")  # in a setgid directory: its group, setgid too
        before = seen()
        m.flush()
    assert before["sub"][1:4] == ("0o2755", 0, STAFF)
    assert before["tool"][1:4] == ("0o6755", ALICE, STAFF)
    with mounted(mount_node, mnt, options="refresh=1,allow_other"):
        assert seen() == before
        assert oct(stat.S_IMODE(os.stat(mnt / "top").st_mode)) == "0o3777"


def test_uidmap_shows_stored_ids_as_local_ones(mount_node: Path, tmp_path: Path) -> None:
    """-o uidmap=/gidmap=: a stored id shows as its local one, and a local
    one is stored as the stored one (new entries, chown); other ids pass."""
    mnt = tmp_path / "mnt"
    maps = "uidmap=1001:2001,uidmap=5000:6000:10,gidmap=3000:4000"
    with mounted(mount_node, mnt, options=f"refresh=1,allow_other,{maps}"):
        make(str(mnt / "f"), owner=(2001, 4000))  # stored as alice, staff
        make(str(mnt / "g"), owner=(6005, BOB))  # 5005, and bob as bob
        os.chown(mnt / "g", -1, 4000)
        shown = {n: (os.stat(mnt / n).st_uid, os.stat(mnt / n).st_gid) for n in "fg"}
        assert shown == {"f": (2001, 4000), "g": (6005, 4000)}
    with mounted(mount_node, mnt, options="refresh=1,allow_other"):
        stored = {n: (os.stat(mnt / n).st_uid, os.stat(mnt / n).st_gid) for n in "fg"}
        assert stored == {"f": (ALICE, STAFF), "g": (5005, STAFF)}


def test_atimes_survive_a_remount(mount_node: Path, tmp_path: Path) -> None:
    """An atime set explicitly, and one a read moved (relatime), are stored
    in nanoseconds: a later mount shows them."""
    mnt = tmp_path / "mnt"
    with mounted(mount_node, mnt, options="refresh=1") as m:
        make(str(mnt / "set"))
        os.utime(mnt / "set", ns=(1_234_567_890_123_456_789, 1_600_000_000_000_000_000))
        make(str(mnt / "read"))
        os.utime(mnt / "read", ns=(1_000_000_000, 1_600_000_000_000_000_000))
        read(str(mnt / "read"))
        moved = os.stat(mnt / "read").st_atime_ns
        assert moved > 1_600_000_000_000_000_000
        m.flush()
    with mounted(mount_node, mnt, options="refresh=1"):
        assert os.stat(mnt / "set").st_atime_ns == 1_234_567_890_123_456_789
        assert os.stat(mnt / "read").st_atime_ns == moved


def test_noatime_reads_leave_the_atime_and_queue_nothing(mount_node: Path, tmp_path: Path) -> None:
    """-o noatime: a read whose atime relatime would move leaves it, and
    queues no change (so a mount that only reads never commits)."""
    mnt = tmp_path / "mnt"
    with mounted(mount_node, mnt, options="refresh=1") as m:
        make(str(mnt / "read"))
        os.utime(mnt / "read", ns=(1_000_000_000, 1_600_000_000_000_000_000))
        m.flush()
    with mounted(mount_node, mnt, options="refresh=1,noatime"):
        read(str(mnt / "read"))
        assert os.stat(mnt / "read").st_atime_ns == 1_000_000_000
        queue = subprocess.run(
            [GRIDFS, "queue", "--node", str(mount_node)], capture_output=True, text=True
        )
        assert "0 pending steps" in queue.stdout, queue.stdout + queue.stderr
