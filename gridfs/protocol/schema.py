"""The messages of the wire protocol and their limits, checked on arrival.

Every request method names the fields it accepts, each with a type and a
bound; anything else is refused before the application sees it.  See
docs/protocol.md for the meaning of each method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..hashes import NODE_ID_SIZE, STORAGE_INDEX_SIZE
from ..mutable import MAX_SLOT_RECORD, SIGNATURE_SIZE  # MAX_SLOT_RECORD: most bytes of a record
from .frames import Blob

PROTOCOL_NAME = "gridfs"
PROTOCOL_VERSION = 1

MAX_FRAME = 4 * 1024 * 1024 + 64 * 1024
"""Largest frame body either side accepts: a 4 MiB read or write plus headers."""
MAX_WRITE = 4 * 1024 * 1024
"""Most data bytes in one ``write`` request (all chunks together)."""
MAX_READ = 4 * 1024 * 1024
MAX_CHUNKS = 4096
MAX_BUCKETS = 256
"""Most share numbers in one allocation: the seed's MAX_BUCKETS (n ≤ 256)."""
MAX_OPEN_BUCKETS = 1024
"""Most buckets one connection may hold open at once."""
MAX_PUT_SHARES = 64
"""Most shares in one ``put_shares`` request (their data: MAX_WRITE in all)."""
MAX_LEASES = 1024
"""Most storage indexes in one add_leases or cancel_leases request."""
MAX_LOOKUPS = 64
"""Most storage indexes in one get_buckets_many request (its answer, at most
256 shares of each, stays within the objects a frame may decode to)."""
LEASE_SECRET_SIZE = 32
MAX_ANNOUNCEMENT = 4096
MAX_U64 = 2**64 - 1


class SchemaError(ValueError):
    """A request's arguments do not match its method's schema."""


Check = Callable[[Any], Any]
"""A field check; lists may also be tuples, as a sender builds them (msgpack
sends both as arrays)."""


