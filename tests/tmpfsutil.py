"""A small tmpfs for tests that fill a disk (we run as root)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``64m``) mounted at ``where``, unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(path: Path, chunk: int = 64 << 10) -> int:
    """Write ``path`` until its filesystem is full; the bytes written."""
    written = 0
    with open(path, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            written += f.write(b"\xff" * chunk)
    with contextlib.suppress(OSError), open(path, "ab", buffering=0) as f:
        while True:  # the last few blocks, smaller
            written += f.write(b"\xff" * 4096)
    return written
