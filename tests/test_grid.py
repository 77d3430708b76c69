"""Uploads and downloads over a real in-process grid: TLS, disks, failures, liars."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from gridfs.caps import ReadCap
from gridfs.client import download
from gridfs.client.download import open_downloader
from gridfs.client.upload import UnhappyError, UploadParams, _Upload, upload_file
from gridfs.errors import GridError, NotEnoughSharesError
from gridfs.hashes import NODE_ID_SIZE, STORAGE_INDEX_SIZE
from gridfs.net.identity import NodeAddress
from gridfs.net.rpc import RemoteError

from .gridutil import (
    TAMPER_MODES,
    Grid,
    ReadCall,
    StorageNode,
    Tamper,
    download_bytes,
    open_broker,
    open_grid,
    predicted_storage_index,
    upload_bytes,
    wait_located,
    write_temp,
)

MiB = 1 << 20
K, HAPPY, N = 3, 7, 10
TIMEOUT = 30


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def read_cap(cap: object) -> ReadCap:
    assert isinstance(cap, ReadCap), cap
    return cap


def holders(grid: Grid, si: bytes, sharenums: range) -> list[StorageNode]:
    return [grid.holder(si, num) for num in sharenums]


# -- round trips and ranges ----------------------------------------------------


@pytest.mark.parametrize("size", [65, MiB + 1, 5 * MiB + 12345], ids=["65B", "1MiB+1", "5MiB"])
async def test_round_trip_spreads_shares_and_reads_only_needed_segments(
    tmp_path: Path, secret: bytes, size: int
) -> None:
    data = payload(size)
    params = UploadParams(K, HAPPY, N, segment_size=MiB)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            async with open_broker(grid.addresses) as broker:
                report = await upload_bytes(broker, data, tmp_path, params, secret)
            cap = read_cap(report.cap)
            si = cap.storage_index
            assert report.servers == N
            assert [len(node.shares(si)) for node in grid.nodes] == [1] * N
            assert set().union(*(node.shares(si) for node in grid.nodes)) == set(range(N))
            assert grid.incoming() == []

            async with open_broker(grid.addresses) as broker, open_downloader(broker, cap) as dl:
                assert await dl.read(0, size) == data
                geometry = dl.decoder.geometry
                assert geometry is not None
                seg = geometry.params.segment_size
                nseg = geometry.num_segments
                record_at = {geometry.record_span(j)[0]: j for j in range(nseg)}

                def covered(r: ReadCall) -> list[int]:
                    return [j for o, j in record_at.items() if r.offset <= o < r.offset + r.length]

                ranges = [(0, 1), (size - 1, 1), (size // 2, 3)]
                if nseg > 1:
                    ranges.append((seg - 10, 20))  # across the first segment boundary
                for offset, length in ranges:
                    for node in grid.nodes:
                        node.behaviour.reads.clear()
                    assert await dl.read(offset, length) == data[offset : offset + length]
                    wanted = range(offset // seg, (offset + length - 1) // seg + 1)
                    reads = [r for node in grid.nodes for r in node.record_reads(si)]
                    assert all(r.offset in record_at for r in reads), reads
                    assert len(reads) == K  # (segments in a row: their records in one read)
                    records = [j for r in reads for j in covered(r)]
                    assert sorted(records) == sorted(list(wanted) * K)
                assert dl.problems == []


async def test_upload_writes_several_segments_per_request(tmp_path: Path, secret: bytes) -> None:
    """A request costs both sides about as much as a 350 KB block: blocks of
    consecutive segments travel together."""
    params = UploadParams(K, HAPPY, N, segment_size=MiB, batch=4)
    data = payload(10 * MiB - 5)  # 10 segments
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            async with open_broker(grid.addresses) as broker:
                report = await upload_bytes(broker, data, tmp_path, params, secret)
            # per share: 3 requests of blocks (4 + 4 + 2 segments), 1 of head and proofs
            assert [sorted(node.behaviour.writes) for node in grid.nodes] == [[2, 4, 4, 11]] * N
            async with open_broker(grid.addresses) as broker:
                assert await download_bytes(broker, report.cap) == data


# -- dead servers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("killed", "error"),
    [
        (N - K, None),
        (N - K + 1, f"only {K - 1} usable shares, {K} needed"),
        (N, f"no usable share found: 0 of {N} servers answered"),
    ],
)
async def test_download_survives_n_minus_k_dead_servers(
    tmp_path: Path, secret: bytes, killed: int, error: str | None
) -> None:
    data = payload(150_000)
    params = UploadParams(K, HAPPY, N, segment_size=64 * 1024)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            async with open_broker(grid.addresses) as broker:
                cap = read_cap((await upload_bytes(broker, data, tmp_path, params, secret)).cap)
            for node in holders(grid, cap.storage_index, range(killed)):  # primaries first
                await node.kill()
            async with open_broker(grid.addresses) as broker:
                if error is None:
                    assert await download_bytes(broker, cap) == data
                else:
                    with pytest.raises(NotEnoughSharesError) as info:
                        await download_bytes(broker, cap)
                    message = str(info.value)
                    assert "\n" not in message
                    assert error in message


async def test_servers_killed_mid_upload_are_replaced(tmp_path: Path, secret: bytes) -> None:
    data = payload(4 * MiB, seed=2)  # shares above SMALL_SHARE: streamed
    params = UploadParams(K, HAPPY, N, segment_size=128 * 1024)
    killed: list[StorageNode] = []
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=N + 2) as grid:

            def progress(_: int) -> None:
                if not killed:  # after the first segment: two servers being written die
                    writing = [node for node in grid.nodes if node.incoming()]
                    assert len(writing) == N
                    killed.extend(writing[:2])
                    for node in killed:
                        node.kill_soon()

            async with open_broker(grid.addresses) as broker:
                report = await upload_bytes(broker, data, tmp_path, params, secret, progress)
            cap = read_cap(report.cap)
            si = cap.storage_index
            assert len(killed) == 2
            assert report.failures
            assert report.servers == N
            assert sorted(report.placements) == list(range(N))
            for node in killed:
                assert not node.running
                assert node.shares(si) == set()
                assert not any(node.where in name for name in report.placements.values())
            live = [node for node in grid.nodes if node not in killed]
            assert sorted(num for node in live for num in node.shares(si)) == list(range(N))
            async with open_broker(grid.addresses) as broker:
                assert await download_bytes(broker, cap) == data


async def test_servers_killed_mid_download(tmp_path: Path, secret: bytes) -> None:
    data = payload(4 * MiB, seed=3)  # 32 segments: 8 reads per share, 2 at a time
    params = UploadParams(K, HAPPY, N, segment_size=128 * 1024)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            async with open_broker(grid.addresses) as broker:
                cap = read_cap((await upload_bytes(broker, data, tmp_path, params, secret)).cap)
            doomed = holders(grid, cap.storage_index, range(N - K))
            parts: list[bytes] = []

            async def write(chunk: bytes) -> None:
                parts.append(chunk)
                if len(parts) == 1:
                    for node in doomed:
                        node.kill_soon()

            async with open_broker(grid.addresses) as broker, open_downloader(broker, cap) as dl:
                await dl.stream(write)
            assert b"".join(parts) == data
            assert not any(node.running for node in doomed)
            assert any(node.where in p for node in doomed for p in dl.problems), dl.problems


@pytest.mark.parametrize("crash", [False, True], ids=["cancelled", "crashed"])
async def test_client_killed_mid_upload_leaves_no_share(
    tmp_path: Path, secret: bytes, monkeypatch: pytest.MonkeyPatch, crash: bool
) -> None:
    """Cancelled, the uploader tries to abort its buckets; crashed, it sends
    nothing.  Either way the servers drop every partial share (the connection
    is the canary) and no share of the file ever becomes visible."""
    params = UploadParams(K, HAPPY, N, segment_size=64 * 1024)
    path = write_temp(tmp_path, payload(4 * MiB, seed=4))
    si = predicted_storage_index(path, params, secret)
    if crash:

        async def no_abort(self: _Upload, buckets: object) -> None:
            pass

        monkeypatch.setattr(_Upload, "_abort_all", no_abort)
    partial_at_cancel: list[Path] = []
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            async with open_broker(grid.addresses) as broker:
                with trio.CancelScope() as upload:

                    def progress(_: int) -> None:
                        if not partial_at_cancel:  # a few segments in: the client dies
                            partial_at_cancel.extend(grid.incoming())
                            upload.cancel()

                    await upload_file(broker, path, params, secret, progress)
                assert upload.cancelled_caught
            assert len(partial_at_cancel) == N
            while grid.incoming():
                await trio.sleep(0.01)
            assert grid.all_shares() == []
            await grid.restart_all()
            assert grid.incoming() == []
            assert grid.all_shares() == []
            async with open_broker(grid.addresses) as broker:
                for server in broker.servers.values():
                    assert await server.call("get_buckets", {"si": si}) == []


# -- malicious servers ------------------------------------------------------------

TAMPERS = [Tamper(mode) for mode in TAMPER_MODES] + [
    Tamper(mode, heads=True) for mode in ("flip", "swap", "truncate", "garbage")
]


@pytest.mark.parametrize(
    "tamper", TAMPERS, ids=[t.mode + ("-head" if t.heads else "") for t in TAMPERS]
)
async def test_malicious_server_is_caught_and_named(
    tmp_path: Path, secret: bytes, monkeypatch: pytest.MonkeyPatch, tamper: Tamper
) -> None:
    monkeypatch.setattr(download, "READ_TIMEOUT", 2.0)
    data = payload(300_000, seed=5)
    params = UploadParams(K, HAPPY, N, segment_size=64 * 1024)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            async with open_broker(grid.addresses) as broker:
                cap = read_cap((await upload_bytes(broker, data, tmp_path, params, secret)).cap)
            liar = grid.holder(cap.storage_index, 0)  # a primary share: read first
            liar.behaviour.tamper = tamper
            async with (
                open_broker(grid.addresses, call_timeout=5) as broker,
                open_downloader(broker, cap) as dl,
            ):
                await wait_located(dl, N)
                assert await dl.read(0, cap.size) == data
            assert dl.problems
            assert all(liar.where in p for p in dl.problems), dl.problems
            assert liar.record_reads(cap.storage_index) or tamper.heads


async def test_a_bad_share_in_a_batched_read_is_replaced_without_rereading_the_good_ones(
    tmp_path: Path, secret: bytes
) -> None:
    """A batch of segments comes from k shares in one read each; when one
    share's records are bad, another share's are read for the whole batch,
    and the records already verified are kept, not fetched again."""
    data = payload(8 * 64 * 1024, seed=8)  # 8 segments: two batches of 4
    params = UploadParams(K, HAPPY, N, segment_size=64 * 1024)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            async with open_broker(grid.addresses) as broker:
                cap = read_cap((await upload_bytes(broker, data, tmp_path, params, secret)).cap)
            liar = grid.holder(cap.storage_index, 0)
            liar.behaviour.tamper = Tamper("flip")
            for node in grid.nodes:
                node.behaviour.reads.clear()
            async with open_broker(grid.addresses) as broker, open_downloader(broker, cap) as dl:
                await wait_located(dl, N)
                assert await dl.read(0, cap.size) == data
            assert any(liar.where in p for p in dl.problems), dl.problems
            honest = [
                r for n in grid.nodes if n is not liar for r in n.record_reads(cap.storage_index)
            ]
            # 2 batches x 3 shares, and one share in place of the liar's for
            # the batch that met it; refetching segment by segment read each
            # good share's records again, one read per segment (28 reads).
            assert len(honest) <= 2 * K + 1, honest
            assert all(r.length > params.segment_size // K for r in honest), honest


@pytest.mark.parametrize("liars", [N - K, N - K + 1])
async def test_many_malicious_servers_never_yield_wrong_bytes(
    tmp_path: Path, secret: bytes, liars: int
) -> None:
    data = payload(200_000, seed=6)
    params = UploadParams(K, HAPPY, N, segment_size=64 * 1024)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            async with open_broker(grid.addresses) as broker:
                cap = read_cap((await upload_bytes(broker, data, tmp_path, params, secret)).cap)
            for node in holders(grid, cap.storage_index, range(liars)):
                node.behaviour.tamper = Tamper("flip")
            async with open_broker(grid.addresses) as broker:
                if liars <= N - K:
                    assert await download_bytes(broker, cap) == data
                else:
                    with pytest.raises(GridError):
                        await download_bytes(broker, cap)


# -- who may hold shares ----------------------------------------------------------


def impostor(node: StorageNode) -> NodeAddress:
    """``node``'s host and port under a node id whose key it does not hold."""
    assert node.address is not None
    return NodeAddress(os.urandom(NODE_ID_SIZE), node.address.host, node.address.port)


