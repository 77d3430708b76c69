"""Directories: an immutable, serialized map name → entry (pure, no I/O).

A directory is stored as an immutable CHK file (or a literal cap when tiny),
so its contents are encrypted like any file and its cap sits in its parent's
entry; the tree's root directory cap lives in a mutable slot.  Serialized as
canonical msgpack::

    {"entries": [[name, kind, cap, size, mode, mtime_ns, ctime_ns, target, xattrs, data,
                  uid, gid, rdev, extra], ...],
     "version": 2}

with entries sorted by name.  ``kind`` is "file", "dir", "symlink", or a
special file: "fifo", "chr", "blk", "sock"; ``cap`` is the child's read cap
("" for symlinks, special files and inline files); ``xattrs`` maps user
attribute names to bytes; ``data`` is nil, or the whole content of a small
file kept inside its directory (encrypted with it): such a file costs no
upload of its own.  ``uid`` and ``gid`` are nil for an entry without an
owner (made by the tree commands): it belongs to whoever mounts the tree.
``extra`` maps names of optional properties to values (absent: the default);
new properties go there, so adding one needs no new format version.

Version 1 directories (before chunked files) are refused with one error that
names the version.  Queued entries (the work queue's ``addpath`` steps) may
still have the 10 or 13 fields of older releases: :meth:`Entry.from_wire`
reads those too.
"""

from __future__ import annotations

import logging
import stat
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from .errors import FormatError, UsageError

log = logging.getLogger(__name__)
VERSION = 2
SPECIAL_KINDS = ("fifo", "chr", "blk", "sock")
"""Special files: metadata only (mode, owner, and ``rdev`` for devices)."""
KINDS = ("file", "dir", "symlink", *SPECIAL_KINDS)
MAX_NAME_BYTES = 255
MAX_ENTRIES = 1_000_000
"""Entries of one directory at most (a listing larger than this is refused)."""
MAX_DIR_BYTES = 512 * 1024 * 1024
"""Serialized size of one directory at most."""
MAX_CAP_CHARS = 1024
MAX_TARGET_BYTES = 4096
"""A symlink's target at most (PATH_MAX)."""
MAX_XATTR_VALUE = 64 * 1024
INLINE_MAX = 16 * 1024
"""Files up to this size may live inside their directory."""
DIR_INLINE_BUDGET = 1024 * 1024
"""At most this many bytes of inline files per directory, so that rewriting a
directory for one change stays cheap; beyond it files get their own upload."""
_S_IFMT = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
    "sock": stat.S_IFSOCK,
}
KIND_OF_FORMAT = {fmt: kind for kind, fmt in _S_IFMT.items()}
"""``stat.S_IFMT(mode)`` → entry kind."""
_LEGACY_FIELDS, _OWNED_FIELDS, _FIELDS = 10, 13, 14
MAX_EXTRA = 32
"""Optional properties of one entry at most."""
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755


class NameError_(UsageError):
    """A file name gridfs cannot store."""


def name_problem(name: object) -> str | None:
    """What makes ``name`` unfit to be one path component on any system
    (None if nothing): it is what a directory may hold, checked on
    :meth:`Directory.unpack` and again before a copy writes a local file."""
    if not isinstance(name, str):
        return "a name must be text"
    if name in ("", ".", ".."):
        return "a name cannot be empty, '.' or '..'"
    if "/" in name or "\0" in name:
        return "a name cannot contain '/' or NUL"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "a name must be valid UTF-8"
    if len(encoded) > MAX_NAME_BYTES:
        return f"a name is at most {MAX_NAME_BYTES} bytes"
    return None


def shown_name(name: object) -> str:
    """``name`` quoted for a one-line message: escapes, at most 40 characters."""
    text = repr(name)
    return text if len(text) <= 42 else text[:39] + "..."


