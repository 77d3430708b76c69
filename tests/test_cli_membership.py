"""Membership with the real ``gridfs`` command and real node processes:
invites, nodes made without one, uninvited servers, revocation, a
standalone introducer, and a grid made before membership existed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gridfs.config import NodeDir

from .test_cli_grid import gridfs, ok, one_clean_error_line

SERVERS = 3
SMALL = ("--k", "2", "--happy", "3", "--n", "3")


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("member-grid") / "grid"
    try:
        ok(gridfs("grid", "start", str(root), "--servers", str(SERVERS), *SMALL))
        yield root
    finally:
        gridfs("grid", "stop", str(root))


def share_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/storage/shares/**/*") if p.is_file())


def stored(node: Path) -> list[Path]:
    """Shares and slots on a storage node's disk."""
    dirs = [node / "storage" / "shares", node / "storage" / "slots"]
    return [p for d in dirs for p in d.rglob("*") if p.is_file()]


def invite(grid: Path, *options: str) -> str:
    out = ok(gridfs("grid", "invite", str(grid), *options))
    assert out.count("\n") == 1 and out.startswith("gridfs-invite:v1:"), out
    return out.strip()


def put_get(node: Path, tmp_path: Path, size: int = 120_000) -> str:
    src = tmp_path / f"in-{random.random()}.bin"
    src.write_bytes(os.urandom(size))
    cap = ok(gridfs("put", str(src), node=node)).strip()
    assert ok_bytes(gridfs("get", cap, node=node)) == src.read_bytes()
    return cap


def ok_bytes(proc: subprocess.CompletedProcess[bytes]) -> bytes:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def test_an_invited_client_joins_and_works(grid: Path, tmp_path: Path) -> None:
    node = tmp_path / "friend"
    line = invite(grid, "--name", "friend")
    out = ok(gridfs("init", "--node", str(node), "--invite", line, *SMALL))
    assert out.startswith("grid: ")
    put_get(node, tmp_path)
    status = ok(gridfs("grid", "status", str(grid)))
    assert "member storage-1" in status and "member client" in status
    # A name is given once.
    again = gridfs("grid", "invite", str(grid), "--name", "friend")
    assert again.returncode == 2 and "exists already" in one_clean_error_line(again)
    assert again.stdout == b""


def test_a_node_made_without_an_invite_can_do_nothing(grid: Path, tmp_path: Path) -> None:
    intro = NodeDir(grid / "introducer").address()
    before = share_files(grid)
    node = tmp_path / "stranger"
    proc = gridfs("init", "--node", str(node), "--introducer", str(intro), *SMALL)
    assert proc.returncode == 1
    assert "not a member of the grid" in one_clean_error_line(proc)
    src = tmp_path / "x.bin"
    src.write_bytes(os.urandom(100_000))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in (
        ("put", str(src)),
        ("ls", "grid:/"),
        ("mkdir", "grid:/d"),
        ("mount", str(mnt)),
        ("status",),
    ):
        proc = gridfs(*args, node=node)
        assert proc.returncode == 1, args
        line = one_clean_error_line(proc)
        assert "not a member" in line and line.count("error:") == 1, line
    assert share_files(grid) == before


def test_an_invited_storage_server_gets_shares_an_uninvited_one_none(
    grid: Path, tmp_path: Path
) -> None:
    invited, uninvited = tmp_path / "joined", tmp_path / "loner"
    intro = str(NodeDir(grid / "introducer").address())
    line = invite(grid, "--storage")
    create = [sys.executable, "-m", "gridfs", "storage", "create", str(invited)]
    piped = subprocess.run(  # the invite on stdin, out of the process list
        [*create, "--invite", "-", "--reserved-space", "0"],
        input=(line + "\n").encode(),
        capture_output=True,
        timeout=60,
    )
    assert "as member storage-" in ok(piped)
    ok(gridfs("storage", "create", str(uninvited), "--introducer", intro, "--reserved-space", "0"))
    procs = [run_node("storage", d) for d in (invited, uninvited)]
    try:
        loner_url = wait_address(uninvited)
        wait_address(invited)
        # A client lists the uninvited server among its static servers too.
        client = tmp_path / "client"
        ok(
            gridfs(
                "init",
                "--node",
                str(client),
                "--invite",
                invite(grid),
                "--server",
                loner_url,
                "--k",
                "2",
                "--happy",
                "4",
                "--n",
                "4",
            )
        )
        deadline = time.monotonic() + 20
        while not stored(invited):
            assert time.monotonic() < deadline, "the invited server never got a share"
            src = tmp_path / "in.bin"
            src.write_bytes(os.urandom(100_000))
            put = gridfs("put", str(src), node=client)  # (fails until the server is known)
            if put.returncode == 0:
                got = gridfs("get", put.stdout.decode().strip(), node=client)
                assert ok_bytes(got) == src.read_bytes()
        assert stored(uninvited) == []
        status = ok(gridfs("status", node=client))
        assert "not a member of this grid" in status, status
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    log = (uninvited / "node.log").read_text()
    assert "not a member of a grid" in log