async def test_server_with_wrong_key_is_refused(tmp_path: Path, secret: bytes) -> None:
    data = payload(100_000, seed=7)
    params = UploadParams(K, HAPPY, N, segment_size=64 * 1024)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=N + 1) as grid:
            fakes = [impostor(node) for node in grid.nodes]
            async with open_broker(fakes) as broker:
                with pytest.raises(GridError, match="is not node"):
                    await broker.servers[fakes[0].node_id].call("stats", {})
                with pytest.raises(UnhappyError, match="only 0 distinct servers"):
                    await upload_bytes(broker, data, tmp_path, params, secret)
            assert grid.incoming() == [] and grid.all_shares() == []

            honest, odd_one = grid.nodes[:N], grid.nodes[N]
            addresses = [n.address for n in honest if n.address] + [impostor(odd_one)]
            async with open_broker(addresses) as broker:
                report = await upload_bytes(broker, data, tmp_path, params, secret)
            si = read_cap(report.cap).storage_index
            assert report.servers == N
            assert odd_one.all_shares() == []
            assert not any(odd_one.where in name for name in report.placements.values())
            assert all(node.shares(si) for node in honest)


async def test_too_few_servers_is_unhappy_and_leaves_nothing(tmp_path: Path, secret: bytes) -> None:
    params = UploadParams(K, HAPPY, N, segment_size=64 * 1024)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=5) as grid:
            async with open_broker(grid.addresses) as broker:
                with pytest.raises(UnhappyError) as info:
                    await upload_bytes(broker, payload(100_000), tmp_path, params, secret)
                message = str(info.value)
                assert f"only 5 distinct servers, {HAPPY} needed" in message
                assert grid.incoming() == []  # aborted, not left for the canary
            assert grid.all_shares() == []


