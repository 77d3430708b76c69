"""Packs and slice caps: many small files in one stored file, each readable
only with its own cap."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridfs import caps
from gridfs.caps import ReadCap, SliceCap, stored_cap
from gridfs.crypto import aes_ctr
from gridfs.errors import CapError
from gridfs.pack import PACK_MAX, build_pack, group_for_packs, open_slice
from gridfs.reach import storage_index_of

PACK = ReadCap(b"k" * 32, b"u" * 32, 3, 10, 1000)


@given(st.binary(min_size=32, max_size=32), st.integers(0, 1000), st.integers(0, 1000))
def test_slice_cap_round_trip(key: bytes, offset: int, length: int) -> None:
    if offset + length > PACK.size:
        with pytest.raises(CapError, match="outside its pack"):
            SliceCap(key, offset, length, PACK)
        return
    cap = SliceCap(key, offset, length, PACK)
    text = cap.to_string()
    assert text.startswith("gridfs:slice:") and text.endswith(PACK.to_string()[11:])
    assert caps.parse(text) == cap == caps.parse_read_cap(text)
    assert cap.size == length
    assert cap.storage_index == PACK.storage_index == storage_index_of(text)
    assert cap.verify_cap() == PACK.verify_cap()
    assert stored_cap(text) == PACK.to_string()


GOOD = SliceCap(b"s" * 32, 10, 20, PACK).to_string()


@pytest.mark.parametrize(
    "text",
    [
        GOOD.replace(":10:20:", ":010:20:"),  # one spelling per number
        GOOD.replace(":10:20:", ":990:20:"),  # beyond the pack's end
        GOOD.replace("gridfs:slice:", "gridfs:slice:a"),  # key of the wrong size
        GOOD.replace(":3:10:1000", ":3:2:1000"),  # the pack's k > n
        GOOD[:-5],  # the pack cap cut short
        GOOD + ":7",
        "gridfs:slice:" + "a" * 52 + ":0:0:lit:",
    ],
)
def test_malformed_slice_caps_are_refused_on_one_line(text: str) -> None:
    with pytest.raises(CapError) as e:
        caps.parse(text)
    assert "\n" not in str(e.value)


def test_stored_cap_of_other_caps_is_themselves() -> None:
    assert stored_cap(PACK.to_string()) == PACK.to_string()
    assert stored_cap("gridfs:lit:") == "gridfs:lit:"
    assert stored_cap("gridfs:slice:nonsense") == "gridfs:slice:nonsense"


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=12))
def test_each_file_comes_back_from_its_slice(bodies: list[bytes]) -> None:
    data, members = build_pack(bodies)
    assert len(data) == sum(map(len, bodies))
    pack = ReadCap(b"k" * 32, b"u" * 32, 3, 10, len(data))
    for body, m in zip(bodies, members, strict=True):
        cap = m.slice_of(pack)
        assert open_slice(cap, 0, data[cap.offset : cap.offset + cap.length]) == body
        if len(body) > 5:  # any range of it, on its own
            assert open_slice(cap, 3, data[cap.offset + 3 : cap.offset + 5]) == body[3:5]


def test_a_slice_cap_opens_its_file_and_no_neighbour() -> None:
    """Least authority: the pack's read cap is inside every slice cap, but
    what it decrypts is each file's own ciphertext, useless without that
    file's key."""
    secret, mine = b"the neighbour's secret diary " * 20, b"my shared file " * 20
    data, members = build_pack([secret, mine])
    pack = ReadCap(b"k" * 32, b"u" * 32, 3, 10, len(data))
    my_cap = members[1].slice_of(pack)
    assert secret not in data and mine not in data
    neighbour = data[members[0].offset : members[0].offset + members[0].length]
    with_my_key = open_slice(my_cap, 0, neighbour)
    assert with_my_key != secret and b"diary" not in with_my_key
    assert members[0].key != members[1].key
    assert aes_ctr(members[0].key, 0, neighbour) == secret  # only its own key opens it


def test_groups_stay_within_the_pack_limit_and_keep_order() -> None:
    sizes = [16384] * 1200
    groups = group_for_packs(sizes)
    assert [i for g in groups for i in g] == list(range(1200))
    assert all(sum(sizes[i] for i in g) <= PACK_MAX for g in groups)
    assert len(groups) == -(-1200 * 16384 // PACK_MAX)
    assert group_for_packs([]) == []
    assert group_for_packs([5, 5, 5], limit=10) == [[0, 1], [2]]
