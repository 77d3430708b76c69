"""Checking an immutable file's health on the grid, without trusting servers.

``check`` asks every server which shares it holds and validates each share's
head (header, extension block, hash chain) against the cap; ``verify`` also
fetches and verifies every block of every share.  Works with a read cap or a
verify cap (which can check but never decrypt).  A share counts as good only
if the checks pass; servers' own claims count for nothing.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import trio

from ..caps import ChunkedCap, ChunkedVerifyCap, LiteralCap, ReadCap, VerifyCap, b32encode
from ..caps import parse as parse_cap
from ..errors import GridError, IntegrityError
from ..immutable import FileDecoder
from .broker import Server, StorageBroker
from .download import READ_TIMEOUT, Source, open_downloader

CHECK_TIMEOUT = 15.0
log = logging.getLogger(__name__)


@dataclass
class CheckResult:
    cap: str
    needed: int
    total: int
    good: dict[int, list[str]] = field(default_factory=dict)
    """share number → servers holding a good copy"""
    corrupt: list[tuple[str, int, str]] = field(default_factory=list)
    """(server, share number, why)"""
    servers: dict[str, list[int]] = field(default_factory=dict)
    """server → share numbers it claimed"""
    unreachable: list[str] = field(default_factory=list)
    verified: bool = False
    parts: int = 1
    """Stored objects checked: a chunked file's manifest and chunks
    (:mod:`gridfs.client.chunkcheck`), whose least healthy part this is."""

    @property
    def good_shares(self) -> int:
        return len(self.good)

    @property
    def healthy(self) -> bool:
        """n good shares on n distinct servers."""
        holders = {servers[0] for servers in self.good.values() if servers}
        return self.good_shares >= self.total and len(holders) >= self.total

    @property
    def recoverable(self) -> bool:
        return self.good_shares >= self.needed

    @property
    def verify_cap(self) -> str | None:
        """The verify cap of the file (what a repairer needs, never a key),
        or None for a literal cap (nothing on servers to verify)."""
        try:
            cap = parse_cap(self.cap)
        except GridError:
            return None
        if isinstance(cap, ReadCap | ChunkedCap):
            return cap.verify_cap().to_string()
        return cap.to_string() if isinstance(cap, VerifyCap | ChunkedVerifyCap) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "cap": self.cap,
            "verify_cap": self.verify_cap,
            "healthy": self.healthy,
            "recoverable": self.recoverable,
            "verified": self.verified,
            "good_shares": self.good_shares,
            "needed": self.needed,
            "total": self.total,
            "corrupt_shares": [[s, n, why] for s, n, why in self.corrupt],
            "servers": [
                {"server": s, "shares": sorted(n)} for s, n in sorted(self.servers.items())
            ],
            "unreachable": self.unreachable,
            "share_holders": {str(n): s for n, s in sorted(self.good.items())},
            "parts": self.parts,
        }


async def check_file(
    broker: StorageBroker, cap: LiteralCap | ReadCap | VerifyCap, verify: bool = False
) -> CheckResult:
    """Where the shares of ``cap`` are and which are good (for a slice, pass
    its pack: caps.stored_cap)."""
    if isinstance(cap, LiteralCap):  # lives in the cap itself: always whole
        result = CheckResult(cap.to_string(), 1, 1, verified=verify)
        result.good[0] = ["(literal)"]
        return result
    vcap = cap.verify_cap() if isinstance(cap, ReadCap) else cap
    result = CheckResult(cap.to_string(), cap.k, cap.n, verified=verify)
    async with open_downloader(broker, vcap) as downloader:
        await downloader.wait_located()
        for problem in downloader.problems:
            result.corrupt.append(_problem(problem))
        for num, sources in sorted(downloader.sources.items()):
            for source in sources:
                result.servers.setdefault(source.server.name, []).append(num)
        if verify:
            await _verify_all(downloader.decoder, downloader.sources, result)
        else:
            for num, sources in downloader.sources.items():
                good = [s.server.name for s in sources if not s.bad]
                if good:
                    result.good[num] = good
    result.unreachable = [s.name for s in broker.servers.values() if not s.connected]
    return result


def _problem(text: str) -> tuple[str, int, str]:
    # "server NAME, share N: why" as reported by the downloader
    head, _, why = text.partition(": ")
    server, _, share = head.rpartition(", share ")
    try:
        num = int(share)
    except ValueError:
        num = -1
    return server.removeprefix("server "), num, why


async def _report(source: Source, verify_cap: str, si: bytes) -> None:
    """Tell the server its share failed verification.  It quarantines the
    share only if it can prove it bad by itself; else it logs the report."""
    with contextlib.suppress(GridError, trio.TooSlowError), trio.fail_after(CHECK_TIMEOUT):
        reply = await source.server.call(
            "report_corrupt",
            {"si": si, "sharenum": source.sharenum, "verify_cap": verify_cap},
        )
        if isinstance(reply, dict):
            done = "quarantined" if reply.get("quarantined") else "kept"
            log.info(
                "%s: share %d reported corrupt, %s: %s",
                source.server.name,
                source.sharenum,
                done,
                reply.get("reason"),
            )


async def _verify_all(
    decoder: FileDecoder, sources: dict[int, list[Source]], result: CheckResult
) -> None:
    """Fetch and verify every record of every share copy; report corrupt ones."""
    verify_cap = decoder.cap.verify_cap() if isinstance(decoder.cap, ReadCap) else decoder.cap
    cap_text = verify_cap.to_string()
    geometry = decoder.geometry
    if geometry is None:
        return
    limiter = trio.Semaphore(8)

    async def one(source: Source) -> None:
        try:
            for j in range(geometry.num_segments):
                offset, length = geometry.record_span(j)
                async with limiter:
                    with trio.fail_after(READ_TIMEOUT):
                        data = await source.server.call(
                            "read",
                            {
                                "si": decoder.storage_index,
                                "sharenum": source.sharenum,
                                "offset": offset,
                                "length": length,
                            },
                        )
                if not isinstance(data, bytes):
                    raise GridError("malformed read reply")
                await trio.to_thread.run_sync(decoder.verify_record, source.sharenum, j, data)
        except (GridError, trio.TooSlowError) as e:
            result.corrupt.append((source.server.name, source.sharenum, str(e) or "timed out"))
            if isinstance(e, IntegrityError):
                await _report(source, cap_text, decoder.storage_index)
            return
        result.good.setdefault(source.sharenum, []).append(source.server.name)

    async with trio.open_nursery() as nursery:
        for srcs in sources.values():
            for source in srcs:
                if not source.bad:
                    nursery.start_soon(one, source)


def server_label(server: Server) -> str:
    return f"{server.name} [{b32encode(server.node_id)[:8]}]"
