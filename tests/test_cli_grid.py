"""The real ``gridfs`` command against a local grid of real processes."""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gridfs.client.grid import open_grid
from gridfs.client.session import TreeSession
from gridfs.config import NodeConfig, NodeDir
from gridfs.dirnode import Entry
from gridfs.net.identity import NodeAddress

from .helpers import filesystem_type, resident_pages

SERVERS = 5
NODES = SERVERS + 1  # and the introducer


def gridfs(
    *args: str, node: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    env.pop("GRIDFS_NODE", None)
    if node is not None:
        env["GRIDFS_NODE"] = str(node)
    return subprocess.run(
        [sys.executable, "-m", "gridfs", *args], capture_output=True, env=env, timeout=timeout
    )


def ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def one_clean_error_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    stderr = proc.stderr.decode()
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("gridfs: error: "), stderr
    return stderr


@contextlib.contextmanager
def three_server_grid(root: Path) -> Iterator[Path]:
    """``gridfs grid start`` of 3 servers (3-of-3) in ``root``, stopped on exit."""
    try:
        ok(gridfs("grid", "start", str(root), "--servers", "3", "--n", "3", "--happy", "3"))
        yield root
    finally:
        if root.exists():
            gridfs("grid", "stop", str(root))


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A grid directory; whatever runs in it is stopped at the end."""
    root = tmp_path_factory.mktemp("cli-grid") / "grid"
    try:
        yield root
    finally:
        if root.exists():
            gridfs("grid", "stop", str(root))


@pytest.fixture
def grid(grid_dir: Path) -> Path:
    """The grid, (re)started: ``grid start`` is idempotent."""
    out = ok(gridfs("grid", "start", str(grid_dir), "--servers", str(SERVERS), "--happy", "5"))
    assert f"{SERVERS} storage servers" in out
    return grid_dir


def test_a_command_imports_without_the_cyclic_collector_then_turns_it_on(
    tmp_path: Path,
) -> None:
    """gridfs.__main__ keeps the collector off while the modules load (it
    found no garbage there and cost 10-30 ms a command); cli.main freezes what
    they made and turns the collector back on."""
    report = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print(gc.get_stats()[0]['collections'], gc.isenabled(),"
        " gc.get_freeze_count() > 10_000))\n"
        f"sys.argv = ['gridfs', 'grid', 'status', {str(tmp_path)!r}]\n"
        "from gridfs.__main__ import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", report], capture_output=True, text=True)
    collections, enabled, frozen = proc.stdout.split()
    assert (enabled, frozen) == ("True", "True")
    assert int(collections) < 40, collections  # some 80 with the collector on throughout


def test_node_url_is_never_read_half_written(tmp_path: Path) -> None:
    """``grid start`` polls a starting node's node.url; it once read it empty
    (written in place) and gave up on the grid with "not a node address"."""
    node = NodeDir(tmp_path / "s")
    node.create(NodeConfig("storage", "s"))
    node.url_path.write_text("")  # as a reader could catch an in-place write
    assert node.address() is None  # not started yet, not an error
    address = NodeAddress(node.key().node_id, "127.0.0.1", 4321)
    node.url_path.write_text("gridfs://stale\n")
    before = node.url_path.stat().st_ino
    node.publish_address(address)
    assert node.url_path.stat().st_ino != before  # a new file renamed over, not rewritten
    assert node.address() == address


def test_put_get_round_trip(grid: Path, tmp_path: Path) -> None:
    status = ok(gridfs("grid", "status", str(grid)))
    assert status.count("running (pid") == NODES
    assert f"{NODES} of {NODES} nodes running" in status

    src = tmp_path / "in.bin"
    src.write_bytes(random.Random(1).randbytes(300_000))
    client = grid / "client"
    cap = ok(gridfs("put", str(src), node=client)).strip()
    assert cap.startswith("gridfs:") and "\n" not in cap

    out = tmp_path / "out.bin"
    ok(gridfs("get", cap, "-o", str(out), node=client))
    assert out.read_bytes() == src.read_bytes()
    streamed = gridfs("get", cap, node=client)
    assert streamed.returncode == 0, streamed.stderr.decode()
    assert streamed.stdout == src.read_bytes()
    assert streamed.stderr == b""


def test_put_one_object_stores_a_large_file_unchunked(grid: Path, tmp_path: Path) -> None:
    """``--one-object``: the format before chunked files (bench_grid's
    baseline), one CHK object read back like any other."""
    src = tmp_path / "big.bin"
    src.write_bytes(random.Random(2).randbytes(3 * 1024 * 1024))
    client = grid / "client"
    chunked = ok(gridfs("put", str(src), node=client)).strip()
    whole = ok(gridfs("put", "--one-object", str(src), node=client)).strip()
    assert chunked.startswith("gridfs:chunked:")
    assert whole.startswith("gridfs:chk:"), whole
    out = tmp_path / "out.bin"
    ok(gridfs("get", whole, "-o", str(out), node=client))
    assert out.read_bytes() == src.read_bytes()


def test_get_leaves_its_output_out_of_the_page_cache(grid: Path, tmp_path: Path) -> None:
    """A download is written behind: its output's pages leave the page cache
    DROP_LAG behind the newest write, whether named by -o or by a shell
    redirect (> or >>), and the file holds every byte."""
    if filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("a memory filesystem keeps its pages: they are the data")
    src = tmp_path / "in.bin"
    src.write_bytes(random.Random(3).randbytes(32 << 20))
    client = grid / "client"
    cap = ok(gridfs("put", str(src), node=client)).strip()
    named, redirected, appended = (tmp_path / f"{n}.bin" for n in ("named", "redir", "append"))
    ok(gridfs("get", cap, "-o", str(named), node=client))
    appended.write_bytes(b"already here\n")
    env = dict(os.environ, GRIDFS_NODE=str(client))
    for out, mode in ((redirected, "wb"), (appended, "ab")):  # > and >>
        with open(out, mode) as f:
            cmd = [sys.executable, "-m", "gridfs", "get", cap]
            assert subprocess.run(cmd, stdout=f, env=env, timeout=60).returncode == 0
    for out in (named, redirected, appended):
        pages = resident_pages(out)
        assert pages <= (16 << 20) // mmap.PAGESIZE, f"{out.name}: {pages} pages cached"
    assert named.read_bytes() == redirected.read_bytes() == src.read_bytes()
    assert appended.read_bytes() == b"already here\n" + src.read_bytes()


def test_get_malformed_cap_is_a_usage_error(tmp_path: Path) -> None:
    proc = gridfs("get", "gridfs:chk:not-a-cap", "-o", str(tmp_path / "out"), node=tmp_path)
    assert proc.returncode == 2
    one_clean_error_line(proc)
    assert not (tmp_path / "out").exists()


def test_get_with_grid_stopped_fails_cleanly(grid: Path, tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    src.write_bytes(random.Random(2).randbytes(100_000))
    client = grid / "client"
    cap = ok(gridfs("put", str(src), node=client)).strip()

    stopped = ok(gridfs("grid", "stop", str(grid)))
    assert f"stopped {NODES} nodes" in stopped
    status = gridfs("grid", "status", str(grid))
    assert status.returncode != 0
    assert f"0 of {NODES} nodes running" in status.stdout.decode()

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = gridfs("get", cap, "-o", str(out_dir / "file.bin"), node=client)
    assert proc.returncode not in (0, 2)
    assert "no usable share found: 0 of 0 servers answered" in one_clean_error_line(proc)
    assert list(out_dir.iterdir()) == []  # neither the file nor a temporary


def test_cp_r_from_the_grid_makes_fifos_and_sockets(grid: Path, tmp_path: Path) -> None:
    """A tree a mount filled with a FIFO and a socket copies out as such
    (with their modes), not as directories."""

    async def put_specials() -> None:
        async with open_grid(NodeDir(grid / "client")) as client:
            session = TreeSession(client, "grid")
            for name, kind, mode in (("p", "fifo", 0o640), ("s", "sock", 0o755)):
                entry = Entry(kind, "", 0, mode, 1, 1, uid=0, gid=0)
                session.queue.add_file(None, f"/specials/{name}", entry)
            await session.queue.flush(session)

    trio.run(put_specials)
    ok(gridfs("cp", "-r", "grid:/specials", str(tmp_path / "out"), node=grid / "client"))
    fifo, sock = os.lstat(tmp_path / "out" / "p"), os.lstat(tmp_path / "out" / "s")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o640 & ~current_umask()
    assert stat.S_ISSOCK(sock.st_mode)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cp_r_keeps_the_directories_times(grid: Path, tmp_path: Path) -> None:
    """Each directory copied in keeps its local mtime, although every name
    put in it moves it (they are put again after their contents); entries
    take now as their ctime, as a copy's ctime is."""
    src = tmp_path / "tree"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a")
    (src / "sub" / "big.bin").write_bytes(os.urandom(100_000))
    (src / "sub" / "deeper" / "c.txt").write_bytes(b"c")
    old = {"": 1_500_000_000_000_000_000, "sub": 1_510_000_000_000_000_000}
    old["sub/deeper"] = 1_520_000_000_000_000_000
    os.utime(src / "a.txt", ns=(1_400_000_000_000_000_000,) * 2)
    for rel in sorted(old, reverse=True):  # (deepest first: a utime is not a new name)
        os.utime(src / rel, ns=(old[rel], old[rel]))
    started = time.time_ns()
    ok(gridfs("cp", "-r", str(src), "grid:/copied", node=grid / "client"))

    async def entries() -> dict[str, tuple[int, int]]:
        async with open_grid(NodeDir(grid / "client")) as client:
            session = TreeSession(client, "grid")
            paths = [*old, "a.txt"]
            found = [await session.lookup(f"/copied/{rel}".rstrip("/")) for rel in paths]
            return {rel: (e.mtime_ns, e.ctime_ns) for rel, e in zip(paths, found, strict=True)}

    got = trio.run(entries)
    for rel, mtime in old.items():
        assert got[rel][0] == mtime, rel
    assert got["a.txt"][0] == 1_400_000_000_000_000_000
    assert all(ctime >= started for _, ctime in got.values()), got
