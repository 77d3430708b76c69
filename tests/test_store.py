"""The on-disk share store, on real files: uploads, checks, limits, crashes."""

from __future__ import annotations

import errno
import mmap
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridfs.caps import b32encode
from gridfs.codec import CodecParams
from gridfs.errors import UsageError
from gridfs.fileutil import DROP_LAG
from gridfs.layout import Geometry, ShareHeader
from gridfs.storage.store import (
    BadWriteError,
    BucketWriter,
    IncompleteShareError,
    NoSpaceError,
    NoSuchShareError,
    ShareStore,
    ShareTooLargeError,
    StoreError,
    StoreLimits,
)

from .helpers import encode_bytes, filesystem_type, resident_page_map, resident_pages

PARAMS = CodecParams(3, 5, 96)
MiB = 1 << 20
NO_RESERVE = StoreLimits(reserved_space=0)


def make_file(size: int = 1000, seed: int = 1) -> tuple[bytes, list[bytes]]:
    """(storage index, shares) of a real encoded file."""
    rng = random.Random(seed)
    cap, shares = encode_bytes(rng.randbytes(size), rng.randbytes(32), PARAMS)
    return cap.storage_index, shares


def upload(bucket: BucketWriter, data: bytes, chunk: int = 37, seed: int = 0) -> None:
    """Write ``data`` in chunks, in a shuffled order, then close."""
    offsets = list(range(0, len(data), chunk))
    random.Random(seed).shuffle(offsets)
    for off in offsets:
        bucket.write(off, data[off : off + chunk])
    bucket.close()


def incoming_files(root: Path) -> list[Path]:
    return list((root / "incoming").rglob("*"))


@pytest.fixture
def store(tmp_path: Path) -> ShareStore:
    return ShareStore(tmp_path, NO_RESERVE)


def test_out_of_order_upload_reads_back(store: ShareStore, tmp_path: Path) -> None:
    si, shares = make_file()
    have, buckets = store.allocate(si, range(5), len(shares[0]))
    assert have == set() and sorted(buckets) == [0, 1, 2, 3, 4]
    assert store.shares(si) == {}  # nothing visible before close
    for num, bucket in buckets.items():
        upload(bucket, shares[num], seed=num)
        assert bucket.closed and not bucket.aborted
    assert store.shares(si) == {i: len(s) for i, s in enumerate(shares)}
    for i, share in enumerate(shares):
        assert store.read(si, i, 0, len(share)) == share
        assert store.read(si, i, 100, 50) == share[100:150]
    name = b32encode(si)
    assert (tmp_path / "shares" / name[:2] / name / "3").read_bytes() == shares[3]
    assert store.open_buckets() == 0 and incoming_files(tmp_path) == []


def test_already_have_after_close(store: ShareStore) -> None:
    si, shares = make_file()
    _, buckets = store.allocate(si, [0, 1], len(shares[0]))
    for num, bucket in buckets.items():
        upload(bucket, shares[num])
    have, buckets = store.allocate(si, [0, 1, 2], len(shares[0]))
    assert have == {0, 1} and sorted(buckets) == [2]


def test_share_being_written_is_skipped(store: ShareStore) -> None:
    si, shares = make_file()
    _, first = store.allocate(si, [0, 1], len(shares[0]))
    have, second = store.allocate(si, [1, 2], len(shares[0]))
    assert have == set() and sorted(second) == [2]
    assert store.open_buckets() == 3
    first[1].abort()
    _, third = store.allocate(si, [1], len(shares[0]))
    assert sorted(third) == [1]
    upload(third[1], shares[1])
    assert store.read(si, 1, 0, len(shares[1])) == shares[1]


