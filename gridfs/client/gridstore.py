"""The grid as a :class:`gridfs.tree.Store`: directories as CHK files, the
root pointer in a mutable slot; plus an overlay for read-your-writes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from ..caps import LITERAL_MAX, ChunkedCap, LiteralCap, SliceCap, parse_read_cap
from ..errors import GridError, UsageError, plain_grid_errors
from ..mutable import SlotReadCap, SlotWriteCap
from ..pack import open_slice
from ..tree import SlotConflictError, Store
from .broker import StorageBroker
from .download import open_downloader
from .slots import (
    SLOT_TIMEOUT,
    SeenStore,
    SlotMissingError,
    SlotRead,
    publish_slot,
    read_slot,
)
from .slots import SlotConflictError as SlotRaceError
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
    if isinstance(cap, ChunkedCap):
        raise GridError("a directory is never a chunked file")
    with plain_grid_errors():
        if isinstance(cap, SliceCap):
            async with open_downloader(broker, cap.pack) as downloader:
                return open_slice(cap, 0, await downloader.read(cap.offset, cap.length))
        async with open_downloader(broker, cap) as downloader:
            return await downloader.read(0, cap.size)


class RootUnavailableError(GridError):
    """The root slot of a tree was found on no server that could be asked.

    A tree's root always exists (:func:`gridfs.client.session.create_root`
    makes it), so this never means "an empty tree": reads and writes stop
    until the servers that hold it answer."""

    exit_code = 3


class GridStore:
    """One tree's root slot and its directories on the grid.

    The root is read as :func:`read_slot` reads it: past servers that answer
    empty, and never older than ``seen`` (the node's memory of the newest
    version of each root) remembers.  It is never taken as empty: a root that
    cannot be found is a :class:`RootUnavailableError`, and nothing is
    published without the version read before."""

    def __init__(
        self,
        broker: StorageBroker,
        root: SlotWriteCap | SlotReadCap,
        params: UploadParams,
        secret: bytes | None,
        seen: SeenStore | None = None,
        *,
        timeout: float = SLOT_TIMEOUT,
    ) -> None:
        self.broker = broker
        self.root = root
        self.params = params
        self.secret = secret
        self.seen = seen
        self.timeout = timeout
        """Seconds each server has for a slot call."""
        self._last: SlotRead | None = None
        self._shared: dict[bytes, SlotRead] = {}
        """The last version read of each shared directory's slot (by
        storage index): what a publish to it expects."""
        self.on_shared: Callable[[SlotReadCap, int, bytes], None] | None = None
        """Called with (cap, seq, payload) of every version of a shared
        directory's slot read or published (the snapshot log)."""
        self.on_root: Callable[[int, bytes], None] | None = None
        """Called with (seq, payload) of every root version read or
        published (the node's snapshot log, :mod:`gridfs.client.snapshots`)."""

    async def put_bytes(self, data: bytes) -> str:
        return await upload_bytes(self.broker, data, self.params, self.secret)

    async def get_bytes(self, cap: str) -> bytes:
        return await download_bytes(self.broker, cap)

    async def read_root(self) -> tuple[int, bytes]:
        """(seq, payload) of the newest root; never (0, b"")."""
        await self.broker.ready(10.0)
        p = self.params
        try:
            self._last = await read_slot(
                self.broker, self.root, p.n, happy=p.happy, seen=self.seen, timeout=self.timeout
            )
        except SlotMissingError as e:
            raise RootUnavailableError(
                f"the root of this tree cannot be found on any reachable server ({e.detail})"
            ) from None
        seq, payload = self._last.seq, self._last.plaintext or b""
        if self.on_root is not None:
            self.on_root(seq, payload)
        return seq, payload

    async def publish_root(self, payload: bytes, expected_seq: int) -> int:
        """Publish the version after ``expected_seq``, which must be the one
        this store read last (anything else: SlotConflictError, re-read)."""
        if not isinstance(self.root, SlotWriteCap):
            raise UsageError("this tree is read-only (its alias holds a read cap)")
        expected = self._last
        if expected is None or expected.seq != expected_seq:
            raise SlotConflictError("the root moved on since it was read")
        seq = await self._publish(self.root, payload, expected)
        if self.on_root is not None:
            self.on_root(seq, payload)
        return seq

    async def _publish(self, cap: SlotWriteCap, payload: bytes, expected: SlotRead) -> int:
        """Publish ``payload`` as the version after ``expected`` (the one read
        last) of the slot ``cap``; another writer's version found there
        instead is a SlotConflictError (the caller re-reads and retries)."""
        p = self.params
        try:
            return await publish_slot(
                self.broker,
                cap,
                payload,
                expected,
                p.n,
                p.happy,
                seen=self.seen,
                timeout=self.timeout,
            )
        except SlotRaceError as e:
            raise SlotConflictError(str(e)) from None

    @property
    def root_write_key(self) -> bytes | None:
        return self.root.write_key if isinstance(self.root, SlotWriteCap) else None

    async def read_dir_slot(self, cap: SlotReadCap) -> tuple[int, bytes]:
        """(seq, payload) of a shared directory's slot, read as the root is:
        never older than the node has seen (a rollback is an error)."""
        await self.broker.ready(10.0)
        p = self.params
        try:
            read = await read_slot(
                self.broker, cap, p.n, happy=p.happy, seen=self.seen, timeout=self.timeout
            )
        except SlotMissingError as e:
            raise RootUnavailableError(
                f"a shared directory's slot cannot be found on any reachable server ({e.detail})"
            ) from None
        self._shared[cap.storage_index] = read
        if self.on_shared is not None:
            self.on_shared(cap, read.seq, read.plaintext or b"")
        return read.seq, read.plaintext or b""

    async def publish_dir_slot(self, cap: SlotWriteCap, payload: bytes, expected_seq: int) -> int:
        """Publish the version after ``expected_seq`` of a shared directory's
        slot, which must be the version read last (else SlotConflictError)."""
        expected = self._shared.get(cap.storage_index)
        if expected is None or expected.seq != expected_seq:
            raise SlotConflictError("a shared directory moved on since it was read")
        seq = await self._publish(cap, payload, expected)
        del self._shared[cap.storage_index]  # (a next publish re-reads first)
        if self.on_shared is not None:
            self.on_shared(cap.read_cap(), seq, payload)
        return seq


class OverlayStore:
    """A store that keeps new directories in memory instead of uploading them:
    applying the queued changes on it shows them at once (read-your-writes)."""

    def __init__(self, base: Store) -> None:
        self.base = base
        self.local: dict[str, bytes] = {}
        self.slots: dict[bytes, tuple[int, bytes]] = {}
        """Shared directories' versions "published" by a view, in memory."""

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

    @property
    def root_write_key(self) -> bytes | None:
        return self.base.root_write_key

    async def read_dir_slot(self, cap: SlotReadCap) -> tuple[int, bytes]:
        local = self.slots.get(cap.storage_index)
        return local if local is not None else await self.base.read_dir_slot(cap)

    async def publish_dir_slot(self, cap: SlotWriteCap, payload: bytes, expected_seq: int) -> int:
        """Keep the view's version of a shared directory in memory."""
        self.slots[cap.storage_index] = (expected_seq + 1, payload)
        return expected_seq + 1
