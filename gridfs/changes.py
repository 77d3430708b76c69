"""The changes a tree commit applies (:mod:`gridfs.tree`): put an entry at a
path, delete a path, move one path to another.  Records only: names are
normalized as directories store them; applying them is the tree's job."""

from __future__ import annotations

from dataclasses import dataclass

from .dirnode import Entry, check_name

Path = tuple[str, ...]


def normal_path(path: Path) -> Path:
    """Names as directories store them (NFC, checked), so that a name spelled
    in another Unicode form finds, replaces or deletes the same entry."""
    return tuple(check_name(name) for name in path)


@dataclass(frozen=True)
class Put:
    """Make ``path`` hold ``entry``.  ``base`` is the cap the writer saw there
    (None: not checked); another cap found there instead is a conflict.  A
    new name sets the parent directory's mtime to the entry's ctime.

    A ``soft`` put (a read moving the atime) changes only the version the
    writer saw: when the name is gone or holds another cap than ``base``, it
    is dropped rather than kept as a conflict, since a read must never bring
    back an older version or set one aside.  (For a file inside its
    directory, ``base`` is "" and the inline bytes must be the same.)"""

    path: Path
    entry: Entry
    base: str | None = None
    soft: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", normal_path(self.path))


@dataclass(frozen=True)
class Delete:
    """Remove ``path`` (unless ``base`` is given and another cap is found
    there).  ``when_ns``: the time of the change, which becomes the parent
    directory's mtime (0: the time the change is applied)."""

    path: Path
    base: str | None = None
    when_ns: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", normal_path(self.path))


@dataclass(frozen=True)
class Move:
    """Rename ``src`` to ``dst``, replacing what is there (``when_ns``: see :class:`Delete`)."""

    src: Path
    dst: Path
    when_ns: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", normal_path(self.src))
        object.__setattr__(self, "dst", normal_path(self.dst))


Change = Put | Delete | Move
