"""An in-memory Store for tree tests: same contract as the grid, no network."""

from __future__ import annotations

import hashlib

from gridfs.caps import LITERAL_MAX, LiteralCap, ReadCap, SliceCap, parse
from gridfs.mutable import SlotReadCap, SlotWriteCap
from gridfs.pack import open_slice
from gridfs.tree import SlotConflictError


class MemStore:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.seq = 0
        self.payload = b""
        self.puts = 0
        self.publishes = 0
        self.slots: dict[bytes, tuple[int, bytes]] = {}
        """Shared directories' slots, by storage index."""
        self.write_key: bytes | None = b"w" * 32

    async def put_bytes(self, data: bytes) -> str:
        if len(data) <= LITERAL_MAX:
            return LiteralCap(data).to_string()
        self.puts += 1
        # A well-formed read cap (key and hash made up from the content).
        key, ueb = hashlib.sha256(data).digest(), hashlib.sha256(b"ueb" + data).digest()
        cap = ReadCap(key, ueb, 3, 10, len(data)).to_string()
        self.blobs[cap] = data
        return cap

    async def get_bytes(self, cap: str) -> bytes:
        parsed = parse(cap)
        if isinstance(parsed, LiteralCap):
            return parsed.data
        if isinstance(parsed, SliceCap):
            pack = self.blobs[parsed.pack.to_string()]
            return open_slice(parsed, 0, pack[parsed.offset : parsed.offset + parsed.length])
        return self.blobs[cap]

    async def read_root(self) -> tuple[int, bytes]:
        return self.seq, self.payload

    async def publish_root(self, payload: bytes, expected_seq: int) -> int:
        if expected_seq != self.seq:
            raise SlotConflictError(f"slot is at {self.seq}, not {expected_seq}")
        self.publishes += 1
        self.seq += 1
        self.payload = payload
        return self.seq

    @property
    def root_write_key(self) -> bytes | None:
        return self.write_key

    async def read_dir_slot(self, cap: SlotReadCap) -> tuple[int, bytes]:
        return self.slots[cap.storage_index]

    async def publish_dir_slot(self, cap: SlotWriteCap, payload: bytes, expected_seq: int) -> int:
        seq, _ = self.slots.get(cap.storage_index, (0, b""))
        if expected_seq != seq:
            raise SlotConflictError(f"slot is at {seq}, not {expected_seq}")
        self.publishes += 1
        self.slots[cap.storage_index] = (seq + 1, payload)
        return seq + 1