def u64(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_U64:
        raise SchemaError("expected an unsigned 64-bit integer")
    return v


def boolean(v: Any) -> bool:
    if type(v) is not bool:
        raise SchemaError("expected true or false")
    return v


def sharenum(v: Any) -> int:
    if type(v) is not int or not 0 <= v < MAX_BUCKETS:
        raise SchemaError("share number out of range")
    return v


def binary(exact: int | None = None, most: int = MAX_FRAME) -> Check:
    def check(v: Any) -> bytes | Blob:
        if not isinstance(v, bytes | Blob):  # (a Blob: being sent, in parts)
            raise SchemaError("expected bytes")
        if (exact is not None and len(v) != exact) or len(v) > most:
            raise SchemaError(f"bytes of wrong length {len(v)}")
        return v

    return check


def text(most: int) -> Check:
    def check(v: Any) -> str:
        if not isinstance(v, str) or len(v) > most:
            raise SchemaError("expected a short string")
        return v

    return check


def list_of(item: Check, most: int) -> Check:
    def check(v: Any) -> list[Any]:
        if not isinstance(v, list | tuple) or len(v) > most:
            raise SchemaError(f"expected a list of at most {most} items")
        return [item(x) for x in v]

    return check


def sharenums(v: Any) -> list[int]:
    nums = list_of(sharenum, MAX_BUCKETS)(v)
    if len(set(nums)) != len(nums):
        raise SchemaError("repeated share number")
    return nums


def chunks(v: Any) -> list[tuple[int, bytes]]:
    if not isinstance(v, list | tuple) or not 0 < len(v) <= MAX_CHUNKS:
        raise SchemaError(f"expected 1 to {MAX_CHUNKS} chunks")
    out, total = [], 0
    for c in v:
        if not isinstance(c, list | tuple) or len(c) != 2:
            raise SchemaError("a chunk is [offset, data]")
        offset, data = u64(c[0]), binary()(c[1])
        total += len(data)
        out.append((offset, data))
    if total > MAX_WRITE:
        raise SchemaError(f"a write carries at most {MAX_WRITE} bytes")
    return out


def read_length(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_READ:
        raise SchemaError(f"a read is at most {MAX_READ} bytes")
    return v


SI = binary(STORAGE_INDEX_SIZE)
SECRET = binary(LEASE_SECRET_SIZE)


def tuple_of(*items: Check) -> Check:
    def check(v: Any) -> tuple[Any, ...]:
        if not isinstance(v, list | tuple) or len(v) != len(items):
            raise SchemaError(f"expected a list of {len(items)} items")
        return tuple(c(x) for c, x in zip(items, v, strict=True))

    return check


LEASE_ARGS = {"renew_secret": SECRET, "cancel_secret": SECRET}
_SHARE_PUT = tuple_of(SI, sharenum, binary(most=MAX_WRITE), SECRET, SECRET)


def share_puts(v: Any) -> list[tuple[bytes, int, bytes, bytes, bytes]]:
    """``put_shares``' items: [si, sharenum, data, renew_secret,
    cancel_secret], each share once, MAX_WRITE data bytes in all."""
    items = list_of(_SHARE_PUT, MAX_PUT_SHARES)(v)
    if not items:
        raise SchemaError("put_shares: no shares")
    if len({(si, num) for si, num, *_ in items}) != len(items):
        raise SchemaError("put_shares: a share twice")
    if sum(len(data) for _, _, data, _, _ in items) > MAX_WRITE:
        raise SchemaError(f"put_shares carries at most {MAX_WRITE} bytes")
    return items


REQUESTS: dict[str, dict[str, Check]] = {
    "hello": {"protocol": text(64), "versions": list_of(u64, 16)},
    # storage server
    "stats": {},
    "allocate_buckets": {"si": SI, "sharenums": sharenums, "share_size": u64, **LEASE_ARGS},
    "write": {"si": SI, "sharenum": sharenum, "chunks": chunks},
    "close": {"si": SI, "sharenum": sharenum},
    "put_share": {"si": SI, "sharenum": sharenum, "data": binary(most=MAX_WRITE), **LEASE_ARGS},
    "put_shares": {"shares": share_puts},
    "abort": {"si": SI, "sharenum": sharenum},
    "get_buckets": {"si": SI},
    "get_buckets_many": {"sis": list_of(SI, MAX_LOOKUPS)},
    "report_corrupt": {"si": SI, "sharenum": sharenum, "verify_cap": text(400)},
    "read": {"si": SI, "sharenum": sharenum, "offset": u64, "length": read_length},
    "slot_read": {"si": SI},
    "slot_write": {
        "si": SI,
        "record": binary(most=MAX_SLOT_RECORD),
        "signature": binary(SIGNATURE_SIZE),
        "check": boolean,
        "expected_seq": u64,
        **LEASE_ARGS,
    },
    "add_leases": {"leases": list_of(tuple_of(SI, SECRET, SECRET), MAX_LEASES)},
    "cancel_leases": {
        "leases": list_of(tuple_of(SI, SECRET), MAX_LEASES),
        "renewed_before": u64,
    },
    # introducer
    "announce": {"announcement": binary(most=MAX_ANNOUNCEMENT), "signature": binary(64)},
    "get_peers": {"after": u64, "wait": u64, "start": binary(most=NODE_ID_SIZE)},
    "get_revocations": {"after": u64, "wait": u64},
    # a mount's control socket (local, Unix domain)
    "ctl_status": {},
    "ctl_flush": {},
    "ctl_memory": {},
    "ctl_upload": {"path": text(4096)},
    "ctl_download": {"cap": text(4096), "path": text(4096)},
}


def validate_request(method: str, args: Any) -> dict[str, Any]:
    """Checked arguments of a request, or :class:`SchemaError`."""
    spec = REQUESTS.get(method)
    if spec is None:
        raise SchemaError(f"unknown method {method[:40]!r}")
    if not isinstance(args, dict):
        raise SchemaError("arguments must be a map")
    extra = set(args) - set(spec)
    missing = set(spec) - set(args)
    if extra or missing:
        raise SchemaError(f"{method}: unexpected or missing fields")
    return {name: check(args[name]) for name, check in spec.items()}
