"""Immutable (CHK) files: the pure encoder and the verifying decoder.

Encoding, per segment j: encrypt the plaintext with AES-256-CTR, hash the
ciphertext segment (leaf j of the ciphertext tree), erasure-code it into n
blocks and hash each block (leaf j of that share's block tree).  When all
segments are done, the block tree roots become the leaves of the share tree,
and both roots go into the extension block whose hash goes into the cap.

Decoding trusts only the cap: the extension block must hash to the cap's
value; a block must chain through its block proof and its share's chain to
the share root; a decoded segment must chain to the ciphertext root; and only
then is it decrypted.  Neither class does I/O: callers fetch bytes (from disk
or servers) and hand them in, so the same logic serves every transport.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import hashtree
from .caps import ReadCap, VerifyCap
from .codec import CodecParams, Decoder, Encoder
from .crypto import aes_ctr
from .errors import BadHashError, CorruptShareError, FormatError, GridError, IntegrityError
from .hashes import block_hash, extension_block_hash, segment_hash, storage_index
from .layout import (
    HEADER,
    ExtensionBlock,
    Geometry,
    ShareHeader,
    pack_record,
    unpack_chain,
    unpack_record,
)


class ForeignShareError(GridError):
    """A share that belongs to another file."""


@dataclass(frozen=True)
class EncodedSegment:
    index: int
    blocks: list[bytes]
    """Block i of this segment for every share i in 0..n-1."""


class FileEncoder:
    """Encodes one file of known size under one key.

    :meth:`encode_segment` may run in several threads at once (for different
    segments); :meth:`finish` runs once after every segment was encoded.
    """

    def __init__(self, key: bytes, params: CodecParams, size: int) -> None:
        self.key = key
        self.geometry = Geometry(params, size)
        self.storage_index = storage_index(key)
        self._codec = Encoder(params)
        nseg = self.geometry.num_segments
        self._ct_hashes: list[bytes | None] = [None] * nseg
        self._block_hashes: list[list[bytes] | None] = [None] * nseg

    @property
    def params(self) -> CodecParams:
        return self.geometry.params

    def header(self, sharenum: int) -> bytes:
        return ShareHeader(sharenum, self.storage_index, self.geometry).pack()

    def encode_segment(self, j: int, plaintext: bytes | memoryview) -> EncodedSegment:
        if len(plaintext) != self.geometry.segment_size(j):
            raise ValueError(f"segment {j} must be {self.geometry.segment_size(j)} bytes")
        ciphertext = aes_ctr(self.key, j * self.params.segment_size, plaintext)
        self._ct_hashes[j] = segment_hash(ciphertext)
        blocks = self._codec.encode(ciphertext)
        self._block_hashes[j] = [block_hash(b) for b in blocks]
        return EncodedSegment(j, blocks)

    def blocks_for(
        self, j: int, plaintext: bytes | memoryview, sharenums: list[int]
    ) -> list[bytes]:
        """Blocks of segment j for some shares only (to re-send them elsewhere);
        leaves the hash state alone."""
        ciphertext = aes_ctr(self.key, j * self.params.segment_size, plaintext)
        return self._codec.encode(ciphertext, sharenums)

    def finish(self) -> FinishedFile:
        if any(h is None for h in self._ct_hashes):
            raise ValueError("finish() before every segment was encoded")
        n, nseg = self.params.n, self.geometry.num_segments
        per_segment: list[list[bytes]] = self._block_hashes  # type: ignore[assignment]
        block_trees = [hashtree.build([per_segment[j][i] for j in range(nseg)]) for i in range(n)]
        share_tree = hashtree.build([t[0] for t in block_trees])
        ct_tree = hashtree.build(self._ct_hashes)  # type: ignore[arg-type]
        ueb = ExtensionBlock(self.params, self.geometry.size, ct_tree[0], share_tree[0])
        return FinishedFile(self, ueb, block_trees, share_tree, ct_tree)


@dataclass(frozen=True)
class FinishedFile:
    """Everything of an encoded file except its blocks: the trees, the
    extension block and the cap."""

    encoder: FileEncoder
    ueb: ExtensionBlock
    block_trees: list[list[bytes]]
    share_tree: list[bytes]
    ciphertext_tree: list[bytes]

    @property
    def ueb_bytes(self) -> bytes:
        return self.ueb.pack()

    @property
    def cap(self) -> ReadCap:
        p = self.ueb.params
        return ReadCap(
            self.encoder.key, extension_block_hash(self.ueb_bytes), p.k, p.n, self.ueb.size
        )

    def head(self, sharenum: int) -> bytes:
        """Header, extension block and share chain: the bytes before the records."""
        chain = hashtree.proof(self.share_tree, self.ueb.params.n, sharenum)
        return self.encoder.header(sharenum) + self.ueb_bytes + b"".join(chain)

    def record_proofs(self, sharenum: int, j: int) -> bytes:
        """The two proofs that open record j of share ``sharenum``."""
        nseg = self.encoder.geometry.num_segments
        block_proof = hashtree.proof(self.block_trees[sharenum], nseg, j)
        ct_proof = hashtree.proof(self.ciphertext_tree, nseg, j)
        return pack_record(block_proof, ct_proof, b"")


def encode_shares(encoder: FileEncoder, data: bytes) -> tuple[FinishedFile, list[bytes]]:
    """A whole (small) file encoded in memory: its finished trees and every
    share's bytes."""
    finished, shares = encode_share_parts(encoder, data)
    return finished, [b"".join(parts) for parts in shares]


