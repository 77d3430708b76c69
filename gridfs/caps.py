"""Capabilities: printable strings that name a file and grant a right over it.

=====================  ==================================================
``gridfs:lit:DATA``     the file's bytes themselves (files ≤ LITERAL_MAX)
``gridfs:chk:KEY:UEB:K:N:SIZE``         read cap: decrypt and verify
``gridfs:chk-verify:SI:UEB:K:N:SIZE``   verify cap: check shares, cannot read
``gridfs:slice:FKEY:OFFSET:LENGTH:KEY:UEB:K:N:SIZE``  one file in a pack
``gridfs:chunked:KEY:UEB:K:N:MSIZE:SIZE``         a chunked file (read cap)
``gridfs:chunked-verify:SI:UEB:K:N:MSIZE:SIZE``   its verify cap
=====================  ==================================================

KEY is the 32-byte AES key, UEB the 32-byte hash of the extension block, SI
the 16-byte storage index; binary fields are lowercase RFC 4648 base32
without padding.  A slice cap names LENGTH bytes at OFFSET of the pack whose
read cap follows, and FKEY, the key of that file alone (see
:mod:`gridfs.pack`).  A chunked cap is the read (or verify) cap of the
file's manifest, a CHK object of MSIZE bytes (:mod:`gridfs.manifest`),
followed by SIZE, the size of the file it describes.  Parsing is strict: one spelling per cap, or
:class:`CapError`.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from .codec import check_k_n
from .crypto import KEY_SIZE
from .errors import CapError, ParamsError
from .hashes import HASH_SIZE, STORAGE_INDEX_SIZE, storage_index, tagged_hash

# A literal cap for LITERAL_MAX bytes (103 base32 characters + an 11-character
# prefix) is still shorter than the shortest CHK cap (123 characters), and
# saves n share files of ~350 bytes each: every file up to this size is
# strictly cheaper as a literal.
LITERAL_MAX = 64
MAX_FILE_SIZE = 2**64 - 1


def b32encode(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def b32decode(text: str, size: int | None = None, what: str = "field") -> bytes:
    if not re.fullmatch(r"[a-z2-7]*", text):
        raise CapError(f"{what} is not lowercase base32")
    try:
        data = base64.b32decode(text.upper() + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise CapError(f"{what} is not valid base32") from None
    if b32encode(data) != text:
        raise CapError(f"{what} is not canonical base32")
    if size is not None and len(data) != size:
        raise CapError(f"{what} must be {size} bytes, not {len(data)}")
    return data


@dataclass(frozen=True)
class LiteralCap:
    """A tiny file carried inside its own cap."""

    data: bytes

    def __post_init__(self) -> None:
        if len(self.data) > LITERAL_MAX:
            raise CapError(f"literal caps hold at most {LITERAL_MAX} bytes")

    @property
    def size(self) -> int:
        return len(self.data)

    def to_string(self) -> str:
        return "gridfs:lit:" + b32encode(self.data)


@dataclass(frozen=True)
class VerifyCap:
    """Names an immutable file's shares and lets anyone check them, not read them."""

    storage_index: bytes
    ueb_hash: bytes
    k: int
    n: int
    size: int

    def __post_init__(self) -> None:
        _check_common(self.ueb_hash, self.k, self.n, self.size)
        if len(self.storage_index) != STORAGE_INDEX_SIZE:
            raise CapError("storage index must be 16 bytes")

    def to_string(self) -> str:
        return (
            f"gridfs:chk-verify:{b32encode(self.storage_index)}:{b32encode(self.ueb_hash)}"
            f":{self.k}:{self.n}:{self.size}"
        )


@dataclass(frozen=True)
class ReadCap:
    """Reads (decrypts and verifies) an immutable file."""

    key: bytes
    ueb_hash: bytes
    k: int
    n: int
    size: int

    def __post_init__(self) -> None:
        _check_common(self.ueb_hash, self.k, self.n, self.size)
        if len(self.key) != KEY_SIZE:
            raise CapError("key must be 32 bytes")

    @property
    def storage_index(self) -> bytes:
        return storage_index(self.key)

    def verify_cap(self) -> VerifyCap:
        return VerifyCap(self.storage_index, self.ueb_hash, self.k, self.n, self.size)

    def to_string(self) -> str:
        return (
            f"gridfs:chk:{b32encode(self.key)}:{b32encode(self.ueb_hash)}"
            f":{self.k}:{self.n}:{self.size}"
        )


