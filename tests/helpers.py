"""In-memory encode/decode built on the public pure API, for format tests."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Mapping
from pathlib import Path

from gridfs.caps import ReadCap, VerifyCap
from gridfs.codec import CodecParams
from gridfs.errors import CorruptShareError, GridError, NotEnoughSharesError
from gridfs.immutable import FileDecoder, FileEncoder, VerifiedBlock, encode_shares


def encode_bytes(data: bytes, key: bytes, params: CodecParams) -> tuple[ReadCap, list[bytes]]:
    finished, shares = encode_shares(FileEncoder(key, params, len(data)), data)
    return finished.cap, shares


def decode_shares(
    cap: ReadCap | VerifyCap, shares: Mapping[int, bytes], bad: list[int] | None = None
) -> bytes:
    """Decode from share blobs keyed by a label, trying them in the mapping's
    order, and collect the labels of the shares found corrupt into ``bad``."""
    bad = [] if bad is None else bad
    dec = FileDecoder(cap)
    good: dict[int, bytes] = {}
    label_of: dict[int, int] = {}
    for label, blob in shares.items():
        try:
            length = FileDecoder.head_length(blob)
            num = dec.accept_head(blob[:length])
        except GridError:
            bad.append(label)
            continue
        if num not in good:
            good[num], label_of[num] = blob, label
    if dec.geometry is None:
        raise NotEnoughSharesError("no good share")
    out = []
    for j in range(dec.geometry.num_segments):
        blocks: list[VerifiedBlock] = []
        for num in list(good):
            off, length = dec.record_span(j)
            try:
                blocks.append(dec.verify_record(num, j, good[num][off : off + length]))
            except CorruptShareError:
                bad.append(label_of[num])
                del good[num]
            if len(blocks) == cap.k:
                break
        if len(blocks) < cap.k:
            raise NotEnoughSharesError(f"segment {j}")
        decoded = dec.decode_segment(j, blocks)
        for num in decoded.bad_proofs:
            bad.append(label_of[num])
            del good[num]
        out.append(decoded.data)
    return b"".join(out)


def resident_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache (mincore over a shared mapping)."""
    size = path.stat().st_size
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as mapping:
        return mapped_resident_pages(mapping)


def resident_page_map(path: Path) -> list[bool]:
    """For each page of ``path``: whether it is in the page cache."""
    size = path.stat().st_size
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), size) as mapping:
        return mapped_resident_map(mapping)


def mapped_resident_pages(mapping: mmap.mmap) -> int:
    """Pages of a writable shared mapping that are in the page cache."""
    return sum(mapped_resident_map(mapping))


def mapped_resident_map(mapping: mmap.mmap) -> list[bool]:
    """For each page of a writable shared mapping: whether it is in the page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vec = ctypes.create_string_buffer(-(-len(mapping) // mmap.PAGESIZE))
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        if libc.mincore(ctypes.addressof(anchor), len(mapping), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
    finally:
        del anchor  # (the buffer export must end before the mapping closes)
    return [bool(b & 1) for b in vec.raw]


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (e.g. "ext4", "tmpfs")."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, where, fstype, *_ = line.split()
        if str(path).startswith(where) and len(where) > len(best):
            best, kind = where, fstype
    return kind
