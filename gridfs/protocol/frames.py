"""Packing a frame, a share's megabytes not copied at all.

A write or a batch of shares is megabytes of bytes in a small msgpack
message.  msgpack's Packer copies them into its buffer and the frame
(length prefix and body) was a second copy; a share assembled from its
parts (header, proofs, blocks) before that was a third.  On a 2-core node
these copies were a tenth of a chunked put's client CPU.

A :class:`Blob` is bytes given as parts.  The packer meets it through its
``default`` hook, which is called where the Blob's bytes go: the hook notes
that offset and returns a 5-byte placeholder.  :func:`frame_pieces` then
gives the frame as pieces to send in order: the packed bytes between
placeholders and, in their place, each Blob's msgpack ``bin`` header and
its parts as they are (:func:`pack_frame` joins them, in one copy).  The
wire format is plain msgpack: a receiver sees a ``bin`` like any other.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import msgpack

LENGTH = struct.Struct(">I")
"""A frame's length prefix."""

_STAND_IN = b"Bl\x00"
_PLACEHOLDER = msgpack.packb(_STAND_IN, use_bin_type=True)
"""What the packer writes for a Blob: ``bin 8`` of the stand-in, 5 bytes."""

Buffer = bytes | bytearray | memoryview


class Blob:
    """Bytes in parts, sent as one msgpack ``bin`` without being joined first."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: Iterable[Buffer]) -> None:
        self.parts = tuple(parts)
        self.size = sum(memoryview(p).nbytes for p in self.parts)

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __repr__(self) -> str:
        return f"Blob({len(self.parts)} parts, {self.size} bytes)"


def bin_header(size: int) -> bytes:
    """msgpack's header of a ``bin`` of ``size`` bytes (the shortest form)."""
    if size < 1 << 8:
        return bytes((0xC4, size))
    if size < 1 << 16:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


class FrameTooLarge(ValueError):
    """The packed message exceeds the frame limit it was packed against."""

    def __init__(self, size: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit")
        self.size = size


def pack_frame(msg: Any, max_body: int) -> bytes:
    """The frame of ``msg``: length prefix and msgpack body, each Blob's
    bytes copied once.  Raises FrameTooLarge past ``max_body``, TypeError
    for what msgpack cannot pack."""
    return b"".join(frame_pieces(msg, max_body))


def frame_pieces(msg: Any, max_body: int) -> list[Buffer]:
    """The frame of ``msg`` as pieces to send in order: the Blobs' parts
    as they are (not copied at all), copies of the packed bytes around them
    (the packer is not kept: msgpack grows its buffer to twice what it
    holds, and a view of it kept while a frame waits to be sent made a
    put of one 100 MiB object peak at 335 MB instead of 150)."""
    blobs: list[tuple[int, Blob]] = []

    def default(obj: Any) -> bytes:
        if not isinstance(obj, Blob):
            raise TypeError(f"can not serialize {type(obj).__name__!r} object")
        with packer.getbuffer() as packed:
            blobs.append((len(packed), obj))
        return _STAND_IN

    packer = msgpack.Packer(use_bin_type=True, autoreset=False, default=default)
    packer.pack(msg)
    if not blobs:  # one piece, the packer's bytes copied once
        with packer.getbuffer() as body:
            if len(body) > max_body:
                raise FrameTooLarge(len(body))
            return [b"".join((LENGTH.pack(len(body)), body))]
    with packer.getbuffer() as packed:
        size = len(packed)
        for _, blob in blobs:
            size += len(bin_header(blob.size)) + blob.size - len(_PLACEHOLDER)
        if size > max_body:
            raise FrameTooLarge(size)
        pieces: list[Buffer] = [LENGTH.pack(size)]
        at = 0
        for offset, blob in blobs:
            if packed[offset : offset + len(_PLACEHOLDER)] != _PLACEHOLDER:
                raise AssertionError("msgpack wrote a Blob's placeholder elsewhere")
            pieces += [bytes(packed[at:offset]), bin_header(blob.size), *blob.parts]
            at = offset + len(_PLACEHOLDER)
        pieces.append(bytes(packed[at:]))
    return pieces
