"""glibc malloc settings for gridfs processes, which turn over megabytes a request.

A storage server taking a write request, or a client taking the answer to a
read, handles about a megabyte or more at a time: the socket read, its
decryption, the frame buffer and the blocks unpacked from it are each a fresh
buffer of that order, freed a moment later.  glibc serves a request that size
with ``mmap`` and returns it with ``munmap`` (its adaptive threshold follows
the size of the last chunk freed, and maps any larger one), so every request
faulted in and zeroed megabytes of new pages, which on a VM with lazily
backed memory is dear: page faults, zeroing and unmapping were about a tenth
of a storage server's CPU under ``perf``.  With the threshold above the
largest frame and a generous trim threshold, freed buffers stay in the heap
and the next request reuses them.  A process's heap then keeps what its
busiest moment needed, which is what it will need again; ``gridfs`` applies
this at start to every command.  A mount daemon lives on, mostly idle, after
its busiest moment: it hands what it keeps back to the system once it has
gone quiet (:func:`trim_when_idle`).
"""

from __future__ import annotations

import ctypes
import time

import trio

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
SETTINGS = (
    (M_MMAP_THRESHOLD, 32 << 20),  # glibc's largest; a frame is at most 4 MiB + 64 KiB
    (M_TRIM_THRESHOLD, 128 << 20),
    (M_TOP_PAD, 16 << 20),
    # One heap for all threads (they take turns at the GIL anyway): what is
    # freed in a worker thread is reused by the others, and malloc_trim can
    # give it all back (it releases free pages in every arena, but shrinks
    # only the main heap's top).  A mount daemon after a 1 GiB read, peak /
    # 25 s later: 265 / 221 MB with one arena per thread, 147 / 119 MB with one.
    (M_ARENA_MAX, 1),
)


IDLE_PERIOD = 10.0
"""Seconds between looks at the daemon's CPU time."""
BUSY_CPU = 0.5
"""CPU seconds of work since the last release that make one worth doing."""
QUIET_CPU = 0.1
"""CPU seconds in a period below which the process counts as quiet."""


def _libc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (it has mallopt and malloc_trim)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Apply :data:`SETTINGS`; False where there is no glibc ``mallopt``
    (the process then runs as before)."""
    libc = _libc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = [mallopt(param, value) == 1 for param, value in SETTINGS]
    return all(applied)


def release_freed_memory() -> None:
    """Give the system back the free memory of every arena (``malloc_trim``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim(0)


async def trim_when_idle(
    period: float = IDLE_PERIOD, busy_cpu: float = BUSY_CPU, quiet_cpu: float = QUIET_CPU
) -> None:
    """Release freed memory each time the process goes quiet (a period with
    less than ``quiet_cpu`` of CPU) after at least ``busy_cpu`` of work since
    the last release, however that work was spread over periods: a mount
    keeps its buffers while it reads or writes, and gives them back 10 to
    20 seconds after."""
    work = 0.0
    last = time.process_time()
    while True:
        await trio.sleep(period)
        now = time.process_time()
        used, last = now - last, now
        work += used
        if used < quiet_cpu and work >= busy_cpu:
            work = 0.0
            await trio.to_thread.run_sync(release_freed_memory)
