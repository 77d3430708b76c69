"""Signed server announcements: what the introducer passes from servers to clients.

An announcement is canonical msgpack; its Ed25519 signature (over a tag and
the bytes) is checked against the public key inside it, and that key must
hash to the announced node id, so an introducer can relay but not forge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import FormatError
from .hashes import node_id
from .net.identity import NodeAddress, NodeKey

SIGNATURE_TAG = b"gridfs:v1:announcement\0"


@dataclass(frozen=True)
class Announcement:
    address: NodeAddress
    public_key: bytes
    nickname: str
    capacity: dict[str, int]
    seq: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "address": str(self.address),
            "capacity": self.capacity,
            "nickname": self.nickname,
            "public_key": self.public_key,
            "seq": self.seq,
            "version": 1,
        }

    def sign(self, key: NodeKey) -> tuple[bytes, bytes]:
        data = msgpack.packb(self.to_wire())
        return data, key.sign(SIGNATURE_TAG + data)

    @classmethod
    def verify(cls, data: bytes, signature: bytes) -> Announcement:
        """Parse and check a signed announcement, or raise FormatError."""
        try:
            d = msgpack.unpackb(data, raw=False)
            ann = cls(
                NodeAddress.parse(d["address"]),
                d["public_key"],
                str(d["nickname"])[:64],
                {str(k): int(v) for k, v in dict(d["capacity"]).items()},
                int(d["seq"]),
            )
            Ed25519PublicKey.from_public_bytes(ann.public_key).verify(
                signature, SIGNATURE_TAG + data
            )
        except InvalidSignature:
            raise FormatError("announcement signature is invalid") from None
        except Exception as e:
            raise FormatError(f"malformed announcement: {type(e).__name__}") from None
        if node_id(ann.public_key) != ann.address.node_id:
            raise FormatError("announcement key does not match its node id")
        return ann
