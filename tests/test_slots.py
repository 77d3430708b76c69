"""Mutable slots: caps, signed versions, the server's slot store, and reads and
publishes over a real grid, attacked with wrong keys, replays, forged seqs,
stale, corrupt and foreign versions, racing writers and dead servers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import msgpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from gridfs.caps import b32encode
from gridfs.client.broker import StorageBroker
from gridfs.client.slots import (
    SlotConflictError,
    SlotNotFoundError,
    SlotRead,
    SlotUnavailableError,
    create_slot,
    publish_slot,
    read_slot,
)
from gridfs.client.upload import UnhappyError
from gridfs.errors import CapError, GridError, UsageError
from gridfs.mutable import (
    MAX_SLOT_PAYLOAD,
    MAX_SLOT_RECORD,
    BadVersionError,
    SignedVersion,
    SlotReadCap,
    SlotVerifyCap,
    SlotWriteCap,
    decrypt,
    pack_record,
    parse_slot_cap,
    read_key,
    sign_version,
    signature_message,
    verify_version,
    write_key,
)
from gridfs.net.rpc import RemoteError
from gridfs.storage.service import StorageSession
from gridfs.storage.slots import SlotStore, StaleVersionError
from gridfs.storage.store import ShareStore, StoreError

from .gridutil import Grid, StorageNode, open_broker, open_grid

TIMEOUT = 20
SEED = bytes(range(32))
seeds = st.binary(min_size=32, max_size=32)

LEASE = {"renew_secret": b"r" * 32, "cancel_secret": b"c" * 32}


def resign(cap: SlotWriteCap, record: bytes) -> SignedVersion:
    """Sign arbitrary record bytes with the slot's own key: what a buggy or
    malicious writer holding the write cap could send."""
    return SignedVersion(record, cap.sign(signature_message(cap.storage_index, record)))


def edited(record: bytes, **changes: object) -> bytes:
    d = msgpack.unpackb(record, raw=False)
    d.update(changes)
    return msgpack.packb(d, use_bin_type=True)


# -- caps ---------------------------------------------------------------------


@given(seeds)
def test_caps_round_trip_and_derive_one_way(seed: bytes) -> None:
    w = SlotWriteCap(seed)
    r = w.read_cap()
    v = r.verify_cap()
    text = w.to_string()
    assert text.startswith("gridfs:ssk:") and len(text) == len("gridfs:ssk:") + 52
    assert parse_slot_cap(text) == w
    assert parse_slot_cap(f"  {r.to_string()}\n") == r
    assert parse_slot_cap(v.to_string()) == v
    assert w.verify_cap() == v and r.read_cap() == r
    assert w.storage_index == r.storage_index == v.storage_index
    assert len(w.storage_index) == 16 and len(w.public_key) == 32
    assert r.read_key == read_key(seed) and w.write_key == write_key(seed)
    assert len({seed, r.read_key, w.write_key, w.public_key}) == 4
    # Weaker caps carry nothing of the stronger ones.
    assert b32encode(seed) not in r.to_string()
    assert b32encode(r.read_key) not in v.to_string()
    assert b32encode(w.write_key) not in r.to_string() + v.to_string()
    assert "seed" not in repr(w) and b32encode(seed) not in repr(w)


def test_generate_gives_distinct_slots() -> None:
    a, b = SlotWriteCap.generate(), SlotWriteCap.generate()
    assert a != b and a.storage_index != b.storage_index


_W = SlotWriteCap(SEED)
_R = _W.read_cap()
_KEY, _PK = b32encode(_R.read_key), b32encode(_R.public_key)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "gridfs:ssk:",
        "gridfs:ssk:" + b32encode(SEED[:31]),
        "gridfs:ssk:" + b32encode(SEED).upper(),
        "GRIDFS:ssk:" + b32encode(SEED),
        "gridfs:ssk:" + b32encode(SEED) + "====",
        "gridfs:ssk:" + b32encode(SEED)[:-1] + "b",  # non-zero unused bits
        "gridfs:ssk:" + b32encode(SEED) + ":",
        "gridfs:ssk:" + b32encode(SEED) + "\nsecond line",
        f"gridfs:ssk-ro:{_KEY}",
        f"gridfs:ssk-ro:{_KEY}:{_PK}:{_PK}",
        f"gridfs:ssk-ro:{_PK}:{_KEY}x",
        f"gridfs:ssk-verify:{b32encode(_W.storage_index)}",
        f"gridfs:ssk-verify:{_PK}:",
        f"gridfs:chk-verify:{_PK}",
        "gridfs:ssk:" + "a" * 10_000,
    ],
)
def test_malformed_caps_raise_one_line_cap_error(text: str) -> None:
    with pytest.raises(CapError) as info:
        parse_slot_cap(text)
    message = str(info.value)
    assert "\n" not in message and len(message) < 200


def test_non_string_cap_is_a_cap_error() -> None:
    with pytest.raises(CapError):
        parse_slot_cap(b"gridfs:ssk:" + b32encode(SEED).encode())  # type: ignore[arg-type]


@given(st.text(alphabet="gridfs:sk-rovey" + "abcdefghijklmnopqrstuvwxyz234567=\n ", max_size=140))
def test_any_text_parses_canonically_or_is_a_cap_error(text: str) -> None:
    try:
        cap = parse_slot_cap(text)
    except CapError as e:
        assert "\n" not in str(e)
    else:
        assert cap.to_string() == text.strip()


# -- versions -----------------------------------------------------------------


def test_sign_verify_decrypt_with_a_key_per_version() -> None:
    w = SlotWriteCap(SEED)
    signed = sign_version(w, 3, b"root cap")
    version = verify_version(w.storage_index, signed.record, signed.signature)
    assert (version.seq, version.public_key) == (3, w.public_key)
    assert version.payload != b"root cap" and len(version.payload) == len(b"root cap")
    assert decrypt(w.read_cap(), version) == decrypt(w, version) == b"root cap"
    again = sign_version(w, 4, b"root cap")
    assert again.record != signed.record
    assert verify_version(w.storage_index, *again.to_wire()).payload != version.payload
    # The same seq signed twice (two writers racing) has two salts, so two keys.
    twin = verify_version(w.storage_index, *sign_version(w, 3, b"root cap").to_wire())
    assert twin.seq == version.seq and twin.salt != version.salt
    assert twin.payload != version.payload and decrypt(w, twin) == b"root cap"
    assert version.salt is not None and len(version.salt) == 16
    with pytest.raises(CapError):
        decrypt(w.verify_cap(), version)  # type: ignore[arg-type]
    with pytest.raises(BadVersionError):
        decrypt(SlotWriteCap.generate().read_cap(), version)


def test_slot_vector() -> None:
    """The format pinned: these are the values docs/formats.md §12 lists."""
    w = SlotWriteCap(bytes(range(32)))
    assert w.to_string() == "gridfs:ssk:aaaqeayeaudaocajbifqydiob4ibceqtcqkrmfyydenbwha5dypq"
    assert w.read_cap().to_string() == (
        "gridfs:ssk-ro:ymrrezz7ksujr3tddy4jg4skcjlb3547g2zdrmhvrmouhzt6iu5q"
        ":aoqqpp7tzyil4hlq3umoos6atft6jvrqtosq2xy53sdgiesvgg4a"
    )
    assert w.verify_cap().to_string() == (
        "gridfs:ssk-verify:aoqqpp7tzyil4hlq3umoos6atft6jvrqtosq2xy53sdgiesvgg4a"
    )
    assert w.storage_index.hex() == "14534c632806f3b70bfd21b2b7781146"
    assert w.write_key.hex() == "1f8ed5e60dc29059b84e731df8afcf059ccc3f0d2ef7820e0481850a054a3f8b"
    signed = sign_version(w, 1, b"hello", salt=bytes(range(32, 48)))
    assert signed.record.hex() == (
        "85a77061796c6f6164c4058e6eb4c308aa7075626c69635f6b6579c42003a107bff3ce10be1d70dd18e74bc0"
        "9967e4d6309ba50d5f1ddc8664125531b8a473616c74c410202122232425262728292a2b2c2d2e2fa37365"
        "7101a776657273696f6e02"
    )
    assert signed.signature.hex() == (
        "e2769b3f3efdc94389ac422c563d8a4ff993877b067615ba662dceb02c38efcc2c28b6593f50c9759b1282a3"
        "b122f11a803284070432dc5ce41db84afc9e7c00"
    )
    version = verify_version(w.storage_index, *signed.to_wire())
    assert (version.salt, decrypt(w.read_cap(), version)) == (bytes(range(32, 48)), b"hello")


def test_record_version_1_is_still_read() -> None:
    """A version written before salts (record version 1, the vector of the
    previous format) verifies and decrypts; new versions are never written so."""
    w = SlotWriteCap(bytes(range(32)))
    record = bytes.fromhex(
        "84a77061796c6f6164c405d7ce72fae9aa7075626c69635f6b6579c42003a107bff3ce10be1d70dd18e74bc0"
        "9967e4d6309ba50d5f1ddc8664125531b8a373657101a776657273696f6e01"
    )
    signature = bytes.fromhex(
        "c4f20197fc5b3a52f428825d6c797cda53d6da18b544ec9a88527e7d484e517a564cee70938e7005b4b7f58f"
        "19d748979931a1e7742d0c980916368582b55504"
    )
    version = verify_version(w.storage_index, record, signature)
    assert (version.seq, version.salt) == (1, None)
    assert decrypt(w.read_cap(), version) == b"hello"
    assert msgpack.unpackb(sign_version(w, 2, b"x").record)["version"] == 2
    # A version-1 record must keep the version-1 fields: a salt is not allowed in.
    with pytest.raises(BadVersionError, match="version 1 has the wrong fields"):
        verify_version(w.storage_index, *resign(w, edited(record, salt=bytes(16))).to_wire())


def test_largest_payload_fits_and_larger_is_refused() -> None:
    w = SlotWriteCap(SEED)
    signed = sign_version(w, 2**64 - 1, b"x" * MAX_SLOT_PAYLOAD)
    assert len(signed.record) <= MAX_SLOT_RECORD
    assert decrypt(w, verify_version(w.storage_index, *signed.to_wire())) == b"x" * 65536
    with pytest.raises(UsageError):
        sign_version(w, 1, b"x" * (MAX_SLOT_PAYLOAD + 1))
    for seq in (0, -1, 2**64):
        with pytest.raises(UsageError):
            sign_version(w, seq, b"")
    with pytest.raises(CapError):
        sign_version(w.read_cap(), 1, b"")  # type: ignore[arg-type]


def _forged_seq(w: SlotWriteCap, other: SlotWriteCap) -> tuple[bytes, bytes]:
    signed = sign_version(w, 1, b"data")
    return edited(signed.record, seq=99), signed.signature


def _other_key(w: SlotWriteCap, other: SlotWriteCap) -> tuple[bytes, bytes]:
    return sign_version(other, 1, b"data").to_wire()  # type: ignore[return-value]


SALT = bytes(16)


def _other_key_claiming_ours(w: SlotWriteCap, other: SlotWriteCap) -> tuple[bytes, bytes]:
    record = pack_record(1, w.public_key, b"data", SALT)
    return record, other.sign(signature_message(w.storage_index, record))


def _signed_for_another_slot(w: SlotWriteCap, other: SlotWriteCap) -> tuple[bytes, bytes]:
    record = pack_record(1, w.public_key, b"data", SALT)
    return record, w.sign(signature_message(other.storage_index, record))


def _non_minimal_int(w: SlotWriteCap, other: SlotWriteCap) -> tuple[bytes, bytes]:
    record = pack_record(3, w.public_key, b"data", SALT)
    padded = record.replace(b"\xa3seq\x03", b"\xa3seq\xcf" + (3).to_bytes(8, "big"))
    assert padded != record and msgpack.unpackb(padded)["seq"] == 3
    return resign(w, padded).to_wire()  # type: ignore[return-value]


def _reordered_keys(w: SlotWriteCap, other: SlotWriteCap) -> tuple[bytes, bytes]:
    d = {"version": 2, "seq": 1, "salt": SALT, "public_key": w.public_key, "payload": b"data"}
    return resign(w, msgpack.packb(d)).to_wire()  # type: ignore[return-value]


def _resigned(**changes: object):  # type: ignore[no-untyped-def]
    def make(w: SlotWriteCap, other: SlotWriteCap) -> tuple[bytes, bytes]:
        record = edited(sign_version(w, 1, b"data").record, **changes)
        return resign(w, record).to_wire()  # type: ignore[return-value]

    return make


def _trailing_byte(w: SlotWriteCap, other: SlotWriteCap) -> tuple[bytes, bytes]:
    return resign(w, sign_version(w, 1, b"data").record + b"\0").to_wire()  # type: ignore[return-value]


def _short_signature(w: SlotWriteCap, other: SlotWriteCap) -> tuple[bytes, bytes]:
    signed = sign_version(w, 1, b"data")
    return signed.record, signed.signature[:63]


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_forged_seq, "signature is invalid"),
        (_other_key, "not this slot's"),
        (_other_key_claiming_ours, "signature is invalid"),
        (_signed_for_another_slot, "signature is invalid"),
        (_non_minimal_int, "not canonical"),
        (_reordered_keys, "wrong fields"),
        (_resigned(seq="1"), "version number"),
        (_resigned(seq=0), "version number"),
        (_resigned(version=3), "unknown slot record version 3"),
        (_resigned(version=True), "unknown slot record version"),
        (_resigned(version=1), "version 1 has the wrong fields"),
        (_resigned(salt=b"s" * 15), "salt must be 16 bytes"),
        (_resigned(salt="s" * 16), "salt must be 16 bytes"),
        (_resigned(public_key=b"k" * 31), "public key"),
        (_resigned(payload="text"), "payload"),
        (_resigned(extra=1), "wrong fields"),
        (_trailing_byte, "not msgpack"),
        (_short_signature, "64 bytes"),
    ],
)
def test_verify_rejects_tampered_versions(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    w, other = SlotWriteCap(SEED), SlotWriteCap(bytes(32))
    record, signature = make(w, other)
    with pytest.raises(BadVersionError, match=reason):
        verify_version(w.storage_index, record, signature)


# -- the server's store ---------------------------------------------------------


def test_store_persists_and_refuses_replays(tmp_path: Path) -> None:
    w = SlotWriteCap(SEED)
    si = w.storage_index
    v1, v2 = sign_version(w, 1, b"one"), sign_version(w, 2, b"two")
    store = SlotStore(tmp_path)
    assert store.read(si) is None
    store.write(si, *v1.to_wire())
    store.write(si, *v2.to_wire())
    reopened = SlotStore(tmp_path)
    assert reopened.read(si) == (v2.record, v2.signature)
    fork = sign_version(w, 2, b"another two")
    for stale in (v1, fork):
        with pytest.raises(StaleVersionError) as info:
            reopened.write(si, *stale.to_wire())
        assert info.value.code == "stale-version"
        assert info.value.current == (v2.record, v2.signature)
    reopened.write(si, *v2.to_wire(), expected_seq=7)  # the same version again: a no-op
    assert SlotStore(tmp_path).read(si) == (v2.record, v2.signature)


def test_store_test_and_set(tmp_path: Path) -> None:
    w = SlotWriteCap(SEED)
    si = w.storage_index
    store = SlotStore(tmp_path)
    with pytest.raises(StaleVersionError) as info:
        store.write(si, *sign_version(w, 1, b"").to_wire(), expected_seq=1)
    assert info.value.current is None
    store.write(si, *sign_version(w, 1, b"a").to_wire(), expected_seq=0)
    with pytest.raises(StaleVersionError):
        store.write(si, *sign_version(w, 2, b"b").to_wire(), expected_seq=0)
    with pytest.raises(StaleVersionError):
        store.write(si, *sign_version(w, 5, b"b").to_wire(), expected_seq=4)
    store.write(si, *sign_version(w, 5, b"c").to_wire(), expected_seq=1)
    stored = store.read(si)
    assert stored is not None and verify_version(si, *stored).seq == 5


def test_store_refuses_bad_versions(tmp_path: Path) -> None:
    w, other = SlotWriteCap(SEED), SlotWriteCap(bytes(32))
    store = SlotStore(tmp_path)
    record, signature = sign_version(other, 1, b"x").to_wire()
    with pytest.raises(BadVersionError):
        store.write(w.storage_index, record, signature)
    with pytest.raises(BadVersionError):
        store.write(w.storage_index, *_forged_seq(w, other))
    assert store.read(w.storage_index) is None
    assert list((tmp_path / "slots").rglob("*")) == []


def test_store_writes_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = SlotWriteCap(SEED)
    si = w.storage_index
    store = SlotStore(tmp_path)
    for seq in range(1, 6):
        store.write(si, *sign_version(w, seq, b"v%d" % seq).to_wire())
    files = [p for p in (tmp_path / "slots").rglob("*") if p.is_file()]
    assert files == [store.path(si)]

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(StoreError):
        store.write(si, *sign_version(w, 6, b"v6").to_wire())
    monkeypatch.undo()
    assert [p for p in (tmp_path / "slots").rglob("*") if p.is_file()] == [store.path(si)]
    stored = store.read(si)
    assert stored is not None and verify_version(si, *stored).seq == 5

    # A temporary file a crash left behind is swept when the store opens.
    leftover = store.path(si).parent / f".{store.path(si).name}.crash.tmp"
    leftover.write_bytes(b"partial")
    SlotStore(tmp_path)
    assert not leftover.exists() and store.path(si).exists()


def test_store_replaces_an_unreadable_version(tmp_path: Path) -> None:
    w = SlotWriteCap(SEED)
    si = w.storage_index
    store = SlotStore(tmp_path)
    store.write(si, *sign_version(w, 4, b"four").to_wire())
    store.path(si).write_bytes(b"\xc1 not msgpack")
    assert store.read(si) is None
    store.write(si, *sign_version(w, 1, b"one").to_wire(), expected_seq=0)
    stored = store.read(si)
    assert stored is not None and verify_version(si, *stored).seq == 1


async def test_session_without_slots_says_so_and_with_slots_answers(tmp_path: Path) -> None:
    w = SlotWriteCap(SEED)
    si = w.storage_index
    bare = StorageSession(ShareStore(tmp_path / "a"), 60.0)
    with pytest.raises(GridError) as info:
        await bare.handle("slot_read", {"si": si})
    assert getattr(info.value, "code", None) == "slots-unsupported"
    session = StorageSession(ShareStore(tmp_path / "b"), 60.0, SlotStore(tmp_path / "b"))
    assert await session.handle("slot_read", {"si": si}) is None
    v1 = sign_version(w, 1, b"one")
    args = {"si": si, "record": v1.record, "signature": v1.signature}
    write = {**args, "check": True, "expected_seq": 0, **LEASE}
    assert await session.handle("slot_write", write) == {"ok": True}
    assert await session.handle("slot_read", {"si": si}) == v1.to_wire()
    fork = sign_version(w, 1, b"fork")
    reply = await session.handle(
        "slot_write", {**write, "signature": fork.signature, "record": fork.record}
    )
    assert reply == {"ok": False, "current": v1.to_wire()}
    with pytest.raises(GridError) as info:
        await session.handle("slot_write", {**write, "record": edited(v1.record, seq=2)})
    assert getattr(info.value, "code", None) == "bad-signature"


# -- over the grid --------------------------------------------------------------


def held(node: StorageNode, si: bytes) -> int:
    """The seq of the valid version a server holds on disk: 0 none, -1 a bad one."""
    stored = SlotStore(node.dir.storage_path).read(si)
    if stored is None:
        return 0
    try:
        return verify_version(si, *stored).seq
    except BadVersionError:
        return -1


def holdings(grid: Grid, si: bytes) -> list[int]:
    return [held(node, si) for node in grid.nodes]


def permuted_nodes(grid: Grid, broker: StorageBroker, si: bytes) -> list[StorageNode]:
    by_id = {node.address.node_id: node for node in grid.nodes if node.address}
    return [by_id[server.node_id] for server in broker.permuted(si)]


def node_id(node: StorageNode) -> bytes:
    assert node.address is not None
    return node.address.node_id


async def raw_write(
    broker: StorageBroker, node: StorageNode, si: bytes, record: bytes, signature: bytes
) -> object:
    server = broker.servers[node_id(node)]
    args = {"si": si, "record": record, "signature": signature, "check": False, "expected_seq": 0}
    return await server.call("slot_write", {**args, **server.lease_args(si)})


async def test_round_trip_with_each_cap(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path) as grid, open_broker(grid.addresses) as broker:
            w = await create_slot(broker, b"gridfs:chk:root")
            assert holdings(grid, w.storage_index) == [1] * 10
            first = await read_slot(broker, w.read_cap())
            assert (first.seq, first.plaintext, first.problems) == (1, b"gridfs:chk:root", ())
            assert first.servers == {1: frozenset(map(node_id, grid.nodes))}
            assert first.repaired == frozenset()
            assert await publish_slot(broker, w, b"second", first) == 2
            assert (await read_slot(broker, w)).plaintext == b"second"
            seen = await read_slot(broker, parse_slot_cap(w.verify_cap().to_string()))
            assert (seen.seq, seen.plaintext) == (2, None)
            assert holdings(grid, w.storage_index) == [2] * 10
            # Without expectation, publishing follows the newest version; the
            # largest payload fits the wire limits.
            big = os.urandom(MAX_SLOT_PAYLOAD)
            assert await publish_slot(broker, w, big) == 3
            assert (await read_slot(broker, w.read_cap())).plaintext == big
            # A read cap or verify cap has no way to publish.
            for weaker in (w.read_cap(), w.verify_cap()):
                with pytest.raises(CapError):
                    await publish_slot(broker, weaker, b"evil")  # type: ignore[arg-type]
            assert holdings(grid, w.storage_index) == [3] * 10


async def test_missing_slot_and_no_servers(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path, servers=3) as grid:
            async with open_broker(grid.addresses) as broker:
                with pytest.raises(SlotNotFoundError):
                    await read_slot(broker, SlotWriteCap.generate().verify_cap())
                # Publishing never turns "no version found" into "version 0":
                # a new slot is made by create_slot, which never overwrites one.
                w = SlotWriteCap.generate()
                with pytest.raises(SlotNotFoundError):
                    await publish_slot(broker, w, b"over nothing", n=3, happy=3)
                assert holdings(grid, w.storage_index) == [0, 0, 0]
                assert await create_slot(broker, b"one", n=3, happy=3, cap=w) == w
                with pytest.raises(SlotConflictError):
                    await create_slot(broker, b"again", n=3, happy=3, cap=w)
                assert (await read_slot(broker, w, n=3)).plaintext == b"one"
            for node in grid.nodes:
                await node.kill()
            async with open_broker(grid.addresses) as broker:
                with pytest.raises(SlotUnavailableError):
                    await read_slot(broker, SlotWriteCap.generate())


async def test_servers_refuse_wrong_keys_forgeries_and_replays(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path, servers=3) as grid, open_broker(grid.addresses) as broker:
            w, other = SlotWriteCap.generate(), SlotWriteCap.generate()
            si = w.storage_index
            v1 = sign_version(w, 1, b"one")
            assert await create_slot(broker, b"one", n=3, happy=3, cap=w) == w
            v2 = sign_version(w, 2, b"two")
            node = grid.nodes[0]
            assert await raw_write(broker, node, si, *v2.to_wire()) == {"ok": True}
            attacks = [
                sign_version(other, 3, b"evil").to_wire(),  # another key, this slot
                _other_key_claiming_ours(w, other),
                _forged_seq(w, other),  # seq edited, not re-signed
            ]
            for record, signature in attacks:
                with pytest.raises(RemoteError) as info:
                    await raw_write(broker, node, si, record, signature)
                assert info.value.code == "bad-signature"
            # A replay of an old version is refused, and the answer shows the current one.
            reply = await raw_write(broker, node, si, *v1.to_wire())
            assert reply == {"ok": False, "current": v2.to_wire()}
            assert await raw_write(broker, node, si, *v2.to_wire()) == {"ok": True}
            with pytest.raises(RemoteError) as info:
                args = {"si": si, "record": v2.record, "signature": v2.signature}
                await broker.servers[node_id(node)].call(
                    "slot_write", {**args, "check": 1, "expected_seq": 0, **LEASE}
                )
            assert info.value.code == "bad-request"
            assert held(node, si) == 2
            # The one server that took version 2 wins the read; the others catch up.
            read = await read_slot(broker, w.read_cap(), n=3)
            assert (read.seq, read.plaintext) == (2, b"two")
            assert read.repaired == frozenset(map(node_id, grid.nodes[1:]))
            assert holdings(grid, si) == [2, 2, 2]


async def test_stale_server_is_read_past_and_brought_up_to_date(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path) as grid:
            async with open_broker(grid.addresses) as broker:
                w = await create_slot(broker, b"old")
                si = w.storage_index
                first = permuted_nodes(grid, broker, si)[0]
                await first.kill()
                assert await publish_slot(broker, w, b"new", await read_slot(broker, w)) == 2
            await first.start()
            assert held(first, si) == 1
            async with open_broker(grid.addresses) as broker:
                read = await read_slot(broker, w.read_cap())
                assert (read.seq, read.plaintext) == (2, b"new")
                assert read.servers[1] == {node_id(first)}
                assert read.repaired == {node_id(first)}
                assert holdings(grid, si) == [2] * 10


async def test_corrupt_and_foreign_versions_are_ignored_reported_and_replaced(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path) as grid, open_broker(grid.addresses) as broker:
            w = await create_slot(broker, b"one")
            assert await publish_slot(broker, w, b"two") == 2
            foreign = await create_slot(broker, b"someone else's")
            si = w.storage_index
            flipped, forged, swapped, garbage = grid.nodes[:4]

            def path(node: StorageNode, slot: SlotWriteCap = w) -> Path:
                return SlotStore(node.dir.storage_path).path(slot.storage_index)

            record, signature = msgpack.unpackb(path(flipped).read_bytes())
            bad = bytearray(record)
            bad[record.index(b"\xc4\x03") + 2] ^= 1  # the first payload byte
            path(flipped).write_bytes(msgpack.packb([bytes(bad), signature]))
            # A server claiming a higher seq it cannot sign must not win the read.
            path(forged).write_bytes(msgpack.packb([edited(record, seq=99), signature]))
            shutil.copyfile(path(swapped, foreign), path(swapped))
            path(garbage).write_bytes(b"\x93not a version")

            read = await read_slot(broker, w.read_cap())
            assert (read.seq, read.plaintext) == (2, b"two")
            assert 99 not in read.servers
            for liar in (flipped, forged, swapped):
                (problem,) = [p for p in read.problems if liar.where in p]
                assert "bad slot version" in problem
            assert not any(garbage.where in p for p in read.problems)
            assert read.servers[0] == {node_id(n) for n in (flipped, forged, swapped, garbage)}
            assert read.repaired == read.servers[0]
            assert holdings(grid, si) == [2] * 10
            assert held(swapped, foreign.storage_index) == 1


async def test_test_and_set_one_writer_wins_the_other_rereads(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path) as grid, open_broker(grid.addresses) as broker:
            w = await create_slot(broker, b"base")
            seen = await read_slot(broker, w)
            assert await publish_slot(broker, w, b"alice", seen) == 2
            with pytest.raises(SlotConflictError) as info:
                await publish_slot(broker, w, b"bob", seen)
            assert info.value.seq == 2
            after = await read_slot(broker, w)
            assert (after.seq, after.plaintext) == (2, b"alice")
            assert holdings(grid, w.storage_index) == [2] * 10
            assert await publish_slot(broker, w, after.plaintext + b"+bob", after) == 3
            final = await read_slot(broker, w.read_cap())
            assert (final.seq, final.plaintext) == (3, b"alice+bob")
            # An expectation from another slot is a usage error, not a silent write.
            other = await read_slot(broker, await create_slot(broker, b"x"))
            with pytest.raises(UsageError):
                await publish_slot(broker, w, b"y", other)


async def test_racing_writers_never_both_succeed(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path) as grid, open_broker(grid.addresses) as broker:
            w = await create_slot(broker, b"base")
            seen = await read_slot(broker, w)
            outcomes: dict[bytes, object] = {}

            async def write(text: bytes) -> None:
                try:
                    outcomes[text] = await publish_slot(broker, w, text, seen)
                except SlotConflictError as e:
                    outcomes[text] = e

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write, b"alice")
                nursery.start_soon(write, b"bob")
            wins = [text for text, result in outcomes.items() if result == 2]
            assert len(wins) <= 1
            assert all(
                isinstance(r, SlotConflictError) for t, r in outcomes.items() if t not in wins
            )
            assert set(holdings(grid, w.storage_index)) == {2}
            after = await read_slot(broker, w)
            assert after.seq == 2 and after.plaintext in (b"alice", b"bob")
            if wins:
                assert after.plaintext == wins[0]
            assert await publish_slot(broker, w, b"settled", after) == 3
            assert (await read_slot(broker, w)).plaintext == b"settled"
            assert holdings(grid, w.storage_index) == [3] * 10


async def test_partial_publish_is_completed_by_a_read(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path) as grid:
            down = grid.nodes[:3]
            for node in down:
                await node.kill()
            async with open_broker(grid.addresses) as broker:
                w = await create_slot(broker, b"while three were down")
            si = w.storage_index
            assert holdings(grid, si) == [0, 0, 0] + [1] * 7
            for node in down:
                await node.start()
            async with open_broker(grid.addresses) as broker:
                read = await read_slot(broker, w.read_cap())
            assert read.plaintext == b"while three were down"
            assert read.servers == {
                0: set(map(node_id, down)),
                1: set(map(node_id, grid.nodes[3:])),
            }
            assert read.repaired == set(map(node_id, down))
            assert holdings(grid, si) == [1] * 10


async def test_too_few_servers_is_unhappy(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with open_grid(tmp_path) as grid:
            w = SlotWriteCap.generate()
            async with open_broker(grid.addresses) as broker:
                assert await create_slot(broker, b"v1", cap=w) == w
            for node in grid.nodes[:4]:
                await node.kill()
            async with open_broker(grid.addresses) as broker:
                with pytest.raises(UnhappyError, match="reached 6 servers, 7 needed"):
                    await publish_slot(broker, w, b"v2", await read_slot(broker, w))
                with pytest.raises(UnhappyError):
                    await create_slot(broker, b"new", happy=7)
                # The refused version still sits on the servers it reached, so the
                # next publish (happy lowered to what is reachable) follows it.
                assert await publish_slot(broker, w, b"v3", happy=6) == 3
            assert holdings(grid, w.storage_index) == [1] * 4 + [3] * 6


def test_slot_read_is_frozen() -> None:
    read = SlotRead(b"s" * 16, 1, None, SignedVersion(b"", b""), {})
    with pytest.raises(AttributeError):
        read.seq = 2  # type: ignore[misc]
    assert isinstance(SlotReadCap(b"k" * 32, b"p" * 32).verify_cap(), SlotVerifyCap)
