"""What a storage server can prove about an immutable share by itself.

A server does not hold the file's cap, so it cannot tell a good share from a
well-made share of the wrong file; only a reader can (the cap pins the
extension block's hash).  What it can check alone is that the share agrees
with itself: its header names this storage index and share number and its
own size, its extension block parses and agrees with the header, every
block hashes through its block proof to one block tree root, and that root
goes through the share hash chain to the share root in the extension block.
Disk rot in a block, a proof, the chain or the header fails that.  The
ciphertext proofs are checked only when a segment is decoded, so rot there,
or in the extension block's ciphertext root, passes: such a share is kept,
and readers reject it as they would a substituted one.

:func:`check_share` is what ``report_corrupt`` runs before it quarantines.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import BadHashError, FormatError
from ..hashes import block_hash, extension_block_hash
from ..hashtree import root_from_proof
from ..layout import HEADER, ExtensionBlock, ShareHeader, unpack_chain, unpack_record


def check_share(
    read: Callable[[int, int], bytes], storage_index: bytes, sharenum: int, size: int
) -> str | None:
    """None if the share (``size`` bytes, read with ``read(offset, length)``)
    is internally consistent; else why it is not, in one line."""
    try:
        header = ShareHeader.unpack(read(0, HEADER.size))
    except FormatError as e:
        return f"malformed header: {e}"
    if header.storage_index != storage_index:
        return "its header names another storage index"
    if header.sharenum != sharenum:
        return f"its header names share {header.sharenum}"
    g = header.geometry
    if size != g.share_size:
        return f"it is {size} bytes and its header says {g.share_size}"
    head = read(0, g.records_offset)
    if len(head) != g.records_offset:
        return "it is truncated"
    try:
        ueb = ExtensionBlock.unpack(head[g.ueb_offset : g.chain_offset])
        chain = unpack_chain(g, head[g.chain_offset : g.records_offset])
    except FormatError as e:
        return f"malformed extension block: {e}"
    if (ueb.params, ueb.size) != (g.params, g.size):
        return "its header disagrees with its extension block"
    block_root: bytes | None = None
    for j in range(g.num_segments):
        offset, length = g.record_span(j)
        try:
            record = unpack_record(g, j, read(offset, length))
            root = root_from_proof(block_hash(record.block), j, g.num_segments, record.block_proof)
        except (FormatError, BadHashError) as e:
            return f"record {j}: {e}"
        if block_root is None:
            block_root = root
        elif root != block_root:
            return f"block {j} does not match the block hash tree of the share"
    assert block_root is not None  # a share has at least one segment
    try:
        share_root = root_from_proof(block_root, sharenum, g.params.n, chain)
    except BadHashError as e:
        return f"share hash chain: {e}"
    if share_root != ueb.share_root:
        return "its blocks do not match the share hash chain and extension block it holds"
    return None


def ueb_hash_of(read: Callable[[int, int], bytes]) -> bytes | None:
    """The hash of the share's extension block (what a cap pins), or None if
    the header does not parse; tells the operator whether a reporter's cap
    is even for this share."""
    try:
        g = ShareHeader.unpack(read(0, HEADER.size)).geometry
    except FormatError:
        return None
    return extension_block_hash(read(g.ueb_offset, g.ueb_length))
