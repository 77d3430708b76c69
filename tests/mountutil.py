"""Fixtures for the mount tests: a local grid started with the CLI, and mounts.

Test modules load this as a plugin (``pytest_plugins = ["tests.mountutil"]``).
``mount_grid`` (module scope) runs ``gridfs grid start DIR --servers 5 --k 3
--n 5 --happy 3``, so two dead servers still leave k shares of every file, and
stops it afterwards.  ``mount_node`` (function scope) is a fresh client node
with its own root tree (``gridfs init``), so a test sees only its own files;
``fresh_mount`` mounts one.  Modules that want one mount for many tests use
``shared_mount`` (module scope) with ``mount_dir`` (a fresh directory in it
per test).

Every mount is unmounted in teardown, even when the test failed, and a
watchdog kills a daemon that hangs, so a stuck FUSE request fails the test
(ENOTCONN) instead of hanging the run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
GRIDFS = str(VENV_BIN / "gridfs")
K, N, HAPPY, SERVERS = 3, 5, 3, 5
WATCHDOG = float(os.environ.get("GRIDFS_MOUNT_WATCHDOG", "150"))
"""Seconds one test may keep a mount before its daemon is killed."""


def gridfs(
    *args: str | int | os.PathLike[str], timeout: float = 90, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [GRIDFS, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"gridfs {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def run(
    cmd: list[str], cwd: Path | None = None, timeout: float = 120, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a tool; fail the test with its output when it exits non-zero."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\nstdout: {proc.stdout[-3000:]}\n"
            f"stderr: {proc.stderr[-3000:]}"
        )
    return proc


def is_mounted(mountpoint: Path) -> bool:
    target = str(Path(mountpoint).absolute())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return False


def wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_for(predicate, timeout: float = 30, interval: float = 0.2, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Grid:
    dir: Path
    introducer: str
    _reader: Path | None = None

    @property
    def client(self) -> Path:
        return self.dir / "client"

    def storage_pids(self) -> dict[int, int]:
        out = {}
        for p in sorted(self.dir.glob("storage-*")):
            with contextlib.suppress(FileNotFoundError, ValueError):
                pid = int((p / "node.pid").read_text().strip())
                if pid_alive(pid):
                    out[int(p.name.split("-")[1])] = pid
        return out

    def kill_servers(self, *numbers: int) -> None:
        """kill -9 storage servers, and wait until they are gone for good (a
        zombie still counts as running for ``gridfs grid start``)."""
        pids = self.storage_pids()
        for i in numbers:
            os.kill(pids[i], signal.SIGKILL)
        for i in numbers:

            def reaped(pid: int = pids[i]) -> bool:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return True
                return False

            wait_for(reaped, timeout=30, interval=0.05, what=f"storage-{i} to be reaped")

    def start(self) -> None:
        gridfs(
            "grid", "start", self.dir, "--servers", SERVERS, "--k", K, "--n", N,
            "--happy", HAPPY, timeout=120,
        )  # fmt: skip

    def new_node(self, parent: Path) -> Path:
        """A fresh client node with its own root tree (alias grid:)."""
        node = parent / f"node-{uuid.uuid4().hex[:8]}"
        invite = gridfs("grid", "invite", self.dir).stdout.strip()  # (a member of the grid)
        gridfs(
            "init", "--node", node, "--invite", invite,
            "--k", K, "--n", N, "--happy", HAPPY,
        )  # fmt: skip
        return node

    def reader(self) -> Path:
        """Another client node (its own queue and caches) to look at trees from outside."""
        if self._reader is None:
            self._reader = self.new_node(self.dir)
        return self._reader


def tree_cap(node: Path, alias: str = "grid") -> str:
    out = gridfs("alias", "list", "--node", node).stdout
    for line in out.splitlines():
        name, _, cap = line.partition(":")
        if name.strip() == alias:
            return cap.strip()
    raise AssertionError(f"no alias {alias} in {out!r}")


def outside(grid: Grid, node: Path, *args: str, timeout: float = 90) -> bytes:
    """Run ``gridfs ARGS`` on the reader node, where ``t:`` stands for the tree
    of ``node`` (another client: nothing of the mount's queue shows there);
    its stdout."""
    reader = grid.reader()
    cap = tree_cap(node)
    alias = "t" + re.sub(r"[^a-z0-9]", "", node.name)
    if cap not in gridfs("alias", "list", "--node", reader).stdout:
        gridfs("alias", "add", alias, cap, "--node", reader)
    args = tuple(a.replace("t:", f"{alias}:", 1) if a.startswith("t:") else a for a in args)
    cmd = [GRIDFS, *args, "--node", str(reader)]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr!r}")
    return proc.stdout


@dataclass
class Mount:
    mountpoint: Path
    node: Path
    options: str = "refresh=1"
    tree: str = "grid"
    pid: int | None = None
    _watchdog: threading.Timer | None = field(default=None, repr=False)

    def mount(self) -> Mount:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        args = ["mount", self.mountpoint, self.tree, "--node", self.node]
        if self.options:
            args += ["-o", self.options]
        out = gridfs(*args, timeout=90).stdout
        m = re.search(r"\(pid (\d+);", out)
        assert m, out
        self.pid = int(m.group(1))
        assert is_mounted(self.mountpoint)
        self._arm()
        return self

    def remount(self) -> Mount:
        self.unmount(strict=True)
        assert not is_mounted(self.mountpoint)
        return self.mount()

    def adopt(self, pid: int) -> Mount:
        """Track a mount made another way (mount -t gridfs)."""
        self.pid = pid
        self._arm()
        return self

    def _arm(self) -> None:
        self._disarm()
        pid = self.pid

        def fire() -> None:
            if pid is not None and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)  # pending requests fail with ENOTCONN

        self._watchdog = threading.Timer(WATCHDOG, fire)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def log(self) -> str:
        try:
            return (self.node / "mount.log").read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def status(self) -> str:
        return gridfs("status", "--node", self.node).stdout

    def queue_length(self) -> int:
        """Pending steps of this node's queues (read from the queue databases)."""
        out = gridfs("queue", "--node", self.node).stdout
        m = re.search(r"^(\d+) pending steps$", out, re.M)
        assert m, out
        return int(m.group(1))

    def pending_kinds(self) -> set[str]:
        """The kinds of this node's pending queue steps."""
        out = gridfs("queue", "--node", self.node).stdout
        return set(re.findall(r"^\S+: +\d+ (\S+)", out, re.M))

    def flush(self, timeout: float = 90) -> None:
        gridfs("queue", "flush", "--node", self.node, timeout=timeout)
        assert self.queue_length() == 0

    def unmount(self, timeout: float = 60, strict: bool = False) -> None:
        """Unmount (``gridfs umount``) and wait for the daemon to finish
        draining and exit; a busy or dead mount is detached instead, and with
        ``strict`` that fails the test."""
        self._disarm()
        problem = ""
        try:
            if is_mounted(self.mountpoint):
                try:  # (it waits for the daemon to drain its queue and exit)
                    proc = subprocess.run(
                        [GRIDFS, "umount", str(self.mountpoint)],
                        capture_output=True,
                        text=True,
                        timeout=timeout + 30,  # (the daemon's drain_timeout is 60 s)
                    )
                    failed = proc.returncode != 0
                    problem = f"gridfs umount failed: {proc.stderr.strip()}" if failed else ""
                except subprocess.TimeoutExpired:
                    failed, problem = True, f"gridfs umount did not return in {timeout + 30:.0f}s"
                if failed:  # busy or dead: detach it
                    subprocess.run(
                        ["fusermount3", "-u", "-z", str(self.mountpoint)],
                        capture_output=True,
                        timeout=30,
                    )
        finally:
            if self.pid is not None and not wait_dead(self.pid, timeout):
                problem = problem or f"the daemon did not exit {timeout:.0f}s after unmounting"
                os.kill(self.pid, signal.SIGKILL)
                wait_dead(self.pid, 10)
            self.pid = None
        if strict and problem:
            raise AssertionError(f"{problem}\n{self.log()}")

    def kill9(self) -> None:
        assert self.pid is not None
        self._disarm()
        os.kill(self.pid, signal.SIGKILL)
        assert wait_dead(self.pid, 10)
        self.pid = None
        run(["fusermount3", "-u", "-z", str(self.mountpoint)])
        assert not is_mounted(self.mountpoint)


@contextlib.contextmanager
def mounted(node: Path, mountpoint: Path, options: str = "refresh=1") -> Iterator[Mount]:
    m = Mount(mountpoint, node, options)
    try:
        yield m.mount()
    finally:
        m.unmount()


# -- fixtures ---------------------------------------------------------------
@pytest.fixture(scope="module")
def mount_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    root = tmp_path_factory.mktemp("grid")
    g = Grid(root, "")
    try:
        g.start()
        text = (root / "client" / "gridfs.toml").read_text()
        m = re.search(r'introducer = "([^"]+)"', text)
        assert m, text
        g.introducer = m.group(1)
        yield g
    finally:
        subprocess.run([GRIDFS, "grid", "stop", str(root)], capture_output=True, timeout=60)


@pytest.fixture
def mount_node(mount_grid: Grid, tmp_path: Path) -> Path:
    return mount_grid.new_node(tmp_path)


@pytest.fixture
def fresh_mount(mount_node: Path, tmp_path: Path) -> Iterator[Mount]:
    """A fresh tree mounted at ``tmp_path/mnt`` (unmounted afterwards)."""
    with mounted(mount_node, tmp_path / "mnt") as m:
        yield m


@pytest.fixture(scope="module")
def shared_mount(mount_grid: Grid, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("shared")
    node = mount_grid.new_node(base)
    with mounted(node, base / "mnt") as m:
        yield m


@pytest.fixture
def mount_dir(shared_mount: Mount) -> Iterator[Path]:
    """A fresh, empty directory of its own inside the module's mount."""
    assert shared_mount.pid is not None and pid_alive(shared_mount.pid), shared_mount.log()
    shared_mount._arm()  # the watchdog counts per test
    d = shared_mount.mountpoint / f"t-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    yield d