def check_name(name: str) -> str:
    """The stored form of a name: NFC, UTF-8, no ``/`` or NUL, ≤ 255 bytes."""
    if isinstance(name, str):
        name = unicodedata.normalize("NFC", name)
    problem = name_problem(name)
    if problem is not None:
        raise NameError_(f"invalid name {shown_name(name)}: {problem}")
    return name


def split_path(path: str) -> list[str]:
    """``/a/b/c`` → ``["a", "b", "c"]`` (names checked; empty parts and ``.`` skipped)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise NameError_("'..' is not allowed in grid paths")
    return [check_name(p) for p in parts]


def join_path(parts: list[str]) -> str:
    return "/" + "/".join(parts)


@dataclass(frozen=True)
class Entry:
    kind: str
    cap: str
    size: int = 0
    mode: int = DEFAULT_FILE_MODE
    mtime_ns: int = 0
    ctime_ns: int = 0
    target: str = ""
    xattrs: Mapping[str, bytes] = field(default_factory=dict)
    data: bytes | None = None
    """The content of a small file kept inline (then ``cap`` is "")."""
    uid: int | None = None
    """The owner's numeric id as stored (None: an entry written before owners
    were kept, or made by the tree commands; it belongs to whoever mounts)."""
    gid: int | None = None
    rdev: int = 0
    """The device number of a "chr" or "blk" entry (Linux encoding, as st_rdev)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Optional properties by name (msgpack values); see the module docstring."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FormatError(f"unknown entry kind {self.kind!r}")
        if (self.uid is None) != (self.gid is None):
            raise FormatError("an entry needs both a uid and a gid, or neither")
        if self.data is not None and (self.kind != "file" or len(self.data) > INLINE_MAX):
            raise FormatError("only files up to INLINE_MAX bytes can be inline")

    @property
    def inline_size(self) -> int:
        return 0 if self.data is None else len(self.data)

    @property
    def is_dir(self) -> bool:
        return self.kind == "dir"

    @property
    def st_mode(self) -> int:
        return _S_IFMT[self.kind] | (self.mode & 0o7777)

    @property
    def owned(self) -> bool:
        return self.uid is not None

    def to_wire(self, name: str) -> list[Any]:
        """The msgpack form (the 14 fields of version 2)."""
        return [
            name,
            self.kind,
            self.cap,
            self.size,
            self.mode,
            self.mtime_ns,
            self.ctime_ns,
            self.target,
            dict(sorted(self.xattrs.items())),
            self.data,
            self.uid,
            self.gid,
            self.rdev,
            dict(sorted(self.extra.items())),
        ]

    @classmethod
    def from_wire(cls, item: Any) -> tuple[str, Entry]:
        if not isinstance(item, list) or len(item) not in (_LEGACY_FIELDS, _OWNED_FIELDS, _FIELDS):
            raise FormatError("directory entry has the wrong shape")
        name, kind, cap, size, mode, mtime, ctime, target, xattrs, data = item[:_LEGACY_FIELDS]
        uid, gid, rdev = item[_LEGACY_FIELDS:_OWNED_FIELDS] or (None, None, 0)
        extra = item[_OWNED_FIELDS] if len(item) == _FIELDS else {}
        if not isinstance(extra, dict) or len(extra) > MAX_EXTRA:
            raise FormatError("directory entry has bad extra properties")
        if not all(isinstance(k, str) and 0 < len(k) <= 64 for k in extra):
            raise FormatError("directory entry has bad extra properties")
        if not all(v is None or (type(v) is int and 0 <= v < 1 << 32) for v in (uid, gid)):
            raise FormatError("directory entry has a bad owner")
        if type(rdev) is not int or not 0 <= rdev < 1 << 64:
            raise FormatError("directory entry has a bad device number")
        if data is not None and not isinstance(data, bytes):
            raise FormatError("directory entry has bad inline data")
        ints = (size, mode, mtime, ctime)
        if not (isinstance(name, str) and isinstance(cap, str) and isinstance(target, str)):
            raise FormatError("directory entry has the wrong types")
        if not all(type(v) is int for v in ints) or not isinstance(xattrs, dict):
            raise FormatError("directory entry has the wrong types")
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in xattrs.items()):
            raise FormatError("directory entry has bad xattrs")
        if any(
            not 0 < len(k.encode("utf-8", "replace")) <= MAX_NAME_BYTES
            or "\0" in k
            or len(v) > MAX_XATTR_VALUE
            for k, v in xattrs.items()
        ):
            raise FormatError("directory entry has an xattr out of bounds")
        if size < 0 or mode < 0 or len(cap) > MAX_CAP_CHARS:
            raise FormatError("directory entry has a field out of range")
        if "\0" in target or len(target.encode("utf-8", "replace")) > MAX_TARGET_BYTES:
            raise FormatError("directory entry has a bad symlink target (NUL, or too long)")
        return name, cls(
            kind, cap, size, mode, mtime, ctime, target, xattrs, data, uid, gid, rdev, extra
        )

    def with_(self, **changes: Any) -> Entry:
        return replace(self, **changes)


