"""``systemctl --user restart`` of the mount unit (issue 15 §4), played the
way systemd plays it, from the unit file in ``systemd/``.

systemd cannot run here (it is not PID 1, and a user manager started by hand
in the root cgroup moves every process of the machine into its own
``init.scope``), so this test runs the unit's own command lines in systemd's
order: the ExecStartPre, the ExecStart with ``NOTIFY_SOCKET`` set, until the
main process (and only it: ``NotifyAccess=main``) sends ``READY=1``; for the
stop, ``KillSignal`` to the main process alone (``KillMode=mixed``), a wait of
at most ``TimeoutStopSec`` for it to exit, SIGKILL to whatever else is left
of it, then the ExecStopPost; and then the start again, at once, as a
restart does.  It must work like ``gridfs umount M && gridfs mount M``: the
second start comes up, and what was written before is there."""

from __future__ import annotations

import array
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.mountutil")
from .mountutil import VENV_BIN, Grid, is_mounted, pid_alive, wait_dead  # noqa: E402
from .test_systemd_units import MOUNT, UNITS, Unit, environment, one, parse_unit  # noqa: E402

pytest_plugins = ["tests.mountutil"]
pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

READY_TIMEOUT = 90.0


class Service:
    """One instance of gridfs-mount@.service, run as systemd would run it."""

    def __init__(self, unit: Unit, home: Path, mountpoint: Path, node: Path, log: Path) -> None:
        self.unit = unit
        self.home = home
        self.mountpoint = mountpoint
        self.log = log
        env = {k: self.expand_word(v) for k, v in environment(unit).items()}
        env["GRIDFS_NODE"] = str(node)  # as `systemctl --user edit` would set it
        self.env = env
        self.main: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def expand_word(self, word: str) -> str:
        specifiers = {"h": str(self.home), "f": str(self.mountpoint), "%": "%"}
        return re.sub(r"%(.)", lambda m: specifiers[m.group(1)], word)

    def argv(self, key: str) -> tuple[list[str], bool]:
        """The command line of ``key`` as systemd runs it, and whether its
        failure is ignored (a leading ``-``)."""
        line = one(self.unit, "Service", key)
        ignore = line.startswith("-")
        argv = []
        for word in shlex.split(line.lstrip("-@+!:")):
            word = self.expand_word(word)
            # ${VAR} as a word of its own is exactly one argument, even empty
            word = re.sub(r"\$\{(\w+)\}", lambda m: self.env.get(m.group(1), ""), word)
            argv.append(word.replace("$$", "$"))
        return argv, ignore

    def process_env(self, notify: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GRIDFS_", "NOTIFY"))}
        env.update(self.env, HOME=str(self.home))
        if notify:
            env["NOTIFY_SOCKET"] = notify
        return env

    def run(self, key: str) -> None:
        argv, ignore = self.argv(key)
        proc = subprocess.run(argv, env=self.process_env(), capture_output=True, timeout=60)
        assert ignore or proc.returncode == 0, f"{key} {argv} failed: {proc.stderr!r}"

    def start(self) -> int:
        """ExecStartPre, then ExecStart until READY=1 from the main process."""
        assert one(self.unit, "Service", "Type") == "notify"
        assert one(self.unit, "Service", "NotifyAccess") == "main"
        self.run("ExecStartPre")
        argv, _ = self.argv("ExecStart")
        address = f"@gridfs-test-{uuid.uuid4().hex}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + address[1:])
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            with open(self.log, "ab") as log:
                self.main = subprocess.Popen(
                    argv,
                    env=self.process_env(address),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # (its own group: the "cgroup" to clean up)
                )
            self.starts += 1
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                if self.main.poll() is not None:
                    raise AssertionError(
                        f"start {self.starts}: ExecStart exited {self.main.returncode} before "
                        f"READY=1\n{self.log.read_text(errors='replace')[-3000:]}"
                    )
                left = deadline - time.monotonic()
                assert left > 0, f"start {self.starts}: no READY=1 in {READY_TIMEOUT:.0f}s"
                sock.settimeout(min(left, 0.5))
                try:
                    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
                except TimeoutError:
                    continue
                sender = None
                for level, kind, cred in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                        sender = array.array("i", cred[:12])[0]  # struct ucred: pid, uid, gid
                if sender != self.main.pid:
                    continue  # NotifyAccess=main: systemd ignores anyone else
                if b"READY=1" in data.split(b"\n"):
                    return self.main.pid

    def stop(self) -> int | None:
        """KillSignal to the main process, wait for it, SIGKILL what is left,
        ExecStopPost; the main process's exit status."""
        assert one(self.unit, "Service", "KillMode") == "mixed"
        main, self.main = self.main, None
        if main is None:
            return None
        signum = signal.Signals[one(self.unit, "Service", "KillSignal")]
        timeout = float(one(self.unit, "Service", "TimeoutStopSec"))
        with contextlib.suppress(ProcessLookupError):
            os.kill(main.pid, signum)
        try:
            status = main.wait(timeout)
        except subprocess.TimeoutExpired:
            main.kill()
            main.wait()
            raise AssertionError(
                f"the daemon did not exit {timeout:.0f}s after {signum.name}"
            ) from None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(main.pid, signal.SIGKILL)
            self.run("ExecStopPost")
        return status


@pytest.fixture
def service(mount_grid: Grid, mount_node: Path, tmp_path: Path) -> Iterator[Service]:
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "gridfs").symlink_to(VENV_BIN / "gridfs")
    svc = Service(parse_unit(UNITS / MOUNT), home, tmp_path / "grid", mount_node, tmp_path / "log")
    try:
        yield svc
    finally:
        svc.stop()
        if is_mounted(svc.mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", str(svc.mountpoint)], capture_output=True)


def test_systemctl_restart_works_at_once(mount_grid: Grid, service: Service) -> None:
    """A restart while the daemon still has queued uploads (the servers are
    stopped for 3 s) and a process still has the mount open: the stop waits
    for the old daemon, the new one comes up, and the file is there."""
    old = service.start()
    assert is_mounted(service.mountpoint)
    data = os.urandom(3 << 20)
    servers = mount_grid.storage_pids()
    for p in servers.values():
        os.kill(p, signal.SIGSTOP)

    def wake() -> None:
        for p in servers.values():
            os.kill(p, signal.SIGCONT)

    resume = threading.Timer(3.0, wake)
    holder = os.open(service.mountpoint, os.O_RDONLY | os.O_DIRECTORY)  # e.g. a shell in it
    try:
        (service.mountpoint / "big").write_bytes(data)
        resume.start()
        status = service.stop()
        # exit 0, or death by SIGTERM: what systemd counts as a clean stop
        assert status in (0, -signal.SIGTERM), f"exit {status}\n{service.log.read_text()}"
        assert not pid_alive(old)
        new = service.start()
    finally:
        resume.cancel()
        wake()
        os.close(holder)
    assert new != old
    assert is_mounted(service.mountpoint)
    assert (service.mountpoint / "big").read_bytes() == data
    log = service.log.read_text(errors="replace")
    assert "mounted elsewhere" not in log
    assert service.stop() in (0, -signal.SIGTERM)
    assert wait_dead(new, 10)
    assert not is_mounted(service.mountpoint)
