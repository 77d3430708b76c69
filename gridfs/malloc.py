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
busiest moment needed, which is what it will need again.  ``gridfs`` applies
this at start to every command but ``mount``: servers, ``put`` and ``get``.
A mount daemon lives on, mostly idle, after its busiest moment, so it keeps
glibc's defaults and gives memory back.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
SETTINGS = (
    (M_MMAP_THRESHOLD, 32 << 20),  # glibc's largest; a frame is at most 4 MiB + 64 KiB
    (M_TRIM_THRESHOLD, 128 << 20),
    (M_TOP_PAD, 16 << 20),
)


def keep_freed_memory() -> bool:
    """Apply :data:`SETTINGS`; False where there is no glibc ``mallopt``
    (the process then runs as before)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = [mallopt(param, value) == 1 for param, value in SETTINGS]
    return all(applied)
