"""Uploading a new version of a file from its old version and an edit.

A queued edit (gridfs.workqueue, ``upload_edit``) holds only the ranges a
mount changed, in a sparse tempfile, plus the cap of the version they
change.  :func:`put_edit` turns that into a stored file.  This version
materializes the whole new file (the base's bytes, then the changed ranges
over them, truncated or extended to the new size) next to the tempfile and
uploads it as one immutable file; the chunked format's ``put_edit``
(gridfs.client.chunked) has the same interface and uploads only the chunks
that changed, and the integrator swaps it in here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..caps import parse_read_cap
from ..extents import clip
from ..sparse import copy_ranges


async def put_edit(
    grid: Any, base_cap: str, source: Path, extents: list[tuple[int, int]], size: int
) -> str:
    """Store the version of the file ``base_cap`` whose bytes in each
    ``(offset, length)`` of ``extents`` are those of the sparse file
    ``source`` at the same offsets, truncated or extended to ``size`` (new
    bytes past the base's end and outside ``extents`` are zeros); its cap."""
    base = parse_read_cap(base_cap)
    full = source.with_name(source.name + ".full")
    fd = os.open(full, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        keep = min(size, base.size)

        async def write(data: bytes) -> None:
            os.write(fd, data)

        if keep:
            await grid.get(base, write, 0, keep)
        os.ftruncate(fd, size)
        src = os.open(source, os.O_RDONLY)
        try:
            copy_ranges(src, fd, clip(extents, size))
        finally:
            os.close(src)
    finally:
        os.close(fd)
    try:
        report = await grid.put(full, drop=True)
        return str(report.cap.to_string())
    finally:
        full.unlink(missing_ok=True)
