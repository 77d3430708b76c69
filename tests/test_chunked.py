"""Chunked files on real servers: round trips with holes, edits and puts
that store only what changed, chunks shared between files, lying servers,
check and repair chunk by chunk; and the manifest format against hostile
bytes."""

from __future__ import annotations

import contextlib
import os
import random
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from gridfs_daemon.chunkreader import ChunkedReader
from gridfs_daemon.segcache import SegmentCache
from hypothesis import given, settings
from hypothesis import strategies as st

from gridfs.caps import ChunkedCap, ChunkedVerifyCap, ReadCap, b32encode, parse, parse_read_cap
from gridfs.client import chunkread
from gridfs.client.chunkcheck import check_chunked
from gridfs.client.chunked import CHUNK_MAX, load_manifest, put_edit, put_file
from gridfs.client.chunkread import expand
from gridfs.client.chunkstore import split_zeros, upload_data
from gridfs.client.grid import GridClient
from gridfs.client.grid import open_grid as open_client
from gridfs.client.keeper import RetainedSet, get_keeper
from gridfs.client.maintain import check_and_repair
from gridfs.config import NodeConfig, NodeDir
from gridfs.errors import CapError, FormatError, GridError
from gridfs.manifest import MAGIC, Chunk, Hole, Manifest, pack, unpack

from .gridutil import MEMBERS, Grid, GridSession, Tamper, open_grid

TIMEOUT = 120
SERVERS = 5
K, HAPPY, N = 2, 4, 5


@contextlib.asynccontextmanager
async def client_node(path: Path, grid: Grid) -> AsyncIterator[GridClient]:
    node = NodeDir(path)
    if not node.exists():
        servers = [str(a) for a in grid.addresses]
        node.create(NodeConfig("client", path.name, servers=servers, k=K, happy=HAPPY, n=N))
        MEMBERS.enroll(node, "client")
    async with open_client(node) as client:
        await client.wait_for_servers()
        yield client


def stored_bytes(grid: Grid) -> int:
    return sum(p.stat().st_size for p in grid.all_shares())


def objects(grid: Grid) -> set[str]:
    """The storage indexes with shares anywhere (by directory name)."""
    return {p.parent.name for p in grid.all_shares()}


async def get_all(
    client: GridClient, cap: str, offset: int = 0, length: int | None = None
) -> bytes:
    parts: list[bytes] = []

    async def collect(data: bytes) -> None:
        parts.append(data)

    await client.get(parse_read_cap(cap), collect, offset, length)
    return b"".join(parts)


async def chunk_sis(client: GridClient, cap: str) -> set[bytes]:
    parsed = parse(cap)
    assert isinstance(parsed, ChunkedCap)
    return {c.storage_index for c in (await load_manifest(client, parsed)).chunk_caps()}


async def put_random(
    client: GridClient, tmp_path: Path, seed: int, size: int
) -> tuple[ChunkedCap, bytes]:
    """``size`` random bytes (from ``seed``) put as a chunked file: its cap and bytes."""
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"random-{seed}"
    path.write_bytes(data)
    cap = parse(await put_file(client, path))
    assert isinstance(cap, ChunkedCap)
    return cap, data


def write_sparse(path: Path, pieces: list[tuple[int, bytes]], size: int) -> None:
    with open(path, "wb") as f:
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
        f.truncate(size)


def expected(pieces: list[tuple[int, bytes]], size: int) -> bytes:
    out = bytearray(size)
    for offset, data in pieces:
        out[offset : offset + len(data)] = data[: max(0, size - offset)]
    return bytes(out[:size])


MiB = 1 << 20


# -- the manifest format -----------------------------------------------------


def some_manifest() -> Manifest:
    caps = [ReadCap(os.urandom(32), os.urandom(32), K, N, n) for n in (300_000, 1_000_000)]
    return Manifest.of([Chunk(caps[0]), Hole(5000), Hole(7), Chunk(caps[1]), Hole(1)])