async def test_full_servers_refuse_and_others_take_the_shares(
    tmp_path: Path, secret: bytes
) -> None:
    data = payload(100_000, seed=8)
    params = UploadParams(K, N, N, segment_size=64 * 1024)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            full = await grid.add_servers(2, reserved_space=10**15)
            async with open_broker(grid.addresses) as broker:
                assert full[0].address is not None
                server = broker.servers[full[0].address.node_id]
                si = os.urandom(STORAGE_INDEX_SIZE)
                args = {"si": si, "sharenums": [0], "share_size": 99, **server.lease_args(si)}
                with pytest.raises(RemoteError, match="no room") as info:
                    await server.call("allocate_buckets", args)
                assert info.value.code == "no-space"
                report = await upload_bytes(broker, data, tmp_path, params, secret)
                assert report.servers == N
                assert await download_bytes(broker, report.cap) == data
            for node in full:
                assert node.all_shares() == [] and node.incoming() == []


async def test_all_servers_full_is_unhappy_and_leaves_nothing(
    tmp_path: Path, secret: bytes
) -> None:
    params = UploadParams(K, HAPPY, N, segment_size=64 * 1024)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", reserved_space=10**15) as grid:
            async with open_broker(grid.addresses) as broker:
                with pytest.raises(UnhappyError, match="only 0 distinct servers"):
                    await upload_bytes(broker, payload(100_000), tmp_path, params, secret)
                assert grid.incoming() == []
            assert grid.all_shares() == []


