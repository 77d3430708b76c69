"""Symmetric encryption of file contents: AES-256 in CTR mode.

Each file has its own key (convergent or random), so a fixed all-zero initial
counter is safe; segment *j* starts at counter block ``j * segment_size / 16``,
which lets any segment be decrypted on its own.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_SIZE = 32
_AES_BLOCK = 16


def random_key() -> bytes:
    return os.urandom(KEY_SIZE)


def aes_ctr(key: bytes, offset: int, data: bytes | memoryview) -> bytes:
    """Encrypt or decrypt ``data`` found at byte ``offset`` of the stream."""
    if len(key) != KEY_SIZE:
        raise ValueError("AES-256 key must be 32 bytes")
    counter, skip = divmod(offset, _AES_BLOCK)
    nonce = counter.to_bytes(16, "big")
    cipher = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    if skip:
        cipher.update(b"\0" * skip)
    return cipher.update(data) + cipher.finalize()
