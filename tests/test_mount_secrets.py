"""The mount keeps its cap out of every process list and log, and mounts
nosuid,nodev unless told otherwise (issue 14, section 5).

Attacks: a local user reading ``ps`` (/proc/PID/cmdline), the daemon's
environment, ``gridfs status`` and mount.log; anyone who can write the
tree planting a setuid-root program for a root mount.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gridfs.caps import log_name

from .mountutil import GRIDFS, Grid, Mount, gridfs, is_mounted, tree_cap

pytest_plugins = ["tests.mountutil"]

WINDOW = 20


def leaked(text: str, cap: str) -> bool:
    body = cap.split(":", 2)[2]
    return any(body[i : i + WINDOW] in text for i in range(len(body) - WINDOW + 1))


def proc_text(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def mount_flags(mountpoint: Path) -> set[str]:
    """The per-mount flags (rw, nosuid, nodev, ...) of ``mountpoint``."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                return set(fields[5].split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


def assert_private(node: Path, mount: Mount, cap: str) -> None:
    """Nothing a local user can read shows the cap; the node is private."""
    assert mount.pid is not None
    assert not leaked(proc_text(mount.pid, "cmdline"), cap), proc_text(mount.pid, "cmdline")
    assert not leaked(proc_text(mount.pid, "environ"), cap)
    status = gridfs("status", "--json", "--no-servers", "--node", node).stdout
    assert not leaked(status, cap), status
    [shown] = json.loads(status)["mounts"]
    assert shown["tree"] == log_name(cap)
    assert not leaked(gridfs("status", "--no-servers", "--node", node).stdout, cap)
    assert not leaked((node / "mount.log").read_text(errors="replace"), cap)
    assert stat.S_IMODE((node / "mount.log").stat().st_mode) == 0o600
    assert stat.S_IMODE(node.stat().st_mode) == 0o700


def test_mount_by_cap_on_the_command_line_hands_it_over_privately(
    mount_grid: Grid, tmp_path: Path
) -> None:
    node = mount_grid.new_node(tmp_path)
    cap = tree_cap(node)
    (node / "mount.log").write_text("an old log\n")
    os.chmod(node / "mount.log", 0o644)  # an older gridfs made it so
    os.chmod(node, 0o755)
    mount = Mount(tmp_path / "mnt", node, tree=cap).mount()
    try:
        (mount.mountpoint / "hello.txt").write_text("hello")
        assert (mount.mountpoint / "hello.txt").read_text() == "hello"
        assert_private(node, mount, cap)
    finally:
        mount.unmount(strict=True)
    assert gridfs("cat", "grid:/hello.txt", "--node", node).stdout == "hello"


def test_mount_with_a_cap_file_or_stdin(mount_grid: Grid, tmp_path: Path) -> None:
    node = mount_grid.new_node(tmp_path)
    cap = tree_cap(node)
    cap_file = tmp_path / "tree.cap"
    cap_file.write_text(cap + "\n")
    os.chmod(cap_file, 0o644)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    refused = gridfs("mount", mnt, "--cap-file", cap_file, "--node", node, check=False)
    assert refused.returncode == 2 and "chmod 600" in refused.stderr
    assert not is_mounted(mnt)
    os.chmod(cap_file, 0o600)
    for how in ("file", "stdin", "option"):
        args = [GRIDFS, "mount", str(mnt), "--node", str(node), "-o", "refresh=1"]
        if how == "option":  # as fstab or a systemd unit would give it
            args[-1] += f",cap_file={cap_file}"
        else:
            args += ["--cap-file", str(cap_file) if how == "file" else "-"]
        proc = subprocess.run(
            args, input=cap + "\n" if how == "stdin" else "", capture_output=True, text=True,
            timeout=90,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert not leaked(proc.stdout, cap), proc.stdout
        mount = Mount(mnt, node).adopt(int(proc.stdout.split("(pid ")[1].split(";")[0]))
        try:
            assert is_mounted(mnt)
            (mnt / f"{how}.txt").write_text(how)
            assert_private(node, mount, cap)
        finally:
            mount.unmount(strict=True)


def test_a_foreground_mount_refuses_a_cap_in_its_argv(mount_grid: Grid, tmp_path: Path) -> None:
    node = mount_grid.new_node(tmp_path)
    cap = tree_cap(node)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = gridfs("mount", "--foreground", mnt, cap, "--node", node, check=False, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--cap-file" in proc.stderr, proc.stderr
    assert not leaked(proc.stderr, cap)
    assert not is_mounted(mnt)


@pytest.fixture
def open_mountpoint() -> Iterator[Path]:
    """A mountpoint every user can reach (pytest's tmp_path is 0700)."""
    top = Path(tempfile.mkdtemp(prefix="gridfs-suid-", dir="/tmp"))
    os.chmod(top, 0o755)
    try:
        yield top / "mnt"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def run_as_nobody(program: Path) -> str:
    proc = subprocess.run(
        [str(program)], user=65534, group=65534, extra_groups=[], capture_output=True,
        text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a setuid-root program")
@pytest.mark.parametrize("options", ["", "suid,dev"])
def test_root_mounts_are_nosuid_nodev_unless_told(
    mount_grid: Grid, tmp_path: Path, open_mountpoint: Path, options: str
) -> None:
    """A setuid-root program written to a root mount (by anyone who can
    write the tree) runs with its caller's rights, not root's: the mount is
    nosuid,nodev.  ``-o suid,dev`` opts out, and then it does run as root."""
    node = mount_grid.new_node(tmp_path)
    opts = ",".join(filter(None, ["refresh=1", "allow_other", options]))
    mount = Mount(open_mountpoint, node, options=opts).mount()
    try:
        flags = mount_flags(open_mountpoint)
        program = open_mountpoint / "id"
        shutil.copyfile("/usr/bin/id", program)
        os.chmod(program, 0o4755)
        assert stat.S_IMODE(program.stat().st_mode) == 0o4755 and program.stat().st_uid == 0
        shown = run_as_nobody(program)
        if options:
            assert not {"nosuid", "nodev"} & flags, flags
            assert "euid=0(" in shown, shown  # the test can see setuid work
        else:
            assert {"nosuid", "nodev"} <= flags, flags
            assert "uid=65534(" in shown and "euid=" not in shown, shown
    finally:
        mount.unmount(strict=True)
