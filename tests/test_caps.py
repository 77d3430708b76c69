import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridfs import caps
from gridfs.caps import LITERAL_MAX, LiteralCap, ReadCap, VerifyCap
from gridfs.errors import CapError

hashes = st.binary(min_size=32, max_size=32)
kn = st.integers(1, 256).flatmap(lambda k: st.tuples(st.just(k), st.integers(k, 256)))
sizes = st.integers(0, 2**64 - 1)


@given(st.binary(max_size=LITERAL_MAX))
def test_literal_round_trip(data: bytes) -> None:
    cap = LiteralCap(data)
    assert caps.parse(cap.to_string()) == cap


@given(hashes, hashes, kn, sizes)
def test_read_and_verify_round_trip(key: bytes, ueb: bytes, kn: tuple[int, int], size: int) -> None:
    cap = ReadCap(key, ueb, *kn, size)
    text = cap.to_string()
    assert text.startswith("gridfs:chk:")
    assert caps.parse(text) == cap
    vcap = cap.verify_cap()
    assert caps.parse(vcap.to_string()) == vcap
    assert vcap.storage_index == cap.storage_index
    if key != ueb:  # the key never shows up in the verify cap
        assert caps.b32encode(key) not in vcap.to_string()


def test_literal_cap_is_shorter_than_chk_cap() -> None:
    lit = LiteralCap(b"x" * LITERAL_MAX).to_string()
    chk = ReadCap(b"k" * 32, b"u" * 32, 3, 10, LITERAL_MAX + 1).to_string()
    assert len(lit) < len(chk)


GOOD = ReadCap(b"k" * 32, b"u" * 32, 3, 10, 1000).to_string()
MALFORMED = [
    "",
    "hello",
    "gridfs:",
    "gridfs:chk:",
    GOOD.replace("gridfs:chk:", "gridfs:CHK:"),
    GOOD.upper(),
    GOOD + ":7",
    GOOD.replace(":3:10:", ":03:10:"),
    GOOD.replace(":3:10:", ":0:10:"),
    GOOD.replace(":3:10:", ":11:10:"),
    GOOD.replace(":3:10:", ":3:257:"),
    GOOD.replace(":1000", ":-1"),
    GOOD.replace(":1000", ":18446744073709551616"),
    GOOD[:20] + GOOD[21:],  # key one character short
    GOOD.replace(GOOD[11:14], "1!0"),
    "gridfs:lit:" + caps.b32encode(b"x" * (LITERAL_MAX + 1)),
    "gridfs:lit:abc",  # not canonical base32 length
    "gridfs:lit:ab",  # non-zero trailing bits
    "gridfs:chk-verify:" + caps.b32encode(b"s" * 15) + GOOD[63:],
    "gridfs:mystery:abc",
    "gridfs:chk:" + "a" * 10000,
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_caps_raise_one_line_cap_error(text: str) -> None:
    with pytest.raises(CapError) as err:
        caps.parse(text)
    assert isinstance(err.value, ValueError)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


def test_verify_cap_cannot_read() -> None:
    vcap = ReadCap(os.urandom(32), os.urandom(32), 3, 10, 1000).verify_cap()
    with pytest.raises(CapError, match="verify cap"):
        caps.parse_read_cap(vcap.to_string())
    assert isinstance(caps.parse(vcap.to_string()), VerifyCap)


def test_cli_reports_malformed_cap_on_one_line(tmp_path: os.PathLike[str]) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gridfs",
            "debug",
            "decode",
            "gridfs:chk:nope",
            str(tmp_path),
            "-o",
            os.path.join(tmp_path, "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "not a gridfs cap" in proc.stderr
