"""Hostile directory entries (issue 14, section 5): whoever can write a
tree can store any bytes as a directory.  Entries whose names are not one
plain path component are left out on unpack, each with a warning, and
``gridfs cp`` out of the grid writes only under its target (even if such
a name got past unpack), never through a symlink, and never a setuid or
setgid bit unless ``--preserve-mode``.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import trio

from gridfs.cli.copyout import CopyOut
from gridfs.cli.tree import flush
from gridfs.client.grid import open_grid
from gridfs.client.session import TreeSession
from gridfs.config import NodeDir
from gridfs.dirnode import MAX_NAME_BYTES, Directory, Entry
from gridfs.errors import FormatError, UsageError

from .test_cli_grid import gridfs, ok, three_server_grid

HOSTILE = [
    "../../.bashrc",
    "/etc/cron.d/x",
    "a/b",
    ".",
    "..",
    "x\0y",
    "",
    "x" * (MAX_NAME_BYTES + 1),
]


def inline_file(data: bytes, mode: int = 0o644) -> Entry:
    return Entry("file", "", len(data), mode, 1, 1, data=data)


def hostile_dir(name: str) -> bytes:
    """A directory holding one good file and ``name``, packed as a writer
    that skips validation would (Directory.pack does not check names)."""
    return Directory({"good": inline_file(b"good"), name: inline_file(b"evil")}).pack()


@pytest.mark.parametrize("name", HOSTILE)
def test_unpack_skips_an_entry_with_a_bad_name(name: str, caplog: pytest.LogCaptureFixture) -> None:
    d = Directory.unpack(hostile_dir(name))
    assert list(d) == ["good"] and d.entries["good"].data == b"good"
    [record] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    message = record.getMessage()
    assert "skipped: bad name" in message and "\n" not in message and len(message) < 200


def test_unpack_keeps_the_first_of_two_entries_of_one_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = inline_file(b"1").to_wire("same"), inline_file(b"2").to_wire("same")
    d = Directory.unpack(msgpack.packb({"entries": [first, second], "version": 2}))
    assert list(d) == ["same"] and d.entries["same"].data == b"1"
    assert "a second entry of that name" in caplog.text


def test_unpack_bounds_entries_and_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    import gridfs.dirnode as dirnode

    many = Directory({f"f{i}": inline_file(b"") for i in range(11)}).pack()
    monkeypatch.setattr(dirnode, "MAX_ENTRIES", 10)
    with pytest.raises(FormatError, match="more than 10 entries"):
        Directory.unpack(many)
    link = Entry("symlink", "", 0, 0o777, 1, 1, target="a\0b")
    with pytest.raises(FormatError, match="bad symlink target"):
        Directory.unpack(Directory({"l": link}).pack())
    with pytest.raises(FormatError, match="out of range"):
        Directory.unpack(Directory({"f": inline_file(b"").with_(size=-1)}).pack())
    good = Directory({"a b": inline_file(b"1"), "é" * 127: inline_file(b"2")})
    assert Directory.unpack(good.pack()) == good


# -- the copy, with validation bypassed (defence in depth) -------------------


class FakeCopy(CopyOut):
    """CopyOut over directories held in memory: what a copy would meet if a
    hostile directory got past Directory.unpack."""

    def __init__(self, top: Path, dirs: dict[str, Directory], preserve: bool = False) -> None:
        super().__init__(None, None, top, preserve)  # type: ignore[arg-type]
        self.dirs = dirs

    async def load_dir(self, entry: Entry) -> Directory:
        return self.dirs[entry.cap]


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(outer, dest): the copy goes into dest = outer/a/b/out; nothing may
    appear anywhere else in outer."""
    dest = tmp_path / "a" / "b" / "out"
    dest.mkdir(parents=True)
    yield tmp_path, dest


@pytest.mark.parametrize("name", HOSTILE)
def test_copy_refuses_a_bad_name_even_past_unpack(sandbox: tuple[Path, Path], name: str) -> None:
    outer, dest = sandbox
    dirs = {"top": Directory({name: inline_file(b"evil")})}
    copy = FakeCopy(dest, dirs)
    with pytest.raises(FormatError, match="refusing the entry") as info:
        trio.run(copy.fetch, Entry("dir", "top", mode=0o755), "t:/d", dest / "d", True)
    assert "\n" not in str(info.value)
    assert files_under(outer) == {"a", "a/b", "a/b/out", "a/b/out/d"}
    assert not os.path.exists("/etc/cron.d/x") or b"evil" not in Path("/etc/cron.d/x").read_bytes()


