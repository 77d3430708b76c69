"""The storage server's mutable slots: the newest version of each, on disk.

Layout under ``root`` (``si`` is the slot's storage index in lowercase base32,
``p`` its first two characters)::

    slots/p/si        msgpack [record, signature] of the newest version held

A version replaces the stored one only if it verifies (its key hashes to the
storage index and signs it) and its seq is higher, so a server never takes a
replay or a rollback; with a test-and-set expectation it also requires the
stored seq to be the one the writer saw.  Writes go to a temporary file that
is fsynced and renamed over the old one, so a crash leaves the old version or
the new, never a mix.  Reads hand back the stored bytes as they are: a reader
trusts only its own verification.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import msgpack

from gridfs.caps import b32encode
from gridfs.errors import UsageError
from gridfs.fileutil import atomic_output, fsync_dir
from gridfs.hashes import STORAGE_INDEX_SIZE
from gridfs.mutable import MAX_SLOT_RECORD, SIGNATURE_SIZE, BadVersionError, verify_version

from .store import StoreError, _disk_errors

log = logging.getLogger(__name__)
_FILE_MODE = 0o600
_MAX_FILE = MAX_SLOT_RECORD + SIGNATURE_SIZE + 16

StoredVersion = tuple[bytes, bytes]
"""(record, signature) as kept on disk."""


class StaleVersionError(StoreError):
    """The write was refused: its seq is not higher than the stored version's,
    or the stored seq is not the one the writer expected.  ``current`` is the
    stored (record, signature), or None if none is stored."""

    code = "stale-version"

    def __init__(self, message: str, current: StoredVersion | None) -> None:
        super().__init__(message)
        self.current = current


class SlotStore:
    """At most one version per slot, under one root directory.

    Thread-safe: writes are serialised, so test-and-set is atomic.  Temporary
    files a crash left behind are removed when the store opens.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._slots = self.root / "slots"
        self._lock = threading.Lock()
        self._slots.mkdir(parents=True, exist_ok=True)
        for leftover in self._slots.glob("*/.*.tmp"):
            leftover.unlink(missing_ok=True)

    def path(self, storage_index: bytes) -> Path:
        """Where the slot ``storage_index`` is stored."""
        if not isinstance(storage_index, bytes) or len(storage_index) != STORAGE_INDEX_SIZE:
            raise UsageError(f"a storage index is {STORAGE_INDEX_SIZE} bytes")
        name = b32encode(storage_index)
        return self._slots / name[:2] / name

    def size(self, storage_index: bytes) -> int | None:
        """Bytes the slot takes on disk, or None if it is not stored."""
        try:
            return self.path(storage_index).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, storage_index: bytes) -> StoredVersion | None:
        """The stored (record, signature), unverified, or None if there is none
        (or the file no longer parses, which a writer may then repair)."""
        path = self.path(storage_index)
        with _disk_errors("read slot"):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
        return _parse(data, path)

    def write(
        self,
        storage_index: bytes,
        record: bytes,
        signature: bytes,
        expected_seq: int | None = None,
    ) -> None:
        """Store a version if it verifies and is newer than the stored one.

        ``expected_seq`` None writes without a test; 0 requires that no valid
        version is stored; k > 0 requires the stored version's seq to be k.
        Storing the very version already stored succeeds (a retried write).
        Raises :class:`BadVersionError` for a version that does not verify,
        :class:`StaleVersionError` (with the stored version) for a refusal.
        """
        path = self.path(storage_index)
        version = verify_version(storage_index, record, signature)
        with self._lock:
            stored_seq, stored = self._current(storage_index)
            if stored == (record, signature):
                return
            if expected_seq is not None and expected_seq != stored_seq:
                raise StaleVersionError(
                    f"slot is at version {stored_seq}, not {expected_seq}", stored
                )
            if version.seq <= stored_seq:
                raise StaleVersionError(
                    f"slot is at version {stored_seq}: version {version.seq} is not newer", stored
                )
            with _disk_errors("write slot"):
                created = not path.parent.exists()
                path.parent.mkdir(exist_ok=True)
                with atomic_output(path, _FILE_MODE) as f:
                    f.write(msgpack.packb([record, signature], use_bin_type=True))
                if created:
                    fsync_dir(self._slots)

    def delete(self, storage_index: bytes) -> bool:
        """Remove the slot (its last lease went); False if none was stored."""
        path = self.path(storage_index)
        with self._lock, _disk_errors("delete slot"):
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            fsync_dir(path.parent)
            with contextlib.suppress(OSError):
                path.parent.rmdir()
            return True

    def _current(self, storage_index: bytes) -> tuple[int, StoredVersion | None]:
        """The stored version's seq and bytes, or (0, None) if none is stored
        or what is stored does not verify (it may then be replaced)."""
        stored = self.read(storage_index)
        if stored is None:
            return 0, None
        try:
            return verify_version(storage_index, *stored).seq, stored
        except BadVersionError as e:
            log.warning("slot %s holds a bad version (%s)", b32encode(storage_index), e)
            return 0, None


def _parse(data: bytes, path: Path) -> StoredVersion | None:
    with contextlib.suppress(Exception):
        if len(data) <= _MAX_FILE:
            item = msgpack.unpackb(data, raw=False)
            if (
                isinstance(item, list)
                and len(item) == 2
                and all(isinstance(x, bytes) for x in item)
            ):
                return item[0], item[1]
    log.warning("slot file %s is unreadable", os.fspath(path))
    return None