@dataclass(frozen=True)
class SliceCap:
    """Reads one small file kept in a pack: where it lies in the pack and
    the key of that file alone.  The pack's own read cap only opens the other
    files' ciphertext, so a slice cap grants this file and nothing beside it."""

    key: bytes
    offset: int
    length: int
    pack: ReadCap

    def __post_init__(self) -> None:
        if len(self.key) != KEY_SIZE:
            raise CapError("key must be 32 bytes")
        if self.offset < 0 or self.length < 0 or self.offset + self.length > self.pack.size:
            raise CapError("slice lies outside its pack")

    @property
    def size(self) -> int:
        return self.length

    @property
    def storage_index(self) -> bytes:
        return self.pack.storage_index

    def verify_cap(self) -> VerifyCap:
        return self.pack.verify_cap()

    def to_string(self) -> str:
        pack = self.pack.to_string().removeprefix("gridfs:chk:")
        return f"gridfs:slice:{b32encode(self.key)}:{self.offset}:{self.length}:{pack}"


class _ManifestAndSize:
    """What the two chunked caps share: a manifest's cap and the file's size."""

    manifest: ReadCap | VerifyCap
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.size <= MAX_FILE_SIZE:
            raise CapError("file size out of range")

    @property
    def storage_index(self) -> bytes:
        return self.manifest.storage_index


@dataclass(frozen=True)
class ChunkedVerifyCap(_ManifestAndSize):
    """Checks the shares of a chunked file's manifest (the chunk list is
    encrypted: checking the chunks themselves takes the read cap)."""

    manifest: VerifyCap
    size: int

    def to_string(self) -> str:
        inner = self.manifest.to_string().removeprefix("gridfs:chk-verify:")
        return f"gridfs:chunked-verify:{inner}:{self.size}"


@dataclass(frozen=True)
class ChunkedCap(_ManifestAndSize):
    """Reads a large file stored as chunks: the read cap of its manifest
    (an ordinary CHK object listing the chunks' caps and the holes) and the
    file's size, which the manifest must state too."""

    manifest: ReadCap
    size: int

    def verify_cap(self) -> ChunkedVerifyCap:
        return ChunkedVerifyCap(self.manifest.verify_cap(), self.size)

    def to_string(self) -> str:
        inner = self.manifest.to_string().removeprefix("gridfs:chk:")
        return f"gridfs:chunked:{inner}:{self.size}"


ImmutableCap = LiteralCap | ReadCap | VerifyCap | SliceCap | ChunkedCap | ChunkedVerifyCap
FileCap = LiteralCap | ReadCap | SliceCap | ChunkedCap
"""What reads a file's bytes."""

_INT = r"(0|[1-9][0-9]{0,19})"
_CHUNKED_RE = re.compile(
    rf"gridfs:(chunked|chunked-verify):((?:[a-z2-7]+:){{2}}{_INT}:{_INT}:{_INT}):{_INT}"
)
_LIT_RE = re.compile(r"gridfs:lit:([a-z2-7]*)")
_CHK_RE = re.compile(rf"gridfs:(chk|chk-verify):([a-z2-7]+):([a-z2-7]+):{_INT}:{_INT}:{_INT}")
_SLICE_RE = re.compile(rf"gridfs:slice:([a-z2-7]+):{_INT}:{_INT}:(.*)")


