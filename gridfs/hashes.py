"""Every hash gridfs computes, each under its own versioned tag.

All tags live here so that no two uses of SHA-256 can ever collide across
purposes (domain separation) and so a format change is one visible edit.  A
tagged hash is ``SHA-256(netstring(tag) || netstring(part) || ...)`` where
``netstring(x) = len(x) as 8-byte big-endian || x``: unambiguous for any parts.
"""

from __future__ import annotations

import hashlib
import struct

HASH_SIZE = 32
STORAGE_INDEX_SIZE = 16

# -- tags -------------------------------------------------------------------
TAG_PLAINTEXT = b"gridfs:v1:plaintext"
TAG_CONVERGENCE_KEY = b"gridfs:v1:convergence-key"
TAG_STORAGE_INDEX = b"gridfs:v1:storage-index"
TAG_SEGMENT = b"gridfs:v1:ciphertext-segment"
TAG_BLOCK = b"gridfs:v1:block"
TAG_TREE_NODE = b"gridfs:v1:tree-node"
TAG_TREE_PAD = b"gridfs:v1:tree-padding"
TAG_EXTENSION_BLOCK = b"gridfs:v1:extension-block"
TAG_NODE_ID = b"gridfs:v1:node-id"
TAG_PERMUTE = b"gridfs:v1:server-permutation"
# mutable slots (gridfs/mutable.py)
TAG_SLOT_READ_KEY = b"gridfs:v1:slot-read-key"
TAG_SLOT_WRITE_KEY = b"gridfs:v1:slot-write-key"
TAG_SLOT_STORAGE_INDEX = b"gridfs:v1:slot-storage-index"
TAG_SLOT_DATA_KEY = b"gridfs:v1:slot-data-key"
"""Keys of record-version-1 slot versions (read only; see mutable.data_key)."""
TAG_SLOT_SALTED_DATA_KEY = b"gridfs:v1:slot-salted-data-key"
TAG_SLOT_SIGNATURE = b"gridfs:v1:slot-signature"
TAG_SHARE_WRITE_PAD = b"gridfs:v1:shared-dir-write-pad"
TAG_LEASE_RENEW = b"gridfs:v1:lease-renew"
TAG_LEASE_CANCEL = b"gridfs:v1:lease-cancel"
# membership (gridfs/membership.py)
TAG_GRID_ID = b"gridfs:v1:grid-id"
TAG_REVOCATIONS = b"gridfs:v1:revocation-list"
NODE_ID_SIZE = 20

_LEN = struct.Struct(">Q")


def _netstring(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def tagged_hasher(tag: bytes) -> hashlib._Hash:
    """A SHA-256 object primed with ``tag``; feed it with :func:`feed`."""
    h = hashlib.sha256()
    h.update(_netstring(tag))
    return h


def tagged_hash(tag: bytes, *parts: bytes | memoryview) -> bytes:
    """The 32-byte tagged hash of ``parts`` (byte views are hashed in place,
    not copied: hashlib takes any buffer)."""
    h = tagged_hasher(tag)
    for part in parts:
        h.update(_LEN.pack(part.nbytes if isinstance(part, memoryview) else len(part)))
        h.update(part)
    return h.digest()


def block_hash(block: bytes | memoryview) -> bytes:
    return tagged_hash(TAG_BLOCK, block)


def segment_hash(ciphertext_segment: bytes | memoryview) -> bytes:
    return tagged_hash(TAG_SEGMENT, ciphertext_segment)


def node_hash(left: bytes, right: bytes) -> bytes:
    return tagged_hash(TAG_TREE_NODE, left, right)


PAD_HASH = tagged_hash(TAG_TREE_PAD)


def extension_block_hash(ueb: bytes) -> bytes:
    return tagged_hash(TAG_EXTENSION_BLOCK, ueb)


def storage_index(key: bytes) -> bytes:
    """The 16-byte storage index servers file a share under: it names, not opens."""
    return tagged_hash(TAG_STORAGE_INDEX, key)[:STORAGE_INDEX_SIZE]


def node_id(public_key: bytes) -> bytes:
    """The 20-byte id of a node: names the key its TLS certificate must carry."""
    return tagged_hash(TAG_NODE_ID, public_key)[:NODE_ID_SIZE]


def server_permutation(storage_index: bytes, server_id: bytes) -> bytes:
    """Sort key placing servers in a per-file order (spreads files over servers)."""
    return tagged_hash(TAG_PERMUTE, storage_index, server_id)


class PlaintextHasher:
    """Incremental tagged hash of a whole plaintext, for convergent keys."""

    def __init__(self) -> None:
        self._h = tagged_hasher(TAG_PLAINTEXT)
        self._size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)
        self._size += len(data)

    def digest(self) -> bytes:
        # The length goes in last so streaming needs no size up front.
        h = self._h.copy()
        h.update(_LEN.pack(self._size))
        return h.digest()


def convergence_key(secret: bytes, params_string: str, plaintext_digest: bytes) -> bytes:
    """The 32-byte AES key for a file: the same secret, parameters and plaintext
    give the same key (deduplication); without the secret nobody can confirm a
    guessed file."""
    return tagged_hash(TAG_CONVERGENCE_KEY, secret, params_string.encode(), plaintext_digest)


def lease_secrets(
    node_secret: bytes, storage_index: bytes, server_id: bytes
) -> tuple[bytes, bytes]:
    """The (renew, cancel) secrets of this node's lease on one storage index
    at one server: a server learns only its own pair, which is useless
    anywhere else, and no other node can compute them."""
    return (
        tagged_hash(TAG_LEASE_RENEW, node_secret, storage_index, server_id),
        tagged_hash(TAG_LEASE_CANCEL, node_secret, storage_index, server_id),
    )
