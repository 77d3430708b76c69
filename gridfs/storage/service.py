"""The storage server's RPC methods over a :class:`ShareStore`.

One :class:`StorageSession` per connection: the connection is the seed's
canary, so every bucket it opened and did not close is aborted when it ends,
and a bucket idle for longer than ``idle_timeout`` is aborted too.

A session knows its client as ``member`` (the authenticated node id) and
charges what it stores to it (see :mod:`gridfs.storage.leases`), against
the store's ``client_quota``.  Work a peer can make the server do that is
not its own storage (hashing a share it reports corrupt) runs under one
small limiter per server, so a flood of it waits there while lease and
close operations go on.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from ..caps import ReadCap, VerifyCap, b32encode
from ..caps import parse as parse_cap
from ..errors import GridError, UsageError
from ..protocol.schema import MAX_OPEN_BUCKETS
from .leases import REFUSED, SLOT, LeaseDB, Objects
from .selfcheck import check_share, ueb_hash_of
from .slots import SlotStore, StaleVersionError
from .store import BucketWriter, NoSuchShareError, ShareStore

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


_CHARGING = frozenset({"allocate_buckets", "put_share", "put_shares", "slot_write"})
"""The methods that open unsettled charges: the first of them on a server
reconciles those a crash left first."""

VERIFY_CONCURRENCY = 2
"""Most share checks peers' reports may run at once on one server."""


@dataclass
class ServerState:
    """What the sessions of one server share, beyond its stores."""

    verify_limiter: trio.CapacityLimiter = field(
        default_factory=lambda: trio.CapacityLimiter(VERIFY_CONCURRENCY)
    )
    verifying: int = 0
    """Share checks running now."""
    most_verifying: int = 0
    """The most that ever ran at once (tests assert the bound)."""
    ready: bool = False
    """Charges left unsettled by the last run were reconciled with the disk."""
    ready_lock: trio.Lock = field(default_factory=trio.Lock)
    reported: dict[tuple[bytes, int], None] = field(default_factory=dict)
    """Shares lately reported and kept, oldest first (bounded)."""

    def first_report(self, si: bytes, sharenum: int) -> bool:
        """Whether a kept share was not reported lately: repeats are logged
        quietly, so a flood of reports cannot flood the log."""
        key = (si, sharenum)
        if key in self.reported:
            return False
        self.reported[key] = None
        if len(self.reported) > 4096:
            del self.reported[next(iter(self.reported))]
        return True


_servers: weakref.WeakKeyDictionary[ShareStore, ServerState] = weakref.WeakKeyDictionary()


def server_state(store: ShareStore) -> ServerState:
    """The state shared by every session over ``store`` (one per server)."""
    state = _servers.get(store)
    if state is None:
        state = _servers[store] = ServerState()
    return state


