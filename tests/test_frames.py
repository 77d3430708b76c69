"""Frames with Blobs: byte for byte the frame of the same message with the
Blobs joined, their bytes copied once."""

from __future__ import annotations

import os
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridfs.protocol.connection import Connection, LocalProtocolError, Request, Role
from gridfs.protocol.frames import LENGTH, Blob, FrameTooLarge, bin_header, frame_pieces, pack_frame
from gridfs.protocol.schema import MAX_FRAME

from .test_protocol import handshaken_pair, request


def plain_frame(msg: Any) -> bytes:
    """The frame as msgpack makes it, every Blob joined first."""

    def joined(obj: Any) -> bytes:
        if isinstance(obj, Blob):
            return bytes(obj)
        raise TypeError(type(obj))

    body = msgpack.packb(msg, use_bin_type=True, default=joined)
    return LENGTH.pack(len(body)) + body


parts = st.lists(st.binary(max_size=300), max_size=4)
blobs = parts.map(Blob)
leaves = st.one_of(
    st.none(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=20), st.binary(max_size=40), blobs
)
messages = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@given(messages)
def test_a_frame_with_blobs_is_the_frame_of_their_bytes(msg: Any) -> None:
    assert pack_frame(msg, MAX_FRAME) == plain_frame(msg)


@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536, 1 << 20])
def test_bin_headers_are_msgpacks_shortest(size: int) -> None:
    packed = msgpack.packb(b"x" * size, use_bin_type=True)
    assert packed[: len(bin_header(size))] == bin_header(size)
    assert pack_frame(Blob([b"x" * size]), MAX_FRAME) == plain_frame(b"x" * size)


def test_a_blob_in_many_parts_arrives_as_one_bin() -> None:
    data = [os.urandom(n) for n in (100, 70_000, 1, 300_000)]
    client, server = handshaken_pair()
    args = {
        "si": b"s" * 16,
        "sharenum": 3,
        "data": Blob(data),
        "renew_secret": b"r" * 32,
        "cancel_secret": b"c" * 32,
    }
    event = request(client, server, "put_share", args)
    assert isinstance(event, Request)
    assert event.args["data"] == b"".join(data)
    assert type(event.args["data"]) is bytes


def test_the_limit_counts_the_blobs_bytes() -> None:
    fits = Blob([b"a" * (MAX_FRAME - 10), b""])
    assert len(pack_frame([fits], MAX_FRAME)) <= MAX_FRAME + LENGTH.size
    with pytest.raises(FrameTooLarge):
        pack_frame([Blob([b"a" * MAX_FRAME, b"b"])], MAX_FRAME)
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send_request("hello", {"x": Blob([b"a" * MAX_FRAME])})


def test_other_objects_still_cannot_be_sent() -> None:
    with pytest.raises(TypeError):
        pack_frame([object()], MAX_FRAME)


def test_a_blobs_bytes_are_copied_once() -> None:
    """The frame is the only new copy: peak memory of packing 4 MiB in 16
    parts stays near one frame (joining, then packing, then prefixing the
    length took three)."""
    data = [os.urandom(256 * 1024) for _ in range(16)]
    tracemalloc.start()
    try:
        frame = pack_frame({"data": Blob(data)}, MAX_FRAME)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(frame) > 4 << 20
    assert peak < 4.5 * (1 << 20)


def test_pieces_keep_no_view_of_the_packer() -> None:
    """What frame_pieces returns holds the Blobs' own parts and bytes of its
    own, never a view of msgpack's buffer (which is twice what it holds:
    kept while frames wait to be sent, it doubled a client's memory)."""
    parts = [os.urandom(70_000), b"xy"]
    pieces = frame_pieces({"data": Blob(parts), "n": 1}, MAX_FRAME)
    assert [p for p in pieces if any(p is q for q in parts)] == parts
    assert all(type(p) is bytes for p in pieces)
    (whole,) = frame_pieces({"data": os.urandom(70_000)}, MAX_FRAME)
    assert type(whole) is bytes
