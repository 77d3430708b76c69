"""``gridfs debug encode/decode`` end to end, as a user runs them."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .test_vectors import SECRET, VECTORS, plaintext


def gridfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "gridfs", *args], capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_clean_line(stderr: str) -> None:
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1, stderr


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "sample.bin"
    path.write_bytes(os.urandom(3 * 65536 + 123))
    return path


def encode(src: Path, out: Path, *extra: str) -> str:
    proc = gridfs("debug", "encode", str(src), "--out", str(out), *extra)
    assert proc.stdout.count("\n") == 1  # the cap alone
    return proc.stdout.strip()


def test_encode_then_decode_from_any_k(sample: Path, tmp_path: Path) -> None:
    shares = tmp_path / "shares"
    cap = encode(sample, shares, "--k", "3", "--n", "6", "--segment-size", "65536")
    files = sorted(shares.iterdir())
    assert len(files) == 6
    for f in files[:3]:
        f.unlink()
    out = tmp_path / "out.bin"
    proc = gridfs("debug", "decode", cap, str(shares), "-o", str(out))
    assert proc.stderr == ""
    assert out.read_bytes() == sample.read_bytes()


def test_corrupt_and_foreign_shares_are_named_and_skipped(sample: Path, tmp_path: Path) -> None:
    shares = tmp_path / "shares"
    cap = encode(sample, shares, "--segment-size", "65536")
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(5000))
    encode(other, shares)  # ten shares of another file in the same directory
    (shares / "notes.txt").write_text("not a share")
    mine = sorted(p for p in shares.iterdir() if p.name.endswith(".0.share"))
    corrupt = sorted(p for p in shares.iterdir() if p.name.endswith(".1.share"))
    for p in mine + corrupt:
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x40
        p.write_bytes(bytes(data))
    out = tmp_path / "out.bin"
    proc = gridfs("debug", "decode", cap, str(shares), "-o", str(out))
    assert out.read_bytes() == sample.read_bytes()
    assert "notes.txt" in proc.stderr
    assert "another file" in proc.stderr
    assert "corrupt" in proc.stderr
    corrupt_lines = [line for line in proc.stderr.splitlines() if "corrupt" in line]
    assert any(".0.share" in line for line in corrupt_lines)
    assert "Traceback" not in proc.stderr


def test_fewer_than_k_good_shares_leaves_nothing(sample: Path, tmp_path: Path) -> None:
    shares = tmp_path / "shares"
    cap = encode(sample, shares)
    for f in sorted(shares.iterdir())[2:]:
        f.unlink()
    out = tmp_path / "out.bin"
    proc = gridfs("debug", "decode", cap, str(shares), "-o", str(out), check=False)
    assert proc.returncode == 3
    one_clean_line(proc.stderr)
    assert "2 good shares" in proc.stderr and "3 are needed" in proc.stderr
    assert not out.exists()
    assert list(tmp_path.glob(".out.bin*")) == []


def test_corruption_beyond_repair_leaves_nothing(sample: Path, tmp_path: Path) -> None:
    shares = tmp_path / "shares"
    cap = encode(sample, shares, "--k", "2", "--n", "3", "--segment-size", "65536")
    for p in sorted(shares.iterdir())[:2]:
        data = bytearray(p.read_bytes())
        data[-10] ^= 1  # last record: found only after earlier segments were written
        p.write_bytes(bytes(data))
    out = tmp_path / "out.bin"
    proc = gridfs("debug", "decode", cap, str(shares), "-o", str(out), check=False)
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.glob(".out.bin*")) == []


@pytest.mark.parametrize("size", [0, 1, 64])
def test_tiny_files_are_literal(size: int, tmp_path: Path) -> None:
    src = tmp_path / "tiny"
    src.write_bytes(os.urandom(size))
    cap = encode(src, tmp_path / "shares")
    assert cap.startswith("gridfs:lit:")
    assert not (tmp_path / "shares").exists() or not any((tmp_path / "shares").iterdir())
    out = tmp_path / "out"
    gridfs("debug", "decode", cap, str(tmp_path), "-o", str(out))
    assert out.read_bytes() == src.read_bytes()


def test_convergent_encode_matches_vectors(tmp_path: Path) -> None:
    vector = next(v for v in json.loads(VECTORS.read_text()) if v["size"] == 10_000)
    src = tmp_path / "vector.bin"
    src.write_bytes(plaintext(10_000))
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    cap = encode(
        src, tmp_path / "s", "--segment-size", "1000", "--convergence-secret-file", str(secret)
    )
    assert cap == vector["cap"]
    digests = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "s").iterdir())
    assert digests == sorted(vector["share_sha256"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "4", "--n", "3"], "n must be between"),
        (["--k", "0"], "k must be between"),
        (["--n", "300"], "n must be between"),
        (["--segment-size", "0"], "segment size"),
    ],
)
def test_bad_parameters_are_one_line_errors(
    sample: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    proc = gridfs("debug", "encode", str(sample), "--out", str(tmp_path / "s"), *args, check=False)
    assert proc.returncode == 2
    one_clean_line(proc.stderr)
    assert message in proc.stderr


def test_missing_input_is_one_line_error(tmp_path: Path) -> None:
    proc = gridfs("debug", "encode", str(tmp_path / "nope"), "--out", str(tmp_path), check=False)
    assert proc.returncode == 2
    one_clean_line(proc.stderr)