def encode_share_parts(encoder: FileEncoder, data: bytes) -> tuple[FinishedFile, list[list[bytes]]]:
    """:func:`encode_shares` with each share as its parts in order (header,
    then padding, proofs and block of each record), for a sender that
    copies them straight into a frame: they are most of a chunked upload's
    bytes."""
    g = encoder.geometry
    seg = g.params.segment_size
    blocks = [
        encoder.encode_segment(j, data[j * seg : j * seg + g.segment_size(j)]).blocks
        for j in range(g.num_segments)
    ]
    finished = encoder.finish()
    shares = []
    for i in range(g.params.n):
        parts = [finished.head(i)]
        at = len(parts[0])
        for j in range(g.num_segments):
            start = g.record_span(j)[0]
            proofs = finished.record_proofs(i, j)
            block = blocks[j][i]
            parts += [bytes(start - at), proofs, bytes(g.proof_size - len(proofs)), block]
            at = start + g.proof_size + len(block)
        parts.append(bytes(g.share_size - at))
        shares.append([part for part in parts if part])
    return finished, shares


@dataclass(frozen=True)
class VerifiedBlock:
    sharenum: int
    segment: int
    block: bytes | memoryview
    ciphertext_proof: list[bytes]


@dataclass(frozen=True)
class DecodedSegment:
    index: int
    data: bytes
    """Plaintext for a read cap, ciphertext for a verify cap."""
    bad_proofs: list[int]
    """Shares whose record carried a wrong ciphertext proof (the data is fine)."""


