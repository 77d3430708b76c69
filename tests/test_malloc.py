"""gridfs.malloc: gridfs processes reuse freed request buffers instead of
faulting in fresh pages for every request."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from gridfs import malloc
from gridfs.malloc import keep_freed_memory

# A server's turnover in small: buffers of sizes that vary (frames, socket
# reads, decrypted records), each freed before the next.  glibc maps each one
# larger than the last it freed, and unmaps it again when it is freed.
WORKLOAD = """
import resource, sys
from gridfs.malloc import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
elif sys.argv[1] == "cli":  # what a gridfs command does first (not mount)
    from gridfs.cli import main
    main(["grid", "status", sys.argv[2]])
elif sys.argv[1] == "mount":  # so does a mount (its daemon trims when idle)
    from gridfs.cli import main
    main(["mount", sys.argv[2], "--node", sys.argv[2]])
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
frame = bytearray(1_000_000); del frame
before = faults()
for i in range(20):
    frame = bytearray(1_000_000 + 50_000 * i)
    del frame
print(faults() - before)
"""


def page_faults(mode: str, where: str = ".") -> int:
    out = subprocess.run(
        [sys.executable, "-c", WORKLOAD, mode, where], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])  # after what the command printed


def test_freed_request_buffers_are_reused_not_faulted_in_again(tmp_path: Path) -> None:
    if not keep_freed_memory():
        pytest.skip("no glibc mallopt here")
    plain, tuned = page_faults("plain"), page_faults("tuned")
    cli = page_faults("cli", str(tmp_path / "grid"))
    # 4 KiB pages: some 7 000 faults for 20 buffers of about 1.5 MB each
    # faulted in afresh; a few hundred when the heap grows by the differences.
    assert tuned * 10 < plain, (tuned, plain)
    assert cli * 10 < plain, (cli, plain)
    assert page_faults("mount", str(tmp_path / "none")) * 10 < plain


RELEASE = """
import sys
from gridfs.malloc import keep_freed_memory, release_freed_memory
assert keep_freed_memory()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
buffers = [bytearray(1 << 20) for _ in range(64)]
before = rss()
del buffers
kept = rss()
release_freed_memory()
print(before, kept, rss())
"""


def test_what_is_kept_is_given_back_on_release() -> None:
    if not keep_freed_memory():
        pytest.skip("no glibc mallopt here")
    out = subprocess.run(
        [sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True
    )
    before, kept, after = map(int, out.stdout.split())
    assert kept > before - (16 << 20)  # 64 MiB freed, and kept for reuse
    assert after < before - (48 << 20)  # given back


async def test_memory_is_released_once_when_the_process_goes_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    released: list[float] = []
    monkeypatch.setattr(malloc, "release_freed_memory", lambda: released.append(time.monotonic()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(malloc.trim_when_idle, 0.2, 0.15, 0.03)
        await trio.sleep(0.05)
        for _ in range(2):  # work spread over two periods, neither enough alone
            end = time.process_time() + 0.09
            while time.process_time() < end:
                pass
            await trio.sleep(0.12)
            assert released == []  # not while busy
        await trio.sleep(1.0)  # quiet for several periods
        assert len(released) == 1  # once, on going quiet; not again while quiet
        nursery.cancel_scope.cancel()
