"""gridfs.malloc: gridfs processes reuse freed request buffers instead of
faulting in fresh pages for every request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
elif sys.argv[1] == "mount":  # a mount daemon keeps glibc's defaults
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
    assert page_faults("mount", str(tmp_path / "none")) * 2 > plain  # gives memory back
