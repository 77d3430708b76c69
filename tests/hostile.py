"""Hostile storage servers for slot tests: servers that lie about mutable slots.

A grid opened with :func:`open_hostile_grid` is an ordinary in-process grid
(:mod:`tests.gridutil`: real TLS servers, real disks) whose sessions are
:class:`HostileSession`: honest until a test arms a server with
:func:`attack`, after which it answers slot calls as the attack says:

=========  ===================================================================
replay     ``slot_read`` answers with an old version it kept (a server restored
           from a backup, or rolling the slot back on purpose); writes are
           taken, so it looks up to date to a writer
empty      ``slot_read`` answers "no slot" although it holds one (hiding the
           root); writes are taken
forge      ``slot_read`` answers with the held record's seq raised by 1000 and
           the old signature (a higher seq it cannot sign)
stall      every slot call waits forever (a server that accepts connections
           and never answers)
=========  ===================================================================

Servers that are down are :meth:`StorageNode.kill`-ed as usual.  Every slot
write any server receives is logged in :data:`SLOT_WRITES` (what writers
sent, taken or not), so a test can look at the records two racing writers
made.

:func:`open_hostile_grid` passes :class:`HostileSession` as the grid's
``session_class``.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgpack
import trio

from . import gridutil
from .gridutil import Grid, GridSession, StorageNode

SlotAttackMode = Literal["replay", "empty", "forge", "stall"]


@dataclass
class SlotAttack:
    """What an armed server does to slot calls (for ``si``, or every slot)."""

    mode: SlotAttackMode
    si: bytes | None = None
    old: tuple[bytes, bytes] | None = None
    """For ``replay``: the (record, signature) it offers."""
    reads: int = 0
    """How many reads it answered with the attack."""


@dataclass(frozen=True)
class SlotWrite:
    """One ``slot_write`` a server received."""

    node: int
    si: bytes
    record: bytes
    signature: bytes


SLOT_WRITES: list[SlotWrite] = []
_ATTACKS: weakref.WeakKeyDictionary[StorageNode, SlotAttack] = weakref.WeakKeyDictionary()


def attack(
    node: StorageNode,
    mode: SlotAttackMode,
    si: bytes | None = None,
    old: tuple[bytes, bytes] | None = None,
) -> SlotAttack:
    """Arm ``node`` (running or not); returns the attack, which counts its reads."""
    if mode == "replay" and old is None:
        raise ValueError("a replay needs the old version to offer")
    armed = SlotAttack(mode, si, old)
    _ATTACKS[node] = armed
    return armed


def disarm(node: StorageNode) -> None:
    _ATTACKS.pop(node, None)


class HostileSession(GridSession):
    """A storage session that lies about slots when its server is armed."""

    def _armed(self, si: bytes) -> SlotAttack | None:
        armed = _ATTACKS.get(self.node)
        if armed is None or (armed.si is not None and armed.si != si):
            return None
        return armed

    async def rpc_slot_read(self, si: bytes) -> list[bytes] | None:
        armed = self._armed(si)
        if armed is None:
            return await super().rpc_slot_read(si)
        armed.reads += 1
        if armed.mode == "stall":
            await trio.sleep_forever()
        if armed.mode == "empty":
            return None
        if armed.mode == "replay":
            assert armed.old is not None
            return list(armed.old)
        held = await super().rpc_slot_read(si)
        if held is None:
            return None
        record, signature = held
        fields = msgpack.unpackb(record, raw=False)
        fields["seq"] += 1000
        return [msgpack.packb(fields, use_bin_type=True), signature]

    # The other arguments pass through as they are, whatever the server takes.
    async def rpc_slot_write(  # type: ignore[override]
        self, si: bytes, record: bytes, signature: bytes, **args: Any
    ) -> Any:
        SLOT_WRITES.append(SlotWrite(self.node.index, si, record, signature))
        armed = self._armed(si)
        if armed is not None and armed.mode == "stall":
            await trio.sleep_forever()
        return await super().rpc_slot_write(si, record, signature, **args)


@contextlib.asynccontextmanager
async def open_hostile_grid(root: Path, servers: int = 20, **settings: Any) -> AsyncIterator[Grid]:
    """:func:`tests.gridutil.open_grid` whose servers can be armed; every
    attack and the write log are cleared on exit."""
    async with gridutil.open_grid(root, servers, session_class=HostileSession, **settings) as grid:
        try:
            yield grid
        finally:
            for node in grid.nodes:
                disarm(node)
            SLOT_WRITES.clear()


def holders(grid: Grid, si: bytes) -> list[StorageNode]:
    """The servers with the slot ``si`` on disk (read directly: works while stopped)."""
    return [node for node in grid.nodes if node.has_slot(si)]
