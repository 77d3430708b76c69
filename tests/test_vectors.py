"""Committed test vectors: a fixed secret and input give exact caps and shares.

If this test fails, the format changed.  That needs a new format version, not
new vectors.  (To add vectors for new cases: ``python -m tests.test_vectors``.)
"""

import hashlib
import json
import tracemalloc
from pathlib import Path

import pytest

from gridfs.codec import params_for_size
from gridfs.hashes import PlaintextHasher, block_hash, convergence_key, segment_hash

from .helpers import encode_bytes

VECTORS = Path(__file__).with_name("vectors") / "immutable.json"
SECRET = b"gridfs test vector convergence!!"
CASES = [
    # (k, n, max segment size, file size)
    (3, 10, 1 << 20, 65),
    (3, 10, 1 << 20, 1000),
    (1, 1, 4096, 4096),
    (2, 5, 4096, 3 * 4096 + 1),
    (3, 10, 1000, 10_000),
]


def plaintext(size: int) -> bytes:
    return bytes((i * 7 + i // 256) % 256 for i in range(size))


def compute(k: int, n: int, seg: int, size: int) -> dict[str, object]:
    data = plaintext(size)
    params = params_for_size(k, n, seg, size)
    hasher = PlaintextHasher()
    hasher.update(data)
    key = convergence_key(SECRET, params.serialize(), hasher.digest())
    cap, shares = encode_bytes(data, key, params)
    return {
        "k": k,
        "n": n,
        "max_segment_size": seg,
        "size": size,
        "cap": cap.to_string(),
        "verify_cap": cap.verify_cap().to_string(),
        "share_sha256": [hashlib.sha256(s).hexdigest() for s in shares],
    }


@pytest.mark.parametrize("case", CASES, ids=[f"{k}of{n}-{size}" for k, n, _, size in CASES])
def test_vector(case: tuple[int, int, int, int]) -> None:
    vectors = {
        (v["k"], v["n"], v["max_segment_size"], v["size"]): v
        for v in json.loads(VECTORS.read_text())
    }
    assert compute(*case) == vectors[case]


if __name__ == "__main__":
    VECTORS.write_text(json.dumps([compute(*c) for c in CASES], indent=1) + "\n")


def test_block_and_segment_hashes_take_views_in_place() -> None:
    """A block or segment held as a view (a slice of a read reply) hashes the
    same as its bytes, without a copy of it being made."""
    reply = bytes(range(256)) * (16 << 10)  # 4 MiB
    view = memoryview(reply)[100 : 100 + (3 << 20)]
    assert block_hash(view) == block_hash(bytes(view))
    assert segment_hash(view) == segment_hash(bytes(view))
    tracemalloc.start()
    try:
        block_hash(view)
        segment_hash(view)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10, peak
