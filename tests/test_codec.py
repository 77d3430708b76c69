import itertools
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridfs.codec import CodecParams, Decoder, Encoder, params_for_size
from gridfs.errors import ParamsError


@pytest.mark.parametrize(
    ("k", "n", "seg"),
    [(0, 3, 3), (4, 3, 12), (1, 257, 1), (3, 10, 10), (3, 10, 0), (-1, 2, 4), (2, 2, 2**40)],
)
def test_bad_params_are_clear_value_errors(k: int, n: int, seg: int) -> None:
    with pytest.raises(ParamsError) as err:
        CodecParams(k, n, seg)
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value)


@given(
    st.integers(1, 256).flatmap(
        lambda k: st.tuples(st.just(k), st.integers(k, 256), st.integers(1, 1000))
    )
)
def test_params_string_round_trip(knm: tuple[int, int, int]) -> None:
    k, n, m = knm
    p = CodecParams(k, n, k * m)
    assert CodecParams.parse(p.serialize()) == p


@pytest.mark.parametrize("text", ["", "zfec-3-10", "zfec-03-10-9", "rs-3-10-9", "zfec-3-10-9 "])
def test_bad_params_string(text: str) -> None:
    with pytest.raises(ParamsError):
        CodecParams.parse(text)


def test_params_for_size_rounds_up_to_k() -> None:
    assert params_for_size(3, 10, 1 << 20, 100).segment_size == 102
    assert params_for_size(3, 10, 1 << 20, 10 << 20).segment_size == 1048578
    assert params_for_size(1, 1, 4096, 0).segment_size == 1


@pytest.mark.parametrize(("k", "n"), [(1, 1), (1, 3), (2, 4), (3, 5), (3, 6), (4, 4)])
def test_every_k_subset_decodes(k: int, n: int) -> None:
    params = CodecParams(k, n, k * 37)
    data = os.urandom(k * 37 - 5)
    blocks = Encoder(params).encode(data)
    dec = Decoder(params)
    for ids in itertools.combinations(range(n), k):
        for order in (ids, ids[::-1]):
            assert dec.decode([blocks[i] for i in order], list(order), len(data)) == data


def test_desired_share_ids_make_only_those() -> None:
    params = CodecParams(3, 10, 30)
    data = os.urandom(30)
    every = Encoder(params).encode(data)
    some = Encoder(params).encode(data, [9, 0, 4])
    assert some == [every[9], every[0], every[4]]
    with pytest.raises(ParamsError):
        Encoder(params).encode(data, [10])


def test_decode_rejects_wrong_inputs() -> None:
    params = CodecParams(2, 4, 8)
    blocks = Encoder(params).encode(b"abcdefgh")
    dec = Decoder(params)
    with pytest.raises(ParamsError):
        dec.decode(blocks[:1], [0], 8)
    with pytest.raises(ParamsError):
        dec.decode([blocks[0], blocks[0]], [0, 0], 8)
    with pytest.raises(ParamsError):
        dec.decode([blocks[0], blocks[1]], [0, 9], 8)
