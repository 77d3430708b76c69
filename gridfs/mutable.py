"""Mutable slots, the pure part: caps, key derivation, signed versions (no I/O).

A *slot* is a small record (at most 64 KiB) that its writer can replace: it
will hold, for instance, the read cap of a directory tree's root.  Each
version is encrypted, numbered and signed, and stored whole on several
servers; readers take the highest valid version.  See docs/formats.md,
"Mutable slots".

===================================  =========================================
``gridfs:ssk:SEED``                  write cap: sign new versions, read them
``gridfs:ssk-ro:READKEY:PUBKEY``     read cap: verify and decrypt versions
``gridfs:ssk-verify:PUBKEY``         verify cap: check versions, cannot read
===================================  =========================================

Everything derives from the 32-byte Ed25519 seed, one way only::

    public key    = Ed25519 public key of SEED
    read key      = H_slot-read-key(SEED)
    write key     = H_slot-write-key(SEED)         (for data only writers may read)
    storage index = H_slot-storage-index(public key)[:16]
    data key      = H_slot-salted-data-key(read key, be64(seq), salt)

Each version carries a fresh random 16-byte salt, so no two versions share a
keystream, not even two writers racing to publish the same seq.  Records of
version 1 (no salt, data key = H_slot-data-key(read key, be64(seq))) are
still read; new versions are always written as record version 2.

Servers can check a version (the storage index pins the public key, which
checks the signature) without being able to read it.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .caps import b32decode, b32encode, quoted_cap
from .crypto import KEY_SIZE, aes_ctr
from .errors import CapError, IntegrityError, UsageError
from .hashes import (
    STORAGE_INDEX_SIZE,
    TAG_SLOT_DATA_KEY,
    TAG_SLOT_READ_KEY,
    TAG_SLOT_SALTED_DATA_KEY,
    TAG_SLOT_SIGNATURE,
    TAG_SLOT_STORAGE_INDEX,
    TAG_SLOT_WRITE_KEY,
    tagged_hash,
)

SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
RECORD_VERSION = 2
"""The record layout written: 2 carries a salt.  Version 1 records are read."""
SALT_SIZE = 16
MAX_SLOT_PAYLOAD = 64 * 1024
"""Most plaintext (and so ciphertext) bytes in one version."""
MAX_SLOT_RECORD = 70_000
"""Most bytes of a packed record: a full payload plus ~60 bytes of framing."""
MAX_SEQ = 2**64 - 1
_RECORD_KEYS = {
    1: ("payload", "public_key", "seq", "version"),
    2: ("payload", "public_key", "salt", "seq", "version"),
}
_BE64 = struct.Struct(">Q")


class BadVersionError(IntegrityError):
    """A slot version failed verification (signature, key, encoding or types)."""


# -- key derivation ---------------------------------------------------------


def public_key_of(seed: bytes) -> bytes:
    """The raw 32-byte Ed25519 public key of a signing seed."""
    return (
        _private_key(seed)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def read_key(seed: bytes) -> bytes:
    """The key that opens every version; derived so a read cap cannot sign."""
    return tagged_hash(TAG_SLOT_READ_KEY, _check_seed(seed))


def write_key(seed: bytes) -> bytes:
    """A 32-byte key only write-cap holders can derive: directories encrypt
    child write caps with it so read-cap holders cannot learn them."""
    return tagged_hash(TAG_SLOT_WRITE_KEY, _check_seed(seed))


def slot_storage_index(public_key: bytes) -> bytes:
    """Where servers file the slot: pins the key that must sign its versions."""
    return tagged_hash(TAG_SLOT_STORAGE_INDEX, public_key)[:STORAGE_INDEX_SIZE]


def data_key(read_key: bytes, seq: int, salt: bytes | None) -> bytes:
    """The AES key of version ``seq`` with its random ``salt``: every version
    has its own, so a fixed zero counter never reuses a keystream, even when
    two writers publish the same seq.  ``salt`` None: a version-1 record,
    whose key depended on the seq alone (read, never written)."""
    if salt is None:
        return tagged_hash(TAG_SLOT_DATA_KEY, read_key, _BE64.pack(seq))
    return tagged_hash(TAG_SLOT_SALTED_DATA_KEY, read_key, _BE64.pack(seq), salt)


def _check_seed(seed: bytes) -> bytes:
    if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
        raise CapError(f"a slot seed is {SEED_SIZE} bytes")
    return seed


def _private_key(seed: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(_check_seed(seed))


# -- caps -------------------------------------------------------------------


@dataclass(frozen=True)
class SlotVerifyCap:
    """Checks a slot's versions (and their seq) without reading them."""

    public_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.public_key, bytes) or len(self.public_key) != PUBLIC_KEY_SIZE:
            raise CapError(f"a slot public key is {PUBLIC_KEY_SIZE} bytes")

    @cached_property
    def storage_index(self) -> bytes:
        return slot_storage_index(self.public_key)

    def verify_cap(self) -> SlotVerifyCap:
        return self

    def to_string(self) -> str:
        return "gridfs:ssk-verify:" + b32encode(self.public_key)


