"""Typed clients of the wire protocol: one method per request of the schema.

Each method sends one request of :data:`gridfs.protocol.schema.REQUESTS`
under its own name and with its schema's fields as keyword parameters, checks
the arguments with that same schema before anything is sent (a bug of ours
is caught here, not reported by the peer), and checks the shape of the
answer on arrival: a peer that answers what no honest peer would raises
:class:`BadReplyError`, so callers work with typed values only.  The test
``test_calls.py`` holds the methods and the schema in step.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import GridError
from ..protocol.frames import Blob
from ..protocol.schema import SchemaError, validate_request
from .rpc import TakenArgs

Caller = Callable[[str, dict[str, Any], float | None], Awaitable[Any]]
"""``call(method, args, timeout)``: an :class:`RpcClient`'s or a broker
``Server``'s ``call`` (``None``: the connection's default timeout)."""


class BadReplyError(GridError):
    """A peer answered a request with a value of the wrong shape."""

    code = "bad-reply"


@dataclass(frozen=True)
class Allocation:
    """``allocate_buckets``' answer: shares already held, shares now open."""

    already: list[int]
    allocated: list[int]


@dataclass(frozen=True)
class PutShare:
    stored: bool
    already: bool
    error: str | None = None
    """Why the server could not store it (``put_shares`` only)."""


@dataclass(frozen=True)
class CorruptionVerdict:
    quarantined: bool
    reason: str


@dataclass(frozen=True)
class SlotWritten:
    """``slot_write``'s answer: stored, or refused with what the server holds
    (``current`` None: nothing)."""

    ok: bool
    current: tuple[bytes, bytes] | None = None


def _fail(method: str, what: str) -> BadReplyError:
    return BadReplyError(f"malformed {method} answer: {what}")


def _ints(method: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(type(x) is int for x in value):
        raise _fail(method, "expected a list of integers")
    return value


def _pair(method: str, value: Any) -> tuple[bytes, bytes]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(x, bytes) for x in value)
    ):
        raise _fail(method, "expected [record, signature]")
    return value[0], value[1]


def _map(method: str, value: Any, **fields: type) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(method, "expected a map")
    for name, kind in fields.items():
        if type(value.get(name)) is not kind:
            raise _fail(method, f"{name} is not {kind.__name__}")
    return value


def _buckets(method: str, value: Any) -> list[tuple[int, int]]:
    """A get_buckets answer: [share number, size] pairs."""
    if not isinstance(value, list):
        raise _fail(method, "expected a list")
    out = []
    for item in value:
        pair = _ints(method, item)
        if len(pair) != 2 or not 0 <= pair[0] < 256 or pair[1] < 0:
            raise _fail(method, "expected [share number, size] pairs")
        out.append((pair[0], pair[1]))
    return out


class _Calls:
    def __init__(self, call: Caller) -> None:
        self._call = call

    async def _send(self, method: str, timeout: float | None, **args: Any) -> Any:
        return await self._send_args(method, timeout, args)

    async def _send_args(self, method: str, timeout: float | None, args: dict[str, Any]) -> Any:
        try:
            validate_request(method, args)
        except SchemaError as e:
            raise ValueError(f"{method}: {e}") from None  # our bug, not the peer's
        return await self._call(method, args, timeout)