def run_node(kind: str, node: Path) -> subprocess.Popen[bytes]:
    log = open(node / "node.log", "ab")  # noqa: SIM115 (the node's for its life)
    return subprocess.Popen(
        [sys.executable, "-m", "gridfs", kind, "run", str(node)], stdout=log, stderr=log
    )


def wait_address(node: Path) -> str:
    deadline = time.monotonic() + 20
    while True:
        address = NodeDir(node).address()
        if address is not None:
            return str(address)
        assert time.monotonic() < deadline, f"{node} did not start"
        time.sleep(0.05)


def test_grid_revoke_ends_a_member_and_leaves_the_others(grid: Path, tmp_path: Path) -> None:
    doomed, other = tmp_path / "doomed", tmp_path / "other"
    ok(gridfs("init", "--node", str(doomed), "--invite", invite(grid, "--name", "doomed"), *SMALL))
    ok(gridfs("init", "--node", str(other), "--invite", invite(grid), *SMALL))
    cap = put_get(doomed, tmp_path)
    out = ok(gridfs("grid", "revoke", str(grid), "doomed"))
    assert "doomed" in out
    before = share_files(grid)
    src = tmp_path / "late.bin"
    src.write_bytes(os.urandom(100_000))
    for args in (("put", str(src)), ("get", cap), ("ls", "grid:/")):
        proc = gridfs(*args, node=doomed)
        assert proc.returncode == 1, args
        line = one_clean_error_line(proc)
        assert "not a member" in line or "revoked" in line, line
    assert share_files(grid) == before
    put_get(other, tmp_path)
    assert ok_bytes(gridfs("get", cap, node=grid / "client"))
    assert "revoked (doomed)" in ok(gridfs("grid", "status", str(grid)))
    unknown = gridfs("grid", "revoke", str(grid), "nobody")
    assert unknown.returncode == 2 and "no member named" in one_clean_error_line(unknown)


def test_a_standalone_introducer_invites_and_revokes(tmp_path: Path) -> None:
    intro = tmp_path / "intro"
    ok(gridfs("introducer", "create", str(intro)))
    assert (intro / "private" / "grid.key").stat().st_mode & 0o777 == 0o600
    proc = run_node("introducer", intro)
    try:
        wait_address(intro)
        out = ok(gridfs("introducer", "invite", str(intro), "--storage", "--name", "disk1"))
        assert out.count("\n") == 1 and out.startswith("gridfs-invite:v1:")
        dup = gridfs("introducer", "invite", str(intro), "--name", "disk1")
        assert dup.returncode == 2 and "exists already" in one_clean_error_line(dup)
        garbled = gridfs("storage", "create", str(tmp_path / "s"), "--invite", out[:-30])
        assert garbled.returncode == 1 and "garbled" in one_clean_error_line(garbled)
        wrong_kind = gridfs("init", "--node", str(tmp_path / "c"), "--invite", out.strip())
        assert wrong_kind.returncode == 2 and "storage node" in one_clean_error_line(wrong_kind)
        assert "disk1" in ok(gridfs("introducer", "revoke", str(intro), "disk1"))
        assert (intro / "private" / "revocations").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_grid_start_upgrades_a_grid_made_before_membership(tmp_path: Path) -> None:
    root = tmp_path / "old"
    ok(gridfs("grid", "start", str(root), "--servers", "3", *SMALL))
    try:
        cap = put_get(root / "client", tmp_path)
        ok(gridfs("grid", "stop", str(root)))
        for name in ("grid.key", "grid.crt", "member.crt", "members.json"):
            for path in root.glob(f"*/private/{name}"):
                path.unlink()
        assert "not a member" in gridfs("grid", "status", str(root)).stdout.decode()
        ok(gridfs("grid", "start", str(root), "--servers", "3", *SMALL))
        assert ok_bytes(gridfs("get", cap, node=root / "client"))
        assert "not a member" not in ok(gridfs("grid", "status", str(root)))
        put_get(root / "client", tmp_path)
    finally:
        gridfs("grid", "stop", str(root))