@dataclass(frozen=True)
class SlotReadCap:
    """Reads a slot: verifies each version against the public key, decrypts it."""

    read_key: bytes = field(repr=False)
    public_key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.read_key, bytes) or len(self.read_key) != KEY_SIZE:
            raise CapError(f"a slot read key is {KEY_SIZE} bytes")
        SlotVerifyCap(self.public_key)  # checks the key's size

    @cached_property
    def storage_index(self) -> bytes:
        return slot_storage_index(self.public_key)

    def read_cap(self) -> SlotReadCap:
        return self

    def verify_cap(self) -> SlotVerifyCap:
        return SlotVerifyCap(self.public_key)

    def to_string(self) -> str:
        return f"gridfs:ssk-ro:{b32encode(self.read_key)}:{b32encode(self.public_key)}"


@dataclass(frozen=True)
class SlotWriteCap:
    """Publishes new versions of a slot (and reads them): the signing seed."""

    seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_seed(self.seed)

    @classmethod
    def generate(cls) -> SlotWriteCap:
        """A new slot with a random key."""
        return cls(os.urandom(SEED_SIZE))

    @cached_property
    def public_key(self) -> bytes:
        return public_key_of(self.seed)

    @cached_property
    def storage_index(self) -> bytes:
        return slot_storage_index(self.public_key)

    @property
    def write_key(self) -> bytes:
        return write_key(self.seed)

    def read_cap(self) -> SlotReadCap:
        return SlotReadCap(read_key(self.seed), self.public_key)

    def verify_cap(self) -> SlotVerifyCap:
        return SlotVerifyCap(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return _private_key(self.seed).sign(message)

    def to_string(self) -> str:
        return "gridfs:ssk:" + b32encode(self.seed)


SlotCap = SlotWriteCap | SlotReadCap | SlotVerifyCap
# The names other modules may know them by.
WriteSlotCap = SlotWriteCap
ReadSlotCap = SlotReadCap
VerifySlotCap = SlotVerifyCap

_SSK_RE = re.compile(r"gridfs:ssk:([a-z2-7]+)")
_SSK_RO_RE = re.compile(r"gridfs:ssk-ro:([a-z2-7]+):([a-z2-7]+)")
_SSK_VERIFY_RE = re.compile(r"gridfs:ssk-verify:([a-z2-7]+)")


def parse_slot_cap(text: str) -> SlotCap:
    """Parse a slot cap string; a malformed one raises a one-line :class:`CapError`.

    Like :func:`gridfs.caps.parse`, surrounding whitespace is ignored and
    anything else must be the one canonical spelling."""
    if not isinstance(text, str):
        raise CapError("a cap must be a string")
    stripped = text.strip()
    if m := _SSK_RE.fullmatch(stripped):
        return SlotWriteCap(b32decode(m[1], SEED_SIZE, "slot seed"))
    if m := _SSK_RO_RE.fullmatch(stripped):
        return SlotReadCap(
            b32decode(m[1], KEY_SIZE, "slot read key"),
            b32decode(m[2], PUBLIC_KEY_SIZE, "slot public key"),
        )
    if m := _SSK_VERIFY_RE.fullmatch(stripped):
        return SlotVerifyCap(b32decode(m[1], PUBLIC_KEY_SIZE, "slot public key"))
    raise CapError(f"not a gridfs slot cap: {quoted_cap(text)}")


# -- versions ---------------------------------------------------------------


@dataclass(frozen=True)
class SignedVersion:
    """A version as stored and sent: canonical record bytes and their signature."""

    record: bytes
    signature: bytes

    def to_wire(self) -> list[bytes]:
        return [self.record, self.signature]


@dataclass(frozen=True)
class Version:
    """A verified version: its number, its signer, its salt and its (encrypted)
    payload.  ``salt`` is None for a record of version 1."""

    seq: int
    public_key: bytes
    payload: bytes = field(repr=False)
    salt: bytes | None = None

    @property
    def storage_index(self) -> bytes:
        return slot_storage_index(self.public_key)


def pack_record(seq: int, public_key: bytes, payload: bytes, salt: bytes) -> bytes:
    """The canonical msgpack record (keys in sorted order, shortest encodings)."""
    return msgpack.packb(
        {
            "payload": payload,
            "public_key": public_key,
            "salt": salt,
            "seq": seq,
            "version": RECORD_VERSION,
        },
        use_bin_type=True,
    )


def _pack_record_v1(seq: int, public_key: bytes, payload: bytes) -> bytes:
    """A record of version 1, as written before salts: only to check that one
    read is canonical."""
    return msgpack.packb(
        {"payload": payload, "public_key": public_key, "seq": seq, "version": 1},
        use_bin_type=True,
    )


def signature_message(storage_index: bytes, record: bytes) -> bytes:
    """What is signed: the tag (length-prefixed), the storage index, the record.
    The storage index is fixed-size, so the split is unambiguous."""
    return _BE64.pack(len(TAG_SLOT_SIGNATURE)) + TAG_SLOT_SIGNATURE + storage_index + record


def sign_version(
    write_cap: SlotWriteCap, seq: int, plaintext: bytes, salt: bytes | None = None
) -> SignedVersion:
    """Encrypt ``plaintext`` as version ``seq`` of the slot and sign it.
    ``salt`` is fresh random bytes unless given (test vectors only)."""
    if not isinstance(write_cap, SlotWriteCap):
        raise CapError("signing a slot version needs its write cap (gridfs:ssk:...)")
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise UsageError(f"a slot version number is in 1..2**64-1, not {seq!r}")
    if len(plaintext) > MAX_SLOT_PAYLOAD:
        raise UsageError(f"a slot holds at most {MAX_SLOT_PAYLOAD} bytes, not {len(plaintext)}")
    if salt is None:
        salt = os.urandom(SALT_SIZE)
    elif not isinstance(salt, bytes) or len(salt) != SALT_SIZE:
        raise UsageError(f"a slot salt is {SALT_SIZE} bytes")
    payload = aes_ctr(data_key(read_key(write_cap.seed), seq, salt), 0, plaintext)
    record = pack_record(seq, write_cap.public_key, payload, salt)
    message = signature_message(write_cap.storage_index, record)
    return SignedVersion(record, write_cap.sign(message))


def verify_version(storage_index: bytes, record: bytes, signature: bytes) -> Version:
    """Check a version stored under ``storage_index``; :class:`BadVersionError` if
    the record is not canonical or well typed, its key does not hash to the
    storage index, or the signature does not verify."""
    if not isinstance(storage_index, bytes) or len(storage_index) != STORAGE_INDEX_SIZE:
        raise BadVersionError(f"a storage index is {STORAGE_INDEX_SIZE} bytes")
    if not isinstance(record, bytes) or len(record) > MAX_SLOT_RECORD:
        raise BadVersionError(f"a slot record is at most {MAX_SLOT_RECORD} bytes")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise BadVersionError(f"a slot signature is {SIGNATURE_SIZE} bytes")
    version = _unpack_record(record)
    if slot_storage_index(version.public_key) != storage_index:
        raise BadVersionError("slot record is signed by a key that is not this slot's")
    try:
        Ed25519PublicKey.from_public_bytes(version.public_key).verify(
            signature, signature_message(storage_index, record)
        )
    except (InvalidSignature, ValueError):
        raise BadVersionError("slot record signature is invalid") from None
    return version


def decrypt(cap: SlotReadCap | SlotWriteCap, version: Version) -> bytes:
    """The plaintext of a verified ``version`` of the slot ``cap`` names."""
    if isinstance(cap, SlotWriteCap):
        cap = cap.read_cap()
    if not isinstance(cap, SlotReadCap):
        raise CapError("a verify cap cannot read a slot; a read cap (gridfs:ssk-ro:...) is needed")
    if version.public_key != cap.public_key:
        raise BadVersionError("this version belongs to another slot")
    return aes_ctr(data_key(cap.read_key, version.seq, version.salt), 0, version.payload)


def _unpack_record(record: bytes) -> Version:
    try:
        d: Any = msgpack.unpackb(record, raw=False, strict_map_key=True)
    except Exception as e:
        raise BadVersionError(f"slot record is not msgpack: {type(e).__name__}") from None
    if not isinstance(d, dict) or "version" not in d:
        raise BadVersionError("slot record has the wrong fields")
    number = d["version"]
    if type(number) is not int or number not in _RECORD_KEYS:
        shown = repr(number)[:20]
        raise BadVersionError(f"unknown slot record version {shown} (this gridfs reads 1 and 2)")
    if tuple(d) != _RECORD_KEYS[number]:
        raise BadVersionError(f"slot record of version {number} has the wrong fields")
    payload, public_key, seq = d["payload"], d["public_key"], d["seq"]
    salt = d.get("salt")
    if not isinstance(payload, bytes) or len(payload) > MAX_SLOT_PAYLOAD:
        raise BadVersionError("slot payload must be at most 64 KiB of bytes")
    if not isinstance(public_key, bytes) or len(public_key) != PUBLIC_KEY_SIZE:
        raise BadVersionError("slot public key must be 32 bytes")
    if type(seq) is not int or not 1 <= seq <= MAX_SEQ:
        raise BadVersionError("slot version number must be in 1..2**64-1")
    if number == 1:
        canonical = _pack_record_v1(seq, public_key, payload)
    elif not isinstance(salt, bytes) or len(salt) != SALT_SIZE:
        raise BadVersionError(f"slot salt must be {SALT_SIZE} bytes")
    else:
        canonical = pack_record(seq, public_key, payload, salt)
    if canonical != record:
        raise BadVersionError("slot record is not canonical")
    return Version(seq, public_key, payload, salt)