class StorageCalls(_Calls):
    """The storage server's requests (docs/protocol.md §7, §12, §14)."""

    async def stats(self, *, timeout: float | None = None) -> dict[str, int]:
        reply = await self._send("stats", timeout)
        if not isinstance(reply, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in reply.items()
        ):
            raise _fail("stats", "expected a map of names to integers")
        return reply

    async def allocate_buckets(
        self,
        si: bytes,
        sharenums: list[int],
        share_size: int,
        renew_secret: bytes,
        cancel_secret: bytes,
        *,
        timeout: float | None = None,
    ) -> Allocation:
        reply = await self._send(
            "allocate_buckets",
            timeout,
            si=si,
            sharenums=sharenums,
            share_size=share_size,
            renew_secret=renew_secret,
            cancel_secret=cancel_secret,
        )
        reply = _map("allocate_buckets", reply, already=list, allocated=list)
        already = _ints("allocate_buckets", reply["already"])
        allocated = _ints("allocate_buckets", reply["allocated"])
        if not set(already) | set(allocated) <= set(sharenums):
            raise _fail("allocate_buckets", "shares that were not asked for")
        return Allocation(already, allocated)

    async def write(
        self,
        si: bytes,
        sharenum: int,
        chunks: list[tuple[int, bytes]] | list[list[Any]],
        *,
        timeout: float | None = None,
    ) -> None:
        await self._send("write", timeout, si=si, sharenum=sharenum, chunks=chunks)

    async def close(self, si: bytes, sharenum: int, *, timeout: float | None = None) -> None:
        await self._send("close", timeout, si=si, sharenum=sharenum)

    async def abort(self, si: bytes, sharenum: int, *, timeout: float | None = None) -> None:
        await self._send("abort", timeout, si=si, sharenum=sharenum)

    async def put_share(
        self,
        si: bytes,
        sharenum: int,
        data: bytes,
        renew_secret: bytes,
        cancel_secret: bytes,
        *,
        timeout: float | None = None,
    ) -> PutShare:
        reply = await self._send(
            "put_share",
            timeout,
            si=si,
            sharenum=sharenum,
            data=data,
            renew_secret=renew_secret,
            cancel_secret=cancel_secret,
        )
        reply = _map("put_share", reply, stored=bool, already=bool)
        return PutShare(reply["stored"], reply["already"])

    async def put_shares(
        self,
        shares: list[tuple[bytes, int, bytes | Blob, bytes, bytes]],
        *,
        timeout: float | None = None,
    ) -> list[PutShare]:
        """``put_share`` for each (si, sharenum, data, renew_secret,
        cancel_secret), in one request: an answer per share, in order.
        The call takes ``shares``: it lets go of them once they are sent."""
        count = len(shares)
        args = TakenArgs(shares=shares)
        del shares
        reply = await self._send_args("put_shares", timeout, args)
        if not isinstance(reply, list) or len(reply) != count:
            raise _fail("put_shares", "expected an answer per share")
        out = []
        for item in reply:
            item = _map("put_shares", item, stored=bool, already=bool)
            error = item.get("error")
            if error is not None and not isinstance(error, str):
                raise _fail("put_shares", "error is not str")
            if error is not None and (item["stored"] or item["already"]):
                raise _fail("put_shares", "a share both stored and failed")
            out.append(PutShare(item["stored"], item["already"], error and error[:500]))
        return out

    async def get_buckets(
        self, si: bytes, *, timeout: float | None = None
    ) -> list[tuple[int, int]]:
        """(share number, size) of each share the server holds."""
        return _buckets("get_buckets", await self._send("get_buckets", timeout, si=si))

    async def get_buckets_many(
        self, sis: list[bytes], *, timeout: float | None = None
    ) -> list[list[tuple[int, int]]]:
        """What :meth:`get_buckets` answers for each of ``sis``, in one request."""
        reply = await self._send("get_buckets_many", timeout, sis=sis)
        if not isinstance(reply, list) or len(reply) != len(sis):
            raise _fail("get_buckets_many", "expected one list per storage index")
        return [_buckets("get_buckets_many", item) for item in reply]

    async def read(
        self, si: bytes, sharenum: int, offset: int, length: int, *, timeout: float | None = None
    ) -> bytes:
        reply = await self._send(
            "read", timeout, si=si, sharenum=sharenum, offset=offset, length=length
        )
        if not isinstance(reply, bytes) or len(reply) > length:
            raise _fail("read", "expected at most the bytes asked for")
        return reply

    async def report_corrupt(
        self, si: bytes, sharenum: int, verify_cap: str, *, timeout: float | None = None
    ) -> CorruptionVerdict:
        reply = await self._send(
            "report_corrupt", timeout, si=si, sharenum=sharenum, verify_cap=verify_cap
        )
        reply = _map("report_corrupt", reply, quarantined=bool, reason=str)
        return CorruptionVerdict(reply["quarantined"], reply["reason"])

    async def slot_read(
        self, si: bytes, *, timeout: float | None = None
    ) -> tuple[bytes, bytes] | None:
        """The slot's stored (record, signature), or None."""
        reply = await self._send("slot_read", timeout, si=si)
        return None if reply is None else _pair("slot_read", reply)

    async def slot_write(
        self,
        si: bytes,
        record: bytes,
        signature: bytes,
        check: bool,
        expected_seq: int,
        renew_secret: bytes,
        cancel_secret: bytes,
        *,
        timeout: float | None = None,
    ) -> SlotWritten:
        reply = await self._send(
            "slot_write",
            timeout,
            si=si,
            record=record,
            signature=signature,
            check=check,
            expected_seq=expected_seq,
            renew_secret=renew_secret,
            cancel_secret=cancel_secret,
        )
        reply = _map("slot_write", reply, ok=bool)
        if reply["ok"]:
            return SlotWritten(True)
        current = reply.get("current")
        return SlotWritten(False, None if current is None else _pair("slot_write", current))

    async def add_leases(
        self, leases: list[tuple[bytes, bytes, bytes]], *, timeout: float | None = None
    ) -> list[int]:
        """Per storage index: how many things the lease covers (0: none held)."""
        reply = _ints("add_leases", await self._send("add_leases", timeout, leases=leases))
        if len(reply) != len(leases):
            raise _fail("add_leases", "one answer per lease expected")
        return reply

    async def cancel_leases(
        self,
        leases: list[tuple[bytes, bytes]],
        renewed_before: int,
        *,
        timeout: float | None = None,
    ) -> list[str]:
        """Per storage index: "none", "kept", "cancelled" or "deleted"."""
        reply = await self._send(
            "cancel_leases", timeout, leases=leases, renewed_before=renewed_before
        )
        if (
            not isinstance(reply, list)
            or len(reply) != len(leases)
            or not all(x in ("none", "kept", "cancelled", "deleted") for x in reply)
        ):
            raise _fail("cancel_leases", "one known verdict per lease expected")
        return reply


