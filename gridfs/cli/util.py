"""Helpers shared by CLI commands."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_SIZE_RE = re.compile(r"([0-9]+)\s*([kKmMgGtT]?)i?[bB]?")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``1G``, ``512M``, ``4096``: bytes, binary units."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 512M, 1G)")
    return int(m[1]) * _UNITS[m[2].lower()]


@contextmanager
def progress_bar(total: int, label: str, unit: str = "B") -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal for large transfers; silent when piped."""
    if not sys.stderr.isatty() or total < (8 << 20 if unit == "B" else 1):
        yield lambda n: None
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        desc=label,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024,
        leave=False,
        file=sys.stderr,
    ) as bar:
        yield bar.update
