"""The grid as a :class:`gridfs.tree.Store`: directories as CHK files, the
root pointer in a mutable slot; plus an overlay for read-your-writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..caps import LITERAL_MAX, LiteralCap, SliceCap, parse_read_cap
from ..errors import plain_grid_errors
from ..mutable import SlotReadCap, SlotWriteCap
from ..pack import open_slice
from ..tree import SlotConflictError, Store
from .broker import StorageBroker
from .download import open_downloader
from .slots import SlotConflictError as SlotRaceError
from .slots import SlotNotFoundError, SlotRead, publish_slot, read_slot
from .upload import UploadParams, upload_file


async def upload_bytes(
    broker: StorageBroker, data: bytes, params: UploadParams, secret: bytes | None
) -> str:
    """Upload in-memory bytes (a directory) and return the cap string."""
    if len(data) <= LITERAL_MAX:
        return LiteralCap(data).to_string()
    fd = os.memfd_create("gridfs-upload")
    try:
        os.write(fd, data)
        report = await upload_file(broker, Path(f"/proc/self/fd/{fd}"), params, secret)
    finally:
        os.close(fd)
    return report.cap.to_string()


async def download_bytes(broker: StorageBroker, cap_text: str) -> bytes:
    cap = parse_read_cap(cap_text)
    if isinstance(cap, LiteralCap):
        return cap.data
    with plain_grid_errors():
        if isinstance(cap, SliceCap):
            async with open_downloader(broker, cap.pack) as downloader:
                return open_slice(cap, 0, await downloader.read(cap.offset, cap.length))
        async with open_downloader(broker, cap) as downloader:
            return await downloader.read(0, cap.size)


class GridStore:
    """One tree's root slot and its directories on the grid."""

    def __init__(
        self,
        broker: StorageBroker,
        root: SlotWriteCap | SlotReadCap,
        params: UploadParams,
        secret: bytes | None,
    ) -> None:
        self.broker = broker
        self.root = root
        self.params = params
        self.secret = secret
        self._last: SlotRead | None = None

    async def put_bytes(self, data: bytes) -> str:
        return await upload_bytes(self.broker, data, self.params, self.secret)

    async def get_bytes(self, cap: str) -> bytes:
        return await download_bytes(self.broker, cap)

    async def read_root(self) -> tuple[int, bytes]:
        await self.broker.ready(10.0)
        try:
            self._last = await read_slot(self.broker, self.root, self.params.n)
        except SlotNotFoundError:
            self._last = None
            return 0, b""
        return self._last.seq, self._last.plaintext or b""

    async def publish_root(self, payload: bytes, expected_seq: int) -> int:
        if not isinstance(self.root, SlotWriteCap):
            from ..errors import UsageError

            raise UsageError("this tree is read-only (its alias holds a read cap)")
        expected = self._last if self._last is not None and self._last.seq == expected_seq else None
        if expected is None and expected_seq != 0:
            raise SlotConflictError("the root moved on since it was read")
        try:
            return await publish_slot(
                self.broker, self.root, payload, expected, self.params.n, self.params.happy
            )
        except SlotRaceError as e:
            raise SlotConflictError(str(e)) from None


class OverlayStore:
    """A store that keeps new directories in memory instead of uploading them:
    applying the queued changes on it shows them at once (read-your-writes)."""

    def __init__(self, base: Store) -> None:
        self.base = base
        self.local: dict[str, bytes] = {}

    async def put_bytes(self, data: bytes) -> str:
        if len(data) <= LITERAL_MAX:
            return LiteralCap(data).to_string()
        cap = "pending:" + hashlib.sha256(data).hexdigest()
        self.local[cap] = data
        return cap

    async def get_bytes(self, cap: str) -> bytes:
        if cap in self.local:
            return self.local[cap]
        return await self.base.get_bytes(cap)

    async def read_root(self) -> tuple[int, bytes]:
        return await self.base.read_root()

    async def publish_root(self, payload: bytes, expected_seq: int) -> int:
        raise AssertionError("an overlay never publishes")