def test_overlapping_and_out_of_range_writes_are_rejected(store: ShareStore) -> None:
    si, shares = make_file()
    data = shares[0]
    size = len(data)
    (bucket,) = store.allocate(si, [0], size)[1].values()
    bucket.write(100, data[100:200])
    garbage = b"\xff" * 50
    for offset in (80, 150, 199):  # overlaps [100, 200) at its start, middle and end
        with pytest.raises(BadWriteError):
            bucket.write(offset, garbage[:30])
    with pytest.raises(BadWriteError):
        bucket.write(50, b"\xff" * 200)  # covers the whole written range
    for offset, length in ((-1, 10), (size - 5, 10), (size, 1)):
        with pytest.raises(BadWriteError):
            bucket.write(offset, b"\xff" * length)
    bucket.write(200, data[200:300])  # adjacent ranges are fine
    bucket.write(0, data[:100])
    bucket.write(300, data[300:])
    bucket.close()
    # No rejected write touched the file.
    assert store.read(si, 0, 0, size) == data
    with pytest.raises(BadWriteError):
        bucket.write(0, data[:1])
    with pytest.raises(BadWriteError):
        bucket.close()


def test_write_bridging_two_ranges_merges_them(store: ShareStore) -> None:
    (bucket,) = store.allocate(bytes(16), [0], 100)[1].values()
    bucket.write(0, b"a" * 10)
    bucket.write(20, b"c" * 10)
    bucket.write(10, b"b" * 10)  # [0, 30) is now one range
    for offset in (5, 15, 25, 29):
        with pytest.raises(BadWriteError):
            bucket.write(offset, b"x")
    bucket.write(30, b"d" * 70)
    assert bucket.written == 100


@given(st.lists(st.tuples(st.integers(-5, 70), st.integers(0, 20)), max_size=25))
def test_writes_are_accepted_exactly_when_in_range_and_fresh(
    tmp_path_factory: pytest.TempPathFactory, writes: list[tuple[int, int]]
) -> None:
    size = 64
    store = ShareStore(tmp_path_factory.mktemp("w"), NO_RESERVE)
    (bucket,) = store.allocate(bytes(16), [0], size)[1].values()
    written: set[int] = set()  # the model: every byte offset written so far
    for offset, length in writes:
        span = set(range(offset, offset + length))
        ok = offset >= 0 and offset + length <= size and not span & written
        if ok:
            bucket.write(offset, bytes([offset % 256]) * length)
            written |= span
        else:
            with pytest.raises(BadWriteError):
                bucket.write(offset, b"x" * length)
    assert bucket.written == len(written)
    bucket.abort()


def test_incomplete_share_is_not_kept(store: ShareStore, tmp_path: Path) -> None:
    si, shares = make_file()
    data = shares[0]
    (bucket,) = store.allocate(si, [0], len(data))[1].values()
    bucket.write(0, data[:-10])
    bucket.write(len(data) - 9, data[-9:])  # one byte missing in the middle of the tail
    with pytest.raises(IncompleteShareError):
        bucket.close()
    assert bucket.aborted and not bucket.closed
    assert store.shares(si) == {} and store.open_buckets() == 0
    assert incoming_files(tmp_path) == []
    with pytest.raises(NoSuchShareError):
        store.read(si, 0, 0, 10)


Tamper = Callable[[bytes, list[bytes]], tuple[bytes, int, bytes]]
"""Given a file's storage index and shares: (storage index, share number, bytes) to upload."""


def _garbage(si: bytes, shares: list[bytes]) -> tuple[bytes, int, bytes]:
    return si, 0, b"\0" * 8 + shares[0][8:]


def _wrong_sharenum(si: bytes, shares: list[bytes]) -> tuple[bytes, int, bytes]:
    return si, 2, shares[1]


def _wrong_storage_index(si: bytes, shares: list[bytes]) -> tuple[bytes, int, bytes]:
    other_si, other = make_file(seed=2)
    assert other_si != si and len(other[0]) == len(shares[0])
    return si, 0, other[0]


def _wrong_size(si: bytes, shares: list[bytes]) -> tuple[bytes, int, bytes]:
    return si, 0, shares[0] + b"\0"


def _shorter_than_header(si: bytes, shares: list[bytes]) -> tuple[bytes, int, bytes]:
    return si, 0, shares[0][:20]


