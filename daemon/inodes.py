"""Inode numbers for the mount: one per path, stable while the daemon runs."""

from __future__ import annotations

import errno

import pyfuse3

Path_ = tuple[str, ...]


class Inodes:
    """Stable inode numbers for paths while the daemon runs."""

    def __init__(self) -> None:
        self.paths: dict[int, Path_] = {pyfuse3.ROOT_INODE: ()}
        self.by_path: dict[Path_, int] = {(): pyfuse3.ROOT_INODE}
        self._next = pyfuse3.ROOT_INODE + 1

    def get(self, path: Path_) -> int:
        ino = self.by_path.get(path)
        if ino is None:
            ino = self.by_path[path] = self._next
            self.paths[ino] = path
            self._next += 1
        return ino

    def path(self, ino: int) -> Path_:
        try:
            return self.paths[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def moved(self, src: Path_, dst: Path_) -> None:
        """Paths at and under ``src`` are now under ``dst``."""
        self.by_path.pop(dst, None)
        for path, ino in list(self.by_path.items()):
            if path[: len(src)] == src:
                new = dst + path[len(src) :]
                del self.by_path[path]
                self.by_path[new] = ino
                self.paths[ino] = new

    def unlinked(self, path: Path_) -> None:
        self.by_path.pop(path, None)