def test_manifest_round_trip_is_canonical() -> None:
    m = some_manifest()
    assert [type(e) for e in m.elements] == [Chunk, Hole, Chunk, Hole]
    data = pack(m)
    assert unpack(data, m.size) == m
    assert m.size == 1_305_008
    assert [s for s, _ in m.spans(300_000, 300_001)] == [300_000]
    assert len(data) == 20 + 2 * 75 + 2 * 9


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-1],  # truncated
        lambda d: d + b"\0",  # trailing bytes
        lambda d: b"X" + d[1:],  # magic
        lambda d: d[:8] + struct.pack(">I", 5) + d[12:],  # count too high
        lambda d: d[:8] + struct.pack(">I", 1 << 30) + d[12:],  # count absurd
        lambda d: d[:12] + struct.pack(">Q", 1) + d[20:],  # size is not the sum
        lambda d: d[:20] + b"\x07" + d[21:],  # unknown tag
        lambda d: d[:20] + b"\x01" + struct.pack(">Q", 0) + d[29:],  # empty chunk
        lambda d: d[:20] + b"\x01" + struct.pack(">Q", 1 << 40) + d[29:],  # chunk too big
        lambda d: d[:93] + b"\x00" + d[94:],  # chunk k of 0
    ],
)
def test_hostile_manifests_are_refused_with_one_error(mutate: Any) -> None:
    data = pack(some_manifest())
    with pytest.raises(FormatError):
        unpack(mutate(data))


def test_two_holes_in_a_row_and_a_wrong_size_are_refused() -> None:
    two_holes = MAGIC + struct.pack(">IQ", 2, 2) + struct.pack(">BQ", 0, 1) * 2
    with pytest.raises(FormatError, match="two holes"):
        unpack(two_holes)
    data = pack(some_manifest())
    with pytest.raises(FormatError, match="the cap says"):
        unpack(data, 12)
    with pytest.raises(FormatError, match="format version 2 "):
        unpack(data[:7] + b"\x02" + data[8:])


def test_chunked_caps_parse_strictly() -> None:
    inner = ReadCap(os.urandom(32), os.urandom(32), 3, 10, 4321)
    cap = ChunkedCap(inner, 10 * MiB)
    text = cap.to_string()
    assert text.startswith("gridfs:chunked:") and text.endswith(f":4321:{10 * MiB}")
    assert parse(text) == cap == parse_read_cap(text)
    verify = cap.verify_cap()
    assert isinstance(parse(verify.to_string()), ChunkedVerifyCap)
    assert verify.storage_index == cap.storage_index == inner.storage_index
    with pytest.raises(CapError, match="verify cap"):
        parse_read_cap(verify.to_string())
    for bad in (text + ":1", text.replace(":3:10:", ":0:10:"), text[:-1] + "x", text + " x"):
        with pytest.raises(CapError):
            parse(bad)


# -- on the grid ------------------------------------------------------------


async def test_round_trip_keeps_holes_and_never_uploads_zeros(tmp_path: Path) -> None:
    data_a, data_b = os.urandom(3 * MiB), os.urandom(2 * MiB)
    pieces = [(0, data_a), (6 * MiB, data_b), (9 * MiB, bytes(3 * MiB)), (12 * MiB, b"end")]
    size = 12 * MiB + 3
    source = tmp_path / "sparse"
    write_sparse(source, pieces, size)
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap = await put_file(client, source)
                parsed = parse_read_cap(cap)
                assert isinstance(parsed, ChunkedCap) and parsed.size == size
                assert await get_all(client, cap) == expected(pieces, size)
                for offset, length in (
                    (0, 1),
                    (3 * MiB - 5, 10),
                    (5 * MiB, 2 * MiB),
                    (size - 2, 9),
                ):
                    want = expected(pieces, size)[offset : offset + length]
                    assert await get_all(client, cap, offset, length) == want
                manifest = await load_manifest(client, parsed)
                holes = sum(e.length for e in manifest.elements if isinstance(e, Hole))
                # The holes, and the zeros written out (but for a block at an edge).
                assert holes >= 7 * MiB - 4096
                # What the servers hold is the data (times n/k), not the zeros.
                assert stored_bytes(grid) < (5 * MiB + 256 * 1024) * N // K

                # A file that is one hole: a manifest and nothing else.
                empty = tmp_path / "empty"
                write_sparse(empty, [], 40 * MiB)
                before = objects(grid)
                hole_cap = await put_file(client, empty)
                assert len(objects(grid) - before) == 1
                assert await get_all(client, hole_cap) == bytes(40 * MiB)