@pytest.mark.parametrize(
    "make",
    [_garbage, _wrong_sharenum, _wrong_storage_index, _wrong_size, _shorter_than_header],
)
def test_share_with_wrong_header_is_rejected(
    store: ShareStore, tmp_path: Path, make: Tamper
) -> None:
    si, shares = make_file()
    si, num, data = make(si, shares)
    (bucket,) = store.allocate(si, [num], len(data))[1].values()
    bucket.write(0, data)
    with pytest.raises(IncompleteShareError):
        bucket.close()
    assert bucket.aborted
    assert store.shares(si) == {} and store.open_buckets() == 0
    assert incoming_files(tmp_path) == []


def test_abort_leaves_nothing(store: ShareStore, tmp_path: Path) -> None:
    si, shares = make_file()
    (bucket,) = store.allocate(si, [0], len(shares[0]))[1].values()
    bucket.write(0, shares[0][:200])
    assert incoming_files(tmp_path) != []
    bucket.abort()
    bucket.abort()  # idempotent
    assert bucket.aborted and store.open_buckets() == 0
    assert incoming_files(tmp_path) == [] and store.shares(si) == {}
    with pytest.raises(BadWriteError):
        bucket.write(200, shares[0][200:300])
    with pytest.raises(BadWriteError):
        bucket.close()
    # The share number is free again.
    assert sorted(store.allocate(si, [0], len(shares[0]))[1]) == [0]


def test_abort_after_close_keeps_the_share(store: ShareStore) -> None:
    si, shares = make_file()
    (bucket,) = store.allocate(si, [0], len(shares[0]))[1].values()
    upload(bucket, shares[0])
    bucket.abort()
    assert bucket.closed and not bucket.aborted
    assert store.read(si, 0, 0, len(shares[0])) == shares[0]


