"""Large files through a real mount become chunked files: written, queued,
uploaded as chunks with their holes, read back chunk by chunk; the CLI's
get, cat and check -r read and check them the same way."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from gridfs.caps import ChunkedCap, parse_read_cap

from .mountutil import Grid, Mount, gridfs, outside

pytest_plugins = ["tests.mountutil"]
MiB = 1 << 20


def test_a_large_sparse_file_is_stored_and_read_as_chunks(
    mount_grid: Grid, fresh_mount: Mount, tmp_path: Path
) -> None:
    rng = random.Random(21)
    head, tail = rng.randbytes(6 * MiB), rng.randbytes(MiB + 123)
    path = fresh_mount.mountpoint / "big"
    with open(path, "wb") as f:
        f.write(head)
        f.seek(11 * MiB)  # a 5 MiB hole
        f.write(tail)
        os.fsync(f.fileno())
    want = head + bytes(5 * MiB) + tail
    fresh_mount.flush()
    cap = os.getxattr(path, "user.gridfs.cap").decode()
    parsed = parse_read_cap(cap)
    assert isinstance(parsed, ChunkedCap) and parsed.size == len(want)
    fresh_mount.remount()
    with open(path, "rb") as f:  # sequential, through the chunk reader
        assert f.read() == want
        f.seek(6 * MiB - 10)  # across a chunk and a hole
        assert f.read(20) == want[6 * MiB - 10 : 6 * MiB + 10]
    assert outside(mount_grid, fresh_mount.node, "cat", "t:/big") == want
    out = tmp_path / "got"
    gridfs("get", cap, "-o", out, "--node", fresh_mount.node)
    assert out.read_bytes() == want
    checked = gridfs("check", "-r", "--json", "grid:/", "--node", fresh_mount.node).stdout
    results = {r["path"]: r for r in map(json.loads, checked.splitlines())}
    big = results["grid:/big"]
    assert big["healthy"] and big["parts"] >= 4  # the manifest and each chunk

    # A 4 KiB overwrite stores a chunk or two, a manifest and the directories.
    before = objects(mount_grid)
    with open(path, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"y" * 4096)
        os.fsync(f.fileno())
    fresh_mount.flush()
    assert os.getxattr(path, "user.gridfs.cap").decode() != cap
    added = objects(mount_grid) - before
    assert 2 <= len(added) <= 6, added
    with open(path, "rb") as f:
        assert f.read() == want[: 2 * MiB] + b"y" * 4096 + want[2 * MiB + 4096 :]


def objects(grid: Grid) -> set[str]:
    """Storage indexes with a share on any server of the grid."""
    return {p.parent.name for p in grid.dir.glob("storage-*/storage/shares/*/*/*")}


def test_gridfs_put_of_a_large_file_prints_a_chunked_cap(
    mount_grid: Grid, mount_node: Path, tmp_path: Path
) -> None:
    data = random.Random(22).randbytes(24 * MiB)
    local = tmp_path / "local.bin"
    local.write_bytes(data)
    cap = gridfs("put", local, "--node", mount_node).stdout.strip()
    assert cap.startswith("gridfs:chunked:")
    assert cap in gridfs("retain", "--list", "--node", mount_node).stdout
    out = tmp_path / "back"
    gridfs("get", cap, "-o", out, "--node", mount_node)
    assert out.read_bytes() == data
    checked = gridfs("check", "--verify", cap, "--node", mount_node).stdout
    assert "healthy" in checked and "parts" in checked, checked
    verify = parse_read_cap(cap).verify_cap().to_string()  # type: ignore[union-attr]
    assert "healthy" in gridfs("check", verify, "--node", mount_node).stdout
    unlinked = gridfs("unlink", cap, "--node", mount_node).stdout
    freed = re.search(r"(\d+) server copies freed", unlinked)
    assert freed and int(freed[1]) >= 5 * 5, unlinked  # manifest and chunks, 5 servers each
    assert "still referenced" not in unlinked, unlinked  # nothing else uses its chunks