async def test_an_edit_stores_only_the_chunks_it_changed(tmp_path: Path) -> None:
    rng = random.Random(7)
    base = rng.randbytes(16 * MiB)
    source = tmp_path / "base"
    source.write_bytes(base)
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                base_cap = await put_file(client, source)
                before_objects, before_bytes = objects(grid), stored_bytes(grid)
                edit = tmp_path / "edit"
                write_sparse(edit, [(9 * MiB, b"x" * 4096)], 16 * MiB)
                new_cap = await put_edit(client, base_cap, edit, [(9 * MiB, 4096)], 16 * MiB)
                want = base[: 9 * MiB] + b"x" * 4096 + base[9 * MiB + 4096 :]
                assert await get_all(client, new_cap) == want
                added = objects(grid) - before_objects
                assert 2 <= len(added) <= 4  # a chunk or two, and the manifest
                written = stored_bytes(grid) - before_bytes
                assert written <= 2 * CHUNK_MAX * N // K + MiB
                # The base still reads as it was.
                assert await get_all(client, base_cap) == base

                # Truncate into the middle, extend with a hole and a write past it.
                tail = tmp_path / "tail"
                write_sparse(tail, [(30 * MiB, b"tail")], 30 * MiB + 4)
                size = 30 * MiB + 4
                third = await put_edit(client, new_cap, tail, [(7 * MiB, 0), (30 * MiB, 4)], size)
                assert await get_all(client, third) == (
                    want[:size] + bytes(size - len(want) - 4) + b"tail"
                )
                # A range whose source is a hole: zeros now, stored as a hole.
                before = stored_bytes(grid)
                punched = await put_edit(client, third, tail, [(MiB, 4 * MiB)], size)
                got = await get_all(client, punched)
                assert got[MiB : 5 * MiB] == bytes(4 * MiB)
                assert got[:MiB] == want[:MiB] and got[5 * MiB : 6 * MiB] == want[5 * MiB : 6 * MiB]
                holes = (await load_manifest(client, parse(punched))).elements  # type: ignore[arg-type]
                assert sum(e.length for e in holes if isinstance(e, Hole)) >= 3 * MiB
                assert stored_bytes(grid) - before <= 2 * CHUNK_MAX * N // K + MiB
                before = stored_bytes(grid)
                shrunk = await put_edit(client, third, tail, [], 5 * MiB + 17)
                assert await get_all(client, shrunk) == want[: 5 * MiB + 17]
                assert stored_bytes(grid) - before <= 2 * CHUNK_MAX * N // K + MiB


async def test_a_second_put_with_one_mib_changed_stores_a_few_chunks(tmp_path: Path) -> None:
    rng = random.Random(11)
    first = bytearray(rng.randbytes(24 * MiB))
    a = tmp_path / "a"
    a.write_bytes(first)
    second = bytearray(first)
    second[12 * MiB : 13 * MiB] = rng.randbytes(MiB)
    second[20 * MiB : 20 * MiB] = b"inserted"  # an insert shifts everything after it
    b = tmp_path / "b"
    b.write_bytes(second)
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                await put_file(client, a)
                before = objects(grid)
                cap = await put_file(client, b)
                assert await get_all(client, cap) == second
                assert len(objects(grid) - before) <= 6  # ≤ 5 chunks and a manifest
                # Without the chunk index, the servers' "already have" answers.
                (client.node.private / "chunks.sqlite").unlink()
                for suffix in ("-wal", "-shm"):
                    (client.node.private / f"chunks.sqlite{suffix}").unlink(missing_ok=True)
                before_bytes = stored_bytes(grid)
                again = await put_file(client, b)
                assert again == cap and stored_bytes(grid) == before_bytes


async def test_a_chunk_shared_by_two_files_stays_while_either_is_kept(tmp_path: Path) -> None:
    rng = random.Random(3)
    one = rng.randbytes(20 * MiB)
    two = one + rng.randbytes(4 * MiB)  # the same first chunks, then more
    pa, pb = tmp_path / "one", tmp_path / "two"
    pa.write_bytes(one)
    pb.write_bytes(two)
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap_a, cap_b = await put_file(client, pa), await put_file(client, pb)
                retained = RetainedSet(client.node)
                retained.add([cap_a, cap_b])
                chunks_a, chunks_b = await chunk_sis(client, cap_a), await chunk_sis(client, cap_b)
                shared = chunks_a & chunks_b
                assert len(shared) >= 5
                retained.remove([cap_a])
                retained.close()
                report = await get_keeper(client).unlink([cap_a])
                assert report.freed > 0  # A's manifest and its own chunks went
                assert await get_all(client, cap_b) == two
                holders = objects(grid)
                assert {b32encode(si) for si in shared} <= holders
                assert b32encode(parse_read_cap(cap_a).storage_index) not in holders  # type: ignore[union-attr]
                # A renewal walk renews every chunk of B.
                renewal = await get_keeper(client).renew_all()
                assert renewal.objects >= len(chunks_b) + 1 and not renewal.unheld


