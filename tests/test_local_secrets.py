"""Local secrets: no cap (nor a prefix of one) in logs, status or the web
page; node directories and logs private; the web server answers loopback
only, for its own Host name only (issue 14, section 5).

Attacks: a local user reading logs and status, a web page from a rebound
DNS name asking the status server on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gridfs.caps import LiteralCap, ReadCap, SliceCap, log_name, redact_caps
from gridfs.cli.mount import read_cap
from gridfs.client.keeper import RetainedSet, get_keeper
from gridfs.client.maintain import check_and_repair
from gridfs.client.slots import create_slot
from gridfs.config import NodeConfig, NodeDir
from gridfs.errors import UsageError
from gridfs.fileutil import make_private_dir, open_private_log
from gridfs.mutable import SlotWriteCap
from gridfs.tree import pack_root
from gridfs.workqueue import Step

from .gridutil import open_grid
from .test_cli_grid import gridfs, ok, one_clean_error_line, three_server_grid
from .test_leases import TIMEOUT, client_node, put_bytes

WINDOW = 20
"""A leak is any run of this many characters of a cap's secret part."""


def leaks(text: str, caps: list[str]) -> list[str]:
    """The caps some WINDOW-character piece of which is in ``text``."""
    found = []
    for cap in caps:
        body = cap.split(":", 2)[2]  # after gridfs:KIND:
        if any(body[i : i + WINDOW] in text for i in range(len(body) - WINDOW + 1)):
            found.append(cap)
    return found


def some_caps() -> list[str]:
    read = ReadCap(os.urandom(32), os.urandom(32), 3, 10, 123_456)
    slot = SlotWriteCap.generate()
    return [
        read.to_string(),
        SliceCap(os.urandom(32), 10, 100, read).to_string(),
        slot.to_string(),
        slot.read_cap().to_string(),
        LiteralCap(os.urandom(40)).to_string(),
    ]


def test_log_names_hold_no_part_of_a_cap() -> None:
    caps = some_caps()
    names = [log_name(c) for c in caps]
    assert not leaks(" ".join(names), caps)
    assert all(re.fullmatch(r"(si|h):[a-z2-7]{12}", n) for n in names), names
    read = ReadCap(os.urandom(32), os.urandom(32), 3, 10, 1000)
    # A file and a slot are named by their storage index: public, and the
    # same for every cap of the object (the operator can match log lines).
    assert log_name(read) == log_name(read.to_string()) == log_name(read.verify_cap())
    slot = SlotWriteCap.generate()
    assert log_name(slot) == log_name(slot.read_cap().to_string()) == log_name(slot.verify_cap())
    assert log_name(read) != log_name(slot)
    # A prefix of a cap (as older logs wrote) is named by a hash of it.
    assert log_name(read.to_string()[:60]).startswith("h:")


def test_redact_caps_replaces_every_cap_in_a_message() -> None:
    caps = some_caps()
    message = "failed: " + ", ".join(caps) + " and gridfs:ssk-ro:tRuNcAtEd"
    redacted = redact_caps(message)
    assert not leaks(redacted, caps) and "gridfs:" not in redacted
    assert log_name(caps[0]) in redacted


@pytest.mark.parametrize("wrong", ["file as slot", "slot as file", "truncated"])
def test_a_cap_refused_by_a_parser_is_not_quoted(wrong: str) -> None:
    """A cap of the wrong kind, or damaged, is refused without its key:
    such messages end up in logs (a mount's) and on terminals."""
    from gridfs.caps import parse
    from gridfs.errors import CapError
    from gridfs.mutable import parse_slot_cap

    read = ReadCap(os.urandom(32), os.urandom(32), 3, 10, 99).to_string()
    slot = SlotWriteCap.generate().to_string()
    text, parser, secret = {
        "file as slot": (read, parse_slot_cap, read),
        "slot as file": (slot, parse, slot),
        "truncated": (slot[:-3], parse_slot_cap, slot),
    }[wrong]
    with pytest.raises(CapError) as info:
        parser(text)
    assert not leaks(str(info.value), [secret])