def test_crash_keeps_closed_shares_and_drops_partial_ones(tmp_path: Path) -> None:
    si, shares = make_file()
    size = len(shares[0])
    store = ShareStore(tmp_path, NO_RESERVE)
    _, buckets = store.allocate(si, [0, 1, 2], size)
    upload(buckets[0], shares[0])
    buckets[1].write(0, shares[1][: size // 2])
    (tmp_path / "incoming" / "stray").write_bytes(b"left by an older crash")
    del store, buckets  # the process dies with two uploads open

    store = ShareStore(tmp_path, NO_RESERVE)
    assert list((tmp_path / "incoming").iterdir()) == []
    assert store.shares(si) == {0: size}
    assert store.read(si, 0, 0, size) == shares[0]
    assert store.open_buckets() == 0
    have, buckets = store.allocate(si, [0, 1, 2], size)
    assert have == {0} and sorted(buckets) == [1, 2]


def test_room_outside_buckets_respects_the_reserve_and_open_buckets(tmp_path: Path) -> None:
    """check_room (what slots use) keeps the reserved space, and counts what
    open buckets were promised, like an allocation."""
    free = ShareStore(tmp_path, NO_RESERVE).capacity()["free"]
    margin = 1024 * MiB
    if free < 2 * margin:
        pytest.skip("not enough free disk space for this test")
    store = ShareStore(tmp_path, StoreLimits(reserved_space=free - margin))
    store.check_room(256 * MiB)
    with pytest.raises(NoSpaceError):
        store.check_room(2 * margin)
    si, _ = make_file()
    _, buckets = store.allocate(si, [0], 700 * MiB)
    with pytest.raises(NoSpaceError):
        store.check_room(700 * MiB)
    buckets[0].abort()
    store.check_room(256 * MiB)


def test_reserved_space_is_never_promised(tmp_path: Path) -> None:
    # Free space moves while other processes run: every size below keeps
    # hundreds of MiB between "fits" and "does not fit".
    free = ShareStore(tmp_path, NO_RESERVE).capacity()["free"]
    margin = 1024 * MiB
    if free < 2 * margin:
        pytest.skip("not enough free disk space for this test")
    store = ShareStore(tmp_path, StoreLimits(reserved_space=free - margin))
    assert 0 < store.capacity()["available"] <= margin + 256 * MiB
    si, _ = make_file()
    with pytest.raises(NoSpaceError) as e:
        store.allocate(si, [0], 2 * margin)
    assert e.value.errno == errno.ENOSPC
    # All or nothing: three shares that fit one by one do not fit together.
    with pytest.raises(NoSpaceError):
        store.allocate(si, [0, 1, 2], 500 * MiB)
    assert store.open_buckets() == 0 and incoming_files(tmp_path) == []
    # Space promised to an open bucket is not promised again.
    before = store.capacity()["free"]
    _, buckets = store.allocate(si, [0], 700 * MiB)
    assert sorted(buckets) == [0]
    assert before - store.capacity()["free"] >= 500 * MiB
    with pytest.raises(NoSpaceError):
        store.allocate(si, [1], 700 * MiB)
    buckets[0].abort()
    assert sorted(store.allocate(si, [1], 700 * MiB)[1]) == [1]


def test_max_share_size(tmp_path: Path) -> None:
    store = ShareStore(tmp_path, StoreLimits(reserved_space=0, max_share_size=1000))
    si, _ = make_file()
    with pytest.raises(ShareTooLargeError) as e:
        store.allocate(si, [0, 1], 1001)
    assert e.value.errno == errno.EFBIG
    assert store.open_buckets() == 0
    assert sorted(store.allocate(si, [0], 1000)[1]) == [0]


def test_read_past_end_and_missing_shares(store: ShareStore) -> None:
    si, shares = make_file()
    size = len(shares[0])
    upload(store.allocate(si, [0], size)[1][0], shares[0])
    assert store.read(si, 0, size - 10, 100) == shares[0][-10:]
    assert store.read(si, 0, size + 5, 100) == b""
    assert store.read(si, 0, 0, 0) == b""
    with pytest.raises(NoSuchShareError) as e:
        store.read(si, 1, 0, 10)
    assert e.value.errno == errno.ENOENT
    with pytest.raises(NoSuchShareError):
        store.read(bytes(16), 0, 0, 10)


def test_capacity(tmp_path: Path) -> None:
    limits = StoreLimits(reserved_space=12345, max_share_size=1 << 30)
    store = ShareStore(tmp_path, limits)
    cap = store.capacity()
    assert set(cap) == {
        "total", "free", "reserved", "available", "max_share_size", "used", "shares"
    }  # fmt: skip
    assert cap["reserved"] == 12345 and cap["max_share_size"] == 1 << 30
    assert cap["total"] >= cap["free"] > 0
    assert cap["available"] == max(0, cap["free"] - 12345)
    assert cap["used"] == 0 and cap["shares"] == 0
    si, shares = make_file()
    _, buckets = store.allocate(si, [0, 1], len(shares[0]))
    for num, bucket in buckets.items():
        upload(bucket, shares[num])
    assert store.capacity()["used"] == 2 * len(shares[0])
    assert store.capacity()["shares"] == 2
    # A fresh store finds the same by walking the disk.
    fresh = ShareStore(tmp_path, limits).capacity()
    assert fresh["used"] == 2 * len(shares[0]) and fresh["shares"] == 2
    store.delete_share(si, 0)
    assert store.capacity()["shares"] == 1


def test_delete_share(store: ShareStore, tmp_path: Path) -> None:
    si, shares = make_file()
    size = len(shares[0])
    _, buckets = store.allocate(si, [0, 1], size)
    for num, bucket in buckets.items():
        upload(bucket, shares[num])
    store.capacity()  # start counting what is used
    store.delete_share(si, 0)
    assert store.shares(si) == {1: size}
    assert store.capacity()["used"] == size
    store.delete_share(si, 1)
    assert store.shares(si) == {} and list((tmp_path / "shares").iterdir()) == []
    with pytest.raises(NoSuchShareError):
        store.delete_share(si, 1)
    assert sorted(store.allocate(si, [0], size)[1]) == [0]


def test_write_updates_last_activity(store: ShareStore) -> None:
    si, shares = make_file()
    (bucket,) = store.allocate(si, [0], len(shares[0]))[1].values()
    bucket.last_activity = 0.0
    bucket.write(0, shares[0][:10])
    assert bucket.last_activity > 0.0


@pytest.mark.parametrize(
    ("si", "nums", "size"),
    [
        (bytes(15), [0], 100),
        (bytes(17), [0], 100),
        ("a" * 16, [0], 100),
        (bytes(16), [256], 100),
        (bytes(16), [-1], 100),
        (bytes(16), [0], 0),
    ],
)
def test_bad_requests_are_usage_errors(
    store: ShareStore, si: bytes, nums: list[int], size: int
) -> None:
    with pytest.raises(UsageError):
        store.allocate(si, nums, size)
    assert store.open_buckets() == 0


def test_bad_storage_index_everywhere(store: ShareStore) -> None:
    for call in (
        lambda: store.shares(bytes(15)),
        lambda: store.read(bytes(15), 0, 0, 1),
        lambda: store.delete_share(bytes(17), 0),
        lambda: store.read(bytes(16), 0, -1, 1),
    ):
        with pytest.raises(UsageError):
            call()


def test_errors_are_store_errors_with_errnos() -> None:
    assert StoreError("x").errno == errno.EIO
    assert BadWriteError("x").errno == errno.EINVAL
    assert IncompleteShareError("x").errno == errno.EINVAL
    assert issubclass(NoSpaceError, StoreError) and issubclass(NoSuchShareError, StoreError)


def test_drop_behind_keeps_the_pages_of_gaps_still_to_be_written(
    store: ShareStore, tmp_path: Path
) -> None:
    """An upload writes the blocks first, and each record's proofs and the
    share's head at the end: the pages holding those gaps stay cached, so
    the last writes need no read from disk; pages written whole leave."""
    if filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("a memory filesystem keeps its pages: they are the data")
    geometry = Geometry(CodecParams(3, 10, 3 << 18), 192 * MiB)  # 256 records, 64 MiB
    si = bytes(range(16))
    _, buckets = store.allocate(si, [0], geometry.share_size)
    bucket = buckets[0]
    rng = random.Random(3)
    blocks = []
    for j in range(geometry.num_segments):
        offset, length = geometry.record_span(j)
        blocks.append((offset + geometry.proof_size, offset + length))
    for start, end in blocks[:-1]:
        bucket.write(start, rng.randbytes(end - start))
    (incoming,) = [p for p in incoming_files(tmp_path) if p.is_file()]
    fd = os.open(incoming, os.O_RDONLY)
    try:
        os.fsync(fd)  # every page clean: droppable unless kept on purpose
    finally:
        os.close(fd)
    start, end = blocks[-1]
    bucket.write(start, rng.randbytes(end - start))  # one more drop pass
    cached = resident_page_map(incoming)
    page = mmap.PAGESIZE
    gaps = [(geometry.record_span(j)[0], geometry.proof_size) for j in range(len(blocks))]
    far = [(o, n) for o, n in gaps if o + n < geometry.share_size - 2 * DROP_LAG]
    assert len(far) > 100
    for o, n in far:
        assert all(cached[o // page : (o + n - 1) // page + 1]), f"gap at {o} was dropped"
    assert sum(cached) < len(cached) // 2  # and pages written whole did leave
    head = ShareHeader(0, si, geometry).pack()
    bucket.write(0, head + bytes(geometry.records_offset - len(head)))
    for o, n in gaps:
        bucket.write(o, rng.randbytes(n))
    bucket.close()
    assert store.shares(si) == {0: geometry.share_size}


def test_closed_share_leaves_the_page_cache(store: ShareStore, tmp_path: Path) -> None:
    """A share is written once: once on disk its pages are let go of, so
    uploads do not fill the page cache (drop-behind)."""
    if filesystem_type(tmp_path) in ("tmpfs", "ramfs"):
        pytest.skip("a memory filesystem keeps its pages: they are the data")
    geometry = Geometry(CodecParams(3, 10, 3 << 18), 48 * MiB)
    si = bytes(range(16))
    _, buckets = store.allocate(si, [0], geometry.share_size)
    head = ShareHeader(0, si, geometry).pack()
    data = head + random.Random(2).randbytes(geometry.share_size - len(head))
    for off in range(0, len(data), MiB):
        buckets[0].write(off, data[off : off + MiB])
    buckets[0].close()
    name = b32encode(si)
    share = tmp_path / "shares" / name[:2] / name / "0"
    assert resident_pages(share) == 0
    assert store.read(si, 0, 0, len(data)) == data  # and it reads back from disk