class Redirecting(GridSession):
    """A lying server: asked for one object, it serves another one's shares."""

    redirect: dict[bytes, bytes] = {}

    async def rpc_get_buckets(self, si: bytes) -> list[list[int]]:
        return await super().rpc_get_buckets(self.redirect.get(si, si))

    async def rpc_read(self, si: bytes, sharenum: int, offset: int, length: int) -> Any:
        return await super().rpc_read(self.redirect.get(si, si), sharenum, offset, length)


async def test_lying_servers_cannot_swap_a_manifest_or_a_chunk(tmp_path: Path) -> None:
    rng = random.Random(5)
    pa, pb = tmp_path / "a", tmp_path / "b"
    pa.write_bytes(rng.randbytes(5 * MiB))
    pb.write_bytes(rng.randbytes(5 * MiB))
    async with open_grid(tmp_path / "grid", SERVERS, session_class=Redirecting) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap_a, cap_b = await put_file(client, pa), await put_file(client, pb)
                ca, cb = parse(cap_a), parse(cap_b)
                assert isinstance(ca, ChunkedCap) and isinstance(cb, ChunkedCap)
                chunkread._manifests.clear()
                # Every server serves B's manifest (listing B's chunks) for A's.
                Redirecting.redirect = {ca.storage_index: cb.storage_index}
                try:
                    with pytest.raises(GridError):
                        await get_all(client, cap_a)
                    # ... and B's first chunk for A's first chunk.
                    Redirecting.redirect = {}
                    first_a = (await load_manifest(client, ca)).chunk_caps()[0]
                    first_b = (await load_manifest(client, cb)).chunk_caps()[0]
                    Redirecting.redirect = {first_a.storage_index: first_b.storage_index}
                    with pytest.raises(GridError):
                        await get_all(client, cap_a, 0, 1000)
                finally:
                    Redirecting.redirect = {}
                assert await get_all(client, cap_a) == pa.read_bytes()


