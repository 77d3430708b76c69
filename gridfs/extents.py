"""Extents: which byte ranges of a file a local edit holds.

An extent list is a sorted list of ``(offset, length)`` pairs, each of
positive length, none overlapping or touching another (touching ranges are
merged).  The mount records the ranges a file's writes, truncations and
punched holes changed; a queued edit names them (docs/formats.md, "Queued
edits"), and only they are staged and uploaded.  Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

Extents = list[tuple[int, int]]


def add(extents: Extents, offset: int, length: int) -> Extents:
    """``extents`` with ``[offset, offset + length)`` added."""
    if length <= 0:
        return list(extents)
    return union(extents, [(offset, length)])


def union(a: Iterable[tuple[int, int]], b: Iterable[tuple[int, int]]) -> Extents:
    """The ranges in either list, merged."""
    out: Extents = []
    for off, length in sorted([*a, *b]):
        if length <= 0:
            continue
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_off + last_len, off + length) - last_off)
        else:
            out.append((off, length))
    return out


def clip(extents: Extents, size: int) -> Extents:
    """The parts of ``extents`` below ``size`` (a truncation to ``size``)."""
    out: Extents = []
    for off, length in extents:
        if off >= size:
            break
        out.append((off, min(length, size - off)))
    return out


def subtract(extents: Extents, other: Extents) -> Extents:
    """The parts of ``extents`` that ``other`` does not cover."""
    out: Extents = []
    for off, length in extents:
        start, end = off, off + length
        for o_off, o_len in other:
            o_end = o_off + o_len
            if o_end <= start or o_off >= end:
                continue
            if o_off > start:
                out.append((start, o_off - start))
            start = max(start, o_end)
            if start >= end:
                break
        if start < end:
            out.append((start, end - start))
    return out


def total(extents: Extents) -> int:
    """How many bytes the ranges hold."""
    return sum(length for _, length in extents)


def pieces(extents: Extents, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
    """``[offset, offset + length)`` cut at the edges of ``extents``: each
    piece ``(offset, length, inside)`` is wholly in an extent or wholly out."""
    at, end = offset, offset + length
    for off, n in extents:
        if off + n <= at:
            continue
        if off >= end:
            break
        if off > at:
            yield at, off - at, False
            at = off
        stop = min(end, off + n)
        yield at, stop - at, True
        at = stop
    if at < end:
        yield at, end - at, False


def check(extents: object) -> Extents:
    """``extents`` as read from a journal, or ValueError if it is not a
    well-formed extent list (sorted, positive, disjoint, not touching)."""
    if not isinstance(extents, list | tuple):
        raise ValueError("extents: not a list")
    out: Extents = []
    for item in extents:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise ValueError("extents: not (offset, length) pairs")
        off, length = item
        if not isinstance(off, int) or not isinstance(length, int) or off < 0 or length <= 0:
            raise ValueError("extents: a negative or empty range")
        if out and off <= out[-1][0] + out[-1][1]:
            raise ValueError("extents: ranges out of order or overlapping")
        out.append((off, length))
    return out