def test_copy_never_writes_through_a_symlink(sandbox: tuple[Path, Path]) -> None:
    """A symlink in the way (left by an earlier copy, or stored in the tree
    beside a directory of the same name) is never followed."""
    outer, dest = sandbox
    victim = outer / "victim"
    victim.mkdir()
    (dest / "d").mkdir()
    os.symlink(victim, dest / "d" / "sub")  # planted before the copy
    dirs = {
        "top": Directory({"sub": Entry("dir", "sub", mode=0o755), "z": inline_file(b"z")}),
        "sub": Directory({"f": inline_file(b"evil")}),
    }
    with pytest.raises(UsageError, match="symlinks are not followed"):
        trio.run(FakeCopy(dest, dirs).fetch, Entry("dir", "top"), "t:/d", dest / "d", True)
    assert list(victim.iterdir()) == []
    # A link the tree holds is made, last in its directory, and a file of
    # the same name elsewhere replaces a link instead of writing through it.
    dirs = {
        "top": Directory(
            {
                "link": Entry("symlink", "", 0, 0o777, 1, 1, target=str(victim)),
                "f": inline_file(b"mine"),
            }
        )
    }
    (dest / "d2").mkdir()
    os.symlink(victim / "target", dest / "d2" / "f")
    trio.run(FakeCopy(dest, dirs).fetch, Entry("dir", "top"), "t:/d2", dest / "d2", True)
    link, f = dest / "d2" / "link", dest / "d2" / "f"
    assert link.is_symlink() and os.readlink(link) == str(victim)
    assert not f.is_symlink() and f.read_bytes() == b"mine"
    assert list(victim.iterdir()) == []


@pytest.mark.parametrize("preserve", [False, True])
def test_copy_drops_setuid_setgid_sticky_unless_asked(tmp_path: Path, preserve: bool) -> None:
    dirs = {
        "top": Directory(
            {
                "suid": inline_file(b"#!/bin/sh\n", 0o4755),
                "sgid": inline_file(b"x", 0o2711),
                "dir": Entry("dir", "sub", mode=0o3777),
            }
        ),
        "sub": Directory({}),
    }
    out = tmp_path / "out"
    old = os.umask(0)
    try:
        trio.run(FakeCopy(tmp_path, dirs, preserve).fetch, Entry("dir", "top"), "t:/", out, True)
    finally:
        os.umask(old)
    modes = {n: stat.S_IMODE((out / n).stat().st_mode) for n in ("suid", "sgid", "dir")}
    if preserve:
        assert modes == {"suid": 0o4755, "sgid": 0o2711, "dir": 0o3777}
    else:
        assert modes == {"suid": 0o755, "sgid": 0o711, "dir": 0o777}


def test_copy_into_an_existing_directory_leaves_its_mode(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o750)
    dirs = {"top": Directory({"f": inline_file(b"f")})}
    trio.run(FakeCopy(tmp_path, dirs).fetch, Entry("dir", "top", mode=0o777), "t:/", out, True)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750 and (out / "f").read_bytes() == b"f"


# -- the attack through the CLI, on a real grid -------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with three_server_grid(tmp_path_factory.mktemp("hostile") / "grid") as root:
        yield root


def link_into_tree(client: Path, path: str, entry: Entry) -> None:
    """Put ``entry`` at ``path`` of the client's tree, as a hostile writer
    of the tree could (no check of what the entry names)."""

    async def main() -> None:
        async with open_grid(NodeDir(client)) as g:
            session = TreeSession(g, "grid")
            session.queue.add_file(None, path, entry)
            await flush(session)
            session.queue.close()

    trio.run(main)


def put_bytes(client: Path, tmp_path: Path, data: bytes) -> str:
    f = tmp_path / "blob"
    f.write_bytes(data)
    return ok(gridfs("put", str(f), node=client)).strip()


