"""Transfers in progress and recently finished, with their rates (for status)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

RECENT = 10


@dataclass
class Transfer:
    kind: str
    """"upload" or "download"."""
    name: str
    size: int
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def add(self, n: int) -> None:
        self.done += n

    @property
    def rate(self) -> float:
        """Bytes per second so far (or over the whole transfer once ended)."""
        elapsed = (self.ended or time.monotonic()) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "size": self.size,
            "done": self.done,
            "rate": round(self.rate),
            "seconds": round((self.ended or time.monotonic()) - self.started, 3),
        }


class Transfers:
    """One client's transfers: those running, the last few finished, totals."""

    def __init__(self) -> None:
        self.active: list[Transfer] = []
        self.recent: deque[Transfer] = deque(maxlen=RECENT)
        self.totals = {"upload": 0, "download": 0}

    def start(self, kind: str, name: str, size: int) -> Transfer:
        t = Transfer(kind, name, size)
        self.active.append(t)
        return t

    def finish(self, t: Transfer) -> None:
        if t in self.active:
            self.active.remove(t)
            t.ended = time.monotonic()
            self.totals[t.kind] = self.totals.get(t.kind, 0) + t.done
            self.recent.append(t)

    def snapshot(self) -> dict[str, Any]:
        return {
            "active": [t.to_json() for t in self.active],
            "recent": [t.to_json() for t in reversed(self.recent)],
            "uploaded_bytes": self.totals["upload"]
            + sum(t.done for t in self.active if t.kind == "upload"),
            "downloaded_bytes": self.totals["download"]
            + sum(t.done for t in self.active if t.kind == "download"),
        }
