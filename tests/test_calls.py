"""The typed protocol clients: in step with the schema, strict about answers,
and working against a real storage server."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import pytest

from gridfs.client.upload import UploadParams
from gridfs.net.calls import BadReplyError, StorageCalls
from gridfs.protocol.schema import REQUESTS
from tests.gridutil import open_broker, open_grid, upload_bytes

STORAGE_METHODS = {
    "stats", "allocate_buckets", "write", "close", "put_share", "abort", "get_buckets",
    "get_buckets_many", "report_corrupt", "read", "slot_read", "slot_write", "add_leases",
    "cancel_leases",
}  # fmt: skip


def test_every_storage_request_has_a_method_with_the_schema_fields() -> None:
    for method in STORAGE_METHODS:
        params = inspect.signature(getattr(StorageCalls, method)).parameters
        fields = [p for p in params if p not in ("self", "timeout")]
        assert set(fields) == set(REQUESTS[method]), method
        assert params["timeout"].kind is inspect.Parameter.KEYWORD_ONLY


class Replies:
    """A caller that answers every request with a canned value."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, method: str, args: dict[str, Any], timeout: float | None) -> Any:
        self.sent.append((method, args))
        return self.reply


SI = b"s" * 16


@pytest.mark.parametrize(
    ("method", "args", "reply"),
    [
        ("stats", {}, {"free": "lots"}),
        ("allocate_buckets", {"si": SI, "sharenums": [1], "share_size": 9,
                              "renew_secret": b"r" * 32, "cancel_secret": b"c" * 32},
         {"already": [], "allocated": [2]}),  # a share that was not asked for
        ("get_buckets", {"si": SI}, [[1, 10, 3]]),
        ("get_buckets", {"si": SI}, [[999, 10]]),
        ("get_buckets_many", {"sis": [SI, SI]}, [[[1, 10]]]),  # one list short
        ("get_buckets_many", {"sis": [SI]}, [[[1, -10]]]),
        ("get_buckets_many", {"sis": [SI]}, {"not": "a list"}),
        ("read", {"si": SI, "sharenum": 0, "offset": 0, "length": 4}, b"12345"),
        ("read", {"si": SI, "sharenum": 0, "offset": 0, "length": 4}, {"not": "bytes"}),
        ("slot_read", {"si": SI}, [b"record"]),
        ("report_corrupt", {"si": SI, "sharenum": 0, "verify_cap": "x"}, {"quarantined": 1}),
        ("add_leases", {"leases": [(SI, b"r" * 32, b"c" * 32)]}, [1, 1]),
        ("cancel_leases", {"leases": [(SI, b"c" * 32)], "renewed_before": 0}, ["maybe"]),
    ],
)  # fmt: skip
async def test_an_answer_of_the_wrong_shape_is_a_bad_reply(
    method: str, args: dict[str, Any], reply: Any
) -> None:
    calls = StorageCalls(Replies(reply))
    with pytest.raises(BadReplyError, match=f"malformed {method} answer"):
        await getattr(calls, method)(**args)


async def test_bad_arguments_are_our_bug_and_are_never_sent() -> None:
    caller = Replies(None)
    calls = StorageCalls(caller)
    with pytest.raises(ValueError, match="get_buckets"):
        await calls.get_buckets(b"short")
    with pytest.raises(ValueError, match="read"):
        await calls.read(SI, 0, 0, 1 << 40)
    with pytest.raises(ValueError, match="get_buckets_many"):
        await calls.get_buckets_many([SI] * 65)
    assert caller.sent == []


async def test_typed_calls_against_real_storage_servers(tmp_path: Path) -> None:
    params = UploadParams(k=1, happy=1, n=1, segment_size=4096)
    async with open_grid(tmp_path, servers=2) as grid, open_broker(grid.addresses) as broker:
        data = os.urandom(10_000)
        report = await upload_bytes(broker, data, tmp_path / "up", params, b"c" * 32)
        si = report.cap.storage_index
        (holder,) = [s for s in broker.servers.values() if s.address == grid.holder(si, 0).address]
        (other,) = [s for s in broker.servers.values() if s is not holder]
        share = (grid.holder(si, 0).share_dir(si) / "0").read_bytes()

        calls = StorageCalls(holder.call)
        assert await calls.get_buckets(si) == [(0, len(share))]
        assert await calls.get_buckets_many([SI, si, SI]) == [[], [(0, len(share))], []]
        assert await StorageCalls(other.call).get_buckets_many([si]) == [[]]
        assert await calls.read(si, 0, 10, 20) == share[10:30]
        allocation = await calls.allocate_buckets(si, [0], len(share), **holder.lease_args(si))
        assert (allocation.already, allocation.allocated) == ([0], [])
        put = await calls.put_share(si, 0, share, **holder.lease_args(si))
        assert (put.stored, put.already) == (False, True)
        renew, cancel = holder.lease_secrets(si)
        assert await calls.add_leases([(si, renew, cancel)]) == [1]
        assert (await calls.stats())["lease_duration"] > 0
        assert await calls.slot_read(si) is None

        calls = StorageCalls(other.call)
        allocation = await calls.allocate_buckets(si, [0], len(share), **other.lease_args(si))
        assert (allocation.already, allocation.allocated) == ([], [0])
        await calls.write(si, 0, [(0, share)])
        await calls.close(si, 0)
        assert await calls.get_buckets(si) == [(0, len(share))]