def test_queue_step_descriptions_name_no_cap() -> None:
    cap = SlotWriteCap.generate().to_string()
    chk = ReadCap(os.urandom(32), os.urandom(32), 3, 10, 5000).to_string()
    steps = [
        Step(1, "retain_ssk", {"cap": cap}),
        Step(2, "unlink_ssk", {"cap": cap}),
        Step(3, "unlink_uri", {"uri": chk}),
    ]
    text = " ".join(s.describe() for s in steps)
    assert not leaks(text, [cap, chk]), text
    assert log_name(cap) in text and log_name(chk) in text


async def test_maintenance_logs_name_files_by_storage_index_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A background check that repairs one file and finds another
    unrecoverable logs both, by storage index; no cap, no 20 characters of
    one, at any level."""
    caplog.set_level(logging.DEBUG)
    async with open_grid(tmp_path / "grid", servers=20) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid, k=3, happy=7, n=10) as client:
                repairable = await put_bytes(client, os.urandom(300_000), tmp_path / "tmp")
                doomed = await put_bytes(client, os.urandom(300_000), tmp_path / "tmp")
                retained = RetainedSet(client.node)
                retained.add([repairable.to_string()])
                retained.close()
            for node in [n for n in grid.nodes if n.shares(repairable.storage_index)][:4]:
                await node.kill()
            async with client_node(tmp_path / "client", grid) as client:
                first = await check_and_repair(client)
                retained = RetainedSet(client.node)
                retained.add([doomed.to_string()])
                retained.close()
            live = [n for n in grid.nodes if n.running and n.shares(doomed.storage_index)]
            for node in live[: len(live) - 2]:  # 2 shares left: k is 3
                await node.kill()
            async with client_node(tmp_path / "client", grid) as client:
                second = await check_and_repair(client)
    assert first["repaired"] == 1, first
    assert second["unrecoverable"] == 1, second
    text = caplog.text
    caps = [repairable.to_string(), doomed.to_string()]
    assert not leaks(text, caps), text
    assert f"{log_name(doomed)}: only" in text and "cannot repair" in text
    assert f"repaired {log_name(repairable)}" in text


async def test_a_tree_that_cannot_be_walked_is_logged_by_log_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Lease renewal walks every kept tree; one whose root names a directory
    no server holds is logged (and reported) by its log name."""
    caplog.set_level(logging.DEBUG)
    async with open_grid(tmp_path / "grid", servers=5) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid, k=3, happy=5, n=5) as client:
                lost_dir = ReadCap(os.urandom(32), os.urandom(32), 3, 5, 1000).to_string()
                root = await create_slot(client.broker, pack_root(lost_dir), 5, 5)
                retained = RetainedSet(client.node)
                retained.add([root.to_string()])
                retained.close()
                keeper = get_keeper(client)
                await keeper.renew_all()
    caps = [root.to_string(), root.read_cap().to_string(), lost_dir]
    assert keeper.unwalkable and log_name(root) in keeper.unwalkable[0]
    assert f"cannot walk the tree {log_name(root)}" in caplog.text
    assert not leaks(caplog.text + " ".join(keeper.unwalkable), caps)


def test_node_directories_and_logs_are_private(tmp_path: Path) -> None:
    old = os.umask(0)  # the loosest umask: modes must not depend on it
    try:
        node = NodeDir(tmp_path / "client")
        node.create(NodeConfig("client", "client"))
        assert stat.S_IMODE(node.path.stat().st_mode) == 0o700
        with open_private_log(node.path / "mount.log") as f:
            f.write(b"line\n")
        assert stat.S_IMODE((node.path / "mount.log").stat().st_mode) == 0o600
        # Made by an older gridfs, or by hand: tightened on the next start.
        loose = tmp_path / "old"
        loose.mkdir(mode=0o755)
        (loose / "node.log").write_text("old line\n")
        os.chmod(loose / "node.log", 0o644)
        make_private_dir(loose)
        with open_private_log(loose / "node.log") as f:
            f.write(b"new line\n")
        assert stat.S_IMODE(loose.stat().st_mode) == 0o700
        assert stat.S_IMODE((loose / "node.log").stat().st_mode) == 0o600
        assert (loose / "node.log").read_text() == "old line\nnew line\n"
    finally:
        os.umask(old)


