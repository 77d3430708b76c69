"""Immutable files as local share files: ``gridfs debug encode/decode``.

Each share is one self-contained file ``<storage index>.<share number>.share``
in the format of :mod:`gridfs.layout`; any k of them rebuild the file.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .caps import LITERAL_MAX, ChunkedCap, LiteralCap, ReadCap, SliceCap, b32encode, parse_read_cap
from .codec import DEFAULT_K, DEFAULT_N, DEFAULT_SEGMENT_SIZE, params_for_size
from .crypto import random_key
from .errors import CorruptShareError, FormatError, GridError, NotEnoughSharesError, UsageError
from .fileutil import atomic_output, drop_cache, fsync_dir
from .hashes import PlaintextHasher, convergence_key
from .immutable import EncodedSegment, FileDecoder, FileEncoder, ForeignShareError, VerifiedBlock
from .layout import HEADER
from .pipeline import ordered_map

Warn = Callable[[str], None]
READ_CHUNK = 1 << 20


def share_filename(storage_index: bytes, sharenum: int) -> str:
    return f"{b32encode(storage_index)}.{sharenum}.share"


def file_key(path: Path, secret: bytes | None, params_string: str, drop: bool = False) -> bytes:
    """Convergent key with a secret (same file → same cap), else a random one.
    ``drop``: the file is read once, let the page cache go of it behind the reads."""
    if secret is None:
        return random_key()
    hasher = PlaintextHasher()
    with open(path, "rb") as f:
        offset = 0
        while chunk := f.read(READ_CHUNK):
            hasher.update(chunk)
            if drop:
                drop_cache(f.fileno(), offset, len(chunk))
            offset += len(chunk)
    return convergence_key(secret, params_string, hasher.digest())


def read_segments(path: Path, encoder: FileEncoder) -> Iterator[tuple[int, bytes]]:
    g = encoder.geometry
    with open(path, "rb") as f:
        for j in range(g.num_segments):
            data = f.read(g.segment_size(j))
            if len(data) != g.segment_size(j):
                raise GridError(f"{path} changed size while being encoded")
            yield j, data


def encode_file(
    path: Path,
    outdir: Path,
    k: int = DEFAULT_K,
    n: int = DEFAULT_N,
    segment_size: int = DEFAULT_SEGMENT_SIZE,
    secret: bytes | None = None,
    workers: int | None = None,
) -> LiteralCap | ReadCap:
    """Encode ``path`` into n share files in ``outdir``; return its read cap."""
    size = os.stat(path).st_size
    params = params_for_size(k, n, segment_size, size)
    if size <= LITERAL_MAX:
        return LiteralCap(Path(path).read_bytes())
    encoder = FileEncoder(file_key(path, secret, params.serialize()), params, size)
    outdir.mkdir(parents=True, exist_ok=True)
    names = [share_filename(encoder.storage_index, i) for i in range(n)]
    tmps = [outdir / f".{name}.tmp" for name in names]
    fds: list[int] = []
    try:
        for tmp in tmps:
            fds.append(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        g = encoder.geometry

        def encode(item: tuple[int, bytes]) -> EncodedSegment:
            return encoder.encode_segment(*item)

        for seg in ordered_map(encode, read_segments(path, encoder), workers):
            offset = g.record_span(seg.index)[0] + g.proof_size
            for fd, block in zip(fds, seg.blocks, strict=True):
                os.pwrite(fd, block, offset)
        finished = encoder.finish()
        for i, fd in enumerate(fds):
            os.pwrite(fd, finished.head(i), 0)
            for j in range(g.num_segments):
                os.pwrite(fd, finished.record_proofs(i, j), g.record_span(j)[0])
            os.fsync(fd)
        for tmp, name in zip(tmps, names, strict=True):
            os.replace(tmp, outdir / name)
        fsync_dir(outdir)
        return finished.cap
    finally:
        for fd in fds:
            os.close(fd)
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


class _ShareFiles:
    """The good shares found in a directory, shrinking as corruption is found."""

    def __init__(self, decoder: FileDecoder, warn: Warn) -> None:
        self.decoder = decoder
        self.warn = warn
        self.paths: dict[int, Path] = {}
        self._lock = threading.Lock()

    def scan(self, directory: Path) -> None:
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            try:
                with open(path, "rb") as f:
                    head = f.read(HEADER.size)
                    length = FileDecoder.head_length(head)
                    head += f.read(length - len(head))
                num = self.decoder.accept_head(head)
            except ForeignShareError:
                self.warn(f"skipping {path.name}: a share of another file")
                continue
            except (FormatError, CorruptShareError) as e:
                self.warn(f"skipping {path.name}: {e}")
                continue
            except OSError as e:
                self.warn(f"skipping {path.name}: {e.strerror}")
                continue
            self.paths.setdefault(num, path)

    def drop(self, num: int, reason: str) -> None:
        with self._lock:
            path = self.paths.pop(num, None)
        if path is not None:
            self.warn(f"skipping {path.name}: {reason}")

    def read_block(self, num: int, j: int) -> VerifiedBlock | None:
        with self._lock:
            path = self.paths.get(num)
        if path is None:
            return None
        offset, length = self.decoder.record_span(j)
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), length, offset)
            return self.decoder.verify_record(num, j, data)
        except CorruptShareError as e:
            self.drop(num, str(e))
        except OSError as e:
            self.drop(num, e.strerror or str(e))
        return None

    def candidates(self, k: int) -> list[int]:
        with self._lock:
            nums = sorted(self.paths)
        # Primary shares (< k) first: k of them decode without any arithmetic.
        return sorted(nums, key=lambda i: (i >= k, i))


def decode_to(
    cap_text: str, sharedir: Path, out: Path, warn: Warn, workers: int | None = None
) -> int:
    """Rebuild the file named by ``cap_text`` from share files; return its size.

    Corrupt and foreign files are named through ``warn`` and skipped; with
    fewer than k good shares nothing is left at ``out``.
    """
    cap = parse_read_cap(cap_text)
    if isinstance(cap, SliceCap):
        raise UsageError(
            "a slice cap names a file inside a pack, not shares of its own:"
            " `gridfs get` reads it from the grid"
        )
    if isinstance(cap, ChunkedCap):
        raise UsageError(
            "a chunked cap names a manifest and its chunks, each with shares of its own:"
            " `gridfs get` reads it from the grid"
        )
    if isinstance(cap, LiteralCap):
        with atomic_output(out) as f:
            f.write(cap.data)
        return cap.size
    if not sharedir.is_dir():
        raise UsageError(f"{sharedir} is not a directory")
    decoder = FileDecoder(cap)
    shares = _ShareFiles(decoder, warn)
    shares.scan(sharedir)
    if len(shares.paths) < cap.k or decoder.geometry is None:
        raise NotEnoughSharesError(
            f"found {len(shares.paths)} good shares in {sharedir}, {cap.k} are needed"
        )
    geometry = decoder.geometry

    def segment(j: int) -> bytes:
        while True:
            blocks: list[VerifiedBlock] = []
            for num in shares.candidates(cap.k):
                block = shares.read_block(num, j)
                if block is not None:
                    blocks.append(block)
                if len(blocks) == cap.k:
                    break
            else:
                raise NotEnoughSharesError(
                    f"segment {j}: only {len(blocks)} good shares left, {cap.k} are needed"
                )
            decoded = decoder.decode_segment(j, blocks)
            for num in decoded.bad_proofs:
                shares.drop(num, f"share {num} is corrupt: bad ciphertext proof in record {j}")
            return decoded.data

    with atomic_output(out) as f:
        for data in ordered_map(segment, range(geometry.num_segments), workers):
            f.write(data)
    return cap.size
