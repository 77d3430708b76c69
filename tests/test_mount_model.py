"""Model-based test: random operations on the mount and on a local directory
must give the same results, the same errors and the same trees."""

from __future__ import annotations

import errno
import os
import random
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import Mount, gridfs  # noqa: E402

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

NAMES = ["a", "b", "d"]
paths = st.sampled_from(["a", "b", "d", "a", "b", "d", "d/a", "d/b", "d/d", "a/a", "b/d/a"])
data = st.one_of(
    st.binary(max_size=300),
    # around the inline limit (16 KiB); pseudo-random but reproducible
    st.tuples(st.integers(15_000, 20_000), st.integers(0, 2**32)).map(
        lambda t: random.Random(t[1]).randbytes(t[0])
    ),
)
offsets = st.sampled_from([0, 1, 100, 4095, 4096, 16_384, 70_000])
sizes = st.sampled_from([0, 1, 50, 5000, 16_385, 1_200_000])
modes = st.sampled_from([0o600, 0o644, 0o755, 0o400, 0o4755, 0o2755, 0o6711, 0o1777])
ids = st.sampled_from([-1, 0, 1001, 1002, 65534])
NB = os.O_NONBLOCK
"""Every open is non-blocking: a path may be a FIFO, whose open would
otherwise wait for the other end (on a regular file the flag does nothing)."""

Outcome = tuple[str, Any]