def test_a_cap_file_must_be_private_and_hold_a_tree_cap(tmp_path: Path) -> None:
    cap = SlotWriteCap.generate().to_string()
    path = tmp_path / "tree.cap"
    path.write_text(cap + "\n")
    os.chmod(path, 0o644)
    with pytest.raises(UsageError, match=r"open to other users \(mode 0644\): chmod 600 it"):
        read_cap(str(path))
    os.chmod(path, 0o600)
    assert read_cap(str(path)) == cap
    # Not a tree's cap: refused without quoting what the file holds.
    secret = ReadCap(os.urandom(32), os.urandom(32), 3, 10, 99).to_string()
    path.write_text(secret)
    with pytest.raises(UsageError) as info:
        read_cap(str(path))
    assert "not a tree's cap" in str(info.value) and not leaks(str(info.value), [secret])
    path.write_text(SlotWriteCap.generate().verify_cap().to_string())
    with pytest.raises(UsageError, match="a verify cap cannot be mounted"):
        read_cap(str(path))


# -- a grid started with the CLI ---------------------------------------------


@pytest.fixture(scope="module")
def cli_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with three_server_grid(tmp_path_factory.mktemp("secrets") / "grid") as root:
        yield root


def test_grid_start_makes_private_node_directories_and_logs(cli_grid: Path) -> None:
    nodes = [p for p in cli_grid.iterdir() if (p / "gridfs.toml").exists()]
    assert len(nodes) == 5, nodes  # introducer, client, 3 servers
    for node in nodes:
        assert stat.S_IMODE(node.stat().st_mode) == 0o700, node
        if (node / "node.log").exists():
            assert stat.S_IMODE((node / "node.log").stat().st_mode) == 0o600, node


def http_get(port: int, path: str, host: str | None) -> tuple[int, bytes]:
    """One raw HTTP/1.1 GET with exactly this Host header (none if None)."""
    head = f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall((head + "Connection: close\r\n\r\n").encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1]


@pytest.fixture(scope="module")
def web_port(cli_grid: Path) -> Iterator[int]:
    client = cli_grid / "client"
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
        yield int(m.group(1))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_web_serves_its_own_host_names(web_port: int, cli_grid: Path) -> None:
    tree = ok(gridfs("alias", "list", node=cli_grid / "client")).split(":", 1)[1].strip()
    for host in (f"127.0.0.1:{web_port}", f"localhost:{web_port}", f"LOCALHOST:{web_port}"):
        status, body = http_get(web_port, "/status.json", host)
        assert status == 200, (host, body)
        assert len(json.loads(body)["servers"]) == 3
        assert b"gridfs:" not in body and not leaks(body.decode(), [tree])
    status, page = http_get(web_port, "/", f"127.0.0.1:{web_port}")
    assert status == 200 and b"Grid map (3 servers)" in page and b"gridfs:" not in page


@pytest.mark.parametrize(
    "host",
    [
        "attacker.example:{port}",  # DNS rebinding: the name now resolves to 127.0.0.1
        "attacker.example",
        "127.0.0.1",  # another port's page (port 80)
        "127.0.0.1:1",
        "127.0.0.1.attacker.example:{port}",
        "",
        None,  # no Host at all
    ],
)
def test_web_refuses_foreign_host_headers(web_port: int, host: str | None) -> None:
    status, body = http_get(
        web_port, "/status.json", None if host is None else host.format(port=web_port)
    )
    assert status == 421, body
    assert b"servers" not in body


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "example.com"])
def test_web_listens_on_loopback_only(host: str, cli_grid: Path) -> None:
    proc = gridfs("web", "--host", host, "--port", "0", node=cli_grid / "client")
    assert proc.returncode == 2
    assert "not a loopback address" in proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()


def test_a_bad_cap_file_for_mount_is_one_clean_line(cli_grid: Path, tmp_path: Path) -> None:
    path = tmp_path / "cap"
    path.write_text(SlotWriteCap.generate().to_string())
    os.chmod(path, 0o640)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = gridfs("mount", str(mnt), "--cap-file", str(path), node=cli_grid / "client")
    assert proc.returncode == 2
    assert "chmod 600" in one_clean_error_line(proc)
