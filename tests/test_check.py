"""gridfs check: counting good shares and verifying every block, never trusting servers."""

import json
import os
from pathlib import Path

import trio

from gridfs.caps import LiteralCap, ReadCap, VerifyCap, b32encode, parse
from gridfs.client.check import check_file
from gridfs.client.upload import UploadParams
from gridfs.codec import params_for_size
from gridfs.immutable import FileEncoder, encode_shares
from gridfs.layout import HEADER, ShareHeader
from gridfs.storage.selfcheck import check_share

from .gridutil import download_bytes, open_broker, open_grid, upload_bytes

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


def forged_cap(cap: ReadCap) -> str:
    """A verify cap for the real storage index with another extension block hash."""
    v = cap.verify_cap()
    return VerifyCap(v.storage_index, os.urandom(32), v.k, v.n, v.size).to_string()


async def test_a_forged_report_removes_no_share_anywhere(tmp_path: Path, secret: bytes) -> None:
    """Anyone who knows a storage index reports every share of it corrupt,
    with a made-up verify cap: every server keeps its share, the file still
    downloads, and each reply says why it was kept."""
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid, open_broker(grid.addresses) as broker:
            data = os.urandom(300_000)
            report = await upload_bytes(broker, data, tmp_path, PARAMS, secret)
            cap = report.cap
            assert isinstance(cap, ReadCap)
            si = cap.storage_index
            for server in broker.servers.values():
                node = next(n for n in grid.nodes if n.address == server.address)
                for num in node.shares(si):
                    for verify_cap in (forged_cap(cap), cap.verify_cap().to_string()):
                        reply = await server.call(
                            "report_corrupt", {"si": si, "sharenum": num, "verify_cap": verify_cap}
                        )
                        assert reply["quarantined"] is False and "kept" in reply["reason"]
            assert sorted(n for node in grid.nodes for n in node.shares(si)) == list(range(10))
            assert not any((n.dir.storage_path / "quarantine").exists() for n in grid.nodes)
            assert await download_bytes(broker, cap) == data
            assert (await check_file(broker, cap, verify=True)).healthy


async def test_a_rotted_share_reported_is_quarantined(tmp_path: Path, secret: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid, open_broker(grid.addresses) as broker:
            cap = await upload(broker, tmp_path, 300_000, secret)
            si = cap.storage_index
            holder = grid.holder(si, 5)
            path = holder.share_dir(si) / "5"
            rotted = bytearray(path.read_bytes())
            rotted[-10] ^= 0x04  # in the last block
            path.write_bytes(bytes(rotted))
            server = next(s for s in broker.servers.values() if s.address == holder.address)
            # Even a reporter with a made-up cap is believed here: the share
            # is provably bad by itself.
            reply = await server.call(
                "report_corrupt", {"si": si, "sharenum": 5, "verify_cap": forged_cap(cap)}
            )
            assert reply["quarantined"] is True and "block" in reply["reason"]
            assert 5 not in holder.shares(si)
            assert [5] not in [b[:1] for b in await server.call("get_buckets", {"si": si})]
            (moved,) = (holder.dir.storage_path / "quarantine").iterdir()
            assert moved.read_bytes() == bytes(rotted)


def encoded(size: int, segment_size: int = 64 * 1024) -> tuple[bytes, list[bytes]]:
    params = params_for_size(3, 5, segment_size, size)
    finished, shares = encode_shares(FileEncoder(os.urandom(32), params, size), os.urandom(size))
    return finished.cap.storage_index, shares


def damaged(share: bytes, offset: int) -> bytes:
    out = bytearray(share)
    out[offset] ^= 0x20
    return bytes(out)


def self_check(si: bytes, num: int, share: bytes) -> str | None:
    return check_share(lambda off, n: share[off : off + n], si, num, len(share))


def test_a_server_checks_a_share_by_itself() -> None:
    """What check_share proves without the cap: rot in a block, a block
    proof, the chain or the header; a share of another number or index; a
    truncated share.  Rot in a ciphertext proof it cannot see (readers do)."""
    si, shares = encoded(300_000)
    share = shares[2]
    g = ShareHeader.unpack(share[: HEADER.size]).geometry
    assert g.num_segments > 2
    assert all(self_check(si, n, s) is None for n, s in enumerate(shares))
    rec1, _ = g.record_span(1)
    block1 = rec1 + g.proof_size
    cases = {
        "block": damaged(share, block1 + 7),
        "last block": damaged(share, len(share) - 1),
        "block proof": damaged(share, rec1 + 3),
        "chain": damaged(share, g.chain_offset + 1),
        "header": damaged(share, 9),
        "extension block": damaged(share, g.ueb_offset + 3),
        "truncated": share[:-1],
    }
    for what, bad in cases.items():
        assert self_check(si, 2, bad) is not None, what
    assert self_check(si, 3, share) == "its header names share 2"
    assert self_check(os.urandom(16), 2, share) == "its header names another storage index"
    ciphertext_proof = rec1 + g.proof_size // 2
    assert self_check(si, 2, damaged(share, ciphertext_proof)) is None


async def test_check_json_gives_the_verify_cap(tmp_path: Path, secret: bytes, capsys) -> None:  # type: ignore[no-untyped-def]
    from gridfs.cli.check import report

    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid, open_broker(grid.addresses) as broker:
            cap = await upload(broker, tmp_path, 100_000, secret)
            result = await check_file(broker, cap)
    report("grid:/f", result, as_json=True)
    doc = json.loads(capsys.readouterr().out)
    assert doc["cap"] == cap.to_string()
    assert doc["verify_cap"] == cap.verify_cap().to_string()
    assert "chk-verify" in doc["verify_cap"] and b32encode(cap.key) not in doc["verify_cap"]
    lit = await check_file(broker, LiteralCap(b"tiny"))
    assert lit.to_json()["verify_cap"] is None
