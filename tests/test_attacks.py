"""Hostile storage servers against a real client: what each attack achieves.

Each test runs real TLS servers on loopback (tests/gridutil.py) of which some
lie in one way; the client must return the right bytes, or one clear error,
and never wrong bytes.  (Tampered reads are in test_grid.py, lying slot
servers in test_root_safety.py, strangers in test_membership.py, floods in
test_limits.py.)
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from gridfs.caps import ReadCap
from gridfs.client.download import open_downloader
from gridfs.client.upload import UploadParams
from gridfs.errors import NotEnoughSharesError, unwrap
from gridfs.net import tls
from gridfs.net.identity import NodeAddress
from gridfs.protocol.connection import NEED_DATA, Connection, Request, Role

from .gridutil import (
    MEMBERS,
    Grid,
    GridSession,
    StorageNode,
    open_broker,
    open_grid,
    upload_bytes,
)

K, HAPPY, N = 3, 7, 10
PARAMS = UploadParams(K, HAPPY, N, segment_size=64 * 1024)
TIMEOUT = 60


class ClaimsAll(GridSession):
    """Says it holds every share of every file, with plausible sizes."""

    async def rpc_get_buckets(self, si: bytes) -> list[list[int]]:
        held = await super().rpc_get_buckets(si)
        size = held[0][1] if held else 1 << 20
        return [[num, size] for num in range(N)]


class Withholds(GridSession):
    """Holds its shares but answers that it has none."""

    async def rpc_get_buckets(self, si: bytes) -> list[list[int]]:
        return []


class AnswersGarbage(GridSession):
    """Answers share lookups with values of the wrong shape."""

    async def rpc_get_buckets(self, si: bytes) -> Any:
        return {"shares": "all of them"}


async def store_file(grid: Grid, tmp_path: Path, size: int = 300_000) -> tuple[bytes, ReadCap]:
    data = os.urandom(size)
    async with open_broker(grid.addresses) as broker:
        report = await upload_bytes(broker, data, tmp_path, PARAMS, b"s" * 32)
    assert isinstance(report.cap, ReadCap)
    assert [len(n.shares(report.cap.storage_index)) for n in grid.nodes] == [1] * N
    return data, report.cap


async def turn(grid: Grid, liar: type[GridSession], count: int) -> list[StorageNode]:
    """Restart the last ``count`` servers of the grid as liars."""
    grid.session_class = liar
    turned = grid.nodes[-count:]
    for node in turned:
        await node.restart()
    return turned


async def read_all(addresses: list[NodeAddress], cap: ReadCap) -> tuple[bytes, list[str]]:
    async with open_broker(addresses) as broker, open_downloader(broker, cap) as downloader:
        data = await downloader.read(0, cap.size)
        return data, list(downloader.problems)


@pytest.mark.parametrize("liar", [ClaimsAll, Withholds, AnswersGarbage])
async def test_n_minus_k_lying_share_lookups_still_give_the_right_bytes(
    tmp_path: Path, liar: type[GridSession]
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            data, cap = await store_file(grid, tmp_path)
            await turn(grid, liar, N - K)
            got, _ = await read_all(grid.addresses, cap)
            assert got == data
            # Left with liars alone: what they really hold, or one clear error.
            for node in grid.nodes[:K]:
                await node.kill()
            if liar is ClaimsAll:  # (they do hold their own shares)
                assert (await read_all(grid.addresses, cap))[0] == data
                return
            with pytest.raises(NotEnoughSharesError):
                try:
                    await read_all(grid.addresses, cap)
                except BaseExceptionGroup as group:
                    raise unwrap(group) from None


async def test_servers_claiming_shares_they_lack_are_named_and_read_around(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path / "grid") as grid:
            data, cap = await store_file(grid, tmp_path)
            for node in await turn(
                grid, ClaimsAll, N - K - 2
            ):  # they claim everything but hold nothing
                for path in node.all_shares():
                    path.unlink()
            got, problems = await read_all(grid.addresses, cap)
            assert got == data
            assert problems, "a server claiming what it lacks goes unreported"


async def serve_broken_frames(
    credentials: tls.Credentials, *, task_status: trio.TaskStatus[int]
) -> None:
    """A member storage server that answers hello, then answers every request
    with a frame header announcing 4 GiB (a frame no client may buffer)."""

    async def handle(tcp: trio.SocketStream) -> None:
        stream = tls.server_side(tcp, credentials.server)
        conn = Connection(Role.SERVER)
        try:
            await stream.do_handshake()
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, Request) and event.method == "hello":
                    await stream.send_all(conn.send_response(event.id, {"version": 1}))
                elif isinstance(event, Request):
                    await stream.send_all(struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 64)
                else:
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def test_a_server_sending_oversized_frames_is_dropped_and_read_around(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT):
        credentials = MEMBERS.credentials("storage", private=tmp_path / "hostile")
        assert credentials.member is not None
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_broken_frames, credentials)
            hostile = NodeAddress(credentials.member.node_id, "127.0.0.1", port)
            async with open_grid(tmp_path / "grid") as grid:
                data, cap = await store_file(grid, tmp_path)
                got, _ = await read_all([hostile, *grid.addresses], cap)
                assert got == data
                # Uploads go around it too: the file is placed on happy servers.
                async with open_broker([hostile, *grid.addresses]) as broker:
                    report = await upload_bytes(
                        broker, os.urandom(200_000), tmp_path, PARAMS, b"t" * 32
                    )
                assert report.servers >= HAPPY
            nursery.cancel_scope.cancel()