def attempt(fn: Callable[[Path], Any], root: Path) -> Outcome:
    try:
        return ("ok", fn(root))
    except OSError as e:
        return ("error", errno.errorcode.get(e.errno or 0, e.errno))


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything under root: kind, permission bits, owner, group, size,
    content, and for a file or FIFO its link count and the names that share
    its inode."""
    out: dict[str, tuple[Any, ...]] = {}
    names: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = os.lstat(p)
            rel = str(p.relative_to(root))
            mode, ids = stat.S_IMODE(st_.st_mode), (st_.st_uid, st_.st_gid)
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", mode, *ids, 0, b"")
                continue
            names.setdefault(st_.st_ino, []).append(rel)
            if stat.S_ISFIFO(st_.st_mode):
                out[rel] = ("fifo", mode, *ids, 0, b"", st_.st_nlink, st_.st_ino)
            else:
                out[rel] = (
                    "file",
                    mode,
                    *ids,
                    st_.st_size,
                    p.read_bytes(),
                    st_.st_nlink,
                    st_.st_ino,
                )
    return {  # (an inode number as the names that share it)
        rel: (*v[:-1], tuple(sorted(names[v[-1]]))) if len(v) > 6 else v for rel, v in out.items()
    }


def make_machine(mount: Mount, local_base: Path) -> type[RuleBasedStateMachine]:
    class MountMatchesLocal(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            name = f"m-{uuid.uuid4().hex[:8]}"
            self.mnt = mount.mountpoint / name
            self.local = local_base / name
            self.mnt.mkdir()
            self.local.mkdir()
            os.chmod(self.mnt, 0o755)
            os.chmod(self.local, 0o755)
            self.held: dict[Path, int] = {}
            """a file kept open across steps (root → fd), in both worlds"""
            for root in (self.mnt, self.local):  # something to work on from the start
                (root / "d").mkdir()
                (root / "a").write_bytes(b"start")

        def teardown(self) -> None:
            self.release()

        def same(self, fn: Callable[[Path], Any]) -> Outcome:
            expected = attempt(fn, self.local)
            got = attempt(fn, self.mnt)
            assert got == expected
            return got

        @rule(path=paths, content=data, offset=offsets)
        def write_at(self, path: str, content: bytes, offset: int) -> None:
            def op(root: Path) -> int:
                fd = os.open(root / path, os.O_WRONLY | os.O_CREAT | NB, 0o644)
                try:
                    return os.pwrite(fd, content, offset)
                finally:
                    os.close(fd)

            self.same(op)

        @rule(path=paths, content=data)
        def create_truncating(self, path: str, content: bytes) -> None:
            def op(root: Path) -> int:
                fd = os.open(root / path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | NB, 0o666)
                try:
                    return os.write(fd, content)
                finally:
                    os.close(fd)

            self.same(op)

        @rule(path=paths, content=data)
        def append(self, path: str, content: bytes) -> None:
            def op(root: Path) -> int:
                fd = os.open(root / path, os.O_WRONLY | os.O_APPEND | NB)
                try:
                    os.write(fd, content)
                    return os.fstat(fd).st_size
                finally:
                    os.close(fd)

            self.same(op)

        @rule(path=paths, size=sizes)
        def truncate(self, path: str, size: int) -> None:
            self.same(lambda root: os.truncate(root / path, size))

        @rule(path=paths, offset=offsets)
        def read(self, path: str, offset: int) -> None:
            def op(root: Path) -> bytes:
                with open(os.open(root / path, os.O_RDONLY | NB), "rb") as f:
                    if not f.seekable():
                        return f.read(20_000)
                    f.seek(offset)
                    return f.read(20_000)

            self.same(op)

        @rule(path=paths)
        def mkdir(self, path: str) -> None:
            self.same(lambda root: os.mkdir(root / path, 0o755))

        @rule(path=paths)
        def rmdir(self, path: str) -> None:
            self.same(lambda root: os.rmdir(root / path))

        @rule(path=paths)
        def unlink(self, path: str) -> None:
            self.same(lambda root: os.unlink(root / path))

        @rule(src=paths, dst=paths)
        def rename(self, src: str, dst: str) -> None:
            self.same(lambda root: os.rename(root / src, root / dst))

        @rule(path=paths, mode=modes)
        def chmod(self, path: str, mode: int) -> None:
            self.same(lambda root: os.chmod(root / path, mode))

        @rule(path=paths, uid=ids, gid=ids)
        def chown(self, path: str, uid: int, gid: int) -> None:
            self.same(lambda root: os.chown(root / path, uid, gid))

        @rule(src=paths, dst=paths)
        def link(self, src: str, dst: str) -> None:
            self.same(lambda root: os.link(root / src, root / dst))

        @rule(src=paths, dst=paths)
        def rename_link(self, src: str, dst: str) -> None:
            """A link made, then one of its names renamed onto the other
            name, or elsewhere (POSIX: onto a link of the same inode, nothing
            happens)."""
            self.same(lambda root: os.link(root / src, root / dst))
            self.same(lambda root: os.rename(root / dst, root / src))

        @rule(path=paths, mode=st.sampled_from([0o644, 0o600]))
        def mkfifo(self, path: str, mode: int) -> None:
            self.same(lambda root: os.mkfifo(root / path, mode))

        @rule(path=st.sampled_from(["", *NAMES, "a/a", "d/a", "d/d", "b/d"]))
        def listdir(self, path: str) -> None:
            self.same(lambda root: sorted(os.listdir(root / path)))

        @rule(path=paths)
        def stat_size(self, path: str) -> None:
            def op(root: Path) -> tuple[bool, int]:
                s = os.stat(root / path)
                return stat.S_ISDIR(s.st_mode), 0 if stat.S_ISDIR(s.st_mode) else s.st_size

            self.same(op)

        @rule(path=paths)
        def hold(self, path: str) -> None:
            """Keep a file open across the next steps (renames, unlinks...)."""
            self.release()
            fds: dict[Path, int] = {}

            def op(root: Path) -> None:
                fds[root] = os.open(root / path, os.O_RDWR | NB)

            if self.same(op)[0] == "ok":
                self.held = fds

        @rule(content=data, offset=offsets)
        def held_write(self, content: bytes, offset: int) -> None:
            if self.held:
                self.same(lambda root: os.pwrite(self.held[root], content, offset))

        @rule(offset=offsets)
        def held_read(self, offset: int) -> None:
            if self.held:
                self.same(
                    lambda root: (
                        os.fstat(self.held[root]).st_size,
                        os.pread(self.held[root], 20_000, offset),
                    )
                )

        @rule(size=sizes)
        def held_truncate(self, size: int) -> None:
            if self.held:
                self.same(lambda root: os.ftruncate(self.held[root], size))

        @rule()
        def release(self) -> None:
            for fd in self.held.values():
                os.close(fd)
            self.held = {}

        @rule(dice=st.integers(0, 5))
        def flush(self, dice: int) -> None:
            """Now and then, let the grid catch up: later reads and partial
            writes then start from uploaded content."""
            if dice == 0:
                # Retried: `gridfs queue flush` through the control socket has
                # been seen to fail with "connection closed" under load (an
                # open bug, noted in the issue); the tree must match anyway.
                for _ in range(3):
                    proc = gridfs("queue", "flush", "--node", mount.node, check=False)
                    if proc.returncode == 0:
                        break
                    time.sleep(2)
                assert proc.returncode == 0, proc.stderr
                assert mount.queue_length() == 0

        @invariant()
        def trees_match(self) -> None:
            assert tree(self.mnt) == tree(self.local)

    return MountMatchesLocal


def test_mount_behaves_like_a_local_directory(shared_mount: Mount, tmp_path: Path) -> None:
    machine = make_machine(shared_mount, tmp_path)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=int(os.environ.get("GRIDFS_MODEL_EXAMPLES", "15")),
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