@dataclass(frozen=True)
class Directory:
    """An immutable directory listing."""

    entries: Mapping[str, Entry] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.entries))

    def get(self, name: str) -> Entry | None:
        return self.entries.get(name)

    def with_entry(self, name: str, entry: Entry | None) -> Directory:
        """A copy with ``name`` set to ``entry`` (removed if None)."""
        entries = dict(self.entries)
        if entry is None:
            entries.pop(name, None)
        else:
            entries[check_name(name)] = entry
        return Directory(entries)

    def pack(self) -> bytes:
        return msgpack.packb(
            {
                "entries": [self.entries[name].to_wire(name) for name in sorted(self.entries)],
                "version": VERSION,
            }
        )

    @classmethod
    def unpack(cls, data: bytes) -> Directory:
        """Parse a stored directory.  Any writer of the tree can store any
        bytes as a directory, so the listing is bounded (size, number of
        entries, fields: beyond a bound the whole directory is refused with
        one :class:`FormatError`), and each name is checked
        (:func:`name_problem`; names must also be unique).  An entry with a
        bad name is left out, with a warning that names the problem: gridfs
        never writes one, and refusing the whole directory would let one
        such entry make the rest of it (or a whole tree, from its root)
        unreadable and unchangeable.  The next change to the directory
        drops it for good."""
        if len(data) > MAX_DIR_BYTES:
            raise FormatError(f"directory larger than {MAX_DIR_BYTES} bytes")
        try:
            d = msgpack.unpackb(data, raw=False)
        except Exception as e:
            raise FormatError(f"directory is not msgpack: {type(e).__name__}") from None
        if not isinstance(d, dict):
            raise FormatError("directory is not a map")
        version = d.get("version")
        if version != VERSION:
            raise FormatError(_version_problem(version))
        entries = d.get("entries")
        if not isinstance(entries, list):
            raise FormatError("directory has no entry list")
        if len(entries) > MAX_ENTRIES:
            raise FormatError(f"directory has more than {MAX_ENTRIES} entries")
        out: dict[str, Entry] = {}
        for i, item in enumerate(entries):
            name, entry = Entry.from_wire(item)
            problem = name_problem(name)
            if problem is None and name in out:
                problem = "a second entry of that name"
            if problem is not None:
                log.warning(
                    "directory entry %d skipped: bad name %s: %s", i, shown_name(name), problem
                )
                continue
            out[name] = entry
        return cls(out)


def _version_problem(version: object) -> str:
    if isinstance(version, int) and 0 < version < VERSION:
        return (
            f"this tree is in directory format version {version}, which this gridfs no "
            f"longer reads (it reads version {VERSION}): copy it out with the release "
            "that wrote it"
        )
    return f"directory format version {version!r} is unknown (this gridfs reads {VERSION})"


EMPTY = Directory()
