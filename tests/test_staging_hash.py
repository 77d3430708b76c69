"""The mount hashes a file while it is written, so its upload need not read
it once more to find the convergent key: the hash must be the file's own."""

from __future__ import annotations

import os
from pathlib import Path

from gridfs_daemon.files import OpenFile

from gridfs.client.session import TempfileDigests
from gridfs.dirnode import Entry
from gridfs.hashes import PlaintextHasher


def digest_of(data: bytes) -> bytes:
    h = PlaintextHasher()
    h.update(data)
    return h.digest()


def written(*writes: tuple[int, bytes]) -> OpenFile:
    """An open file, empty at first, after these writes (offset, bytes)."""
    of = OpenFile(2, ("f",), Entry("file", ""))
    for offset, data in writes:
        of.hash_write(offset, data)
        of.size = max(of.size, offset + len(data))
    return of


def test_in_order_writes_give_the_whole_files_hash() -> None:
    data = os.urandom(300_000)
    of = written(*((off, data[off : off + 4096]) for off in range(0, len(data), 4096)))
    assert of.plaintext_digest() == digest_of(data)


def test_empty_file_hashes_as_empty() -> None:
    assert written((0, b"")).plaintext_digest() == digest_of(b"")


def test_a_rewrite_a_hole_or_a_backwards_write_gives_no_hash() -> None:
    assert written((0, b"abcd"), (2, b"XY")).plaintext_digest() is None
    assert written((0, b"abcd"), (10, b"XY")).plaintext_digest() is None
    assert written((4, b"efgh"), (0, b"abcd")).plaintext_digest() is None


def test_writing_again_from_empty_starts_over() -> None:
    of = written((0, b"abcd"), (2, b"XY"))
    of.size = 0  # truncated to nothing
    of.hash_write(0, b"fresh")
    of.size = 5
    assert of.plaintext_digest() == digest_of(b"fresh")


def test_a_file_longer_than_what_was_hashed_gives_no_hash() -> None:
    of = written((0, b"abcd"))
    of.size = 8  # extended by a truncate
    assert of.plaintext_digest() is None


def test_hashes_of_tempfiles_never_uploaded_do_not_pile_up(tmp_path: Path) -> None:
    """A tempfile the queue deleted unuploaded leaves its hash behind: such
    hashes go once the hashes have doubled; those of files still there stay."""
    digests = TempfileDigests()
    kept = tmp_path / "kept"
    kept.write_bytes(b"x")
    digests.add(kept, b"k" * 32)
    for i in range(10 * TempfileDigests.PRUNE_MIN):
        digests.add(tmp_path / f"gone-{i}", b"g" * 32)  # never created: deleted unuploaded
    assert len(digests) <= 2 * TempfileDigests.PRUNE_MIN
    assert digests.pop(kept) == b"k" * 32
    assert digests.pop(kept) is None
