"""``gridfs retain``, ``gridfs unlink``, ``gridfs renew`` and ``put``'s retaining,
run as real commands against a local grid of real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from gridfs.caps import ReadCap, b32encode, parse_read_cap
from gridfs.mutable import parse_slot_cap

from .test_cli_grid import gridfs, ok, one_clean_error_line

SERVERS = 5
SERVER_IDS = range(1, SERVERS + 1)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A grid of 5 servers whose client puts one share on each (k=3, n=5)."""
    root = tmp_path_factory.mktemp("cli-leases") / "grid"
    try:
        args = ["--servers", str(SERVERS), "--happy", str(SERVERS), "--n", str(SERVERS)]
        out = ok(gridfs("grid", "start", str(root), *args))
        assert f"{SERVERS} storage servers" in out
        # No old root versions kept: what a commit drops is given up at once
        # (tests/test_share.py has the snapshots).
        config = root / "client" / "gridfs.toml"
        config.write_text(
            config.read_text()
            .replace("snapshot_retention = 2592000.0", "snapshot_retention = 0.0")
            .replace("snapshot_keep = 10", "snapshot_keep = 1")
        )
        yield root
    finally:
        if root.exists():
            gridfs("grid", "stop", str(root))


def shares_on_disk(grid: Path, cap: str) -> int:
    """How many share files of the file ``cap`` the servers' storage directories hold."""
    read_cap = parse_read_cap(cap)
    assert isinstance(read_cap, ReadCap)
    name = b32encode(read_cap.storage_index)
    dirs = [grid / f"storage-{i}" / "storage" / "shares" / name[:2] / name for i in SERVER_IDS]
    return sum(len(list(d.iterdir())) for d in dirs if d.exists())


def slots_on_disk(grid: Path, cap: str) -> int:
    name = b32encode(parse_slot_cap(cap).storage_index)
    paths = [grid / f"storage-{i}" / "storage" / "slots" / name[:2] / name for i in SERVER_IDS]
    return sum(p.exists() for p in paths)


def retained(client: Path) -> list[str]:
    return ok(gridfs("retain", "--list", node=client)).split()


def make_file(tmp_path: Path, name: str, size: int = 120_000) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def test_put_retains_unless_told_not_to(grid: Path, tmp_path: Path) -> None:
    client = grid / "client"
    kept = ok(gridfs("put", str(make_file(tmp_path, "kept.bin")), node=client)).strip()
    loose = ok(
        gridfs("put", "--no-retain", str(make_file(tmp_path, "loose.bin")), node=client)
    ).strip()
    assert shares_on_disk(grid, kept) == shares_on_disk(grid, loose) == SERVERS
    listed = retained(client)
    assert kept in listed and loose not in listed
    assert ok(gridfs("retain", node=client)).split() == listed  # no caps: list


def test_renew_json_reports_every_server(grid: Path, tmp_path: Path) -> None:
    client = grid / "client"
    ok(gridfs("put", str(make_file(tmp_path, "renewed.bin")), node=client))
    proc = gridfs("renew", "--json", node=client)
    out = ok(proc)
    assert out.count("\n") == 1
    report = json.loads(out)
    assert report["servers"] == SERVERS and report["failures"] == []
    # At least the tree's slot and the retained file; each is held by every server.
    assert report["objects"] >= 2 and report["unheld"] == []
    assert report["leases"] == SERVERS * report["objects"]
    plain = ok(gridfs("renew", node=client))
    assert f"at {SERVERS} servers" in plain


def test_unlink_of_a_put_file_frees_its_shares(grid: Path, tmp_path: Path) -> None:
    client = grid / "client"
    cap = ok(gridfs("put", str(make_file(tmp_path, "doomed.bin")), node=client)).strip()
    assert shares_on_disk(grid, cap) == SERVERS
    out = ok(gridfs("unlink", cap, node=client))
    assert out.count("\n") == 1 and "freed" in out, out
    assert re.search(rf"\b{SERVERS} server copies freed", out), out
    assert shares_on_disk(grid, cap) == 0
    assert cap not in retained(client)
    proc = gridfs("get", cap, "-o", str(tmp_path / "out"), node=client)
    assert proc.returncode != 0
    one_clean_error_line(proc)


def test_unlink_of_a_malformed_cap_is_a_clean_error(grid: Path) -> None:
    proc = gridfs("unlink", "not-a-cap", node=grid / "client")
    assert proc.returncode != 0 and proc.stdout == b""
    one_clean_error_line(proc)


