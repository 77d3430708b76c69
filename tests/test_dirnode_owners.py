"""Directory entries with owners and special files: the msgpack form; queued
entries written before owners were kept; directories of format version 1."""

from __future__ import annotations

import msgpack
import pytest

from gridfs.dirnode import KINDS, Directory, Entry
from gridfs.errors import FormatError

LEGACY = [["f", "file", "gridfs:lit:aa", 1, 0o644, 5, 6, "", {}, None]]


def packed(entries: list[list[object]], version: int = 2) -> bytes:
    return msgpack.packb({"entries": entries, "version": version})


def test_a_queued_entry_written_before_owners_reads_as_unowned() -> None:
    name, entry = Entry.from_wire(LEGACY[0])
    assert name == "f" and entry.uid is None and entry.gid is None and entry.rdev == 0
    assert entry.to_wire("f") == [*LEGACY[0], None, None, 0, {}]  # written as version 2


def test_a_version_1_directory_is_refused_with_one_error_naming_the_version() -> None:
    with pytest.raises(FormatError, match="directory format version 1, which this gridfs"):
        Directory.unpack(packed(LEGACY, version=1))
    with pytest.raises(FormatError, match="version 7 is unknown"):
        Directory.unpack(packed([], version=7))


def test_extra_properties_round_trip_and_are_bounded() -> None:
    entry = Entry("file", "gridfs:lit:aa", 1, extra={"atime_ns": 5, "z": b"x"})
    back = Directory.unpack(Directory({"f": entry}).pack()).entries["f"]
    assert back == entry
    too_many = [*LEGACY[0], None, None, 0, {f"k{i}": i for i in range(33)}]
    with pytest.raises(FormatError, match="extra properties"):
        Directory.unpack(packed([too_many]))


def test_owner_setuid_and_device_round_trip() -> None:
    entries = {
        "f": Entry("file", "gridfs:lit:aa", 1, 0o4755, 5, 6, uid=1001, gid=3000),
        "d": Entry("dir", "gridfs:lit:bb", 0, 0o3775, 5, 6, uid=0, gid=50),
        "p": Entry("fifo", "", 0, 0o600, 5, 6, uid=1001, gid=1001),
        "c": Entry("chr", "", 0, 0o640, 5, 6, uid=0, gid=0, rdev=0x10F0103),
        "b": Entry("blk", "", 0, 0o600, 5, 6, uid=0, gid=6, rdev=(8 << 8) | 1),
        "s": Entry("sock", "", 0, 0o755, 5, 6, uid=65534, gid=65534),
    }
    d = Directory(entries)
    back = Directory.unpack(d.pack())
    assert dict(back.entries) == entries
    wire = msgpack.unpackb(d.pack())["entries"]
    assert wire[0] == ["b", "blk", "", 0, 0o600, 5, 6, "", {}, None, 0, 6, 0x801, {}]
    kinds = [back.entries[name].st_mode >> 12 for name in back]  # b c d f p s
    assert kinds == [0o6, 0o2, 0o4, 0o10, 0o1, 0o14]


def test_every_kind_is_known() -> None:
    assert KINDS == ("file", "dir", "symlink", "fifo", "chr", "blk", "sock")


@pytest.mark.parametrize(
    "tail",
    [
        [1],  # 11 fields
        [1, 2],
        [1, 2, 3, 4],
        [-1, 0, 0],  # negative id
        [1 << 32, 0, 0],
        [1, None, 0],  # a uid without gid
        ["1", 2, 0],
        [1, 2, -5],
        [1, 2, None],
        [True, 2, 0],
    ],
)
def test_bad_owner_fields_are_format_errors(tail: list[object]) -> None:
    with pytest.raises(FormatError):
        Directory.unpack(packed([LEGACY[0] + tail]))


def test_unknown_kind_is_a_format_error() -> None:
    with pytest.raises(FormatError):
        Directory.unpack(packed([["f", "door", "", 0, 0, 0, 0, "", {}, None, 0, 0, 0]]))
