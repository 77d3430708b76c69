import itertools
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridfs.caps import LITERAL_MAX
from gridfs.codec import CodecParams
from gridfs.errors import CorruptShareError, IntegrityError, NotEnoughSharesError
from gridfs.immutable import FileDecoder, FileEncoder, ForeignShareError
from gridfs.layout import ExtensionBlock, Geometry

from .helpers import decode_shares, encode_bytes

K, N, SEG = 3, 7, 96
PARAMS = CodecParams(K, N, SEG)
BOUNDARY_SIZES = sorted(
    {1, 2, LITERAL_MAX, LITERAL_MAX + 1, SEG - 1, SEG, SEG + 1, K * SEG - 1, K * SEG, K * SEG + 1}
)


@given(
    st.one_of(st.sampled_from(BOUNDARY_SIZES), st.integers(1, 6 * SEG)),
    st.binary(min_size=32, max_size=32),
)
def test_round_trip_any_size(size: int, key: bytes) -> None:
    data = os.urandom(size)
    cap, shares = encode_bytes(data, key, PARAMS)
    assert cap.size == size and (cap.k, cap.n) == (K, N)
    assert decode_shares(cap, dict(enumerate(shares))) == data
    # The verify cap checks everything and yields ciphertext, never plaintext.
    ciphertext = decode_shares(cap.verify_cap(), dict(enumerate(shares)))
    assert len(ciphertext) == size and (ciphertext != data or size < 4)


@pytest.mark.parametrize(("k", "n"), [(1, 3), (2, 4), (3, 5)])
def test_every_k_subset_of_shares_decodes(k: int, n: int) -> None:
    data = os.urandom(5 * 30 + 7)
    cap, shares = encode_bytes(data, os.urandom(32), CodecParams(k, n, 30))
    for subset in itertools.combinations(range(n), k):
        assert decode_shares(cap, {i: shares[i] for i in subset}) == data


def test_fewer_than_k_shares_fail() -> None:
    data = os.urandom(500)
    cap, shares = encode_bytes(data, os.urandom(32), PARAMS)
    with pytest.raises(NotEnoughSharesError):
        decode_shares(cap, {i: shares[i] for i in range(K - 1)})


ENCODED = encode_bytes(os.urandom(4 * SEG + 17), os.urandom(32), PARAMS)


@given(st.integers(0, N - 1), st.data())
def test_any_single_byte_corruption_is_detected_and_survived(
    victim: int, data: st.DataObject
) -> None:
    cap, shares = ENCODED
    blob = bytearray(shares[victim])
    pos = data.draw(st.integers(0, len(blob) - 1), label="byte")
    blob[pos] ^= data.draw(st.integers(1, 255), label="xor")
    others = [i for i in range(N) if i != victim]
    # The corrupt share is tried first; k good ones remain behind it.
    offered = {victim: bytes(blob)} | {i: shares[i] for i in others[:K]}
    bad: list[int] = []
    plain = decode_shares(cap, offered, bad)
    assert plain == decode_shares(cap, dict(enumerate(shares)))
    assert bad == [victim]


def test_corrupt_block_names_its_share() -> None:
    cap, shares = ENCODED
    dec = FileDecoder(cap)
    g = Geometry(PARAMS, cap.size)
    for i in (2, 5):
        dec.accept_head(shares[i][: g.records_offset])
    off, length = g.record_span(1)
    good = dec.verify_record(2, 1, shares[2][off : off + length])
    assert good.sharenum == 2
    rec = bytearray(shares[5][off : off + length])
    rec[-1] ^= 1
    with pytest.raises(CorruptShareError) as err:
        dec.verify_record(5, 1, bytes(rec))
    assert err.value.sharenum == 5 and "share 5" in str(err.value)


def test_share_of_another_file_is_foreign() -> None:
    cap, _ = ENCODED
    _, other = encode_bytes(os.urandom(300), os.urandom(32), PARAMS)
    length = FileDecoder.head_length(other[0])
    with pytest.raises(ForeignShareError):
        FileDecoder(cap).accept_head(other[0][:length])


def test_decrypt_happens_only_after_verification() -> None:
    """A block swapped in from another segment of the same share is refused,
    even though it is a genuine block of this very file."""
    cap, shares = ENCODED
    dec = FileDecoder(cap)
    g = Geometry(PARAMS, cap.size)
    dec.accept_head(shares[0][: g.records_offset])
    o0, l0 = g.record_span(0)
    o1, _ = g.record_span(1)
    swapped = shares[0][o0 : o0 + g.proof_size] + shares[0][o1 + g.proof_size : o1 + l0]
    with pytest.raises(CorruptShareError):
        dec.verify_record(0, 0, swapped)


def test_inconsistent_uploader_is_caught_by_ciphertext_tree() -> None:
    """Shares whose blocks verify but decode to a different ciphertext (a
    malicious uploader) fail the ciphertext hash tree instead of decrypting."""
    key = os.urandom(32)
    data = os.urandom(2 * SEG)
    enc = FileEncoder(key, PARAMS, len(data))
    real = [enc.encode_segment(j, data[j * SEG : (j + 1) * SEG]) for j in range(2)]
    fin = enc.finish()
    # Re-encode with block 0 of segment 0 replaced, and recompute the block
    # trees but keep the genuine ciphertext root.
    evil = FileEncoder(key, PARAMS, len(data))
    evil.encode_segment(0, data[:SEG])
    evil.encode_segment(1, data[SEG:])
    evil._block_hashes[0] = list(evil._block_hashes[0])  # type: ignore[arg-type]
    from gridfs.hashes import block_hash

    tampered = bytes(b ^ 0xFF for b in real[0].blocks[0])
    evil._block_hashes[0][0] = block_hash(tampered)  # type: ignore[index]
    efin = evil.finish()
    assert efin.ueb.ciphertext_root == fin.ueb.ciphertext_root
    dec = FileDecoder(efin.cap)
    g = enc.geometry
    for i in (0, 1, 2):
        dec.accept_head(efin.head(i))
    blocks = []
    for i in (0, 1, 2):
        block = tampered if i == 0 else real[0].blocks[i]
        rec = efin.record_proofs(i, 0) + block
        blocks.append(dec.verify_record(i, 0, rec))
    assert len(rec) == g.record_span(0)[1]
    with pytest.raises(IntegrityError, match="ciphertext hash tree"):
        dec.decode_segment(0, blocks)


def test_extension_block_is_canonical() -> None:
    cap, shares = ENCODED
    g = Geometry(PARAMS, cap.size)
    ueb = shares[0][g.ueb_offset : g.chain_offset]
    parsed = ExtensionBlock.unpack(ueb)
    assert parsed.pack() == ueb
    assert parsed.num_segments == 5 and parsed.size == cap.size