class FileDecoder:
    """Verifies shares and blocks against a cap, and decodes segments.

    Any segment can be decoded alone from k verified blocks of that segment.
    """

    def __init__(self, cap: ReadCap | VerifyCap) -> None:
        self.cap = cap
        self.storage_index = cap.storage_index
        self.ueb: ExtensionBlock | None = None
        self.geometry: Geometry | None = None
        self._share_tree: hashtree.PartialTree | None = None
        self._chains: dict[int, list[bytes]] = {}
        self._block_roots: dict[int, bytes] = {}
        self._codec: Decoder | None = None
        self._lock = threading.Lock()  # records may be verified on several threads

    @staticmethod
    def head_length(header: bytes) -> int:
        """How many bytes :meth:`accept_head` needs, from the first HEADER.size."""
        return ShareHeader.unpack(header[: HEADER.size]).geometry.records_offset

    def accept_head(self, data: bytes) -> int:
        """Check a share's header, extension block and chain; return its number.

        Raises :class:`ForeignShareError` for a share of another file and
        :class:`CorruptShareError` for a damaged one.
        """
        try:
            header = ShareHeader.unpack(data[: HEADER.size])
        except FormatError as e:
            raise CorruptShareError(-1, str(e)) from None
        num = header.sharenum
        if header.storage_index != self.storage_index:
            raise ForeignShareError("share belongs to another file")
        g = header.geometry
        if len(data) != g.records_offset:
            raise CorruptShareError(num, "share is truncated")
        ueb_bytes = data[g.ueb_offset : g.chain_offset]
        if extension_block_hash(ueb_bytes) != self.cap.ueb_hash:
            raise CorruptShareError(num, "extension block does not match the cap")
        try:
            ueb = ExtensionBlock.unpack(ueb_bytes)
        except FormatError as e:  # a hash collision or a cap made by a broken encoder
            raise CorruptShareError(num, str(e)) from None
        c = self.cap
        if (ueb.params, ueb.size) != (g.params, g.size) or (c.k, c.n, c.size) != (
            ueb.params.k,
            ueb.params.n,
            ueb.size,
        ):
            raise CorruptShareError(num, "share header disagrees with its extension block")
        if self.ueb is None:
            self._adopt(ueb, g)
        self._chains[num] = unpack_chain(g, data[g.chain_offset : g.records_offset])
        return num

    def _adopt(self, ueb: ExtensionBlock, geometry: Geometry) -> None:
        self.ueb, self.geometry = ueb, geometry
        self._share_tree = hashtree.PartialTree(ueb.params.n, ueb.share_root)
        self._codec = Decoder(ueb.params)

    def record_span(self, j: int) -> tuple[int, int]:
        return self._geometry().record_span(j)

    def _geometry(self) -> Geometry:
        if self.geometry is None:
            raise GridError("no share head accepted yet")
        return self.geometry

    def verify_record(self, sharenum: int, j: int, data: bytes | memoryview) -> VerifiedBlock:
        """Verify record j of a share whose head was accepted; return its block
        (a view into ``data`` when that is a view)."""
        g = self._geometry()
        if sharenum not in self._chains:
            raise GridError(f"head of share {sharenum} was not accepted")
        try:
            rec = unpack_record(g, j, data)
        except FormatError as e:
            raise CorruptShareError(sharenum, str(e)) from None
        try:
            root = hashtree.root_from_proof(
                block_hash(rec.block), j, g.num_segments, rec.block_proof
            )
        except BadHashError as e:
            raise CorruptShareError(sharenum, str(e)) from None
        with self._lock:
            known = self._block_roots.get(sharenum)
            if known is None:
                self._verify_share_root(sharenum, root, j)
        if known is not None and known != root:
            raise CorruptShareError(sharenum, f"block {j} fails its hash chain")
        return VerifiedBlock(sharenum, j, rec.block, rec.ciphertext_proof)

    def _verify_share_root(self, sharenum: int, root: bytes, j: int) -> None:
        assert self._share_tree is not None and self.ueb is not None
        n = self.ueb.params.n
        chain = dict(zip(hashtree.proof_indices(n, sharenum), self._chains[sharenum], strict=True))
        try:
            self._share_tree.add(hashes=chain, leaves={sharenum: root})
        except BadHashError:
            raise CorruptShareError(sharenum, f"block {j} fails its hash chain") from None
        if not self._share_tree.is_verified(sharenum):
            raise CorruptShareError(sharenum, "share chain is incomplete")
        self._block_roots[sharenum] = root

    def verified_root(self, sharenum: int) -> bytes | None:
        """The block tree root of a share whose blocks verified, if any did."""
        return self._block_roots.get(sharenum)

    def decode_segment(self, j: int, blocks: Sequence[VerifiedBlock]) -> DecodedSegment:
        """Decode segment j from k verified blocks, check it, then decrypt it."""
        g = self._geometry()
        assert self._codec is not None and self.ueb is not None
        if any(b.segment != j for b in blocks):
            raise ValueError("blocks from another segment")
        ciphertext = self._codec.decode(
            [b.block for b in blocks], [b.sharenum for b in blocks], g.segment_size(j)
        )
        leaf = segment_hash(ciphertext)
        good, bad = False, []
        for b in blocks:
            try:
                ok = hashtree.root_from_proof(leaf, j, g.num_segments, b.ciphertext_proof)
            except BadHashError:
                ok = b""
            if ok == self.ueb.ciphertext_root:
                good = True
            else:
                bad.append(b.sharenum)
        if not good:
            raise IntegrityError(
                f"segment {j} does not match the ciphertext hash tree "
                "(the shares were made inconsistent by their uploader)"
            )
        if isinstance(self.cap, ReadCap):
            data = aes_ctr(self.cap.key, j * g.params.segment_size, ciphertext)
        else:
            data = ciphertext
        return DecodedSegment(j, data, bad)


