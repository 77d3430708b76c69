"""Numeric id maps of a mount (``-o uidmap=`` and ``-o gidmap=``).

A tree stores owners as numbers, and numbers are only names on the machine
that gave them: user 1000 here may be user 1001 on the machine that shares
the tree.  A map ``STORED:LOCAL[:COUNT]`` shows the stored ids ``STORED`` ..
``STORED+COUNT-1`` as ``LOCAL`` .. ``LOCAL+COUNT-1`` on this mount, and stores
those local ids back as the stored ones (new entries, chown).  An id no map
names travels unchanged.  A map is one-to-one both ways, or refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from gridfs.errors import UsageError

MAX_ID = 1 << 32


@dataclass(frozen=True)
class IdMap:
    ranges: tuple[tuple[int, int, int], ...] = ()
    """(stored, local, count) runs"""

    def local(self, stored: int) -> int:
        for s, loc, n in self.ranges:
            if s <= stored < s + n:
                return loc + stored - s
        return stored

    def stored(self, local: int) -> int:
        for s, loc, n in self.ranges:
            if loc <= local < loc + n:
                return s + local - loc
        return local

    def extended(self, option: str, text: str) -> IdMap:
        """This map with the run ``text`` (``STORED:LOCAL[:COUNT]``) of
        ``-o option=`` added; a run that overlaps another is refused."""
        parts = text.split(":")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3) or any(n < 0 for n in numbers):
            raise UsageError(f"-o {option}= needs STORED:LOCAL or STORED:LOCAL:COUNT, not {text!r}")
        stored, local, count = (*numbers, 1)[:3]
        if count < 1 or max(stored, local) + count > MAX_ID:
            raise UsageError(f"-o {option}={text}: ids out of range")
        for s, loc, n in self.ranges:
            if (stored < s + n and s < stored + count) or (local < loc + n and loc < local + count):
                raise UsageError(f"-o {option}={text}: overlaps another run of the map")
        return IdMap((*self.ranges, (stored, local, count)))
