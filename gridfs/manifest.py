"""The manifest of a chunked file: its chunks' caps and its holes, in order.

A large file is stored as chunks, each an ordinary CHK object, and one
manifest listing them; the file's cap (:class:`gridfs.caps.ChunkedCap`) is
the read cap of the manifest, itself stored as a CHK object, so the manifest
is verified from the cap exactly as any file's shares are, and each chunk is
verified from its cap in the manifest.  A hole is a run of zero bytes that
was never uploaded.

The byte format (all integers big-endian; docs/formats.md "Chunked files")::

    magic    8 bytes  b"GFSMAN\\x00\\x01"
    count    u32      number of elements, at most MAX_ELEMENTS
    size     u64      the file's size: the sum of the elements' lengths
    count elements, each:
      tag    u8       0 = hole, 1 = chunk
      length u64      1 .. 2**64-1 for a hole, 1 .. MAX_CHUNK for a chunk
      (chunk only) key 32 bytes, UEB hash 32 bytes, k u8, n u8

Parsing is strict, so that one file has one manifest (and one cap):
two holes in a row, an empty element, a bad tag, a length out of range,
a sum that is not ``size``, bytes missing or left over, all raise one
:class:`FormatError`.  Pure functions, no I/O.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .caps import CapError, ReadCap
from .crypto import KEY_SIZE
from .errors import FormatError
from .hashes import HASH_SIZE

MAGIC = b"GFSMAN\x00\x01"
MAX_CHUNK = 16 * 1024 * 1024
"""The largest chunk a manifest may name (the chunker makes at most 2 MiB)."""
MAX_ELEMENTS = 1 << 21
"""Elements per manifest: 2 Mi chunks of ~1 MiB, files of about 2 TiB
(a manifest of 150 MB, the most a reader must hold)."""
MAX_MANIFEST = 20 + 75 * MAX_ELEMENTS
"""The largest manifest: a reader refuses a cap naming a larger one
before fetching anything."""
_HEAD = struct.Struct(">8sIQ")
_HOLE = struct.Struct(">BQ")
_CHUNK = struct.Struct(f">BQ{KEY_SIZE}s{HASH_SIZE}sBB")
HOLE, CHUNK = 0, 1


@dataclass(frozen=True)
class Hole:
    """``length`` zero bytes, not stored anywhere."""

    length: int


@dataclass(frozen=True)
class Chunk:
    """Bytes stored as one CHK object (its length is the cap's size)."""

    cap: ReadCap

    @property
    def length(self) -> int:
        return self.cap.size


Element = Hole | Chunk


@dataclass(frozen=True)
class Manifest:
    """A chunked file's layout: elements covering [0, size) in order."""

    elements: tuple[Element, ...]
    starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """where each element begins"""
    size: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        starts, at = [], 0
        for e in self.elements:
            starts.append(at)
            at += e.length
        object.__setattr__(self, "starts", tuple(starts))
        object.__setattr__(self, "size", at)

    @classmethod
    def of(cls, elements: Iterable[Element]) -> Manifest:
        """The canonical manifest of ``elements``: empty ones dropped,
        neighbouring holes merged."""
        out: list[Element] = []
        for e in elements:
            if e.length == 0:
                continue
            if isinstance(e, Hole) and out and isinstance(out[-1], Hole):
                out[-1] = Hole(out[-1].length + e.length)
            else:
                out.append(e)
        return cls(tuple(out))

    def index_at(self, offset: int) -> int:
        """The index of the element holding byte ``offset`` (0 ≤ offset < size)."""
        return bisect.bisect_right(self.starts, offset) - 1

    def spans(self, offset: int = 0, end: int | None = None) -> Iterator[tuple[int, Element]]:
        """(start, element) of every element overlapping [offset, end)."""
        end = self.size if end is None else min(end, self.size)
        if offset >= end:
            return
        for i in range(self.index_at(offset), len(self.elements)):
            if self.starts[i] >= end:
                break
            yield self.starts[i], self.elements[i]

    def chunk_caps(self) -> list[ReadCap]:
        return [e.cap for e in self.elements if isinstance(e, Chunk)]


def pack(manifest: Manifest) -> bytes:
    """The manifest's bytes (the plaintext of its CHK object)."""
    if len(manifest.elements) > MAX_ELEMENTS:
        raise FormatError(f"a manifest lists at most {MAX_ELEMENTS} chunks and holes")
    parts = [_HEAD.pack(MAGIC, len(manifest.elements), manifest.size)]
    for e in manifest.elements:
        if isinstance(e, Hole):
            parts.append(_HOLE.pack(HOLE, e.length))
        else:
            c = e.cap
            parts.append(_CHUNK.pack(CHUNK, c.size, c.key, c.ueb_hash, c.k, c.n))
    data = b"".join(parts)
    unpack(data)  # what is written must read back: one spelling per manifest
    return data


def unpack(data: bytes, size: int | None = None) -> Manifest:
    """Parse a manifest; anything malformed (or of another ``size`` than the
    cap states) raises one :class:`FormatError`."""
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise FormatError("manifest: truncated header")
    magic, count, total = _HEAD.unpack_from(view, 0)
    if magic[:6] == MAGIC[:6] and magic != MAGIC:
        version = int.from_bytes(magic[6:], "big")
        raise FormatError(f"manifest format version {version} (this gridfs reads version 1)")
    if magic != MAGIC:
        raise FormatError("manifest: bad magic")
    if count > MAX_ELEMENTS:
        raise FormatError(f"manifest: {count} elements, at most {MAX_ELEMENTS}")
    if size is not None and total != size:
        raise FormatError(f"manifest: describes {total} bytes, the cap says {size}")
    elements: list[Element] = []
    at, pos = 0, _HEAD.size
    for _ in range(count):
        if pos >= len(view):
            raise FormatError("manifest: truncated")
        tag = view[pos]
        if tag == HOLE:
            if pos + _HOLE.size > len(view):
                raise FormatError("manifest: truncated hole")
            _, length = _HOLE.unpack_from(view, pos)
            pos += _HOLE.size
            if elements and isinstance(elements[-1], Hole):
                raise FormatError("manifest: two holes in a row")
            element: Element = Hole(length)
        elif tag == CHUNK:
            if pos + _CHUNK.size > len(view):
                raise FormatError("manifest: truncated chunk")
            _, length, key, ueb, k, n = _CHUNK.unpack_from(view, pos)
            pos += _CHUNK.size
            if length > MAX_CHUNK:
                raise FormatError(f"manifest: a chunk of {length} bytes (at most {MAX_CHUNK})")
            try:
                element = Chunk(ReadCap(key, ueb, k, n, length))
            except CapError as e:
                raise FormatError(f"manifest: bad chunk: {e}") from None
        else:
            raise FormatError(f"manifest: unknown element tag {tag}")
        if length == 0:
            raise FormatError("manifest: an empty element")
        at += length
        if at > total:
            raise FormatError("manifest: elements run past the file's size")
        elements.append(element)
    if pos != len(view):
        raise FormatError("manifest: bytes after the last element")
    if at != total:
        raise FormatError(f"manifest: elements cover {at} of {total} bytes")
    return Manifest(tuple(elements))
