"""The receive buffer: pieces in, the same bytes out, in any cut."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridfs.protocol.inbox import Inbox


@given(st.lists(st.binary(max_size=50), max_size=12), st.lists(st.integers(0, 60), max_size=12))
def test_takes_give_back_the_bytes_in_order(pieces: list[bytes], takes: list[int]) -> None:
    inbox = Inbox()
    for piece in pieces:
        inbox.append(piece)
    stream = b"".join(pieces)
    at = 0
    for n in takes:
        n = min(n, len(stream) - at)
        assert inbox.peek(4) == stream[at : at + 4]
        assert bytes(inbox.take(n)) == stream[at : at + n]
        at += n
        assert len(inbox) == len(stream) - at
    assert inbox.peek(len(stream)) == stream[at:]


def test_a_take_within_one_piece_is_a_view_of_it() -> None:
    inbox = Inbox()
    inbox.append(b"abcdef")
    view = inbox.take(3)
    assert view.obj is not None and bytes(view.obj) == b"abcdef"
    inbox.append(bytearray(b"gh"))
    assert bytes(inbox.take(5)) == b"defgh"
    assert len(inbox) == 0


def test_taking_more_than_is_here_is_refused() -> None:
    inbox = Inbox()
    inbox.append(b"abc")
    with pytest.raises(ValueError):
        inbox.take(4)
    assert bytes(inbox.take(3)) == b"abc"
