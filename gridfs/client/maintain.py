"""The daemon's housekeeping: renew leases, and check and repair in the background.

Every ``renew_interval`` the node renews its leases on everything it keeps
(well inside the servers' lease duration, 31 days by default).  Every
``check_interval`` it walks the same set of files at ``check_rate`` files a
second, counts each one's good shares (a check, not a verify: no block is
downloaded) and repairs those with fewer than ``repair_threshold`` good shares
on distinct servers (``happy`` when the setting is 0).

Several daemons of one node (one per mounted tree) share the work: a task
runs only in the daemon holding ``private/maintenance.lock``, and only when
``maintenance.json`` says it is due, so a restart does not redo it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator

import trio

from ..caps import ReadCap, log_name, stored_cap
from ..caps import parse as parse_cap
from ..errors import CapError, GridError
from .check import check_file
from .grid import GridClient
from .keeper import get_keeper, load_record, record
from .repair import repair_file

log = logging.getLogger(__name__)
POLL = 60.0


@contextlib.contextmanager
def maintenance_lock(grid: GridClient) -> Iterator[bool]:
    """True when this process may do the node's housekeeping now."""
    grid.node.private.mkdir(parents=True, exist_ok=True)
    fd = os.open(grid.node.private / "maintenance.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def due(grid: GridClient, task: str, interval: float) -> bool:
    last = load_record(grid.node).get(task, {}).get("at", 0.0)
    return time.time() - float(last) >= interval


async def check_and_repair(grid: GridClient) -> dict[str, int]:
    """One rate-limited pass over every file the node keeps."""
    config = grid.node.config()
    threshold = config.repair_threshold or config.happy
    caps = sorted(await get_keeper(grid).reachable())
    counts = {"files": 0, "healthy": 0, "repaired": 0, "unrecoverable": 0, "failed": 0}
    for text in caps:
        try:
            cap = parse_cap(stored_cap(text))  # a retained slice: its pack
        except CapError:
            continue  # a tree's slot: its versions are written to every server
        if not isinstance(cap, ReadCap):
            continue
        counts["files"] += 1
        try:
            result = await check_file(grid.broker, cap)
            if not result.recoverable:
                counts["unrecoverable"] += 1
                log.error(
                    "%s: only %d good shares, cannot repair", log_name(text), result.good_shares
                )
            elif result.good_shares < threshold or len(result.servers) < threshold:
                after = await repair_file(grid.broker, cap)
                counts["repaired"] += 1
                log.info("repaired %s: %d good shares now", log_name(text), after.good_shares)
            else:
                counts["healthy"] += 1
        except GridError as e:
            counts["failed"] += 1
            log.warning("check of %s failed: %s", log_name(text), e)
        await trio.sleep(1.0 / config.check_rate)
    return counts


async def maintain_forever(grid: GridClient) -> None:
    """Renew, check and repair whenever due, for as long as the caller lives."""
    config = grid.node.config()
    while True:
        with maintenance_lock(grid) as mine:
            if mine and due(grid, "renew", config.renew_interval):
                try:
                    report = await get_keeper(grid).renew_all()
                    log.info("renewed %d leases on %d objects", report.leases, report.objects)
                except GridError as e:
                    log.warning("lease renewal failed, will retry: %s", e)
            if mine and due(grid, "check", config.check_interval):
                try:
                    counts = await check_and_repair(grid)
                    record(grid.node, "check", counts)
                    log.info("background check: %s", counts)
                except GridError as e:
                    log.warning("background check failed, will retry: %s", e)
        await trio.sleep(min(POLL, config.renew_interval / 4, config.check_interval / 4))
