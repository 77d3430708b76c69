"""Extent lists (gridfs.extents) against a model: a set of byte offsets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridfs.extents import add, check, clip, pieces, subtract, total, union

ranges = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)), max_size=12)


def covered(extents: list[tuple[int, int]]) -> set[int]:
    return {o for off, n in extents for o in range(off, off + n)}


def build(raw: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, n in raw:
        out = add(out, off, n)
    return out


@given(ranges)
def test_add_and_union_cover_what_was_added_and_stay_well_formed(
    raw: list[tuple[int, int]],
) -> None:
    extents = build(raw)
    assert check(extents) == extents
    assert covered(extents) == covered(raw)
    assert union(raw, []) == extents
    assert total(extents) == len(covered(raw))


@given(ranges, ranges, st.integers(0, 250))
def test_clip_subtract_and_pieces_match_the_model(
    a: list[tuple[int, int]], b: list[tuple[int, int]], size: int
) -> None:
    x, y = build(a), build(b)
    assert covered(clip(x, size)) == {o for o in covered(x) if o < size}
    assert covered(subtract(x, y)) == covered(x) - covered(y)
    assert check(subtract(x, y)) == subtract(x, y)
    cut = list(pieces(x, 10, size))
    assert sum(n for _, n, _ in cut) == size
    for off, n, inside in cut:
        assert all((o in covered(x)) == inside for o in range(off, off + n))


@pytest.mark.parametrize(
    "bad", [[(5, 0)], [(-1, 3)], [(10, 5), (0, 2)], [(0, 5), (5, 1)], [(0, "x")], "no"]
)
def test_a_malformed_journal_entry_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        check(bad)
