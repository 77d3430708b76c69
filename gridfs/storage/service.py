"""The storage server's RPC methods over a :class:`ShareStore`.

One :class:`StorageSession` per connection: the connection is the seed's
canary, so every bucket it opened and did not close is aborted when it ends,
and a bucket idle for longer than ``idle_timeout`` is aborted too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from ..caps import ReadCap, VerifyCap
from ..caps import parse as parse_cap
from ..errors import FormatError, GridError, IntegrityError, UsageError
from ..immutable import ForeignShareError, verify_share
from ..protocol.schema import MAX_OPEN_BUCKETS
from .leases import LeaseDB
from .slots import SlotStore, StaleVersionError
from .store import BucketWriter, ShareStore

log = logging.getLogger(__name__)


class TooManyBucketsError(GridError):
    """This connection already holds the most open buckets allowed."""

    code = "too-many-buckets"


class WrongServerError(GridError):
    """A method this kind of server does not have (e.g. an introducer's)."""

    code = "bad-request"


class NoSuchBucketError(GridError):
    """No open bucket for that storage index and share on this connection."""

    code = "no-such-bucket"


class SlotsUnsupportedError(GridError):
    """This server keeps no mutable slots."""

    code = "slots-unsupported"


ERROR_CODES = {
    "BadVersionError": "bad-signature",
    "NoSpaceError": "no-space",
    "ShareTooLargeError": "too-large",
    "BadWriteError": "bad-write",
    "IncompleteShareError": "incomplete",
    "NoSuchShareError": "no-such-share",
    "UsageError": "bad-request",
}


def _coded(e: GridError) -> GridError:
    if getattr(e, "code", None) is None:
        e.code = ERROR_CODES.get(type(e).__name__, "error")  # type: ignore[attr-defined]
    return e


class StorageSession:
    """The storage methods as seen by one connection."""

    def __init__(
        self,
        store: ShareStore,
        idle_timeout: float,
        slots: SlotStore | None = None,
        leases: LeaseDB | None = None,
    ) -> None:
        self.store = store
        self.slots = slots
        self.leases = leases
        self.idle_timeout = idle_timeout
        self.buckets: dict[tuple[bytes, int], BucketWriter] = {}
        self.member: bytes = b""
        """the node id of the authenticated member (set by the server node)"""

    async def handle(self, method: str, args: dict[str, Any]) -> Any:
        fn = getattr(self, "rpc_" + method, None)
        if fn is None:
            raise WrongServerError(f"a storage server does not answer {method}")
        try:
            return await fn(**args)
        except GridError as e:
            raise _coded(e) from None

    async def rpc_stats(self) -> dict[str, int]:
        stats = self.store.capacity()
        stats["now_ns"] = time.time_ns() if self.leases is None else self.leases.now()
        if self.leases is not None:
            stats["lease_duration"] = self.leases.duration_ns // 10**9
            stats["lease_fence"] = self.leases.fence()
        return stats

    async def _lease(self, si: bytes, renew_secret: bytes, cancel_secret: bytes) -> None:
        """Add (or renew) the caller's lease before storing anything, so
        what gets stored is never without one."""
        if self.leases is not None:
            await trio.to_thread.run_sync(self.leases.add, si, renew_secret, cancel_secret)

    async def rpc_allocate_buckets(
        self,
        si: bytes,
        sharenums: list[int],
        share_size: int,
        renew_secret: bytes,
        cancel_secret: bytes,
    ) -> dict[str, list[int]]:
        if len(self.buckets) + len(sharenums) > MAX_OPEN_BUCKETS:
            raise TooManyBucketsError(f"at most {MAX_OPEN_BUCKETS} open buckets per connection")
        await self._lease(si, renew_secret, cancel_secret)
        already, allocated = self.store.allocate(si, sharenums, share_size)
        for num, writer in allocated.items():
            self.buckets[(si, num)] = writer
        return {"already": sorted(already), "allocated": sorted(allocated)}

    def _bucket(self, si: bytes, sharenum: int) -> BucketWriter:
        try:
            return self.buckets[(si, sharenum)]
        except KeyError:
            raise NoSuchBucketError(f"share {sharenum} is not open for writing here") from None

    async def rpc_write(self, si: bytes, sharenum: int, chunks: list[tuple[int, bytes]]) -> None:
        bucket = self._bucket(si, sharenum)
        try:
            bucket.write_all(chunks)
        except GridError:
            self.buckets.pop((si, sharenum), None)
            bucket.abort()
            raise

    async def rpc_put_share(
        self, si: bytes, sharenum: int, data: bytes, renew_secret: bytes, cancel_secret: bytes
    ) -> dict[str, bool]:
        """A whole small share in one call: lease, allocate, write and close."""
        await self._lease(si, renew_secret, cancel_secret)
        already, allocated = self.store.allocate(si, [sharenum], len(data))
        if sharenum in already:
            return {"stored": False, "already": True}
        bucket = allocated.get(sharenum)
        if bucket is None:
            return {"stored": False, "already": False}  # being written by someone else
        try:
            bucket.write(0, data)
            await trio.to_thread.run_sync(bucket.close)
        except BaseException:
            bucket.abort()
            raise
        return {"stored": True, "already": False}

    async def rpc_close(self, si: bytes, sharenum: int) -> None:
        bucket = self.buckets.pop((si, sharenum), None)
        if bucket is None:
            raise NoSuchBucketError(f"share {sharenum} is not open for writing here")
        # close() fsyncs: keep the event loop free for other connections.
        await trio.to_thread.run_sync(bucket.close)

    async def rpc_abort(self, si: bytes, sharenum: int) -> None:
        bucket = self.buckets.pop((si, sharenum), None)
        if bucket is not None:
            bucket.abort()

    async def rpc_report_corrupt(self, si: bytes, sharenum: int, verify_cap: str) -> dict[str, Any]:
        """A client says this share failed verification.  Believe it only
        after verifying the share ourselves with the verify cap it sends; then
        quarantine it so it is never served again."""
        cap = parse_cap(verify_cap)
        if not isinstance(cap, ReadCap | VerifyCap) or cap.storage_index != si:
            raise UsageError("the verify cap is not for this storage index")
        vcap = cap.verify_cap() if isinstance(cap, ReadCap) else cap

        def check() -> str | None:
            def read(offset: int, length: int) -> bytes:
                return self.store.read(si, sharenum, offset, length)

            try:
                if verify_share(vcap, read) != sharenum:
                    return "the share claims another share number"
            except (IntegrityError, FormatError, ForeignShareError) as e:
                return str(e)
            return None

        reason = await trio.to_thread.run_sync(check)
        if reason is None:
            return {"quarantined": False, "reason": ""}
        self.store.quarantine(si, sharenum)
        log.warning("quarantined share %d of %s: %s", sharenum, si.hex(), reason)
        return {"quarantined": True, "reason": reason}

    async def rpc_get_buckets(self, si: bytes) -> list[list[int]]:
        return [[num, size] for num, size in sorted(self.store.shares(si).items())]

    async def rpc_read(self, si: bytes, sharenum: int, offset: int, length: int) -> bytes:
        return self.store.read(si, sharenum, offset, length)

    def _slot_store(self) -> SlotStore:
        if self.slots is None:
            raise SlotsUnsupportedError("this server keeps no mutable slots")
        return self.slots

    async def rpc_slot_read(self, si: bytes) -> list[bytes] | None:
        """The stored [record, signature] of a slot, or nil."""
        stored = self._slot_store().read(si)
        return None if stored is None else list(stored)

    async def rpc_slot_write(
        self,
        si: bytes,
        record: bytes,
        signature: bytes,
        check: bool,
        expected_seq: int,
        renew_secret: bytes,
        cancel_secret: bytes,
    ) -> dict[str, Any]:
        """{"ok": true} once stored, or {"ok": false, "current": [record, signature]
        | nil} when refused as stale; an invalid version is an error reply."""
        slots = self._slot_store()
        await self._lease(si, renew_secret, cancel_secret)
        expected = expected_seq if check else None
        try:
            # Writing fsyncs: keep the event loop free for other connections.
            await trio.to_thread.run_sync(slots.write, si, record, signature, expected)
        except StaleVersionError as e:
            return {"ok": False, "current": None if e.current is None else list(e.current)}
        return {"ok": True}

    def _held(self, si: bytes) -> int:
        """How many things of ``si`` are stored here: shares, plus 1 for a slot."""
        slot = self.slots is not None and self.slots.path(si).exists()
        return len(self.store.shares(si)) + int(slot)

    async def rpc_add_leases(self, leases: list[tuple[bytes, bytes, bytes]]) -> list[int]:
        """Add or renew a lease on each storage index that has something here;
        answers, per index, how many things the lease covers (0: nothing is
        stored, no lease added)."""
        db = self._lease_db()

        return await trio.to_thread.run_sync(db.add_many, leases, self._held)

    async def rpc_cancel_leases(
        self, leases: list[tuple[bytes, bytes]], renewed_before: int
    ) -> list[str]:
        """Cancel the caller's leases, except those renewed at or after the
        fence ``renewed_before`` (``lease_fence`` from ``stats``); answers
        "none", "kept", "cancelled" or "deleted" per index."""
        db = self._lease_db()

        def cancel() -> list[str]:
            return [db.cancel(si, secret, renewed_before) for si, secret in leases]

        return await trio.to_thread.run_sync(cancel)

    def _lease_db(self) -> LeaseDB:
        if self.leases is None:
            raise WrongServerError("this server keeps no leases")
        return self.leases

    def abort_all(self) -> None:
        for bucket in self.buckets.values():
            bucket.abort()
        self.buckets.clear()

    async def reap_idle(self) -> None:
        """Abort buckets nobody wrote to for ``idle_timeout`` seconds."""
        while True:
            await trio.sleep(min(self.idle_timeout / 4, 5.0))
            now = time.monotonic()
            for key, bucket in list(self.buckets.items()):
                if now - bucket.last_activity > self.idle_timeout:
                    log.info("aborting idle bucket %r", bucket)
                    self.buckets.pop(key, None)
                    bucket.abort()
