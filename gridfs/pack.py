"""Packs: many small files in one immutable file, each under its own key.

A directory keeps small files inside itself up to a budget; the ones over it
would each cost an upload of n shares.  A commit packs them instead: each
file is encrypted with a fresh random key (AES-256-CTR from counter 0), the
ciphertexts are concatenated, and the whole is stored as one CHK file.  Each
file's entry holds a :class:`~gridfs.caps.SliceCap`: the pack's read cap,
where the file lies in it, and that file's key.  Holding the pack's read cap
decrypts only the outer layer, so a slice cap reads its own file and no
neighbour; the pack's hash trees verify every byte as for any CHK file.

A pack lives (keeps its leases) while any entry refers to it; the space of
files removed from a live pack is only given back when the last one goes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .caps import ReadCap, SliceCap
from .crypto import aes_ctr, random_key

PACK_MAX = 8 * 1024 * 1024
"""At most this many bytes per pack (a commit with more makes several)."""


@dataclass(frozen=True)
class Member:
    """A file's place in a pack being built (its pack cap not known yet)."""

    key: bytes
    offset: int
    length: int

    def slice_of(self, pack: ReadCap) -> SliceCap:
        return SliceCap(self.key, self.offset, self.length, pack)


def build_pack(bodies: list[bytes]) -> tuple[bytes, list[Member]]:
    """The pack's plaintext and each body's place in it, in order."""
    parts, members, offset = [], [], 0
    for body in bodies:
        key = random_key()
        parts.append(aes_ctr(key, 0, body))
        members.append(Member(key, offset, len(body)))
        offset += len(body)
    return b"".join(parts), members


def group_for_packs(sizes: list[int], limit: int = PACK_MAX) -> list[list[int]]:
    """Indexes of ``sizes`` in runs of at most ``limit`` bytes, in order."""
    groups: list[list[int]] = []
    total = limit
    for i, size in enumerate(sizes):
        if total + size > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += size
    return groups


def pack_digest(bodies: list[bytes]) -> bytes:
    """Names a group of files (their bytes, in order) to find its pack again."""
    h = hashlib.sha256()
    for body in bodies:
        h.update(len(body).to_bytes(8, "big"))
        h.update(body)
    return h.digest()


def open_slice(cap: SliceCap, at: int, ciphertext: bytes) -> bytes:
    """Decrypt ``ciphertext`` read at byte ``at`` of the file ``cap`` names."""
    return aes_ctr(cap.key, at, ciphertext)