# -- restarts ---------------------------------------------------------------------


async def test_closed_share_survives_restart_partial_does_not(
    tmp_path: Path, secret: bytes
) -> None:
    data = payload(200_000, seed=9)
    params = UploadParams(K, HAPPY, N, segment_size=64 * 1024)
    partial_si = os.urandom(STORAGE_INDEX_SIZE)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            async with open_broker(grid.addresses) as broker:
                cap = read_cap((await upload_bytes(broker, data, tmp_path, params, secret)).cap)
                node = grid.holder(cap.storage_index, 0)
                assert node.address is not None
                server = broker.servers[node.address.node_id]
                args = {"si": partial_si, "sharenums": [0], "share_size": 1000}
                await server.call("allocate_buckets", {**args, **server.lease_args(partial_si)})
                await server.call(
                    "write", {"si": partial_si, "sharenum": 0, "chunks": [[0, b"x" * 100]]}
                )
                assert len(node.incoming()) == 1
                node.behaviour.crash_on_kill = True
                await node.kill()
                assert len(node.incoming()) == 1  # a crash cleans nothing up
                node.behaviour.crash_on_kill = False
                await node.restart()
            assert node.incoming() == []
            assert node.shares(partial_si) == set()
            assert node.shares(cap.storage_index) == {0}
            others = [n for n in grid.nodes if n is not node]
            for other in others[: N - K]:
                await other.kill()
            async with open_broker(grid.addresses) as broker:
                server = broker.servers[node.address.node_id]
                assert await server.call("get_buckets", {"si": partial_si}) == []
                assert await download_bytes(broker, cap) == data
            assert node.record_reads(cap.storage_index)
