"""Erasure coding: the seed's ICodecEncoder/ICodecDecoder on zfec.

A segment of ``segment_size`` bytes (a multiple of k) is cut into k *primary*
blocks; zfec makes blocks ``0 .. n-1`` of which any k rebuild the segment.
Blocks ``0 .. k-1`` are the primary blocks themselves (the code is systematic),
so a reader holding them decodes for free.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import zfec

from .errors import ParamsError

MAX_SHARES = 256
MAX_SEGMENT_SIZE = 64 * 1024 * 1024
DEFAULT_K = 3
DEFAULT_N = 10
DEFAULT_SEGMENT_SIZE = 1024 * 1024

_PARAMS_RE = re.compile(r"zfec-(0|[1-9][0-9]*)-(0|[1-9][0-9]*)-(0|[1-9][0-9]*)")


@dataclass(frozen=True)
class CodecParams:
    """k-of-n encoding of segments of ``segment_size`` bytes (a multiple of k)."""

    k: int
    n: int
    segment_size: int

    def __post_init__(self) -> None:
        check_k_n(self.k, self.n)
        if not 0 < self.segment_size <= MAX_SEGMENT_SIZE:
            raise ParamsError(
                f"segment size must be between 1 and {MAX_SEGMENT_SIZE}, not {self.segment_size}"
            )
        if self.segment_size % self.k:
            raise ParamsError(f"segment size {self.segment_size} is not a multiple of k={self.k}")

    @property
    def block_size(self) -> int:
        return self.segment_size // self.k

    def serialize(self) -> str:
        """A short string a decoder can be built from (see :meth:`parse`)."""
        return f"zfec-{self.k}-{self.n}-{self.segment_size}"

    @classmethod
    def parse(cls, text: str) -> CodecParams:
        m = _PARAMS_RE.fullmatch(text)
        if m is None:
            raise ParamsError(f"not a codec parameter string: {text!r}")
        return cls(int(m[1]), int(m[2]), int(m[3]))


def check_k_n(k: int, n: int) -> None:
    if not 1 <= k <= MAX_SHARES:
        raise ParamsError(f"k must be between 1 and {MAX_SHARES}, not {k}")
    if not k <= n <= MAX_SHARES:
        raise ParamsError(f"n must be between k={k} and {MAX_SHARES}, not {n}")


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def params_for_size(k: int, n: int, max_segment_size: int, file_size: int) -> CodecParams:
    """Parameters for one file: segments no larger than the file needs, rounded
    up to a multiple of k (small files then pad at most k-1 bytes)."""
    check_k_n(k, n)
    if max_segment_size <= 0:
        raise ParamsError(f"segment size must be positive, not {max_segment_size}")
    size = max(1, min(max_segment_size, file_size))
    return CodecParams(k, n, round_up(size, k))


class Encoder:
    """Turns one segment into blocks.  Stateless after construction; safe to
    share between threads (zfec releases the GIL while it computes)."""

    def __init__(self, params: CodecParams) -> None:
        self.params = params
        self._zfec = zfec.Encoder(params.k, params.n)

    def encode(
        self, segment: bytes | memoryview, desired_share_ids: Sequence[int] | None = None
    ) -> list[bytes]:
        """Blocks for ``desired_share_ids`` (default all n), in that order.

        ``segment`` may be shorter than ``segment_size`` (the tail segment): it
        is zero-padded to a multiple of k, and each block is len/k bytes.
        """
        k, n = self.params.k, self.params.n
        if len(segment) > self.params.segment_size:
            raise ParamsError(
                f"segment of {len(segment)} bytes exceeds segment size {self.params.segment_size}"
            )
        ids = list(range(n)) if desired_share_ids is None else list(desired_share_ids)
        for i in ids:
            if not 0 <= i < n:
                raise ParamsError(f"share id {i} out of range 0..{n - 1}")
        padded = round_up(len(segment), k)
        view = memoryview(segment)
        if padded != len(segment):
            view = memoryview(bytes(view) + b"\0" * (padded - len(segment)))
        bs = padded // k
        primary = [view[i * bs : (i + 1) * bs] for i in range(k)]
        out: dict[int, bytes] = {i: bytes(primary[i]) for i in ids if i < k}
        secondary = [i for i in ids if i >= k]
        if secondary:
            for i, block in zip(secondary, self._zfec.encode(primary, secondary), strict=True):
                out[i] = bytes(block)
        return [out[i] for i in ids]


class Decoder:
    """Rebuilds a segment from any k of its blocks."""

    def __init__(self, params: CodecParams) -> None:
        self.params = params
        self._zfec = zfec.Decoder(params.k, params.n)

    def decode(
        self, blocks: Sequence[bytes | memoryview], share_ids: Sequence[int], size: int
    ) -> bytes:
        """The first ``size`` bytes of the segment the k ``blocks`` came from."""
        k, n = self.params.k, self.params.n
        if len(blocks) != k or len(share_ids) != k:
            raise ParamsError(f"decode needs exactly k={k} blocks, got {len(blocks)}")
        if len(set(share_ids)) != k or not all(0 <= i < n for i in share_ids):
            raise ParamsError(f"share ids must be {k} distinct values in 0..{n - 1}")
        if len({len(b) for b in blocks}) != 1:
            raise ParamsError("blocks must all have the same length")
        if size > len(blocks[0]) * k:
            raise ParamsError("size exceeds what the blocks hold")
        if sorted(share_ids) == list(range(k)):
            order = sorted(range(k), key=lambda j: share_ids[j])
            primary: Sequence[bytes | memoryview] = [blocks[j] for j in order]
        else:
            primary = self._zfec.decode(list(blocks), list(share_ids))
        return b"".join(primary)[:size]
