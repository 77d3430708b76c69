"""The immutable share format, version 1 (see docs/formats.md).

A share is one file of bytes, all integers big-endian and 64-bit where they
measure data::

    header   fixed HEADER.size bytes: magic, version, share number, k, n,
             storage index, file size, segment size, extension block length,
             a reserved word that must be zero
    UEB      the extension block (canonical msgpack), whose hash is in the cap
    chain    the share hash chain: depth(n) hashes proving this share's block
             tree root against the share root in the UEB
    records  one per segment j: block proof (depth(S) hashes), ciphertext proof
             (depth(S) hashes), then block j of this share

Everything up to the records is one read; each record is one read that yields
a block together with the hashes that verify it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

from .codec import CodecParams, round_up
from .errors import FormatError
from .hashes import HASH_SIZE
from .hashtree import depth

MAGIC = b"GRIDSHR\n"
VERSION = 1
HEADER = struct.Struct(">8sHHHH16sQQII")
UEB_VERSION = 1
_UEB_KEYS = ("ciphertext_root", "codec", "num_segments", "share_root", "size", "version")


@dataclass(frozen=True)
class ExtensionBlock:
    """The URI extension block: what a reader must trust about the file, pinned
    by its hash in the cap."""

    params: CodecParams
    size: int
    ciphertext_root: bytes
    share_root: bytes

    @property
    def num_segments(self) -> int:
        return -(-self.size // self.params.segment_size)

    def pack(self) -> bytes:
        return msgpack.packb(
            {
                "ciphertext_root": self.ciphertext_root,
                "codec": self.params.serialize(),
                "num_segments": self.num_segments,
                "share_root": self.share_root,
                "size": self.size,
                "version": UEB_VERSION,
            }
        )

    @classmethod
    def unpack(cls, data: bytes) -> ExtensionBlock:
        try:
            d = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as e:
            raise FormatError(f"extension block is not msgpack: {e}") from None
        if not isinstance(d, dict) or tuple(d) != _UEB_KEYS:
            raise FormatError("extension block has the wrong fields")
        if d["version"] != UEB_VERSION:
            raise FormatError(f"unknown extension block version {d['version']!r}")
        try:
            ueb = cls(
                CodecParams.parse(d["codec"]),
                d["size"],
                d["ciphertext_root"],
                d["share_root"],
            )
        except (TypeError, ValueError) as e:
            raise FormatError(f"bad extension block: {e}") from None
        if type(ueb.size) is not int or ueb.size < 1:
            raise FormatError("bad extension block: size")
        for root in (ueb.ciphertext_root, ueb.share_root):
            if not isinstance(root, bytes) or len(root) != HASH_SIZE:
                raise FormatError("bad extension block: root hash")
        if d["num_segments"] != ueb.num_segments or ueb.pack() != data:
            raise FormatError("extension block is not canonical")
        return ueb

    @staticmethod
    def packed_length(params: CodecParams, size: int) -> int:
        zero = b"\0" * HASH_SIZE
        return len(ExtensionBlock(params, size, zero, zero).pack())


@dataclass(frozen=True)
class Geometry:
    """Sizes and offsets of every share of one file: pure arithmetic on
    (params, size), the same for every share."""

    params: CodecParams
    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise FormatError("an immutable share holds at least one byte")

    @property
    def num_segments(self) -> int:
        return -(-self.size // self.params.segment_size)

    @property
    def tail_segment_size(self) -> int:
        return self.size - (self.num_segments - 1) * self.params.segment_size

    def segment_size(self, j: int) -> int:
        self._check_segment(j)
        return self.tail_segment_size if j == self.num_segments - 1 else self.params.segment_size

    def block_size(self, j: int) -> int:
        return round_up(self.segment_size(j), self.params.k) // self.params.k

    @property
    def proof_size(self) -> int:
        """Bytes of one record's two proofs (block tree, then ciphertext tree)."""
        return 2 * depth(self.num_segments) * HASH_SIZE

    @property
    def ueb_length(self) -> int:
        return ExtensionBlock.packed_length(self.params, self.size)

    @property
    def ueb_offset(self) -> int:
        return HEADER.size

    @property
    def chain_offset(self) -> int:
        return self.ueb_offset + self.ueb_length

    @property
    def chain_length(self) -> int:
        return depth(self.params.n) * HASH_SIZE

    @property
    def records_offset(self) -> int:
        return self.chain_offset + self.chain_length

    def record_span(self, j: int) -> tuple[int, int]:
        """(offset, length) of record j: one read gives block j and its proofs."""
        full = self.proof_size + self.params.block_size
        return self.records_offset + j * full, self.proof_size + self.block_size(j)

    @property
    def share_size(self) -> int:
        off, length = self.record_span(self.num_segments - 1)
        return off + length

    def _check_segment(self, j: int) -> None:
        if not 0 <= j < self.num_segments:
            raise IndexError(f"segment {j} out of range 0..{self.num_segments - 1}")


@dataclass(frozen=True)
class ShareHeader:
    sharenum: int
    storage_index: bytes
    geometry: Geometry

    def pack(self) -> bytes:
        g = self.geometry
        return HEADER.pack(
            MAGIC,
            VERSION,
            self.sharenum,
            g.params.k,
            g.params.n,
            self.storage_index,
            g.size,
            g.params.segment_size,
            g.ueb_length,
            0,
        )

    @classmethod
    def unpack(cls, data: bytes) -> ShareHeader:
        if len(data) < HEADER.size:
            raise FormatError("share is shorter than its header")
        magic, version, sharenum, k, n, si, size, seg, ueb_len, reserved = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise FormatError("not a gridfs share (bad magic)")
        if version != VERSION:
            raise FormatError(f"unsupported share version {version}")
        try:
            geometry = Geometry(CodecParams(k, n, seg), size)
        except ValueError as e:
            raise FormatError(f"bad share header: {e}") from None
        if sharenum >= n:
            raise FormatError(f"share number {sharenum} out of range for n={n}")
        if reserved != 0:
            raise FormatError("share header has non-zero reserved bits")
        if ueb_len != geometry.ueb_length:
            raise FormatError("share header has a wrong extension block length")
        return cls(sharenum, si, geometry)


@dataclass(frozen=True)
class Record:
    block_proof: list[bytes]
    ciphertext_proof: list[bytes]
    block: bytes | memoryview
    """a view of the record's bytes when the record was given as a view (no copy)"""


def pack_record(block_proof: list[bytes], ciphertext_proof: list[bytes], block: bytes) -> bytes:
    return b"".join(block_proof) + b"".join(ciphertext_proof) + block


def unpack_record(geometry: Geometry, j: int, data: bytes | memoryview) -> Record:
    _, length = geometry.record_span(j)
    if len(data) != length:
        raise FormatError(f"record {j} is {len(data)} bytes, expected {length}")
    d = depth(geometry.num_segments)
    hashes = [bytes(data[i * HASH_SIZE : (i + 1) * HASH_SIZE]) for i in range(2 * d)]
    return Record(hashes[:d], hashes[d:], data[geometry.proof_size :])


def unpack_chain(geometry: Geometry, data: bytes) -> list[bytes]:
    if len(data) != geometry.chain_length:
        raise FormatError("share hash chain has the wrong length")
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]