async def test_a_corrupt_chunk_is_found_by_verify_and_repaired(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(12 * MiB)
    path = tmp_path / "f"
    path.write_bytes(data)
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap = parse(await put_file(client, path))
                assert isinstance(cap, ChunkedCap)
                healthy = await check_chunked(client, cap)
                assert healthy.healthy and healthy.parts >= 4
                victim = (await load_manifest(client, cap)).chunk_caps()[1]
                # One share of a chunk flipped on disk, another deleted.
                sharefiles = sorted(
                    p for node in grid.nodes for p in node.share_dir(victim.storage_index).iterdir()
                )
                with open(sharefiles[0], "r+b") as f:
                    f.seek(-100, os.SEEK_END)
                    f.write(b"\xff" * 50)
                sharefiles[1].unlink()
                found = await check_chunked(client, cap, verify=True)
                assert not found.healthy and found.recoverable
                assert any("chunk 1" in why for _, _, why in found.corrupt)
                verify_only = await check_chunked(client, cap.verify_cap())
                assert verify_only.parts == 1  # the manifest alone
                repaired = await check_chunked(client, cap, repair=True)
                assert repaired.recoverable
                after = await check_chunked(client, cap, verify=True)
                assert after.healthy and not after.corrupt
                assert await get_all(client, cap.to_string()) == data


async def test_the_mount_reader_fetches_only_the_chunks_a_read_touches(tmp_path: Path) -> None:
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                cap, data = await put_random(client, tmp_path, 13, 48 * MiB)
                manifest = await load_manifest(client, cap)
                sis = [c.storage_index for c in manifest.chunk_caps()]
                assert len(sis) >= 6

                def read_sis() -> set[bytes]:
                    return {r.si for node in grid.nodes for r in node.behaviour.reads}

                for node in grid.nodes:
                    node.behaviour.reads.clear()
                session: Any = type("Session", (), {"grid": client})()
                reader = ChunkedReader(session, cap, SegmentCache(None, max_bytes=0))
                async with trio.open_nursery() as nursery:
                    try:
                        at = manifest.starts[3] + 10
                        assert await reader.read(at, 100, nursery) == data[at : at + 100]
                        assert read_sis() == {sis[3]}  # the manifest was known
                        # Reading on in order: the next chunks are fetched ahead.
                        at += 100
                        end = manifest.starts[4] + 10
                        assert await reader.read(at, end - at, nursery) == data[at:end]
                        while sis[6] not in read_sis():
                            await trio.sleep(0.05)
                        assert sis[0] not in read_sis() and sis[-1] not in read_sis()
                    finally:
                        reader.close()


async def test_chunk_reads_fall_back_to_the_shares_whose_heads_they_skipped(
    tmp_path: Path,
) -> None:
    """A chunk's download reads k+1 heads only; when those are bad (three
    servers of five lie about every share they hold), it reads the others."""
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                chunked, data = await put_random(client, tmp_path, 17, 5 * MiB)
                cap = chunked.to_string()
                for node in grid.nodes[:3]:
                    node.behaviour.tamper = Tamper("flip", heads=True)
                assert await get_all(client, cap) == data


async def test_a_forged_manifest_is_refused_and_names_nothing_to_keep(tmp_path: Path) -> None:
    """A writer (not a server: a manifest is verified from its cap) may store
    any bytes as a manifest: reads refuse them with one FormatError, and a
    lease walk treats the file as naming no chunk."""
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                good = pack(some_manifest())
                forged = good[:20] + b"\x01" + struct.pack(">Q", 99) + good[29:]
                stored = await upload_data(client, forged)
                cap = ChunkedCap(stored, some_manifest().size).to_string()
                with pytest.raises(FormatError):
                    await get_all(client, cap)
                assert await expand(client, {cap}) == {cap}
                with pytest.raises(FormatError, match="at most"):
                    huge = ChunkedCap(ReadCap(stored.key, stored.ueb_hash, K, N, 1 << 40), 1)
                    await get_all(client, huge.to_string())


async def test_random_edits_match_a_local_file(tmp_path: Path) -> None:
    """Writes, punched holes, truncations and extensions by put_edit, one
    version after another, read back as the same operations on a local file."""
    rng = random.Random(23)
    model = bytearray(rng.randbytes(5 * MiB))
    base = tmp_path / "base"
    base.write_bytes(model)
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT * 2):
            async with client_node(tmp_path / "client", grid) as client:
                cap = await put_file(client, base)
                for step in range(12):
                    size = len(model)
                    source = tmp_path / f"step{step}"
                    extents: list[tuple[int, int]] = []
                    with open(source, "wb") as f:
                        for _ in range(rng.randint(0, 3)):
                            at = rng.randrange(0, size + MiB)
                            n = rng.choice([1, 4096, 100_000, 3 * MiB])
                            overlaps = any(a < at + n and at < a + m for a, m in extents)
                            if rng.random() < 0.3 and not overlaps:  # a hole: zeros
                                data = bytes(n)
                            else:
                                data = rng.randbytes(n)
                                f.seek(at)
                                f.write(data)
                            extents.append((at, n))
                            end = at + n
                            if end > len(model):
                                model.extend(bytes(end - len(model)))
                            model[at:end] = data
                    new_size = rng.choice([len(model), len(model), rng.randrange(1, 9 * MiB)])
                    if new_size < len(model):
                        del model[new_size:]
                    else:
                        model.extend(bytes(new_size - len(model)))
                    cap = await put_edit(client, cap, source, extents, new_size)
                    assert await get_all(client, cap) == bytes(model), step


async def test_background_check_repairs_a_chunk_of_a_retained_file(tmp_path: Path) -> None:
    data = random.Random(29).randbytes(5 * MiB)
    path = tmp_path / "f"
    path.write_bytes(data)
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                text = await put_file(client, path)
                retained = RetainedSet(client.node)
                retained.add([text])
                retained.close()
                cap = parse(text)
                assert isinstance(cap, ChunkedCap)
                chunk_caps = (await load_manifest(client, cap)).chunk_caps()
                victim = chunk_caps[-1].storage_index
                for node in grid.nodes[:2]:
                    for share in node.share_dir(victim).iterdir():
                        share.unlink()
                counts = await check_and_repair(client)
                # The manifest and every chunk are files to the checker.
                assert counts["files"] == len(set(chunk_caps)) + 1, counts
                assert counts["repaired"] == 1 and counts["unrecoverable"] == 0, counts
                assert sum(len(node.shares(victim)) for node in grid.nodes) == N
                assert await get_all(client, text) == data


