"""Crash injection against a real grid: ``gridfs cp -r`` killed at every
work-queue checkpoint (and at random instants), then ``gridfs queue flush``.

Whatever instant the copy dies at, the flush must end in exactly the tree an
uninterrupted copy makes, with an empty queue and no tempfile or box left.
Everything runs as real processes: one grid of 5 storage servers per module.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gridfs.workqueue import WorkQueue

SERVERS = 5
TIMEOUT = 60.0
STRIDE = 6
"""Kill points 1-12 are all tried; after that every STRIDE-th, then bisection
wherever what a kill leaves behind changes (each section's last checkpoint)."""
KILLS = 3
"""Copies killed at random instants with work queued."""

Snapshot = dict[str, tuple[Any, ...]]


# -- running gridfs -----------------------------------------------------------
def _env(client: Path | None, kill_at: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GRIDFS_NODE", None)
    env.pop("GRIDFS_TEST_KILL_AT", None)
    if client is not None:
        env["GRIDFS_NODE"] = str(client)
    if kill_at is not None:
        env["GRIDFS_TEST_KILL_AT"] = str(kill_at)
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gridfs", *args]


def gridfs(
    *args: str, client: Path | None = None, kill_at: int | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _cmd(*args), capture_output=True, text=True, env=_env(client, kill_at), timeout=timeout
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args}: rc {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def killed(returncode: int) -> bool:
    return returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A running grid of 5 servers (happy 5); the client node is DIR/client."""
    root = tmp_path_factory.mktemp("crash-grid") / "grid"
    try:
        out = ok(gridfs("grid", "start", str(root), "--servers", str(SERVERS), "--happy", "5"))
        assert f"{SERVERS} storage servers" in out
        yield root
    finally:
        if root.exists():
            gridfs("grid", "stop", str(root))


# -- trees --------------------------------------------------------------------
def make_small_tree(top: Path) -> Path:
    """3 directories, 8 files of 100 B-20 KiB (small ones may be kept inside
    their directory, the three largest need uploads), a symlink and a file of
    at most 64 bytes."""
    rng = random.Random(1)
    for d in ("a", "a/b", "c"):
        (top / d).mkdir(parents=True)
    sizes = {
        "f0": 100,
        "a/f1": 20 * 1024,
        "a/f2": 3000,
        "a/b/f3": 19000,
        "a/b/f4": 150,
        "c/f5": 17500,
        "c/f6": 9000,
        "f7": 500,
    }
    for name, size in sizes.items():
        (top / name).write_bytes(rng.randbytes(size))
    (top / "a/f2").chmod(0o600)
    (top / "tiny").write_bytes(b"at most 64 bytes: a literal cap")
    (top / "link").symlink_to("a/f1")
    return top


def make_big_tree(top: Path, seed: int) -> Path:
    """60 files of 100 B-40 KiB in 4 directories (contents depend on ``seed``):
    some small enough to live inside their directory, most uploaded."""
    rng = random.Random(seed)
    for d in range(4):
        (top / f"d{d}").mkdir(parents=True)
        for i in range(15):
            (top / f"d{d}/f{i:02}").write_bytes(rng.randbytes(rng.randint(100, 40 * 1024)))
    return top


def snapshot(top: Path) -> Snapshot:
    """Every entry under ``top``: kind, and mode, size, content hash, mtime of
    files, and the target of symlinks."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(top))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, digest, st.st_mtime_ns)
    return out


# -- the queue ----------------------------------------------------------------
def queue_dirs(grid: Path) -> list[Path]:
    return sorted((grid / "client" / "queues").iterdir())


def pending_steps(grid: Path) -> list[tuple[str, dict[str, object]]]:
    """The steps on disk (read directly: the process that wrote them is dead)."""
    steps = []
    for d in queue_dirs(grid):
        q = WorkQueue(d)
        try:
            steps += [(s.kind, s.args) for s in q.pending()]
        finally:
            q.close()
    return steps


def inspect(grid: Path, name: str, out: Path) -> tuple[str, str]:
    """At once: ``gridfs cp -r grid:/NAME OUT``, ``gridfs queue`` and ``gridfs
    ls -l -R grid:/NAME``; returns the queue and the listing (paths relative)."""
    env = _env(grid / "client")
    cmds = [
        _cmd("cp", "-r", f"grid:/{name}", str(out)),
        _cmd("queue"),
        _cmd("ls", "-l", "-R", f"grid:/{name}"),
    ]
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in cmds
    ]
    outputs = []
    for c, proc in zip(cmds, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, f"{c[3:]}: rc {proc.returncode}\n{stderr}"
        outputs.append(stdout)
    return outputs[1], outputs[2].replace(f"grid:/{name}", "ROOT")


def assert_recovered(grid: Path, name: str, expected: Snapshot, out: Path) -> str:
    """Flush; the tree at grid:/NAME fetched back is ``expected``; the queue
    is empty and so are its tempfiles/ and boxes/.  Returns the listing."""
    assert "queue empty" in ok(gridfs("queue", "flush", client=grid / "client"))
    shown, listing = inspect(grid, name, out)
    assert shown.strip().splitlines()[-1] == "0 pending steps", shown
    assert snapshot(out) == expected, f"{name}: differs from the uninterrupted copy"
    for d in queue_dirs(grid):
        leftovers = list((d / "tempfiles").iterdir()) + list((d / "boxes").iterdir())
        assert leftovers == [], f"{name}: left behind {leftovers}"
    return listing


def parse_listing(text: str) -> dict[str, tuple[str, int, str]]:
    """``ls -l -R`` output → path: (mode string, size, symlink target)."""
    out: dict[str, tuple[str, int, str]] = {}
    current = ""
    for line in text.splitlines():
        if line.endswith(":") and line.startswith("ROOT"):
            current = line[len("ROOT") : -1].strip("/")
        elif line:
            mode, size, _day, _time, rest = line.split(maxsplit=4)
            name, _, target = rest.partition(" -> ")
            out[f"{current}/{name}".lstrip("/")] = (mode, int(size), target)
    return out


def listing_of(expected: Snapshot) -> dict[str, tuple[str, int, str]]:
    """What ``ls -l -R`` must show for a snapshot: a directory's size is its
    number of entries."""
    out: dict[str, tuple[str, int, str]] = {}
    for path, item in expected.items():
        if item[0] == "symlink":
            out[path] = ("lrwxrwxrwx", 0, str(item[1]))
        elif item[0] == "dir":
            children = sum(1 for p in expected if p.rpartition("/")[0] == path)
            out[path] = (stat.filemode(stat.S_IFDIR | int(item[1])), children, "")
        else:
            out[path] = (stat.filemode(stat.S_IFREG | int(item[1])), int(item[2]), "")
    return out


def reference(grid: Path, src: Path, name: str, out: Path) -> tuple[Snapshot, str, float]:
    """An uninterrupted copy, fetched back: its snapshot, its listing and how
    long the copy took."""
    start = time.monotonic()
    ok(gridfs("cp", "-r", str(src), f"grid:/{name}", client=grid / "client"))
    elapsed = time.monotonic() - start
    _, listing = inspect(grid, name, out)
    ref = snapshot(out)
    assert ref == snapshot(src)  # the copy itself is faithful
    assert parse_listing(listing) == listing_of(ref)
    return ref, listing, elapsed


# -- the tests ----------------------------------------------------------------
def test_killed_at_each_checkpoint_then_flushed(grid: Path, tmp_path: Path) -> None:
    src = make_small_tree(tmp_path / "src")
    ref, ref_listing, _ = reference(grid, src, "ref", tmp_path / "ref")
    assert {"a/b", "c", "link", "tiny", "a/f1"} <= set(ref)
    assert ref["link"] == ("symlink", "a/f1")

    # kill point → what the killed copy left: None if it was not killed, else
    # the kinds of the steps still pending (tells the queue's sections apart).
    outcome: dict[int, frozenset[str] | None] = {}

    def attempt(n: int) -> bool:
        """Copy killed at checkpoint n, flush, compare; True if it was killed."""
        proc = gridfs("cp", "-r", str(src), f"grid:/run{n}", client=grid / "client", kill_at=n)
        if proc.returncode == 0:
            outcome[n] = None
        else:
            assert killed(proc.returncode), f"N={n}: rc {proc.returncode}\n{proc.stderr}"
            outcome[n] = frozenset(kind for kind, _ in pending_steps(grid))
        listing = assert_recovered(grid, f"run{n}", ref, tmp_path / f"out{n}")
        assert listing == ref_listing, f"N={n}: the listing differs"
        return outcome[n] is not None

    n = 0
    while True:
        n = n + 1 if n < 12 else n + STRIDE
        assert n < 1000, "the copy never completed"
        if not attempt(n):
            break
    assert n > 12, "fewer checkpoints than expected: the hook seems not to fire"
    # Bisect every stride where what the kill left changes: the last checkpoint
    # of each section and the very last one are tried too.
    while gaps := [
        (a, b)
        for a, b in itertools.pairwise(sorted(outcome))
        if b - a > 1 and outcome[a] != outcome[b]
    ]:
        for a, b in gaps:
            attempt((a + b) // 2)
    last = max(i for i in outcome if outcome[i] is not None)
    print(f"\n{last} checkpoints; tried {sorted(outcome)}")
    assert all(outcome[i] is None for i in outcome if i > last)
    assert all(outcome[i] is not None for i in outcome if i <= last)
    # Every kill but the one after the very last removal left work behind,
    # and the kills spanned the queue: before the uploads, between the uploads
    # and the path batch (which includes just after its commit), and after it.
    assert all(outcome[i] for i in outcome if i < last), outcome
    assert outcome[last] == frozenset()
    assert outcome[1] is not None and {"upload_chk", "addpath"} <= outcome[1]
    left = [k for k in outcome.values() if k]
    assert any("addpath" in k and "upload_chk" not in k for k in left), outcome
    assert any("addpath" not in k for k in left), outcome
    # ...including kills inside the unlink section (after the commit, before its leases go).
    assert any("unlink_commit" in k for k in left), outcome


def test_killed_at_random_instants_then_flushed(grid: Path, tmp_path: Path) -> None:
    # Each killed copy gets new contents: a copy of data already on the grid
    # dedupes and is over before the kill.  The reference shows an
    # uninterrupted copy of such a tree is the tree itself, and how long it takes.
    big = make_big_tree(tmp_path / "big", 0)
    ref, _, duration = reference(grid, big, "bigref", tmp_path / "r")
    assert len(ref) == 64
    rng = random.Random(20240607)
    interrupted = 0
    rep = 0
    while interrupted < KILLS:
        rep += 1
        assert rep <= 2 * KILLS, f"only {interrupted} of {rep - 1} kills found work queued"
        name = f"big{rep}"
        src = make_big_tree(tmp_path / name, rep)
        whole = snapshot(src)
        proc = subprocess.Popen(
            _cmd("cp", "-r", str(src), f"grid:/{name}"),
            env=_env(grid / "client"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        start = time.monotonic()
        delay = rng.uniform(0.25, 1.0) * duration
        print(f"\n{name}: kill after {delay:.2f}s (a copy takes {duration:.2f}s):", end=" ")
        try:
            proc.wait(timeout=delay)
            duration = time.monotonic() - start  # over already: aim earlier next time
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0 or killed(proc.returncode), err.decode()

        steps = pending_steps(grid)
        queued = {
            str(args["path"]).removeprefix(f"/{name}").lstrip("/")
            for kind, args in steps
            if kind == "addpath"
        }
        print(f"rc {proc.returncode}, {len(steps)} steps pending")
        interrupted += bool(steps)
        if "" in queued and len(queued) < len(whole) + 1:
            # Killed while still queueing: the flush finishes what was queued.
            expected = {k: v for k, v in whole.items() if k in queued}
        else:
            expected = whole
        if not steps and proc.returncode != 0:
            # Killed before it queued anything, or after it finished: which?
            listing = gridfs("ls", "grid:/", client=grid / "client")
            if f"{name}/" not in ok(listing).split():
                continue
        listing = assert_recovered(grid, name, expected, tmp_path / f"out{rep}")
        assert parse_listing(listing) == listing_of(expected)
