"""In-memory encode/decode built on the public pure API, for format tests."""

from __future__ import annotations

from collections.abc import Mapping

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
