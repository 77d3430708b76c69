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