def _put_failed(e: GridError) -> dict[str, Any]:
    """``put_shares``' answer for a share it could not store."""
    code = getattr(_coded(e), "code", "error")
    return {"stored": False, "already": False, "error": f"{code}: {e}"}


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
        *,
        member: bytes = b"",
    ) -> None:
        self.store = store
        self.slots = slots
        self.leases = leases
        self.idle_timeout = idle_timeout
        self.member = member
        """The client's node id, whose account pays for what it stores."""
        self.server = server_state(store)
        self.buckets: dict[tuple[bytes, int], BucketWriter] = {}

    async def handle(self, method: str, args: dict[str, Any]) -> Any:
        fn = getattr(self, "rpc_" + method, None)
        if fn is None:
            raise WrongServerError(f"a storage server does not answer {method}")
        try:
            if method in _CHARGING and not self.server.ready:
                await self._reconcile()
            return await fn(**args)
        except GridError as e:
            raise _coded(e) from None

    async def _reconcile(self) -> None:
        """Before a server's first upload: set the charges a crash left
        unsettled from what the disk holds."""
        async with self.server.ready_lock:
            if self.server.ready:
                return
            if self.leases is not None:
                n = await trio.to_thread.run_sync(self.leases.reconcile, self._object_size)
                if n:
                    log.info("reconciled %d charges with the disk", n)
            self.server.ready = True

    @property
    def quota(self) -> int:
        return self.store.limits.client_quota

    async def rpc_stats(self) -> dict[str, int]:
        stats = self.store.capacity()
        stats["now_ns"] = time.time_ns() if self.leases is None else self.leases.now()
        if self.leases is not None:
            stats["lease_duration"] = self.leases.duration_ns // 10**9
            stats["lease_fence"] = self.leases.fence()
            stats["member_used"] = self.leases.usage(self.member)  # never waits for a writer
            stats["member_quota"] = self.quota
        return stats

    def _objects(self, si: bytes) -> Objects:
        """What is stored under ``si`` here: share numbers and SLOT -> bytes."""
        objects: Objects = dict(self.store.shares(si))
        size = None if self.slots is None else self.slots.size(si)
        if size is not None:
            objects[SLOT] = size
        return objects

    def _object_size(self, si: bytes, num: int) -> int | None:
        if num == SLOT:
            return None if self.slots is None else self.slots.size(si)
        return self.store.shares(si).get(num)

    async def _reserve(
        self, si: bytes, renew_secret: bytes, cancel_secret: bytes, new: Objects
    ) -> None:
        """Add (or renew) the caller's lease before storing anything, so
        what gets stored is never without one, and charge the caller for
        ``new`` (QuotaExceededError past its quota)."""
        if self.leases is not None:
            await trio.to_thread.run_sync(
                self.leases.reserve,
                si,
                renew_secret,
                cancel_secret,
                self.member,
                self._objects,
                new,
                self.quota,
            )

    def _settle(self, si: bytes, num: int, size: int | None) -> None:
        if self.leases is not None:
            self.leases.settle(si, num, size)

    def _drop(self, bucket: BucketWriter) -> None:
        """Abort an upload and its charge (the charge waits for the lease
        database: call it from a thread, or where blocking is acceptable)."""
        bucket.abort()
        self._settle(bucket.storage_index, bucket.sharenum, None)

    async def _drop_soon(self, bucket: BucketWriter) -> None:
        await trio.to_thread.run_sync(self._drop, bucket)

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
        already, allocated = self.store.allocate(si, sharenums, share_size)
        if not already and not allocated:
            return {"already": [], "allocated": []}  # nothing held or opened: no lease
        try:
            await self._reserve(
                si, renew_secret, cancel_secret, {num: share_size for num in allocated}
            )
        except BaseException:
            for writer in allocated.values():
                writer.abort()
            raise
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
            await self._drop_soon(bucket)
            raise

    async def rpc_put_share(
        self, si: bytes, sharenum: int, data: bytes, renew_secret: bytes, cancel_secret: bytes
    ) -> dict[str, bool]:
        """A whole small share in one call: lease, allocate, write and close."""
        already, allocated = self.store.allocate(si, [sharenum], len(data))
        if sharenum in already:
            await self._reserve(si, renew_secret, cancel_secret, {})
            return {"stored": False, "already": True}
        bucket = allocated.get(sharenum)
        if bucket is None:
            return {"stored": False, "already": False}  # being written by someone else
        try:
            await self._reserve(si, renew_secret, cancel_secret, {sharenum: len(data)})
        except BaseException:
            bucket.abort()
            raise
        await self._finish(bucket, lambda: bucket.write(0, data))
        return {"stored": True, "already": False}

    async def rpc_put_shares(
        self, shares: list[tuple[bytes, int, bytes, bytes, bytes]]
    ) -> list[dict[str, Any]]:
        """Several whole small shares in one call (a chunked file's chunks):
        each as ``put_share``, with one lease transaction and one trip to a
        worker thread for all.  A share that cannot be stored gets an error
        of its own; a quota exceeded refuses the whole call."""
        answers: list[dict[str, Any]] = [{} for _ in shares]
        opened: list[tuple[int, BucketWriter]] = []
        reserve: list[tuple[bytes, bytes, bytes, Objects]] = []
        try:
            for i, (si, num, data, renew, cancel) in enumerate(shares):
                try:
                    already, allocated = self.store.allocate(si, [num], len(data))
                except GridError as e:
                    answers[i] = _put_failed(e)
                    continue
                bucket = allocated.get(num)
                if num in already:
                    answers[i] = {"stored": False, "already": True}
                    reserve.append((si, renew, cancel, {}))
                elif bucket is None:
                    answers[i] = {"stored": False, "already": False}  # someone is writing it
                else:
                    opened.append((i, bucket))
                    reserve.append((si, renew, cancel, {num: len(data)}))
            if reserve and self.leases is not None:
                await trio.to_thread.run_sync(
                    self.leases.reserve_many, reserve, self.member, self._objects, self.quota
                )
        except BaseException:
            for _, bucket in opened:
                bucket.abort()
            raise

        def store_all() -> None:
            settled: list[tuple[bytes, int, int | None]] = []
            try:
                errors = self.store.close_whole([(b, shares[i][2]) for i, b in opened])
                for (i, bucket), error in zip(opened, errors, strict=True):
                    if error is None:
                        answers[i] = {"stored": True, "already": False}
                        settled.append((bucket.storage_index, bucket.sharenum, bucket.share_size))
                    else:
                        answers[i] = _put_failed(error)
                        settled.append((bucket.storage_index, bucket.sharenum, None))
            finally:
                for i, bucket in opened:
                    if not answers[i]:  # an unexpected error: leave nothing half done
                        bucket.abort()
                        settled.append((bucket.storage_index, bucket.sharenum, None))
                if self.leases is not None and settled:
                    self.leases.settle_many(settled)

        # close() fsyncs: keep the event loop free for other connections.
        await trio.to_thread.run_sync(store_all)
        return answers

    async def _finish(self, bucket: BucketWriter, before: Callable[[], None] | None = None) -> None:
        """Close a bucket (after ``before()``) and settle its charge; on a
        failure, abort both."""

        def close() -> None:
            try:
                if before is not None:
                    before()
                bucket.close()
            except BaseException:
                self._drop(bucket)
                raise
            self._settle(bucket.storage_index, bucket.sharenum, bucket.share_size)

        # close() fsyncs: keep the event loop free for other connections.
        await trio.to_thread.run_sync(close)

    async def rpc_close(self, si: bytes, sharenum: int) -> None:
        bucket = self.buckets.pop((si, sharenum), None)
        if bucket is None:
            raise NoSuchBucketError(f"share {sharenum} is not open for writing here")
        await self._finish(bucket)

    async def rpc_abort(self, si: bytes, sharenum: int) -> None:
        bucket = self.buckets.pop((si, sharenum), None)
        if bucket is not None:
            await self._drop_soon(bucket)

    async def rpc_report_corrupt(self, si: bytes, sharenum: int, verify_cap: str) -> dict[str, Any]:
        """A client says this share failed verification against its cap.
        Anyone may say so, and the cap it sends proves nothing (any extension
        block hash can be paired with a real storage index), so the share is
        quarantined only if it is inconsistent in itself
        (:func:`~gridfs.storage.selfcheck.check_share`); else the report is
        logged for the operator and the share kept."""
        cap = parse_cap(verify_cap)
        if not isinstance(cap, ReadCap | VerifyCap) or cap.storage_index != si:
            raise UsageError("the verify cap is not for this storage index")
        ueb_hash = cap.ueb_hash
        size = self.store.shares(si).get(sharenum)
        if size is None:
            raise NoSuchShareError(f"no share {sharenum} here")

        def read(offset: int, length: int) -> bytes:
            return self.store.read(si, sharenum, offset, length)

        def check() -> tuple[str | None, bool]:
            return check_share(read, si, sharenum, size), ueb_hash_of(read) == ueb_hash

        server = self.server
        async with server.verify_limiter:  # a flood waits here, not for threads
            server.verifying += 1
            server.most_verifying = max(server.most_verifying, server.verifying)
            try:
                reason, matches = await trio.to_thread.run_sync(check)
            finally:
                server.verifying -= 1
        name = f"share {sharenum} of {b32encode(si)}"
        if reason is None:
            why = (
                "it is consistent in itself"
                + ("" if matches else ", and the reporter's cap is for another file")
                + "; a server cannot check more without the cap, so it is kept"
            )
            level = logging.WARNING if server.first_report(si, sharenum) else logging.DEBUG
            log.log(level, "report_corrupt: %s not quarantined: %s", name, why)
            return {"quarantined": False, "reason": why}
        await trio.to_thread.run_sync(self._quarantine, si, sharenum)
        log.warning("report_corrupt: quarantined %s: %s", name, reason)
        return {"quarantined": True, "reason": reason}

    def _quarantine(self, si: bytes, sharenum: int) -> None:
        if self.leases is not None:
            self.leases.unsettle(si, sharenum)
        self.store.quarantine(si, sharenum)
        self._settle(si, sharenum, None)

    async def rpc_get_buckets(self, si: bytes) -> list[list[int]]:
        return [[num, size] for num, size in sorted(self.store.shares(si).items())]

    async def rpc_get_buckets_many(self, sis: list[bytes]) -> list[list[list[int]]]:
        return [await self.rpc_get_buckets(si) for si in sis]

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
        size = len(msgpack.packb([record, signature], use_bin_type=True))
        self.store.check_room(size)  # a slot is disk like a share
        await self._reserve(si, renew_secret, cancel_secret, {SLOT: size})
        expected = expected_seq if check else None

        def write() -> None:
            try:
                slots.write(si, record, signature, expected)
            finally:
                self._settle(si, SLOT, slots.size(si))

        try:
            # Writing fsyncs: keep the event loop free for other connections.
            await trio.to_thread.run_sync(write)
        except StaleVersionError as e:
            return {"ok": False, "current": None if e.current is None else list(e.current)}
        return {"ok": True}

    async def rpc_add_leases(self, leases: list[tuple[bytes, bytes, bytes]]) -> list[int]:
        """Add or renew a lease on each storage index that has something here;
        answers, per index, how many things the lease covers (0: nothing is
        stored, no lease added).  A new lease charges the caller for what it
        covers; one past its quota is not added and answers -1 (renewals
        never are refused)."""
        db = self._lease_db()
        answers = await trio.to_thread.run_sync(
            db.add_many, leases, self._objects, self.member, self.quota
        )
        refused = answers.count(REFUSED)
        if refused:
            log.info("refused %d new leases past a member's quota", refused)
        return answers

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
        """The connection ended: abort its uploads at once (another client
        may be about to upload the same shares), then drop their charges in
        a thread, so the event loop never waits for the lease database."""
        buckets = list(self.buckets.values())
        self.buckets.clear()
        for bucket in buckets:
            bucket.abort()
        if not buckets or self.leases is None:
            return
        leases = self.leases
        dropped = [(b.storage_index, b.sharenum, None) for b in buckets]

        async def settle() -> None:
            try:
                await trio.to_thread.run_sync(leases.settle_many, dropped)
            except Exception as e:  # the next start reconciles them
                log.warning("could not drop the charges of aborted uploads: %s", e)

        try:
            trio.lowlevel.spawn_system_task(settle)
        except RuntimeError:  # not in a trio run
            leases.settle_many(dropped)

    async def reap_idle(self) -> None:
        """Abort buckets nobody wrote to for ``idle_timeout`` seconds (and,
        on a server's first connection, reconcile its charges at once)."""
        if not self.server.ready:
            await self._reconcile()
        while True:
            await trio.sleep(min(self.idle_timeout / 4, 5.0))
            now = time.monotonic()
            for key, bucket in list(self.buckets.items()):
                if now - bucket.last_activity > self.idle_timeout:
                    log.info("aborting idle bucket %r", bucket)
                    self.buckets.pop(key, None)
                    await self._drop_soon(bucket)