def test_retain_a_tree_and_unlink_what_it_still_references(grid: Path, tmp_path: Path) -> None:
    client = grid / "client"
    src = make_file(tmp_path, "linked.bin", 150_000)
    ok(gridfs("cp", str(src), "grid:/linked.bin", node=client))
    aliases = dict(
        line.split(": ", 1) for line in ok(gridfs("alias", "list", node=client)).splitlines()
    )
    tree_cap = aliases["grid"]
    assert slots_on_disk(grid, tree_cap) == SERVERS

    out = ok(gridfs("retain", tree_cap, node=client))
    # The slot, the root directory and the file.
    assert f"retained 1 caps: leases renewed on 3 objects at {SERVERS} servers" in out, out
    assert tree_cap in retained(client)

    # The same bytes put again have the same cap: unlinking it gives up nothing
    # while the tree links it.
    cap = ok(gridfs("put", str(src), node=client)).strip()
    assert shares_on_disk(grid, cap) == SERVERS
    out = ok(gridfs("unlink", cap, node=client))
    assert "1 objects still referenced here, kept" in out, out
    assert shares_on_disk(grid, cap) == SERVERS
    catted = gridfs("cat", "grid:/linked.bin", node=client)
    assert catted.returncode == 0 and catted.stdout == src.read_bytes()

    # Removing it from the tree frees it.
    ok(gridfs("rm", "grid:/linked.bin", node=client))
    assert shares_on_disk(grid, cap) == 0
    assert slots_on_disk(grid, tree_cap) == SERVERS
    assert tree_cap in retained(client)


def test_status_json_and_the_web_page_show_the_grid_map(grid: Path, tmp_path: Path) -> None:
    client = grid / "client"
    ok(gridfs("put", str(make_file(tmp_path, "mapped.bin")), node=client))
    ok(gridfs("renew", node=client))
    on_disk = sum(1 for p in grid.glob("storage-*/storage/shares/*/*/*") if p.is_file())
    status = json.loads(ok(gridfs("status", "--json", node=client)))
    assert len(status["servers"]) == SERVERS
    assert sum(s["shares"] for s in status["servers"]) == on_disk
    assert all(s["connected"] and s["available"] > 0 for s in status["servers"])
    assert status["maintenance"]["renew"]["servers"] == SERVERS
    assert status["mounts"] == []

    proc = subprocess.Popen(
        [sys.executable, "-m", "gridfs", "web", "--port", "0", "--node", str(client)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        base = f"http://127.0.0.1:{m.group(1)}"
        with urllib.request.urlopen(base + "/status.json", timeout=30) as r:
            served = json.loads(r.read())
        assert [s["name"] for s in served["servers"]] == [s["name"] for s in status["servers"]]
        with urllib.request.urlopen(base + "/", timeout=30) as r:
            page = r.read().decode()
        assert f"Grid map ({SERVERS} servers)" in page and "renew" in page
        assert "gridfs:chk:" not in page and "gridfs:ssk" not in page  # no cap, ever
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(base + "/private/lease", timeout=30)
        assert info.value.code == 404
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_small_files_copied_in_are_packed_checked_and_freed(grid: Path, tmp_path: Path) -> None:
    """`cp -r` of 90 files of 15 KiB: the directory keeps 1 MiB of them, the
    other 22 share one pack.  `cat` reads them back, `check -r` checks the pack
    once for all of them, and `rm -r` frees it."""
    client = grid / "client"
    src = tmp_path / "smalls"
    src.mkdir()
    files = {f"f{i:02}": os.urandom(15 * 1024) for i in range(90)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    before = share_dirs(grid)
    ok(gridfs("cp", "-r", str(src), "grid:/smalls", node=client))
    new = share_dirs(grid) - before
    assert len(new) <= 3, new  # the pack, the directory and the root: no file alone
    for name in ("f00", "f68", "f89"):  # inline, then packed ones
        catted = gridfs("cat", f"grid:/smalls/{name}", node=client)
        assert catted.returncode == 0 and catted.stdout == files[name], name
    out = ok(gridfs("check", "-r", "grid:/smalls", node=client))
    assert "91 objects checked: 91 healthy" in out, out
    ok(gridfs("rm", "-r", "grid:/smalls", node=client))
    assert not new & share_dirs(grid)


def share_dirs(grid: Path) -> set[str]:
    """Storage indexes with shares on any server."""
    return {d.name for d in grid.glob("storage-*/storage/shares/*/*")}


async def test_the_web_page_answers_503_when_the_status_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A status that cannot be gathered (a mount's control socket failing)
    is a 503 with the reason; the server goes on."""
    from gridfs.cli import web
    from gridfs.errors import GridError

    async def failing(*args: object) -> dict[str, object]:
        raise GridError("the mount's control socket closed")

    monkeypatch.setattr(web, "gather_status", failing)
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"GET /status.json HTTP/1.0\r\nHost: 127.0.0.1:3456\r\n\r\n")
    await web.serve(server, None, None, web.allowed_hosts("127.0.0.1", 3456))  # type: ignore[arg-type]
    reply = b""
    while chunk := await client.receive_some():
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert reply.endswith(b"status unavailable: the mount's control socket closed\n")


@pytest.mark.parametrize("text", ["65536", "-1", "abc", "\u0663", "8o8o", ""])
def test_web_port_must_be_an_ascii_number_up_to_65535(text: str) -> None:
    import argparse

    from gridfs.cli.web import tcp_port

    with pytest.raises(argparse.ArgumentTypeError, match="not a port number"):
        tcp_port(text)
    assert tcp_port("0") == 0 and tcp_port("3456") == 3456