def parse(text: str) -> ImmutableCap:
    """Parse a cap string; a malformed one raises a one-line :class:`CapError`."""
    if not isinstance(text, str):
        raise CapError("a cap must be a string")
    shown = quoted_cap(text)
    stripped = text.strip()
    m = _LIT_RE.fullmatch(stripped)
    if m:
        data = b32decode(m[1], what="literal data")
        if len(data) > LITERAL_MAX:
            raise CapError(f"literal cap holds more than {LITERAL_MAX} bytes")
        return LiteralCap(data)
    m = _SLICE_RE.fullmatch(stripped)
    if m is not None:
        try:
            pack = parse("gridfs:chk:" + m[4])
        except CapError as e:
            raise CapError(f"bad pack in slice cap: {e}") from None
        assert isinstance(pack, ReadCap)
        return SliceCap(b32decode(m[1], KEY_SIZE, "slice key"), int(m[2]), int(m[3]), pack)
    m = _CHUNKED_RE.fullmatch(stripped)
    if m is not None:
        verify = m[1] == "chunked-verify"
        inner = parse(("gridfs:chk-verify:" if verify else "gridfs:chk:") + m[2])
        if isinstance(inner, VerifyCap):
            return ChunkedVerifyCap(inner, int(m[6]))
        assert isinstance(inner, ReadCap)
        return ChunkedCap(inner, int(m[6]))
    m = _CHK_RE.fullmatch(stripped)
    if m is None:
        raise CapError(f"not a gridfs cap: {shown}")
    kind, first, ueb, k, n, size = m.groups()
    ueb_hash = b32decode(ueb, HASH_SIZE, "extension block hash")
    if kind == "chk":
        return ReadCap(b32decode(first, KEY_SIZE, "key"), ueb_hash, int(k), int(n), int(size))
    return VerifyCap(
        b32decode(first, STORAGE_INDEX_SIZE, "storage index"), ueb_hash, int(k), int(n), int(size)
    )


def parse_read_cap(text: str) -> FileCap:
    cap = parse(text)
    if isinstance(cap, VerifyCap | ChunkedVerifyCap):
        raise CapError("a verify cap cannot read a file; a read cap (gridfs:chk:...) is needed")
    return cap


def stored_cap(text: str) -> str:
    """The cap of what is stored for ``text``: a slice's pack, else itself
    (leases, checks and repairs are per stored object)."""
    if text.startswith("gridfs:slice:"):
        try:
            cap = parse(text)
        except CapError:
            return text
        if isinstance(cap, SliceCap):
            return cap.pack.to_string()
    return text


def _check_common(ueb_hash: bytes, k: int, n: int, size: int) -> None:
    if len(ueb_hash) != HASH_SIZE:
        raise CapError("extension block hash must be 32 bytes")
    try:
        check_k_n(k, n)
    except ParamsError as e:
        raise CapError(f"bad cap: {e}") from None
    if not 0 <= size <= MAX_FILE_SIZE:
        raise CapError("file size out of range")


# -- naming caps where they must not appear ----------------------------------

LOG_NAME_CHARS = 12
"""Characters of base32 in a log name: 60 bits, enough to tell objects apart
in a log, far too few to matter when the name is public anyway."""
_TAG_LOG_NAME = b"gridfs:v1:log-name"
_CAP_TEXT_RE = re.compile(r"gridfs:[a-z-]+:[a-z2-7:0-9]*")


def log_name(cap: object) -> str:
    """What logs, status pages and messages show for a cap: never the cap
    nor any part of it.

    A cap that names stored data is shown by its storage index (public: every
    server holding a share knows it), as ``si:`` and the first
    :data:`LOG_NAME_CHARS` base32 characters.  Anything else (a literal cap,
    whose text is the file itself, or text that does not parse) is shown as a
    tagged hash of it, ``h:`` and as many characters."""
    text = cap if isinstance(cap, str) else getattr(cap, "to_string", str)()
    from .reach import storage_index_of  # reach imports this module

    si = storage_index_of(text.strip())
    if si is not None:
        return "si:" + b32encode(si)[:LOG_NAME_CHARS]
    return (
        "h:"
        + b32encode(tagged_hash(_TAG_LOG_NAME, text.encode("utf-8", "replace")))[:LOG_NAME_CHARS]
    )


def quoted_cap(text: str) -> str:
    """How an error quotes text that should have been a cap: whatever is
    not a cap in full (up to 40 characters), but of anything that starts
    like one only its kind, since the rest may be a key."""
    if text.strip().startswith("gridfs:"):
        kind = text.strip().split(":", 2)[1][:20]
        return repr(f"gridfs:{kind}:...")
    return repr(text if len(text) <= 40 else text[:37] + "...")


def redact_caps(text: str) -> str:
    """``text`` with every cap in it replaced by its :func:`log_name` (for
    messages that may quote one, such as an error shown on a status page)."""
    return _CAP_TEXT_RE.sub(lambda m: log_name(m[0].rstrip(":")), text)