def test_cp_out_of_a_hostile_directory_writes_nothing_outside(grid: Path, tmp_path: Path) -> None:
    client = grid / "client"
    entries = {"good": inline_file(b"good")}
    entries |= {name: inline_file(b"evil " + name.encode()) for name in HOSTILE}
    cap = put_bytes(client, tmp_path, Directory(entries).pack())
    link_into_tree(client, "/evil", Entry("dir", cap, mode=0o755))
    outer = tmp_path / "outer"
    dest = outer / "a" / "b" / "out"
    dest.mkdir(parents=True)
    before = set(Path("/etc/cron.d").iterdir()) if Path("/etc/cron.d").exists() else set()
    proc = gridfs("cp", "-r", "grid:/evil", str(dest), node=client)
    assert proc.returncode == 0, proc.stderr
    warnings = proc.stderr.decode().splitlines()
    assert len(warnings) == len(HOSTILE), warnings  # one line per bad name
    assert all(w.startswith("gridfs: directory entry ") and "bad name" in w for w in warnings)
    assert files_under(outer) == {"a", "a/b", "a/b/out", "a/b/out/evil", "a/b/out/evil/good"}
    assert (dest / "evil" / "good").read_bytes() == b"good"
    assert not (tmp_path / ".bashrc").exists() and not (outer / ".bashrc").exists()
    if Path("/etc/cron.d").exists():
        assert set(Path("/etc/cron.d").iterdir()) == before
    listed = gridfs("ls", "grid:/evil", node=client)
    assert listed.returncode == 0 and listed.stdout.decode() == "good\n"
    # The tree stays usable: a change to it commits, and the bad entries
    # go with the next rewrite of their directory.
    ok(gridfs("rm", "grid:/evil/good", node=client))
    again = gridfs("ls", "grid:/evil", node=client)
    assert again.returncode == 0 and again.stdout == b"" and again.stderr == b""


def test_cp_out_drops_the_setuid_bit_unless_preserve_mode(grid: Path, tmp_path: Path) -> None:
    client = grid / "client"
    src = tmp_path / "prog"
    src.write_bytes(os.urandom(100_000))  # big enough for an upload of its own
    os.chmod(src, 0o4755)
    ok(gridfs("cp", str(src), "grid:/prog", node=client))
    listed = ok(gridfs("ls", "-l", "grid:/", node=client))
    assert "-rwsr-xr-x" in listed, listed
    plain, kept = tmp_path / "plain", tmp_path / "kept"
    ok(gridfs("cp", "grid:/prog", str(plain), node=client))
    ok(gridfs("cp", "--preserve-mode", "grid:/prog", str(kept), node=client))
    assert stat.S_IMODE(plain.stat().st_mode) == 0o755 & ~current_umask()
    assert stat.S_IMODE(kept.stat().st_mode) == 0o4755 & ~current_umask()
    assert plain.read_bytes() == kept.read_bytes() == src.read_bytes()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cp_round_trip_of_a_tree_keeps_names_links_and_modes(grid: Path, tmp_path: Path) -> None:
    """The rewritten copy out still copies an ordinary tree faithfully:
    nested directories, a read-only directory, symlinks, plain modes."""
    client = grid / "client"
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "big").write_bytes(os.urandom(70_000))
    (src / "a" / "small").write_bytes(b"small")
    (src / "script").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "script", 0o750)
    os.symlink("a/small", src / "link")
    (src / "ro").mkdir()
    (src / "ro" / "f").write_bytes(b"in a read-only directory")
    os.chmod(src / "ro", 0o555)
    ok(gridfs("cp", "-r", str(src), "grid:/round", node=client))
    out = tmp_path / "out"
    out.mkdir()
    ok(gridfs("cp", "-r", "grid:/round", str(out), node=client))
    back = out / "round"
    assert files_under(back) == files_under(src)
    for rel in ("a/b/big", "a/small", "script", "ro/f"):
        assert (back / rel).read_bytes() == (src / rel).read_bytes(), rel
        assert (back / rel).stat().st_mode == (src / rel).stat().st_mode, rel
    assert os.readlink(back / "link") == "a/small"
    assert stat.S_IMODE((back / "ro").stat().st_mode) == 0o555
    single = tmp_path / "single"
    ok(gridfs("cp", "grid:/round/a/small", str(single), node=client))
    assert single.read_bytes() == b"small"
