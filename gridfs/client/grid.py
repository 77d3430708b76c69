"""A client node's view of the grid: config, secret and broker in one place."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..caps import LITERAL_MAX, ChunkedCap, FileCap, LiteralCap, ReadCap, SliceCap, VerifyCap
from ..config import NodeDir
from ..errors import GridError, UsageError, plain_grid_errors, unwrap
from ..membership import REVOCATIONS_NAME
from ..net.identity import NodeAddress
from ..pack import open_slice
from .broker import StorageBroker
from .chunked import CHUNKED_MIN_SIZE, put_chunked, stream_chunked
from .download import Downloader, open_downloader
from .seen import SeenVersions
from .transfers import Transfers

if TYPE_CHECKING:
    from .keeper import Keeper  # which imports this module
from .upload import Progress, UploadParams, UploadReport, upload_file

SERVER_WAIT = 10.0


class GridClient:
    def __init__(self, node: NodeDir, broker: StorageBroker) -> None:
        self.node = node
        self.broker = broker
        config = node.config()
        self.params = UploadParams(config.k, config.happy, config.n, config.segment_size)
        self.secret = node.convergence_secret()
        self.keeper: Keeper | None = None
        """The node's lease keeper, made on first use (gridfs.client.keeper)."""
        self.transfers = Transfers()
        self.seen = SeenVersions.of_node(node.private)
        """The newest version of each tree root this node has seen (rollback guard)."""

    async def wait_for_servers(self, count: int | None = None, timeout: float = SERVER_WAIT) -> int:
        """Give the introducer a moment to tell us about servers: its first list,
        and then (a short while longer) until ``count`` are known.  Raises
        NotMemberError if the introducer refused us."""
        known = await self.broker.ready(timeout)
        if self.broker.introducer_refusal is not None:
            raise self.broker.introducer_refusal
        if known >= (count or self.params.n):
            return known
        return await self.broker.wait_for_servers(count or self.params.n, min(timeout, 2.0))

    async def put(
        self,
        path: Path,
        progress: Progress | None = None,
        drop: bool = False,
        digest: bytes | None = None,
        chunked: bool = True,
    ) -> UploadReport:
        """Store the file at ``path``: chunked when larger than
        CHUNKED_MIN_SIZE, unless ``chunked`` is false (then one CHK object
        whatever its size, as before chunked files: no dedup)."""
        size = path.stat().st_size
        if size > LITERAL_MAX:  # literal files need no server
            await self.wait_for_servers(self.params.happy)
        transfer = self.transfers.start("upload", path.name, size)

        def counted(n: int) -> None:
            transfer.add(n)
            if progress is not None:
                progress(n)

        try:
            if size > CHUNKED_MIN_SIZE and chunked:
                return UploadReport(await put_chunked(self, path, counted, drop))
            return await upload_file(
                self.broker, path, self.params, self.secret, counted, drop=drop, digest=digest
            )
        finally:
            self.transfers.finish(transfer)

    async def get(
        self,
        cap: FileCap,
        write: Callable[[bytes], Awaitable[None]],
        offset: int = 0,
        length: int | None = None,
    ) -> list[str]:
        """Stream a file (or a range of it) to ``write``; return problems seen."""
        if isinstance(cap, ChunkedCap):
            return await stream_chunked(self, cap, write, offset, length)
        if isinstance(cap, SliceCap):  # its range of the pack, opened with its key
            end = cap.size if length is None else min(cap.size, offset + length)
            at = offset

            async def opened(data: bytes) -> None:
                nonlocal at
                plain = open_slice(cap, at, data)
                at += len(data)
                await write(plain)

            return await self.get(cap.pack, opened, cap.offset + offset, max(0, end - offset))
        if isinstance(cap, LiteralCap):
            end = cap.size if length is None else offset + length
            await write(cap.data[offset:end])
            return []
        await self.wait_for_servers(cap.k, timeout=SERVER_WAIT)
        with plain_grid_errors():
            async with open_downloader(self.broker, cap) as downloader:
                await downloader.stream(write, offset, length)
                return downloader.problems

    def downloader(self, cap: ReadCap | VerifyCap) -> AbstractAsyncContextManager[Downloader]:
        return open_downloader(self.broker, cap)


@contextlib.asynccontextmanager
async def open_grid(node: NodeDir) -> AsyncIterator[GridClient]:
    """The grid as this client node sees it.  A node that is not a member of
    its grid raises NotMemberError here, before any connection; a failure
    inside, after a server or the introducer refused us, is reported as that
    refusal (one line: not a member) rather than as its consequence."""
    config = node.config()
    if config.kind != "client":
        raise UsageError(f"{node.path} is a {config.kind} node, not a client node")
    introducer = NodeAddress.parse(config.introducer) if config.introducer else None
    static = [NodeAddress.parse(s) for s in config.servers]
    if introducer is None and not static:
        raise UsageError(f"{node.path}: no introducer and no servers configured")
    credentials = node.credentials()
    credentials.require_member(str(node.path))
    async with trio.open_nursery() as nursery:
        broker = StorageBroker(
            nursery,
            credentials,
            introducer,
            static,
            lease_secret=node.lease_secret(),
            revocations=node.private / REVOCATIONS_NAME,
        )
        grid = GridClient(node, broker)
        try:
            yield grid
        except (GridError, BaseExceptionGroup) as e:
            if broker.refusal is not None and isinstance(unwrap(e), GridError):
                raise broker.refusal from e
            raise
        finally:
            grid.seen.close()
            nursery.cancel_scope.cancel()