class ShareRegenerator:
    """Re-creates missing shares from a file's verified ciphertext, without
    its key: what a repairer holding only the verify cap can do.

    Feed every segment's ciphertext in any order; :meth:`finish` then checks
    the rebuilt trees against the extension block's roots (so a repair can
    never publish shares that disagree with the cap) and returns each new
    share's head and record proofs."""

    def __init__(self, decoder: FileDecoder, missing: Sequence[int]) -> None:
        if decoder.ueb is None or decoder.geometry is None:
            raise GridError("no verified share to repair from")
        self.decoder = decoder
        self.ueb = decoder.ueb
        self.geometry = decoder.geometry
        self.missing = sorted(missing)
        self._codec = Encoder(self.ueb.params)
        nseg = self.geometry.num_segments
        self._ct_hashes: list[bytes | None] = [None] * nseg
        self._block_hashes: dict[int, list[bytes | None]] = {i: [None] * nseg for i in self.missing}

    def blocks(self, j: int, ciphertext: bytes) -> dict[int, bytes]:
        """The missing shares' blocks of segment j."""
        self._ct_hashes[j] = segment_hash(ciphertext)
        blocks = self._codec.encode(ciphertext, self.missing)
        for i, block in zip(self.missing, blocks, strict=True):
            self._block_hashes[i][j] = block_hash(block)
        return dict(zip(self.missing, blocks, strict=True))

    def finish(self) -> dict[int, tuple[bytes, list[bytes]]]:
        """share number → (head, [record proofs for each segment])."""
        n, nseg = self.ueb.params.n, self.geometry.num_segments
        if any(h is None for h in self._ct_hashes):
            raise GridError("finish() before every segment was regenerated")
        ct_tree = hashtree.build(self._ct_hashes)  # type: ignore[arg-type]
        if ct_tree[0] != self.ueb.ciphertext_root:
            raise IntegrityError("regenerated ciphertext does not match the extension block")
        trees = {i: hashtree.build(h) for i, h in self._block_hashes.items()}  # type: ignore[arg-type]
        roots = []
        for i in range(n):
            root = trees[i][0] if i in trees else self.decoder.verified_root(i)
            if root is None:
                raise GridError(f"share {i} is neither verified nor being regenerated")
            roots.append(root)
        share_tree = hashtree.build(roots)
        if share_tree[0] != self.ueb.share_root:
            raise IntegrityError("regenerated shares do not match the extension block")
        out = {}
        for i in self.missing:
            head = (
                ShareHeader(i, self.decoder.storage_index, self.geometry).pack()
                + self.ueb.pack()
                + b"".join(hashtree.proof(share_tree, n, i))
            )
            proofs = [
                pack_record(
                    hashtree.proof(trees[i], nseg, j), hashtree.proof(ct_tree, nseg, j), b""
                )
                for j in range(nseg)
            ]
            out[i] = (head, proofs)
        return out


def verify_share(cap: VerifyCap, read: Callable[[int, int], bytes]) -> int:
    """Check one share on its own against a verify cap: its head and every
    block with its hash chain.  ``read(offset, length)`` gives the share's bytes.
    Returns the share number; raises CorruptShareError (or ForeignShareError).
    What a server runs before it believes a corruption report."""
    decoder = FileDecoder(cap)
    header = read(0, HEADER.size)
    try:
        length = FileDecoder.head_length(header)
    except FormatError as e:
        raise CorruptShareError(-1, str(e)) from None
    num = decoder.accept_head(read(0, length))
    geometry = decoder.geometry
    assert geometry is not None
    for j in range(geometry.num_segments):
        offset, size = geometry.record_span(j)
        decoder.verify_record(num, j, read(offset, size))
    return num
