"""Reading and publishing mutable slots over the grid (replicated, not coded).

A slot's versions live whole on the first ``n`` reachable servers in the
permuted order of its storage index (a server that cannot be reached is
replaced by the next one, for readers and writers alike).

* **Read**: ask the first ``n`` at once, verify every answer (bad ones are
  reported, never trusted), and go on down the order, past empty answers and
  unreachable servers, until ``happy`` answers agree on the highest valid seq
  and it is not older than the node remembers having seen (or every server
  was asked); then re-publish that version to each of the first ``n``
  answering servers that held an older one or none: a partial publish is
  completed and a stale server catches up by being read.  Nothing found is an
  error, never "an empty slot" (see docs/formats.md, "Reading a slot").
* **Publish**: version ``expected.seq + 1``, sent with a test-and-set on
  ``expected.seq``.  A server behind that seq (stale or empty) is overwritten
  without the test; a server ahead of it proves another writer won, and the
  publish fails with :class:`SlotConflictError` so the caller re-reads and
  re-applies its change.  It succeeds once ``happy`` distinct servers hold it.
  Version 1 is made only by :func:`create_slot`, which never overwrites.

Servers never accept a seq lower than or equal to the one they hold, readers
take the highest valid seq, and a node refuses a version older than one it
has seen (:mod:`gridfs.client.seen`), so servers cannot roll a slot back.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

from ..caps import b32encode
from ..errors import CapError, GridError, UsageError
from ..mutable import (
    BadVersionError,
    SignedVersion,
    SlotCap,
    SlotReadCap,
    SlotVerifyCap,
    SlotWriteCap,
    Version,
    decrypt,
    sign_version,
    verify_version,
)
from .broker import Server, StorageBroker
from .upload import UnhappyError

log = logging.getLogger(__name__)
DEFAULT_N = 10
DEFAULT_HAPPY = 7
SLOT_TIMEOUT = 10.0
"""Seconds one server has to answer one slot call (connecting included)."""
T = TypeVar("T")


class SlotConflictError(GridError):
    """Another writer published a version newer than the one this write expected:
    re-read the slot and apply the change again.  ``seq`` is the newest seen."""

    errno = _errno.EAGAIN

    def __init__(self, message: str, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


class SlotMissingError(GridError):
    """No valid version of the slot was found.  ``detail`` says how many
    servers answered and which could not be reached."""

    exit_code = 3

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class SlotNotFoundError(SlotMissingError):
    """Every known server answered, and none holds a valid version of the slot."""

    errno = _errno.ENOENT


class SlotUnavailableError(SlotMissingError):
    """No server that answered holds a valid version, and some could not be
    reached: the slot may well exist on them, so nothing is known of it."""


class SlotRollbackError(GridError):
    """Servers offered only versions older than one this node has seen: a
    rollback (or the newer versions are out of reach), never shown as current.
    ``servers`` names the ones that offered older versions."""

    exit_code = 3

    def __init__(self, message: str, servers: tuple[str, ...]) -> None:
        super().__init__(message)
        self.servers = servers


class SeenStore(Protocol):
    """The node's memory of the highest version seen of each slot
    (:class:`gridfs.client.seen.SeenVersions`)."""

    def get(self, si: bytes) -> int: ...

    def raise_to(self, si: bytes, seq: int) -> int: ...


@dataclass(frozen=True)
class SlotRead:
    """What a read found; pass it to :func:`publish_slot` as the expectation."""

    storage_index: bytes
    seq: int
    """The highest valid version found."""
    plaintext: bytes | None
    """Its contents; None when read with a verify cap."""
    version: SignedVersion
    """Its record and signature, as servers store them."""
    servers: Mapping[int, frozenset[bytes]]
    """The server map: seq → ids of the servers that answered with it (0: with
    none or an invalid one), as they answered, before any repair."""
    problems: tuple[str, ...] = ()
    """Servers that failed or lied, and why."""
    repaired: frozenset[bytes] = frozenset()
    """Servers that took the version during this read."""
    rolled_back: frozenset[bytes] = frozenset()
    """Servers that offered a valid version older than the newest this node had
    seen before the read (stale, or rolling the slot back): refused, warned of."""


@dataclass
class _Answer:
    server: Server
    rank: int
    """The server's place in the slot's permuted order."""
    held: SignedVersion | None
    version: Version | None


@dataclass
class _Survey:
    """Every answer a survey got, and the servers it could not ask."""

    answers: list[_Answer]
    unreachable: list[Server]
    known: int
    """How many servers the broker knew."""

    def describe(self) -> str:
        return (
            f"{len(self.answers)} of {self.known} servers answered without it, "
            f"{len(self.unreachable)} could not be reached"
        )


async def read_slot(
    broker: StorageBroker,
    cap: SlotCap,
    n: int = DEFAULT_N,
    *,
    happy: int = DEFAULT_HAPPY,
    seen: SeenStore | None = None,
    repair: bool = True,
    timeout: float = SLOT_TIMEOUT,
) -> SlotRead:
    """Find the newest valid version of a slot and (``repair``) bring the
    servers where it belongs (the first ``n`` that answered) up to it.

    Servers are asked down the slot's permuted order until at least ``n``
    answered, ``happy`` of them agree on the newest version, and that version
    is not older than the one ``seen`` remembers; or until every server was
    asked (see docs/formats.md, "Reading a slot").  The version read is then
    remembered in ``seen``.

    Raises :class:`SlotNotFoundError` if every server answered and none holds
    a valid version, :class:`SlotUnavailableError` if none that answered does
    and some could not be reached, :class:`SlotRollbackError` if only versions
    older than the one ``seen`` remembers were found."""
    if not isinstance(cap, SlotWriteCap | SlotReadCap | SlotVerifyCap):
        raise CapError("reading a slot needs a slot cap (gridfs:ssk...)")
    si = cap.storage_index
    problems: list[str] = []
    floor = 0 if seen is None else seen.get(si)
    survey = await _survey(broker, si, n, happy, floor, timeout, problems)
    signed, version = _found(si, survey, problems)
    answers = survey.answers
    rolled_back = frozenset(
        a.server.node_id for a in answers if a.version is not None and a.version.seq < floor
    )
    if version.seq < floor:
        names = tuple(sorted(a.server.name for a in answers if a.server.node_id in rolled_back))
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise SlotRollbackError(
            f"servers offered only version {version.seq} of slot {_short(si)}, older than "
            f"version {floor} this node has seen ({shown}): refused",
            names,
        )
    _warn_older(si, answers, floor, problems)
    repaired: frozenset[bytes] = frozenset()
    if repair:
        home = sorted(answers, key=lambda a: a.rank)[:n]
        behind = [a.server for a in home if a.version is None or a.version.seq < version.seq]
        repaired = await _republish(behind, si, signed, version.seq, timeout, problems)
    plaintext = None if isinstance(cap, SlotVerifyCap) else decrypt(cap, version)
    if seen is not None:
        seen.raise_to(si, version.seq)
    server_map: dict[int, set[bytes]] = {}
    for a in answers:
        server_map.setdefault(0 if a.version is None else a.version.seq, set()).add(
            a.server.node_id
        )
    return SlotRead(
        si,
        version.seq,
        plaintext,
        signed,
        {seq: frozenset(ids) for seq, ids in sorted(server_map.items())},
        tuple(problems),
        repaired,
        rolled_back,
    )


async def publish_slot(
    broker: StorageBroker,
    write_cap: SlotWriteCap,
    plaintext: bytes,
    expected: SlotRead | None = None,
    n: int = DEFAULT_N,
    happy: int = DEFAULT_HAPPY,
    *,
    seen: SeenStore | None = None,
    timeout: float = SLOT_TIMEOUT,
) -> int:
    """Publish ``plaintext`` as the version after ``expected`` (after the newest
    the servers hold, found as :func:`read_slot` finds it, if None) and return
    its seq; ``seen`` then remembers it.  A slot is never published over an
    unknown state: a slot that cannot be found is made by :func:`create_slot`.

    Raises :class:`SlotConflictError` if a server holds a newer version than
    expected, :class:`UnhappyError` if fewer than ``happy`` servers took it,
    and the errors of :func:`read_slot` when ``expected`` is None."""
    if not isinstance(write_cap, SlotWriteCap):
        raise CapError("publishing to a slot needs its write cap (gridfs:ssk:...)")
    si = write_cap.storage_index
    if expected is None:
        base = (await read_slot(broker, write_cap, n, happy=happy, seen=seen, timeout=timeout)).seq
    elif expected.storage_index != si:
        raise UsageError("the expected version was read from another slot")
    else:
        base = expected.seq
    seq = await _publish(broker, write_cap, plaintext, base, n, happy, timeout)
    if seen is not None:
        seen.raise_to(si, seq)
    return seq


async def create_slot(
    broker: StorageBroker,
    plaintext: bytes,
    n: int = DEFAULT_N,
    happy: int = DEFAULT_HAPPY,
    *,
    cap: SlotWriteCap | None = None,
    seen: SeenStore | None = None,
    timeout: float = SLOT_TIMEOUT,
) -> SlotWriteCap:
    """A new slot holding ``plaintext`` as version 1: a random key unless
    ``cap`` is given.  Every write tests that the server holds no version, so
    an existing slot is never overwritten (:class:`SlotConflictError`)."""
    cap = SlotWriteCap.generate() if cap is None else cap
    await _publish(broker, cap, plaintext, 0, n, happy, timeout)
    if seen is not None:
        seen.raise_to(cap.storage_index, 1)
    return cap


# -- the work -----------------------------------------------------------------


async def _publish(
    broker: StorageBroker,
    cap: SlotWriteCap,
    plaintext: bytes,
    base: int,
    n: int,
    happy: int,
    timeout: float,
) -> int:
    if not 1 <= happy <= n:
        raise UsageError(f"need 1 <= happy <= n, not happy={happy}, n={n}")
    si = cap.storage_index
    seq = base + 1
    signed = sign_version(cap, seq, plaintext)
    accepted: set[bytes] = set()
    newer: list[int] = []
    problems: list[str] = []

    async def write(server: Server) -> None:
        current = await _write(server, si, signed, base, timeout)
        if current is None:
            accepted.add(server.node_id)
            return
        cur = _check(si, current, server, problems)
        if cur is not None and cur.seq > base:
            newer.append(cur.seq)
            return
        if cur is not None and cur.seq == base:
            raise _Lie(f"{server.name} refused version {seq} over version {base}")
        # Stale or empty (or holding garbage): it gets the version without the test.
        current = await _write(server, si, signed, None, timeout)
        if current is None:
            accepted.add(server.node_id)
            return
        cur = _check(si, current, server, problems)
        if cur is not None and cur.seq > base:
            newer.append(cur.seq)
            return
        raise _Lie(f"{server.name} refused version {seq} and holds nothing newer")

    await _first_n(broker.permuted(si), n, write, timeout, problems)
    if newer:
        raise SlotConflictError(
            f"the slot moved on to version {max(newer)} since version {base}; re-read it",
            max(newer),
        )
    if len(accepted) < happy:
        detail = f": {'; '.join(problems)}" if problems else ""
        raise UnhappyError(
            f"slot version {seq} reached {len(accepted)} servers, {happy} needed{detail}"
        )
    return seq


class _Lie(GridError):
    """A server answered in a way no honest server would."""


async def _survey(
    broker: StorageBroker,
    si: bytes,
    n: int,
    happy: int,
    floor: int,
    timeout: float,
    problems: list[str],
) -> _Survey:
    """Ask servers down the permuted order in rounds of ``n`` answers until
    :func:`_enough` says the answers settle the newest version, or every
    server was asked.  A server that fails (error, timeout) is noted and the
    next one asked in its place; an empty answer counts as an answer, not as
    "no slot".  On a healthy grid that is one round: the first ``n``."""
    servers = broker.permuted(si)
    survey = _Survey([], [], len(servers))
    queue = iter(enumerate(servers))

    async def worker(done: trio.CancelScope) -> None:
        """Get one answer: from the next server left, or the one after it..."""
        for rank, server in queue:  # shared: each worker takes the next server left
            try:
                with trio.fail_after(timeout):
                    reply = await server.calls.slot_read(si, timeout=timeout)
            except (GridError, trio.TooSlowError) as e:
                problems.append(f"{server.name}: {_reason(e)}")
                log.info("slot: %s: %s", server.name, _reason(e))
                survey.unreachable.append(server)
                continue
            held = None if reply is None else SignedVersion(*reply)
            version = None if held is None else _check(si, held, server, problems)
            survey.answers.append(_Answer(server, rank, held, version))
            if _enough(survey.answers, n, happy, floor):
                done.cancel()
            return

    with trio.CancelScope() as done:
        while len(survey.answers) + len(survey.unreachable) < len(servers):
            async with trio.open_nursery() as nursery:
                for _ in range(max(1, n)):
                    nursery.start_soon(worker, done)
    return survey


def _enough(answers: list[_Answer], n: int, happy: int, floor: int) -> bool:
    """Whether the answers settle the newest version: ``n`` servers answered
    (a publish reaches the first ``n`` reachable), ``happy`` of them agree on
    the highest valid seq (a publish that succeeded reached ``happy``), and
    that seq is not older than ``floor`` (the newest seen before)."""
    if len(answers) < n:
        return False
    seqs = [a.version.seq for a in answers if a.version is not None]
    if not seqs:
        return False
    top = max(seqs)
    return top >= floor and seqs.count(top) >= happy


def _found(si: bytes, survey: _Survey, problems: list[str]) -> tuple[SignedVersion, Version]:
    """The newest valid version the survey found, or the one clear error why
    there is none: unknown (servers out of reach) or absent (all answered)."""
    best = _newest(survey.answers, problems)
    if best is not None:
        return best
    detail = survey.describe()
    if survey.unreachable or not survey.answers:
        down = ", ".join(sorted(s.name for s in survey.unreachable)[:3])
        more = "" if len(survey.unreachable) <= 3 else ", ..."
        detail = f"{detail}: {down}{more}" if down else detail
        raise SlotUnavailableError(
            f"slot {_short(si)} cannot be found on any reachable server ({detail})", detail
        )
    raise SlotNotFoundError(f"no server holds a valid version of slot {_short(si)}", detail)


def _warn_older(si: bytes, answers: list[_Answer], floor: int, problems: list[str]) -> None:
    """Warn of each server that offered a valid version older than ``floor``
    (the read went on with a newer one): stale, or rolling the slot back."""
    for a in answers:
        if a.version is not None and a.version.seq < floor:
            message = (
                f"{a.server.name} offered version {a.version.seq} of slot {_short(si)}, "
                f"older than version {floor} this node has seen: refused (stale or rolled back)"
            )
            problems.append(message)
            log.warning("%s", message)


def _newest(answers: list[_Answer], problems: list[str]) -> tuple[SignedVersion, Version] | None:
    """The version with the highest seq; if servers hold different versions of
    that seq (writers raced), the one most of them hold, then the lowest hash,
    so every reader picks the same."""
    valid = [(a.held, a.version) for a in answers if a.held and a.version]
    if not valid:
        return None
    top = max(v.seq for _, v in valid)
    counts: dict[SignedVersion, int] = {}
    versions: dict[SignedVersion, Version] = {}
    for held, version in valid:
        if version.seq == top:
            counts[held] = counts.get(held, 0) + 1
            versions[held] = version
    if len(counts) > 1:
        problems.append(f"servers hold {len(counts)} different versions {top} (racing writers)")
    chosen = min(
        counts, key=lambda s: (-counts[s], hashlib.sha256(s.record + s.signature).digest())
    )
    return chosen, versions[chosen]


async def _republish(
    servers: list[Server],
    si: bytes,
    signed: SignedVersion,
    seq: int,
    timeout: float,
    problems: list[str],
) -> frozenset[bytes]:
    """Send a version, without test, to servers that answered with an older one."""
    done: set[bytes] = set()

    async def push(server: Server) -> None:
        try:
            with trio.fail_after(timeout):
                current = await _write(server, si, signed, None, timeout)
        except (GridError, trio.TooSlowError) as e:
            problems.append(f"{server.name}: repair failed: {_reason(e)}")
            return
        if current is None:
            done.add(server.node_id)
        else:
            cur = _check(si, current, server, problems)
            if cur is None or cur.seq <= seq:
                problems.append(f"{server.name}: refused version {seq} and holds nothing newer")

    async with trio.open_nursery() as nursery:
        for server in servers:
            nursery.start_soon(push, server)
    return frozenset(done)


async def _write(
    server: Server, si: bytes, signed: SignedVersion, expected: int | None, timeout: float
) -> SignedVersion | None:
    """None if the server took the version, else what it holds instead (if any:
    an empty ``SignedVersion`` stands for "nothing")."""
    written = await server.calls.slot_write(
        si,
        signed.record,
        signed.signature,
        expected is not None,
        expected or 0,
        **server.lease_args(si),
        timeout=timeout,
    )
    if written.ok:
        return None
    return _NOTHING if written.current is None else SignedVersion(*written.current)


_NOTHING = SignedVersion(b"", b"")


def _check(si: bytes, held: SignedVersion, server: Server, problems: list[str]) -> Version | None:
    """The verified version a server holds, or None (reported) if it is bad."""
    if held is _NOTHING:
        return None
    try:
        return verify_version(si, held.record, held.signature)
    except BadVersionError as e:
        problems.append(f"{server.name}: bad slot version: {e}")
        return None


async def _first_n(
    servers: Iterable[Server],
    n: int,
    attempt: Callable[[Server], Awaitable[None]],
    timeout: float,
    problems: list[str],
) -> None:
    """Run ``attempt`` on servers in order, ``n`` at once, until ``n`` have
    succeeded: a server that fails (error, timeout) is replaced by the next."""
    queue: Iterator[Server] = iter(servers)

    async def worker() -> None:
        for server in queue:  # shared: each worker takes the next server left
            try:
                with trio.fail_after(2 * timeout):  # a call, maybe a retry
                    await attempt(server)
                return
            except (GridError, trio.TooSlowError) as e:
                problems.append(f"{server.name}: {_reason(e)}")
                log.info("slot: %s: %s", server.name, _reason(e))

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(worker)


def _short(si: bytes) -> str:
    """A slot's name in messages: the start of its storage index (not a key)."""
    return b32encode(si)[:10]


def _reason(e: BaseException) -> str:
    return "timed out" if isinstance(e, trio.TooSlowError) else str(e)