@dataclass(frozen=True)
class PeerPage:
    """One page of the introducer's peer list (docs/protocol.md §9.2)."""

    version: int
    announcements: list[tuple[bytes, bytes]]
    """(announcement, signature) pairs, each still to be verified"""
    next: bytes | None
    """where the next page starts, or None on the last page"""


class IntroducerCalls(_Calls):
    """The introducer's requests (docs/protocol.md §9)."""

    async def announce(
        self, announcement: bytes, signature: bytes, *, timeout: float | None = None
    ) -> None:
        await self._send("announce", timeout, announcement=announcement, signature=signature)

    async def get_peers(
        self, after: int, wait: int, start: bytes, *, timeout: float | None = None
    ) -> PeerPage:
        reply = await self._send("get_peers", timeout, after=after, wait=wait, start=start)
        reply = _map("get_peers", reply, version=int, announcements=list)
        pairs = [_pair("get_peers", item) for item in reply["announcements"]]
        following = reply.get("next")
        if following is not None and (not isinstance(following, bytes) or following <= start):
            raise _fail("get_peers", "next must start after this page")
        return PeerPage(reply["version"], pairs, following)

    async def get_revocations(
        self, after: int, wait: int, *, timeout: float | None = None
    ) -> bytes | None:
        """The signed revocation list if newer than ``after``, else None."""
        reply = await self._send("get_revocations", timeout, after=after, wait=wait)
        blob = _map("get_revocations", reply).get("revocations")
        if blob is not None and not isinstance(blob, bytes):
            raise _fail("get_revocations", "revocations must be bytes or nil")
        return blob