def test_zero_runs_inside_a_chunk_are_cut_out_as_holes() -> None:
    data, zeros = os.urandom(5000), bytes(100_000)
    assert split_zeros(data) == [(0, 5000, False)]
    assert split_zeros(zeros) == [(0, 100_000, True)]
    parts = split_zeros(data + zeros + data)
    assert [z for _, _, z in parts] == [False, True, False]
    assert parts[1] == (8192, 94208, True)  # whole blocks of zeros, 64 KiB or more
    assert split_zeros(data + bytes(60_000) + data) == [(0, 70_000, False)]  # too short


def block_runs(data: bytes) -> list[tuple[int, int, bool]]:
    """split_zeros by its definition: every 4 KiB block (the last one
    possibly short) classified, runs of zero blocks of 64 KiB or more cut
    out (or all of the data, when it is all zeros)."""
    zero = [not any(data[a : a + 4096]) for a in range(0, len(data), 4096)]
    out: list[tuple[int, int, bool]] = []
    i = 0
    while i < len(zero):
        j = i
        while j < len(zero) and zero[j] == zero[i]:
            j += 1
        a, b = i * 4096, min(j * 4096, len(data))
        hole = zero[i] and (b - a >= 65536 or (i == 0 and j == len(zero)))
        if not hole and out and not out[-1][2]:  # data next to data: one part
            out[-1] = (out[-1][0], b - out[-1][0], False)
        else:
            out.append((a, b - a, hole))
        i = j
    return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(1, 40), st.integers(-4095, 4095)),
        min_size=1,
        max_size=6,
    )
)
def test_split_zeros_finds_every_run_of_zero_blocks(spans: list[tuple[bool, int, int]]) -> None:
    """Runs of zeros, aligned or not, long or just too short, anywhere (the
    fast check for "no run at all" looks at one block in 16)."""
    data = b"".join(
        bytes(max(1, blocks * 4096 + shift)) if zeros else b"\x01" * max(1, blocks * 4096 + shift)
        for zeros, blocks, shift in spans
    )
    assert split_zeros(data) == block_runs(data)


def test_split_zeros_finds_a_shortest_run_wherever_it_starts() -> None:
    for start in range(40):
        data = b"\x01" * (start * 4096) + bytes(16 * 4096) + b"\x01" * 5000
        assert split_zeros(data) == block_runs(data), start
        assert (start * 4096, 16 * 4096, True) in split_zeros(data), start


async def test_chunk_reads_ask_the_other_servers_when_the_first_are_down(tmp_path: Path) -> None:
    """A chunk's download asks k+1 servers first (those that hold its shares,
    normally); with three of five servers down, it asks the others."""
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                chunked, data = await put_random(client, tmp_path, 31, 6 * MiB)
                cap = chunked.to_string()
                for node in grid.nodes[:3]:
                    await node.kill()
                assert await get_all(client, cap) == data


async def test_a_chunked_put_the_grid_cannot_take_fails_with_one_grid_error(
    tmp_path: Path,
) -> None:
    """With too few servers every chunk's upload fails: the put ends in one
    GridError (as the CLI prints it), not a group of it and of the chunker
    stopped in mid-file."""
    source = tmp_path / "big"
    source.write_bytes(os.urandom(24 * MiB))
    async with open_grid(tmp_path / "grid", SERVERS) as grid:
        with trio.fail_after(TIMEOUT):
            async with client_node(tmp_path / "client", grid) as client:
                for server in grid.nodes[:2]:  # 3 of 5 left: below happy (4)
                    await server.kill()
                with pytest.raises(GridError) as info:
                    await put_file(client, source)
                assert not isinstance(info.value, BaseExceptionGroup)


def test_the_chunk_index_takes_concurrent_batches_from_threads(tmp_path: Path) -> None:
    """A put records each batch of chunks from a worker thread, two batches
    at once: on one connection without a lock that was 'cannot start a
    transaction within a transaction' (bench_edit's 1 GiB put failed)."""
    import threading

    from gridfs.client.chunkindex import ChunkIndex

    index = ChunkIndex(tmp_path / "chunks.sqlite")
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def batch(t: int) -> None:
        start.wait()
        try:
            for i in range(10):
                entries = {
                    bytes([t, i]) + j.to_bytes(30, "big"): f"c{t}-{i}-{j}" for j in range(300)
                }
                index.add(entries)
                assert len(index.lookup(entries)) == 300
        except BaseException as e:  # (reported below, from the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=batch, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(index) == 8 * 10 * 300
    index.close()
