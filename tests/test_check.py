"""gridfs check: counting good shares and verifying every block, never trusting servers."""

import os
from pathlib import Path

import trio

from gridfs.caps import ReadCap, parse
from gridfs.client.check import check_file
from gridfs.client.upload import UploadParams

from .gridutil import open_broker, open_grid, upload_bytes

PARAMS = UploadParams(3, 7, 10, segment_size=64 * 1024)
TIMEOUT = 60


async def upload(broker, tmp_path: Path, size: int, secret: bytes) -> ReadCap:  # type: ignore[no-untyped-def]
    report = await upload_bytes(broker, os.urandom(size), tmp_path, PARAMS, secret)
    cap = report.cap
    assert isinstance(cap, ReadCap)
    return cap


async def test_check_counts_and_verify_finds_corruption(tmp_path: Path, secret: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid, open_broker(grid.addresses) as broker:
            cap = await upload(broker, tmp_path, 300_000, secret)
            result = await check_file(broker, cap)
            assert result.healthy and result.good_shares == 10 and not result.corrupt
            doc = result.to_json()
            for key in (
                "cap",
                "healthy",
                "good_shares",
                "needed",
                "total",
                "corrupt_shares",
                "servers",
            ):
                assert key in doc
            assert doc["needed"] == 3 and doc["total"] == 10

            # Flip a byte in the middle of one share's data: its head is fine, so
            # only verify sees it.
            holder = grid.holder(cap.storage_index, 4)
            path = holder.share_dir(cap.storage_index) / "4"
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
            plain = await check_file(broker, cap)
            assert plain.good_shares == 10
            verified = await check_file(broker, cap.verify_cap(), verify=True)
            assert verified.good_shares == 9 and not verified.healthy and verified.recoverable
            assert [n for _, n, _ in verified.corrupt] == [4]
            assert verified.corrupt[0][0] == holder.where or holder.where in verified.corrupt[0][0]


async def test_check_with_servers_down(tmp_path: Path, secret: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=10) as grid:
            async with open_broker(grid.addresses) as broker:
                cap = await upload(broker, tmp_path, 200_000, secret)
            for node in grid.nodes[:4]:
                await node.kill()
            async with open_broker(grid.addresses, call_timeout=5) as broker:
                result = await check_file(broker, cap)
            assert result.good_shares == 6 and not result.healthy and result.recoverable


async def test_literal_caps_are_always_healthy(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            open_grid(tmp_path / "grid", servers=1) as grid,
            open_broker(grid.addresses) as broker,
        ):
            result = await check_file(broker, parse("gridfs:lit:nbswy3dp"))
    assert result.healthy and result.good_shares == 1


async def test_repair_after_four_of_fourteen_servers_died(tmp_path: Path, secret: bytes) -> None:
    """The issue's scenario: check says 6 of 10, repair brings 10 good shares
    back on live servers, and the file reads with the original 4 still dead."""
    from gridfs.client.repair import repair_file

    from .gridutil import download_bytes

    data = os.urandom(700_000)
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid", servers=14) as grid:
            async with open_broker(grid.addresses) as broker:
                report = await upload_bytes(broker, data, tmp_path, PARAMS, secret)
            cap = report.cap
            assert isinstance(cap, ReadCap)
            si = cap.storage_index
            holders = [node for node in grid.nodes if node.shares(si)]
            assert len(holders) == 10
            for node in holders[:4]:
                await node.kill()
            async with open_broker(grid.addresses, call_timeout=5) as broker:
                assert (await check_file(broker, cap)).good_shares == 6
                repaired = await repair_file(broker, cap.verify_cap())  # no key needed
                assert repaired.good_shares == 10
                after = await check_file(broker, cap, verify=True)
                assert after.healthy and after.good_shares == 10 and not after.corrupt
                assert await download_bytes(broker, cap) == data
            live = [node for node in grid.nodes if node.running]
            assert sorted(n for node in live for n in node.shares(si)) == list(range(10))


async def test_repair_replaces_a_corrupt_share(tmp_path: Path, secret: bytes) -> None:
    from gridfs.client.repair import repair_file

    with trio.fail_after(TIMEOUT):
        async with (
            open_grid(tmp_path / "grid", servers=11) as grid,
            open_broker(grid.addresses) as broker,
        ):
            cap = await upload(broker, tmp_path, 300_000, secret)
            holder = grid.holder(cap.storage_index, 2)
            path = holder.share_dir(cap.storage_index) / "2"
            data = bytearray(path.read_bytes())
            data[-100] ^= 0xFF
            path.write_bytes(bytes(data))
            assert (await check_file(broker, cap)).healthy  # only verify sees it
            assert not (await check_file(broker, cap, verify=True)).healthy
            repaired = await repair_file(broker, cap)
            assert repaired.good_shares == 10
            after = await check_file(broker, cap, verify=True)
            assert after.healthy and after.good_shares == 10 and not after.corrupt
            # The server verified the report itself and took its bad copy out of
            # service (the repaired share 2 may well land on it again).
            quarantined = list((holder.dir.storage_path / "quarantine").iterdir())
            assert len(quarantined) == 1 and quarantined[0].read_bytes() == bytes(data)


async def test_a_false_corruption_report_is_refused(tmp_path: Path, secret: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid, open_broker(grid.addresses) as broker:
            cap = await upload(broker, tmp_path, 300_000, secret)
            holder = grid.holder(cap.storage_index, 1)
            server = next(s for s in broker.servers.values() if s.address == holder.address)
            reply = await server.call(
                "report_corrupt",
                {
                    "si": cap.storage_index,
                    "sharenum": 1,
                    "verify_cap": cap.verify_cap().to_string(),
                },
            )
            assert reply["quarantined"] is False and "kept" in reply["reason"]
            assert 1 in holder.shares(cap.storage_index)
